"""protovalidate, turned into the domain's field violations. No gRPC here: domain code uses it too.

Two checks run before protovalidate, both driven by the descriptors:

* list sizes: a repeated field holding more than its ``max_items`` is reported on its own, without
  validating its items (a CreatePlc with 100,000 tags is refused at once, not after 100,000 tag checks);
* time values: protovalidate's ``timestamp``/``duration`` rules compare values but do not refuse a
  Timestamp whose ``nanos`` is outside 0..999,999,999, or a Duration whose ``nanos`` is out of range or of
  the other sign than its ``seconds``; those are refused here, for every Timestamp and Duration field.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import importlib
import multiprocessing

import protovalidate
from buf.validate import validate_pb2
from google.protobuf import descriptor, descriptor_pool, duration_pb2, message, message_factory, timestamp_pb2

from .errors import FieldViolation

#: Violations reported per answer; the rest are counted (runtime/interceptors.py, `omitted_violations`).
MAX_VIOLATIONS = 100
#: protobuf's Duration range, ±10,000 years.
MAX_DURATION_SECONDS = 315_576_000_000

#: Time fields the pre-check leaves to code that checks them anyway: ingest checks each reading's
#: read_time as it converts a batch (ingest/convert.py), and a batch holds up to 10,000 of them.
CHECKED_IN_CODE = frozenset({"fabrica.common.v1.Reading.read_time"})

_TIMESTAMP = timestamp_pb2.Timestamp.DESCRIPTOR.full_name
_DURATION = duration_pb2.Duration.DESCRIPTOR.full_name
_MESSAGE = descriptor.FieldDescriptor.TYPE_MESSAGE


def field_path(violation: protovalidate.Violation) -> str:
    """``plc.tags[2].name`` from a protovalidate violation."""
    parts: list[str] = []
    for element in violation.proto.field.elements:
        part = element.field_name
        subscript = element.subscript  # a protobuf-py oneof: .field names the member, .value holds it
        if subscript is not None:
            if subscript.field == "index":
                part += f"[{subscript.value}]"
            else:
                part += f"[{subscript.value!r}]"
        parts.append(part)
    return ".".join(parts)


def max_items(desc: descriptor.FieldDescriptor) -> int:
    """The ``repeated.max_items`` rule of a field; 0 when it has none."""
    return desc.GetOptions().Extensions[validate_pb2.field].repeated.max_items


def _is_map(f: descriptor.FieldDescriptor) -> bool:
    return f.message_type is not None and f.message_type.GetOptions().map_entry


@functools.cache
def _plan(desc: descriptor.Descriptor) -> tuple[tuple[descriptor.FieldDescriptor, str, int], ...]:
    """The fields of `desc` the pre-checks look at: (field, kind, max_items), kind being ``timestamp``,
    ``duration``, ``message`` (descend) or ``list`` (a size rule only). Messages are not recursive here."""
    out = []
    for f in desc.fields:
        limit = max_items(f) if f.is_repeated else 0
        if f.type != _MESSAGE or _is_map(f):
            if limit:
                out.append((f, "list", limit))
            continue
        name = f.message_type.full_name
        if f.full_name in CHECKED_IN_CODE:
            continue
        if name == _TIMESTAMP:
            out.append((f, "timestamp", limit))
        elif name == _DURATION:
            out.append((f, "duration", limit))
        elif _plan(f.message_type):
            out.append((f, "message", limit))
        elif limit:
            out.append((f, "list", limit))
    return tuple(out)


def _time_violation(kind: str, value: message.Message) -> str | None:
    seconds, nanos = value.seconds, value.nanos  # type: ignore[attr-defined]
    if kind == "timestamp":
        return None if 0 <= nanos <= 999_999_999 else "nanos must be 0 to 999,999,999"
    if not -999_999_999 <= nanos <= 999_999_999:
        return "nanos must be -999,999,999 to 999,999,999"
    if (seconds > 0 and nanos < 0) or (seconds < 0 and nanos > 0):
        return "seconds and nanos must have the same sign"
    if not -MAX_DURATION_SECONDS <= seconds <= MAX_DURATION_SECONDS:
        return "must be within ±10,000 years"
    return None


def _prechecks(msg: message.Message, path: str, sizes: list[FieldViolation], times: list[FieldViolation]) -> None:
    for f, kind, limit in _plan(msg.DESCRIPTOR):
        name = f"{path}.{f.name}" if path else f.name
        if f.is_repeated:
            items = getattr(msg, f.name)
            if limit and len(items) > limit:
                sizes.append(FieldViolation(name, f"must contain no more than {limit} item(s), has {len(items)}"))
                continue
            if kind == "list":
                continue
            for i, item in enumerate(items):
                if kind == "message":
                    _prechecks(item, f"{name}[{i}]", sizes, times)
                elif (found := _time_violation(kind, item)) is not None:
                    times.append(FieldViolation(f"{name}[{i}]", found))
        elif msg.HasField(f.name):
            value = getattr(msg, f.name)
            if kind == "message":
                _prechecks(value, name, sizes, times)
            elif (found := _time_violation(kind, value)) is not None:
                times.append(FieldViolation(name, found))


def violations_of(msg: message.Message, prefix: str = "") -> list[FieldViolation]:
    """Every violation of `msg`, with paths under `prefix` (e.g. ``plc``): a list beyond its ``max_items``
    alone if there is one (its items are not checked), else bad time values and protovalidate's."""
    sizes: list[FieldViolation] = []
    times: list[FieldViolation] = []
    _prechecks(msg, "", sizes, times)
    found = sizes or times + [FieldViolation(field_path(v) or "(message)", v.proto.message or v.proto.rule_id)
                              for v in ([] if sizes else protovalidate.collect_violations(msg))]
    if prefix:
        found = [FieldViolation(f"{prefix}.{v.field}" if v.field != "(message)" else prefix, v.description)
                 for v in found]
    return found


