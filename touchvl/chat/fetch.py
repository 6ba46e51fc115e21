"""Fetching image URLs found in data files (the validator's ``--check-urls``), safely, and keeping them out of logs.

A URL in a JSONL file is the file author's, not ours: fetching it must not reach this machine's or its network's
services (SSRF), must not hang, and must not fill memory.  :class:`UrlFetcher` fetches

* ``https`` only (``http`` only for tests, :attr:`UrlFetcher.allow_http`);
* public addresses only: the host is resolved once, every address is checked (loopback, private, link-local --
  cloud metadata --, multicast, reserved, unspecified, and the IPv4 inside mapped/6to4/Teredo/NAT64 IPv6 addresses
  are refused) and the connection goes to the checked address (no second lookup a DNS rebinding could change);
  each redirect is checked the same way (at most :attr:`UrlFetcher.max_redirects`);
* within a total deadline per URL (connect, TLS, headers and body together), and at most ``max_bytes``.

Why not urllib / requests / httpx: their timeouts are per socket operation (a server sending a byte a second holds
a fetch forever: 61 s measured with urllib), they follow redirects to anywhere, and they resolve the host again
when connecting.  http.client with a pinned address and a watchdog that shuts the socket at the deadline is small
and does all three.

:func:`redact_url` / :func:`redact_urls` drop query strings (signatures of signed URLs) and user:password parts
from URLs before anything is printed or written to a report.
"""
from __future__ import annotations

import http.client
import ipaddress
import re
import socket
import ssl
import threading
import time
import urllib.parse
from dataclasses import dataclass, field

