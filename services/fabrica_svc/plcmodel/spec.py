"""The tag model: where a tag lives in a device, how its value is encoded, and which definitions are usable.

A :class:`TagSpec` is the plain form of the contract's ``fabrica.config.v1.Tag`` address and encoding
(``plcmodel.plc.tag_spec`` converts one). :func:`validate_spec` holds every rule a tag must satisfy to be
decoded; each problem is a :class:`FieldViolation` whose path names the field of the contract's ``Tag``
(``bit``, ``modbus.address``, ``s7.db_number``, ...), so the config service and the collector report the
same rule on the same field. :func:`register_count` and :func:`byte_count` say what a tag occupies.

The enums are numbered by the generated protobuf enums, so ``DataType(proto_int)`` converts directly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import IntEnum
from typing import Any, Final

from fabrica.config.v1 import plc_pb2

from ..runtime.errors import FieldViolation

__all__ = [
    "INTEGER_TYPES",
    "MODBUS_ADDRESS_SPACE",
    "MODBUS_MAX_BIT",
    "S7_MAX_BIT",
    "S7_MAX_BYTE_OFFSET",
    "S7_MAX_STRING_LENGTH",
    "VALUE_BYTES",
    "ByteOrder",
    "DataType",
    "DecodeError",
    "ModbusTable",
    "S7Area",
    "TagSpec",
    "TagSpecError",
    "WordOrder",
    "byte_count",
    "register_count",
    "validate_spec",
]

#: Number of addresses in each Modbus table (addresses 0..65535).
MODBUS_ADDRESS_SPACE: Final = 65536
#: Highest S7 byte offset: S7 ANY pointers carry a 24-bit *bit* address, so byte offsets stop below 2**21.
S7_MAX_BYTE_OFFSET: Final = 2**21 - 1
#: Longest S7 STRING: its header stores the lengths in one byte each, and 255 is reserved.
S7_MAX_STRING_LENGTH: Final = 254
#: Highest bit index of a BOOL in a Modbus register and in an S7 byte.
MODBUS_MAX_BIT: Final = 15
S7_MAX_BIT: Final = 7


# --------------------------------------------------------------------------------------------------- enums


class DataType(IntEnum):
    """The type of a tag's value (``fabrica.config.v1.DataType``)."""

    UNSPECIFIED = plc_pb2.DATA_TYPE_UNSPECIFIED
    BOOL = plc_pb2.DATA_TYPE_BOOL
    INT16 = plc_pb2.DATA_TYPE_INT16
    UINT16 = plc_pb2.DATA_TYPE_UINT16
    INT32 = plc_pb2.DATA_TYPE_INT32
    UINT32 = plc_pb2.DATA_TYPE_UINT32
    INT64 = plc_pb2.DATA_TYPE_INT64
    UINT64 = plc_pb2.DATA_TYPE_UINT64
    FLOAT32 = plc_pb2.DATA_TYPE_FLOAT32
    FLOAT64 = plc_pb2.DATA_TYPE_FLOAT64
    STRING = plc_pb2.DATA_TYPE_STRING


class ByteOrder(IntEnum):
    """Order of the two bytes inside each 16-bit word. ``UNSPECIFIED`` means ``BIG``."""

    UNSPECIFIED = plc_pb2.BYTE_ORDER_UNSPECIFIED
    BIG = plc_pb2.BYTE_ORDER_BIG_ENDIAN
    LITTLE = plc_pb2.BYTE_ORDER_LITTLE_ENDIAN


class WordOrder(IntEnum):
    """Order of the 16-bit words of a multi-word value. ``BIG``: high word first. ``UNSPECIFIED`` means ``BIG``."""

    UNSPECIFIED = plc_pb2.WORD_ORDER_UNSPECIFIED
    BIG = plc_pb2.WORD_ORDER_BIG_ENDIAN
    LITTLE = plc_pb2.WORD_ORDER_LITTLE_ENDIAN


class ModbusTable(IntEnum):
    """The four Modbus data tables. ``UNSPECIFIED`` is rejected, as in the contract."""

    UNSPECIFIED = plc_pb2.MODBUS_TABLE_UNSPECIFIED
    COIL = plc_pb2.MODBUS_TABLE_COIL
    DISCRETE_INPUT = plc_pb2.MODBUS_TABLE_DISCRETE_INPUT
    INPUT_REGISTER = plc_pb2.MODBUS_TABLE_INPUT_REGISTER
    HOLDING_REGISTER = plc_pb2.MODBUS_TABLE_HOLDING_REGISTER

    @property
    def is_bit_table(self) -> bool:
        """True for coils and discrete inputs, whose addresses select single bits rather than registers."""
        return self is ModbusTable.COIL or self is ModbusTable.DISCRETE_INPUT


