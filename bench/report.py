"""Collects the bench results of one pytest session and turns them into the ratio table.

The HTTP runs (test_http.py), the memory run (test_memory.py) and the durability runs
(test_durability.py) record here; bench/conftest.py prints the table at the end of the session and
writes bench/results/latest.md and latest.json.

The durability section (issue 3) is self-contained: the three modes are measured against each other
in one session, and the section carries its own date, command and load average. A session that
measures it without the HTTP runs (`pytest bench/test_durability.py`) writes partial.md/.json as
usual and also replaces just that section in latest.md/.json; a full session without it carries the
previous durability section over.
Targets from issue 11 are reported as pass/miss, never asserted: absolute numbers on a shared
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
SERVERS = ("ceiling", "ceiling_wsgi", "naive", "productd")

http_results: dict[tuple[str, str], live.LoadResult] = {}  # (server, load) -> result
extra: dict[str, dict] = {}  # section name -> facts (memory, restart, ...)
meta: dict = {}

DURABILITY_MODES = ("none", "batch", "sync")
DURABILITY_LOADS = ("post_single", "post_bulk_ndjson")
DURABILITY_HEADING = "## durability (issue 3)"
durability_runs: dict[tuple[str, str], dict] = {}  # (mode, load) -> LoadResult.as_dict() + mode + load average
durability_storage: dict = {}  # bytes per product on disk and in memory, start-up time
durability_meta: dict = {}


def record_http(result: live.LoadResult) -> None:
    http_results[(result.server, result.load)] = result


def record(section: str, **facts) -> None:
    extra.setdefault(section, {}).update(facts)


def _durability_meta() -> None:
    if not durability_meta:
        durability_meta.update(
            when=time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            command=meta.get("command", "?"),
            seconds=meta.get("seconds"),
            warmup=meta.get("warmup"),
            gunicorn=meta.get("gunicorn"),
        )


def record_durability(mode: str, result: live.LoadResult, loadavg_1min: float) -> None:
    """One load run against `productd serve --durability mode`."""
    _durability_meta()
    durability_runs[(mode, result.load)] = {**result.as_dict(), "durability": mode, "loadavg_1min": loadavg_1min}


def record_durability_storage(**facts) -> None:
    _durability_meta()
    durability_storage.update(facts)


def durability_doc() -> dict | None:
    """This session's durability section as JSON, or None if it was not measured."""
    if not durability_runs and not durability_storage:
        return None
    return {"meta": dict(durability_meta), "runs": list(durability_runs.values()), "storage": dict(durability_storage)}


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

    for load, goal in (("get", 0.65), ("post_single", 0.85)):
        r = _ratio(_get("productd", load, "rps"), _get("ceiling", load, "rps"))
        add(f"{load} req/s productd/ceiling", r, f">= {goal}", None if r is None else r >= goal)
    r = _ratio(_get("productd", "get", "rps"), _get("ceiling_wsgi", "get", "rps"))
    add("get req/s productd/ceiling_wsgi", r, ">= 2.5", None if r is None else r >= 2.5)
    ceiling_post = _get("ceiling", "post_single", "rps")
    for load in ("post_bulk_json", "post_bulk_ndjson"):
        r = _ratio(_get("productd", load, "events_per_s"), ceiling_post)
        add(f"{load} events/s / ceiling post_single req/s", r, ">= 20", None if r is None else r >= 20)
    for load in ("get", "get_c256"):
        conns = http_results.get(("productd", load))
        r = _ratio(_get("productd", load, "p99_ms"), _get("ceiling", load, "p99_ms"))
        label = f"{load} p99 productd/ceiling ({conns.connections if conns else '?'} connections)"
        add(label, r, "<= 2", None if r is None else r <= 2)
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


