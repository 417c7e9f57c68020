"""The shared-memory layouts (status board rows, HTTP stats slots) fit what they hold, and the
per-shard series of /metrics are the ones the black-box tests check (pure logic, no processes)."""

from __future__ import annotations

import pytest
from service import SHARD_SERIES

from productd.actors import status
from productd.actors.status import StatusBoard
from productd.config import OPTION
from productd.http import metrics, stats
from productd.http.stats import HttpStats
from productd.layout import CACHE_LINE_FIELDS, Layout

MOST_SHARDS = OPTION["shards"].parse.high


def _spans(layout: Layout) -> list[range]:
    return [range(offset, offset + length) for offset, length in layout.fields.values()]


@pytest.mark.parametrize(
    "layout, size",
    [(status.ROW, status.ROW_FIELDS), (status.GLOBALS, status.GLOBAL_FIELDS), (stats.SLOT, stats.SLOT_FIELDS)],
    ids=lambda v: getattr(v, "name", v),
)
def test_fields_follow_each_other_without_overlap_inside_whole_cache_lines(layout, size):
    spans = _spans(layout)
    assert spans[0].start == 0
    assert all(a.stop == b.start for a, b in zip(spans, spans[1:], strict=False))  # in order, no gap, no overlap
    assert spans[-1].stop <= size
    assert size % CACHE_LINE_FIELDS == 0


def test_the_status_row_holds_the_apply_histogram_and_every_field_named_in_status():
    assert status.ROW.fields["apply_hist"][1] == len(status.APPLY_BUCKETS) + 1  # buckets and +Inf
    offsets = {offset for offset, _ in status.ROW.fields.values()}
    for name in ("PID", "STATE", "HEARTBEAT_NS", "DOZING", "APPLY_HIST", "APPLY_SUM_US", "APPLY_COUNT"):
        assert getattr(status, name) in offsets


def test_every_field_of_every_shard_of_the_largest_board_is_its_own():
    """Write a distinct value into every field of every row and the globals of a board with the
    most shards the command line takes, then read each back: nothing overlaps or falls outside."""
    board = StatusBoard(MOST_SHARDS)
    every = [(shard, f) for shard in range(MOST_SHARDS) for span in _spans(status.ROW) for f in span]
    for n, (shard, f) in enumerate(every, 1):
        board.set(shard, f, n)
    board.stopping = True
    assert [board.get(shard, f) for shard, f in every] == list(range(1, len(every) + 1))
    assert board.stopping
    with pytest.raises(IndexError):
        board._q[MOST_SHARDS * status.ROW_FIELDS + status.GLOBAL_FIELDS]


def test_the_http_slot_has_a_rejected_counter_for_the_most_shards_the_command_line_takes():
    assert stats.MAX_SHARDS == MOST_SHARDS
    table = HttpStats(slots=2)
    table.use(1)
    table.rejected(MOST_SHARDS - 1, 7)
    table.record("other", "other", 0, 99.0)  # the last route, method, status and bucket
    lines = table.render(MOST_SHARDS)
    assert f'{stats.REJECTED_SERIES}{{shard="{MOST_SHARDS - 1}"}} 7' in lines
    assert 'productd_http_requests_total{route="other",method="other",status="other"} 1' in lines
    assert not any(table._q[: stats.SLOT_FIELDS])  # slot 1's counts stayed in slot 1


def test_a_layout_refuses_a_field_twice_or_after_its_size():
    layout = Layout("t")
    layout.field("a", 3)
    with pytest.raises(ValueError):
        layout.field("a")
    assert layout.size() == CACHE_LINE_FIELDS
    with pytest.raises(ValueError):
        layout.field("b")


def test_the_tests_check_exactly_the_per_shard_series_metrics_renders():
    # tests/service.py keeps its own list on purpose (it imports nothing of productd): see there.
    assert list(SHARD_SERIES) == list(metrics.PER_SHARD_SERIES)
