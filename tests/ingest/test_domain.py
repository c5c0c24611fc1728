"""Plain rules of ingest: value encoding, group planning, latest merge, tag cache, page tokens, partitions."""

from __future__ import annotations

import math
from datetime import UTC, date, datetime

import pytest

from fabrica.common.v1 import reading_pb2
from fabrica_svc.ingest import domain
from fabrica_svc.ingest.convert import batch_from_proto, value_from_row
from fabrica_svc.runtime.errors import InvalidArgument
from fabrica_svc.runtime.pages import decode_page_token, encode_page_token

from .support import PRODUCTION_COUNTER, T0_US, batch, reading


@pytest.mark.parametrize(
    ("value", "kind"),
    [
        (0, "uint_value"),
        (2**63 - 1, "uint_value"),
        (2**63, "uint_value"),
        (2**64 - 1, "uint_value"),
        (-(2**63), "int_value"),
        (2**63 - 1, "int_value"),
        (-1, "int_value"),
        (True, "bool_value"),
        (False, "bool_value"),
        (-0.0, "double_value"),
        (1e308, "double_value"),
        ("grüße ✓", "string_value"),
        (b"\x00\xffraw", "bytes_value"),
    ],
)
def test_typed_values_round_trip_through_rows_exactly(value: object, kind: str) -> None:
    wb = batch_from_proto(batch("c", 1, [reading(7, T0_US, value, kind=kind)]))
    (row,) = wb.rows
    back = value_from_row(row[3], row[4], row[5], row[6], row[7])
    assert back is not None and back.WhichOneof("kind") == kind
    assert getattr(back, kind) == value
    assert row[5] is None or -(2**63) <= row[5] < 2**63  # fits Postgres bigint
    if kind in ("int_value", "uint_value", "bool_value"):
        assert row[4] == float(value)  # the numeric view aggregates use


def test_uint64_bits_share_the_bigint_column() -> None:
    assert domain.uint_to_bigint(2**64 - 1) == -1
    assert domain.uint_to_bigint(2**63) == -(2**63)
    assert domain.bigint_to_uint(-1) == 2**64 - 1
    assert all(domain.bigint_to_uint(domain.uint_to_bigint(v)) == v for v in (0, 1, 2**63 - 1, 2**63, 2**64 - 1))


def test_batch_rows_events_latest_and_tags() -> None:
    b = batch("c", 1, [
        reading(1, T0_US + 2_000, 1.0),
        reading(1, T0_US + 1_000, 2.0),  # older: not the latest of tag 1
        reading(2, T0_US, 5, role=PRODUCTION_COUNTER, plc_id="press-2"),
        reading(3, T0_US, None, quality=reading_pb2.QUALITY_COMMUNICATION_FAILURE, error="timeout after 1s"),
    ])
    wb = batch_from_proto(b)
    assert [r[0] for r in wb.rows] == [1, 1, 2, 3]
    assert wb.rows[0][1] == T0_US + 2_000
    assert wb.latest[1][4] == 1.0
    assert wb.tags == {1: ("plc-1", 1), 2: ("press-2", PRODUCTION_COUNTER), 3: ("plc-1", 1)}
    assert wb.events == [(2, "press-2", PRODUCTION_COUNTER, T0_US, 1, domain.KIND_INT, 5.0, 5, None, None)]
    assert wb.rows[3][3] == domain.KIND_NONE and wb.rows[3][8] == "timeout after 1s"


