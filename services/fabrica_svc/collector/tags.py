"""From the contract's Tag to the decoder's TagSpec, and from decoded values to the contract's Value.

`tag_spec` is the one place where a proto Tag becomes a TagSpec; everything else (pollers, PreviewDecode,
the benchmark) goes through it.
"""

from __future__ import annotations

from fabrica.common.v1 import reading_pb2
from fabrica.config.v1 import plc_pb2

from ..runtime.errors import FieldViolation
from .decode import DataType, TagSpec, TagSpecError, Value, make_decoder, validate_spec

_SIGNED = frozenset({DataType.INT16, DataType.INT32, DataType.INT64})
_UNSIGNED = frozenset({DataType.UINT16, DataType.UINT32, DataType.UINT64})


def tag_spec(tag: plc_pb2.Tag, tag_id: int | None = None) -> TagSpec:
    """The TagSpec of a proto Tag. `tag_id` overrides tag.id (PreviewDecode reads definitions without ids).

    Raises TagSpecError when the tag has no address or an enum number the decoder does not know; the
    rest is checked by `validate_spec` / `make_decoder`.
    """
    tid = tag.id if tag_id is None else tag_id
    common = {
        "tag_id": tid,
        "data_type": tag.data_type,
        "bit": tag.bit if tag.HasField("bit") else None,
        "string_length": tag.string_length,
        "byte_order": tag.byte_order,
        "word_order": tag.word_order,
        "scale": tag.scale if tag.HasField("scale") else 1.0,
        "offset": tag.offset,
    }
    kind = tag.WhichOneof("address")
    if kind == "modbus":
        return TagSpec(modbus_table=tag.modbus.table, address=tag.modbus.address, **common)
    if kind == "s7":
        area = tag.s7.area or plc_pb2.S7_AREA_DATA_BLOCK
        db = tag.s7.db_number if area == plc_pb2.S7_AREA_DATA_BLOCK else 0
        return TagSpec(s7_area=area, db_number=db, address=tag.s7.byte_offset, **common)
    raise TagSpecError(tid, "the tag has no address (modbus or s7)")


# Words that validate_spec uses in its problem texts, mapped to the proto field they are about.
_FIELD_HINTS = (
    ("cannot live in", "data_type"),
    ("data_type", "data_type"),
    ("tag_id", "id"),
    ("scale", "scale"),
    ("offset must", "offset"),
    ("string_length", "string_length"),
    ("db_number", "s7.db_number"),
    ("byte offset", "s7.byte_offset"),
    ("Modbus address", "modbus.address"),
    ("spans addresses", "modbus.address"),
    ("modbus_table", "modbus.table"),
    ("bit", "bit"),
)


def _field_of(problem: str) -> str:
    return next((field for word, field in _FIELD_HINTS if word in problem), "")


def tag_violations(tag: plc_pb2.Tag, plc: plc_pb2.Plc, prefix: str = "tag", tag_id: int | None = None) -> list[FieldViolation]:
    """Why `tag` cannot be read from `plc`, as field violations under `prefix` (empty when it can)."""
    s7 = plc.WhichOneof("connection") == "s7"
    kind = tag.WhichOneof("address")
    if kind is None:
        return [FieldViolation(prefix, "the tag needs a modbus or s7 address")]
    if s7 and kind != "s7":
        return [FieldViolation(f"{prefix}.modbus", "an S7 PLC's tags need an s7 address")]
    if not s7 and kind != "modbus":
        return [FieldViolation(f"{prefix}.s7", "a Modbus PLC's tags need a modbus address")]
    try:
        spec = tag_spec(tag, tag_id)
    except TagSpecError as exc:
        return [FieldViolation(prefix, exc.detail)]
    out = []
    for problem in validate_spec(spec):
        field = _field_of(problem)
        out.append(FieldViolation(f"{prefix}.{field}" if field else prefix, problem))
    return out


def compiled(tag: plc_pb2.Tag, tag_id: int | None = None) -> TagSpec:
    """tag_spec, plus the full validation make_decoder does (raises TagSpecError listing every problem)."""
    spec = tag_spec(tag, tag_id)
    make_decoder(spec)
    return spec


def value_kind(spec: TagSpec) -> str:
    """Which Value field a decoded value of `spec` goes into."""
    if spec.data_type is DataType.BOOL:
        return "bool_value"
    if spec.data_type is DataType.STRING:
        return "string_value"
    if spec.data_type in (DataType.FLOAT32, DataType.FLOAT64) or spec.is_scaled:
        return "double_value"
    return "int_value" if spec.data_type in _SIGNED else "uint_value"


def to_value(kind: str, value: Value) -> reading_pb2.Value:
    """A decoded value as the contract's Value (`kind` from `value_kind`)."""
    if kind == "double_value":
        return reading_pb2.Value(double_value=float(value))
    return reading_pb2.Value(**{kind: value})


def from_value(value: reading_pb2.Value) -> Value | bytes | None:
    kind = value.WhichOneof("kind")
    return None if kind is None else getattr(value, kind)
