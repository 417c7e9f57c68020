"""Live-server helpers for the bench: start/stop servers on loopback, and drive load against them.

Servers: `productd serve` (via `sys.executable -m productd serve`) or a baseline under gunicorn (via
`sys.executable -m gunicorn bench.baselines.<name>:app`), each on a free 127.0.0.1 port. productd and
the ASGI ceiling run the same number of uvicorn workers; the WSGI ceiling (a reference row) and the
naive peer run under gthread as productd's front end did before issue 11 (see `gunicorn_settings`).

Load: `wrk` when it is on PATH (Lua scripts in bench/lua/, `--latency` output parsed), else a Python
client (processes x threads of keep-alive `http.client` connections). Every `LoadResult` says which
tool produced it. Only 127.0.0.1 is ever targeted; every run is bounded by a duration.

Environment knobs:
    BENCH_SECONDS      seconds per load run (default 5)
    BENCH_WARMUP       seconds of warm-up before each run, not measured (default 1)
    BENCH_CONNECTIONS  concurrent connections for single-request loads (default 32)
    BENCH_BULK_CONNECTIONS  concurrent connections for bulk loads (default 8)
    BENCH_WRK_THREADS  wrk threads (default 1: wrk on one thread keeps up and leaves the other core alone)
    BENCH_CLIENT       "wrk" or "python": force a load generator (default: wrk if installed)
    BENCH_WORKERS      worker processes of productd and the ASGI ceiling (default: productd's default,
                       read from productd.config when importable)
    BENCH_ASGI_WORKER_CLASS  the ASGI ceiling's worker class (default bench.baselines.ceiling.Worker,
                       uvicorn; `asgi` is gunicorn's own)
    BENCH_WSGI_WORKERS / BENCH_WSGI_THREADS  the gthread WSGI ceiling's (default 2 per CPU, 2 threads:
                       productd's defaults before issue 11)
    BENCH_PRODUCTD_ARGS  extra arguments for `productd serve` (shell-split)
"""

from __future__ import annotations

import dataclasses
import http.client
import importlib.util
import json
import math
import multiprocessing
import os
import random
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from productd.config import Settings

HOST = "127.0.0.1"
BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
LUA_DIR = BENCH_DIR / "lua"


