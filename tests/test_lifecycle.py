"""The supervisor's stop, phase by phase, when a shard makes it hard: the real service, real signals."""

from __future__ import annotations

import errno
import fcntl
import os
import signal
import zlib

from service import uid

SHARDS = 2
GRACEFUL = 5
INBOX = 131072  # twice a plain pipe's size, which tells the inbox from the doorbell


def top_up(shard_pid: int) -> int:
    """Fill the last bytes of the shard's inbox pipe, which no HTTP request is small enough to
    take, with zero bytes (a shard skips them as it would a frame cut by a crash); returns how many.

    The pipe is opened for writing through /proc, the way `echo > /proc/PID/fd/N` would.
    """
    for name in os.listdir(f"/proc/{shard_pid}/fd"):
        path = f"/proc/{shard_pid}/fd/{name}"
        if not os.readlink(path).startswith("pipe:"):
            continue
        fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
        try:
            if fcntl.fcntl(fd, fcntl.F_GETPIPE_SZ) != INBOX:
                continue
            written = 0
            while True:
                try:
                    written += os.write(fd, b"\0")
                except OSError as exc:
                    assert exc.errno == errno.EAGAIN, exc
                    return written
        finally:
            os.close(fd)
    raise AssertionError(f"no inbox pipe of {INBOX} bytes in shard {shard_pid}")


def ids_on(shard: int, label: str, count: int) -> list[str]:
    out: list[str] = []
    n = 0
    while len(out) < count:
        candidate = f"{label}-{n}"
        n += 1
        if zlib.crc32(candidate.encode()) % SHARDS == shard:
            out.append(candidate)
    return out


def test_stop_with_a_dead_shard_behind_a_full_inbox(start_service, tmp_path):
    """STOP cannot be written while shard 0's inbox is full to the last byte and its reader is
    frozen; the shard is then killed. The supervisor must go on reaping and restarting instead of waiting on the pipe:
    the new shard applies the inbox, takes its STOP, and the stop finishes, losing nothing."""
    args = ["--data-dir", str(tmp_path / "data"), "--inbox-bytes", str(INBOX),
            "--enqueue-timeout", "0.2", "--graceful-timeout", str(GRACEFUL)]
    env = {"PRODUCTD_DURABILITY": "batch"}
    svc = start_service(shards=SHARDS, workers=1, extra_args=args, env=env)
    frozen = svc.shard_pids()[0]
    os.kill(frozen, signal.SIGSTOP)
    accepted: dict[str, int] = {}
    ids = iter(ids_on(0, uid("full"), 100_000))
    full = False
    while not full:
        batch = [{"product_id": next(ids), "stock": n, "version": 1} for n in range(200)]
        r = svc.post(batch)
        assert r.status_code in (202, 503), r.text
        refused = set(r.json().get("not_accepted", [])) if r.status_code == 503 else set()
        full = bool(refused)
        accepted.update((e["product_id"], e["stock"]) for i, e in enumerate(batch) if i not in refused)
    assert "is full" in r.json()["detail"], r.text
    top_up(frozen)  # now not even a STOP frame fits

    svc.proc.send_signal(signal.SIGTERM)
    svc.wait_for(lambda: "gunicorn stopped" in svc.log_text(), "gunicorn to stop", 30)
    os.kill(frozen, signal.SIGKILL)  # dies with its inbox full, while the supervisor holds its STOP
    code = svc.stop(timeout=GRACEFUL + 30)  # a deadline only so a hang fails
    assert code == 0, svc.log_tail()
    assert f"shard 0 (pid {frozen}) was killed by SIGKILL; restarting it" in svc.log_text(), svc.log_tail()
    svc.assert_no_leftovers()

    again = start_service(shards=SHARDS, workers=1, extra_args=args, env=env)
    lost = [pid for pid, stock in accepted.items() if again.get(pid).json().get("stock") != stock]
    assert not lost, f"{len(lost)} of {len(accepted)} accepted events lost, e.g. {lost[:3]}"
    assert again.stop() == 0, again.log_tail()