def durability_markdown(doc: dict) -> str:
    """The durability section from its JSON form (this session's, or one carried over from latest.json)."""
    m, st = doc.get("meta", {}), doc.get("storage", {})
    runs = {(r["durability"], r["load"]): r for r in doc.get("runs", [])}
    lines = [DURABILITY_HEADING, "", f"- when: {m.get('when', '?')}; command: `{m.get('command', '?')}`"]
    if runs:
        tools = ", ".join(sorted({r["tool"] for r in runs.values()}))
        loads = [r["loadavg_1min"] for r in runs.values() if r.get("loadavg_1min") is not None]
        busy = f"{min(loads):.2f} to {max(loads):.2f}" if loads else "?"
        lines += [
            f"- load generator: {tools}; {m.get('seconds', '?')} s per run after {m.get('warmup', '?')} s warm-up; "
            f"gunicorn: {m.get('gunicorn', '?')}; 1-minute load average before the runs: {busy}",
            "- each mode is its own `productd serve --durability MODE` with a fresh temporary `--data-dir`, "
            "preloaded with 10,000 products; per load the three modes run back to back",
            "- ratios are against `batch` (the default); for latency, lower is better. Issue 3 asks `sync` to "
            'stay "within a small factor of batch" under many concurrent clients: see sync/batch events/s',
            "",
            "| load | metric | none | batch | sync | sync/batch | none/batch |",
            "|---|---|---:|---:|---:|---:|---:|",
        ]
        for load in DURABILITY_LOADS:
            present = [runs[(mode, load)] for mode in DURABILITY_MODES if (mode, load) in runs]
            if not present:
                continue
            label = f"{load} ({present[0]['connections']} conn)"
            metrics = [("events/s", "events_per_s", 0), ("p50 ms", "p50_ms", 2), ("p99 ms", "p99_ms", 2),
                       ("non-2xx", "non_2xx", 0)]  # fmt: skip
            if present[0]["events_per_write"] != 1:
                metrics.insert(1, ("req/s", "rps", 0))
            for name, key, digits in metrics:
                none_, batch, sync = (runs.get((mode, load), {}).get(key) for mode in DURABILITY_MODES)
                lines.append(
                    f"| {label} | {name} | {_fmt(none_, digits)} | {_fmt(batch, digits)} | {_fmt(sync, digits)} | "
                    f"{_fmt(_ratio(sync, batch), 3)} | {_fmt(_ratio(none_, batch), 3)} |"
                )
    if st:
        n = st.get("products")
        count = _fmt(n) if isinstance(n, int) else "?"
        rows = [
            (f"products loaded (12-character ids, price and stock; durability {st.get('durability', '?')})", n),
            ("bytes/product on disk (shard files after a graceful stop / products)", st.get("disk_bytes_per_product")),
            ("shard files, total bytes", st.get("disk_shard_bytes")),
            ("shard files (one per shard)", st.get("disk_shard_files")),
            ("of which -wal/-shm left after the stop (0: folded into the file)", st.get("disk_wal_shm_bytes")),
            ("rows in the shard files", st.get("disk_products")),
            ("bytes/product in memory (shards' RSS growth / products)", st.get("bytes_per_product")),
            (f"start with {count} products: spawn until /readyz 200, seconds", st.get("startup_seconds")),
            ("products loaded by that start", st.get("products_after_startup")),
            ("exit code of the graceful stop before sizing the files", st.get("final_stop_exit_code")),
            ("1-minute load average before this run", st.get("loadavg_1min")),
        ]
        lines += ["", "| storage and start-up | value |", "|---|---:|"]
        lines += [f"| {label} | {_fmt(v) if isinstance(v, (int, float)) else v if v is not None else 'n/a'} |"
                  for label, v in rows]  # fmt: skip
    return "\n".join(lines) + "\n"


