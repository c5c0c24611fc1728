"""The contract's PLC and Tag messages against the tag model: conversion, rules, defaults.

* :func:`tag_spec` is the one place where a proto ``Tag`` becomes a :class:`TagSpec`.
* :func:`tag_violations` says why a tag cannot be polled from a PLC of its protocol: the address kind, then
  :func:`validate_spec` on its spec. The collector compiles exactly what this accepts.
* :func:`plc_violations` is what the config service accepts: the proto's own rules (protovalidate), names
  and poll groups, :func:`tag_violations` for every tag, and the rules about a tag's role. So a PLC that
  config accepts has only tags the collector can poll, and a rule is reported on the same field by both.
* :func:`with_defaults` writes in what unset means (ports, the Modbus TCP unit id, each tag's poll group);
  :func:`port_of` reads it.
* :func:`block_limits` is a PLC's ``BlockLimits`` as a :class:`BlockLimits` (None for each default), and
  :func:`limits_violations` the rules that relate those limits to the PLC's protocol and tags.

Every violation is a :class:`FieldViolation` with the path of the field it is about (``plc.tags[3].bit``).
"""

from __future__ import annotations

from dataclasses import dataclass

from fabrica.common.v1 import reading_pb2
from fabrica.config.v1 import plc_pb2

from ..runtime.errors import FieldViolation, InvalidArgument
from ..runtime.validation import max_items, violations_of
from .spec import (INTEGER_TYPES, VALUE_BYTES, DataType, S7Area, TagSpec, TagSpecError, byte_count, register_count,
                   validate_spec)

#: The TCP port of each networked connection when its ``port`` is not set.
DEFAULT_MODBUS_PORT = 502
DEFAULT_S7_PORT = 102
DEFAULT_PORTS: dict[str, int] = {
    "modbus_tcp": DEFAULT_MODBUS_PORT,
    "modbus_rtu_over_tcp": DEFAULT_MODBUS_PORT,
    "s7": DEFAULT_S7_PORT,
}
#: The contract's bounds on a PLC's lists (plc.proto), read from the descriptor.
_MAX_TAGS = max_items(plc_pb2.Plc.DESCRIPTOR.fields_by_name["tags"])
_MAX_POLL_GROUPS = max_items(plc_pb2.Plc.DESCRIPTOR.fields_by_name["poll_groups"])
#: The Modbus TCP unit id when not set (0): what devices and the seed configurations use.
DEFAULT_MODBUS_TCP_UNIT = 1
#: The roles whose values are counters (booked by production from their increments).
COUNTER_ROLES = frozenset({reading_pb2.TAG_ROLE_PRODUCTION_COUNTER, reading_pb2.TAG_ROLE_SCRAP_COUNTER})
#: A placeholder id for checking a definition that has none yet (config assigns ids when it stores a tag).
_NO_ID = 1
#: Seconds between reads of the tags a device was found to lack, when BlockLimits.absent_retry_interval is unset.
DEFAULT_ABSENT_RETRY = 600.0


@dataclass(frozen=True, slots=True)
class BlockLimits:
    """How a PLC's tags may be merged into block reads; None keeps the protocol's limit or default.

    Attributes:
        max_registers: Most registers per Modbus read (the protocol allows 125).
        max_bits: Most coils / discrete inputs per Modbus read (2000).
        max_s7_bytes: Most bytes per S7 read (the negotiated PDU's payload bounds it anyway).
        max_gap: Most unused addresses bridged inside one block (Modbus default 16, S7 unbounded).
        no_merge: Every tag is read on its own (tags on the very same addresses still share a read).
        absent_retry: Seconds between reads of the tags the device was found to lack.
    """

    max_registers: int | None = None
    max_bits: int | None = None
    max_s7_bytes: int | None = None
    max_gap: int | None = None
    no_merge: bool = False
    absent_retry: float = DEFAULT_ABSENT_RETRY


def block_limits(plc: plc_pb2.Plc) -> BlockLimits:
    """The PLC's block limits (every default when it sets none)."""
    if not plc.HasField("block_limits"):
        return BlockLimits()
    b = plc.block_limits

    def opt(name: str) -> int | None:
        return getattr(b, name) if b.HasField(name) else None

    retry = DEFAULT_ABSENT_RETRY
    if b.HasField("absent_retry_interval"):
        retry = b.absent_retry_interval.ToTimedelta().total_seconds() or DEFAULT_ABSENT_RETRY
    return BlockLimits(opt("max_registers"), opt("max_bits"), opt("max_s7_bytes"), opt("max_gap"), b.no_merge, retry)


