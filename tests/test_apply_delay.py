"""--apply-delay: a shard that got only events lets the next ones gather, and a read or a stop wakes it.

Each test makes the delay long (a minute) so that what it checks cannot happen by the delay running
out: a read answered 200 within --read-timeout, or a stop within the test's deadline, proves the
doorbell woke the shard; events still unapplied while it dozes prove that the delay holds them.
"""

from __future__ import annotations

import signal

from service import uid


def _dozing(svc) -> bool:
    return svc.readyz().json()["shards"][0]["dozing"]


def _applied(svc) -> float:
    return svc.metric_sum("productd_events_applied_total")


def _start_dozing(svc, product: str) -> None:
    """One event wakes the idle shard; having read only events, it starts to doze."""
    assert svc.post({"product_id": product, "price": 1.0, "stock": 1}).status_code == 202
    svc.wait_for(lambda: _applied(svc) == 1, "the first event applied")
    svc.wait_for(lambda: _dozing(svc), "the shard to doze after reading only events")


def test_a_read_wakes_a_dozing_shard_and_sees_every_event_before_it(start_service):
    svc = start_service(shards=1, extra_args=["--apply-delay", "60", "--read-timeout", "2"])
    product, other = uid("doze"), uid("doze")
    _start_dozing(svc, product)

    assert svc.post({"product_id": product, "price": 2.5}).status_code == 202
    assert svc.post([{"product_id": other, "stock": 7}, {"product_id": product, "stock": 9}]).status_code == 202
    assert _applied(svc) == 1, "the dozing shard applied events before its delay ended or a read came"

    # Without the doorbell this read would wait out the minute and get 504 after --read-timeout.
    r = svc.get(product)
    assert r.status_code == 200, r.text
    assert (r.json()["price"], r.json()["stock"]) == (2.5, 9)
    assert svc.product(other)["stock"] == 7
    svc.wait_for(lambda: _applied(svc) == 4, "the counters of the batch the read woke")


def test_a_full_inbox_wakes_a_dozing_shard(start_service):
    """A writer waiting for room rings: the shard is asleep on exactly the room it waits for."""
    svc = start_service(shards=1, extra_args=["--apply-delay", "60", "--inbox-bytes", "4096"])
    product = uid("doze")
    _start_dozing(svc, product)
    events = [{"product_id": f"{product}-{i}", "price": 1.5, "stock": i} for i in range(2000)]  # ~90 KB of frames
    r = svc.post(events)
    assert r.status_code == 202, r.text  # without the ring: 503 after --enqueue-timeout
    assert svc.product(f"{product}-1999")["stock"] == 1999


def test_events_are_applied_when_the_delay_ends_without_any_read(start_service):
    svc = start_service(shards=1, extra_args=["--apply-delay", "0.5"])
    product = uid("doze")
    _start_dozing(svc, product)
    for stock in range(2, 12):
        assert svc.post({"product_id": product, "stock": stock}).status_code == 202
    svc.wait_for(lambda: _applied(svc) == 11, "the gathered events applied with no read to wake the shard")
    svc.wait_for(lambda: not _dozing(svc), "the shard to stop dozing once the writes stopped")
    assert svc.product(product)["stock"] == 11


def test_a_stop_wakes_a_dozing_shard_and_loses_nothing(start_service, tmp_path):
    data = tmp_path / "data"
    args = ["--apply-delay", "60", "--data-dir", str(data)]
    svc = start_service(shards=1, extra_args=args, env={"PRODUCTD_DURABILITY": "batch"})
    product = uid("doze")
    _start_dozing(svc, product)
    assert svc.post({"product_id": product, "price": 3.25, "stock": 5, "version": 2}).status_code == 202
    assert _applied(svc) == 1

    # The stop frame queues behind the event and rings: without the bell, the shard would sleep out its minute.
    assert svc.stop(signal.SIGTERM, timeout=30) == 0
    svc.assert_no_leftovers()

    again = start_service(shards=1, extra_args=args, env={"PRODUCTD_DURABILITY": "batch"})
    got = again.product(product)
    assert (got["price"], got["stock"], got["version"]) == (3.25, 5, 2)


def test_sync_durability_never_dozes(start_service, tmp_path):
    svc = start_service(
        shards=1, extra_args=["--apply-delay", "60", "--data-dir", str(tmp_path / "data")],
        env={"PRODUCTD_DURABILITY": "sync"},
    )
    product = uid("doze")
    for stock in range(5):  # each 202 waits for the shard's commit (a minute, had it dozed; 503 after 2 s)
        assert svc.post({"product_id": product, "stock": stock}).status_code == 202
    assert not _dozing(svc)
    assert svc.product(product)["stock"] == 4
