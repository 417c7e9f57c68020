"""Download one image URL: http and https, bounded in size, time and redirects, and guarded
against server-side request forgery.

Only the standard library: `http.client` speaks HTTP/1.1 over a socket this module connects
itself. The name is resolved here, each resolved address is checked against the
`AddressPolicy` and the socket is connected to that very IP (the Host header and the TLS SNI
and certificate check still use the name), so a name that resolves to a public address when
checked and to 169.254.169.254 when connected (DNS rebinding) cannot slip through: there is no
second resolution. Every redirect hop is parsed, resolved and checked again.

Every failure is a `FetchError` with a `reason` and whether it is `transient` (worth another
attempt later: timeouts, connection errors, 5xx, 408, 429) or permanent (4xx, too large,
redirect loop or too many redirects, a refused address, a bad URL).
"""

from __future__ import annotations

import http.client
import io
import ipaddress
import socket
import ssl
import time
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from urllib.parse import urljoin, urlsplit

USER_AGENT = "productd-images/1"
REDIRECTS = (301, 302, 303, 307, 308)
CHUNK = 64 * 1024


class FetchError(Exception):
    """A download that failed; `reason` is a short stable word, `detail` says what happened."""

    def __init__(self, reason: str, detail: str, transient: bool, retry_after: float | None = None,
                 status: int | None = None) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
        self.transient = transient
        self.retry_after = retry_after
        self.status = status


@dataclass(frozen=True)
class AddressPolicy:
    """Which addresses a download may connect to.

    By default only globally routable unicast addresses: loopback, private (RFC 1918, ULA),
    link-local (169.254/16 holds cloud metadata services), multicast, reserved, unspecified,
    shared (100.64/10) and the documentation ranges are refused. `allow_private` lifts that for
    tests and closed networks (multicast stays refused: nothing serves HTTP there);
    `allow_networks` lifts it for the listed networks only (e.g. one internal image host).
    """

    allow_private: bool = False
    allow_networks: tuple = ()

    def refusal(self, address: str) -> str | None:
        """None if `address` may be connected to, else why not."""
        ip = ipaddress.ip_address(address.split("%", 1)[0])
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        if ip.is_multicast:
            return f"{ip} is multicast"
        if self.allow_private:
            return None
        for network in self.allow_networks:
            if ip in ipaddress.ip_network(network, strict=False):
                return None
        for what in ("loopback", "private", "link_local", "reserved", "unspecified"):
            if getattr(ip, f"is_{what}"):
                return f"{ip} is {what.replace('_', '-')}"
        if not ip.is_global:
            return f"{ip} is not globally routable"
        return None


@dataclass(frozen=True)
class Limits:
    """The bounds of one download (defaults: docs/images.md, "Configuration")."""

    max_bytes: int = 20 * 1024 * 1024
    connect_timeout: float = 5.0
    total_timeout: float = 30.0  # the whole download, every redirect hop included
    max_redirects: int = 5
    policy: AddressPolicy = field(default_factory=AddressPolicy)
    user_agent: str = USER_AGENT


@dataclass(frozen=True)
class Download:
    url: str  # the URL asked for
    final_url: str  # after redirects
    address: str  # the IP the body came from
    content_type: str | None
    body: bytes
    redirects: int


def fetch(url: str, limits: Limits = Limits(), ssl_context: ssl.SSLContext | None = None) -> Download:
    """GET `url` and return its body, following at most `limits.max_redirects` redirects."""
    deadline = time.monotonic() + limits.total_timeout
    seen = {url}
    current = url
    for hop in range(limits.max_redirects + 1):
        status, headers, body, address = _get_once(current, limits, deadline, ssl_context)
        if status in REDIRECTS:
            location = headers.get("location")
            if not location:
                raise FetchError("bad-redirect", f"{status} without Location from {current}", False, status=status)
            target = urljoin(current, location.strip())
            if target in seen:
                raise FetchError("redirect-loop", f"{current} redirects back to {target}", False, status=status)
            if hop == limits.max_redirects:
                raise FetchError("too-many-redirects", f"more than {limits.max_redirects} redirects from {url}",
                                 False, status=status)
            seen.add(target)
            current = target
            continue
        return Download(url, current, address, headers.get("content-type"), body, hop)
    raise AssertionError("unreachable")


def _split(url: str) -> tuple[str, str, int, str]:
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise FetchError("bad-url", f"{url!r}: {exc}", False) from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise FetchError("bad-url", f"{url!r}: only http and https are fetched", False)
    host = parts.hostname
    if not host:
        raise FetchError("bad-url", f"{url!r} has no host", False)
    if parts.username is not None or parts.password is not None:
        raise FetchError("bad-url", f"{url!r}: credentials in the URL are not sent", False)
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    return scheme, host, port or (443 if scheme == "https" else 80), path


def _remaining(deadline: float, url: str) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise FetchError("timeout", f"{url}: the total time limit ran out", True)
    return left


