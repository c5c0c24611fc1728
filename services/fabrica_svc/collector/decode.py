"""Decoding of raw PLC data into tag values.

This module is the pure core of the collector: it knows how Modbus registers, Modbus bits and S7 bytes encode
the value of a tag, and nothing about connections, gRPC or protocol libraries.

The flow is: describe a tag as a :class:`TagSpec`, compile it once with :func:`make_decoder`, then call the
resulting :class:`Decoder`'s ``decode(data, pos)`` for every poll. Compiling validates the definition and
selects precompiled :class:`struct.Struct` objects, so the per-poll work is a length check and one or two
C-level pack/unpack calls.

Byte and word order
-------------------
Both protocols move data as a sequence of 16-bit words (Modbus registers; S7 bytes taken in pairs). Two
independent settings describe how a device lays out a value in those words:

* :class:`ByteOrder` is the order of the two bytes inside each word. ``BIG`` (the Modbus and S7 standard)
  puts the most significant byte first.
* :class:`WordOrder` is the order of the words of a value longer than 16 bits. ``BIG`` puts the most
  significant word first, i.e. at the lowest address.

For the float32 value ``0x42F6E979`` (123.456) the four combinations put these words on the wire:

======  ==========  ==========  ==================
Name    byte order  word order  words, in address order
======  ==========  ==========  ==================
ABCD    BIG         BIG         ``0x42F6 0xE979``
CDAB    BIG         LITTLE      ``0xE979 0x42F6``
BADC    LITTLE      BIG         ``0xF642 0x79E9``
DCBA    LITTLE      LITTLE      ``0x79E9 0xF642``
======  ==========  ==========  ==================

``UNSPECIFIED`` (0, the protobuf default) means ``BIG`` for both settings. S7 stores everything big endian,
so S7 tags normally use ABCD; the other orders are still honoured when configured.

Scaling
-------
Numeric values are reported as ``raw * scale + offset``. With the identity (``scale == 1`` and
``offset == 0``) integer tags stay Python ``int`` (exact, including the full 64-bit range); with any other
scaling the result is a ``float``. BOOL and STRING tags ignore scale and offset.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import Any, Final, TypeAlias

__all__ = [
    "MODBUS_ADDRESS_SPACE",
    "S7_MAX_BYTE_OFFSET",
    "S7_MAX_STRING_LENGTH",
    "ByteOrder",
    "DataType",
    "DecodeError",
    "Decoder",
    "ModbusTable",
    "S7Area",
    "TagSpec",
    "TagSpecError",
    "Value",
    "WordOrder",
    "byte_count",
    "make_decoder",
    "register_count",
    "validate_spec",
]

#: A decoded tag value.
Value: TypeAlias = bool | int | float | str

#: Number of addresses in each Modbus table (addresses 0..65535).
MODBUS_ADDRESS_SPACE: Final = 65536
#: Highest S7 byte offset: S7 ANY pointers carry a 24-bit *bit* address, so byte offsets stop below 2**21.
S7_MAX_BYTE_OFFSET: Final = 2**21 - 1
#: Longest S7 STRING: its header stores the lengths in one byte each, and 255 is reserved.
S7_MAX_STRING_LENGTH: Final = 254


# --------------------------------------------------------------------------------------------------- enums
# Numbered exactly like the protobuf enums of the contract, so that ``DataType(proto_int)`` converts directly.


class DataType(IntEnum):
    """The type of a tag's value."""

    UNSPECIFIED = 0
    BOOL = 1
    INT16 = 2
    UINT16 = 3
    INT32 = 4
    UINT32 = 5
    INT64 = 6
    UINT64 = 7
    FLOAT32 = 8
    FLOAT64 = 9
    STRING = 10


class ByteOrder(IntEnum):
    """Order of the two bytes inside each 16-bit word. ``UNSPECIFIED`` means ``BIG``."""

    UNSPECIFIED = 0
    BIG = 1
    LITTLE = 2


class WordOrder(IntEnum):
    """Order of the 16-bit words of a multi-word value. ``BIG``: high word first. ``UNSPECIFIED`` means ``BIG``."""

    UNSPECIFIED = 0
    BIG = 1
    LITTLE = 2


