"""Fetching a task's image: Label Studio URLs with the API key, other hosts only from an allow-list.

- `/data/upload/...`, `/data/local-files/?d=...` (and any other path) go to LABEL_STUDIO_URL with the key.
- `http(s)://` URLs go out only to hosts in the allow-list (default: the Label Studio host); the key is
  sent only to Label Studio itself. Redirects are followed by hand so every hop is checked the same way.
- Size, pixel count and time are bounded; decoding (EXIF orientation, 16-bit, grayscale, RGBA, CMYK)
  is `axx_backend.core.images.load_image` on the bytes, the same code the CLI and training use.

Errors say whether they are `transient` (network, auth, allow-list: worth asking again later) or about
the image itself (not found, not an image, too large), so the server knows whether to store a result.
"""

from __future__ import annotations

import time
import urllib.parse
from collections.abc import Iterable
from dataclasses import dataclass

import requests
from PIL import Image

from ..core.images import ImageError, load_image
from .client import ApiKeyAuth, LabelStudioError, PerThreadSession

MAX_REDIRECTS = 3


class ImageFetchError(RuntimeError):
    """A task's image could not be fetched or decoded; `transient` when retrying later may succeed."""

    def __init__(self, message: str, transient: bool = False) -> None:
        super().__init__(message)
        self.transient = transient


@dataclass(frozen=True)
class FetchLimits:
    max_bytes: int = 50 * 1024 * 1024  # AXX_IMAGE_MAX_BYTES
    max_pixels: int = 40_000_000  # AXX_IMAGE_MAX_PIXELS (masks are computed at full size)
    connect_timeout: float = 5.0
    read_timeout: float = 30.0  # AXX_IMAGE_TIMEOUT: per read, and the whole download
    max_redirects: int = MAX_REDIRECTS


def _origin(url: str) -> tuple[str, str, int]:
    p = urllib.parse.urlsplit(url)
    scheme = p.scheme.lower()
    port = p.port or (443 if scheme == "https" else 80)
    return scheme, (p.hostname or "").lower(), port


class HostAllowList:
    """Entries `host` (any port) or `host:port`; `*` allows every host (not recommended)."""

    def __init__(self, entries: Iterable[str]) -> None:
        self.any = False
        self.hosts: set[str] = set()
        self.host_ports: set[tuple[str, int]] = set()
        for raw in entries:
            entry = raw.strip().lower()
            if not entry:
                continue
            if entry == "*":
                self.any = True
                continue
            if "://" in entry:  # a whole URL given: keep its host and port
                _, host, port = _origin(entry)
                self.host_ports.add((host, port))
                continue
            if entry.startswith("["):  # [v6] or [v6]:port
                host, _, rest = entry[1:].partition("]")
                port = rest.lstrip(":")
            elif entry.count(":") == 1:
                host, _, port = entry.partition(":")
            else:  # a name, a v4 address or a bare v6 address
                host, port = entry, ""
            if port.isdigit():
                self.host_ports.add((host, int(port)))
            else:
                self.hosts.add(host)

    def allows(self, url: str) -> bool:
        _, host, port = _origin(url)
        return self.any or host in self.hosts or (host, port) in self.host_ports

    def describe(self) -> list[str]:
        return (["*"] if self.any else []) + sorted(self.hosts) + sorted(f"{h}:{p}" for h, p in self.host_ports)