def load_test_module(name: str):
    """tests/<name>.py, shared with the tests instead of kept twice: tests/service.py is the one
    copy of the helpers that start and inspect a real server (the checkout on PYTHONPATH, the
    readiness poll, the /proc scans, VmRSS), tests/frames.py writes frames into an inbox. The
    bench always runs from a checkout, so the files are there; tests/ is not a package (pytest
    puts the directory itself on sys.path, as `service`), so load each by path under a name of
    its own rather than put tests/ on the bench's sys.path."""
    spec = importlib.util.spec_from_file_location(f"productd_test_{name}", REPO_ROOT / "tests" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


service = load_test_module("service")
free_port = service.free_port
descendants = service.descendants

N_PRODUCTS = 10_000  # the GET and mix loads read these; the harness preloads them
BATCH = 1_000  # events per bulk request


def env_float(name: str, default: float) -> float:
    value = os.environ.get(name)
    return float(value) if value else default


def env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return int(value) if value else default


def bench_seconds() -> float:
    return env_float("BENCH_SECONDS", 5.0)


def product_id(i: int) -> str:
    """Same ids as bench/lua/common.lua."""
    return f"p{i:05d}"


# --------------------------------------------------------------------------- servers


def gunicorn_settings() -> dict:
    """Workers and worker classes of the servers.

    productd's worker count comes from productd.config.Settings; BENCH_* env vars win.
    """
    return {
        "workers": env_int("BENCH_WORKERS", Settings().workers),
        "asgi_worker_class": os.environ.get("BENCH_ASGI_WORKER_CLASS") or "bench.baselines.ceiling.Worker",
        "wsgi_workers": env_int("BENCH_WSGI_WORKERS", 2 * (os.cpu_count() or 1)),
        "wsgi_threads": env_int("BENCH_WSGI_THREADS", 2),
    }


class Server:
    """One server process tree on a free loopback port."""

    def __init__(
        self, name: str, argv: list[str], port: int, ready_path: str, ready_statuses: Iterable[int],
        env: dict[str, str] | None = None,
    ):
        self.name = name
        self.argv = argv
        self.extra_env = dict(env or {})
        self.port = port
        self.ready_path = ready_path
        self.ready_statuses = set(ready_statuses)
        self.proc: subprocess.Popen | None = None
        self.data_dir: str | None = None
        self.cleanup: list[Callable[[], object]] = []
        self.log = tempfile.NamedTemporaryFile(prefix=f"bench-{name}-", suffix=".log", delete=False)  # noqa: SIM115

    @property
    def base_url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def start(self, timeout: float = 60.0) -> Server:
        env = service.checkout_env({**os.environ, **self.extra_env})
        self.proc = subprocess.Popen(
            self.argv,
            cwd=REPO_ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            self.wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def wait_ready(self, timeout: float) -> None:
        service.wait_ready(self.port, self.proc, timeout, path=self.ready_path, statuses=self.ready_statuses,
                           log_tail=self.log_tail, name=self.name)

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(Path(self.log.name).read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM, wait, then SIGKILL whatever of the tree is left. Returns the exit code."""
        if self.proc is None:
            return None
        tree = descendants(self.proc.pid)
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        deadline = time.monotonic() + 5
        while any(service.alive(p) for p in tree) and time.monotonic() < deadline:
            time.sleep(0.05)
        for pid in tree:
            if service.alive(pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        self.log.close()
        for fn in self.cleanup:
            fn()
        self.cleanup.clear()
        return self.proc.returncode

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def productd_server(
    port: int | None = None,
    extra: Iterable[str] = (),
    settings: dict | None = None,
    data_dir: str | None = None,
) -> Server:
    """productd with its default durability, its data in `data_dir` (default: a fresh temporary directory,
    removed on stop; productd's own default ./data would pile up state across runs)."""
    s = settings or gunicorn_settings()
    port = port or free_port()
    owned = data_dir is None
    data_dir = data_dir or tempfile.mkdtemp(prefix="bench-productd-")
    argv = [
        sys.executable, "-m", "productd", "serve",
        "--bind", f"{HOST}:{port}",
        "--workers", str(s["workers"]),
        "--log-level", "warning",
        "--data-dir", data_dir,
        *shlex.split(os.environ.get("BENCH_PRODUCTD_ARGS", "")),
        *extra,
    ]  # fmt: skip
    server = Server("productd", argv, port, "/readyz", {200})
    server.data_dir = data_dir
    if owned:
        server.cleanup.append(lambda: shutil.rmtree(data_dir, ignore_errors=True))
    return server


def durability_of(server: Server) -> str:
    """The --durability a productd server runs with: its last --durability argument, else the env, else batch."""
    mode = os.environ.get("PRODUCTD_DURABILITY") or "batch"
    argv = server.argv
    for i, arg in enumerate(argv):
        if arg == "--durability" and i + 1 < len(argv):
            mode = argv[i + 1]
        elif arg.startswith("--durability="):
            mode = arg.partition("=")[2]
    return mode


def loadavg() -> tuple[float, float, float]:
    """1, 5 and 15-minute load averages: the bench shares 2 cores, so each result notes how busy they were."""
    try:
        with open("/proc/loadavg", encoding="ascii") as f:
            one, five, fifteen = f.read().split()[:3]
        return float(one), float(five), float(fifteen)
    except (OSError, ValueError):
        return math.nan, math.nan, math.nan


def _no_control_socket() -> list[str]:
    """gunicorn >= 25 opens a control socket under ~/.gunicorn; productd turns it off, so do the baselines."""
    try:
        from gunicorn.config import KNOWN_SETTINGS
    except ImportError:
        return []
    return ["--no-control-socket"] if any(s.name == "control_socket_disable" for s in KNOWN_SETTINGS) else []


def baseline_server(name: str, port: int | None = None, settings: dict | None = None) -> Server:
    """`ceiling` (ASGI, uvicorn), `ceiling_wsgi` (gthread) or `naive` (gthread, always one worker: its
    state is per process) under gunicorn."""
    s = dict(settings or gunicorn_settings())
    if name == "ceiling":
        workers, worker_class, threads = s["workers"], s["asgi_worker_class"], 1
    elif name == "naive":
        workers, worker_class, threads = 1, "gthread", 4
    else:
        workers, worker_class, threads = s["wsgi_workers"], "gthread", s["wsgi_threads"]
    port = port or free_port()
    # The listening sockets come from the config: one SO_REUSEPORT socket per worker, like productd.
    env = {"BENCH_BIND": f"{HOST}:{port}", "BENCH_BASELINE_WORKERS": str(workers)}
    argv = [
        sys.executable, "-m", "gunicorn",
        "--config", "python:bench.baselines.reuseport_conf",
        "--threads", str(threads),
        "--worker-class", worker_class,
        "--log-level", "warning",
        *_no_control_socket(),
        f"bench.baselines.{name}:app",
    ]  # fmt: skip
    # Any HTTP answer means the worker is up (naive answers 404 for an unknown product).
    return Server(name, argv, port, "/products/ready-probe", {200, 404}, env=env)


def productd_available() -> str | None:
    """None if `python -m productd serve --help` works, else the reason it does not."""
    try:
        out = subprocess.run(
            [sys.executable, "-m", "productd", "serve", "--help"],
            cwd=REPO_ROOT, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    except (OSError, subprocess.TimeoutExpired) as exc:
        return repr(exc)
    if out.returncode != 0:
        return f"`python -m productd serve --help` exited {out.returncode}: {(out.stderr or out.stdout)[-500:]}"
    return None


# --------------------------------------------------------------------------- small HTTP helpers


def request(
    method: str,
    port: int,
    path: str,
    body: bytes | None = None,
    headers: dict | None = None,
    timeout: float = 10.0,
) -> tuple[int, dict, bytes]:
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read()
    finally:
        conn.close()


def ndjson_events(ids: Iterable[str], seed: int = 0) -> bytes:
    rnd = random.Random(seed)
    return b"".join(
        b'{"product_id":"%s","price":%d.%02d,"stock":%d}\n'
        % (pid.encode(), rnd.randint(1, 999), rnd.randint(0, 99), rnd.randint(0, 1000))
        for pid in ids
    )


def post_ndjson(port: int, ids: list[str], chunk: int = BATCH, seed: int = 0, retries: int = 50) -> int:
    """POST events for ids in NDJSON chunks; resend what a 503 did not take. Returns events accepted."""
    accepted = 0
    for start in range(0, len(ids), chunk):
        part = ids[start : start + chunk]
        for _ in range(retries):
            status, _, body = request(
                "POST", port, "/events", ndjson_events(part, seed), {"Content-Type": "application/x-ndjson"}
            )
            if status == 202:
                accepted += len(part)
                break
            if status == 503:
                doc = json.loads(body)
                accepted += doc.get("accepted", 0)
                part = [part[i] for i in doc.get("not_accepted", range(len(part)))]
                time.sleep(0.05)
                continue
            raise RuntimeError(f"POST /events -> {status}: {body[:300]!r}")
        else:
            raise RuntimeError("POST /events kept answering 503")
    return accepted


def preload(server: Server, n: int = N_PRODUCTS, timeout: float = 60.0) -> None:
    """Create products p00000.. so GET loads hit existing products; wait until the last one reads back."""
    ids = [product_id(i) for i in range(n)]
    post_ndjson(server.port, ids)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:  # the naive peer applies asynchronously
        if all(request("GET", server.port, f"/products/{pid}")[0] == 200 for pid in (ids[0], ids[-1])):
            return
        time.sleep(0.05)
    raise TimeoutError(f"{server.name}: preloaded products not readable after {timeout}s")


# --------------------------------------------------------------------------- loads


@dataclasses.dataclass(frozen=True)
class Load:
    name: str
    lua: str
    events_per_write: int
    bulk: bool = False
    description: str = ""
    fixed_connections: int = 0  # this many whatever BENCH_CONNECTIONS says
    batch: int = BATCH  # events per bulk request, or ids per multi-get

    def connections(self) -> int:
        if self.fixed_connections:
            return self.fixed_connections
        return env_int("BENCH_BULK_CONNECTIONS", 8) if self.bulk else env_int("BENCH_CONNECTIONS", 32)


LOADS: dict[str, Load] = {
    load.name: load
    for load in (
        Load("post_single", "post_single.lua", 1, description="POST /events, one event per request"),
        Load("post_bulk_json", "post_bulk_json.lua", BATCH, True, "POST /events, JSON array of 1,000 events"),
        Load("post_bulk_ndjson", "post_bulk_ndjson.lua", BATCH, True, "POST /events, 1,000 NDJSON lines"),
        Load("get", "get.lua", 0, description="GET /products/{id} over 10,000 products"),
        Load("get_c256", "get.lua", 0, description="GET /products/{id}, 256 connections", fixed_connections=256),
        Load("mix", "mix.lua", 1, description="90% GET / 10% POST one event"),
    )
}


@dataclasses.dataclass
class LoadResult:
    server: str
    load: str
    tool: str
    connections: int
    seconds: float
    requests: int
    writes: int  # requests that were POSTs (wrk: counted when sent)
    events_per_write: int
    non_2xx: int
    socket_errors: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    reads_sent: int = 0

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    @property
    def events_per_s(self) -> float:
        sent = self.writes + self.reads_sent
        share = self.writes / sent if sent else 0.0
        return self.rps * share * self.events_per_write

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["rps"] = round(self.rps, 1)
        d["events_per_s"] = round(self.events_per_s, 1)
        return d


def load_tool() -> str:
    forced = os.environ.get("BENCH_CLIENT")
    if forced:
        if forced not in ("wrk", "python"):
            raise ValueError(f"BENCH_CLIENT must be wrk or python, not {forced!r}")
        return forced
    return "wrk" if shutil.which("wrk") else "python"


def run_load(
    server: Server | int,
    load: Load | str,
    seconds: float | None = None,
    server_name: str = "",
    warmup: float | None = None,
) -> LoadResult:
    """Drive one load against a server for `seconds` (after an unmeasured warm-up) and return the result."""
    if isinstance(load, str):
        load = LOADS[load]
    port = server if isinstance(server, int) else server.port
    name = server_name or (server.name if isinstance(server, Server) else str(port))
    seconds = bench_seconds() if seconds is None else seconds
    warmup = env_float("BENCH_WARMUP", 1.0) if warmup is None else warmup
    tool = load_tool()
    runner = _run_wrk if tool == "wrk" else _run_python
    if warmup > 0:
        runner(port, load, warmup, name)
    return runner(port, load, seconds, name)


# --------------------------------------------------------------------------- wrk

_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m|h)", text.strip())
    if not m:
        raise ValueError(f"not a wrk duration: {text!r}")
    return float(m.group(1)) * _UNITS[m.group(2)]


def parse_wrk(output: str) -> dict:
    """Parse `wrk --latency` text output (plus the WRKJSON line our Lua scripts print in done())."""
    out: dict = {}
    m = re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m)", output)
    if m:
        out["requests"] = int(m.group(1))
        out["seconds"] = _ms(m.group(2) + m.group(3)) / 1e3
    m = re.search(r"Requests/sec:\s*([\d.]+)", output)
    if m:
        out["rps"] = float(m.group(1))
    dist = output.split("Latency Distribution", 1)[1] if "Latency Distribution" in output else ""
    for pct, value in re.findall(r"^\s*(50|75|90|99)%\s+(\S+)", dist, re.M):
        out[f"p{pct}_ms"] = _ms(value)
    m = re.search(r"Non-2xx or 3xx responses:\s*(\d+)", output)
    out["non_2xx"] = int(m.group(1)) if m else 0
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output)
    out["socket_errors"] = sum(map(int, m.groups())) if m else 0
    m = re.search(r"^\s*Latency\s+\S+\s+\S+\s+(\S+)", output, re.M)
    if m:
        out["max_ms"] = _ms(m.group(1))
    m = re.search(r"^WRKJSON (\{.*\})$", output, re.M)
    if m:
        out["json"] = json.loads(m.group(1))
    return out


def _run_wrk(port: int, load: Load, seconds: float, name: str) -> LoadResult:
    connections = load.connections()
    threads = max(1, min(env_int("BENCH_WRK_THREADS", 1), connections))
    argv = [
        "wrk", "--latency",
        "-t", str(threads), "-c", str(connections), "-d", f"{max(1, round(seconds))}s",
        "--timeout", "10s",
        "-s", str(LUA_DIR / load.lua),
        f"http://{HOST}:{port}/",
        "--", str(N_PRODUCTS), str(load.batch),
    ]  # fmt: skip
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60)
    if proc.returncode != 0:
        raise RuntimeError(f"wrk failed ({proc.returncode}): {proc.stderr or proc.stdout}")
    p = parse_wrk(proc.stdout)
    j = p.get("json", {})
    if "requests" not in p or "p99_ms" not in p:
        raise RuntimeError(f"could not parse wrk output:\n{proc.stdout}")
    return LoadResult(
        server=name,
        load=load.name,
        tool="wrk",
        connections=connections,
        seconds=p["seconds"],
        requests=p["requests"],
        writes=j.get("writes", p["requests"] if load.events_per_write else 0),
        reads_sent=j.get("reads", 0 if load.events_per_write else p["requests"]),
        events_per_write=load.events_per_write,
        non_2xx=p["non_2xx"],
        socket_errors=p["socket_errors"],
        p50_ms=p["p50_ms"],
        p90_ms=p.get("p90_ms", math.nan),
        p99_ms=p["p99_ms"],
        max_ms=p.get("max_ms", math.nan),
    )


# --------------------------------------------------------------------------- Python fallback client


def _request_maker(load_name: str, seed: int) -> Callable[[], tuple[str, str, bytes | None, dict, bool]]:
    """Return a function producing (method, path, body, headers, is_write), mirroring bench/lua/."""
    rnd = random.Random(seed)
    json_h = {"Content-Type": "application/json"}
    ndjson_h = {"Content-Type": "application/x-ndjson"}

    def event(i: int) -> bytes:
        fields = (product_id(i).encode(), rnd.randint(1, 999), rnd.randint(0, 99), rnd.randint(0, 1000))
        return b'{"product_id":"%s","price":%d.%02d,"stock":%d}' % fields

    if load_name in ("post_bulk_json", "post_bulk_ndjson"):
        start = seed * BATCH
        groups = [[event((start + b * BATCH + k) % N_PRODUCTS) for k in range(BATCH)] for b in range(10)]
        if load_name == "post_bulk_json":
            bodies, headers = [b"[" + b",".join(g) + b"]" for g in groups], json_h
        else:
            bodies, headers = [b"\n".join(g) + b"\n" for g in groups], ndjson_h
        counter = iter(range(1 << 62))
        return lambda: ("POST", "/events", bodies[next(counter) % len(bodies)], headers, True)
    if load_name == "post_single":
        return lambda: ("POST", "/events", event(rnd.randrange(N_PRODUCTS)), json_h, True)
    if load_name in ("get", "get_c256"):
        return lambda: ("GET", f"/products/{product_id(rnd.randrange(N_PRODUCTS))}", None, {}, False)
    if load_name == "get_many":
        return lambda: ("GET", "/products?ids=" + ",".join(product_id(rnd.randrange(N_PRODUCTS)) for _ in range(100)),
                        None, {}, False)
    if load_name == "mix":

        def mixed():
            i = rnd.randrange(N_PRODUCTS)
            if rnd.random() < 0.1:
                return ("POST", "/events", event(i), json_h, True)
            return ("GET", f"/products/{product_id(i)}", None, {}, False)

        return mixed
    raise ValueError(load_name)


def _client_process(args: tuple) -> dict:
    port, load_name, connections, seconds, seed, start_at = args
    lock = threading.Lock()
    totals = {"requests": 0, "writes": 0, "reads": 0, "non_2xx": 0, "errors": 0, "lat": []}
    end_at = start_at + seconds

    def worker(k: int) -> None:
        make = _request_maker(load_name, seed * 1000 + k)
        conn = http.client.HTTPConnection(HOST, port, timeout=10)
        lat: list[float] = []
        n = writes = non_2xx = errors = 0
        while time.time() < start_at:
            time.sleep(0.001)
        while time.time() < end_at:
            method, path, body, headers, is_write = make()
            t0 = time.perf_counter()
            try:
                conn.request(method, path, body=body, headers=headers)
                resp = conn.getresponse()
                resp.read()
                status = resp.status
            except (OSError, http.client.HTTPException):
                errors += 1
                conn.close()
                conn = http.client.HTTPConnection(HOST, port, timeout=10)
                continue
            lat.append(time.perf_counter() - t0)
            n += 1
            writes += is_write
            non_2xx += not 200 <= status < 300
        conn.close()
        with lock:
            totals["requests"] += n
            totals["writes"] += writes
            totals["reads"] += n - writes
            totals["non_2xx"] += non_2xx
            totals["errors"] += errors
            totals["lat"].extend(lat)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(connections)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return totals


def _run_python(port: int, load: Load, seconds: float, name: str) -> LoadResult:
    connections = load.connections()
    procs = max(1, min(env_int("BENCH_CLIENT_PROCESSES", os.cpu_count() or 1), connections))
    share = [connections // procs + (i < connections % procs) for i in range(procs)]
    start_at = time.time() + 0.5
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(procs) as pool:
        parts = pool.map(_client_process, [(port, load.name, share[i], seconds, i, start_at) for i in range(procs)])
    lat = sorted(x for p in parts for x in p["lat"])

    def pct(q: float) -> float:
        return lat[min(len(lat) - 1, int(q / 100 * len(lat)))] * 1e3 if lat else math.nan

    requests = sum(p["requests"] for p in parts)
    return LoadResult(
        server=name,
        load=load.name,
        tool="python",
        connections=connections,
        seconds=seconds,
        requests=requests,
        writes=sum(p["writes"] for p in parts),
        reads_sent=sum(p["reads"] for p in parts),
        events_per_write=load.events_per_write,
        non_2xx=sum(p["non_2xx"] for p in parts),
        socket_errors=sum(p["errors"] for p in parts),
        p50_ms=pct(50),
        p90_ms=pct(90),
        p99_ms=pct(99),
        max_ms=lat[-1] * 1e3 if lat else math.nan,
    )


if __name__ == "__main__":  # quick manual check: python -m bench.live ceiling get
    which, load_name = (sys.argv[1:3] + ["ceiling", "get"][len(sys.argv[1:3]) :])[:2]
    srv = productd_server() if which == "productd" else baseline_server(which)
    with srv:
        preload(srv)
        print(json.dumps(run_load(srv, load_name).as_dict(), indent=2))
