"""One HTTP/1.1 connection: uvicorn's httptools protocol with the limits a public edge needs.

uvicorn bounds neither the time a client may take to send its request head, nor the size of
that head, nor the number of connections a worker holds; it answers parser errors in plain
text, and it closes a connection whose response is done while the request body is still
arriving, which makes a client that sends its whole body first (http.client, requests) see a
reset instead of the response. This protocol adds, per connection:

- a deadline for the request head (--header-timeout), counted from its first byte, and for a
  connection that has sent nothing since it opened or since its last response;
- a deadline for the body (--body-timeout), counted from the end of the head: when it passes
  the application is told the body ended early (it answers 408), or, if the response was
  already sent, the connection is closed;
- a bound on the head (size, header count, request-line length): 431 or 414;
- Host required on HTTP/1.1 (RFC 9112 3.2): 400;
- a bound on connections per worker (--max-connections): past it the connection idle the
  longest is closed, or the new one refused with 503 when none is idle;
- after a response that leaves part of the body unread, the rest is read and discarded, up to
  DRAIN_LIMIT bytes and the body deadline, before the connection closes (RFC 9112 9.6);
- problem+json (RFC 9457) for everything it refuses itself.

Deadlines are checked by one sweep per worker every SWEEP_EVERY seconds, not by a timer per
request: the fast path only notes the sweep's last loop time at each phase change, so a
deadline is kept to within SWEEP_EVERY.
"""

from __future__ import annotations

import asyncio
import logging
from time import perf_counter

import httptools
import orjson
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from productd.http.problems import PROBLEM_JSON, problem_body

log = logging.getLogger("productd.http")

SWEEP_EVERY = 0.5
DRAIN_LIMIT = 64 * 1024 * 1024  # body bytes discarded after an early response before we cut the client off
MAX_HEAD_BYTES = 64 * 1024
MAX_HEADERS = 100
MAX_TARGET_BYTES = 8 * 1024
SHUTDOWN_GRACE = 1.0  # at a graceful stop, an accepted connection gets this long to send its request

# Where a connection is in its current request.
IDLE, HEAD, BODY, BUSY = 0, 1, 2, 3  # waiting | reading the head | reading the body | answering

# Keys in a request's ASGI scope: the body did not arrive whole, as (status, detail); and the
# time.perf_counter() at which the request's head was complete (for its duration).
BODY_CUT = "productd.body_cut"
STARTED = "productd.started"


class Limits:
    """What every connection of a worker is held to; set once by the worker."""

    header_timeout = 10.0
    body_timeout = 30.0
    max_connections = 1000
    max_body_bytes = 4 * 1024 * 1024
    max_requests = 1 << 62  # gunicorn's max_requests (with its jitter) for this worker
    now = 0.0  # loop time as of the last sweep: phase changes note it without a clock call
    requests_done = staticmethod(lambda: None)  # called once when the worker reaches max_requests


class _Transport:
    """The connection's transport as the request cycle sees it: close() waits for the body.

    uvicorn's request cycle closes the transport as soon as a `Connection: close` response is
    written. If the client is still sending its body, unread bytes make the kernel answer with a
    reset, and the client loses the response it was about to read.
    """

    def __init__(self, transport: asyncio.Transport, connection: Connection) -> None:
        self._transport = transport
        self._connection = connection
        # Bound methods, not __getattr__: write and friends are on every request's path.
        self.write = transport.write
        self.writelines = transport.writelines
        self.is_closing = transport.is_closing
        self.pause_reading = transport.pause_reading
        self.resume_reading = transport.resume_reading
        self.get_extra_info = transport.get_extra_info
        self.set_protocol = transport.set_protocol
        self.get_protocol = transport.get_protocol
        self.abort = transport.abort
        self.write_eof = transport.write_eof
        self.can_write_eof = transport.can_write_eof
        self.get_write_buffer_size = transport.get_write_buffer_size

    def close(self) -> None:
        connection = self._connection
        if connection.phase == BODY and not connection.cut_off:
            connection.close_after_body = True  # on_message_complete, DRAIN_LIMIT or the deadline closes it
            connection.transport_resume()
            return
        self._transport.close()