def _connect(host: str, port: int, limits: Limits, deadline: float, url: str) -> tuple[socket.socket, str]:
    """A socket connected to an allowed address of `host`, and that address."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    except socket.gaierror as exc:
        # A name that does not exist may exist later (DNS hiccup): transient, bounded by attempts.
        raise FetchError("dns", f"{host}: {exc.strerror}", True) from None
    refused, errors = [], []
    for family, kind, proto, _, sockaddr in infos:
        address = sockaddr[0]
        why = limits.policy.refusal(address)
        if why:
            refused.append(why)
            continue
        sock = socket.socket(family, kind, proto)
        try:
            sock.settimeout(min(limits.connect_timeout, _remaining(deadline, url)))
            sock.connect(sockaddr)
            peer = sock.getpeername()[0]
            why = limits.policy.refusal(peer)  # the address actually connected to
            if why:
                raise FetchError("refused-address", f"{url}: connected to {why}", False)
            return sock, peer
        except FetchError:
            sock.close()
            raise
        except TimeoutError:
            sock.close()
            errors.append(f"{address}: connect timed out")
        except OSError as exc:
            sock.close()
            errors.append(f"{address}: {exc.strerror or exc}")
    if errors:
        reason = "timeout" if all("timed out" in e for e in errors) else "connection"
        raise FetchError(reason, f"{url}: " + "; ".join(errors), True)
    raise FetchError("refused-address", f"{url}: {'; '.join(refused)}", False)


def _get_once(url: str, limits: Limits, deadline: float, ssl_context: ssl.SSLContext | None):
    scheme, host, port, path = _split(url)
    sock, address = _connect(host, port, limits, deadline, url)
    conn = None
    try:
        if scheme == "https":
            context = ssl_context or ssl.create_default_context()
            sock = context.wrap_socket(sock, server_hostname=host)  # SNI and the certificate: the name
            conn = http.client.HTTPSConnection(host, port, context=context)
        else:
            conn = http.client.HTTPConnection(host, port)
        # Already connected, to the address checked above; every send and receive through it
        # gets what is left of the total time, so a server dripping its headers is cut off too.
        conn.sock = _DeadlineSocket(sock, deadline, url)
        conn.request("GET", path, headers={
            "User-Agent": limits.user_agent,
            "Accept": "image/avif,image/webp,image/png,image/jpeg,image/gif,image/*;q=0.8",
            "Accept-Encoding": "identity",
        })
        response = conn.getresponse()
        status = response.status
        headers = {k.lower(): v for k, v in response.getheaders()}
        if status in REDIRECTS:
            return status, headers, b"", address
        _check_status(url, status, headers)
        length = headers.get("content-length")
        if length and length.isdigit() and int(length) > limits.max_bytes:
            raise FetchError("too-large", f"{url}: Content-Length {length} > {limits.max_bytes} bytes", False)
        chunks, size = [], 0
        while True:
            chunk = response.read1(CHUNK)
            if not chunk:
                break
            size += len(chunk)
            if size > limits.max_bytes:
                raise FetchError("too-large", f"{url}: body over {limits.max_bytes} bytes", False)
            chunks.append(chunk)
        return status, headers, b"".join(chunks), address
    except FetchError:
        raise
    except TimeoutError:
        raise FetchError("timeout", f"{url}: timed out", True) from None
    except ssl.SSLCertVerificationError as exc:
        raise FetchError("tls", f"{url}: {exc.verify_message or exc}", False) from None
    except (OSError, http.client.HTTPException) as exc:
        raise FetchError("connection", f"{url}: {type(exc).__name__}: {exc}", True) from None
    finally:
        if conn is not None:
            conn.close()
        sock.close()


class _DeadlineSocket:
    """The socket as http.client sees it: what it needs (sendall, makefile, close), each read
    and write bounded by the download's deadline rather than by a fresh timeout per call."""

    def __init__(self, sock: socket.socket, deadline: float, url: str) -> None:
        self.sock, self.deadline, self.url = sock, deadline, url

    def sendall(self, data: bytes) -> None:
        self.sock.settimeout(_remaining(self.deadline, self.url))
        self.sock.sendall(data)

    def makefile(self, mode: str = "rb", *args, **kwargs) -> io.BufferedReader:
        return io.BufferedReader(_DeadlineReader(self))

    def close(self) -> None:
        pass  # http.client closes a connection before its body is read: _get_once closes the socket


class _DeadlineReader(io.RawIOBase):
    def __init__(self, owner: _DeadlineSocket) -> None:
        self.owner = owner

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        owner = self.owner
        owner.sock.settimeout(_remaining(owner.deadline, owner.url))
        return owner.sock.recv_into(buffer)


def _check_status(url: str, status: int, headers: dict) -> None:
    if status == 200:
        return
    if status in (408, 429) or 500 <= status <= 599:
        raise FetchError(f"http-{status}", f"{url} answered {status}", True, _retry_after(headers), status)
    raise FetchError(f"http-{status}", f"{url} answered {status}", False, status=status)


def _retry_after(headers: dict) -> float | None:
    value = headers.get("retry-after")
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None