#: Requests at least this large are validated in a worker process (see `OffLoopValidator`).
OFF_LOOP_BYTES = 256 * 1024


def _violations_of_serialized(type_name: str, module: str, data: bytes) -> list[tuple[str, str]]:
    """`violations_of` in a worker process: the message arrives serialized, the violations go back as pairs."""
    importlib.import_module(module)  # registers the message type in the default pool
    desc = descriptor_pool.Default().FindMessageTypeByName(type_name)
    msg = message_factory.GetMessageClass(desc).FromString(data)
    return [(v.field, v.description) for v in violations_of(msg)]


def _module_of(msg: message.Message) -> str:
    return msg.DESCRIPTOR.file.name.removesuffix(".proto").replace("/", ".") + "_pb2"


class OffLoopValidator:
    """Validates large messages away from the event loop.

    protovalidate holds the GIL while it checks a message, so a thread would not help: checking a CreatePlc
    with 5,000 bad tags takes the better part of a second, during which no other RPC of the process would
    be served. A message of OFF_LOOP_BYTES or more is therefore checked in one worker process (started on
    first use, with ``spawn``: forking a process that runs gRPC is unsafe); smaller ones, the vast majority,
    are checked in place, where a round trip to the worker would cost more than the check.
    """

    def __init__(self, threshold: int = OFF_LOOP_BYTES) -> None:
        self.threshold = threshold
        self._pool: concurrent.futures.ProcessPoolExecutor | None = None

    async def violations_of(self, msg: message.Message) -> list[FieldViolation]:
        size = msg.ByteSize()
        if size < self.threshold:
            return violations_of(msg)
        if self._pool is None:
            self._pool = concurrent.futures.ProcessPoolExecutor(
                max_workers=1, mp_context=multiprocessing.get_context("spawn"))
        found = await asyncio.get_running_loop().run_in_executor(
            self._pool, _violations_of_serialized, msg.DESCRIPTOR.full_name, _module_of(msg), msg.SerializeToString())
        return [FieldViolation(f, d) for f, d in found]

    def close(self) -> None:
        """Stop the worker process, if one was started."""
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