class S7Area(IntEnum):
    """S7 memory areas. ``UNSPECIFIED`` means a data block, as in the contract; :class:`TagSpec` stores ``DB``."""

    UNSPECIFIED = plc_pb2.S7_AREA_UNSPECIFIED
    DB = plc_pb2.S7_AREA_DATA_BLOCK
    INPUTS = plc_pb2.S7_AREA_INPUTS  # process image of the inputs: PE / I
    OUTPUTS = plc_pb2.S7_AREA_OUTPUTS  # process image of the outputs: PA / Q
    MERKERS = plc_pb2.S7_AREA_MARKERS  # flag memory: MK / M


#: Size in bytes of every fixed-size type (BOOL and STRING are sized by :func:`register_count` /
#: :func:`byte_count` themselves).
VALUE_BYTES: Final[dict[DataType, int]] = {
    DataType.INT16: 2,
    DataType.UINT16: 2,
    DataType.INT32: 4,
    DataType.UINT32: 4,
    DataType.INT64: 8,
    DataType.UINT64: 8,
    DataType.FLOAT32: 4,
    DataType.FLOAT64: 8,
}
#: The integer types (the only ones a counter may have).
INTEGER_TYPES: Final = frozenset(t for t in VALUE_BYTES if t not in (DataType.FLOAT32, DataType.FLOAT64))

# The contract's Tag field that each TagSpec field comes from (for problems found while converting).
_FIELD_OF: Final = {
    "data_type": "data_type",
    "modbus_table": "modbus.table",
    "s7_area": "s7.area",
    "byte_order": "byte_order",
    "word_order": "word_order",
    "scale": "scale",
    "offset": "offset",
}


# -------------------------------------------------------------------------------------------------- errors


class DecodeError(ValueError):
    """A tag's value could not be decoded from the data that arrived.

    ``tag_id`` names the tag and ``detail`` says what was expected and what arrived; ``str(error)`` is
    ``"tag <id>: <detail>"``, suitable for the ``error`` field of a reading.
    """

    def __init__(self, tag_id: int, detail: str) -> None:
        super().__init__(f"tag {tag_id}: {detail}")
        self.tag_id = tag_id
        self.detail = detail

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.tag_id, self.detail))


class TagSpecError(DecodeError):
    """The tag's definition itself is unusable (bad combination, bit out of range, ...).

    A subclass of :class:`DecodeError` so that callers that only care about "no value" can catch one type,
    while callers that report a configuration error rather than a decode failure can tell them apart.
    ``violations`` holds the problems with the path of the contract's Tag field each is about.
    """

    def __init__(self, tag_id: int, detail: str, violations: tuple[FieldViolation, ...] = ()) -> None:
        super().__init__(tag_id, detail)
        self.violations = tuple(violations)

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.tag_id, self.detail, self.violations))


# ---------------------------------------------------------------------------------------------------- spec


def _coerce_enum(enum_type: type[IntEnum], value: Any, field: str, problems: list[FieldViolation]) -> Any:
    try:
        return enum_type(value)
    except (ValueError, TypeError):
        allowed = ", ".join(f"{m.value}={m.name}" for m in enum_type)
        problems.append(FieldViolation(_FIELD_OF[field],
                                       f"{field} {value!r} is not a valid {enum_type.__name__} ({allowed})"))
        return value


def _coerce_float(value: Any, field: str, problems: list[FieldViolation]) -> Any:
    try:
        return float(value)
    except (ValueError, TypeError):
        problems.append(FieldViolation(_FIELD_OF[field], f"{field} {value!r} is not a number"))
        return value


