"""Image fetching: Label Studio auth (legacy token and PAT refresh), allow-list, limits, decoding.

A tiny fake Label Studio on 127.0.0.1 checks the Authorization header exactly as LS 1.23 does
(`Token <legacy>` or `Bearer <access>` from POST /api/token/refresh/; anything else is 401).
"""

from __future__ import annotations

import base64
import http.server
import io
import json
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from PIL import Image

from axx_backend.labelstudio.client import ApiKeyAuth, jwt_claims
from axx_backend.labelstudio.images import FetchLimits, HostAllowList, ImageFetcher, ImageFetchError
from tests.ls_harness import LocalHTTPServer

LEGACY = "0123456789abcdef0123456789abcdef01234567"


def make_jwt(claims: dict[str, Any]) -> str:
    def enc(d: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(d).encode()).decode().rstrip("=")

    return f"{enc({'alg': 'HS256', 'typ': 'JWT'})}.{enc(claims)}.c2lnbmF0dXJl"


PAT = make_jwt({"token_type": "refresh", "exp": 9_999_999_999, "user_id": "1"})


def png(arr: np.ndarray, mode: str | None = None, fmt: str = "PNG", **save: Any) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr, mode=mode).save(buf, format=fmt, **save)
    return buf.getvalue()


class FakeLabelStudio(LocalHTTPServer):
    """Serves /data/upload/..., /data/local-files/?d=..., /api/token/refresh/, /api/projects/<id>."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.seen_auth: list[tuple[str, str | None]] = []
        self.refreshes = 0
        self.access_ttl = 300
        self.valid_access: set[str] = set()
        self.project_version = "AXX"
        self.patch_answers: list[int] = []  # status codes for the next PATCHes (default 200)
        self.redirects: dict[str, str] = {}
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _authorised(self) -> bool:
                auth = self.headers.get("Authorization")
                outer.seen_auth.append((self.path, auth))
                return auth == f"Token {LEGACY}" or (
                    auth is not None and auth.startswith("Bearer ") and auth[7:] in outer.valid_access
                )

            def _send(self, code: int, body: bytes = b"", ctype: str = "application/json", **headers: str) -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                for k, v in headers.items():
                    self.send_header(k.replace("_", "-"), v)
                if "Content_Length" not in headers:
                    self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                if self.path in outer.redirects:
                    return self._send(302, Location=outer.redirects[self.path])
                if self.path.startswith("/public/"):
                    outer.seen_auth.append((self.path, self.headers.get("Authorization")))
                    return self._serve(self.path)
                if self.path == "/slow.png":
                    time.sleep(2)
                    return self._send(200, b"late", "image/png")
                if not self._authorised():
                    return self._send(401, b'{"detail":"Authentication credentials were not provided."}')
                if self.path.startswith("/api/projects/"):
                    body = json.dumps({"id": 1, "model_version": outer.project_version}).encode()
                    return self._send(200, body)
                self._serve(self.path)

            def _serve(self, path: str) -> None:
                if path == "/public/chunked.png":  # no Content-Length: the reader must count
                    self.send_response(200)
                    self.send_header("Content-Type", "image/png")
                    self.end_headers()
                    self.wfile.write(b"x" * 5000)
                    self.close_connection = True
                    return
                data = outer.files.get(path)
                if data is None:
                    return self._send(404, b"not found", "text/plain")
                self._send(200, data, "image/png")

            def do_POST(self) -> None:  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                if self.path == "/api/token/refresh/":
                    if body.get("refresh") != PAT:
                        return self._send(401, b'{"detail":"Token is invalid"}')
                    outer.refreshes += 1
                    access = make_jwt({"token_type": "access", "exp": int(time.time()) + outer.access_ttl,
                                       "n": outer.refreshes})  # fmt: skip
                    outer.valid_access.add(access)
                    return self._send(200, json.dumps({"access": access}).encode())
                self._send(404)

            def do_PATCH(self) -> None:  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                if not self._authorised():
                    return self._send(401)
                code = outer.patch_answers.pop(0) if outer.patch_answers else 200
                if code == 200:
                    outer.project_version = body["model_version"]
                    return self._send(200, json.dumps({"model_version": outer.project_version}).encode())
                self._send(code, b'{"model_version":["Model version doesn\'t exist"]}')

        super().__init__(Handler)


@pytest.fixture()
def ls() -> Iterator[FakeLabelStudio]:
    server = FakeLabelStudio()
    rgb = np.random.default_rng(0).integers(0, 256, (20, 30, 3)).astype(np.uint8)  # ~1.8 kB as PNG
    server.files["/data/upload/1/a.png"] = png(rgb)
    server.files["/data/local-files/?d=dir/b.png"] = png(rgb)
    server.files["/public/c.png"] = png(rgb)
    yield server
    server.close()


@pytest.fixture()
def other() -> Iterator[FakeLabelStudio]:
    server = FakeLabelStudio()
    server.files["/public/x.png"] = png(np.zeros((5, 5, 3), np.uint8))
    yield server
    server.close()


def test_key_kind_is_told_by_shape() -> None:
    assert ApiKeyAuth("http://x", LEGACY).kind == "legacy"
    assert ApiKeyAuth("http://x", PAT).kind == "pat"
    assert jwt_claims(PAT)["token_type"] == "refresh"
    assert jwt_claims("not.a.jwt") is None and jwt_claims(LEGACY) is None


def test_legacy_token_reads_uploads_and_local_files(ls: FakeLabelStudio) -> None:
    fetcher = ImageFetcher(ls.url, ApiKeyAuth(ls.url, LEGACY))
    assert fetcher.decode("/data/upload/1/a.png").image.size == (30, 20)
    assert fetcher.decode("/data/local-files/?d=dir/b.png").image.mode == "RGB"
    assert fetcher.decode(f"{ls.url}/data/upload/1/a.png").image.size == (30, 20)  # absolute URL to LS: key too
    assert {auth for _, auth in ls.seen_auth} == {f"Token {LEGACY}"}
    assert ls.refreshes == 0


def test_pat_is_refreshed_once_and_cached_until_near_expiry(ls: FakeLabelStudio) -> None:
    now = [1000.0]
    auth = ApiKeyAuth(ls.url, PAT, clock=lambda: now[0])
    ls.access_ttl = 300
    fetcher = ImageFetcher(ls.url, auth)
    for _ in range(3):
        fetcher.decode("/data/upload/1/a.png")
    assert ls.refreshes == 1
    assert all(a is not None and a.startswith("Bearer ") for _, a in ls.seen_auth)
    exp = float(jwt_claims(auth.access_token())["exp"])
    now[0] = exp - 10  # inside the refresh margin: a new access token
    fetcher.decode("/data/upload/1/a.png")
    assert ls.refreshes == 2


def test_pat_refreshes_again_when_the_access_token_is_refused(ls: FakeLabelStudio) -> None:
    auth = ApiKeyAuth(ls.url, PAT)
    fetcher = ImageFetcher(ls.url, auth)
    fetcher.decode("/data/upload/1/a.png")
    ls.valid_access.clear()  # revoked (or LS restarted): one 401, one refresh, one retry
    assert fetcher.decode("/data/upload/1/a.png").image.size == (30, 20)
    assert ls.refreshes == 2


def test_bad_keys_are_transient_errors_with_a_hint(ls: FakeLabelStudio) -> None:
    with pytest.raises(ImageFetchError, match="LABEL_STUDIO_API_KEY") as e:
        ImageFetcher(ls.url, ApiKeyAuth(ls.url, "wrong")).decode("/data/upload/1/a.png")
    assert e.value.transient
    bad_pat = make_jwt({"token_type": "refresh", "exp": 9_999_999_999})
    with pytest.raises(ImageFetchError, match="refused the Personal Access Token") as e:
        ImageFetcher(ls.url, ApiKeyAuth(ls.url, bad_pat)).decode("/data/upload/1/a.png")
    assert e.value.transient
    with pytest.raises(ImageFetchError, match="set LABEL_STUDIO_URL") as e:
        ImageFetcher(None, None).decode("/data/upload/1/a.png")
    assert e.value.transient
    with pytest.raises(ImageFetchError, match="set LABEL_STUDIO_API_KEY"):
        ImageFetcher(ls.url, None).decode("/data/upload/1/a.png")


def test_allow_list(ls: FakeLabelStudio, other: FakeLabelStudio) -> None:
    default = ImageFetcher(ls.url, ApiKeyAuth(ls.url, LEGACY))
    # Issue 12: Label Studio is read only under /data/upload/ and /data/local-files/ (it was: any path)
    with pytest.raises(ImageFetchError, match="only /data/upload/ and /data/local-files/"):
        default.decode(f"{ls.url}/public/c.png")
    with pytest.raises(ImageFetchError, match="host not allowed") as e:
        default.decode(f"{other.url}/public/x.png")
    assert not e.value.transient and other.seen_auth == []  # refused before any request; issue 12: not transient

    allowed = ImageFetcher(ls.url, ApiKeyAuth(ls.url, LEGACY), [f"127.0.0.1:{other.port}"])
    assert allowed.decode(f"{other.url}/public/x.png").image.size == (5, 5)
    assert other.seen_auth == [("/public/x.png", None)]  # the key never leaves Label Studio
    with pytest.raises(ImageFetchError, match="host not allowed"):
        allowed.decode(f"{ls.url}/public/c.png".replace("127.0.0.1", "localhost"))


def test_redirects_are_checked_hop_by_hop(ls: FakeLabelStudio, other: FakeLabelStudio) -> None:
    # `other` is an allowed image host; the fake Label Studio serves /data/ with the key
    other.redirects["/public/here.png"] = "/public/x.png"
    other.redirects["/public/away.png"] = f"http://localhost:{ls.port}/public/c.png"
    other.redirects["/public/to-ls.png"] = f"{ls.url}/data/upload/1/a.png"
    other.redirects["/public/to-api.png"] = f"{ls.url}/api/projects/1"
    ls.redirects["/data/upload/1/moved.png"] = f"{other.url}/public/x.png"
    fetcher = ImageFetcher(ls.url, ApiKeyAuth(ls.url, LEGACY), [f"127.0.0.1:{other.port}"])
    assert fetcher.decode(f"{other.url}/public/here.png").image.size == (5, 5)
    with pytest.raises(ImageFetchError, match="host not allowed"):
        fetcher.decode(f"{other.url}/public/away.png")
    with pytest.raises(ImageFetchError, match="redirect back to Label Studio"):
        fetcher.decode(f"{other.url}/public/to-ls.png")
    with pytest.raises(ImageFetchError, match="only /data/upload/"):
        fetcher.decode(f"{other.url}/public/to-api.png")
    assert [p for p, _ in ls.seen_auth] == []  # none of those reached Label Studio
    assert fetcher.decode("/data/upload/1/moved.png").image.size == (5, 5)  # LS -> allowed host: without the key
    assert other.seen_auth and all(auth is None for _, auth in other.seen_auth)
    other.redirects["/public/loop.png"] = "/public/loop.png"
    with pytest.raises(ImageFetchError, match="redirects"):
        fetcher.decode(f"{other.url}/public/loop.png")


def test_host_allow_list_entries() -> None:
    allow = HostAllowList(["images.example", "127.0.0.1:8081", "http://cdn.example:8443", "[::1]:9000"])
    assert allow.allows("https://images.example/a.png") and allow.allows("http://images.example:9999/a")
    assert allow.allows("http://127.0.0.1:8081/x") and not allow.allows("http://127.0.0.1:8082/x")
    assert allow.allows("http://cdn.example:8443/x") and not allow.allows("http://cdn.example/x")
    assert allow.allows("http://[::1]:9000/x")
    assert not allow.allows("http://evil.example/x") and not allow.allows("http://images.example.evil/x")
    assert HostAllowList(["*"]).allows("http://anything/x")


def test_unsupported_and_missing_references() -> None:
    fetcher = ImageFetcher("http://127.0.0.1:1", None)
    for ref, needle in [("s3://bucket/a.png", "s3:// URLs"), ("file:///etc/passwd", "file://"), ("", "no image")]:
        with pytest.raises(ImageFetchError, match=needle) as e:
            fetcher.decode(ref)
        assert not e.value.transient


def test_limits_and_status_codes(ls: FakeLabelStudio, other: FakeLabelStudio) -> None:
    auth = ApiKeyAuth(ls.url, LEGACY)
    hosts = [f"127.0.0.1:{other.port}"]
    small = ImageFetcher(ls.url, auth, limits=FetchLimits(max_bytes=100))
    with pytest.raises(ImageFetchError, match="byte limit") as e:
        small.decode("/data/upload/1/a.png")  # Content-Length over the limit
    assert not e.value.transient
    with pytest.raises(ImageFetchError, match="byte limit"):
        ImageFetcher(ls.url, auth, hosts, limits=FetchLimits(max_bytes=1000)).decode(f"{other.url}/public/chunked.png")
    with pytest.raises(ImageFetchError, match="pixel limit"):
        ImageFetcher(ls.url, auth, limits=FetchLimits(max_pixels=100)).decode("/data/upload/1/a.png")
    with pytest.raises(ImageFetchError, match="HTTP 404") as e:
        ImageFetcher(ls.url, auth).decode("/data/upload/1/missing.png")
    assert not e.value.transient
    with pytest.raises(ImageFetchError, match="timed out") as e:
        ImageFetcher(ls.url, auth, hosts, limits=FetchLimits(read_timeout=0.5)).decode(f"{other.url}/slow.png")
    assert e.value.transient
    with pytest.raises(ImageFetchError, match="cannot connect") as e:
        ImageFetcher("http://127.0.0.1:1", auth).decode("/data/upload/1/a.png")
    assert e.value.transient


def test_decoding_exif_16bit_gray_rgba_cmyk(ls: FakeLabelStudio) -> None:
    fetcher = ImageFetcher(ls.url, ApiKeyAuth(ls.url, LEGACY))
    img = Image.fromarray(np.zeros((20, 40, 3), np.uint8))
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90: a 40x20 JPEG is shown as 20x40
    buf = io.BytesIO()
    img.save(buf, format="JPEG", exif=exif)
    ls.files["/data/upload/1/exif.jpg"] = buf.getvalue()
    ls.files["/data/upload/1/g16.png"] = png((np.arange(600).reshape(20, 30) * 100).astype(np.uint16))
    ls.files["/data/upload/1/gray.png"] = png(np.full((20, 30), 77, np.uint8))
    ls.files["/data/upload/1/rgba.png"] = png(np.zeros((20, 30, 4), np.uint8), mode="RGBA")
    cmyk = io.BytesIO()
    Image.new("CMYK", (30, 20), (0, 255, 255, 0)).save(cmyk, format="JPEG")
    ls.files["/data/upload/1/cmyk.jpg"] = cmyk.getvalue()
    ls.files["/data/upload/1/bad.png"] = b"\x89PNG broken"

    assert fetcher.decode("/data/upload/1/exif.jpg").image.size == (20, 40)
    g16 = fetcher.decode("/data/upload/1/g16.png").image
    assert g16.mode == "RGB" and np.asarray(g16).max() == 255  # 16-bit scaled to the full 8-bit range
    assert np.asarray(fetcher.decode("/data/upload/1/gray.png").image)[0, 0].tolist() == [77, 77, 77]
    assert np.asarray(fetcher.decode("/data/upload/1/rgba.png").image)[0, 0].tolist() == [255, 255, 255]  # on white
    red = np.asarray(fetcher.decode("/data/upload/1/cmyk.jpg").image)[10, 15]
    assert red[0] > 200 and red[1] < 60 and red[2] < 60
    with pytest.raises(ImageFetchError, match="cannot read image") as e:
        fetcher.decode("/data/upload/1/bad.png")
    assert not e.value.transient
