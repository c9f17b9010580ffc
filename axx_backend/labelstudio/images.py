"""Fetching a task's image under the URL policy (`url_policy`), and decoding it.

- The reference is checked before any I/O: Label Studio's `/data/upload/` and `/data/local-files/` are read
  with the API key; other `http(s)` hosts only from the allow-list, never with the key; every resolved address
  is checked, and the connection goes to that checked address (the TLS name stays the host's).
- Redirects are followed by hand, at most `max_redirects`, each hop checked like the first; the key is dropped
  for good once a hop leaves Label Studio's origin.
- Size, pixel count and time are bounded; decoding (EXIF orientation, 16-bit, float, grayscale, RGBA, CMYK) is
  `axx_backend.core.images`, the same code the CLI and training use. HTTP(S)_PROXY is not used: the address
  check needs the connection to go to the checked address.

Errors say whether they are `transient` (network, Label Studio settings or key: worth asking again later) or
about the task itself (refused URL, not found, not an image, too large), so the server knows whether to store
a result. Messages never contain the key, a URL's user info or a query string other than Label Studio's.
"""

from __future__ import annotations

import os
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass

import certifi
import urllib3
from urllib3.exceptions import HTTPError, NewConnectionError, ProtocolError, SSLError
from urllib3.exceptions import TimeoutError as Urllib3Timeout

from ..core.images import WORK_SIDE, Decoded, ImageError, decode_image
from ..core.settings import DEFAULT_IMAGE_MAX_PIXELS
from .client import ApiKeyAuth, LabelStudioError
from .url_policy import HostAllowList, Resolver, Target, UrlPolicy, UrlRefused

MAX_REDIRECTS = 3
REDIRECTS = (301, 302, 303, 307, 308)

__all__ = ["FetchLimits", "HostAllowList", "ImageFetchError", "ImageFetcher", "MAX_REDIRECTS"]


class ImageFetchError(RuntimeError):
    """A task's image could not be fetched or decoded; `transient` when retrying later may succeed."""

    def __init__(self, message: str, transient: bool = False) -> None:
        super().__init__(message)
        self.transient = transient


@dataclass(frozen=True)
class FetchLimits:
    max_bytes: int = 50 * 1024 * 1024  # AXX_IMAGE_MAX_BYTES
    max_pixels: int = DEFAULT_IMAGE_MAX_PIXELS  # AXX_IMAGE_MAX_PIXELS (Settings.image_max_pixels)
    connect_timeout: float = 5.0
    read_timeout: float = 30.0  # AXX_IMAGE_TIMEOUT: per read, and the whole download
    max_redirects: int = MAX_REDIRECTS


class PinnedPools:
    """urllib3 pools by (scheme, checked address, port, host): a pool only ever connects to its address, and
    HTTPS verifies the certificate against the host name. The least recently used pools are closed."""

    def __init__(self, size: int = 32, per_pool: int = 8) -> None:
        self.size = size
        self.per_pool = per_pool
        self._pools: OrderedDict[tuple[str, str, int, str], urllib3.HTTPConnectionPool] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, target: Target, address: str) -> urllib3.HTTPConnectionPool:
        key = (target.scheme, address, target.port, target.host)
        with self._lock:
            pool = self._pools.get(key)
            if pool is None:
                pool = self._pools[key] = self._new(target, address)
                while len(self._pools) > self.size:
                    self._pools.popitem(last=False)[1].close()
            self._pools.move_to_end(key)
            return pool

    def _new(self, target: Target, address: str) -> urllib3.HTTPConnectionPool:
        common = {"maxsize": self.per_pool, "block": False, "retries": False}
        if target.scheme == "http":
            return urllib3.HTTPConnectionPool(address, target.port, **common)
        ca = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("SSL_CERT_FILE") or certifi.where()
        return urllib3.HTTPSConnectionPool(
            address, target.port, cert_reqs="CERT_REQUIRED", ca_certs=ca, server_hostname=target.host,
            assert_hostname=target.host, **common,
        )  # fmt: skip