@dataclass(frozen=True, slots=True)
class TagSpec:
    """Where a tag lives in a device and how its value is encoded.

    A tag belongs to exactly one protocol: Modbus when ``modbus_table`` is set, S7 when ``s7_area`` is set.

    Attributes:
        tag_id: Stable numeric id assigned by the config service (positive).
        data_type: Type of the value.
        modbus_table: Modbus table of the tag, or None for an S7 tag.
        address: Modbus register (or coil / discrete input) address, 0-based protocol address 0..65535;
            for S7, the byte offset inside the area or DB.
        s7_area: S7 area of the tag, or None for a Modbus tag.
        db_number: Data block number for ``S7Area.DB`` (1..65535); ignored for the other areas.
        bit: Bit of a BOOL tag inside a register (0..15, 0 = least significant bit of the 16-bit value) or
            inside an S7 byte (0..7). Must be None for every other tag, including coils and discrete inputs,
            where the address alone selects the bit.
        string_length: For STRING tags, the number of characters (bytes): Modbus strings occupy
            ``ceil(string_length / 2)`` registers, S7 STRINGs ``string_length + 2`` bytes. 0 for every other
            type.
        byte_order: Order of the bytes inside each 16-bit word.
        word_order: Order of the words of values longer than 16 bits; ignored for strings.
        scale: Multiplier applied to numeric values (finite, non-zero).
        offset: Added to numeric values after scaling (finite).

    Enum fields accept plain ints (protobuf enum numbers) and are normalised following the contract's
    meaning of 0 (unset): ``s7_area`` 0 becomes ``DB``, byte and word order 0 become ``BIG``, while
    ``modbus_table`` and ``data_type`` 0 stay ``UNSPECIFIED`` and are rejected by :func:`validate_spec`.
    Scale and offset become floats. Unknown enum numbers raise :class:`TagSpecError` (all of them at
    once); everything else is checked by :func:`validate_spec`. Leave the field of the other protocol None
    rather than 0.
    """

    tag_id: int
    data_type: DataType
    modbus_table: ModbusTable | None = None
    address: int = 0
    s7_area: S7Area | None = None
    db_number: int = 0
    bit: int | None = None
    string_length: int = 0
    byte_order: ByteOrder = ByteOrder.BIG
    word_order: WordOrder = WordOrder.BIG
    scale: float = 1.0
    offset: float = 0.0

    def __post_init__(self) -> None:
        setattr_ = object.__setattr__
        problems: list[FieldViolation] = []
        setattr_(self, "data_type", _coerce_enum(DataType, self.data_type, "data_type", problems))
        if self.modbus_table is not None:
            setattr_(self, "modbus_table", _coerce_enum(ModbusTable, self.modbus_table, "modbus_table", problems))
        if self.s7_area is not None:
            # Contract: "S7_AREA_UNSPECIFIED: not set; a data block".
            setattr_(self, "s7_area", _coerce_enum(S7Area, self.s7_area or S7Area.DB, "s7_area", problems))
        # None or UNSPECIFIED (0) mean BIG.
        setattr_(self, "byte_order", _coerce_enum(ByteOrder, self.byte_order or ByteOrder.BIG, "byte_order", problems))
        setattr_(self, "word_order", _coerce_enum(WordOrder, self.word_order or WordOrder.BIG, "word_order", problems))
        setattr_(self, "scale", _coerce_float(self.scale, "scale", problems))
        setattr_(self, "offset", _coerce_float(self.offset, "offset", problems))
        if problems:
            raise TagSpecError(self.tag_id, "; ".join(p.description for p in problems), tuple(problems))

    @property
    def is_scaled(self) -> bool:
        """True unless scale and offset are the identity (1 and 0)."""
        return self.scale != 1.0 or self.offset != 0.0


def register_count(spec: TagSpec) -> int:
    """Number of Modbus addresses the tag occupies.

    1 for a BOOL (a bit of one register, or one coil / discrete input), 1 / 2 / 4 registers for 16 / 32 /
    64-bit values, ``ceil(string_length / 2)`` for a STRING.

    Raises:
        TagSpecError: the data type is unspecified.
    """
    data_type = spec.data_type
    if data_type is DataType.BOOL:
        return 1
    if data_type is DataType.STRING:
        return (spec.string_length + 1) // 2
    size = VALUE_BYTES.get(data_type)
    if size is None:
        raise TagSpecError(spec.tag_id, "data_type is unspecified", (FieldViolation("data_type", "unspecified"),))
    return size // 2


def byte_count(spec: TagSpec) -> int:
    """Number of S7 bytes the tag occupies.

    1 for a BOOL (the byte holding the bit), 2 / 4 / 8 for 16 / 32 / 64-bit values, and for a STRING the
    S7 STRING layout: a 2-byte header (maximum length, actual length) followed by ``string_length`` chars.

    Raises:
        TagSpecError: the data type is unspecified.
    """
    data_type = spec.data_type
    if data_type is DataType.BOOL:
        return 1
    if data_type is DataType.STRING:
        return spec.string_length + 2
    size = VALUE_BYTES.get(data_type)
    if size is None:
        raise TagSpecError(spec.tag_id, "data_type is unspecified", (FieldViolation("data_type", "unspecified"),))
    return size


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def validate_spec(spec: TagSpec) -> list[FieldViolation]:
    """Every problem of a tag definition, each on the contract Tag field it is about (empty: it can be decoded).

    Checks that the tag belongs to exactly one protocol, that its data type fits its table or area, that
    addresses, bit, DB number and string length are in range, and that scale and offset are usable. A
    problem of the tag as a whole (no address, or two) has the path ``address``, the name of the contract's
    oneof.
    """
    problems: list[FieldViolation] = []
    add = lambda field, text: problems.append(FieldViolation(field, text))  # noqa: E731
    if not _is_int(spec.tag_id) or spec.tag_id <= 0:
        add("id", f"tag_id must be a positive integer, got {spec.tag_id!r}")
    if spec.data_type is DataType.UNSPECIFIED:
        add("data_type", "data_type is unspecified")
    if not math.isfinite(spec.scale) or spec.scale == 0.0:
        add("scale", f"scale must be a finite, non-zero number, got {spec.scale!r}")
    if not math.isfinite(spec.offset):
        add("offset", f"offset must be a finite number, got {spec.offset!r}")
    if spec.data_type is DataType.STRING:
        if not (_is_int(spec.string_length) and spec.string_length >= 1):
            add("string_length", f"a STRING needs string_length >= 1, got {spec.string_length!r}")
    elif spec.string_length:
        add("string_length", f"only STRING tags have a string_length, got {spec.string_length!r} on a "
                             f"{spec.data_type.name}")
    if spec.bit is not None and not _is_int(spec.bit):
        add("bit", f"bit must be an integer or None, got {spec.bit!r}")

    if spec.modbus_table is not None and spec.s7_area is not None:
        add("address", "both modbus_table and s7_area are set; a tag belongs to exactly one protocol")
    elif spec.modbus_table is not None:
        _check_modbus(spec, add)
    elif spec.s7_area is not None:
        _check_s7(spec, add)
    else:
        add("address", "neither modbus_table nor s7_area is set")
        if spec.bit is not None and spec.data_type is not DataType.BOOL:
            add("bit", f"bit must only be set for BOOL tags, got bit {spec.bit!r} on a {spec.data_type.name}")
    return problems


