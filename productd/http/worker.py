"""The gunicorn worker class: uvicorn's worker (one asyncio loop per process, uvloop and
httptools) with productd's connection limits, graceful drain and supervisor watch.

What uvicorn-worker leaves out, added here:
- gunicorn's graceful_timeout (--graceful-timeout) becomes uvicorn's graceful shutdown timeout,
  so SIGTERM drains in-flight requests within it and then cancels what is left;
- SIGINT is ignored: the arbiter stops workers with SIGTERM or SIGQUIT, and a SIGINT sent to
  every process (pkill -INT productd) must not stop a worker on its own; SIGTERM and SIGQUIT
  both drain;
- one sweep task enforces the header and body deadlines (productd.http.connection) and checks
  that the supervisor is alive: once an inbox has no reader, nothing can be served, and the
  worker stops at once instead of answering 503 until gunicorn gives up.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys

from gunicorn.arbiter import Arbiter
from uvicorn.server import Server
from uvicorn_worker import UvicornWorker

from productd.http import connection

log = logging.getLogger("productd.http")

GIL_SWITCH_INTERVAL = 0.0005


class _Server(Server):
    def handle_exit(self, sig, frame) -> None:
        # SIGINT: ignored (see the module docstring). SIGTERM and SIGQUIT: drain and exit 0.
        # uvicorn would re-raise the signal once drained, and the worker die of it; and
        # uvicorn-worker's own SIGQUIT handler only flags gunicorn's worker, which uvicorn never
        # reads, so the arbiter's quick stop (SIGQUIT) would wait out the graceful timeout.
        if sig != signal.SIGINT:
            self.should_exit = True


class ProductdWorker(UvicornWorker):
    CONFIG_KWARGS = {
        "loop": "uvloop",
        "http": connection.Connection,
        "ws": "none",
        "lifespan": "off",
        "access_log": False,  # productd logs each request itself (productd.http.app.RequestLog)
        "server_header": False,  # nothing to gain from telling clients what serves them
        # X-Forwarded-For from 127.0.0.1 would otherwise replace the peer address in the logs: no
        # proxy is part of productd, and the middleware costs every request.
        "proxy_headers": False,
    }

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.config.timeout_graceful_shutdown = max(1, round(self.cfg.graceful_timeout))

    async def _serve(self) -> None:
        # Big bodies are parsed in a thread (productd.http.resources): with the default 5 ms switch
        # interval the loop waited that long for the GIL at every step of every other request.
        # Measured, GET p99 at 32 connections while 2 clients posted 10,000-event bodies: 87 ms at
        # 5 ms, 41 ms at 0.5 ms (306 ms with the bodies parsed on the loop).
        sys.setswitchinterval(GIL_SWITCH_INTERVAL)
        self.config.app = self.wsgi  # loads productd's app (GunicornServer.load) in this worker
        settings = self.app.settings
        limits = connection.Limits
        limits.header_timeout = settings.header_timeout
        limits.body_timeout = settings.body_timeout
        limits.max_connections = settings.max_connections
        limits.max_body_bytes = settings.max_body_bytes
        limits.now = asyncio.get_running_loop().time()
        server = _Server(config=self.config)
        limits.max_requests = self.max_requests  # gunicorn's, with its jitter; sys.maxsize if unset

        def requests_done() -> None:
            log.info("max_requests reached (%d requests): this worker stops taking new ones and exits",
                     self.max_requests)
            server.should_exit = True
            for listener in getattr(server, "servers", ()):
                listener.close()  # the next connections wait for the replacement on the same socket
            for conn in list(server.server_state.connections):
                conn.shutdown()

        limits.requests_done = requests_done
        # Like uvicorn's SIGTERM handler, on the server rather than on gunicorn's worker object.
        signal.signal(signal.SIGQUIT, server.handle_exit)
        client = self.app.client
        stop = asyncio.Event()

        def supervisor_gone() -> None:
            log.error("the supervisor is gone (an inbox has no reader): this worker stops now")
            server.should_exit = True
            server.force_exit = True  # nothing in flight can be answered but 503: do not wait for it

        client.on_supervisor_gone = supervisor_gone
        watch = asyncio.ensure_future(self._watch(server, client, stop))
        try:
            await server.serve(sockets=self.sockets)
        finally:
            stop.set()
            watch.cancel()
        if not server.started:
            sys.exit(Arbiter.WORKER_BOOT_ERROR)
        if client.gone:
            # The arbiter would only start another worker to find the same: let it stop too.
            try:
                os.kill(self.ppid, signal.SIGTERM)
            except OSError:
                pass

    async def _watch(self, server: Server, client, stop: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        connections = server.server_state.connections
        while not stop.is_set():
            await asyncio.sleep(connection.SWEEP_EVERY)
            now = connection.Limits.now = loop.time()
            for conn in list(connections):
                check = getattr(conn, "check", None)
                if check is not None:
                    check(now)
            client.supervisor_alive()