@pytest.mark.parametrize(
    ("bad", "field"),
    [
        (reading(2**63, T0_US), "batch.readings[1].tag_id"),
        (reading(1, T0_US, "a\x00b"), "batch.readings[1].value.string_value"),
        (reading(1, T0_US, error="x\x00"), "batch.readings[1].error"),
        (reading(1, T0_US, plc_id="p\x00"), "batch.readings[1].plc_id"),
        (reading_pb2.Reading(tag_id=1, quality=1, plc_id="p", read_time={"seconds": 253_402_300_800},
                             value={"double_value": 1.0}),
         "batch.readings[1].read_time"),
        (reading_pb2.Reading(tag_id=1, quality=1, plc_id="p", read_time={"seconds": 1, "nanos": -1},
                             value={"double_value": 1.0}),
         "batch.readings[1].read_time"),
        # GOOD and STALE readings carry a value (checked here rather than by a per-reading CEL rule).
        (reading_pb2.Reading(tag_id=1, quality=1, plc_id="p", read_time={"seconds": 1}), "batch.readings[1].value"),
        (reading_pb2.Reading(tag_id=1, quality=4, plc_id="p", read_time={"seconds": 1}), "batch.readings[1].value"),
    ],
)
def test_values_postgres_cannot_hold_are_field_violations(bad: reading_pb2.Reading, field: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        batch_from_proto(batch("c", 1, [reading(1, T0_US), bad]))
    assert [v.field for v in err.value.violations] == [field]


def test_sequence_beyond_bigint_is_rejected() -> None:
    with pytest.raises(InvalidArgument) as err:
        batch_from_proto(batch("c", 2**63, [reading(1, T0_US)]))
    assert err.value.violations[0].field == "batch.sequence"


@pytest.mark.parametrize(
    ("committed", "batches", "outcomes", "advanced"),
    [
        ({}, [("a", 1, 5, 0)], ["written"], {"a": 1}),
        ({"a": (3, 0)}, [("a", 2, 5, 0), ("a", 3, 5, 0), ("a", 4, 5, 0)], ["duplicate", "duplicate", "written"],
         {"a": 4}),
        # the same batch twice in one group (two streams of one collector): written once
        ({"a": (0, 0)}, [("a", 1, 5, 0), ("a", 1, 5, 0), ("a", 2, 5, 0), ("a", 2, 5, 0)],
         ["written", "duplicate", "written", "duplicate"], {"a": 2}),
        # a gap is refused (the next batch must be committed + 1), and so is everything after it
        ({"a": (1, 0)}, [("a", 5, 5, 0)], ["SEQUENCE_GAP 2"], {}),
        ({"a": (1, 0)}, [("a", 2, 5, 0), ("a", 9, 5, 0), ("a", 10, 5, 0)],
         ["written", "SEQUENCE_GAP 3", "SEQUENCE_GAP 3"], {"a": 2}),
        ({}, [("a", 2**63 - 1, 5, 0)], ["SEQUENCE_GAP 1"], {}),
        ({"a": (9, 0), "b": (0, 0)}, [("b", 1, 5, 0), ("a", 9, 5, 0)], ["written", "duplicate"], {"b": 1}),
        # an epoch below the stored one is fenced, even for a duplicate; a higher one is not
        ({"a": (4, 2)}, [("a", 5, 5, 1), ("a", 3, 5, 1), ("a", 5, 5, 2), ("a", 6, 5, 3)],
         ["EPOCH_FENCED", "EPOCH_FENCED", "written", "written"], {"a": 6}),
    ],
)
def test_plan_group(committed: dict[str, tuple[int, int]], batches: list[tuple[str, int, int, int]],
                    outcomes: list[str], advanced: dict[str, int]) -> None:
    plan = domain.plan_group(committed, batches)

    def outcome(o: domain.BatchOutcome) -> str:
        if o.refused is not None:
            expected = o.refused.metadata.get("expected_sequence")
            return o.refused.reason + (f" {expected}" if expected else "")
        return "duplicate" if o.duplicate else "written"

    assert [outcome(o) for o in plan.outcomes] == outcomes
    assert [o.written for o in plan.outcomes] == [size if w == "written" else 0
                                                  for w, (_, _, size, _) in zip(outcomes, batches)]
    assert plan.written == [i for i, w in enumerate(outcomes) if w == "written"]
    assert plan.advanced == advanced


def test_merge_latest_takes_the_newest_per_tag_sorted_by_tag() -> None:
    a = batch_from_proto(batch("c", 1, [reading(5, T0_US + 10, 1.0), reading(2, T0_US + 10, 1.0)]))
    b = batch_from_proto(batch("c", 2, [reading(5, T0_US + 5, 2.0), reading(2, T0_US + 10, 3.0)]))
    merged = domain.merge_latest([a, b])
    assert [(r[0], r[1], r[4]) for r in merged] == [(2, T0_US + 10, 3.0), (5, T0_US + 10, 1.0)]


def test_tag_cache_reports_only_new_or_changed_tags_and_stays_bounded() -> None:
    cache = domain.TagCache(max_size=3)
    one = batch_from_proto(batch("c", 1, [reading(1, T0_US), reading(2, T0_US)]))
    assert cache.changes([one]) == [("default", 1, "plc-1", 1), ("default", 2, "plc-1", 1)]
    cache.remember(cache.changes([one]))
    assert cache.changes([one]) == []
    moved = batch_from_proto(batch("c", 2, [reading(2, T0_US, plc_id="plc-9"), reading(3, T0_US)]))
    assert cache.changes([moved]) == [("default", 2, "plc-9", 1), ("default", 3, "plc-1", 1)]
    cache.remember(cache.changes([moved]))
    assert len(cache) <= 3
    cache.remember([("default", 10, "x", 1), ("default", 11, "x", 1)])
    assert len(cache) <= 3


def test_tag_cache_keeps_each_tenants_rows_apart() -> None:
    """A tag's row is its tenant's: the same tag id named by another tenant's batch is a change of its own."""
    cache = domain.TagCache()
    mine = batch_from_proto(batch("c", 1, [reading(1, T0_US)]))
    theirs = batch_from_proto(batch("c", 1, [reading(1, T0_US)]))
    theirs.tenant = "acme"
    cache.remember(cache.changes([mine]))
    assert cache.changes([mine, theirs]) == [("acme", 1, "plc-1", 1)]


def _cursor_of(token: str, query: str) -> domain.PageCursor:
    """What QueryReadings does with a page token: the runtime's token, holding the cursor's position."""
    return domain.PageCursor.from_position(decode_page_token(token, query))


def test_page_token_round_trips_and_rejects_other_filters_and_garbage() -> None:
    cursor = domain.PageCursor(T0_US, 42, 7, 3)
    query = domain.filter_fingerprint(b"a filter")
    assert query != domain.filter_fingerprint(b"another filter")
    token = encode_page_token(query, cursor.position())
    assert _cursor_of(token, query) == cursor
    other = domain.filter_fingerprint(b"another filter")
    for bad_token, fingerprint in ((token, other), ("not-a-token", query), ("", query), (token[:-2], query)):
        with pytest.raises(InvalidArgument) as err:
            _cursor_of(bad_token, fingerprint)
        assert err.value.violations[0].field == "page_token"


@pytest.mark.parametrize("position", [
    "", "1,2,3", "1,2,3,4,5", "a,2,3,4", "1,2,3,4 ", "1,+2,3,4", "1,2_0,3,4", "1,-2,3,4",  # not four integers
    f"{253_402_300_800 * 1_000_000},1,0,0", f"{-62_135_596_801 * 1_000_000},1,0,0",  # no Timestamp is there
    f"0,{2**63},0,0", f"0,1,{2**32},0", f"0,1,0,{2**16}", "1" * 30 + ",1,0,0",  # no row has these
])
def test_a_forged_cursor_is_refused_before_any_query(position: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        domain.PageCursor.from_position(position)
    assert err.value.violations[0].field == "page_token"


def test_cursor_positions_at_the_edges_round_trip() -> None:
    for cursor in (domain.PageCursor(-62_135_596_800 * 1_000_000, 0, 0, 0),
                   domain.PageCursor(253_402_300_799_999_999, 2**63 - 1, 2**32 - 1, 2**16 - 1)):
        assert domain.PageCursor.from_position(cursor.position()) == cursor


def test_bucket_count_limit() -> None:
    domain.check_bucket_count(3600, 60, 10)  # 600 buckets
    with pytest.raises(InvalidArgument) as err:
        domain.check_bucket_count(86_400 * 31, 1, 1)
    assert err.value.violations[0].field == "bucket_seconds"


def test_partition_days_and_retention() -> None:
    now = datetime(2025, 3, 10, 15, 30, tzinfo=UTC)
    assert domain.days_ahead(now, 2) == [date(2025, 3, 10), date(2025, 3, 11), date(2025, 3, 12)]
    assert domain.partition_name(date(2025, 3, 1)) == "readings_p20250301"
    assert domain.partition_day("readings_p20250301") == date(2025, 3, 1)
    assert domain.partition_day("readings_default") is None
    cutoff = domain.retention_cutoff(now, 7)
    assert cutoff == datetime(2025, 3, 3, tzinfo=UTC)
    assert domain.retention_cutoff(now, 0) is None
    names = ["readings_p20250301", "readings_p20250302", "readings_p20250303", "readings_default"]
    assert domain.expired_partitions(names, cutoff) == ["readings_p20250301", "readings_p20250302"]
    assert domain.expired_partitions(names, None) == []


def test_time_conversions_are_exact_to_the_microsecond() -> None:
    for us in (0, 1, -1, T0_US + 123_456, 253_402_300_799_999_999):
        assert domain.datetime_to_micros(domain.micros_to_datetime(us)) == us
    assert math.isclose(domain.micros_to_datetime(T0_US).timestamp(), T0_US / 1e6)


def test_each_kind_of_value_is_told_apart_when_it_reads_as_zero() -> None:
    """The one pass takes a nonzero double_value as the member set and asks WhichOneof only for a zero:
    zeros of every kind, -0.0 and NaN keep their kind and value."""
    cases = [(0.0, "double_value", domain.KIND_DOUBLE, 0.0), (-0.0, "double_value", domain.KIND_DOUBLE, -0.0),
             (float("nan"), "double_value", domain.KIND_DOUBLE, None), (2.5, "double_value", domain.KIND_DOUBLE, 2.5),
             (0, "int_value", domain.KIND_INT, 0.0), (-7, "int_value", domain.KIND_INT, -7.0),
             (0, "uint_value", domain.KIND_UINT, 0.0), (False, "bool_value", domain.KIND_BOOL, 0.0),
             (True, "bool_value", domain.KIND_BOOL, 1.0), ("", "string_value", domain.KIND_STRING, None),
             (b"", "bytes_value", domain.KIND_BYTES, None)]
    wb = batch_from_proto(batch("c", 1, [reading(i + 1, T0_US, v, kind=k) for i, (v, k, _, _) in enumerate(cases)]))
    for row, (v, k, kind, value) in zip(wb.rows, cases, strict=True):
        assert row[3] == kind, (v, k)
        if k == "double_value" and math.isnan(v):
            assert math.isnan(row[4])
        else:
            assert row[4] == value and (value is None or math.copysign(1, row[4]) == math.copysign(1, value)), (v, k)
    assert [r[5:8] for r in wb.rows[4:7]] == [(0, None, None), (-7, None, None), (0, None, None)]
    assert wb.rows[9][6] == "" and wb.rows[10][7] == b""
