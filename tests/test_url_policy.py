"""The URL policy (issue 12): malformed and hostile task URLs, the key only under Label Studio's /data/, address
checks after one resolution, and the fetcher connecting to the checked address.

No test resolves a real name: every policy gets a resolver stub, and `no_outside_connections` fails a test that
tries to connect anywhere but 127.0.0.1 (it records every attempt).
"""

from __future__ import annotations

import http.server
import io
import socket
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from PIL import Image

from axx_backend.labelstudio.client import ApiKeyAuth
from axx_backend.labelstudio.images import ImageFetcher, ImageFetchError
from axx_backend.labelstudio.url_policy import (
    MAX_URL_LENGTH,
    HostAllowList,
    UrlPolicy,
    UrlRefused,
    address_problem,
    canonical_host,
    normalise_path,
    redact,
)
from tests.ls_harness import LocalHTTPServer

KEY = "0123456789abcdef0123456789abcdef01234567"
LS = "http://127.0.0.1:8080"
NAMES = {  # the resolver stub: what a hostile DNS could answer
    "public.test": ["93.184.216.34"],
    "metadata.test": ["169.254.169.254"],
    "lan.test": ["192.168.1.1"],
    "mixed.test": ["93.184.216.34", "10.0.0.1"],
    "mapped.test": ["::ffff:10.0.0.1"],
    "ls.test": ["127.0.0.1"],
}


def stub(host: str, port: int) -> list[str]:
    if host not in NAMES:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
    return NAMES[host]


def policy(allowed: list[str] | None = None, ls: str | None = LS) -> UrlPolicy:
    return UrlPolicy(ls, allowed or [], resolver=stub)


def refusal(p: UrlPolicy, ref: Any) -> UrlRefused:
    with pytest.raises(UrlRefused) as e:
        p.addresses(p.target(ref))
    return e.value


@pytest.fixture()
def no_outside_connections(monkeypatch: pytest.MonkeyPatch) -> list[tuple[Any, ...]]:
    """Every connect() of the test, recorded; one to anything but 127.0.0.1 fails the test before it leaves."""
    attempts: list[tuple[Any, ...]] = []
    real_connect = socket.socket.connect

    def connect(self: socket.socket, address: Any) -> Any:
        attempts.append(tuple(address))
        if address[0] != "127.0.0.1":
            raise AssertionError(f"a test tried to connect to {address}")
        return real_connect(self, address)

    real_getaddrinfo = socket.getaddrinfo

    def getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
        if host != "127.0.0.1":  # urllib3 passes the numeric address it connects to: no lookup happens
            raise AssertionError(f"a test tried to resolve {host!r}")
        return real_getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return attempts


