"""gunicorn integration: run the Falcon app in the arbiter the supervisor forked.

The listening socket is the supervisor's (bound before anything forked, so a busy port is a
clear error at once) and reaches gunicorn as `fd://N`. productd's own options win over the
same settings in --gunicorn-config; that file is for everything else gunicorn offers.
"""

from __future__ import annotations

import os

from gunicorn.app.base import BaseApplication

from productd.actors.client import ShardClient
from productd.actors.supervisor import Frontend
from productd.config import Settings
from productd.http.app import create_app


class GunicornServer(BaseApplication):
    def __init__(self, settings: Settings, frontend: Frontend) -> None:
        self.settings = settings
        self.frontend = frontend
        super().__init__(prog="productd")

    def load_config(self) -> None:
        s = self.settings
        if s.gunicorn_config:
            self.load_config_from_file(s.gunicorn_config)
        self.cfg.set("bind", [f"fd://{self.frontend.listener_fd}"])
        self.cfg.set("workers", s.workers)
        self.cfg.set("threads", s.threads)
        self.cfg.set("worker_class", s.worker_class)
        self.cfg.set("graceful_timeout", max(1, round(s.graceful_timeout)))
        self.cfg.set("loglevel", s.log_level)
        self.cfg.set("proc_name", "productd")
        if "control_socket_disable" in self.cfg.settings:
            # gunicorn >= 25 can resize and stop itself over a control socket; the supervisor
            # owns the process tree, so that door stays shut.
            self.cfg.set("control_socket_disable", True)

    def load(self):
        f, s = self.frontend, self.settings
        client = ShardClient(
            f.inbox_fds, f.board, s.enqueue_timeout, s.read_timeout, wait_for_commit=s.durability == "sync"
        )
        return create_app(client, max_body_bytes=s.max_body_bytes, max_events=s.max_events)


def serve(settings: Settings, frontend: Frontend) -> int:
    os.environ.pop("NOTIFY_SOCKET", None)  # only the supervisor speaks to systemd
    GunicornServer(settings, frontend).run()
    return 0