def markdown(durability: dict | None = None) -> str:
    """The session's table; `durability` is a durability section to show when this session did not measure one."""
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
        f"- gunicorn: {meta.get('gunicorn', '?')} (productd and ceiling: uvicorn workers; ceiling_wsgi: gthread; "
        "naive: 1 gthread worker, 4 threads)",
        "",
    ]
    if loads:
        lines += [
            "| load | metric | ceiling | ceiling_wsgi | naive | productd | productd/ceiling | productd/naive |",
            "|---|---|---:|---:|---:|---:|---:|---:|",
        ]
        for load in loads:
            metrics = [("req/s", "rps", 0), ("p50 ms", "p50_ms", 2), ("p99 ms", "p99_ms", 2), ("non-2xx", "non_2xx", 0)]
            if live.LOADS[load].events_per_write:
                metrics.insert(1, ("events/s", "events_per_s", 0))
            for label, attr, digits in metrics:
                c, w, n, p = (_get(s, load, attr) for s in SERVERS)
                lines.append(
                    f"| {load} | {label} | {_fmt(c, digits)} | {_fmt(w, digits)} | {_fmt(n, digits)} | "
                    f"{_fmt(p, digits)} | "
                    f"{_fmt(_ratio(p, c), 3)} | {_fmt(_ratio(p, n), 3)} |"
                )
        lines.append("")
    lines += ["## Targets (issue 11; reported, not asserted)", "", "| target | value | goal | result |",
              "|---|---:|---|---|"]  # fmt: skip
    for t in targets():
        verdict = {True: "pass", False: "MISS", None: "reported" if t["goal"] == "reported" else "not run"}[t["pass"]]
        lines.append(f"| {t['target']} | {_fmt(t['value'], 3)} | {t['goal']} | {verdict} |")
    for section, facts in extra.items():
        lines += ["", f"## {section}", ""]
        lines += [f"- {k}: {_fmt(v) if isinstance(v, (int, float)) else v}" for k, v in facts.items()]
    durability = durability_doc() or durability
    if durability:
        lines += ["", durability_markdown(durability).rstrip("\n")]
    return "\n".join(lines) + "\n"


def as_json(durability: dict | None = None) -> dict:
    doc = {
        "meta": meta,
        "http": [r.as_dict() for r in http_results.values()],
        "targets": targets(),
        **extra,
    }
    durability = durability_doc() or durability
    if durability:
        doc["durability"] = durability
    return doc


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


def _drop_section(text: str, heading: str) -> str:
    """text without the `## ...` section that starts with the line `heading` (up to the next heading)."""
    out, skipping = [], False
    for line in text.splitlines():
        if line == heading:
            skipping = True
            continue
        if skipping and line.startswith("#"):
            skipping = False
        if not skipping:
            out.append(line)
    return "\n".join(out).rstrip("\n") + "\n"


def _write(md: Path, text: str, doc: dict) -> None:
    md.write_text(text)
    md.with_suffix(".json").write_text(json.dumps(doc, indent=2, default=str) + "\n")


def write() -> list[Path]:
    """Write results/latest.md and latest.json; returns the .md files written (none when nothing was measured).

    A session without the HTTP runs (say `pytest bench/test_store.py`) writes partial.md/.json instead,
    so it does not overwrite the last full table; if it measured the durability section, that section
    (and only that) is replaced in latest.md/.json as well.
    """
    durability = durability_doc()
    if not http_results and not extra and durability is None:
        return []
    RESULTS_DIR.mkdir(exist_ok=True)
    latest = RESULTS_DIR / "latest.md"
    try:
        previous = json.loads(latest.with_suffix(".json").read_text())
    except (OSError, ValueError):
        previous = {}
    if http_results:
        carried = None if durability else previous.get("durability")
        _write(latest, markdown(carried), as_json(carried))
        return [latest]
    partial = RESULTS_DIR / "partial.md"
    _write(partial, markdown(), as_json())
    if durability is None:
        return [partial]
    try:
        text = latest.read_text()
    except OSError:
        text = "# productd bench: latest run\n"
    text = _drop_section(text, DURABILITY_HEADING) + "\n" + durability_markdown(durability)
    previous.setdefault("meta", meta)
    previous["durability"] = durability
    _write(latest, text, previous)
    return [partial, latest]