REDIRECTS = (301, 302, 303, 307, 308)
NAT64 = ipaddress.ip_network("64:ff9b::/96")
_URL = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)(?:[^\s/?#@'\"<>]*@)?([^\s?#'\"<>]*)(\?[^\s#'\"<>]*)?")


def redact_url(url: str) -> str:
    """``scheme://host/path`` with any query string (``?…Signature=…``) and ``user:password@`` taken out."""
    return redact_urls(url)


def redact_urls(text: str) -> str:
    """Every URL in ``text`` with its query string and credentials replaced by ``…``."""
    return _URL.sub(lambda m: m[1] + m[2] + ("?…" if m[3] else ""), text)


class FetchError(Exception):
    """A URL that was not fetched; the message never holds the URL's query string."""


def address_problem(address: str) -> str | None:
    """What ``address`` is when it is not a public internet address ("a loopback address"), else None."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])  # IPv6 zone ids (fe80::1%eth0)
    except ValueError:
        return "not an IP address"
    candidates = [ip]
    if ip.version == 6:  # IPv4 addresses carried inside IPv6 ones reach the IPv4 host
        candidates += [v4 for v4 in (ip.ipv4_mapped, ip.sixtofour, ip.teredo[1] if ip.teredo else None) if v4]
        if ip in NAT64:
            candidates.append(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
    for a in candidates:
        for test, what in ((a.is_loopback, "a loopback"), (a.is_link_local, "a link-local (cloud metadata)"),
                           (a.is_multicast, "a multicast"), (a.is_unspecified, "an unspecified"),
                           (a.is_private, "a private"), (a.is_reserved, "a reserved"), (not a.is_global, "a non-public")):
            if test:
                return f"{what} address"
    return None


class _PinnedHTTPConnection(http.client.HTTPConnection):
    """An HTTP connection to a checked address, with ``Host`` the URL's host name."""

    def __init__(self, host: str, port: int, address: str, timeout: float):
        super().__init__(host, port, timeout=timeout)
        self.address = address

    def connect(self) -> None:
        self.sock = self.raw_sock = socket.create_connection((self.address, self.port), self.timeout)


class _PinnedHTTPSConnection(http.client.HTTPSConnection):
    """An HTTPS connection to a checked address; the certificate is verified for the URL's host name (SNI)."""

    def __init__(self, host: str, port: int, address: str, timeout: float, context: ssl.SSLContext):
        super().__init__(host, port, timeout=timeout, context=context)
        self.address = address

    def connect(self) -> None:
        self.sock = self.raw_sock = socket.create_connection((self.address, self.port), self.timeout)
        self.sock = self._context.wrap_socket(self.sock, server_hostname=self.host)


@dataclass
class UrlFetcher:
    """``fetcher(url) -> bytes`` (at most ``max_bytes``) or :class:`FetchError`; see the module docstring.

    ``allow_http`` and ``allow_networks`` exist for tests against local servers (e.g. ``("127.0.0.1/32",)``);
    nothing in the command line sets them.
    """

    deadline_s: float = 15.0
    max_bytes: int = 10 * 1024 * 1024 + 1
    max_redirects: int = 3
    allow_http: bool = False
    allow_networks: tuple[str, ...] = ()
    ssl_context: ssl.SSLContext | None = None
    _networks: list = field(init=False, repr=False)

    def __post_init__(self):
        self._networks = [ipaddress.ip_network(n) for n in self.allow_networks]

    @property
    def _ssl(self) -> ssl.SSLContext:
        if self.ssl_context is None:  # loading the trust store takes ~80 ms: only once an https URL is fetched
            self.ssl_context = ssl.create_default_context()
        return self.ssl_context

    def __call__(self, url: str) -> bytes:
        deadline = time.monotonic() + self.deadline_s
        for _ in range(self.max_redirects + 1):
            status, location, body = self._get(url, deadline)
            if status not in REDIRECTS:
                if status != 200:
                    raise FetchError(f"HTTP {status}")
                return body
            if not location:
                raise FetchError(f"HTTP {status} redirect without a Location")
            url = urllib.parse.urljoin(url, location)
        raise FetchError(f"more than {self.max_redirects} redirects")

    # ------------------------------------------------------------------------------------------------ internals
    def _allowed(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address.split("%", 1)[0])
        except ValueError:
            return False
        return any(ip in network for network in self._networks)

    def _target(self, url: str, deadline: float) -> tuple[str, str, int, str, str]:
        """(scheme, host, port, path?query, checked address) of a URL this fetcher may fetch."""
        try:
            parts = urllib.parse.urlsplit(url)
            port = parts.port
        except ValueError as exc:
            raise FetchError(f"not a valid URL ({exc})") from None
        scheme = parts.scheme.lower()
        if scheme != "https" and not (scheme == "http" and self.allow_http):
            raise FetchError(f"refused: {scheme or 'no'} scheme (only https:// URLs are fetched)")
        if parts.username is not None or parts.password is not None:
            raise FetchError("refused: credentials in the URL")
        host = parts.hostname
        if not host:
            raise FetchError("refused: no host in the URL")
        port = port or (443 if scheme == "https" else 80)
        addresses = self._resolve(host, port, deadline)
        for address in addresses:
            problem = None if self._allowed(address) else address_problem(address)
            if problem:
                raise FetchError(f"refused: {host} is {problem}" if address == host.strip("[]")
                                 else f"refused: {host} resolves to {address}, {problem}")
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        return scheme, host, port, path, addresses[0]

    def _resolve(self, host: str, port: int, deadline: float) -> list[str]:
        """The host's addresses, within the deadline (getaddrinfo itself has no timeout: it runs in a thread)."""
        found: dict = {}

        def lookup() -> None:
            try:
                found["infos"] = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            except (OSError, UnicodeError) as exc:
                found["error"] = exc

        worker = threading.Thread(target=lookup, daemon=True)
        worker.start()
        worker.join(max(0.0, deadline - time.monotonic()))
        if worker.is_alive():
            raise FetchError(f"no address for {host} within the {self.deadline_s:g} s deadline")
        if "error" in found:
            exc = found["error"]
            raise FetchError(f"cannot resolve {host} ({getattr(exc, 'strerror', None) or type(exc).__name__})")
        addresses = list(dict.fromkeys(info[4][0] for info in found["infos"]))
        if not addresses:
            raise FetchError(f"no address for {host}")
        return addresses

    def _get(self, url: str, deadline: float) -> tuple[int, str | None, bytes]:
        scheme, host, port, path, address = self._target(url, deadline)
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise FetchError(f"no answer within the {self.deadline_s:g} s deadline")
        conn = (_PinnedHTTPSConnection(host, port, address, remaining, self._ssl) if scheme == "https"
                else _PinnedHTTPConnection(host, port, address, remaining))
        watchdog = threading.Timer(remaining, _shut, (conn,))
        watchdog.daemon = True
        watchdog.start()
        try:
            conn.request("GET", path, headers={"User-Agent": "touchvl-validate", "Accept": "image/*"})
            response = conn.getresponse()
            if response.status in REDIRECTS:
                return response.status, response.getheader("Location"), b""
            if response.status != 200:
                return response.status, None, b""
            chunks, size = [], 0
            while size < self.max_bytes:
                chunk = response.read(min(1 << 16, self.max_bytes - size))
                if not chunk:
                    break
                chunks.append(chunk)
                size += len(chunk)
            if time.monotonic() >= deadline - 0.05:  # the watchdog shut the socket: what was read is partial
                raise FetchError(f"no complete answer within the {self.deadline_s:g} s deadline")
            if size < self.max_bytes and response.length:  # fewer bytes than Content-Length said
                raise FetchError(f"{host}: connection closed after {size} of {size + response.length} bytes")
            return 200, None, b"".join(chunks)
        except FetchError:
            raise
        except (OSError, http.client.HTTPException, ValueError) as exc:
            if time.monotonic() >= deadline - 0.05:
                raise FetchError(f"no complete answer within the {self.deadline_s:g} s deadline") from None
            # http.client's messages can quote the request path and query: name the failure, not the URL
            reason = getattr(exc, "strerror", None) or type(exc).__name__
            raise FetchError(f"{host}: {reason}") from None
        finally:
            watchdog.cancel()
            conn.close()


def _shut(conn: http.client.HTTPConnection) -> None:
    """The deadline: shut the socket down so a blocked handshake or read returns at once (the raw socket: the
    connection drops its own reference once a response says it will close, while the response reads on)."""
    sock = getattr(conn, "raw_sock", None)
    if sock is not None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
