"""A full disk costs no acknowledged event and no start: the real service on a real, small tmpfs.

Clients post while the test fills the file system the data dir lives on; the shards start to
refuse writes. A SIGTERM while the disk is still full must end with a non-zero exit code and
a log line that says where the uncommitted changes went; once the space is back, the next start
commits them without an operator's hand, and every event that was acknowledged reads back.

The tests mount a tmpfs (root, or CAP_SYS_ADMIN); where that cannot be done they are skipped
with the reason mount gave.
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import threading
import time

import pytest
import requests
from service import TIMEOUT, uid

DISK_SIZE = "6m"
SHARDS = 2
BATCH = 25


@pytest.fixture
def small_disk(tmp_path):
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("no mount command on this machine")
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={DISK_SIZE}", "tmpfs", str(mount_point)],
        capture_output=True, text=True,
    )  # fmt: skip
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip() or done.returncode}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], capture_output=True)


def fill(path) -> int:
    """Write `path` until the file system has no byte left; returns the bytes written."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    written = 0
    try:
        for size in (1 << 20, 1 << 16, 1 << 12, 1):
            block = bytes(size)
            while True:
                try:
                    written += os.write(fd, block)
                except OSError as exc:
                    assert exc.errno == errno.ENOSPC, exc
                    break
    finally:
        os.close(fd)
    return written


class Poster(threading.Thread):
    """Posts batches of new products until told to stop; remembers every event the service took."""

    def __init__(self, url: str, prefix: str) -> None:
        super().__init__(daemon=True)
        self.url = url + "/events"
        self.prefix = prefix
        self.acknowledged: dict[str, float] = {}  # product id -> price
        self.refused = 0
        self.halt = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        session = requests.Session()
        n = 0
        try:
            while not self.halt.is_set():
                batch = [{"product_id": f"{self.prefix}-{n + i}", "price": float(n + i), "version": 1}
                         for i in range(BATCH)]
                n += BATCH
                try:
                    r = session.post(self.url, json=batch, timeout=TIMEOUT)
                except requests.ConnectionError:
                    return  # the service is stopping
                if r.status_code == 202:
                    taken = range(BATCH)
                elif r.status_code == 503:
                    refused = set(r.json()["not_accepted"])
                    self.refused += len(refused)
                    taken = [i for i in range(BATCH) if i not in refused]
                else:
                    raise AssertionError(f"POST /events answered {r.status_code}: {r.text[:500]}")
                for i in taken:
                    self.acknowledged[batch[i]["product_id"]] = batch[i]["price"]
        except BaseException as exc:  # reported by the test, not lost in the thread
            self.error = exc


def refusing(svc) -> float:
    return sum(v for (name, _), v in svc.metrics().items() if name == "productd_shard_writes_refused")


