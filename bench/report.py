"""Collects the bench results of one pytest session and turns them into the ratio table.

The HTTP runs (test_http.py) and the memory run (test_memory.py) record here; bench/conftest.py
prints the table at the end of the session and writes bench/results/latest.md and latest.json.
Targets from issue 4 are reported as pass/miss, never asserted: absolute numbers on a shared
2-core machine wander, and only the ratios measured in one session mean anything.
"""

from __future__ import annotations

import json
import math
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

from bench import live

RESULTS_DIR = live.BENCH_DIR / "results"
SERVERS = ("ceiling", "naive", "productd")

http_results: dict[tuple[str, str], live.LoadResult] = {}  # (server, load) -> result
extra: dict[str, dict] = {}  # section name -> facts (memory, restart, ...)
meta: dict = {}


def record_http(result: live.LoadResult) -> None:
    http_results[(result.server, result.load)] = result


def record(section: str, **facts) -> None:
    extra.setdefault(section, {}).update(facts)


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or not b or math.isnan(a) or math.isnan(b):
        return None
    return a / b


def _get(server: str, load: str, attr: str) -> float | None:
    r = http_results.get((server, load))
    return None if r is None else float(getattr(r, attr))


def targets() -> list[dict]:
    """Issue 4's targets, each with its measured value and pass/miss (None when not measured)."""
    rows = []

    def add(name: str, value: float | None, goal: str, ok: bool | None) -> None:
        rows.append({"target": name, "value": value, "goal": goal, "pass": ok})

    for load, goal in (("get", 0.75), ("post_single", 0.85)):
        r = _ratio(_get("productd", load, "rps"), _get("ceiling", load, "rps"))
        add(f"{load} req/s productd/ceiling", r, f">= {goal}", None if r is None else r >= goal)
    ceiling_post = _get("ceiling", "post_single", "rps")
    for load in ("post_bulk_json", "post_bulk_ndjson"):
        r = _ratio(_get("productd", load, "events_per_s"), ceiling_post)
        add(f"{load} events/s / ceiling post_single req/s", r, ">= 15", None if r is None else r >= 15)
    for load in ("get", "post_single"):
        r = _ratio(_get("productd", load, "rps"), _get("naive", load, "rps"))
        add(f"{load} req/s productd/naive", r, ">= 1.5", None if r is None else r >= 1.5)
    conns = http_results.get(("productd", "get"))
    r = _ratio(_get("productd", "get", "p99_ms"), _get("ceiling", "get", "p99_ms"))
    label = f"get p99 productd/ceiling ({conns.connections if conns else '?'} connections)"
    add(label, r, "<= 1.5", None if r is None else r <= 1.5)
    mem = extra.get("memory", {})
    per = mem.get("bytes_per_product")
    add("shard RSS growth, bytes/product (1M products, 12-char ids)", per, "<= 300",
        None if per is None else per <= 300)  # fmt: skip
    add("killed shard serves again, seconds", mem.get("restart_seconds"), "reported", None)
    add("start with 1M products, seconds", mem.get("startup_seconds"), "reported", None)
    return rows


def _fmt(v: float | None, digits: int = 2) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    if isinstance(v, int):
        return f"{v:,}"
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    return f"{v:.{digits}f}"


def markdown() -> str:
    loads = [name for name in live.LOADS if any((s, name) in http_results for s in SERVERS)]
    tools = sorted({r.tool for r in http_results.values()})
    lines = [
        "# productd bench: latest run",
        "",
        f"- when: {meta.get('when', '?')}; host: {meta.get('host', '?')}, {os.cpu_count()} CPUs; "
        f"git: {meta.get('git', '?')}",
        f"- command: `{meta.get('command', '?')}`",
        f"- load generator: {', '.join(tools) or 'none ran'}; {meta.get('seconds', '?')} s per run after "
        f"{meta.get('warmup', '?')} s warm-up; connections: {meta.get('connections', '?')} "
        f"(bulk: {meta.get('bulk_connections', '?')})",
        f"- gunicorn for all three servers: {meta.get('gunicorn', '?')} (naive: 1 worker)",
        "",
    ]
    if loads:
        lines += [
            "| load | metric | ceiling | naive | productd | productd/ceiling | productd/naive |",
            "|---|---|---:|---:|---:|---:|---:|",
        ]
        for load in loads:
            metrics = [("req/s", "rps", 0), ("p50 ms", "p50_ms", 2), ("p99 ms", "p99_ms", 2), ("non-2xx", "non_2xx", 0)]
            if live.LOADS[load].events_per_write:
                metrics.insert(1, ("events/s", "events_per_s", 0))
            for label, attr, digits in metrics:
                c, n, p = (_get(s, load, attr) for s in SERVERS)
                lines.append(
                    f"| {load} | {label} | {_fmt(c, digits)} | {_fmt(n, digits)} | {_fmt(p, digits)} | "
                    f"{_fmt(_ratio(p, c), 3)} | {_fmt(_ratio(p, n), 3)} |"
                )
        lines.append("")
    lines += ["## Targets (issue 4; reported, not asserted)", "", "| target | value | goal | result |",
              "|---|---:|---|---|"]  # fmt: skip
    for t in targets():
        verdict = {True: "pass", False: "MISS", None: "reported" if t["goal"] == "reported" else "not run"}[t["pass"]]
        lines.append(f"| {t['target']} | {_fmt(t['value'], 3)} | {t['goal']} | {verdict} |")
    for section, facts in extra.items():
        lines += ["", f"## {section}", ""]
        lines += [f"- {k}: {_fmt(v) if isinstance(v, (int, float)) else v}" for k, v in facts.items()]
    return "\n".join(lines) + "\n"


def as_json() -> dict:
    return {
        "meta": meta,
        "http": [r.as_dict() for r in http_results.values()],
        "targets": targets(),
        **extra,
    }


def fill_meta() -> None:
    try:
        git = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=live.REPO_ROOT, capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain"], cwd=live.REPO_ROOT, capture_output=True, text=True, timeout=10
        ).stdout.strip()
        git += " (+ uncommitted changes)" if dirty else ""
    except (OSError, subprocess.TimeoutExpired):
        git = "?"
    env = " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(os.environ.items()) if k.startswith("BENCH_"))
    prog = os.path.basename(sys.argv[0]) if sys.argv else "pytest"
    prog = "python -m pytest" if prog == "__main__.py" else prog
    argv = [prog, *sys.argv[1:]]
    meta.update(
        when=time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        host=platform.node(),
        git=git or "?",
        command=" ".join(filter(None, [env, argv[0], shlex.join(argv[1:])])),
        seconds=live.bench_seconds(),
        warmup=live.env_float("BENCH_WARMUP", 1.0),
        connections=live.env_int("BENCH_CONNECTIONS", 32),
        bulk_connections=live.env_int("BENCH_BULK_CONNECTIONS", 8),
        gunicorn=live.gunicorn_settings(),
        load_generator=live.load_tool(),
    )


def write() -> Path | None:
    """Write results/latest.md and latest.json; None when nothing was measured.

    A session without the HTTP runs (say `pytest bench/test_store.py`) writes partial.md/.json instead,
    so it does not overwrite the last full table.
    """
    if not http_results and not extra:
        return None
    RESULTS_DIR.mkdir(exist_ok=True)
    md = RESULTS_DIR / ("latest.md" if http_results else "partial.md")
    md.write_text(markdown())
    md.with_suffix(".json").write_text(json.dumps(as_json(), indent=2, default=str) + "\n")
    return md
