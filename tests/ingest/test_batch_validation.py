"""Differential test: ingest's one validation of a ReadingBatch (convert.batch_from_proto, in the conversion
loop) gives protovalidate's verdicts, with the same field paths and descriptions in the same order, on
thousands of generated batches that break every rule of fabrica/common/v1/reading.proto (and those only
code checks), alone and together. StreamReadings opts out of the interceptor's check
(``@validates_own_requests``); every other RPC of every service keeps it (checked here too)."""

from __future__ import annotations

import importlib
import inspect

import pytest
from google.protobuf import timestamp_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fabrica.common.v1 import reading_pb2
from fabrica.ingest.v1 import ingest_service_pb2 as pb
from fabrica_svc.ingest.convert import batch_from_proto
from fabrica_svc.runtime.errors import InvalidArgument
from fabrica_svc.runtime.interceptors import VALIDATES_OWN_REQUESTS
from fabrica_svc.runtime.timefmt import MAX_TIMESTAMP_SECONDS, MIN_TIMESTAMP_SECONDS
from fabrica_svc.runtime.validation import violations_of

MAX_BIGINT = 2**63 - 1
U64 = 2**64 - 1

# --- strategies: each field is mostly valid, sometimes on a boundary, sometimes wrong ---------------------

valid_ids = st.from_regex(r"\A[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\Z")
collector_ids = st.one_of(
    valid_ids, valid_ids,
    st.sampled_from(["", "a" * 63, "a" * 64, "a\n", "-a", "a-", "A", "é", "a b", "line-1\n", "\na", "a" * 200]),
    st.text(max_size=70),
)
u64s = st.one_of(st.integers(1, 10_000), st.sampled_from([0, 1, MAX_BIGINT, MAX_BIGINT + 1, U64]),
                 st.integers(0, U64))
seconds = st.one_of(st.integers(0, 2_000_000_000),
                    st.sampled_from([0, MIN_TIMESTAMP_SECONDS, MIN_TIMESTAMP_SECONDS - 1, MAX_TIMESTAMP_SECONDS,
                                     MAX_TIMESTAMP_SECONDS + 1, -1, -(2**63), 2**63 - 1]))
nanos = st.one_of(st.integers(0, 999_999_999), st.sampled_from([0, 999_999_999, 1_000_000_000, -1, -(2**31), 2**31 - 1]))
read_times = st.one_of(st.builds(timestamp_pb2.Timestamp, seconds=seconds, nanos=nanos), st.none())
long_strings = st.sampled_from([
    "x" * 65_536, "x" * 65_537, "é" * 32_768, "é" * 32_769, "😀" * 16_384, "😀" * 16_385, "x" * 16_384 + "é",
    "a\x00b", "\x00",
])
values = st.one_of(
    st.none(),
    st.just(reading_pb2.Value()),  # set, with no member: breaks the oneof's `required`
    st.builds(lambda b: reading_pb2.Value(bool_value=b), st.booleans()),
    st.builds(lambda i: reading_pb2.Value(int_value=i), st.integers(-(2**63), 2**63 - 1)),
    st.builds(lambda u: reading_pb2.Value(uint_value=u), st.integers(0, U64)),
    st.builds(lambda d: reading_pb2.Value(double_value=d), st.floats(allow_nan=True, allow_infinity=True)),
    st.builds(lambda s: reading_pb2.Value(string_value=s), st.one_of(st.text(max_size=20), long_strings)),
    st.builds(lambda b: reading_pb2.Value(bytes_value=b),
              st.one_of(st.binary(max_size=20), st.sampled_from([b"x" * 65_536, b"x" * 65_537]))),
)
qualities = st.one_of(st.integers(1, 5), st.integers(1, 5), st.integers(-3, 8), st.sampled_from([-(2**31), 2**31 - 1]))
roles = st.one_of(st.integers(0, 4), st.integers(0, 4), st.integers(-3, 8), st.sampled_from([-(2**31), 2**31 - 1]))
errors = st.one_of(st.just(""), st.text(max_size=30),
                   st.sampled_from(["x" * 1024, "x" * 1025, "é" * 1024, "é" * 1025, "bad\x00", "\x00"]))
plc_ids = st.one_of(st.from_regex(r"\A[a-z0-9-]{1,20}\Z"),
                    st.sampled_from(["", "p" * 63, "p" * 64, "é" * 63, "é" * 64, "p\x00", "\x00"]),
                    st.text(max_size=70))