class ImageFetcher:
    """Turns a task's image reference into an RGB PIL image (see the module docstring for the rules)."""

    def __init__(
        self,
        label_studio_url: str | None,
        auth: ApiKeyAuth | None,
        allowed_hosts: Iterable[str] | None = None,
        limits: FetchLimits | None = None,
    ) -> None:
        self.ls_url = label_studio_url.rstrip("/") if label_studio_url else None
        self.auth = auth
        self.limits = limits or FetchLimits()
        entries = list(allowed_hosts) if allowed_hosts is not None else []
        if not entries and self.ls_url:
            entries = [self.ls_url]  # default: only Label Studio itself
        self.allow = HostAllowList(entries)
        self._sessions = PerThreadSession()

    @property
    def session(self) -> requests.Session:
        return self._sessions.get()

    def resolve(self, ref: str) -> str:
        """The absolute URL of a task's image reference."""
        ref = (ref or "").strip()
        if not ref:
            raise ImageFetchError("the task has no image URL")
        scheme = urllib.parse.urlsplit(ref).scheme.lower()
        if scheme in ("http", "https"):
            return ref
        if scheme:
            raise ImageFetchError(
                f"{ref[:80]}: {scheme}:// URLs are not supported; use Label Studio uploads, local files or http(s)"
            )
        if self.ls_url is None:
            raise ImageFetchError(
                f"{ref[:80]} is served by Label Studio: set LABEL_STUDIO_URL (and LABEL_STUDIO_API_KEY)", transient=True
            )
        return self.ls_url + (ref if ref.startswith("/") else "/" + ref)

    def is_label_studio(self, url: str) -> bool:
        return self.ls_url is not None and _origin(url) == _origin(self.ls_url)

    def fetch(self, ref: str) -> bytes:
        """The image bytes, following at most `max_redirects` redirects within the allow-list."""
        url = self.resolve(ref)
        deadline = time.monotonic() + self.limits.read_timeout
        for _ in range(self.limits.max_redirects + 1):
            to_ls = self.is_label_studio(url)
            if not to_ls and not self.allow.allows(url):
                raise ImageFetchError(
                    f"{url[:120]}: host not allowed (allowed: {self.allow.describe() or 'none'}; "
                    "set AXX_ALLOWED_HOSTS)",
                    transient=True,
                )
            headers = {}
            if to_ls:
                if self.auth is None:
                    raise ImageFetchError(f"{url[:120]}: set LABEL_STUDIO_API_KEY to read Label Studio files", True)
                try:
                    headers = self.auth.headers()
                except LabelStudioError as exc:
                    raise ImageFetchError(str(exc), transient=True) from exc
            r = self._get(url, headers, to_ls)
            if r.is_redirect or r.is_permanent_redirect:
                location = r.headers.get("Location", "")
                r.close()
                url = urllib.parse.urljoin(url, location)
                continue
            with r:
                self._check_status(r, url, to_ls)
                return self._read(r, url, deadline)
        raise ImageFetchError(f"{ref[:120]}: more than {self.limits.max_redirects} redirects")

    def _get(self, url: str, headers: dict[str, str], to_ls: bool) -> requests.Response:
        timeout = (self.limits.connect_timeout, self.limits.read_timeout)
        try:
            r = self.session.get(url, headers=headers, timeout=timeout, stream=True, allow_redirects=False)
            if r.status_code == 401 and to_ls and self.auth is not None and self.auth.kind == "pat":
                r.close()  # the cached access token may have been revoked or expired early: refresh once
                headers = self.auth.headers(force_refresh=True)
                r = self.session.get(url, headers=headers, timeout=timeout, stream=True, allow_redirects=False)
            return r
        except LabelStudioError as exc:
            raise ImageFetchError(str(exc), transient=True) from exc
        except requests.Timeout as exc:
            raise ImageFetchError(f"{url[:120]}: timed out ({exc})", transient=True) from exc
        except requests.RequestException as exc:
            raise ImageFetchError(f"{url[:120]}: cannot connect ({type(exc).__name__})", transient=True) from exc

    @staticmethod
    def _check_status(r: requests.Response, url: str, to_ls: bool) -> None:
        if r.status_code == 200:
            return
        if r.status_code in (401, 403):
            hint = " (check LABEL_STUDIO_API_KEY)" if to_ls else ""
            raise ImageFetchError(f"{url[:120]}: HTTP {r.status_code}{hint}", transient=True)
        # 404/410 etc. are about this image; 5xx and 429 may pass on their own
        transient = r.status_code >= 500 or r.status_code in (408, 429)
        raise ImageFetchError(f"{url[:120]}: HTTP {r.status_code}", transient=transient)

    def _read(self, r: requests.Response, url: str, deadline: float) -> bytes:
        limit = self.limits.max_bytes
        length = r.headers.get("Content-Length")
        if length and length.isdigit() and int(length) > limit:
            raise ImageFetchError(f"{url[:120]}: {int(length)} bytes is over the {limit} byte limit")
        chunks: list[bytes] = []
        size = 0
        try:
            for chunk in r.iter_content(chunk_size=256 * 1024):
                size += len(chunk)
                if size > limit:
                    raise ImageFetchError(f"{url[:120]}: more than the {limit} byte limit")
                if time.monotonic() > deadline:
                    raise ImageFetchError(f"{url[:120]}: download took over {self.limits.read_timeout:.0f} s", True)
                chunks.append(chunk)
        except requests.RequestException as exc:
            raise ImageFetchError(f"{url[:120]}: download failed ({type(exc).__name__})", transient=True) from exc
        return b"".join(chunks)

    def load(self, ref: str) -> Image.Image:
        """Fetch and decode into 8-bit RGB with EXIF orientation applied."""
        data = self.fetch(ref)
        try:
            return load_image(data, name=_short(ref), max_pixels=self.limits.max_pixels)
        except ImageError as exc:
            raise ImageFetchError(str(exc)) from exc


def _short(ref: str) -> str:
    return ref if len(ref) <= 120 else ref[:117] + "..."