def limits_violations(plc: plc_pb2.Plc, prefix: str = "plc") -> list[FieldViolation]:
    """The rules relating a PLC's block limits to its protocol and tags (the ranges are the proto's).

    A limit of the other protocol is refused (it would silently do nothing), ``no_merge`` excludes
    ``max_gap``, and every tag must fit in one read of the largest block allowed.
    """
    if not plc.HasField("block_limits"):
        return []
    b, path = plc.block_limits, f"{prefix}.block_limits"
    out: list[FieldViolation] = []
    s7 = is_s7(plc)
    for name in ("max_registers", "max_bits"):
        if s7 and b.HasField(name):
            out.append(FieldViolation(f"{path}.{name}", "a Modbus limit; this is an S7 PLC (use max_s7_bytes)"))
    if not s7 and b.HasField("max_s7_bytes"):
        out.append(FieldViolation(f"{path}.max_s7_bytes", "an S7 limit; this is a Modbus PLC (use max_registers)"))
    if b.no_merge and b.HasField("max_gap"):
        out.append(FieldViolation(f"{path}.max_gap", "no_merge reads every tag on its own: no gap is bridged"))
    limit_name = "max_s7_bytes" if s7 else "max_registers"
    if not b.HasField(limit_name):
        return out
    limit = getattr(b, limit_name)
    unit = "bytes" if s7 else "registers"
    for i, tag in enumerate(plc.tags):
        if s7 != (tag.WhichOneof("address") == "s7"):
            continue  # the tag's own rules report it
        try:
            spec = tag_spec(tag, _NO_ID)
            if spec.modbus_table is not None and spec.modbus_table.is_bit_table:
                continue
            width = byte_count(spec) if s7 else register_count(spec)
        except TagSpecError:
            continue  # the tag's own rules report it
        if width > limit:
            out.append(FieldViolation(f"{path}.{limit_name}",
                                      f"tags[{i}] ({tag.name!r}) needs {width} {unit} in one read, more than {limit}"))
    return out


def is_s7(plc: plc_pb2.Plc) -> bool:
    return plc.WhichOneof("connection") == "s7"


def port_of(plc: plc_pb2.Plc) -> int | None:
    """The TCP port of the PLC's connection, its default when unset; None for a serial line."""
    kind = plc.WhichOneof("connection")
    if kind not in DEFAULT_PORTS:
        return None
    conn = getattr(plc, kind)
    return conn.port if conn.HasField("port") else DEFAULT_PORTS[kind]


def with_defaults(plc: plc_pb2.Plc) -> None:
    """Write the defaults into `plc` in place: the port of its connection, a Modbus TCP unit id (1), each tag's
    poll group (the first)."""
    kind = plc.WhichOneof("connection")
    if kind in DEFAULT_PORTS:
        getattr(plc, kind).port = port_of(plc)
    if kind == "modbus_tcp" and not plc.modbus_tcp.unit_id:
        plc.modbus_tcp.unit_id = DEFAULT_MODBUS_TCP_UNIT
    default_group = plc.poll_groups[0].name if plc.poll_groups else ""
    for tag in plc.tags:
        if not tag.poll_group:
            tag.poll_group = default_group


def tag_spec(tag: plc_pb2.Tag, tag_id: int | None = None) -> TagSpec:
    """The TagSpec of a proto Tag. `tag_id` overrides tag.id (a definition being checked has no id yet).

    Raises TagSpecError when the tag has no address or an enum number the model does not know; the rest
    is checked by `validate_spec` / `make_decoder`.
    """
    tid = tag.id if tag_id is None else tag_id
    common = _spec_fields(tag, tid)
    kind = tag.WhichOneof("address")
    if kind == "modbus":
        return TagSpec(modbus_table=tag.modbus.table, address=tag.modbus.address, **common)
    if kind == "s7":
        area = tag.s7.area or plc_pb2.S7_AREA_DATA_BLOCK
        db = tag.s7.db_number if area == S7Area.DB else 0
        return TagSpec(s7_area=area, db_number=db, address=tag.s7.byte_offset, **common)
    raise TagSpecError(tid, "the tag has no address (modbus or s7)",
                       (FieldViolation("address", "the tag needs a modbus or s7 address"),))


def _spec_fields(tag: plc_pb2.Tag, tag_id: int) -> dict:
    """The TagSpec fields every address has."""
    return {
        "tag_id": tag_id,
        "data_type": tag.data_type,
        "bit": tag.bit if tag.HasField("bit") else None,
        "string_length": tag.string_length,
        "byte_order": tag.byte_order,
        "word_order": tag.word_order,
        "scale": tag.scale if tag.HasField("scale") else 1.0,
        "offset": tag.offset,
    }


def _under(path: str, violations: tuple[FieldViolation, ...] | list[FieldViolation]) -> list[FieldViolation]:
    return [FieldViolation(f"{path}.{v.field}" if v.field else path, v.description) for v in violations]


