"""Which task image URLs the backend fetches, where it connects, and when the Label Studio key goes along.

One policy, applied before any I/O (`UrlPolicy.target`), then once per connection (`UrlPolicy.addresses`):

- a URL is parsed once: at most `MAX_URL_LENGTH` characters, no control characters, `http(s)` only, no user
  name or password, a valid host and port; relative references are joined to LABEL_STUDIO_URL; the path is
  normalised (unreserved escapes decoded, dot-segments removed) and the *normalised* URL is what is requested;
- on the Label Studio origin only `/data/upload/` and `/data/local-files/` are read, with the key; anything
  else there is refused (never fetched, with or without the key);
- any other host must be in the allow-list (`AXX_ALLOWED_HOSTS`), and is never sent the key;
- the host is resolved once and every address is checked: loopback, private, link-local, shared (CGNAT),
  multicast, reserved and IPv4-mapped addresses are refused unless the host is the Label Studio origin or the
  address (or its network) is listed in the allow-list. The fetcher connects to the checked address.

Refusals are `UrlRefused`; their messages name the reason and the URL without user info or query string.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
import socket
import urllib.parse
from collections.abc import Callable, Iterable
from dataclasses import dataclass

MAX_URL_LENGTH = 4096
LABEL_STUDIO_DATA = ("/data/upload/", "/data/local-files/")
DEFAULT_PORTS = {"http": 80, "https": 443}

IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Resolver = Callable[[str, int], list[str]]  # (host, port) -> addresses, as getaddrinfo gives them

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_UNRESERVED_ESCAPE = re.compile(r"%(2[dD]|2[eE]|5[fF]|7[eE]|3[0-9]|[46][1-9a-fA-F]|[57][0-9aA])")
_ENCODED_SEPARATOR = re.compile(r"%(2[fF]|5[cC])")
_LONE_PERCENT = re.compile(r"%(?![0-9a-fA-F]{2})")
_IPV4_ISH = re.compile(r"^[0-9a-fA-FxX.]+$")
_CGNAT = ipaddress.ip_network("100.64.0.0/10")


class UrlRefused(ValueError):
    """A URL the policy does not fetch. `transient`: a setting or the network may fix it later."""

    def __init__(self, message: str, transient: bool = False) -> None:
        super().__init__(message)
        self.transient = transient


@dataclass(frozen=True)
class Target:
    """A checked, normalised URL: what is requested, and whether the Label Studio key goes with it."""

    scheme: str
    host: str  # lower case, IDNA-encoded; an IP address in canonical form
    port: int
    path: str  # normalised: no dot-segments
    query: str
    label_studio: bool  # on the Label Studio origin and under /data/: the key is sent

    @property
    def origin(self) -> tuple[str, str, int]:
        return self.scheme, self.host, self.port

    @property
    def netloc(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == DEFAULT_PORTS[self.scheme] else f"{host}:{self.port}"

    @property
    def request_path(self) -> str:
        return self.path + (f"?{self.query}" if self.query else "")

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.netloc}{self.request_path}"

    def describe(self) -> str:
        """The URL for messages: no query string (it may carry a signature) except Label Studio's `?d=`."""
        query = self.query if self.label_studio else ("..." if self.query else "")
        return _shorten(f"{self.scheme}://{self.netloc}{self.path}" + (f"?{query}" if query else ""))


@dataclass(frozen=True)
class _Entry:
    """One AXX_ALLOWED_HOSTS entry: a host name, or an address or network, each with an optional port."""

    text: str
    host: str | None = None
    network: Network | None = None
    port: int | None = None


