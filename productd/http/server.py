"""gunicorn integration: run the Falcon ASGI app, under productd's uvicorn worker class
(productd.http.worker), in the arbiter the supervisor forked.

The listening socket is the supervisor's (bound before anything forked, so a busy port is a
clear error at once) and reaches gunicorn as `fd://N`. productd's own options win over the
same settings in --gunicorn-config; that file is for everything else gunicorn offers.
"""

from __future__ import annotations

import os

from gunicorn import glogging
from gunicorn.app.base import Application

from productd import logs
from productd.actors.client import ShardClient
from productd.actors.frontend import Frontend
from productd.config import OPTIONS, Settings
from productd.http.app import create_app
from productd.http.stats import HttpStats


class GunicornLogger(glogging.Logger):
    """gunicorn's own messages in productd's log format; its access log stays off (we log requests)."""

    def setup(self, cfg) -> None:
        super().setup(cfg)
        for handler in self.error_log.handlers:
            handler.setFormatter(logs.formatter())
        self.access_log.disabled = True


class GunicornServer(Application):
    """gunicorn's Application for its config-file loading; the command line is ours, not gunicorn's."""

    def __init__(self, settings: Settings, frontend: Frontend, stats: HttpStats) -> None:
        self.settings = settings
        self.frontend = frontend
        self.stats = stats
        super().__init__(prog="productd")

    def load_config(self) -> None:
        s = self.settings
        if s.gunicorn_config:
            self.load_config_from_file(s.gunicorn_config)
        cfg = self.cfg
        cfg.set("bind", [f"fd://{fd}" for fd in self.frontend.listener_fds])
        for option in OPTIONS:  # workers, graceful_timeout, loglevel
            if option.gunicorn:
                cfg.set(option.gunicorn, option.to_gunicorn(getattr(s, option.dest)))
        cfg.set("worker_class", "productd.http.worker.ProductdWorker")
        cfg.set("logger_class", GunicornLogger)
        cfg.set("proc_name", "productd")
        if "control_socket_disable" in cfg.settings:
            # gunicorn >= 25 can resize and stop itself over a control socket; the supervisor
            # owns the process tree, so that door stays shut.
            cfg.set("control_socket_disable", True)
        user_pre_fork, user_post_fork = cfg.pre_fork, cfg.post_fork
        stats = self.stats

        def pre_fork(server, worker) -> None:  # in the arbiter: it alone hands out slots
            worker.productd_slot = stats.assign(
                {getattr(w, "productd_slot", -1) for w in server.WORKERS.values()}
            )
            user_pre_fork(server, worker)

        def post_fork(server, worker) -> None:  # in the new worker
            stats.use(worker.productd_slot)
            # One SO_REUSEPORT socket per worker (see supervisor.listen): the kernel then deals
            # connections out evenly. A replacement worker takes the freed slot and its socket, on
            # which connections that came meanwhile are waiting.
            worker.sockets = [worker.sockets[worker.productd_slot % len(worker.sockets)]]
            user_post_fork(server, worker)

        cfg.set("pre_fork", pre_fork)
        cfg.set("post_fork", post_fork)

    def load(self):
        f, s = self.frontend, self.settings
        # In the worker (gunicorn loads the app after the fork): one client, one reply socket.
        if s.broker:  # the multi-host mode: the shards are the queues' active owners (docs/cluster.md)
            from productd.cluster.client import ClusterClient

            self.client = client = ClusterClient(s, f.board, late_reply=self.stats.late_reply)
        else:
            self.client = client = ShardClient(
                f.inbox_fds, f.board, s.enqueue_timeout, s.read_timeout,
                wait_for_commit=s.durability == "sync", bell_fds=f.bell_fds, late_reply=self.stats.late_reply,
            )
        return create_app(
            client, self.stats,
            max_body_bytes=s.max_body_bytes, max_events=s.max_events, access_log=s.access_log,
            auth_token=s.auth_token, auth_reads=s.auth_reads,
            change_history=s.change_history, images=f.images, pool=f.pool,
        )


def serve(settings: Settings, frontend: Frontend) -> int:
    os.environ.pop("NOTIFY_SOCKET", None)  # only the supervisor speaks to systemd
    stats = HttpStats(slots=max(8, 4 * settings.workers))
    # gunicorn logs from a new worker before its post_fork hook runs: name the role at the fork itself.
    os.register_at_fork(after_in_child=lambda: logs.set_role("worker"))
    GunicornServer(settings, frontend, stats).run()
    return 0
