"""Start, inspect and stop a real `productd serve` for black-box tests.

Everything here talks to the service the way a user or an operator would: a
subprocess, HTTP on 127.0.0.1, signals, and /proc. Nothing imports productd.

This is also the one copy of the helpers the bench needs for its servers (the environment, the
readiness poll, the /proc scans, VmRSS): bench/live.py loads this file rather than keeping its own.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import requests

READY_DEADLINE = 30.0
POLL = 0.05
# (connect, read) timeouts for every request a test makes: generous, only so a hang fails.
TIMEOUT = (5, 30)

PROBLEM_TYPE = "application/problem+json"
# Series /metrics has for every shard. This module imports nothing of productd, so that the tests
# check the service from outside, as its users see it: this list is written down here, as a user
# would, rather than imported, and tests/test_layout.py holds it equal to the one productd renders
# from (productd.http.metrics.PER_SHARD_SERIES). A series added there fails that test until it is
# added here too, and so becomes part of what every test of /metrics checks for each shard.
SHARD_SERIES = (
    "productd_events_received_total",
    "productd_events_applied_total",
    "productd_events_stale_total",
    "productd_reads_total",
    "productd_products",
    "productd_shard_restarts_total",
    "productd_shard_state_lost_total",
    "productd_commits_total",
    "productd_replies_dropped_total",
    "productd_image_results_dropped_total",
    "productd_inbox_skipped_bytes_total",
    "productd_inbox_bytes",
    "productd_shard_up",
    "productd_shard_heartbeat_age_seconds",
    "productd_shard_writes_refused",
    "productd_apply_delay_seconds_bucket",
    "productd_apply_delay_seconds_sum",
    "productd_apply_delay_seconds_count",
    "productd_events_rejected_total",
)
REPO_ROOT = Path(__file__).resolve().parent.parent


class ServiceError(AssertionError):
    """The service did not start, stop or behave as a process should; carries its log."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def uid(label: str = "t") -> str:
    """A product id prefix unique to one test (valid product id characters only)."""
    return f"{label}-{uuid.uuid4().hex[:12]}"


# ---------------------------------------------------------------- /proc helpers