class HostAllowList:
    """`AXX_ALLOWED_HOSTS` entries: `host`, `host:port`, a URL, an address (`10.0.0.5`, `[fd00::1]:9000`), a
    network (`10.0.0.0/8`) or `*` (any host name; addresses are still checked)."""

    def __init__(self, entries: Iterable[str]) -> None:
        self.any = False
        self.entries: list[_Entry] = []
        for raw in entries:
            entry = raw.strip().lower()
            if entry == "*":
                self.any = True
            elif entry:
                self.entries.append(_parse_entry(entry))

    def allows(self, url: str) -> bool:
        """Whether the host of an http(s) URL is listed (by name, or as an address literal)."""
        try:
            p = urllib.parse.urlsplit(url)
            scheme = p.scheme.lower()
            return self.allows_host(canonical_host(p.hostname or ""), p.port or DEFAULT_PORTS.get(scheme, 80))
        except ValueError:  # UrlRefused too
            return False

    def allows_host(self, host: str, port: int) -> bool:
        if self.any:
            return True
        address = _ip(host)
        for e in self.entries:
            if e.port is not None and e.port != port:
                continue
            if e.host == host or (address is not None and e.network is not None and address in e.network):
                return True
        return False

    def lists_address(self, address: IpAddress, port: int) -> bool:
        """Whether an address was listed explicitly (as an address or a network), for this port."""
        return any(
            e.network is not None and address in e.network and (e.port is None or e.port == port) for e in self.entries
        )

    def describe(self) -> list[str]:
        return (["*"] if self.any else []) + sorted(e.text for e in self.entries)


def _parse_entry(entry: str) -> _Entry:
    """`host`, `host:port`, a URL (its host and port), `[v6]:port`, an address or a network (`10.0.0.0/8`)."""
    try:
        if "://" in entry:
            p = urllib.parse.urlsplit(entry)
            host, port = p.hostname or "", p.port or DEFAULT_PORTS.get(p.scheme, 80)
        elif entry.startswith("["):
            host, _, rest = entry[1:].partition("]")
            port = int(rest[1:]) if rest.startswith(":") else None
        elif entry.count(":") == 1:
            host, _, port_text = entry.partition(":")
            port = int(port_text)
        else:  # a name, a v4 address or network, a bare v6 address or network
            host, port = entry, None
        text = f"[{host}]" if ":" in host and port is not None else host
        text = text if port is None else f"{text}:{port}"
        if "/" in host:
            return _Entry(text, network=ipaddress.ip_network(host, strict=False), port=port)
        host = canonical_host(host)
        address = _ip(host)
        network = ipaddress.ip_network(address) if address is not None else None
        return _Entry(text, host=host, network=network, port=port)
    except ValueError as exc:  # UrlRefused too
        raise ValueError(f"AXX_ALLOWED_HOSTS: {entry!r} is not a host, host:port, URL, address or network") from exc


def canonical_host(host: str) -> str:
    """Lower case, no trailing dot, IDNA for non-ASCII names, IP addresses in canonical form (including the
    legacy IPv4 spellings the resolver would accept, like `2130706433` or `0x7f.1`)."""
    host = host.strip().lower().rstrip(".")
    if not host:
        raise UrlRefused("the URL has no host")
    if not host.isascii():
        try:
            host = host.encode("idna").decode("ascii")
        except UnicodeError as exc:
            raise UrlRefused("the URL's host is not a valid name") from exc
    if "%" in host:
        raise UrlRefused("IPv6 zone identifiers are not accepted")
    if ":" in host:
        try:
            return str(ipaddress.IPv6Address(host))
        except ValueError as exc:
            raise UrlRefused("the URL's IPv6 address is not valid") from exc
    if _IPV4_ISH.match(host):
        try:
            return socket.inet_ntoa(socket.inet_aton(host))  # the C library's reading, no network involved
        except OSError:
            pass
    if not re.fullmatch(r"[a-z0-9_.-]+", host):
        raise UrlRefused("the URL's host is not a valid name")
    return host


def _ip(host: str) -> IpAddress | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def address_problem(address: IpAddress) -> str | None:
    """Why connecting to this address is refused by default (None: a public address)."""
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return "an IPv4-mapped address"
        embedded = address.sixtofour or (address.teredo[1] if address.teredo else None)
        if embedded is not None and address_problem(embedded):
            return "a tunnel to a non-public address"
    checks = (
        ("a loopback address", address.is_loopback),
        ("an unspecified address", address.is_unspecified),
        ("a link-local address", address.is_link_local),
        ("a multicast address", address.is_multicast),
        ("a shared (CGNAT) address", isinstance(address, ipaddress.IPv4Address) and address in _CGNAT),
        ("a private address", address.is_private),
        ("a reserved address", address.is_reserved),
        ("a non-public address", not address.is_global),
    )
    return next((reason for reason, hit in checks if hit), None)