@pytest.mark.parametrize("durability", ["batch", "sync"])
def test_stop_while_the_disk_is_full_keeps_every_acknowledged_event(small_disk, start_service, durability):
    data_dir = small_disk / "data"
    args = ["--data-dir", str(data_dir), "--inbox-bytes", "65536", "--graceful-timeout", "2"]
    env = {"PRODUCTD_DURABILITY": durability}
    svc = start_service(shards=SHARDS, workers=2, extra_args=args, env=env)
    poster = Poster(svc.url, uid("full"))
    poster.start()
    try:
        svc.wait_for(lambda: len(poster.acknowledged) >= 200 or poster.error, "the first events")
        filler = small_disk / "filler"
        fill(filler)
        svc.wait_for(lambda: refusing(svc) == SHARDS or poster.error, "every shard to refuse writes", 60)
        assert poster.error is None, poster.error
        ready = svc.readyz()
        assert ready.status_code == 200, ready.text  # reads still work: degraded, not down
        assert ready.json()["status"] == "degraded", ready.text
        assert all(shard["writes_refused"] for shard in ready.json()["shards"]), ready.text
        sample = next(iter(poster.acknowledged))
        assert svc.product(sample)["price"] == poster.acknowledged[sample]

        code = svc.stop(signal.SIGTERM, timeout=60)  # while the disk is still full
    finally:
        poster.halt.set()
        poster.join(timeout=30)
    assert poster.error is None, poster.error
    log = svc.log_text()
    assert code == 75, f"a stop that could not commit must not exit {code}\n{svc.log_tail()}"
    assert "the next start commits them" in log, svc.log_tail()
    assert "stopped with uncommitted changes" in log, svc.log_tail()
    assert "restarting it" not in log, "a shard that could not commit at stop was restarted\n" + svc.log_tail()
    svc.assert_no_leftovers()

    os.unlink(filler)  # the operator frees space; nothing else
    again = start_service(shards=SHARDS, workers=2, extra_args=args, env=env)
    assert "from its recovery file" in again.log_text(), again.log_tail()
    session = requests.Session()
    lost = []
    for product_id, price in poster.acknowledged.items():
        r = session.get(f"{again.url}/products/{product_id}", timeout=TIMEOUT)
        if r.status_code != 200 or r.json()["price"] != price:
            lost.append((product_id, r.status_code))
    assert not lost, f"{len(lost)} of {len(poster.acknowledged)} acknowledged events lost, e.g. {lost[:5]}"
    assert again.stop() == 0, again.log_tail()

    # The recovery files were emptied once committed: a third start applies nothing.
    third = start_service(shards=SHARDS, workers=2, extra_args=args, env=env)
    assert "from its recovery file" not in third.log_text(), third.log_tail()
    assert third.product(sample)["price"] == poster.acknowledged[sample]
    assert third.stop() == 0, third.log_tail()


def test_a_shard_killed_while_its_stop_retries_the_commit_loses_nothing(small_disk, start_service):
    """The stop saves the uncommitted changes to the recovery file at its first failed commit, not
    only when its time is up: a kill -9 while it retries (systemd's stop timeout) loses nothing."""
    data_dir = small_disk / "data"
    args = ["--data-dir", str(data_dir), "--inbox-bytes", "65536", "--graceful-timeout", "20"]
    svc = start_service(shards=SHARDS, workers=2, extra_args=args, env={"PRODUCTD_DURABILITY": "batch"})
    poster = Poster(svc.url, uid("killed"))
    poster.start()
    try:
        svc.wait_for(lambda: len(poster.acknowledged) >= 200 or poster.error, "the first events")
        filler = small_disk / "filler"
        fill(filler)
        svc.wait_for(lambda: refusing(svc) == SHARDS or poster.error, "every shard to refuse writes", 60)
        shards = svc.shard_pids()
        svc.proc.send_signal(signal.SIGTERM)
        poster.halt.set()
        poster.join(timeout=30)
        time.sleep(3)  # the shards are in their commit retries (20 s of them)
        for pid in shards:
            os.kill(pid, signal.SIGKILL)
        code = svc.stop(signal.SIGTERM, timeout=90)
    finally:
        poster.halt.set()
        poster.join(timeout=30)
    assert poster.error is None, poster.error
    # Not a clean stop, and it says so: 75 (saved for the next start) or 1 (gave up on a shard that
    # could not even open its file on the full disk).
    assert code in (1, 75), f"exit {code}\n{svc.log_tail()}"
    # The restarted shards took their changes back from the recovery file (and committed them,
    # in the stopping service or at the next start, whichever found room first).
    assert "products of its recovery file" in svc.log_text() or "from its recovery file" in svc.log_text(), (
        svc.log_tail())
    os.unlink(filler)
    again = start_service(shards=SHARDS, workers=2, extra_args=args, env={"PRODUCTD_DURABILITY": "batch"})
    session = requests.Session()
    lost = [pid for pid, price in poster.acknowledged.items()
            if (r := session.get(f"{again.url}/products/{pid}", timeout=TIMEOUT)).status_code != 200
            or r.json()["price"] != price]
    assert not lost, f"{len(lost)} of {len(poster.acknowledged)} acknowledged events lost, e.g. {lost[:5]}"
    assert again.stop() == 0, again.log_tail()