def _check_modbus(spec: TagSpec, add: Any) -> None:
    table = spec.modbus_table
    assert table is not None
    data_type = spec.data_type
    if not _is_int(spec.address):
        add("modbus.address", f"address must be an integer, got {spec.address!r}")
    if table is ModbusTable.UNSPECIFIED:
        add("modbus.table", "modbus_table is unspecified")  # and the rest is checked as for a register
    if table.is_bit_table:
        if data_type is not DataType.BOOL and data_type is not DataType.UNSPECIFIED:
            add("data_type",
                f"a {data_type.name} tag cannot live in the {table.name} table, which holds single bits; use BOOL")
        if spec.bit is not None:
            add("bit", f"bit must not be set for the {table.name} table (got {spec.bit!r}); the address selects the bit")
    elif data_type is DataType.BOOL:
        if spec.bit is None:
            add("bit", f"a BOOL in the {table.name} table needs bit 0..{MODBUS_MAX_BIT}")
        elif _is_int(spec.bit) and not 0 <= spec.bit <= MODBUS_MAX_BIT:
            add("bit", f"bit {spec.bit} is out of range 0..{MODBUS_MAX_BIT} for a BOOL in the {table.name} table")
    elif spec.bit is not None:
        add("bit", f"bit must only be set for BOOL tags, got bit {spec.bit!r} on a {data_type.name}")

    if _is_int(spec.address):
        if not 0 <= spec.address < MODBUS_ADDRESS_SPACE:
            add("modbus.address", f"Modbus address {spec.address} is out of range 0..{MODBUS_ADDRESS_SPACE - 1}")
        elif data_type is not DataType.UNSPECIFIED and _is_int(spec.string_length):
            end = spec.address + register_count(spec)
            if end > MODBUS_ADDRESS_SPACE:
                add("modbus.address", f"the tag spans addresses {spec.address}..{end - 1}, "
                                      f"past the last Modbus address {MODBUS_ADDRESS_SPACE - 1}")


def _check_s7(spec: TagSpec, add: Any) -> None:
    area = spec.s7_area
    assert area is not None
    data_type = spec.data_type
    if area is S7Area.DB and not (_is_int(spec.db_number) and 1 <= spec.db_number <= 65535):
        add("s7.db_number", f"an S7 DB tag needs db_number 1..65535, got {spec.db_number!r}")
    if data_type is DataType.BOOL:
        if spec.bit is None:
            add("bit", f"an S7 BOOL needs bit 0..{S7_MAX_BIT}")
        elif _is_int(spec.bit) and not 0 <= spec.bit <= S7_MAX_BIT:
            add("bit", f"bit {spec.bit} is out of range 0..{S7_MAX_BIT} for an S7 BOOL")
    elif spec.bit is not None:
        add("bit", f"bit must only be set for BOOL tags, got bit {spec.bit!r} on a {data_type.name}")
    if data_type is DataType.STRING and _is_int(spec.string_length) and spec.string_length > S7_MAX_STRING_LENGTH:
        add("string_length",
            f"an S7 STRING holds at most {S7_MAX_STRING_LENGTH} characters, got string_length {spec.string_length}")
    if not _is_int(spec.address):
        add("s7.byte_offset", f"address must be an integer, got {spec.address!r}")
    elif not 0 <= spec.address <= S7_MAX_BYTE_OFFSET:
        add("s7.byte_offset", f"S7 byte offset {spec.address} is out of range 0..{S7_MAX_BYTE_OFFSET}")
