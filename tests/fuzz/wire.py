"""Wire fuzzing generated from the descriptors: every RPC of every service in every ``fabrica.*`` proto file
(and grpc.health.v1), fed raw bytes over generic ``channel.unary_unary / unary_stream / stream_unary /
stream_stream`` calls with identity serializers, so a new RPC is fuzzed without anyone listing it.

For each RPC a seeded generator (:class:`Generator`, seeded by the run's seed and the RPC's path, so one
RPC's cases replay alone) builds a valid-looking request from the descriptor (every field filled with a
typical value, recursively; one member of each oneof) and derives the cases from it, round robin over
:data:`KINDS`: random bytes, truncations and bit flips of the valid bytes, extreme numbers, NUL in a string,
out-of-range timestamps, negative and huge durations, oversized strings and lists, enum numbers that do not
exist. A client-streaming RPC gets the valid message first, then the fuzzed one (garbage after ``open``).

:func:`call` sends one case and returns the status code it ended with (a server stream that stays open,
a watch, is read until it is idle, then cancelled: OK). :data:`SERVER_BUG` are the codes no input may
produce. Used by tests/fuzz/test_wire_fuzz.py and benchmarks/fuzz.py.

Loopback only: a case that decodes to a message with a ``host`` field (a PLC connection the collector's
ProbePlc / PreviewDecode would connect to) gets host 127.0.0.1 and a port where nothing listens, and a
``serial_port`` gets a path that does not exist, before it is sent (:func:`loopback_only`).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import math
import pkgutil
import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import message, message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor, ServiceDescriptor
from grpc_health.v1 import health_pb2

import fabrica
from fabrica_svc.runtime.timefmt import timestamp_is_valid

F = FieldDescriptor
KINDS = ("valid", "random", "truncated", "bitflip", "extreme", "nul", "timestamp", "duration",
         "oversized_string", "oversized_list", "unknown_enum")
#: Status codes that mean "server bug" whatever the input (UNAVAILABLE: the server went away).
SERVER_BUG = frozenset({grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL, grpc.StatusCode.DATA_LOSS,
                        grpc.StatusCode.UNAVAILABLE})
#: Beyond this a call is stalled (a failure too); far above what any case needs on a loaded machine.
DEADLINE = 30.0
OVERSIZED_LIST = 10_000
OVERSIZED_STRING = 1 << 20
MAX_DEPTH = 5
#: Well-known types the builder does not fill (open-ended content); they stay unset.
_OPAQUE = {"google.protobuf.Struct", "google.protobuf.Value", "google.protobuf.ListValue", "google.protobuf.Any"}
_TIMESTAMP, _DURATION = "google.protobuf.Timestamp", "google.protobuf.Duration"
_INTS = {F.TYPE_INT32: (-(2**31), 2**31 - 1), F.TYPE_SINT32: (-(2**31), 2**31 - 1),
         F.TYPE_SFIXED32: (-(2**31), 2**31 - 1), F.TYPE_INT64: (-(2**63), 2**63 - 1),
         F.TYPE_SINT64: (-(2**63), 2**63 - 1), F.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
         F.TYPE_UINT32: (0, 2**32 - 1), F.TYPE_FIXED32: (0, 2**32 - 1), F.TYPE_UINT64: (0, 2**64 - 1),
         F.TYPE_FIXED64: (0, 2**64 - 1)}
_FLOATS = {F.TYPE_DOUBLE: (math.nan, math.inf, -math.inf, 1.7e308, -1.7e308, -0.0, 5e-324),
           F.TYPE_FLOAT: (math.nan, math.inf, -math.inf, 3.4e38, -3.4e38, -0.0)}
#: (seconds, nanos): nanos out of range, past year 9999, before year 1, the int64 extremes.
BAD_TIMESTAMPS = ((0, 1_000_000_000), (1_740_787_200, -1), (253_402_300_800, 0), (-62_135_596_801, 0),
                  (2**63 - 1, 999_999_999), (-(2**63), 0))
#: (seconds, nanos): negative, mixed signs, nanos out of range, beyond ±10,000 years, int64 extremes.
BAD_DURATIONS = ((-5, 0), (0, -1), (1, -500_000_000), (0, 1_000_000_000), (315_576_000_001, 0),
                 (2**63 - 1, 0), (-(2**63), 0))


@dataclass(frozen=True)
class Rpc:
    service: str
    name: str
    request: type[message.Message]
    client_streaming: bool
    server_streaming: bool

    @property
    def path(self) -> str:
        return f"/{self.service}/{self.name}"


@dataclass(frozen=True)
class Case:
    kind: str
    #: The request messages as sent: one, or (client streaming) the valid first message and the fuzzed one.
    payloads: tuple[bytes, ...]

    def hex(self) -> str:
        return " ".join(p.hex() for p in self.payloads)


def fabrica_services() -> list[ServiceDescriptor]:
    """Every service declared in a generated ``fabrica.*`` proto module (imported from gen/)."""
    found: dict[str, ServiceDescriptor] = {}
    for info in pkgutil.walk_packages(fabrica.__path__, "fabrica."):
        if info.name.endswith("_pb2"):
            for service in importlib.import_module(info.name).DESCRIPTOR.services_by_name.values():
                found[service.full_name] = service
    return [found[name] for name in sorted(found)]


HEALTH = health_pb2.DESCRIPTOR.services_by_name["Health"]


def rpcs(service: ServiceDescriptor) -> list[Rpc]:
    return [Rpc(service.full_name, m.name, message_factory.GetMessageClass(m.input_type), m.client_streaming,
                m.server_streaming) for m in service.methods]


class Generator:
    """The seeded cases of one RPC."""

    def __init__(self, rpc: Rpc, seed: int | str):
        self.rpc = rpc
        self.rng = random.Random(f"{seed}:{rpc.path}")

    # --- a valid-looking message from the descriptor ---------------------------------------------------

    def build(self, cls: type[message.Message] | None = None) -> message.Message:
        msg = (cls or self.rpc.request)()
        self._fill(msg, 0)
        return msg

    def _fill(self, msg: message.Message, depth: int) -> None:
        desc: Descriptor = msg.DESCRIPTOR
        if desc.full_name == _TIMESTAMP:
            msg.seconds, msg.nanos = 1_740_787_200 + self.rng.randrange(86_400), 0  # in 2025-03-01
            return
        if desc.full_name == _DURATION:
            msg.seconds = self.rng.choice((1, 5, 60))
            return
        chosen = {o.name: self.rng.choice(o.fields) for o in desc.oneofs if o.fields}
        for fd in desc.fields:
            oneof = fd.containing_oneof
            if oneof is not None and chosen.get(oneof.name) is not fd:
                continue
            if oneof is None and self.rng.random() < 0.15:
                continue  # now and then a field stays unset
            self._set_typical(msg, fd, depth)

    def _set_typical(self, msg: message.Message, fd: FieldDescriptor, depth: int) -> None:
        if fd.message_type is not None:
            if fd.message_type.full_name in _OPAQUE or depth >= MAX_DEPTH:
                return
            if fd.message_type.GetOptions().map_entry:
                key_fd, value_fd = fd.message_type.fields_by_name["key"], fd.message_type.fields_by_name["value"]
                if value_fd.message_type is None:
                    getattr(msg, fd.name)[self._typical(key_fd)] = self._typical(value_fd)
                else:
                    self._fill(getattr(msg, fd.name)[self._typical(key_fd)], depth + 1)
                return
            if fd.is_repeated:
                for _ in range(self.rng.randint(1, 2)):
                    self._fill(getattr(msg, fd.name).add(), depth + 1)
            else:
                sub = getattr(msg, fd.name)
                sub.SetInParent()
                self._fill(sub, depth + 1)
            return
        if fd.is_repeated:
            getattr(msg, fd.name).extend(self._typical(fd) for _ in range(self.rng.randint(1, 2)))
        else:
            setattr(msg, fd.name, self._typical(fd))

    def _typical(self, fd: FieldDescriptor) -> Any:
        t = fd.type
        if t == F.TYPE_STRING:
            return self.rng.choice(("press-1", "line-2", "cell-1", "a", "Press 1"))
        if t == F.TYPE_BYTES:
            return b"\x01\x02\x03"
        if t == F.TYPE_BOOL:
            return self.rng.random() < 0.5
        if t == F.TYPE_ENUM:
            numbers = [v.number for v in fd.enum_type.values if v.number != 0]
            return self.rng.choice(numbers) if numbers else 0
        if t in _FLOATS:
            return self.rng.choice((0.5, 1.0, 42.25))
        return self.rng.choice((1, 2, 10, 100))

    # --- the cases -------------------------------------------------------------------------------------

    def cases(self, count: int) -> Iterator[Case]:
        """`count` cases, the kinds round robin (from a seeded starting point)."""
        start = self.rng.randrange(len(KINDS))
        for i in range(count):
            yield self.case(KINDS[(start + i) % len(KINDS)])

    def case(self, kind: str) -> Case:
        valid = self.build()
        fuzzed = self._fuzz(kind, valid)
        if fuzzed is None:
            kind, fuzzed = "bitflip", self._flip(valid.SerializeToString())
        if self.rpc.client_streaming and kind != "valid":
            first = self.build().SerializeToString()
            return Case(kind, (first, fuzzed))
        return Case(kind, (fuzzed,))

    def _fuzz(self, kind: str, valid: message.Message) -> bytes | None:
        rng = self.rng
        raw = valid.SerializeToString()
        match kind:
            case "valid":
                return raw
            case "random":
                return rng.randbytes(rng.randrange(1, 96))
            case "truncated":
                return raw[:rng.randrange(1, len(raw))] if len(raw) > 1 else None
            case "bitflip":
                return self._flip(raw)
        fields = list(_fields(valid))
        picked = [(m, fd) for m, fd in fields if _MUTATIONS[kind](fd)]
        if not picked:
            return None
        parent, fd = rng.choice(picked)
        try:
            getattr(self, f"_mutate_{kind}")(parent, fd)
        except (ValueError, TypeError):  # e.g. an unknown number in a closed enum: not representable
            return None
        return valid.SerializeToString()

    def _flip(self, raw: bytes) -> bytes:
        if not raw:
            return self.rng.randbytes(8)
        out = bytearray(raw)
        for _ in range(self.rng.randint(1, 3)):
            bit = self.rng.randrange(len(out) * 8)
            out[bit // 8] ^= 1 << (bit % 8)
        return bytes(out)

    def _assign(self, parent: message.Message, fd: FieldDescriptor, value: Any) -> None:
        if fd.is_repeated:
            container = getattr(parent, fd.name)
            container.append(value)
        else:
            setattr(parent, fd.name, value)

    def _mutate_extreme(self, parent: message.Message, fd: FieldDescriptor) -> None:
        choices = _INTS.get(fd.type) or _FLOATS[fd.type]
        self._assign(parent, fd, self.rng.choice(choices))

    def _mutate_nul(self, parent: message.Message, fd: FieldDescriptor) -> None:
        self._assign(parent, fd, self.rng.choice(("\x00", "press\x00-1", "press-1\x00")))

    def _mutate_timestamp(self, parent: message.Message, fd: FieldDescriptor) -> None:
        ts = getattr(parent, fd.name).add() if fd.is_repeated else getattr(parent, fd.name)
        ts.seconds, ts.nanos = self.rng.choice(BAD_TIMESTAMPS)

    def _mutate_duration(self, parent: message.Message, fd: FieldDescriptor) -> None:
        d = getattr(parent, fd.name).add() if fd.is_repeated else getattr(parent, fd.name)
        d.seconds, d.nanos = self.rng.choice(BAD_DURATIONS)

    def _mutate_oversized_string(self, parent: message.Message, fd: FieldDescriptor) -> None:
        size = self.rng.choice((65_537, OVERSIZED_STRING))
        self._assign(parent, fd, b"\xab" * size if fd.type == F.TYPE_BYTES else "x" * size)

    def _mutate_oversized_list(self, parent: message.Message, fd: FieldDescriptor) -> None:
        container = getattr(parent, fd.name)
        if fd.message_type is not None:
            element = self.build(message_factory.GetMessageClass(fd.message_type))
            container.extend(element for _ in range(OVERSIZED_LIST))
        else:
            value = self._typical(fd)
            container.extend(value for _ in range(OVERSIZED_LIST))

    def _mutate_unknown_enum(self, parent: message.Message, fd: FieldDescriptor) -> None:
        known = {v.number for v in fd.enum_type.values}
        self._assign(parent, fd, self.rng.choice([n for n in (12_345, -1, max(known) + 1, 2**31 - 1)
                                                  if n not in known]))


_MUTATIONS = {
    "extreme": lambda fd: fd.type in _INTS or fd.type in _FLOATS,
    "nul": lambda fd: fd.type == F.TYPE_STRING,
    "timestamp": lambda fd: fd.message_type is not None and fd.message_type.full_name == _TIMESTAMP,
    "duration": lambda fd: fd.message_type is not None and fd.message_type.full_name == _DURATION,
    "oversized_string": lambda fd: fd.type in (F.TYPE_STRING, F.TYPE_BYTES),
    "oversized_list": lambda fd: fd.is_repeated and not (fd.message_type and fd.message_type.GetOptions().map_entry),
    "unknown_enum": lambda fd: fd.type == F.TYPE_ENUM,
}


def _fields(msg: message.Message) -> Iterator[tuple[message.Message, FieldDescriptor]]:
    """Every (message, field) of `msg`'s tree that a mutation may change: the fields of `msg` and of each
    message set in it (map entries aside), except inside Timestamp and Duration, which are mutated whole."""
    if msg.DESCRIPTOR.full_name in (_TIMESTAMP, _DURATION):
        return
    for fd in msg.DESCRIPTOR.fields:
        if fd.containing_oneof is not None and msg.WhichOneof(fd.containing_oneof.name) != fd.name:
            continue
        yield msg, fd
        if fd.message_type is None or fd.message_type.GetOptions().map_entry:
            continue
        if fd.is_repeated:
            for sub in getattr(msg, fd.name):
                yield from _fields(sub)
        elif msg.HasField(fd.name):
            yield from _fields(getattr(msg, fd.name))


def loopback_only(cls: type[message.Message], payload: bytes, closed_port: int) -> bytes:
    """`payload`, or (when it decodes as `cls` and names a host or a serial port somewhere) the same
    message re-encoded with host 127.0.0.1 and `closed_port` (a port where nothing listens; a port the
    contract refuses is kept) and a serial port that does not exist: no case reaches beyond loopback."""
    try:
        msg = cls.FromString(payload)
    except message.DecodeError:
        return payload  # the server cannot decode it either
    if not _confine(msg, closed_port):
        return payload
    return msg.SerializeToString()


def _confine(msg: message.Message, closed_port: int) -> bool:
    changed = False
    names = msg.DESCRIPTOR.fields_by_name
    if "host" in names and names["host"].type == F.TYPE_STRING and not names["host"].is_repeated:
        if msg.host != "127.0.0.1":
            msg.host, changed = "127.0.0.1", True
        port = names.get("port")
        # Unset or 0 means the default port (502, 102): replaced too; only a number above 65535 is kept.
        if port is not None and port.type in _INTS and not port.is_repeated:
            if msg.port <= 65_535 and msg.port != closed_port:
                msg.port, changed = closed_port, True
    if "serial_port" in names and msg.serial_port != "/nonexistent/fabrica-fuzz":
        msg.serial_port, changed = "/nonexistent/fabrica-fuzz", True
    for fd, value in msg.ListFields():
        if fd.message_type is None or fd.message_type.GetOptions().map_entry:
            continue
        for sub in (value if fd.is_repeated else (value,)):
            changed = _confine(sub, closed_port) or changed
    return changed


# --- sending ---------------------------------------------------------------------------------------------


async def _drain(call: Any, idle: float, max_messages: int = 200) -> grpc.StatusCode:
    """Read a response stream until it ends (its code) or stays idle for `idle` seconds (cancelled: OK)."""
    for _ in range(max_messages):
        read = asyncio.ensure_future(call.read())
        done, _ = await asyncio.wait({read}, timeout=idle)
        if not done:
            call.cancel()
            with contextlib.suppress(BaseException):
                await read
            return grpc.StatusCode.OK
        try:
            response = read.result()
        except grpc.aio.AioRpcError as err:
            return err.code()
        if response is grpc.aio.EOF:
            return await call.code()
    call.cancel()
    return grpc.StatusCode.OK


async def call(channel: grpc.aio.Channel, rpc: Rpc, case: Case, *, idle: float = 0.3,
               deadline: float = DEADLINE) -> grpc.StatusCode:
    """Send `case` to `rpc` as raw bytes; the status code the call ended with."""
    try:
        if rpc.client_streaming and rpc.server_streaming:
            return await _drain(channel.stream_stream(rpc.path)(iter(case.payloads), timeout=deadline), idle)
        if rpc.client_streaming:
            await channel.stream_unary(rpc.path)(iter(case.payloads), timeout=deadline)
        elif rpc.server_streaming:
            return await _drain(channel.unary_stream(rpc.path)(case.payloads[0], timeout=deadline), idle)
        else:
            await channel.unary_unary(rpc.path)(case.payloads[0], timeout=deadline)
    except grpc.aio.AioRpcError as err:
        return err.code()
    return grpc.StatusCode.OK


#: The receive limit of the fuzzing channel (oversized cases must reach the server, and big answers return).
CHANNEL_OPTIONS = [("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)]


def contract_flaws(cls: type[message.Message], payloads: tuple[bytes, ...]) -> set[str]:
    """What in the decoded request a contract rule of issue 14 refuses, whatever case kind produced it (a bit
    flip can make a NUL too): ``nul`` (a NUL in a string), ``timestamp`` (outside 0001-01-01 .. 9999-12-31
    or nanos outside 0 .. 999,999,999), ``duration`` (negative, or nanos out of range). Empty for a request
    that does not decode."""
    found: set[str] = set()
    for payload in payloads:
        try:
            _flaws(cls.FromString(payload), found)
        except message.DecodeError:
            pass
    return found


def _flaws(msg: message.Message, found: set[str]) -> None:
    name = msg.DESCRIPTOR.full_name
    if name == _TIMESTAMP:
        if not timestamp_is_valid(msg.seconds, msg.nanos):
            found.add("timestamp")
        return
    if name == _DURATION:
        if msg.seconds < 0 or msg.nanos < 0 or msg.nanos >= 1_000_000_000:
            found.add("duration")
        return
    for fd, value in msg.ListFields():
        values = value.values() if fd.message_type is not None and fd.message_type.GetOptions().map_entry \
            else value if fd.is_repeated else (value,)
        if fd.message_type is not None and fd.message_type.GetOptions().map_entry:
            keys = list(value.keys())
            if any(isinstance(k, str) and "\x00" in k for k in keys):
                found.add("nul")
        for v in values:
            if isinstance(v, message.Message):
                _flaws(v, found)
            elif isinstance(v, str) and "\x00" in v:
                found.add("nul")
