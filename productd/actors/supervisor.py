"""The supervisor: the process `productd serve` starts, and the parent of every other one.

It binds the listening socket, creates one inbox per shard, forks the shards, the image
workers (--image-workers) and then the gunicorn arbiter, and from then on only watches: a shard
or image worker that dies is started again (a shard on the same inbox), and SIGTERM or SIGINT
stops the service in order (gunicorn and the image workers first, so no new events or image
results come in, then each shard drains its inbox and exits).

It forks everything before it could start a thread, keeps the shards away from gunicorn's
arbiter (which reaps every child it has) and is the only process that speaks to systemd.
"""

from __future__ import annotations

import ctypes
import logging
import os
import select
import shutil
import signal
import sqlite3
import sys
import tempfile
import time
from collections.abc import Callable
from enum import Enum

from productd import logs
from productd.actors import pool as pool_row
from productd.actors import protocol, status
from productd.actors.frontend import Frontend
from productd.actors.inbox import Inbox, ring
from productd.actors.listeners import ListenError, listen
from productd.actors.pool import PoolBoard
from productd.actors.routing import shard_for
from productd.actors.shard import EXIT_LOST, EXIT_SAVED, Shard
from productd.actors.status import StatusBoard
from productd.actors.systemd import notify_systemd
from productd.config import DEFAULT_SHARDS
from productd.images import settings as image_settings
from productd.images.results import ResultSender
from productd.store import recovery
from productd.store.datadir import DataDir, DataDirError
from productd.store.sqlite import ShardFile, StoreFileError

log = logging.getLogger("productd.supervisor")

STARTUP_POLL = 0.05
EXIT_SOFTWARE = 70  # a shard that raised
DRAIN_DEATHS = 5  # deaths within 30 s after which a stopping service stops restarting a shard
EXTEND_EVERY = 10.0  # seconds between systemd start-timeout extensions while loading
EXTEND_BY_USEC = 30_000_000
STOP_RETRY = 0.05  # seconds between tries to hand a STOP frame to a full inbox
STOP_NAG_EVERY = 10.0  # seconds between log lines about a shard that has not taken its STOP
# Room each shard keeps allocated for its recovery file: what a shard holds uncommitted when its
# disk fills is about one commit interval of changes plus a full inbox, and a saved record takes
# about the bytes of the event that made it.
RECOVERY_RESERVE_MIN = 64 * 1024
# The service's exit code after a stop: the most serious of what happened wins.
_EXIT_SEVERITY = (0, 1, EXIT_SAVED, EXIT_LOST)


class StartupError(Exception):
    """The service cannot start; the message says why and what to do."""


class Phase(Enum):
    """Where the supervisor is in the service's life. `Supervisor._enter` is the one place that
    moves it on, and does what each move means."""

    STARTING = "starting"  # data dir, listening sockets, inboxes: nothing forked yet
    LOADING = "loading"  # shards (and image workers) forked, the shards loading their products; no HTTP yet
    SERVING = "serving"  # gunicorn runs; systemd was told READY=1
    # gunicorn and the image workers were told to stop: requests and jobs in hand finish; no new events
    CLOSING = "closing"
    DRAINING = "draining"  # each shard gets STOP behind its inbox, applies everything and exits
    STOPPED = "stopped"  # every shard has exited; the supervisor returns the exit code


