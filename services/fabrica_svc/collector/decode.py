"""Decoding of raw PLC data into tag values.

This module is the pure core of the collector: it knows how Modbus registers, Modbus bits and S7 bytes encode
the value of a tag, and nothing about connections, gRPC or protocol libraries.

The flow is: describe a tag as a :class:`TagSpec` (the tag model of :mod:`fabrica_svc.plcmodel.spec`, which
also holds the rules a definition must satisfy), compile it once with :func:`make_decoder`, then call the
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

import struct
from collections.abc import Callable, Sequence
from typing import Any, Final, TypeAlias

from ..plcmodel.spec import (
    VALUE_BYTES,
    ByteOrder,
    DataType,
    DecodeError,
    ModbusTable,
    TagSpec,
    TagSpecError,
    WordOrder,
    byte_count,
    register_count,
    validate_spec,
)

__all__ = ["Decoder", "Value", "make_decoder"]

#: A decoded tag value.
Value: TypeAlias = bool | int | float | str

# struct format character of every fixed-size numeric type (sizes in VALUE_BYTES).
_FORMAT: Final[dict[DataType, str]] = {
    DataType.INT16: "h",
    DataType.UINT16: "H",
    DataType.INT32: "i",
    DataType.UINT32: "I",
    DataType.INT64: "q",
    DataType.UINT64: "Q",
    DataType.FLOAT32: "f",
    DataType.FLOAT64: "d",
}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


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
        TagSpecError: :func:`validate_spec` found problems; the message lists all of them and ``violations``
            holds them with their fields.
    """
    problems = validate_spec(spec)
    if problems:
        detail = "invalid tag definition: " + "; ".join(p.description for p in problems)
        raise TagSpecError(spec.tag_id, detail, tuple(problems))
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
    code, size = _FORMAT[spec.data_type], VALUE_BYTES[spec.data_type]
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
    code, size = _FORMAT[spec.data_type], VALUE_BYTES[spec.data_type]
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
