"""PLC definitions: the rules a definition must satisfy beyond single fields, defaults, and update masks.

Plain Python over the contract's messages: no gRPC, no SQL. Rules on single fields are written in the
protos (protovalidate); the rules here relate fields to each other and are reported the same way, as
field violations with a path such as ``plc.tags[3].string_length``.
"""

from __future__ import annotations

from collections.abc import Iterable

from fabrica.config.v1 import plc_pb2

from ..runtime.errors import FieldViolation, InvalidArgument
from ..runtime.validation import violations_of

DEFAULT_MODBUS_PORT = 502
DEFAULT_S7_PORT = 102

_REGISTERS = {
    plc_pb2.DATA_TYPE_BOOL: 1,
    plc_pb2.DATA_TYPE_INT16: 1,
    plc_pb2.DATA_TYPE_UINT16: 1,
    plc_pb2.DATA_TYPE_INT32: 2,
    plc_pb2.DATA_TYPE_UINT32: 2,
    plc_pb2.DATA_TYPE_FLOAT32: 2,
    plc_pb2.DATA_TYPE_INT64: 4,
    plc_pb2.DATA_TYPE_UINT64: 4,
    plc_pb2.DATA_TYPE_FLOAT64: 4,
}
_BITS = {
    plc_pb2.DATA_TYPE_INT16: 16,
    plc_pb2.DATA_TYPE_UINT16: 16,
    plc_pb2.DATA_TYPE_INT32: 32,
    plc_pb2.DATA_TYPE_UINT32: 32,
    plc_pb2.DATA_TYPE_INT64: 64,
    plc_pb2.DATA_TYPE_UINT64: 64,
}
_BIT_TABLES = (plc_pb2.MODBUS_TABLE_COIL, plc_pb2.MODBUS_TABLE_DISCRETE_INPUT)
_COUNTER_ROLES = (2, 3)  # fabrica.common.v1.TagRole PRODUCTION_COUNTER, SCRAP_COUNTER

#: Paths UpdatePlc accepts in its update_mask.
UPDATABLE_FIELDS = ("display_name", "collector_id", "enabled", "connection", "poll_groups", "tags")
_CONNECTIONS = ("modbus_tcp", "modbus_rtu", "modbus_rtu_over_tcp", "s7")


def is_s7(plc: plc_pb2.Plc) -> bool:
    return plc.WhichOneof("connection") == "s7"