def system_resolver(host: str, port: int) -> list[str]:
    """Every address of `host` (one DNS resolution), as the operating system gives them."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


class UrlPolicy:
    """See the module docstring. `resolver` is injectable so that tests never resolve a real name."""

    def __init__(
        self, label_studio_url: str | None, allowed_hosts: Iterable[str] = (), resolver: Resolver | None = None
    ) -> None:
        self.label_studio: Target | None = None
        self.ls_base = ""  # Label Studio's path prefix when it is served under one
        if label_studio_url:
            try:
                self.label_studio = self._parse(label_studio_url.strip())
            except UrlRefused as exc:
                raise ValueError(f"LABEL_STUDIO_URL is not a valid http(s) URL: {exc}") from exc
            self.ls_base = self.label_studio.path.rstrip("/")
        self.allow = HostAllowList(allowed_hosts)  # Label Studio's origin needs no entry: /data/ only, by rule
        self.resolver = resolver or system_resolver

    # --- names: no I/O ---------------------------------------------------------------------------------------
    def target(self, ref: object, base: Target | None = None) -> Target:
        """The checked target of a task's image reference, or of a redirect's Location relative to `base`."""
        if not isinstance(ref, str) or not ref.strip():
            raise UrlRefused("the task has no image URL")
        ref = ref.strip()
        if len(ref) > MAX_URL_LENGTH:
            raise UrlRefused(f"the image URL has {len(ref)} characters, over the {MAX_URL_LENGTH} limit")
        if _CONTROL.search(ref):
            raise UrlRefused(f"{redact(ref)}: the image URL contains control characters")
        if base is not None:
            ref = urllib.parse.urljoin(base.url, ref)
        elif not _scheme(ref):
            ref = self._join_label_studio(ref)
        target = self._parse(ref)
        return self._check_origin(target)

    def _join_label_studio(self, ref: str) -> str:
        if self.label_studio is None:
            raise UrlRefused(
                f"{redact(ref)} is served by Label Studio: set LABEL_STUDIO_URL (and LABEL_STUDIO_API_KEY)",
                transient=True,
            )
        if ref.startswith("//"):  # a network-path reference: the scheme of Label Studio
            return f"{self.label_studio.scheme}:{ref}"
        root = f"{self.label_studio.scheme}://{self.label_studio.netloc}{self.ls_base}"
        return root + (ref if ref.startswith("/") else "/" + ref)

    def _parse(self, url: str) -> Target:
        scheme = _scheme(url)
        if scheme not in DEFAULT_PORTS:
            raise UrlRefused(
                f"{scheme[:20]}:// URLs are not supported; use Label Studio uploads, local files or http(s)"
            )
        try:
            parts = urllib.parse.urlsplit(url)
            port = parts.port
        except ValueError as exc:  # a bad port, an unbalanced IPv6 bracket; its text may echo a password: not shown
            reason = "invalid port" if "Port" in str(exc) else "invalid IPv6 address" if "IPv6" in str(exc) else "?"
            raise UrlRefused(f"{redact(url)}: malformed URL ({reason})") from exc
        if "@" in parts.netloc:
            raise UrlRefused(f"{redact(url)}: URLs with a user name or password are not accepted")
        if "\\" in parts.netloc or "\\" in parts.path:
            raise UrlRefused(f"{redact(url)}: backslashes are not accepted in the host or path")
        if port == 0:
            raise UrlRefused(f"{redact(url)}: malformed URL (port 0)")
        try:
            host = canonical_host(parts.hostname or "")
        except UrlRefused as exc:
            raise UrlRefused(f"{redact(url)}: {exc}") from exc
        path = normalise_path(parts.path)
        query = _quote(parts.query, safe="=&;%:@!$'()*+,/?-._~")
        return Target(scheme, host, port or DEFAULT_PORTS[scheme], path, query, label_studio=False)

    def _check_origin(self, target: Target) -> Target:
        ls = self.label_studio
        if ls is not None and target.origin == ls.origin:
            if not any(target.path.startswith(self.ls_base + prefix) for prefix in LABEL_STUDIO_DATA):
                raise UrlRefused(
                    f"{target.describe()}: only /data/upload/ and /data/local-files/ are read from Label Studio"
                )
            if _ENCODED_SEPARATOR.search(target.path):
                raise UrlRefused(f"{target.describe()}: encoded slashes are not accepted in Label Studio paths")
            return dataclasses.replace(target, label_studio=True)
        if not self.allow.allows_host(target.host, target.port):
            allowed = ", ".join(self.allow.describe()) or "none"
            raise UrlRefused(f"{target.describe()}: host not allowed (allowed: {allowed}; set AXX_ALLOWED_HOSTS)")
        return target

    # --- addresses: one resolution ----------------------------------------------------------------------------
    def addresses(self, target: Target) -> list[str]:
        """The addresses to connect to, in order: the host resolved once, every address checked (one refused
        address refuses the host: a name that also points inside the network is not trusted)."""
        addresses = self._resolve(target)
        if self.label_studio is None or target.origin != self.label_studio.origin:
            for address in addresses:
                problem = address_problem(address)
                if problem and not self.allow.lists_address(address, target.port):
                    raise UrlRefused(
                        f"{target.describe()}: {target.host} is {problem} ({address}); list the address or its "
                        "network in AXX_ALLOWED_HOSTS to allow it"
                    )
        return [str(a) for a in addresses]

    def _resolve(self, target: Target) -> list[IpAddress]:
        literal = _ip(target.host)
        if literal is not None:
            return [literal]
        try:
            found = [ipaddress.ip_address(a.split("%", 1)[0]) for a in self.resolver(target.host, target.port)]
        except (OSError, UnicodeError, ValueError) as exc:
            raise UrlRefused(f"{target.describe()}: cannot resolve the host ({_reason(exc)})", True) from exc
        if not found:
            raise UrlRefused(f"{target.describe()}: cannot resolve the host (no address)", transient=True)
        return found


def normalise_path(path: str) -> str:
    """RFC 3986 normalisation: unreserved escapes decoded (`%2e` -> `.`), dot-segments removed, and characters
    that are not allowed in a path percent-encoded; the result is what is requested and what is checked."""
    decoded = _UNRESERVED_ESCAPE.sub(lambda m: chr(int(m.group(1), 16)), path or "/")
    segments: list[str] = []
    for segment in decoded.split("/")[1:] if decoded.startswith("/") else decoded.split("/"):
        if segment == "..":
            if segments:
                segments.pop()
        elif segment != ".":
            segments.append(segment)
    if decoded.split("/")[-1] in (".", ".."):
        segments.append("")  # "/a/.." is the directory "/", not the file "/a"
    return _quote("/" + "/".join(segments), safe="/%:@!$&'()*+,;=-._~")


def _quote(text: str, safe: str) -> str:
    """Percent-encode what may not appear raw (spaces, non-ASCII, a `%` that starts no escape)."""
    return urllib.parse.quote(_LONE_PERCENT.sub("%25", text), safe=safe)


def redact(url: str) -> str:
    """A URL for messages: control characters escaped, user info dropped, query string elided, shortened."""
    text = _CONTROL.sub("?", url)
    text = re.sub(r"^([a-zA-Z][a-zA-Z0-9+.-]*:)?//[^?#]*@", lambda m: (m.group(1) or "") + "//***@", text)
    text = re.sub(r"\?.*$", "?...", text, flags=re.DOTALL)
    return _shorten(text)


def _scheme(url: str) -> str:
    m = re.match(r"^([a-zA-Z][a-zA-Z0-9+.-]*):", url)
    return m.group(1).lower() if m else ""


def _reason(exc: BaseException) -> str:
    return _CONTROL.sub("?", str(exc))[:80] or type(exc).__name__


def _shorten(text: str, limit: int = 120) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."