def _die_with_parent(sig: int) -> None:
    """Ask Linux to send `sig` to this process when the supervisor dies (PR_SET_PDEATHSIG)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, sig, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: orphans are reaped by hand
        pass


class Supervisor:
    def __init__(self, settings, serve_frontend: Callable[[Frontend], int]) -> None:
        self.settings = settings
        self.serve_frontend = serve_frontend
        self.shard_pids: dict[int, int] = {}  # pid -> shard id
        self.phase = Phase.STARTING
        self.arbiter_pid = 0  # 0: not started yet, or exited
        self.exit_code = 0
        self.stopped: set[int] = set()
        self.unsaved: set[int] = set()  # shards that stopped without committing everything
        self.restart_at: dict[int, float] = {}
        self.recent_deaths: dict[int, list[float]] = {}
        self.arbiter_kill_at = 0.0
        self.stops_pending: dict[int, float] = {}  # shard -> when to log that it has not taken its STOP
        self.notify_socket = os.environ.pop("NOTIFY_SOCKET", None)
        self.shard_paths: list[str | None] = []
        self.next_extend = 0.0
        self.pending_signals: list[int] = []
        # The image worker pool (docs/images.md, "The pool"): pid -> worker index, and the same
        # restart bookkeeping as the shards'.
        self.image_pids: dict[int, int] = {}
        self.image_restart_at: dict[int, float] = {}
        self.image_deaths: dict[int, list[float]] = {}
        self.image_kill_at = 0.0
        self.images_temp_dir: str | None = None
        self.images = None  # ImageSettings, once the data dir is settled

    def _open_data(self) -> int:
        """Lock the data dir, settle the layout and check every shard file; returns the shard count.
        In the multi-host mode: check the database and the broker instead (productd.cluster.check)."""
        s = self.settings
        if s.broker:
            return self._open_cluster()
        if s.durability == "none":
            self.shard_paths = [None] * (s.shards or DEFAULT_SHARDS)
            return len(self.shard_paths)
        data = DataDir(s.data_dir)
        try:
            data.lock()
            layout, shards = data.prepare(s.shards, DEFAULT_SHARDS, s.reshard, shard_for)
            self.shard_paths = [data.shard_path(layout, i) for i in range(shards)]
            for path in self.shard_paths:
                if os.path.exists(path):
                    ShardFile.check(path)  # a bad file is named here, before anything forks
                recovery.read(recovery.path_for(path))
        except (DataDirError, StoreFileError, recovery.RecoveryFileError) as exc:
            raise StartupError(str(exc)) from None
        except OSError as exc:
            raise StartupError(f"data dir {data.path}: {exc}") from None
        self.data_dir = data  # holds the lock for as long as the supervisor lives
        log.info("data dir %s: %d shards, durability %s", data.path, shards, s.durability)
        return shards

    def _open_cluster(self) -> int:
        s = self.settings
        try:
            from productd.cluster import check
        except ImportError as exc:
            raise StartupError(str(exc)) from None
        try:
            shards = check.check(s)
        except check.ClusterConfigError as exc:
            raise StartupError(str(exc)) from None
        self.shard_paths = [None] * shards
        log.info("cluster %r: %d shards, role %s%s", s.cluster, shards, s.role,
                 f", owner host {s.owner_index} of {s.owner_hosts}" if s.role != "frontend" else "")
        return shards

    @property
    def local_shards(self) -> range:
        """The shards this host runs a process for: all of them, but none on a front-end host."""
        s = self.settings
        return range(0 if s.broker and s.role == "frontend" else s.shards)

    @property
    def serves_http(self) -> bool:
        return not (self.settings.broker and self.settings.role == "owner")

    # ---- start ---------------------------------------------------------------------------

    def _open_images(self) -> None:
        """Settle where the image pipeline keeps its job file and objects, and create the job file
        (so that a bad one stops the start here, and the front end always finds one to read)."""
        s = self.settings
        data_dir = None
        if s.durability == "none":
            # No data dir for the shards: the pipeline runs in a directory of its own that dies
            # with the service, like everything else in this mode (removed at stop).
            self.images_temp_dir = data_dir = tempfile.mkdtemp(prefix="productd-images-")
        self.images = image_settings.from_settings(s, data_dir=data_dir)
        from productd.images.jobs import JobQueue

        try:
            # Opened and closed before any fork: every process opens its own connection later.
            JobQueue(self.images.jobs_path, self.images.max_attempts, self.images.backoff()).close()
        except (OSError, sqlite3.Error) as exc:
            raise StartupError(f"image job file {self.images.jobs_path}: {exc}") from None
        log.info("image pipeline in %s: %d image workers", self.images.images_dir, s.image_workers)

    def run(self) -> int:
        try:
            return self._run()
        finally:
            if self.images_temp_dir:
                shutil.rmtree(self.images_temp_dir, ignore_errors=True)

    def _run(self) -> int:
        s = self.settings
        s.shards = self._open_data()
        if s.broker and s.role == "frontend":
            s.image_workers = 0  # the owner hosts run the image pipeline
        self._open_images()
        try:
            self.listeners = listen(s.bind, s.workers) if self.serves_http else []
        except ListenError as exc:
            raise StartupError(str(exc)) from None
        try:
            self.inboxes = [Inbox(s.inbox_bytes) for _ in range(s.shards)]
        except OSError as exc:
            raise StartupError(f"--inbox-bytes {s.inbox_bytes} x {s.shards} shards: {exc.strerror}") from None
        self.board = StatusBoard(s.shards)
        self.pool = PoolBoard(s.image_workers)
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        os.set_blocking(self._wake_r, False)
        signal.set_wakeup_fd(self._wake_w)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD):
            signal.signal(sig, self._on_signal)
        log.info(
            "starting %d shards, inboxes of %d bytes",
            s.shards, self.inboxes[0].capacity,
        )
        self.started_at = time.monotonic()
        for shard in self.local_shards:
            self._start_shard(shard)
        # After the shards (their inboxes are where results go), before gunicorn; forked by the
        # supervisor, so gunicorn's arbiter, which reaps every child it has, never sees them.
        for worker in range(s.image_workers):
            self._start_image_worker(worker)
        self._enter(Phase.LOADING)
        try:
            return self._loop()
        finally:
            self._kill_everything()

    def _on_signal(self, signum, frame) -> None:
        self.pending_signals.append(signum)

    def _fork(self, role: str, child: Callable[[], int]) -> int:
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid:
            return pid
        code = EXIT_SOFTWARE
        try:
            signal.set_wakeup_fd(-1)
            os.close(self._wake_r)
            os.close(self._wake_w)
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD):
                signal.signal(sig, signal.SIG_DFL)
            logs.set_role(role)
            code = child()
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        except BaseException:
            log.exception("%s failed", role)
        finally:
            logging.shutdown()
            os._exit(code)

    def _start_shard(self, shard: int) -> None:
        board = self.board
        board.set(shard, status.STATE, status.STARTING)
        pid = self._fork(f"shard-{shard}", lambda: self._shard_main(shard))
        self.shard_pids[pid] = shard
        board.set(shard, status.PID, pid)
        log.info("shard %d started as pid %d", shard, pid)

    def _shard_main(self, shard: int) -> int:
        # The terminal's Ctrl-C and systemd's SIGTERM reach the whole group; a shard stops
        # only when the supervisor's STOP reaches it through its inbox, behind everything else.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        _die_with_parent(signal.SIGKILL)
        for listener in self.listeners:
            listener.close()
        try:
            # Batch scheduling keeps a waking shard from preempting a front-end thread that holds the GIL.
            os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
        except (AttributeError, OSError):
            pass
        for index, inbox in enumerate(self.inboxes):
            if index != shard:
                for fd in inbox.read_fds():
                    os.close(fd)
        s = self.settings
        inbox = self.inboxes[shard]
        if s.broker:
            from productd.cluster.owner import ClusterShard

            return ClusterShard(shard, inbox.read_fd, self.board, s, images=self.images).run()
        return Shard(
            shard, inbox.read_fd, self.board,
            path=self.shard_paths[shard], durability=s.durability, commit_interval=s.commit_interval,
            bell_fd=inbox.bell_read_fd, apply_delay=0.0 if s.durability == "sync" else s.apply_delay,
            stop_timeout=s.graceful_timeout, recovery_reserve=max(RECOVERY_RESERVE_MIN, 2 * inbox.capacity),
            change_history=s.change_history, images=self.images,
        ).run()

    def _start_image_worker(self, worker: int) -> None:
        pool = self.pool
        pool.set(worker, pool_row.STATE, pool_row.STARTING)
        pid = self._fork(f"image-worker-{worker}", lambda: self._image_worker_main(worker))
        self.image_pids[pid] = worker
        pool.set(worker, pool_row.PID, pid)
        pool.set(worker, pool_row.STATE, pool_row.READY)
        log.info("image worker %d started as pid %d", worker, pid)

    def _image_worker_main(self, worker: int) -> int:
        # Like a shard: dies with the supervisor, and holds nothing it must not (a listener held
        # open would keep the port bound after a stop; an inbox read end would hide a dead
        # shard's EOF). It keeps the inbox write ends and bells: results go to the shards there.
        _die_with_parent(signal.SIGKILL)
        for listener in self.listeners:
            listener.close()
        for inbox in self.inboxes:
            for fd in inbox.read_fds():
                os.close(fd)
        from productd.images.worker import run_worker

        _record_metrics(self.pool, worker)
        name = f"image-worker-{worker}"
        sender = ResultSender([inbox.write_fd for inbox in self.inboxes],
                              [inbox.bell_write_fd for inbox in self.inboxes], self.settings.shards)
        # run_worker sets its own SIGTERM and SIGINT handlers (finish the job in hand, exit 0).
        return run_worker(self.images, name=name, sender=sender)

    def _start_frontend(self) -> None:
        frontend = Frontend(
            listener_fds=[listener.fileno() for listener in self.listeners],
            inbox_fds=[inbox.write_fd for inbox in self.inboxes],
            bell_fds=[inbox.bell_write_fd for inbox in self.inboxes],
            board=self.board,
            pool=self.pool,
            images=self.images,
        )

        def arbiter_main() -> int:
            os.setpgid(0, 0)  # Ctrl-C reaches the supervisor, which stops gunicorn gracefully
            _die_with_parent(signal.SIGTERM)
            for inbox in self.inboxes:
                for fd in inbox.read_fds():
                    os.close(fd)
            return self.serve_frontend(frontend)

        self.arbiter_pid = self._fork("arbiter", arbiter_main)
        for listener in self.listeners:
            listener.close()  # the arbiter has them now; a stopped arbiter frees the port
        log.info("gunicorn arbiter started as pid %d on %s", self.arbiter_pid, self.settings.bind)

    # ---- watch ---------------------------------------------------------------------------

    def _loop(self) -> int:
        poller = select.poll()
        poller.register(self._wake_r, select.POLLIN)
        while self.phase is not Phase.STOPPED:
            poller.poll(int(self._timeout() * 1000))
            try:
                while os.read(self._wake_r, 512):
                    pass
            except BlockingIOError:
                pass
            signals, self.pending_signals = self.pending_signals, []
            for sig in signals:
                if sig in (signal.SIGTERM, signal.SIGINT):
                    self._begin_stop(f"received {signal.Signals(sig).name}")
            self._reap()
            now = time.monotonic()
            for shard, when in list(self.restart_at.items()):
                if when <= now:
                    del self.restart_at[shard]
                    self._start_shard(shard)
                    if self.phase is Phase.DRAINING:
                        self.stops_pending[shard] = now + STOP_NAG_EVERY
            for worker, when in list(self.image_restart_at.items()):
                if when <= now:
                    del self.image_restart_at[worker]
                    self._start_image_worker(worker)
            self._step()
        return self.exit_code

    def _step(self) -> None:
        """What the current phase waits for, checked on every turn of the loop."""
        phase = self.phase
        if phase is Phase.LOADING:
            if self._all_ready():
                self._enter(Phase.SERVING)
            elif time.monotonic() >= self.next_extend:
                self._extend_start_timeout()
        elif phase is Phase.CLOSING:
            # The shards drain only once the image workers are gone too: every result a worker
            # sent is then in an inbox, ahead of the STOP.
            if not self.arbiter_pid and not self.image_pids:
                self._enter(Phase.DRAINING)
            if self.arbiter_pid and time.monotonic() > self.arbiter_kill_at:
                log.error("gunicorn did not stop within its graceful timeout; killing it")
                self._kill_group(self.arbiter_pid)
            if self.image_pids and time.monotonic() > self.image_kill_at:
                log.error("image worker(s) %s still busy after --graceful-timeout; killing them (their jobs' "
                          "leases expire and the jobs are taken again after the next start)",
                          sorted(self.image_pids.values()))
                for pid in self.image_pids:
                    self._kill_pid(pid)
                self.image_kill_at = time.monotonic() + 3600  # once
        if self.phase is Phase.DRAINING:
            self._deliver_stops()
            if len(self.stopped) == len(self.local_shards):
                self._enter(Phase.STOPPED)

    def _enter(self, phase: Phase) -> None:
        """Move to `phase`: every transition of the supervisor, and what it does, is here."""
        log.debug("phase %s -> %s", self.phase.value, phase.value)
        self.phase = phase
        if phase is Phase.SERVING:
            if self.serves_http:
                self._start_frontend()
            took = time.monotonic() - self.started_at
            log.info("ready: %d shards loaded in %.2fs", self.settings.shards, took)
            doing = f"serving on {self.settings.bind}" if self.serves_http else \
                f"owner host {self.settings.owner_index} of cluster {self.settings.cluster}"
            notify_systemd(f"READY=1\nSTATUS={doing}", self.notify_socket)
        elif phase is Phase.CLOSING:
            self.board.stopping = True
            notify_systemd("STOPPING=1\nSTATUS=draining", self.notify_socket)
            if self.arbiter_pid:
                os.kill(self.arbiter_pid, signal.SIGTERM)
                self.arbiter_kill_at = time.monotonic() + self.settings.graceful_timeout + 5
            # Each image worker finishes the job in hand and exits; none is restarted from now on.
            self.image_restart_at.clear()
            for pid in self.image_pids:
                self._signal_pid(pid, signal.SIGTERM)
            self.image_kill_at = time.monotonic() + self.settings.graceful_timeout
        elif phase is Phase.DRAINING:
            now = time.monotonic()
            self.stops_pending = {shard: now + STOP_NAG_EVERY for shard in self.local_shards
                                  if shard not in self.restart_at and shard not in self.stopped}
        elif phase is Phase.STOPPED:
            if self.unsaved:
                log.error("stopped with uncommitted changes in shard(s) %s: see each shard's line above",
                          sorted(self.unsaved))
            else:
                log.info("stopped: every shard drained its inbox")

    def _extend_start_timeout(self) -> None:
        """Loading a large store takes time: keep systemd from giving up on us meanwhile."""
        self.next_extend = time.monotonic() + EXTEND_EVERY
        loaded = sum(self.board.get(i, status.PRODUCTS) for i in range(self.settings.shards))
        notify_systemd(
            f"EXTEND_TIMEOUT_USEC={EXTEND_BY_USEC}\nSTATUS=loading: {loaded} products so far", self.notify_socket
        )

    def _timeout(self) -> float:
        if self.phase is Phase.LOADING:
            return STARTUP_POLL
        wait = 1.0
        if self.stops_pending:
            wait = STOP_RETRY
        restarts = [*self.restart_at.values(), *self.image_restart_at.values()]
        if restarts:
            wait = min(wait, max(0.0, min(restarts) - time.monotonic()))
        if self.phase is Phase.CLOSING and self.image_pids:
            wait = min(wait, max(0.0, self.image_kill_at - time.monotonic()))
        return wait

    def _all_ready(self) -> bool:
        return all(self.board.state(i) == status.READY for i in self.local_shards)

    def _reap(self) -> None:
        while True:
            try:
                pid, wstatus = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            how = _describe_exit(wstatus)
            if pid == self.arbiter_pid:
                self.arbiter_pid = 0
                self._kill_group(pid)
                if self.phase is Phase.SERVING:
                    log.error("gunicorn arbiter %s; stopping the service", how)
                    self._fail(1)
                    self._begin_stop("the HTTP server died")
                else:
                    log.info("gunicorn stopped (%s)", how)
            elif pid in self.shard_pids:
                self._shard_exited(self.shard_pids.pop(pid), pid, wstatus, how)
            elif pid in self.image_pids:
                self._image_worker_exited(self.image_pids.pop(pid), pid, how)

    def _image_worker_exited(self, worker: int, pid: int, how: str) -> None:
        pool = self.pool
        if self.phase in (Phase.CLOSING, Phase.DRAINING, Phase.STOPPED):
            pool.set(worker, pool_row.STATE, pool_row.STOPPED)
            log.info("image worker %d (pid %d) stopped (%s)", worker, pid, how)
            return
        # Nothing is lost with it: the job it held is taken again when its lease expires.
        pool.set(worker, pool_row.STATE, pool_row.DEAD)
        pool.add(worker, pool_row.RESTARTS, 1)
        now = time.monotonic()
        deaths = [t for t in self.image_deaths.get(worker, []) if now - t < 30] + [now]
        self.image_deaths[worker] = deaths
        delay = _restart_delay(deaths)
        log.error("image worker %d (pid %d) %s; restarting it%s. Its job in hand, if any, is taken again when "
                  "its lease (--image-lease) expires", worker, pid, how,
                  f" in {delay:.1f}s (it keeps dying)" if delay else "")
        self.image_restart_at[worker] = now + delay

    def _shard_exited(self, shard: int, pid: int, wstatus: int, how: str) -> None:
        board = self.board
        code = os.waitstatus_to_exitcode(wstatus)
        self.stops_pending.pop(shard, None)
        if self.phase is Phase.DRAINING and shard not in self.restart_at and code in (0, EXIT_SAVED, EXIT_LOST):
            # A shard that stopped but could not commit is not a crashed one: a restart would
            # reload its last commit over what it had applied. It said what it did with them.
            board.set(shard, status.STATE, status.STOPPED)
            self.stopped.add(shard)
            if code:
                self.unsaved.add(shard)
                self._fail(code)
            return
        board.set(shard, status.STATE, status.DEAD)
        if self.phase is Phase.LOADING:
            raise StartupError(f"shard {shard} (pid {pid}) {how} while loading; see its log above")
        board.add(shard, status.RESTARTS, 1)
        memory_only = self.settings.durability == "none"
        if memory_only:
            board.add(shard, status.STATE_LOST, 1)
        now = time.monotonic()
        deaths = [t for t in self.recent_deaths.get(shard, []) if now - t < 30] + [now]
        self.recent_deaths[shard] = deaths
        if self.phase is Phase.DRAINING and len(deaths) > DRAIN_DEATHS:
            # A shard that cannot even start (a full disk can refuse to open its file) would be
            # restarted until systemd kills us all: give up on it, say so, and exit non-zero.
            log.error("shard %d (pid %d) %s, its %d death in 30s while the service stops; giving up on it. What it "
                      "had not committed is in its recovery file if its stop saved one (see its lines above), "
                      "else lost since its last commit", shard, pid, how, len(deaths))
            self.stopped.add(shard)
            self.unsaved.add(shard)
            self._fail(1)
            return
        delay = _restart_delay(deaths)
        log.error(
            "shard %d (pid %d) %s; restarting it%s. %s; events still in its inbox will be applied by the new process",
            shard, pid, how, f" in {delay:.1f}s (it keeps dying)" if delay else "",
            "Its products were in memory only and are lost" if memory_only
            else "It reloads its products from its last commit",
        )
        self.restart_at[shard] = now + delay

    # ---- stop ----------------------------------------------------------------------------

    def _fail(self, code: int) -> None:
        if _EXIT_SEVERITY.index(code) > _EXIT_SEVERITY.index(self.exit_code):
            self.exit_code = code

    def _begin_stop(self, why: str) -> None:
        if self.phase in (Phase.CLOSING, Phase.DRAINING, Phase.STOPPED):
            log.info("%s; already stopping", why)
            return
        log.info("%s; stopping: gunicorn first, then each shard drains its inbox", why)
        self._enter(Phase.CLOSING)  # with no gunicorn yet (a stop while loading), the next step drains

    def _deliver_stops(self) -> None:
        """Hand each shard its STOP frame without waiting: a full inbox is tried again on the next
        turn, so the loop goes on reaping and restarting shards (one that died with a full inbox
        is restarted, drains it, and then takes its STOP)."""
        frame = protocol.stop_frame()
        now = time.monotonic()
        for shard, nag_at in list(self.stops_pending.items()):
            inbox = self.inboxes[shard]
            try:
                os.write(inbox.write_fd, frame)
            except BlockingIOError:
                ring(inbox.bell_write_fd)  # it may be dozing on the room we wait for
                if now >= nag_at:
                    log.warning("shard %d has not taken its stop message yet: its inbox is full", shard)
                    self.stops_pending[shard] = now + STOP_NAG_EVERY
                continue
            ring(inbox.bell_write_fd)
            del self.stops_pending[shard]

    def _signal_pid(self, pid: int, sig: int) -> None:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:  # exited; reaped on the next turn
            pass

    def _kill_pid(self, pid: int) -> None:
        self._signal_pid(pid, signal.SIGKILL)

    def _kill_group(self, pgid: int) -> None:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def _kill_everything(self) -> None:
        """Last resort on the way out: nothing of ours outlives the supervisor."""
        if self.arbiter_pid:
            self._kill_group(self.arbiter_pid)
        for pid in [*self.shard_pids, *self.image_pids]:
            try:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass
        signal.set_wakeup_fd(-1)


def _restart_delay(deaths: list[float]) -> float:
    """Seconds before a restart, after `deaths` in the last 30 s: at once for the first three,
    then doubling from 0.2 s to at most 5 s (a process that cannot start must not spin)."""
    return 0.0 if len(deaths) <= 3 else min(5.0, 0.1 * 2 ** (len(deaths) - 3))


def _record_metrics(pool: PoolBoard, worker: int) -> None:
    """In an image worker: count its outcomes on its pool row (actors/pool.py, `Recorder`).

    The worker's info records must reach the recorder whatever --log-level says, and reach the
    log only as --log-level says: the "productd.images" logger handles them itself (INFO and up)
    and forwards to the root handlers what the root's level lets through."""
    from productd.actors.pool import Recorder

    root = logging.getLogger()

    class ToRoot(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.levelno >= root.getEffectiveLevel():
                for handler in root.handlers:
                    if record.levelno >= handler.level:
                        handler.handle(record)

    images = logging.getLogger("productd.images")
    images.setLevel(min(logging.INFO, root.getEffectiveLevel()))
    images.propagate = False
    images.handlers = [Recorder(pool, worker), ToRoot()]


def _describe_exit(wstatus: int) -> str:
    if os.WIFSIGNALED(wstatus):
        sig = os.WTERMSIG(wstatus)
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = str(sig)
        return f"was killed by {name}"
    return f"exited with code {os.WEXITSTATUS(wstatus)}"