def register_count(tag: plc_pb2.Tag) -> int:
    if tag.data_type == plc_pb2.DATA_TYPE_STRING:
        return max(1, (tag.string_length + 1) // 2)
    return _REGISTERS.get(tag.data_type, 1)


def tag_violations(tag: plc_pb2.Tag, path: str, s7: bool, group_names: set[str]) -> list[FieldViolation]:
    """Rules that relate a tag's fields to each other and to its PLC."""
    out: list[FieldViolation] = []
    add = lambda field, text: out.append(FieldViolation(f"{path}.{field}", text))  # noqa: E731
    address = tag.WhichOneof("address")
    if s7 and address == "modbus":
        add("modbus", "an S7 PLC's tags need an s7 address")
    if not s7 and address == "s7":
        add("s7", "a Modbus PLC's tags need a modbus address")
    is_bool = tag.data_type == plc_pb2.DATA_TYPE_BOOL
    if tag.data_type == plc_pb2.DATA_TYPE_STRING and tag.string_length == 0:
        add("string_length", "required for STRING tags (length in bytes, 1 to 254)")
    if tag.data_type != plc_pb2.DATA_TYPE_STRING and tag.string_length:
        add("string_length", "only STRING tags have a length")
    if address == "modbus":
        table = tag.modbus.table
        if table in _BIT_TABLES:
            if not is_bool and tag.data_type:
                add("data_type", "coils and discrete inputs hold single bits: use BOOL")
            if tag.HasField("bit"):
                add("bit", "coils and discrete inputs are bits already; leave bit unset")
        elif is_bool and not tag.HasField("bit"):
            add("bit", "a BOOL in a register needs its bit index (0 to 15)")
        end = tag.modbus.address + register_count(tag)
        if table not in _BIT_TABLES and end > 65536:
            add("modbus.address", f"the value needs {register_count(tag)} registers and runs past register 65535")
    elif address == "s7":
        if is_bool and not tag.HasField("bit"):
            add("bit", "a BOOL in an S7 byte needs its bit index (0 to 7)")
        if tag.HasField("bit") and tag.bit > 7:
            add("bit", "an S7 byte has bits 0 to 7")
        if tag.s7.area in (plc_pb2.S7_AREA_UNSPECIFIED, plc_pb2.S7_AREA_DATA_BLOCK) and tag.s7.db_number == 0:
            add("s7.db_number", "a data-block address needs its DB number (1 to 65535)")
    if not is_bool and tag.HasField("bit") and not (address == "modbus" and tag.modbus.table in _BIT_TABLES):
        add("bit", "only BOOL tags have a bit index")
    if tag.HasField("scale") and tag.scale == 0:
        add("scale", "a scale of 0 would make every value equal to offset")
    if tag.role in _COUNTER_ROLES and tag.data_type not in _BITS:
        add("data_type", "a counter must be an integer type")
    if tag.counter_width:
        if tag.role not in _COUNTER_ROLES:
            add("counter_width", "only counter tags have a counter width")
        elif tag.data_type in _BITS and tag.counter_width > _BITS[tag.data_type]:
            add("counter_width", f"wider than the data type ({_BITS[tag.data_type]} bits)")
    if tag.poll_group and tag.poll_group not in group_names:
        add("poll_group", f"no poll group named {tag.poll_group!r} on this PLC")
    return out


def plc_violations(plc: plc_pb2.Plc, prefix: str = "plc") -> list[FieldViolation]:
    """All violations of a PLC definition: the proto's own rules, then the cross-field rules."""
    out = violations_of(plc, prefix)
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
        out.extend(tag_violations(tag, path, s7, set(groups)))
    return out


def check_plc(plc: plc_pb2.Plc, prefix: str = "plc") -> None:
    found = plc_violations(plc, prefix)
    if found:
        raise InvalidArgument(found)


def normalized(plc: plc_pb2.Plc) -> plc_pb2.Plc:
    """A copy with defaults written in (ports, each tag's poll group) and output-only fields cleared."""
    out = plc_pb2.Plc()
    out.CopyFrom(plc)
    for field in ("etag", "revision", "create_time", "update_time"):
        out.ClearField(field)
    kind = out.WhichOneof("connection")
    if kind in ("modbus_tcp", "modbus_rtu_over_tcp"):
        conn = getattr(out, kind)
        if not conn.HasField("port"):
            conn.port = DEFAULT_MODBUS_PORT
    elif kind == "s7" and not out.s7.HasField("port"):
        out.s7.port = DEFAULT_S7_PORT
    default_group = out.poll_groups[0].name if out.poll_groups else ""
    for tag in out.tags:
        tag.ClearField("id")
        if not tag.poll_group:
            tag.poll_group = default_group
    return out


def apply_update_mask(current: plc_pb2.Plc, patch: plc_pb2.Plc, paths: Iterable[str]) -> plc_pb2.Plc:
    """`current` with the fields named in `paths` taken from `patch`. Empty paths or "*" take them all."""
    paths = list(paths)
    if not paths or paths == ["*"]:
        paths = list(UPDATABLE_FIELDS)
    bad = [
        FieldViolation(f"update_mask.paths[{i}]",
                       f"{p!r} cannot be updated; updatable: {', '.join(UPDATABLE_FIELDS + _CONNECTIONS)}")
        for i, p in enumerate(paths)
        if p not in UPDATABLE_FIELDS and p not in _CONNECTIONS
    ]
    if bad:
        raise InvalidArgument(bad)
    merged = plc_pb2.Plc()
    merged.CopyFrom(current)
    for path in paths:
        if path in ("connection", *_CONNECTIONS):
            kind = patch.WhichOneof("connection")
            if path != "connection" and kind != path:
                raise InvalidArgument(FieldViolation(f"plc.{path}", f"update_mask names {path} but plc.{path} is not set"))
            if kind is None:
                raise InvalidArgument(FieldViolation("plc.connection", "update_mask names connection but none is set"))
            getattr(merged, kind).CopyFrom(getattr(patch, kind))
        elif path in ("poll_groups", "tags"):
            getattr(merged, path).clear()
            getattr(merged, path).extend(getattr(patch, path))
        else:
            setattr(merged, path, getattr(patch, path))
    return merged


def relevant_change(collector_id: str, old_collector: str | None, new_collector: str | None) -> str | None:
    """What a change means to one collector's watcher: "upsert", "delete", or None (not its business)."""
    if new_collector == collector_id:
        return "upsert"
    if old_collector == collector_id:
        return "delete"
    return None