@st.composite
def readings(draw: st.DrawFn) -> reading_pb2.Reading:
    r = reading_pb2.Reading(tag_id=draw(u64s), quality=draw(qualities), error=draw(errors), plc_id=draw(plc_ids),
                            role=draw(roles), tag_name=draw(st.text(max_size=5)), unit=draw(st.text(max_size=3)))
    ts = draw(read_times)
    if ts is not None:
        r.read_time.CopyFrom(ts)
    value = draw(values)
    if value is not None:
        r.value.CopyFrom(value)
    return r


#: Trace contexts (ReadingBatch.trace_context): none, valid ones, and ones breaking the pattern, max_len or
#: tracestate's max_bytes.
traceparents = st.one_of(
    st.just(""),
    st.from_regex(r"\A00-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}\Z"),
    st.text(max_size=60),
    st.from_regex(r"\A00-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}x+\Z"),
)
trace_contexts = st.one_of(
    st.none(),
    st.builds(lambda p, t: reading_pb2.TraceContext(traceparent=p, tracestate=t), traceparents,
              st.one_of(st.text(max_size=20), st.text(min_size=129, max_size=200))),
)


def _batch(c: str, s: int, rs: list[reading_pb2.Reading], tc: reading_pb2.TraceContext | None) -> reading_pb2.ReadingBatch:
    b = reading_pb2.ReadingBatch(collector_id=c, sequence=s, readings=rs)
    if tc is not None:
        b.trace_context.CopyFrom(tc)
    return b


batches = st.builds(_batch, collector_ids, u64s, st.lists(readings(), max_size=6), trace_contexts)


# --- valid batches only, to show acceptance is exercised as much as rejection -----------------------------

@st.composite
def good_batches(draw: st.DrawFn) -> reading_pb2.ReadingBatch:
    b = reading_pb2.ReadingBatch(collector_id=draw(valid_ids), sequence=draw(st.integers(1, MAX_BIGINT)))
    for _ in range(draw(st.integers(1, 6))):
        r = b.readings.add(tag_id=draw(st.integers(1, MAX_BIGINT)), quality=draw(st.integers(1, 5)),
                           role=draw(st.integers(0, 4)), plc_id=draw(st.from_regex(r"\A[a-z0-9-]{1,63}\Z")),
                           error=draw(st.text(max_size=30).filter(lambda e: "\x00" not in e)))
        r.read_time.seconds = draw(st.integers(MIN_TIMESTAMP_SECONDS, MAX_TIMESTAMP_SECONDS))
        r.read_time.nanos = draw(st.integers(0, 999_999_999))
        r.value.double_value = draw(st.floats())
    return b


# --- the reference: the interceptor's protovalidate check, then the checks only code makes --------------


def code_only(batch: reading_pb2.ReadingBatch) -> list[str]:
    """Field paths of the checks protovalidate cannot make (values Postgres cannot hold, a GOOD or STALE
    reading without a value), written plainly; reported only when the protos' rules all hold."""
    out = []
    if batch.sequence > MAX_BIGINT:
        out.append("batch.sequence")
    for i, r in enumerate(batch.readings):
        p = f"batch.readings[{i}]"
        kind = r.value.WhichOneof("kind") if r.HasField("value") else None
        if kind == "string_value" and "\x00" in r.value.string_value:
            out.append(f"{p}.value.string_value")
        if kind is None and r.quality in (reading_pb2.QUALITY_GOOD, reading_pb2.QUALITY_STALE):
            out.append(f"{p}.value")
        if r.tag_id > MAX_BIGINT:
            out.append(f"{p}.tag_id")
        if not (MIN_TIMESTAMP_SECONDS <= r.read_time.seconds <= MAX_TIMESTAMP_SECONDS
                and 0 <= r.read_time.nanos <= 999_999_999):
            out.append(f"{p}.read_time")
        if "\x00" in r.error:
            out.append(f"{p}.error")
        if "\x00" in r.plc_id:
            out.append(f"{p}.plc_id")
    return out[:50]


def ours(batch: reading_pb2.ReadingBatch) -> list[tuple[str, str]] | None:
    try:
        batch_from_proto(batch)
    except InvalidArgument as exc:
        return [(v.field, v.description) for v in exc.violations]
    return None


def check(batch: reading_pb2.ReadingBatch) -> bool:
    """Asserts both verdicts agree; True when the batch was accepted."""
    expected = [(v.field, v.description) for v in violations_of(pb.StreamReadingsRequest(batch=batch))]
    got = ours(batch)
    if expected:
        assert got == expected, f"protovalidate: {expected}\ningest: {got}\nbatch: {batch}"
        return False
    want = code_only(batch)
    assert (got is None) == (not want), f"code checks: {want}\ningest: {got}\nbatch: {batch}"
    if got is not None:
        assert [f for f, _ in got] == want
    return got is None