class ModbusTable(IntEnum):
    """The four Modbus data tables. ``UNSPECIFIED`` is rejected, as in the contract."""

    UNSPECIFIED = 0
    COIL = 1
    DISCRETE_INPUT = 2
    INPUT_REGISTER = 3
    HOLDING_REGISTER = 4

    @property
    def is_bit_table(self) -> bool:
        """True for coils and discrete inputs, whose addresses select single bits rather than registers."""
        return self is ModbusTable.COIL or self is ModbusTable.DISCRETE_INPUT


class S7Area(IntEnum):
    """S7 memory areas. ``UNSPECIFIED`` means a data block, as in the contract; :class:`TagSpec` stores ``DB``."""

    UNSPECIFIED = 0
    DB = 1
    INPUTS = 2  # process image of the inputs: PE / I
    OUTPUTS = 3  # process image of the outputs: PA / Q
    MERKERS = 4  # flag memory: MK / M


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
    """


# ---------------------------------------------------------------------------------------------------- spec


def _coerce_enum(enum_type: type[IntEnum], value: Any, field: str, tag_id: Any) -> Any:
    try:
        return enum_type(value)
    except (ValueError, TypeError):
        allowed = ", ".join(f"{m.value}={m.name}" for m in enum_type)
        raise TagSpecError(tag_id, f"{field} {value!r} is not a valid {enum_type.__name__} ({allowed})") from None


def _coerce_float(value: Any, field: str, tag_id: Any) -> float:
    try:
        return float(value)
    except (ValueError, TypeError):
        raise TagSpecError(tag_id, f"{field} {value!r} is not a number") from None


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
            ``ceil(string_length / 2)`` registers, S7 STRINGs ``string_length + 2`` bytes. Ignored otherwise.
        byte_order: Order of the bytes inside each 16-bit word.
        word_order: Order of the words of values longer than 16 bits; ignored for strings.
        scale: Multiplier applied to numeric values (finite, non-zero).
        offset: Added to numeric values after scaling (finite).

    Enum fields accept plain ints (protobuf enum numbers) and are normalised following the contract's
    meaning of 0 (unset): ``s7_area`` 0 becomes ``DB``, byte and word order 0 become ``BIG``, while
    ``modbus_table`` and ``data_type`` 0 stay ``UNSPECIFIED`` and are rejected by :func:`validate_spec`.
    Scale and offset become floats. An unknown enum number raises :class:`TagSpecError`; everything else is
    checked by :func:`validate_spec`. Leave the field of the other protocol None rather than 0.
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
        tag = self.tag_id
        setattr_ = object.__setattr__
        setattr_(self, "data_type", _coerce_enum(DataType, self.data_type, "data_type", tag))
        if self.modbus_table is not None:
            setattr_(self, "modbus_table", _coerce_enum(ModbusTable, self.modbus_table, "modbus_table", tag))
        if self.s7_area is not None:
            # Contract: "S7_AREA_UNSPECIFIED: not set; a data block".
            setattr_(self, "s7_area", _coerce_enum(S7Area, self.s7_area or S7Area.DB, "s7_area", tag))
        # None or UNSPECIFIED (0) mean BIG.
        setattr_(self, "byte_order", _coerce_enum(ByteOrder, self.byte_order or ByteOrder.BIG, "byte_order", tag))
        setattr_(self, "word_order", _coerce_enum(WordOrder, self.word_order or WordOrder.BIG, "word_order", tag))
        setattr_(self, "scale", _coerce_float(self.scale, "scale", tag))
        setattr_(self, "offset", _coerce_float(self.offset, "offset", tag))

    @property
    def is_scaled(self) -> bool:
        """True unless scale and offset are the identity (1 and 0)."""
        return self.scale != 1.0 or self.offset != 0.0


# (struct format character, size in bytes) of every fixed-size numeric type.
_NUMERIC: Final[dict[DataType, tuple[str, int]]] = {
    DataType.INT16: ("h", 2),
    DataType.UINT16: ("H", 2),
    DataType.INT32: ("i", 4),
    DataType.UINT32: ("I", 4),
    DataType.INT64: ("q", 8),
    DataType.UINT64: ("Q", 8),
    DataType.FLOAT32: ("f", 4),
    DataType.FLOAT64: ("d", 8),
}


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
    numeric = _NUMERIC.get(data_type)
    if numeric is None:
        raise TagSpecError(spec.tag_id, "data_type is unspecified")
    return numeric[1] // 2


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
    numeric = _NUMERIC.get(data_type)
    if numeric is None:
        raise TagSpecError(spec.tag_id, "data_type is unspecified")
    return numeric[1]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def validate_spec(spec: TagSpec) -> list[str]:
    """Check a tag definition; return its problems in words (empty when the tag can be decoded).

    Checks that the tag belongs to exactly one protocol, that its data type fits its table or area, that
    addresses, bit, DB number and string length are in range, and that scale and offset are usable.
    """
    problems: list[str] = []
    if not _is_int(spec.tag_id) or spec.tag_id <= 0:
        problems.append(f"tag_id must be a positive integer, got {spec.tag_id!r}")
    if spec.data_type is DataType.UNSPECIFIED:
        problems.append("data_type is unspecified")
    if not math.isfinite(spec.scale) or spec.scale == 0.0:
        problems.append(f"scale must be a finite, non-zero number, got {spec.scale!r}")
    if not math.isfinite(spec.offset):
        problems.append(f"offset must be a finite number, got {spec.offset!r}")
    if spec.data_type is DataType.STRING and not (_is_int(spec.string_length) and spec.string_length >= 1):
        problems.append(f"a STRING needs string_length >= 1, got {spec.string_length!r}")
    if spec.bit is not None and not _is_int(spec.bit):
        problems.append(f"bit must be an integer or None, got {spec.bit!r}")
    if not _is_int(spec.address):
        problems.append(f"address must be an integer, got {spec.address!r}")

    if spec.modbus_table is not None and spec.s7_area is not None:
        problems.append("both modbus_table and s7_area are set; a tag belongs to exactly one protocol")
    elif spec.modbus_table is not None:
        _check_modbus(spec, problems)
    elif spec.s7_area is not None:
        _check_s7(spec, problems)
    else:
        problems.append("neither modbus_table nor s7_area is set")
    return problems


def _check_modbus(spec: TagSpec, problems: list[str]) -> None:
    table = spec.modbus_table
    assert table is not None
    data_type = spec.data_type
    if table is ModbusTable.UNSPECIFIED:
        problems.append("modbus_table is unspecified")
        return
    if table.is_bit_table:
        if data_type is not DataType.BOOL and data_type is not DataType.UNSPECIFIED:
            problems.append(
                f"a {data_type.name} tag cannot live in the {table.name} table, which holds single bits; use BOOL"
            )
        if spec.bit is not None:
            problems.append(
                f"bit must not be set for the {table.name} table (got {spec.bit!r}); the address selects the bit"
            )
    elif data_type is DataType.BOOL:
        if spec.bit is None:
            problems.append(f"a BOOL in the {table.name} table needs bit 0..15")
        elif _is_int(spec.bit) and not 0 <= spec.bit <= 15:
            problems.append(f"bit {spec.bit} is out of range 0..15 for a BOOL in the {table.name} table")
    elif spec.bit is not None:
        problems.append(f"bit must only be set for BOOL tags, got bit {spec.bit!r} on a {data_type.name}")

    if _is_int(spec.address):
        if not 0 <= spec.address < MODBUS_ADDRESS_SPACE:
            problems.append(f"Modbus address {spec.address} is out of range 0..{MODBUS_ADDRESS_SPACE - 1}")
        elif data_type is not DataType.UNSPECIFIED and _is_int(spec.string_length):
            end = spec.address + register_count(spec)
            if end > MODBUS_ADDRESS_SPACE:
                problems.append(
                    f"the tag spans addresses {spec.address}..{end - 1}, "
                    f"past the last Modbus address {MODBUS_ADDRESS_SPACE - 1}"
                )


def _check_s7(spec: TagSpec, problems: list[str]) -> None:
    area = spec.s7_area
    assert area is not None
    data_type = spec.data_type
    if area is S7Area.DB and not (_is_int(spec.db_number) and 1 <= spec.db_number <= 65535):
        problems.append(f"an S7 DB tag needs db_number 1..65535, got {spec.db_number!r}")
    if data_type is DataType.BOOL:
        if spec.bit is None:
            problems.append("an S7 BOOL needs bit 0..7")
        elif _is_int(spec.bit) and not 0 <= spec.bit <= 7:
            problems.append(f"bit {spec.bit} is out of range 0..7 for an S7 BOOL")
    elif spec.bit is not None:
        problems.append(f"bit must only be set for BOOL tags, got bit {spec.bit!r} on a {data_type.name}")
    if data_type is DataType.STRING and _is_int(spec.string_length) and spec.string_length > S7_MAX_STRING_LENGTH:
        problems.append(
            f"an S7 STRING holds at most {S7_MAX_STRING_LENGTH} characters, got string_length {spec.string_length}"
        )
    if _is_int(spec.address) and not 0 <= spec.address <= S7_MAX_BYTE_OFFSET:
        problems.append(f"S7 byte offset {spec.address} is out of range 0..{S7_MAX_BYTE_OFFSET}")


# ------------------------------------------------------------------------------------------------ decoders


class Decoder:
    """A tag compiled for fast decoding. Build with :func:`make_decoder`, once per tag, and reuse.

    Attributes:
        spec: The tag.
        width: What the tag occupies in the data handed to ``decode``: registers for Modbus register tables,
            bits for coils and discrete inputs, bytes for S7.
        decode: ``decode(data, pos=0) -> Value``. ``data`` is a sequence of register values (ints 0..65535),
            a sequence of bits (bools or 0/1) for coils and discrete inputs, or a bytes-like object for S7;
            ``pos`` is the index of the tag's first register, bit or byte in ``data`` (its offset in a block
            read). Extra data after the tag is ignored. Raises :class:`DecodeError` when the data is short or
            holds an impossible register or bit value.
    """

    __slots__ = ("spec", "width", "decode")

    spec: TagSpec
    width: int
    decode: Callable[..., Value]

    def __init__(self, spec: TagSpec, width: int, decode: Callable[..., Value]) -> None:
        self.spec = spec
        self.width = width
        self.decode = decode

    def __repr__(self) -> str:
        return f"Decoder(tag_id={self.spec.tag_id}, data_type={self.spec.data_type.name}, width={self.width})"


def make_decoder(spec: TagSpec) -> Decoder:
    """Validate ``spec`` and compile it into a :class:`Decoder` for its protocol.

    Raises:
        TagSpecError: :func:`validate_spec` found problems; the message lists all of them.
    """
    problems = validate_spec(spec)
    if problems:
        raise TagSpecError(spec.tag_id, "invalid tag definition: " + "; ".join(problems))
    if spec.modbus_table is not None:
        return _modbus_decoder(spec)
    return _s7_decoder(spec)


# Error construction lives on the cold path, out of the decode closures.


def _plural(count: int, unit: str) -> str:
    return f"{count} {unit}" if count == 1 else f"{count} {unit}s"


def _short_data(spec: TagSpec, unit: str, width: int, pos: int, length: int) -> DecodeError:
    available = max(0, length - pos)
    return DecodeError(
        spec.tag_id,
        f"short data: {spec.data_type.name} needs {_plural(width, unit)} from position {pos}, "
        f"but only {_plural(available, unit)} arrived there ({length} in total)",
    )


def _bad_register(spec: TagSpec, registers: Sequence[Any], pos: int, end: int) -> DecodeError:
    for index in range(pos, end):
        value = registers[index]
        if not (isinstance(value, int) and 0 <= value <= 0xFFFF):
            detail = f"register at position {index} is {value!r}, expected an integer 0..65535"
            return DecodeError(spec.tag_id, detail)
    # struct rejected a value that passes the check above (an exotic int subclass); stay explicit anyway.
    return DecodeError(spec.tag_id, f"registers at positions {pos}..{end - 1} are not 16-bit values")


def _modbus_decoder(spec: TagSpec) -> Decoder:
    table = spec.modbus_table
    assert table is not None
    data_type = spec.data_type
    if table is ModbusTable.UNSPECIFIED:  # make_decoder validated the spec first; a guard only
        raise TagSpecError(spec.tag_id, "modbus_table is unspecified")
    if table.is_bit_table:
        return Decoder(spec, 1, _modbus_bit(spec))
    if data_type is DataType.BOOL:
        return Decoder(spec, 1, _modbus_register_bit(spec))
    if data_type is DataType.STRING:
        return Decoder(spec, register_count(spec), _modbus_string(spec))
    return Decoder(spec, register_count(spec), _modbus_numeric(spec))


def _modbus_bit(spec: TagSpec) -> Callable[..., Value]:
    table_name = spec.modbus_table.name if spec.modbus_table else "bit"

    def decode(bits: Sequence[Any], pos: int = 0) -> bool:
        if pos >= len(bits):
            raise _short_data(spec, "bit", 1, pos, len(bits))
        value = bits[pos]
        if value is True or value is False:
            return value
        if _is_int(value) and (value == 0 or value == 1):
            return value == 1
        raise DecodeError(spec.tag_id, f"{table_name} value at position {pos} is {value!r}, expected a bool or 0/1")

    return decode


def _modbus_register_bit(spec: TagSpec) -> Callable[..., Value]:
    assert spec.bit is not None
    # Bit n of the 16-bit value under the tag's byte order; swapping the bytes moves bit n to bit (n + 8) % 16.
    shift = (spec.bit + 8) % 16 if spec.byte_order is ByteOrder.LITTLE else spec.bit

    def decode(registers: Sequence[Any], pos: int = 0) -> bool:
        if pos >= len(registers):
            raise _short_data(spec, "register", 1, pos, len(registers))
        value = registers[pos]
        if isinstance(value, int) and 0 <= value <= 0xFFFF:
            return bool((value >> shift) & 1)
        raise _bad_register(spec, registers, pos, pos + 1)

    return decode


def _order_structs(spec: TagSpec, code: str, words: int) -> tuple[struct.Struct, struct.Struct]:
    """(pack, unpack) structs turning the tag's registers, in address order, into its value.

    Packing registers big endian reproduces the bytes as they travel (ABCD order). Instead of shuffling
    bytes, the tag's order is absorbed into the two format strings:

    * a LITTLE word order is a full byte reversal of a value whose bytes are swapped within each word, so
      the value is unpacked little endian and each register is packed with swapped bytes;
    * a LITTLE byte order swaps the bytes of each register once more.

    Hence the value is unpacked in the word order, and registers are packed big endian exactly when byte
    and word order agree. For single-word values both orders collapse to the byte order, as they should.
    """
    word_little = spec.word_order is WordOrder.LITTLE
    byte_little = spec.byte_order is ByteOrder.LITTLE
    pack = struct.Struct(("<" if byte_little != word_little else ">") + "H" * words)
    unpack = struct.Struct(("<" if word_little else ">") + code)
    return pack, unpack


def _modbus_numeric(spec: TagSpec) -> Callable[..., Value]:
    code, size = _NUMERIC[spec.data_type]
    words = size // 2
    pack_struct, unpack_struct = _order_structs(spec, code, words)
    pack, unpack = pack_struct.pack, unpack_struct.unpack
    scaled, scale, offset = spec.is_scaled, spec.scale, spec.offset

    if words == 1:

        def decode(registers: Sequence[Any], pos: int = 0) -> Value:
            if pos >= len(registers):
                raise _short_data(spec, "register", 1, pos, len(registers))
            try:
                raw = unpack(pack(registers[pos]))[0]
            except struct.error:
                raise _bad_register(spec, registers, pos, pos + 1) from None
            return raw * scale + offset if scaled else raw

        return decode

    def decode_words(registers: Sequence[Any], pos: int = 0) -> Value:
        end = pos + words
        if end > len(registers):
            raise _short_data(spec, "register", words, pos, len(registers))
        try:
            raw = unpack(pack(*registers[pos:end]))[0]
        except struct.error:
            raise _bad_register(spec, registers, pos, end) from None
        return raw * scale + offset if scaled else raw

    return decode_words


def _clean_string(raw: bytes) -> str:
    """Cut at the first NUL (C string convention; also keeps NULs out of the database) and decode latin-1."""
    nul = raw.find(0)
    if nul >= 0:
        raw = raw[:nul]
    return raw.decode("latin-1")


def _modbus_string(spec: TagSpec) -> Callable[..., Value]:
    length = spec.string_length
    words = (length + 1) // 2
    # Two characters per register, the first in the high byte under BIG byte order. Word order does not
    # apply: a string is a run of registers in address order, not a multi-word number.
    pack = struct.Struct(("<" if spec.byte_order is ByteOrder.LITTLE else ">") + "H" * words).pack

    def decode(registers: Sequence[Any], pos: int = 0) -> str:
        end = pos + words
        if end > len(registers):
            raise _short_data(spec, "register", words, pos, len(registers))
        try:
            raw = pack(*registers[pos:end])
        except struct.error:
            raise _bad_register(spec, registers, pos, end) from None
        # An odd length leaves a padding byte in the last register; then drop padding NULs and spaces.
        return _clean_string(raw[:length]).rstrip(" ")

    return decode


def _s7_decoder(spec: TagSpec) -> Decoder:
    data_type = spec.data_type
    if data_type is DataType.BOOL:
        return Decoder(spec, 1, _s7_bit(spec))
    if data_type is DataType.STRING:
        return Decoder(spec, byte_count(spec), _s7_string(spec))
    return Decoder(spec, byte_count(spec), _s7_numeric(spec))


def _s7_bit(spec: TagSpec) -> Callable[..., Value]:
    assert spec.bit is not None
    mask = 1 << spec.bit

    def decode(data: bytes | bytearray | memoryview, pos: int = 0) -> bool:
        if pos >= len(data):
            raise _short_data(spec, "byte", 1, pos, len(data))
        return (data[pos] & mask) != 0

    return decode


def _s7_numeric(spec: TagSpec) -> Callable[..., Value]:
    code, size = _NUMERIC[spec.data_type]
    words = size // 2
    scaled, scale, offset = spec.is_scaled, spec.scale, spec.offset
    byte_little = spec.byte_order is ByteOrder.LITTLE
    word_little = spec.word_order is WordOrder.LITTLE

    if words == 1 or byte_little == word_little:
        # ABCD is plain big endian and DCBA plain little endian (a single word only knows its byte order):
        # one unpack straight from the buffer.
        unpack_from = struct.Struct(("<" if byte_little else ">") + code).unpack_from

        def decode(data: bytes | bytearray | memoryview, pos: int = 0) -> Value:
            if pos + size > len(data):
                raise _short_data(spec, "byte", size, pos, len(data))
            raw = unpack_from(data, pos)[0]
            return raw * scale + offset if scaled else raw

        return decode

    # CDAB and BADC: read the bytes as big-endian words (what a Modbus device would send) and reuse the
    # register path.
    words_from = struct.Struct(">" + "H" * words).unpack_from
    pack_struct, unpack_struct = _order_structs(spec, code, words)
    pack, unpack = pack_struct.pack, unpack_struct.unpack

    def decode_mixed(data: bytes | bytearray | memoryview, pos: int = 0) -> Value:
        if pos + size > len(data):
            raise _short_data(spec, "byte", size, pos, len(data))
        raw = unpack(pack(*words_from(data, pos)))[0]
        return raw * scale + offset if scaled else raw

    return decode_mixed


def _s7_string(spec: TagSpec) -> Callable[..., Value]:
    length = spec.string_length
    size = length + 2

    def decode(data: bytes | bytearray | memoryview, pos: int = 0) -> str:
        # S7 STRING: byte 0 = declared maximum length, byte 1 = current length, then the characters.
        # A current length beyond the declared maximum or the configured length is clamped, never trusted.
        if pos + size > len(data):
            raise _short_data(spec, "byte", size, pos, len(data))
        current = min(data[pos + 1], data[pos], length)
        start = pos + 2
        return _clean_string(bytes(data[start : start + current]))

    return decode