class Connection(HttpToolsProtocol):
    limits = Limits
    stopping = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self.phase = IDLE
        self.since = self.limits.now
        self.head_bytes = 0
        self.chunk = 0
        self.discarded = 0
        self.close_after_body = False
        self.cut_off = False
        self.refusal: tuple[int, str, str] | None = None
        self.raw_transport = transport
        super().connection_made(_Transport(transport, self))  # type: ignore[arg-type]
        if len(self.connections) > self.limits.max_connections:
            self._make_room()

    def transport_resume(self) -> None:
        if not self.raw_transport.is_closing():
            self.raw_transport.resume_reading()

    def _make_room(self) -> None:
        """Past --max-connections: the connection idle the longest goes, else this new one."""
        oldest = None
        for other in self.connections:
            if other is not self and getattr(other, "phase", BUSY) == IDLE and (
                oldest is None or other.since < oldest.since
            ):
                oldest = other
        if oldest is not None:
            oldest.raw_transport.close()
        else:
            self.refuse(503, "Too many connections",
                        f"this worker holds {self.limits.max_connections} connections (--max-connections), "
                        "none of them idle; retry shortly", headers={"Retry-After": "1"})

    # ---- parser callbacks: record the phase, enforce the head limits

    def data_received(self, data: bytes) -> None:
        if self.timeout_keep_alive_task is not None:
            self.timeout_keep_alive_task.cancel()
            self.timeout_keep_alive_task = None
        self.chunk = len(data)
        if self.phase == HEAD:
            self.head_bytes += self.chunk
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._unsupported_upgrade_warning()
            return
        except httptools.HttpParserError as exc:
            if self.refusal is not None:
                self.refuse(*self.refusal)
            else:
                self.refuse(400, "Malformed HTTP request", f"the request is not valid HTTP/1.1: {exc}")
            return
        if self.phase == HEAD and self.head_bytes > MAX_HEAD_BYTES:  # a head still arriving, already too big
            self.refuse(431, "Request head too large",
                        f"the request line and headers exceed {MAX_HEAD_BYTES} bytes", kind="head-too-large")

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.phase = HEAD
        self.since = self.limits.now
        # At least the head's size once it is complete: the chunk it began in, and every later one.
        self.head_bytes = self.chunk

    def on_headers_complete(self) -> None:
        # The head limits are checked once it is whole (a head still arriving: data_received), so
        # that parsing each header costs nothing more.
        headers = self.headers
        if len(headers) > MAX_HEADERS:
            self._refusing(431, "Too many headers", f"the request has more than {MAX_HEADERS} header fields",
                           "head-too-large")
        if len(self.url) > MAX_TARGET_BYTES:
            self._refusing(414, "Request target too long", f"the request target exceeds {MAX_TARGET_BYTES} bytes",
                           "target-too-long")
        if self.head_bytes > MAX_HEAD_BYTES and len(self.url) + sum(len(n) + len(v) + 4 for n, v in headers) > (
            MAX_HEAD_BYTES
        ):
            self._refusing(431, "Request head too large",
                           f"the request line and headers exceed {MAX_HEAD_BYTES} bytes", "head-too-large")
        if self.parser.get_http_version() == "1.1":
            for name, _ in headers:
                if name == b"host":
                    break
            else:
                self._refusing(400, "Missing Host", "an HTTP/1.1 request must carry a Host header (RFC 9112 3.2)",
                               "malformed-request")
        self.scope[STARTED] = perf_counter()  # type: ignore
        super().on_headers_complete()
        cycle = self.cycle
        if self.stopping or self.server_state.total_requests >= self.limits.max_requests:
            cycle.keep_alive = False
        self.phase = BODY
        self.since = self.limits.now
        self.discarded = 0
        if cycle.waiting_for_100_continue and self._declared_length() > self.limits.max_body_bytes:
            # The application reads before it routes, which would send 100 Continue: the body is
            # refused unseen instead (the resource answers 413 on Content-Length alone).
            cycle.waiting_for_100_continue = False
            cycle.more_body = False
            cycle.message_event.set()

    def _refusing(self, status: int, title: str, detail: str, kind: str) -> None:
        """From a parser callback: stop parsing; data_received answers with this."""
        self.refusal = (status, title, detail, kind)
        raise ValueError(detail)

    def _declared_length(self) -> int:
        for name, value in self.headers:
            if name == b"content-length":
                try:
                    return int(value)
                except ValueError:
                    return 0
        return 0

    def on_body(self, body: bytes) -> None:
        cycle = self.cycle
        if cycle.response_complete or not cycle.more_body:
            # Answered already (413, 401, ...): read on and discard, so that the client can
            # finish sending and read the answer; up to a bound.
            self.discarded += len(body)
            if self.discarded > DRAIN_LIMIT:
                self.cut_off = True
                self.raw_transport.close()
            return
        super().on_body(body)

    def on_message_complete(self) -> None:
        cycle = self.cycle
        self.phase = BUSY
        if self.close_after_body:
            self.raw_transport.close()
            return
        if cycle.response_complete:
            self.phase = IDLE
            self.since = self.limits.now
        super().on_message_complete()

    def on_response_complete(self) -> None:
        if self.phase == BUSY:
            self.phase = IDLE
            self.since = self.limits.now
        super().on_response_complete()
        if self.server_state.total_requests == self.limits.max_requests:
            # uvicorn looks at its request count ten times a second, and a busy worker answers
            # many more requests than max_requests meanwhile: stop taking new ones now.
            self.limits.requests_done()

    def connection_lost(self, exc: Exception | None) -> None:
        cycle = self.cycle
        if cycle is not None and self.phase == BODY and not cycle.response_complete:
            cycle.scope[BODY_CUT] = (400, "the connection closed before the body was complete")  # type: ignore
        super().connection_lost(exc)

    # ---- refusing and timing out

    def send_400_response(self, msg: str) -> None:
        self.refuse(400, "Malformed HTTP request", msg)

    def refuse(self, status: int, title: str, detail: str, kind: str | None = None, headers: dict | None = None,
               ) -> None:
        """Answer `status` ourselves (the application never sees the request) and close."""
        transport = self.raw_transport
        if transport.is_closing():
            return
        cycle = self.cycle
        if cycle is None or not cycle.response_started:
            body = orjson.dumps(problem_body(status, title, detail, kind))
            lines = [STATUS_LINE[status]]
            for name, value in self.server_state.default_headers:
                lines += [name, b": ", value, b"\r\n"]
            for name, value in (headers or {}).items():
                lines += [name.encode(), b": ", value.encode(), b"\r\n"]
            lines += [b"content-type: ", PROBLEM_JSON.encode(), b"\r\ncontent-length: ", str(len(body)).encode(),
                      b"\r\nconnection: close\r\n\r\n", body]
            transport.write(b"".join(lines))
            log.info("refused a request: %d %s", status, detail,
                     extra={"fields": {"status": status, "problem": detail, "remote": _remote(self.client)}})
        if cycle is not None and not cycle.response_complete:
            cycle.disconnected = True  # the application must not write after us
            cycle.scope[BODY_CUT] = (status, detail)  # type: ignore
            cycle.message_event.set()
        transport.close()

    def check(self, now: float) -> None:
        """The sweep's look at this connection: enforce the head and body deadlines."""
        phase, limits = self.phase, self.limits
        if phase == HEAD or phase == IDLE:
            if now - self.since > limits.header_timeout:
                if phase == HEAD:
                    self.refuse(408, "Request head timeout",
                                f"the request line and headers did not arrive within {limits.header_timeout}s "
                                "(--header-timeout)", "request-timeout")
                elif self.cycle is None or self.cycle.response_complete:
                    self.raw_transport.close()  # nothing asked, nothing owed
        elif phase == BODY and now - self.since > limits.body_timeout:
            cycle = self.cycle
            if cycle.response_complete or self.close_after_body:
                self.cut_off = True
                self.raw_transport.close()
            elif BODY_CUT not in cycle.scope:
                # The application is waiting for the body: tell it the body ended, it answers 408.
                cycle.scope[BODY_CUT] = (  # type: ignore
                    408, f"the body did not arrive within {limits.body_timeout}s (--body-timeout)"
                )
                cycle.more_body = False
                cycle.keep_alive = False
                cycle.message_event.set()
            elif now - self.since > limits.body_timeout + SHUTDOWN_GRACE:
                self.cut_off = True
                self.raw_transport.close()

    def shutdown(self) -> None:
        """A graceful stop (SIGTERM, max_requests): finish the request under way, and give an idle
        connection SHUTDOWN_GRACE seconds before closing it. A client may have sent a request on
        it that we have not read yet; closing at once would lose that request without an answer
        (seen: recycling under keep-alive load). Whatever comes in the grace is answered, with
        `Connection: close`."""
        self.stopping = True
        cycle = self.cycle
        if self.phase == IDLE and (cycle is None or cycle.response_complete):
            self.loop.call_later(SHUTDOWN_GRACE, self._close_if_idle)
        elif cycle is not None:
            cycle.keep_alive = False

    def _close_if_idle(self) -> None:
        if self.phase == IDLE:
            self.raw_transport.close()


def _remote(client) -> str | None:
    return f"{client[0]}:{client[1]}" if client else None