def _read_stat(pid: int) -> tuple[int, int, str] | None:
    """(ppid, session id, state) of a process, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            data = f.read()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # comm may hold spaces and parentheses: split after the last ')'.
    rest = data[data.rindex(")") + 2 :].split()
    state, ppid, _pgrp, session = rest[0], int(rest[1]), int(rest[2]), int(rest[3])
    return ppid, session, state


def _all_pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def _live_pids(match) -> list[int]:
    """Live (non-zombie) processes whose (ppid, session id) satisfy `match`."""
    found = []
    for pid in _all_pids():
        st = _read_stat(pid)
        if st is not None and st[2] != "Z" and match(st[0], st[1]):
            found.append(pid)
    return sorted(found)


def session_pids(sid: int) -> list[int]:
    """Live (non-zombie) processes whose session id is `sid`."""
    return _live_pids(lambda _ppid, session: session == sid)


def children(pid: int) -> list[int]:
    """Live (non-zombie) direct children of `pid`."""
    return _live_pids(lambda ppid, _session: ppid == pid)


def alive(pid: int) -> bool:
    st = _read_stat(pid)
    return st is not None and st[2] != "Z"


def parent(pid: int) -> int | None:
    """The parent pid of a process, or None if it is gone."""
    st = _read_stat(pid)
    return None if st is None else st[0]


def descendants(pid: int) -> list[int]:
    """Every live process below `pid`, by parent links (gunicorn's arbiter has a process group of its own)."""
    tree: dict[int, list[int]] = {}
    for child in _live_pids(lambda _ppid, _session: True):
        ppid = parent(child)
        if ppid is not None:
            tree.setdefault(ppid, []).append(child)
    out, todo = [], [pid]
    while todo:
        for child in tree.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def kill_session(proc: subprocess.Popen) -> None:
    """SIGKILL every process of the session `proc` leads, and reap `proc` (safe to call more than once)."""
    sid = proc.pid
    for _ in range(100):
        pids = session_pids(sid)
        if proc.poll() is None and sid not in pids:
            pids.append(sid)
        if not pids:
            break
        for p in pids:
            try:
                os.kill(p, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        if proc.poll() is None:
            try:
                proc.wait(timeout=1)
            except subprocess.TimeoutExpired:
                pass
        time.sleep(POLL)


def session_leftovers(sid: int, settle: float = 10.0) -> list[int]:
    """Processes of session `sid` still alive after its leader exited.

    Orphans are re-parented and reaped asynchronously: give them `settle` seconds to go.
    """
    end = time.monotonic() + settle
    left = session_pids(sid)
    while left and time.monotonic() < end:
        time.sleep(POLL)
        left = session_pids(sid)
    return left


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise ServiceError(f"no VmRSS for pid {pid}")


# ---------------------------------------------------------------- HTTP helpers


def parse_metrics(text: str) -> dict[tuple[str, str], float]:
    """Prometheus text -> {(series name, shard label or ""): value}."""
    out: dict[tuple[str, str], float] = {}
    line_re = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)')
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = line_re.match(line)
        if not m:
            continue
        labels = m.group(2) or ""
        shard = re.search(r'shard="([^"]*)"', labels)
        out[(m.group(1), shard.group(1) if shard else "")] = float(m.group(3))
    return out


def raw_request(
    port: int,
    method: str,
    path: str,
    body: bytes | Iterable[bytes] | None = None,
    headers: dict[str, str] | None = None,
    chunked: bool = False,
    timeout: float = 30.0,
) -> tuple[int, dict[str, str], bytes]:
    """One request on a fresh connection with exactly the given path, body and headers.

    http.client (unlike requests) neither normalises the path nor adds a content type.
    A server may answer early and close while the body is still being sent (413):
    a failed send is ignored and the response read anyway.
    """
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.putrequest(method, path, skip_accept_encoding=True)
        hdrs = {"Connection": "close", **(headers or {})}
        if chunked:
            hdrs["Transfer-Encoding"] = "chunked"
        elif isinstance(body, (bytes, bytearray)) and "Content-Length" not in hdrs:
            hdrs["Content-Length"] = str(len(body))
        for k, v in hdrs.items():
            conn.putheader(k, v)
        conn.endheaders()
        try:
            if chunked:
                for chunk in body or ():
                    if chunk:
                        conn.send(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                conn.send(b"0\r\n\r\n")
            elif body:
                view = memoryview(bytes(body))
                for i in range(0, len(view), 65536):
                    conn.send(view[i : i + 65536])
        except (BrokenPipeError, ConnectionResetError):
            pass
        resp = conn.getresponse()
        data = resp.read()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, data
    finally:
        conn.close()


# ---------------------------------------------------------------- the service


def checkout_env(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """`base` (default: this process's environment) with the checkout under test first on
    PYTHONPATH, so that `python -m productd` runs this repository even where it is not installed."""
    env = dict(os.environ if base is None else base)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    return env


def service_env(durability: str = "none", extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment a productd under test gets: this process's without its PRODUCTD_* settings,
    unbuffered, the checkout first on PYTHONPATH, PRODUCTD_DURABILITY, and then `extra`."""
    env = checkout_env({k: v for k, v in os.environ.items() if not k.startswith("PRODUCTD_")})
    env["PYTHONUNBUFFERED"] = "1"
    env["PRODUCTD_DURABILITY"] = durability
    env.update(extra or {})
    return env


def wait_ready(
    port: int,
    proc: subprocess.Popen | None = None,
    deadline: float = READY_DEADLINE,
    path: str = "/readyz",
    statuses: Iterable[int] = (200,),
    log_tail: Callable[[], str] = str,
    name: str = "productd",
) -> bytes:
    """Poll GET `path` on 127.0.0.1:`port` until it answers one of `statuses`; return the body.

    Fails (ServiceError, with `log_tail()`) if `proc` exits first or the deadline passes.
    """
    wanted = set(statuses)
    end = time.monotonic() + deadline
    last = "no answer"
    while time.monotonic() < end:
        if proc is not None and proc.poll() is not None:
            raise ServiceError(f"{name} exited with {proc.returncode} before ready\n{log_tail()}")
        try:
            status, _, data = raw_request(port, "GET", path, timeout=5)
            if status in wanted:
                return data
            last = f"{status} {data[:500]!r}"
        except (OSError, http.client.HTTPException) as e:
            last = repr(e)
        time.sleep(POLL)
    raise ServiceError(f"{name}: GET {path} not {sorted(wanted)} within {deadline}s (last: {last})\n{log_tail()}")


class Productd:
    """One `python -m productd serve` in its own session, with its log under `log_dir`."""

    def __init__(
        self,
        log_dir: Path,
        shards: int = 4,
        workers: int = 2,
        extra_args: Iterable[str] = (),
        env: dict[str, str] | None = None,
    ) -> None:
        self.log_dir = Path(log_dir)
        self.shards = shards
        self.workers = workers
        self.extra_args = list(extra_args)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = self.log_dir / f"productd-{self.port}.log"
        self.env = env
        self.proc: subprocess.Popen | None = None
        self.initial_shard_pids: list[int] = []
        self.returncode: int | None = None

    # -- lifecycle

    @property
    def pid(self) -> int:
        assert self.proc is not None, "service not started"
        return self.proc.pid

    @property
    def argv(self) -> list[str]:
        return [
            sys.executable, "-m", "productd", "serve",
            "--bind", f"127.0.0.1:{self.port}",
            "--shards", str(self.shards),
            "--workers", str(self.workers),
            *self.extra_args,
        ]  # fmt: skip

    def start(self) -> Productd:
        # These tests are about the memory-only service (issue 2): state of a killed shard is lost.
        env = service_env("none", self.env)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")  # the child keeps its own copy of the descriptor
        try:
            self.proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env=env,
                cwd=self.log_dir,  # anything the service writes relative to its cwd stays in tmp
            )
        finally:
            log.close()
        try:
            self.wait_ready()
            self.initial_shard_pids = self.shard_pids()
            # /readyz answers as soon as one worker serves: wait for gunicorn to fork the rest.
            self.wait_for(lambda: len(self.worker_pids()) == self.workers,
                          f"{self.workers} gunicorn workers", READY_DEADLINE)
        except BaseException:
            self.kill()
            raise
        return self

    def wait_ready(self, deadline: float = READY_DEADLINE) -> dict:
        """Poll GET /readyz until 200; fail with the log if the process exits or the deadline passes."""
        return json.loads(wait_ready(self.port, self.proc, deadline, log_tail=self.log_tail))

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        """Signal the supervisor and wait for it; return its exit code (kills the session on timeout)."""
        assert self.proc is not None, "service not started"
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            self.returncode = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise ServiceError(
                f"productd did not exit within {timeout}s of signal {sig}\n{self.log_tail()}"
            ) from None
        return self.returncode

    def leftovers(self, settle: float = 10.0) -> list[int]:
        """Processes of the service's session still alive after the supervisor exited."""
        return session_leftovers(self.pid, settle)

    def assert_no_leftovers(self) -> None:
        left = self.leftovers()
        if left:
            desc = []
            for p in left:
                try:
                    cmd = Path(f"/proc/{p}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                except OSError:
                    cmd = "?"
                desc.append(f"{p}: {cmd}")
            raise ServiceError("processes left in the service's session: " + "; ".join(desc))

    def kill(self) -> None:
        """SIGKILL every process of the session (teardown; safe to call more than once)."""
        if self.proc is not None:
            kill_session(self.proc)

    # -- inspection

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, chars: int = 6000) -> str:
        text = self.log_text()
        return f"--- productd log {self.log_path} (tail) ---\n{text[-chars:]}"

    def readyz(self) -> requests.Response:
        return requests.get(self.url + "/readyz", timeout=TIMEOUT)

    def shard_pids(self) -> list[int]:
        """Pids of the shards by shard id, as /readyz reports them (200 or 503)."""
        body = self.readyz().json()
        return [s["pid"] for s in sorted(body["shards"], key=lambda s: s["id"])]

    def shard_info(self) -> list[dict]:
        return sorted(self.readyz().json()["shards"], key=lambda s: s["id"])

    def arbiter_pids(self) -> list[int]:
        """Children of the supervisor that are not shards (the gunicorn arbiter)."""
        shards = set(self.shard_pids())
        return [p for p in children(self.pid) if p not in shards and children(p)]

    def worker_pids(self) -> list[int]:
        """The gunicorn workers: children of the arbiter."""
        out: list[int] = []
        for arbiter in self.arbiter_pids():
            out.extend(children(arbiter))
        return sorted(out)

    def metrics(self) -> dict[tuple[str, str], float]:
        r = requests.get(self.url + "/metrics", timeout=TIMEOUT)
        assert r.status_code == 200, r.text
        return parse_metrics(r.text)

    def metric_sum(self, name: str) -> float:
        return sum(v for (n, _), v in self.metrics().items() if n == name)

    def wait_for(self, predicate, what: str, deadline: float = 30.0, poll: float = POLL):
        """Poll `predicate()` until it returns something truthy; fail (with the log) after `deadline`."""
        end = time.monotonic() + deadline
        last_exc: Exception | None = None
        while time.monotonic() < end:
            try:
                value = predicate()
                if value:
                    return value
            except (requests.RequestException, ValueError, KeyError) as e:
                last_exc = e
            time.sleep(poll)
        raise ServiceError(f"timed out after {deadline}s waiting for {what} (last error: {last_exc!r})\n"
                           f"{self.log_tail()}")

    # -- convenience HTTP

    def post(self, body, **kw) -> requests.Response:
        """POST /events with a JSON body on a new connection."""
        kw.setdefault("timeout", TIMEOUT)
        return requests.post(self.url + "/events", json=body, **kw)

    def post_raw(self, data: bytes, content_type: str | None, **kw) -> requests.Response:
        kw.setdefault("timeout", TIMEOUT)
        headers = kw.pop("headers", {})
        if content_type is not None:
            headers["Content-Type"] = content_type
        return requests.post(self.url + "/events", data=data, headers=headers, **kw)

    def get(self, product_id: str, **kw) -> requests.Response:
        kw.setdefault("timeout", TIMEOUT)
        return requests.get(f"{self.url}/products/{product_id}", **kw)

    def product(self, product_id: str) -> dict:
        r = self.get(product_id)
        assert r.status_code == 200, f"GET {product_id}: {r.status_code} {r.text}"
        return r.json()


def assert_problem(resp, status: int | None = None) -> dict:
    """The response is an RFC 9457 problem with our shape; returns the body."""
    if isinstance(resp, tuple):
        code, headers, data = resp
        ctype = headers.get("content-type", "")
    else:
        code, ctype, data = resp.status_code, resp.headers.get("Content-Type", ""), resp.content
    if status is not None:
        assert code == status, f"expected {status}, got {code}: {data[:500]!r}"
    assert code < 500 or code in (503, 504), f"5xx: {code} {data[:500]!r}"
    assert ctype.split(";")[0].strip() == PROBLEM_TYPE, f"content type {ctype!r} for {code}: {data[:300]!r}"
    body = json.loads(data)
    assert isinstance(body, dict), body
    assert isinstance(body.get("type"), str) and body["type"].startswith("urn:productd:problem:"), body
    assert isinstance(body.get("title"), str) and body["title"], body
    assert body.get("status") == code, body
    assert isinstance(body.get("detail"), str) and body["detail"], body
    if "errors" in body:
        assert isinstance(body["errors"], list) and body["errors"], body
        for err in body["errors"]:
            assert isinstance(err.get("pointer"), str), err
            assert isinstance(err.get("detail"), str) and err["detail"], err
    return body


def pointers(body: dict) -> set[str]:
    return {e["pointer"] for e in body.get("errors", [])}