def tag_violations(tag: plc_pb2.Tag, path: str, s7: bool, tag_id: int | None = None) -> list[FieldViolation]:
    """Why `tag` cannot be polled from a PLC (an S7 one when `s7`), as violations under `path`; empty if it can.

    The tag's id is not checked unless `tag_id` is given (None: config assigns ids, so any id passes).
    """
    out: list[FieldViolation] = []
    kind = tag.WhichOneof("address")
    if kind is None:
        out.append(FieldViolation(f"{path}.address", "the tag needs a modbus or s7 address"))
    if s7 and kind == "modbus":
        out.append(FieldViolation(f"{path}.modbus", "an S7 PLC's tags need an s7 address"))
    if not s7 and kind == "s7":
        out.append(FieldViolation(f"{path}.s7", "a Modbus PLC's tags need a modbus address"))
    tid = _NO_ID if tag_id is None else tag_id
    try:
        return out + _under(path, _spec_violations(tag, tid))
    except TagSpecError as exc:  # an enum number the model does not know
        unknown = list(exc.violations)
    # Report those fields, and check the rest as if they were unset.
    known = plc_pb2.Tag()
    known.CopyFrom(tag)
    for v in unknown:
        *parents, name = v.field.split(".")
        target = known
        for parent in parents:
            target = getattr(target, parent)
        target.ClearField(name)
    fields = {v.field for v in unknown}
    if "s7.area" in fields:
        fields.add("s7.db_number")  # whether a DB number is needed depends on the area, which is unknown
    rest = [v for v in _spec_violations(known, tid) if v.field not in fields]
    return out + _under(path, unknown + rest)


def _spec_violations(tag: plc_pb2.Tag, tag_id: int) -> list[FieldViolation]:
    """validate_spec of the tag's spec; without an address, the rules that do not need one."""
    if tag.WhichOneof("address"):
        return validate_spec(tag_spec(tag, tag_id))
    common = _spec_fields(tag, tag_id)
    return [v for v in validate_spec(TagSpec(**common)) if v.field != "address"]


def _role_violations(tag: plc_pb2.Tag, path: str) -> list[FieldViolation]:
    """The rules about what a tag means to production: a counter is an integer that wraps at its width."""
    out: list[FieldViolation] = []
    integer = tag.data_type in INTEGER_TYPES
    if tag.role in COUNTER_ROLES and not integer:
        out.append(FieldViolation(f"{path}.data_type", "a counter must be an integer type"))
    if tag.counter_width:
        if tag.role not in COUNTER_ROLES:
            out.append(FieldViolation(f"{path}.counter_width", "only counter tags have a counter width"))
        elif integer and tag.counter_width > VALUE_BYTES[DataType(tag.data_type)] * 8:
            bits = VALUE_BYTES[DataType(tag.data_type)] * 8
            out.append(FieldViolation(f"{path}.counter_width", f"wider than the data type ({bits} bits)"))
    return out


def plc_violations(plc: plc_pb2.Plc, prefix: str = "plc") -> list[FieldViolation]:
    """All violations of a PLC definition: the proto's own rules, names, poll groups, then every tag's rules.

    A rule of the tag model that fails on a field the proto's own rules already reported is left out, so
    each such field is reported once, in the proto's words.
    """
    out = violations_of(plc, prefix)
    if len(plc.tags) > _MAX_TAGS or len(plc.poll_groups) > _MAX_POLL_GROUPS:
        return out  # the list is too long: that is the answer, its items are not looked at
    reported = {v.field for v in out}
    groups: dict[str, int] = {}
    for i, group in enumerate(plc.poll_groups):
        if group.name in groups:
            out.append(FieldViolation(f"{prefix}.poll_groups[{i}].name",
                                      f"duplicate poll group name {group.name!r} (also poll_groups[{groups[group.name]}])"))
        groups.setdefault(group.name, i)
    names: dict[str, int] = {}
    s7 = is_s7(plc)
    for i, tag in enumerate(plc.tags):
        path = f"{prefix}.tags[{i}]"
        if tag.name in names:
            out.append(FieldViolation(f"{path}.name", f"duplicate tag name {tag.name!r} (also tags[{names[tag.name]}])"))
        names.setdefault(tag.name, i)
        found = tag_violations(tag, path, s7) + _role_violations(tag, path)
        out.extend(v for v in found if v.field not in reported)
        if tag.poll_group and tag.poll_group not in groups:
            out.append(FieldViolation(f"{path}.poll_group", f"no poll group named {tag.poll_group!r} on this PLC"))
    out.extend(v for v in limits_violations(plc, prefix) if v.field not in reported)
    return out


def check_plc(plc: plc_pb2.Plc, prefix: str = "plc") -> None:
    """Raise InvalidArgument with every violation of `plc` (see `plc_violations`)."""
    found = plc_violations(plc, prefix)
    if found:
        raise InvalidArgument(found)