class ImageFetcher:
    """Turns a task's image reference into an RGB PIL image (see the module docstring for the rules)."""

    def __init__(
        self,
        label_studio_url: str | None,
        auth: ApiKeyAuth | None,
        allowed_hosts: Iterable[str] | None = None,
        limits: FetchLimits | None = None,
        resolver: Resolver | None = None,
    ) -> None:
        self.policy = UrlPolicy(label_studio_url, list(allowed_hosts or ()), resolver)
        self.auth = auth
        self.limits = limits or FetchLimits()
        self.pools = PinnedPools()

    @property
    def allow(self) -> HostAllowList:
        return self.policy.allow

    # --- the bytes -----------------------------------------------------------------------------------------------
    def fetch(self, ref: object) -> bytes:
        """The image bytes, following at most `max_redirects` redirects, each checked like the first URL."""
        return self._fetch(ref)[0]

    def _fetch(self, ref: object) -> tuple[bytes, Target]:
        target = self._target(ref)
        with_key = target.label_studio
        deadline = time.monotonic() + self.limits.read_timeout
        for _ in range(self.limits.max_redirects + 1):
            if target.label_studio and not with_key:
                raise ImageFetchError(f"{target.describe()}: a redirect back to Label Studio is not followed")
            r = self._open(target, with_key)
            if r.status in REDIRECTS:
                location = r.headers.get("Location", "")
                r.close()
                if not location:
                    raise ImageFetchError(f"{target.describe()}: HTTP {r.status} without a Location")
                following = self._target(location, base=target)
                with_key = with_key and following.origin == target.origin  # dropped for good on leaving
                target = following
                continue
            done = False
            try:
                self._check_status(r, target, with_key)
                data = self._read(r, target, deadline)
                done = True
                return data, target
            finally:
                if done:
                    r.release_conn()
                else:
                    r.close()  # an unread body must not reach the next request
        raise ImageFetchError(f"{target.describe()}: more than {self.limits.max_redirects} redirects")

    def _target(self, ref: object, base: Target | None = None) -> Target:
        try:
            return self.policy.target(ref, base)
        except UrlRefused as exc:
            raise ImageFetchError(str(exc), exc.transient) from exc

    def _open(self, target: Target, with_key: bool) -> urllib3.BaseHTTPResponse:
        """One request to the target's checked addresses (in order); a PAT is refreshed once on a 401."""
        try:
            addresses = self.policy.addresses(target)
        except UrlRefused as exc:
            raise ImageFetchError(str(exc), exc.transient) from exc
        r = self._request(target, addresses, self._key_headers(target, with_key))
        if r.status == 401 and with_key and self.auth is not None and self.auth.kind == "pat":
            r.close()  # the cached access token may have been revoked or expired early: refresh once
            r = self._request(target, addresses, self._key_headers(target, with_key, refresh=True))
        return r

    def _key_headers(self, target: Target, with_key: bool, refresh: bool = False) -> dict[str, str]:
        if not with_key:
            return {}
        if self.auth is None:
            raise ImageFetchError(f"{target.describe()}: set LABEL_STUDIO_API_KEY to read Label Studio files", True)
        try:
            return self.auth.headers(force_refresh=refresh)
        except LabelStudioError as exc:
            raise ImageFetchError(str(exc), transient=True) from exc

    def _request(self, target: Target, addresses: list[str], headers: dict[str, str]) -> urllib3.BaseHTTPResponse:
        timeout = urllib3.Timeout(connect=self.limits.connect_timeout, read=self.limits.read_timeout)
        for i, address in enumerate(addresses):
            pool = self.pools.get(target, address)
            try:
                return pool.urlopen(
                    "GET", target.request_path, headers={"Host": target.netloc, **headers}, redirect=False,
                    retries=False, timeout=timeout, preload_content=False, assert_same_host=False,
                )  # fmt: skip
            except NewConnectionError as exc:
                if i + 1 < len(addresses):
                    continue  # the next checked address of the same host
                raise ImageFetchError(f"{target.describe()}: cannot connect ({type(exc).__name__})", True) from exc
            except Urllib3Timeout as exc:
                raise ImageFetchError(f"{target.describe()}: timed out ({type(exc).__name__})", True) from exc
            except SSLError as exc:
                raise ImageFetchError(f"{target.describe()}: TLS failed ({type(exc).__name__})", True) from exc
            except HTTPError as exc:
                raise ImageFetchError(f"{target.describe()}: cannot connect ({type(exc).__name__})", True) from exc
        raise ImageFetchError(f"{target.describe()}: no address to connect to", True)

    @staticmethod
    def _check_status(r: urllib3.BaseHTTPResponse, target: Target, with_key: bool) -> None:
        if r.status == 200:
            return
        if r.status in (401, 403):
            hint = " (check LABEL_STUDIO_API_KEY)" if with_key else ""
            raise ImageFetchError(f"{target.describe()}: HTTP {r.status}{hint}", transient=True)
        # 404/410 etc. are about this image; 5xx and 429 may pass on their own
        transient = r.status >= 500 or r.status in (408, 429)
        raise ImageFetchError(f"{target.describe()}: HTTP {r.status}", transient=transient)

    def _read(self, r: urllib3.BaseHTTPResponse, target: Target, deadline: float) -> bytes:
        limit = self.limits.max_bytes
        length = r.headers.get("Content-Length")
        if length and length.isdigit() and int(length) > limit:
            raise ImageFetchError(f"{target.describe()}: {int(length)} bytes is over the {limit} byte limit")
        data = bytearray()
        try:
            for chunk in r.stream(256 * 1024):
                data += chunk
                if len(data) > limit:
                    raise ImageFetchError(f"{target.describe()}: more than the {limit} byte limit")
                if time.monotonic() > deadline:
                    raise ImageFetchError(
                        f"{target.describe()}: download took over {self.limits.read_timeout:.0f} s", True
                    )
        except Urllib3Timeout as exc:
            raise ImageFetchError(f"{target.describe()}: timed out ({type(exc).__name__})", True) from exc
        except (ProtocolError, HTTPError) as exc:
            raise ImageFetchError(f"{target.describe()}: download failed ({type(exc).__name__})", True) from exc
        return bytes(data)

    # --- the image -----------------------------------------------------------------------------------------------
    def decode(self, ref: object, work_side: int | None = WORK_SIDE) -> Decoded:
        """Fetch and decode into 8-bit RGB, EXIF orientation applied; a large image comes back reduced to at least
        `work_side` a side, its full size kept (prediction and training)."""
        data, target = self._fetch(ref)
        try:
            return decode_image(data, target.describe(), self.limits.max_pixels, work_side)
        except ImageError as exc:
            raise ImageFetchError(str(exc)) from exc