@settings(max_examples=4000, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(batches)
def test_any_batch_gets_protovalidates_verdict_and_field_paths(batch: reading_pb2.ReadingBatch) -> None:
    check(batch)


@settings(max_examples=1500, deadline=None)
@given(good_batches())
def test_valid_batches_are_accepted_by_both(batch: reading_pb2.ReadingBatch) -> None:
    assert check(batch)


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(good_batches(), st.data())
def test_one_broken_field_in_a_valid_batch_is_found_by_both(batch: reading_pb2.ReadingBatch, data: st.DataObject) -> None:
    """A valid batch with one field of one reading (or of the batch) replaced by any generated value."""
    r = batch.readings[data.draw(st.integers(0, len(batch.readings) - 1))]
    field = data.draw(st.sampled_from(["collector_id", "sequence", "tag_id", "read_time", "value", "quality",
                                       "error", "plc_id", "role"]))
    if field == "collector_id":
        batch.collector_id = data.draw(collector_ids)
    elif field == "sequence":
        batch.sequence = data.draw(u64s)
    elif field == "tag_id":
        r.tag_id = data.draw(u64s)
    elif field in ("read_time", "value"):
        new = data.draw(read_times if field == "read_time" else values)
        r.ClearField(field)
        if new is not None:
            getattr(r, field).CopyFrom(new)
    else:
        setattr(r, field, data.draw({"quality": qualities, "error": errors, "plc_id": plc_ids, "role": roles}[field]))
    check(batch)


@pytest.mark.parametrize("count", [0, 1, 10_000, 10_001, 25_000])
def test_the_readings_count_limits_agree(count: int) -> None:
    b = reading_pb2.ReadingBatch(collector_id="c", sequence=1)
    for i in range(count):
        b.readings.add(tag_id=1 + i, read_time={"seconds": 1}, quality=2, plc_id="p")
    if count == 25_000:
        b.readings.add(tag_id=0, quality=0)  # items beyond the limit are not looked at
    assert check(b) == (1 <= count <= 10_000)


def test_a_zero_read_time_that_is_set_is_valid_and_one_that_is_not_is_required() -> None:
    b = reading_pb2.ReadingBatch(collector_id="c", sequence=1)
    b.readings.add(tag_id=1, quality=2, plc_id="p").read_time.SetInParent()
    assert check(b)
    b.readings.add(tag_id=1, quality=2, plc_id="p")
    assert not check(b)
    assert ours(b) == [("batch.readings[1].read_time", "value is required")]


def test_stream_readings_is_the_one_method_that_validates_its_own_requests() -> None:
    """Every servicer method of every service: only IngestService.StreamReadings opts out of the interceptor."""
    opted = set()
    for module in ("fabrica_svc.ingest.servicer", "fabrica_svc.config.servicer", "fabrica_svc.production.servicer",
                   "fabrica_svc.collector.servicer", "fabrica_svc.alarm.servicer"):
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError:
            continue
        for name, cls in inspect.getmembers(mod, inspect.isclass):
            if cls.__module__ != module:
                continue
            for method, fn in inspect.getmembers(cls, inspect.isfunction):
                if getattr(fn, VALIDATES_OWN_REQUESTS, False):
                    opted.add(f"{name}.{method}")
    assert opted == {"IngestServicer.StreamReadings"}


async def test_over_the_wire_the_stream_answers_as_the_interceptor_did(ingest) -> None:  # noqa: ANN001
    """INVALID_ARGUMENT with the interceptor's message (the message's index in the stream, its violations)
    and BadRequest field violations, for an invalid open (protovalidate, in the servicer) and an invalid
    batch (the conversion loop)."""
    import grpc
    from grpc_helpers import field_violations

    call = ingest.stub.StreamReadings()
    await call.write(pb.StreamReadingsRequest(open=pb.StreamOpen(collector_id="Line 1")))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call.read()
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details() == ("message 0 of the stream is invalid: open.collector_id: does not match regex "
                                   "pattern `^[a-z0-9]([a-z0-9-]*[a-z0-9])?$`")
    assert list(field_violations(err.value)) == ["open.collector_id"]

    bad = reading_pb2.ReadingBatch(collector_id="line-1", sequence=1)
    bad.readings.add(tag_id=0, quality=1, plc_id="p", read_time={"seconds": 1}, value={"double_value": 1.0})
    call = ingest.stub.StreamReadings()
    await call.write(pb.StreamReadingsRequest(open=pb.StreamOpen(collector_id="line-1")))
    assert (await call.read()).WhichOneof("kind") == "resume"
    await call.write(pb.StreamReadingsRequest(batch=bad))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call.read()
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details() == "message 1 of the stream is invalid: batch.readings[0].tag_id: must be greater than 0"
    assert list(field_violations(err.value)) == ["batch.readings[0].tag_id"]
