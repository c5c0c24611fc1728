"""History: paged and streamed raw readings, bucketed aggregates and statistics, checked against values
computed here from the readings the test wrote."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

import grpc
import pytest
from grpc_helpers import field_violations

from fabrica.common.v1 import reading_pb2
from fabrica.ingest.v1 import ingest_service_pb2 as pb
from fabrica.ingest.v1 import query_pb2
from fabrica_svc.ingest.domain import filter_fingerprint
from fabrica_svc.runtime.pages import encode_page_token

from .support import T0_US, batch, reading, stream_batches, ts_us

GOOD = reading_pb2.QUALITY_GOOD
STALE = reading_pb2.QUALITY_STALE
COMM = reading_pb2.QUALITY_COMMUNICATION_FAILURE
S = 1_000_000  # microseconds per second


@dataclass(frozen=True)
class Row:
    tag_id: int
    us: int
    value: float | None
    quality: int
    plc_id: str


def dataset() -> list[Row]:
    """Tags 1-3 on press-1 and 4 on press-2, every 10 s for 2 h from T0, with bad and stale readings, and
    two readings of tag 2 at the very same instant (a page boundary between them must not lose one)."""
    rows = []
    for i in range(720):
        us = T0_US + i * 10 * S
        rows.append(Row(1, us, 20.0 + 5 * math.sin(i / 30) + i * 0.01, GOOD, "press-1"))
        if i % 50 == 7:
            rows.append(Row(2, us, None, COMM, "press-1"))
        else:
            rows.append(Row(2, us, float((i * 37) % 101), STALE if i % 13 == 0 else GOOD, "press-1"))
        rows.append(Row(3, us, float(i // 60), GOOD, "press-1"))
        rows.append(Row(4, us, -float(i), GOOD, "press-2"))
    for k in range(5):
        rows.append(Row(2, T0_US + 3600 * S, 1000.0 + k, GOOD, "press-1"))
    return rows


def to_reading(r: Row) -> reading_pb2.Reading:
    return reading(r.tag_id, r.us, r.value, quality=r.quality, plc_id=r.plc_id)


@pytest.fixture
async def loaded(ingest):
    rows = dataset()
    batches = [batch("hist", n + 1, [to_reading(r) for r in rows[i:i + 500]]) for n, i in enumerate(range(0, len(rows), 500))]
    _, acks = await stream_batches(ingest.stub, "hist", batches)
    assert sum(a.written for a in acks) == len(rows)
    return ingest, rows


def rfilter(tag_ids=(), plc_id="", start_us=T0_US, end_us=T0_US + 7200 * S, qualities=()):
    return query_pb2.ReadingFilter(tag_ids=tag_ids, plc_id=plc_id, start_time=ts_us(start_us),
                                   end_time=ts_us(end_us), qualities=qualities)


def key(r: reading_pb2.Reading) -> tuple[int, int, float | None, int]:
    us = r.read_time.seconds * S + r.read_time.nanos // 1000
    return (us, r.tag_id, r.value.double_value if r.HasField("value") else None, r.quality)


def expected_keys(rows, tags, start_us, end_us, qualities=()) -> list[tuple]:
    out = [(r.us, r.tag_id, r.value, r.quality) for r in rows
           if r.tag_id in tags and start_us <= r.us < end_us and (not qualities or r.quality in qualities)]
    return sorted(out, key=lambda k: (k[0], k[1]))


async def read_all_pages(stub, f, page_size: int) -> tuple[list[reading_pb2.Reading], int]:
    got, token, pages = [], "", 0
    while True:
        page = await stub.QueryReadings(pb.QueryReadingsRequest(filter=f, page_size=page_size, page_token=token))
        assert len(page.readings) <= page_size
        got += page.readings
        pages += 1
        token = page.next_page_token
        if not token:
            return got, pages
        assert pages < 500


async def test_pages_cover_the_range_once_in_time_then_tag_order(loaded) -> None:
    ingest, rows = loaded
    start, end = T0_US + 1800 * S, T0_US + 5400 * S
    f = rfilter(tag_ids=[2, 1, 3], start_us=start, end_us=end)
    want = expected_keys(rows, {1, 2, 3}, start, end)
    by_value = sorted(want, key=lambda k: (k[0], k[1], k[2] or 0))
    # the six readings of tag 2 at one instant: a page that ends in the middle of them
    tie = next(i for i, k in enumerate(want) if k[0] == T0_US + 3600 * S and k[1] == 2)
    for page_size in (37, tie + 3):
        got, pages = await read_all_pages(ingest.stub, f, page_size)
        assert pages == math.ceil(len(want) / page_size)
        assert [key(r)[:2] for r in got] == [w[:2] for w in want]  # order: time, then tag
        assert sorted(key(r) for r in got) == by_value, page_size  # every reading, once
        assert all(r.plc_id == "press-1" for r in got)


async def test_page_size_defaults_and_hard_limit(loaded) -> None:
    ingest, _ = loaded
    page = await ingest.stub.QueryReadings(pb.QueryReadingsRequest(filter=rfilter(tag_ids=[1, 2, 3, 4])))
    assert len(page.readings) == 1000 and page.next_page_token
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await ingest.stub.QueryReadings(pb.QueryReadingsRequest(filter=rfilter(tag_ids=[1]), page_size=10_001))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "page_size" in field_violations(err.value)


async def test_bad_page_tokens_and_filters_are_invalid_argument(loaded) -> None:
    ingest, _ = loaded
    page = await ingest.stub.QueryReadings(pb.QueryReadingsRequest(filter=rfilter(tag_ids=[1]), page_size=5))
    cases = [
        (pb.QueryReadingsRequest(filter=rfilter(tag_ids=[1]), page_token="garbage"), "page_token"),
        # a token is bound to its filter
        (pb.QueryReadingsRequest(filter=rfilter(tag_ids=[2]), page_token=page.next_page_token), "page_token"),
        # a well-formed token of this filter whose cursor no row can have (past year 9999)
        (pb.QueryReadingsRequest(filter=rfilter(tag_ids=[1]), page_token=encode_page_token(
            filter_fingerprint(rfilter(tag_ids=[1]).SerializeToString(deterministic=True)),
            f"{253_402_300_800 * 1_000_000},1,0,0")), "page_token"),
        (pb.QueryReadingsRequest(filter=rfilter(tag_ids=[1], start_us=T0_US, end_us=T0_US)), "filter"),
        (pb.QueryReadingsRequest(filter=rfilter()), "filter"),
        (pb.QueryReadingsRequest(), "filter"),
        (pb.QueryReadingsRequest(filter=rfilter(tag_ids=[0])), "filter.tag_ids[0]"),
        (pb.QueryReadingsRequest(filter=rfilter(tag_ids=[2**63])), "filter.tag_ids[0]"),
    ]
    for request, field in cases:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await ingest.stub.QueryReadings(request)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert field in field_violations(err.value), (field, field_violations(err.value))


async def test_filters_by_plc_quality_and_tags(loaded) -> None:
    ingest, rows = loaded
    window = (T0_US, T0_US + 1200 * S)
    by_plc = await ingest.stub.QueryReadings(pb.QueryReadingsRequest(filter=rfilter(plc_id="press-2", start_us=window[0],
                                                                                    end_us=window[1])))
    assert [key(r) for r in by_plc.readings] == expected_keys(rows, {4}, *window)
    bad_only = await ingest.stub.QueryReadings(pb.QueryReadingsRequest(
        filter=rfilter(plc_id="press-1", qualities=[COMM, STALE], end_us=T0_US + 7200 * S), page_size=10_000))
    assert [key(r) for r in bad_only.readings] == expected_keys(rows, {1, 2, 3}, T0_US, T0_US + 7200 * S, (COMM, STALE))
    assert all(not r.HasField("value") and r.quality == COMM for r in bad_only.readings if r.quality != STALE)
    # a PLC and tags together: the PLC's tags among those named
    both = await ingest.stub.QueryReadings(pb.QueryReadingsRequest(filter=rfilter(tag_ids=[3, 4], plc_id="press-1",
                                                                                  start_us=window[0], end_us=window[1])))
    assert {r.tag_id for r in both.readings} == {3}
    none = await ingest.stub.QueryReadings(pb.QueryReadingsRequest(filter=rfilter(plc_id="no-such-plc")))
    assert list(none.readings) == [] and not none.next_page_token


async def test_export_streams_the_whole_range_in_chunks(ingest) -> None:
    rows = [Row(1 + i % 3, T0_US + i * S, float(i), GOOD, "press-1") for i in range(12_000)]
    batches = [batch("exp", n + 1, [to_reading(r) for r in rows[i:i + 2000]]) for n, i in enumerate(range(0, 12_000, 2000))]
    await stream_batches(ingest.stub, "exp", batches)
    chunks = [c async for c in ingest.stub.ExportReadings(pb.ExportReadingsRequest(
        filter=rfilter(tag_ids=[1, 2, 3], end_us=T0_US + 20_000 * S)))]
    assert len(chunks) == 3 and all(0 < len(c.readings) <= 5000 for c in chunks)
    got = [key(r) for c in chunks for r in c.readings]
    assert got == expected_keys(rows, {1, 2, 3}, T0_US, T0_US + 20_000 * S)


def expected_buckets(rows, tags, start_us, end_us, width_s, qualities=()):
    groups: dict[tuple[int, int], list[Row]] = {}
    for r in rows:
        if r.tag_id in tags and start_us <= r.us < end_us and (not qualities or r.quality in qualities):
            bucket = (r.us // (width_s * S)) * width_s * S  # aligned to the Unix epoch
            groups.setdefault((r.tag_id, bucket), []).append(r)
    out = []
    nan = math.nan
    for (tag, bucket), rs in sorted(groups.items()):
        # first/last: earliest/latest reading; readings of one instant are ordered by value
        nums = sorted(((r.us, r.value) for r in rs if r.value is not None))
        values = [v for _, v in nums]
        if not values:  # only failures in the bucket: counted, no numbers
            out.append((tag, bucket, len(rs), nan, nan, nan, nan, nan))
            continue
        out.append((tag, bucket, len(rs), min(values), max(values), statistics.fmean(values),
                    nums[0][1], nums[-1][1]))
    return out


@pytest.mark.parametrize(("width", "qualities"), [(600, ()), (3600, ()), (420, (GOOD,)), (7, ())])
async def test_bucketed_aggregates_match_values_computed_here(loaded, width: int, qualities: tuple[int, ...]) -> None:
    ingest, rows = loaded
    start, end = T0_US + 250 * S, T0_US + 4000 * S  # not aligned to any bucket
    response = await ingest.stub.AggregateReadings(pb.AggregateReadingsRequest(
        filter=rfilter(tag_ids=[1, 2, 3], start_us=start, end_us=end, qualities=qualities), bucket_seconds=width))
    got = [(b.tag_id, b.start_time.seconds * S, b.count, b.min, b.max, b.avg, b.first, b.last) for b in response.buckets]
    want = expected_buckets(rows, {1, 2, 3}, start, end, width, qualities)
    assert [g[:3] for g in got] == [w[:3] for w in want]
    for g, w in zip(got, want):
        assert all(math.isclose(a, b, rel_tol=1e-12, abs_tol=1e-12) or (math.isnan(a) and math.isnan(b))
                   for a, b in zip(g[3:], w[3:])), (g, w)
    assert any(g[0] == 2 and g[2] >= 6 for g in got)  # the instant with six readings of tag 2 is covered


async def test_too_many_buckets_is_invalid_argument(loaded) -> None:
    ingest, _ = loaded
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await ingest.stub.AggregateReadings(pb.AggregateReadingsRequest(
            filter=rfilter(tag_ids=[1, 2], end_us=T0_US + 30 * 86_400 * S), bucket_seconds=1))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "bucket_seconds" in field_violations(err.value)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await ingest.stub.AggregateReadings(pb.AggregateReadingsRequest(filter=rfilter(tag_ids=[1]), bucket_seconds=0))
    assert "bucket_seconds" in field_violations(err.value)


def expected_summary(rows, tag, start_us, end_us, lsl=None, usl=None):
    good = [r for r in rows if r.tag_id == tag and start_us <= r.us < end_us and r.quality == GOOD and r.value is not None]
    values = [r.value for r in good]
    hours = [(r.us - start_us) / 3600 / S for r in good]
    mean, sd = statistics.fmean(values), statistics.stdev(values)
    slope, intercept = statistics.linear_regression(hours, values)
    cp = (usl - lsl) / (6 * sd) if lsl is not None and usl is not None else None
    sides = [x for x in ((usl - mean) / (3 * sd) if usl is not None else None,
                         (mean - lsl) / (3 * sd) if lsl is not None else None) if x is not None]
    return dict(count=len(values), mean=mean, stddev=sd, min=min(values), max=max(values), cp=cp,
                cpk=min(sides) if sides else None, slope_per_hour=slope, intercept=intercept)


@pytest.mark.parametrize(("tag", "lsl", "usl"), [(1, 10.0, 40.0), (1, None, 27.5), (2, 0.0, None), (3, None, None)])
async def test_statistics_match_values_computed_here(loaded, tag: int, lsl, usl) -> None:
    ingest, rows = loaded
    start, end = T0_US + 600 * S, T0_US + 6600 * S
    request = pb.SummarizeReadingsRequest(tag_id=tag, start_time=ts_us(start), end_time=ts_us(end))
    if lsl is not None:
        request.lower_spec_limit = lsl
    if usl is not None:
        request.upper_spec_limit = usl
    summary = (await ingest.stub.SummarizeReadings(request)).summary
    want = expected_summary(rows, tag, start, end, lsl, usl)
    assert summary.count == want["count"]
    for name in ("mean", "stddev", "min", "max", "cp", "cpk", "slope_per_hour", "intercept"):
        if want[name] is None:
            assert not summary.HasField(name), name
        else:
            got = getattr(summary, name)
            assert math.isclose(got, want[name], rel_tol=1e-9, abs_tol=1e-9), (name, got, want[name])


async def test_statistics_of_too_few_readings(loaded) -> None:
    ingest, _ = loaded
    one = (await ingest.stub.SummarizeReadings(pb.SummarizeReadingsRequest(
        tag_id=1, start_time=ts_us(T0_US), end_time=ts_us(T0_US + 5 * S), lower_spec_limit=0, upper_spec_limit=1,
    ))).summary
    assert one.count == 1 and one.stddev == 0 and one.mean == one.min == one.max == 20.0
    assert not one.HasField("cp") and not one.HasField("cpk") and not one.HasField("slope_per_hour")
    none = (await ingest.stub.SummarizeReadings(pb.SummarizeReadingsRequest(
        tag_id=99, start_time=ts_us(T0_US), end_time=ts_us(T0_US + 5 * S)))).summary
    assert none.count == 0 and not none.HasField("intercept")


async def test_statistics_reject_bad_ranges_and_limits(loaded) -> None:
    ingest, _ = loaded
    cases = [
        (pb.SummarizeReadingsRequest(tag_id=1, start_time=ts_us(T0_US), end_time=ts_us(T0_US)), "end_time"),
        (pb.SummarizeReadingsRequest(tag_id=1, start_time=ts_us(T0_US), end_time=ts_us(T0_US + S),
                                     lower_spec_limit=5, upper_spec_limit=4), "upper_spec_limit"),
        (pb.SummarizeReadingsRequest(tag_id=1, start_time=ts_us(T0_US)), "end_time"),
        (pb.SummarizeReadingsRequest(tag_id=0, start_time=ts_us(T0_US), end_time=ts_us(T0_US + S)), "tag_id"),
    ]
    for request, field in cases:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await ingest.stub.SummarizeReadings(request)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert field in field_violations(err.value), (field, field_violations(err.value))