class Recorder(LocalHTTPServer):
    """An HTTP server on 127.0.0.1 that records (path, Host, Authorization) and serves a PNG or a redirect."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str | None, str | None]] = []
        self.redirects: dict[str, str] = {}
        buf = io.BytesIO()
        Image.fromarray(np.zeros((6, 9, 3), np.uint8)).save(buf, format="PNG")
        body = buf.getvalue()
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                outer.seen.append((self.path, self.headers.get("Host"), self.headers.get("Authorization")))
                if self.path in outer.redirects:
                    self.send_response(302)
                    self.send_header("Location", outer.redirects[self.path])
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        super().__init__(Handler)


@pytest.fixture()
def server() -> Iterator[Recorder]:
    s = Recorder()
    yield s
    s.close()


# --- parsing -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("ref", "needle"),
    [
        ("http://127.0.0.1:65536/x.png", "invalid port"),
        ("http://127.0.0.1:-1/x.png", "invalid port"),
        ("http://public.test:0/x.png", "port 0"),
        ("http://[::1/x.png", "invalid IPv6"),
        ("http://public.test/a\x00.png", "control characters"),
        ("http://public.test/a\r\nX-Injected: 1", "control characters"),
        ("http://public.test" + "/a" * MAX_URL_LENGTH, "over the 4096 limit"),
        ("ftp://public.test/x.png", "ftp:// URLs are not supported"),
        ("javascript:alert(1)", "javascript:// URLs are not supported"),
        ("data:image/png;base64,AAAA", "data:// URLs are not supported"),
        ("http://public.test\\@evil.test/x.png", "user name or password"),
        ("http://public.test/a\\..\\..\\x.png", "backslashes"),
        ("http://[fe80::1%25eth0]/x.png", "zone identifiers"),
        ("http://exa mple.test/x.png", "not a valid name"),
        ("", "no image URL"),
        (None, "no image URL"),
        (42, "no image URL"),
    ],
)
def test_malformed_urls_are_refused_with_a_reason(ref: Any, needle: str) -> None:
    e = refusal(policy(["*"]), ref)
    assert needle in str(e) and not e.transient


def test_user_info_is_refused_and_never_echoed() -> None:
    p = policy(["*"])
    for ref in (
        "http://user:hunter2@public.test/x.png",
        "https://hunter2@public.test/x.png",
        "http://user:hun/ter2@public.test/x.png",  # a slash in the password makes "hun" look like a port
        "http://user:hunter2@[::1/x.png",
    ):
        message = str(refusal(p, ref))
        assert "hunter2" not in message and "ter2" not in message and "user:" not in message, message
    assert "hunter2" not in redact("http://a:hunter2@h/x?sig=s3cr3t") and "s3cr3t" not in redact(
        "http://h/x?sig=s3cr3t"
    )


def test_query_strings_of_other_hosts_stay_out_of_messages() -> None:
    e = refusal(policy(), "http://public.test/x.png?X-Amz-Signature=s3cr3t")
    assert "host not allowed" in str(e) and "s3cr3t" not in str(e) and "?..." in str(e)


# --- the key and Label Studio's origin -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "ref",
    [
        "/data/upload/1/../../../api/projects/",
        "/data/upload/1/%2e%2e/%2E%2E/%2e%2e/api/projects/",
        "/data/upload/..%2f..%2fapi/projects/",
        "/data/local-files/../../api/projects/?d=x",
        "/data/./upload/../../api/current-user/whoami",
        "/api/projects/1/export?exportType=JSON",
        f"{LS}/api/projects/1/export?exportType=JSON",
        f"{LS}/data/upload/../../api/projects/",
        "http://2130706433:8080/api/projects/",  # Label Studio's address in another spelling
        "//127.0.0.1:8080/api/projects/",
        "/",
        "/data/uploadx/1/a.png",
    ],
)
def test_label_studio_is_read_only_under_data(ref: str) -> None:
    e = refusal(policy(), ref)
    assert "only /data/upload/" in str(e) or "encoded slashes" in str(e)
    assert not e.transient


def test_normalised_data_urls_get_the_key_and_are_what_is_requested() -> None:
    p = policy()
    for ref, url in [
        ("/data/upload/1/a.png", f"{LS}/data/upload/1/a.png"),
        ("data/upload/1/a.png", f"{LS}/data/upload/1/a.png"),
        ("/data/upload/1/./x/../a.png", f"{LS}/data/upload/1/a.png"),
        ("/data/local-files/?d=dir/my scan.png", f"{LS}/data/local-files/?d=dir/my%20scan.png"),
        (f"{LS}/data/upload/2/b.png#frag", f"{LS}/data/upload/2/b.png"),
        ("http://2130706433:8080/data/upload/1/a.png", f"{LS}/data/upload/1/a.png"),
        ("HTTP://127.0.0.1:8080/data/upload/1/%61.png", f"{LS}/data/upload/1/a.png"),
    ]:
        target = p.target(ref)
        assert target.label_studio and target.url == url, ref
        assert p.addresses(target) == ["127.0.0.1"]  # Label Studio's own origin: loopback is fine
    served_under = UrlPolicy("http://ls.test/labelstudio/", [], resolver=stub)
    assert served_under.target("/data/upload/1/a.png").url == "http://ls.test/labelstudio/data/upload/1/a.png"
    with pytest.raises(UrlRefused, match="only /data/upload/"):
        served_under.target("http://ls.test/data/upload/1/a.png")  # outside the base path


def test_other_ports_and_schemes_of_the_label_studio_host_are_not_label_studio() -> None:
    p = policy()  # default allow-list: Label Studio's host:port only
    e = refusal(p, "http://127.0.0.1:6379/")
    assert "host not allowed" in str(e)
    star = policy(["*"])
    for ref in ("http://127.0.0.1:6379/", "https://127.0.0.1:8080/data/upload/1/a.png", "http://localhost:8080/x"):
        assert "loopback" in str(refusal(star, ref)) or "cannot resolve" in str(refusal(star, ref))


def test_relative_references_without_label_studio_say_what_to_set() -> None:
    e = refusal(policy(ls=None), "/data/upload/1/a.png")
    assert "set LABEL_STUDIO_URL" in str(e) and e.transient


# --- addresses ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("ref", "problem"),
    [
        ("http://169.254.169.254/latest/meta-data/", "link-local"),
        ("http://metadata.test/latest/meta-data/", "link-local"),
        ("http://10.0.0.1/x.png", "private"),
        ("http://192.168.1.1/x.png", "private"),
        ("http://lan.test/x.png", "private"),
        ("http://172.16.0.1/x.png", "private"),
        ("http://100.64.0.1/x.png", "CGNAT"),
        ("http://224.0.0.1/x.png", "multicast"),
        ("http://240.0.0.1/x.png", "private"),  # reserved, which Python counts as private
        ("http://0.0.0.0/x.png", "unspecified"),
        ("http://127.0.0.1:6379/", "loopback"),
        ("http://0x7f.1:6379/", "loopback"),
        ("http://017700000001:6379/", "loopback"),
        ("http://[::1]:6379/", "loopback"),
        ("http://[::ffff:10.0.0.1]/x.png", "IPv4-mapped"),
        ("http://mapped.test/x.png", "IPv4-mapped"),
        ("http://[2002:a00:1::]/x.png", "tunnel"),  # 6to4 of 10.0.0.1
        ("http://[fd00::1]/x.png", "private"),
        ("http://[fe80::1]/x.png", "link-local"),
        ("http://mixed.test/x.png", "private"),  # one internal answer is enough to refuse the name
    ],
)
def test_internal_addresses_are_refused_even_with_a_wildcard(ref: str, problem: str) -> None:
    e = refusal(policy(["*"]), ref)
    assert problem in str(e) and "AXX_ALLOWED_HOSTS" in str(e) and not e.transient


def test_addresses_listed_explicitly_are_allowed() -> None:
    p = policy(["*", "10.0.0.0/8", "192.168.1.1:8443", "[fd00::1]"])
    assert p.addresses(p.target("http://10.1.2.3/x.png")) == ["10.1.2.3"]
    assert p.addresses(p.target("https://192.168.1.1:8443/x.png")) == ["192.168.1.1"]
    assert p.addresses(p.target("http://[fd00::1]/x.png")) == ["fd00::1"]
    assert "private" in str(refusal(p, "http://192.168.1.1/x.png"))  # listed for port 8443 only
    named = policy(["lan.test", "192.168.1.1"])  # a name that resolves inside: its address must be listed too
    assert named.addresses(named.target("http://lan.test/x.png")) == ["192.168.1.1"]
    assert "private" in str(refusal(policy(["lan.test"]), "http://lan.test/x.png"))
    assert policy(["*"]).addresses(policy(["*"]).target("http://public.test/x.png")) == ["93.184.216.34"]


def test_resolution_failures_are_transient() -> None:
    e = refusal(policy(["*"]), "http://nowhere.test/x.png")
    assert "cannot resolve" in str(e) and e.transient


def test_address_classes() -> None:
    import ipaddress

    assert address_problem(ipaddress.ip_address("93.184.216.34")) is None
    assert address_problem(ipaddress.ip_address("2606:2800:220:1::1")) is None
    for text in ("127.0.0.1", "10.0.0.1", "169.254.1.1", "100.100.0.1", "224.0.0.251", "255.255.255.255", "::1"):
        assert address_problem(ipaddress.ip_address(text)), text


def test_hosts_and_paths_are_canonical() -> None:
    assert canonical_host("2130706433") == "127.0.0.1" and canonical_host("0x7f.0.0.1") == "127.0.0.1"
    assert canonical_host("Public.Test.") == "public.test" and canonical_host("cafe.be") == "cafe.be"
    assert canonical_host("bücher.example") == "xn--bcher-kva.example"
    assert normalise_path("/a/b/../../../c") == "/c" and normalise_path("/a/%2E%2e/b") == "/b"
    assert normalise_path("/a/b/..") == "/a/" and normalise_path("") == "/"
    assert normalise_path("/100%.png") == "/100%25.png" and normalise_path("/é") == "/%C3%A9"


def test_allow_list_entries_with_addresses_and_networks() -> None:
    allow = HostAllowList(["10.0.0.0/8", "[fd00::1]:9000", "cdn.test", "http://img.test:8443"])
    assert allow.allows("http://10.9.9.9/x") and allow.allows("http://[fd00::1]:9000/x")
    assert not allow.allows("http://[fd00::1]/x") and allow.allows("http://cdn.test:81/x")
    assert allow.allows("https://img.test:8443/x") and not allow.allows("http://img.test/x")
    assert allow.describe() == ["10.0.0.0/8", "[fd00::1]:9000", "cdn.test", "img.test:8443"]
    with pytest.raises(ValueError, match="AXX_ALLOWED_HOSTS"):
        HostAllowList(["*.example.com"])
    with pytest.raises(ValueError, match="LABEL_STUDIO_URL"):
        UrlPolicy("localhost:8080", [])


# --- the fetcher: connections ------------------------------------------------------------------------------------
def test_a_wildcard_never_connects_to_internal_addresses(no_outside_connections: list[tuple[Any, ...]]) -> None:
    fetcher = ImageFetcher(LS, ApiKeyAuth(LS, KEY), ["*"], resolver=stub)
    for ref in (
        "http://169.254.169.254/latest/meta-data/",
        "http://metadata.test/",
        "http://10.0.0.1/x.png",
        "http://192.168.1.1/x.png",
        "http://224.0.0.1/x.png",
        "http://127.0.0.1:6379/",
        "http://[::ffff:127.0.0.1]:8080/data/upload/1/a.png",
        "http://mixed.test/x.png",
    ):
        with pytest.raises(ImageFetchError) as e:
            fetcher.decode(ref)
        assert not e.value.transient, ref
    assert no_outside_connections == []


def test_the_connection_goes_to_the_checked_address(
    server: Recorder, no_outside_connections: list[tuple[Any, ...]]
) -> None:
    # "images.test" exists only in the stub: the fetcher must connect to the address the policy checked
    NAMES["images.test"] = ["127.0.0.1"]
    try:
        fetcher = ImageFetcher(LS, None, [f"images.test:{server.port}", "127.0.0.1"], resolver=stub)
        assert fetcher.decode(f"http://images.test:{server.port}/a/./b/../x.png").image.size == (9, 6)
    finally:
        del NAMES["images.test"]
    assert server.seen == [("/a/x.png", f"images.test:{server.port}", None)]  # normalised path, the host's name
    assert no_outside_connections == [("127.0.0.1", server.port)]


def test_no_keyed_request_leaves_data(server: Recorder, no_outside_connections: list[tuple[Any, ...]]) -> None:
    fetcher = ImageFetcher(server.url, ApiKeyAuth(server.url, KEY), resolver=stub)
    server.redirects["/data/upload/1/away.png"] = "/api/projects/"
    server.redirects["/data/upload/1/up.png"] = "../../../api/projects/"
    server.redirects["/data/upload/1/next.png"] = "/data/upload/1/a.png"
    for ref in (
        "/data/upload/1/../../../api/projects/",
        "/data/upload/%2e%2e/%2e%2e/api/projects/",
        f"{server.url}/api/projects/1/export?exportType=JSON",
        "/data/upload/1/away.png",
        "/data/upload/1/up.png",
    ):
        with pytest.raises(ImageFetchError):
            fetcher.decode(ref)
    assert fetcher.decode("/data/upload/1/next.png").image.size == (9, 6)  # a redirect within /data/ keeps the key
    keyed = [path for path, _, auth in server.seen if auth is not None]
    assert keyed and all(path.startswith("/data/upload/") for path in keyed)
    assert all(path.startswith("/data/") for path, _, _ in server.seen)


def test_redirects_to_internal_addresses_and_too_many_hops_are_refused(
    server: Recorder, no_outside_connections: list[tuple[Any, ...]]
) -> None:
    fetcher = ImageFetcher(LS, ApiKeyAuth(LS, KEY), ["*", f"127.0.0.1:{server.port}"], resolver=stub)
    server.redirects["/to-metadata"] = "http://169.254.169.254/latest/meta-data/"
    server.redirects["/to-redis"] = "http://127.0.0.1:6379/"
    server.redirects["/to-user"] = "http://user:hunter2@public.test/x.png"
    for path, needle in (("/to-metadata", "link-local"), ("/to-redis", "loopback"), ("/to-user", "user name")):
        with pytest.raises(ImageFetchError, match=needle) as e:
            fetcher.decode(server.url + path)
        assert "hunter2" not in str(e.value)
    for i in range(4):
        server.redirects[f"/hop{i}"] = f"/hop{i + 1}"
    assert fetcher.decode(f"{server.url}/hop1.png").image.size == (9, 6)
    assert fetcher.decode(f"{server.url}/hop1").image.size == (9, 6)  # hop1 -> hop2 -> hop3 -> hop4: 3 redirects
    with pytest.raises(ImageFetchError, match="more than 3 redirects"):
        fetcher.decode(f"{server.url}/hop0")
    assert {address for address in no_outside_connections} == {("127.0.0.1", server.port)}


def test_https_to_the_checked_address_still_verifies_the_host_name(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch, no_outside_connections: list[tuple[Any, ...]]
) -> None:
    import shutil
    import ssl
    import subprocess

    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make a certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", cert, "-days", "1",
         "-subj", "/CN=images.test", "-addext", "subjectAltName=DNS:images.test"],
        check=True, capture_output=True,
    )  # fmt: skip
    server = Recorder()
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server.httpd.socket = context.wrap_socket(server.httpd.socket, server_side=True)
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(cert))
    NAMES["images.test"] = NAMES["impostor.test"] = ["127.0.0.1"]
    try:
        allowed = ["images.test", "impostor.test", "127.0.0.1"]
        fetcher = ImageFetcher(LS, None, allowed, resolver=stub)
        # SNI and the name: the host's
        assert fetcher.decode(f"https://images.test:{server.port}/x.png").image.size == (9, 6)
        with pytest.raises(ImageFetchError, match="TLS failed"):
            fetcher.decode(f"https://impostor.test:{server.port}/x.png")  # same address, a name the cert does not have
    finally:
        del NAMES["images.test"], NAMES["impostor.test"]
        server.close()
    assert server.seen == [("/x.png", f"images.test:{server.port}", None)]
