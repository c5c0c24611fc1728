"""Golden-vector tests of the collector's decoders.

Every expected register and byte value below is written out by hand (IEEE 754 / two's complement), never
produced by the code under test. Orders: ABCD = bytes BIG, words BIG; CDAB = bytes BIG, words LITTLE;
BADC = bytes LITTLE, words BIG; DCBA = bytes LITTLE, words LITTLE.
"""

from __future__ import annotations

import math
import pickle

import pytest

from fabrica_svc.collector.decode import make_decoder
from fabrica_svc.plcmodel.spec import (
    ByteOrder,
    DataType,
    DecodeError,
    ModbusTable,
    S7Area,
    TagSpec,
    TagSpecError,
    WordOrder,
    byte_count,
    register_count,
    validate_spec,
)

ORDERS = {
    "ABCD": (ByteOrder.BIG, WordOrder.BIG),
    "CDAB": (ByteOrder.BIG, WordOrder.LITTLE),
    "BADC": (ByteOrder.LITTLE, WordOrder.BIG),
    "DCBA": (ByteOrder.LITTLE, WordOrder.LITTLE),
}

HR = ModbusTable.HOLDING_REGISTER


def modbus(data_type: DataType, order: str = "ABCD", **kwargs) -> TagSpec:
    byte_order, word_order = ORDERS[order]
    kwargs.setdefault("modbus_table", HR)
    tag_id = kwargs.pop("tag_id", 7)
    return TagSpec(tag_id, data_type, byte_order=byte_order, word_order=word_order, **kwargs)


def s7(data_type: DataType, order: str = "ABCD", **kwargs) -> TagSpec:
    byte_order, word_order = ORDERS[order]
    kwargs.setdefault("s7_area", S7Area.DB)
    kwargs.setdefault("db_number", 1)
    tag_id = kwargs.pop("tag_id", 9)
    return TagSpec(tag_id, data_type, byte_order=byte_order, word_order=word_order, **kwargs)


def wire_bytes(registers: list[int]) -> bytes:
    """The bytes of hand-written registers as they travel: each register high byte first."""
    return b"".join(register.to_bytes(2, "big") for register in registers)


# (data type, order, registers in address order, expected value)
NUMERIC_VECTORS = [
    # FLOAT32 123.456 = 0x42F6E979 (nearest float32 is 123.45600128173828)
    (DataType.FLOAT32, "ABCD", [0x42F6, 0xE979], 123.45600128173828),
    (DataType.FLOAT32, "CDAB", [0xE979, 0x42F6], 123.45600128173828),
    (DataType.FLOAT32, "BADC", [0xF642, 0x79E9], 123.45600128173828),
    (DataType.FLOAT32, "DCBA", [0x79E9, 0xF642], 123.45600128173828),
    # INT32 -123456789 = 0xF8A432EB
    (DataType.INT32, "ABCD", [0xF8A4, 0x32EB], -123456789),
    (DataType.INT32, "CDAB", [0x32EB, 0xF8A4], -123456789),
    (DataType.INT32, "BADC", [0xA4F8, 0xEB32], -123456789),
    (DataType.INT32, "DCBA", [0xEB32, 0xA4F8], -123456789),
    # UINT32 4000000000 = 0xEE6B2800 (above the INT32 range)
    (DataType.UINT32, "ABCD", [0xEE6B, 0x2800], 4000000000),
    (DataType.UINT32, "CDAB", [0x2800, 0xEE6B], 4000000000),
    (DataType.UINT32, "BADC", [0x6BEE, 0x0028], 4000000000),
    (DataType.UINT32, "DCBA", [0x0028, 0x6BEE], 4000000000),
    # INT64 -1234567890123456789 = 0xEEDDEF0B82167EEB
    (DataType.INT64, "ABCD", [0xEEDD, 0xEF0B, 0x8216, 0x7EEB], -1234567890123456789),
    (DataType.INT64, "CDAB", [0x7EEB, 0x8216, 0xEF0B, 0xEEDD], -1234567890123456789),
    (DataType.INT64, "BADC", [0xDDEE, 0x0BEF, 0x1682, 0xEB7E], -1234567890123456789),
    (DataType.INT64, "DCBA", [0xEB7E, 0x1682, 0x0BEF, 0xDDEE], -1234567890123456789),
    # UINT64 0xFEDCBA9876543210 = 18364758544493064720 (above the INT64 range, exact as a Python int)
    (DataType.UINT64, "ABCD", [0xFEDC, 0xBA98, 0x7654, 0x3210], 18364758544493064720),
    (DataType.UINT64, "CDAB", [0x3210, 0x7654, 0xBA98, 0xFEDC], 18364758544493064720),
    (DataType.UINT64, "BADC", [0xDCFE, 0x98BA, 0x5476, 0x1032], 18364758544493064720),
    (DataType.UINT64, "DCBA", [0x1032, 0x5476, 0x98BA, 0xDCFE], 18364758544493064720),
    # FLOAT64 -123.456 = 0xC05EDD2F1A9FBE77
    (DataType.FLOAT64, "ABCD", [0xC05E, 0xDD2F, 0x1A9F, 0xBE77], -123.456),
    (DataType.FLOAT64, "CDAB", [0xBE77, 0x1A9F, 0xDD2F, 0xC05E], -123.456),
    (DataType.FLOAT64, "BADC", [0x5EC0, 0x2FDD, 0x9F1A, 0x77BE], -123.456),
    (DataType.FLOAT64, "DCBA", [0x77BE, 0x9F1A, 0x2FDD, 0x5EC0], -123.456),
    # INT16 -12345 = 0xCFC7; word order cannot matter for a single word
    (DataType.INT16, "ABCD", [0xCFC7], -12345),
    (DataType.INT16, "CDAB", [0xCFC7], -12345),
    (DataType.INT16, "BADC", [0xC7CF], -12345),
    (DataType.INT16, "DCBA", [0xC7CF], -12345),
    # UINT16 50000 = 0xC350 (above the INT16 range)
    (DataType.UINT16, "ABCD", [0xC350], 50000),
    (DataType.UINT16, "CDAB", [0xC350], 50000),
    (DataType.UINT16, "BADC", [0x50C3], 50000),
    (DataType.UINT16, "DCBA", [0x50C3], 50000),
]


def vector_id(vector: tuple) -> str:
    return f"{vector[0].name}-{vector[1]}"


@pytest.mark.parametrize("vector", NUMERIC_VECTORS, ids=vector_id)
def test_modbus_numeric_golden(vector):
    data_type, order, registers, expected = vector
    decoder = make_decoder(modbus(data_type, order))
    value = decoder.decode(registers)
    assert value == expected
    assert type(value) is type(expected)
    assert decoder.width == len(registers)


@pytest.mark.parametrize("vector", NUMERIC_VECTORS, ids=vector_id)
def test_modbus_numeric_golden_at_offset_in_block(vector):
    data_type, order, registers, expected = vector
    decoder = make_decoder(modbus(data_type, order))
    assert decoder.decode([0xFFFF, 0x0000, *registers, 0x1234], 2) == expected


@pytest.mark.parametrize("vector", NUMERIC_VECTORS, ids=vector_id)
def test_s7_numeric_golden(vector):
    data_type, order, registers, expected = vector
    decoder = make_decoder(s7(data_type, order, address=3))
    data = wire_bytes(registers)
    assert decoder.decode(data) == expected
    assert decoder.decode(bytearray(b"\xaa\xbb" + data + b"\xcc"), 2) == expected
    assert decoder.width == len(data)


@pytest.mark.parametrize(
    ("data_type", "data", "expected"),
    [
        (DataType.FLOAT32, b"\x42\xf6\xe9\x79", 123.45600128173828),  # REAL
        (DataType.INT16, b"\xcf\xc7", -12345),  # INT
        (DataType.UINT16, b"\xc3\x50", 50000),  # WORD / UINT
        (DataType.INT32, b"\xf8\xa4\x32\xeb", -123456789),  # DINT
        (DataType.UINT32, b"\xee\x6b\x28\x00", 4000000000),  # UDINT
        (DataType.INT64, b"\xee\xdd\xef\x0b\x82\x16\x7e\xeb", -1234567890123456789),  # LINT
        (DataType.FLOAT64, b"\xc0\x5e\xdd\x2f\x1a\x9f\xbe\x77", -123.456),  # LREAL
    ],
    ids=lambda v: v.name if isinstance(v, DataType) else None,
)
def test_s7_default_order_is_big_endian(data_type, data, expected):
    assert make_decoder(s7(data_type)).decode(data) == expected
    # UNSPECIFIED (0) orders, as a protobuf default, mean ABCD too.
    spec = TagSpec(9, data_type, s7_area=S7Area.DB, db_number=1, byte_order=0, word_order=0)
    assert spec.byte_order is ByteOrder.BIG and spec.word_order is WordOrder.BIG
    assert make_decoder(spec).decode(memoryview(data)) == expected


# ------------------------------------------------------------------------------------------------- bools


@pytest.mark.parametrize(
    ("order", "bit", "register", "expected"),
    [
        ("ABCD", 0, 0x0001, True),
        ("ABCD", 0, 0xFFFE, False),
        ("ABCD", 15, 0x8000, True),
        ("ABCD", 15, 0x7FFF, False),
        ("ABCD", 3, 0x0008, True),
        ("CDAB", 0, 0x0001, True),
        ("CDAB", 15, 0x8000, True),
        # With swapped bytes, bit n is bit n of the byte-swapped value.
        ("BADC", 0, 0x0100, True),
        ("BADC", 0, 0x0001, False),
        ("BADC", 15, 0x0080, True),
        ("BADC", 15, 0x8000, False),
        ("DCBA", 0, 0x0100, True),
        ("DCBA", 15, 0x0080, True),
    ],
)
def test_modbus_bool_in_register(order, bit, register, expected):
    for table in (ModbusTable.HOLDING_REGISTER, ModbusTable.INPUT_REGISTER):
        decoder = make_decoder(modbus(DataType.BOOL, order, bit=bit, modbus_table=table))
        assert decoder.decode([register]) is expected
        assert decoder.decode([0, 0, register], 2) is expected


@pytest.mark.parametrize("table", [ModbusTable.COIL, ModbusTable.DISCRETE_INPUT])
@pytest.mark.parametrize(
    ("bits", "pos", "expected"), [([True], 0, True), ([False, True], 0, False), ([0, 1, 0], 1, True)]
)
def test_modbus_bit_tables(table, bits, pos, expected):
    decoder = make_decoder(TagSpec(3, DataType.BOOL, modbus_table=table, address=10))
    assert decoder.decode(bits, pos) is expected
    assert decoder.width == 1


@pytest.mark.parametrize(
    ("bit", "byte", "expected"),
    [(0, 0x01, True), (0, 0xFE, False), (7, 0x80, True), (7, 0x7F, False), (4, 0x10, True)],
)
def test_s7_bool(bit, byte, expected):
    decoder = make_decoder(s7(DataType.BOOL, bit=bit, s7_area=S7Area.MERKERS, db_number=0))
    assert decoder.decode(bytes([byte])) is expected
    assert decoder.decode(bytes([0x00, byte]), 1) is expected


# ----------------------------------------------------------------------------------------------- strings


@pytest.mark.parametrize(
    ("order", "length", "registers", "expected"),
    [
        # "HELLO": H=0x48 E=0x45 L=0x4C O=0x4F, two characters per register, high byte first.
        ("ABCD", 5, [0x4845, 0x4C4C, 0x4F00], "HELLO"),
        ("ABCD", 5, [0x4845, 0x4C4C, 0x4F20], "HELLO"),  # odd length: the last low byte is padding
        ("ABCD", 6, [0x4845, 0x4C4C, 0x4F00], "HELLO"),  # trailing NUL stripped
        ("ABCD", 8, [0x4142, 0x2020, 0x0000, 0x0000], "AB"),  # trailing spaces and NULs stripped
        ("ABCD", 4, [0x2041, 0x4220], " AB"),  # leading space kept
        ("ABCD", 6, [0x4142, 0x0043, 0x4445], "AB"),  # ends at the first NUL; stale bytes after it ignored
        ("ABCD", 2, [0xE97A], "\u00e9z"),  # latin-1
        ("ABCD", 4, [0x0000, 0x0000], ""),
        # Word order does not apply to strings; byte order swaps the two characters of each register.
        ("CDAB", 5, [0x4845, 0x4C4C, 0x4F00], "HELLO"),
        ("BADC", 5, [0x4548, 0x4C4C, 0x004F], "HELLO"),
        ("DCBA", 5, [0x4548, 0x4C4C, 0x004F], "HELLO"),
    ],
)
def test_modbus_string(order, length, registers, expected):
    decoder = make_decoder(modbus(DataType.STRING, order, string_length=length))
    assert decoder.width == (length + 1) // 2
    assert decoder.decode(registers) == expected
    assert decoder.decode([0x5858, *registers], 1) == expected


@pytest.mark.parametrize(
    ("length", "data", "expected"),
    [
        (10, b"\x0a\x05HELLO\x00\x00\x00\x00\x00", "HELLO"),  # header: max 10, current 5
        (10, b"\x0a\x05HELLOWORLD", "HELLO"),  # bytes past the current length ignored
        (4, b"\x0a\x08ABCD", "ABCD"),  # current length clamped to the configured length
        (10, b"\x03\x08ABCDEFGHIJ", "ABC"),  # corrupt header: current above maximum, clamped to maximum
        (10, b"\x0a\x00XXXXXXXXXX", ""),
        (6, b"\x06\x06AB\x00CDE", "AB"),  # never return a NUL
        (4, b"\x04\x04AB  ", "AB  "),  # S7 lengths are exact: trailing spaces are content
        (2, b"\x02\x02\xe4\xf6", "\u00e4\u00f6"),  # latin-1
    ],
)
def test_s7_string(length, data, expected):
    decoder = make_decoder(s7(DataType.STRING, string_length=length))
    assert decoder.width == length + 2
    assert decoder.decode(data) == expected
    assert decoder.decode(b"\xff" + data, 1) == expected


@pytest.mark.parametrize("order", list(ORDERS))
def test_s7_string_ignores_byte_and_word_order(order):
    decoder = make_decoder(s7(DataType.STRING, order, string_length=5))
    assert decoder.decode(b"\x05\x05HELLO") == "HELLO"


# ------------------------------------------------------------------------------------------------ scaling


@pytest.mark.parametrize(
    ("data_type", "registers", "scale", "offset", "expected"),
    [
        (DataType.INT16, [0x00FA], 0.1, -10.0, 15.0),  # 250 * 0.1 - 10
        (DataType.INT16, [0xFF38], 0.5, 0.0, -100.0),  # -200 * 0.5
        (DataType.UINT16, [0x03E8], 2, 0, 2000.0),  # 1000 * 2: int scale still yields a float
        (DataType.UINT16, [0x03E8], 1, 5, 1005.0),
        (DataType.INT32, [0xF8A4, 0x32EB], 0.001, 0.0, -123456.789),
        (DataType.FLOAT32, [0x42F6, 0xE979], 1.0, 0.0, 123.45600128173828),
        (DataType.FLOAT32, [0x3FC0, 0x0000], 10.0, 1.0, 16.0),  # 1.5 * 10 + 1
    ],
)
def test_scale_and_offset(data_type, registers, scale, offset, expected):
    value = make_decoder(modbus(data_type, scale=scale, offset=offset)).decode(registers)
    assert value == pytest.approx(expected, rel=1e-12)
    assert type(value) is float


def test_s7_scale_and_offset():
    spec = s7(DataType.INT16, scale=0.1, offset=-10.0)  # 250 = 0x00FA
    assert make_decoder(spec).decode(b"\x00\xfa") == pytest.approx(15.0)
    spec = s7(DataType.INT32, "CDAB", scale=2.0)  # 1000 = 0x000003E8, words swapped
    assert make_decoder(spec).decode(b"\x03\xe8\x00\x00") == 2000.0


def test_unscaled_integers_stay_ints():
    value = make_decoder(modbus(DataType.UINT16)).decode([0x03E8])
    assert value == 1000 and type(value) is int


@pytest.mark.parametrize(
    ("spec", "data", "expected"),
    [
        (modbus(DataType.BOOL, bit=0, scale=10.0, offset=3.0), [0x0001], True),
        (TagSpec(1, DataType.BOOL, modbus_table=ModbusTable.COIL, scale=10.0, offset=3.0), [True], True),
        (modbus(DataType.STRING, string_length=2, scale=10.0, offset=3.0), [0x4142], "AB"),
        (s7(DataType.BOOL, bit=1, scale=10.0, offset=3.0), b"\x02", True),
        (s7(DataType.STRING, string_length=2, scale=10.0, offset=3.0), b"\x02\x02AB", "AB"),
    ],
)
def test_bools_and_strings_ignore_scaling(spec, data, expected):
    assert make_decoder(spec).decode(data) == expected


# ---------------------------------------------------------------------------------------------- counting


@pytest.mark.parametrize(
    ("data_type", "string_length", "registers", "s7_bytes"),
    [
        (DataType.BOOL, 0, 1, 1),
        (DataType.INT16, 0, 1, 2),
        (DataType.UINT16, 0, 1, 2),
        (DataType.INT32, 0, 2, 4),
        (DataType.UINT32, 0, 2, 4),
        (DataType.FLOAT32, 0, 2, 4),
        (DataType.INT64, 0, 4, 8),
        (DataType.UINT64, 0, 4, 8),
        (DataType.FLOAT64, 0, 4, 8),
        (DataType.STRING, 1, 1, 3),
        (DataType.STRING, 10, 5, 12),
        (DataType.STRING, 11, 6, 13),
    ],
)
def test_register_and_byte_counts(data_type, string_length, registers, s7_bytes):
    bit = 0 if data_type is DataType.BOOL else None
    spec = TagSpec(1, data_type, modbus_table=HR, bit=bit, string_length=string_length)
    assert register_count(spec) == registers
    assert byte_count(spec) == s7_bytes


def test_counts_of_unspecified_type_raise():
    spec = TagSpec(4, DataType.UNSPECIFIED, modbus_table=HR)
    with pytest.raises(TagSpecError, match="tag 4: data_type is unspecified"):
        register_count(spec)
    with pytest.raises(TagSpecError, match="tag 4: data_type is unspecified"):
        byte_count(spec)


# ------------------------------------------------------------------------------------------- spec intake


def test_tag_spec_accepts_protobuf_enum_numbers():
    spec = TagSpec(5, 8, modbus_table=4, address=100, byte_order=2, word_order=1, scale=2, offset=1)
    assert spec.data_type is DataType.FLOAT32
    assert spec.modbus_table is ModbusTable.HOLDING_REGISTER
    assert spec.byte_order is ByteOrder.LITTLE and spec.word_order is WordOrder.BIG
    assert type(spec.scale) is float and type(spec.offset) is float
    assert spec.is_scaled


def test_tag_spec_follows_the_contract_for_unset_enums():
    # S7_AREA_UNSPECIFIED means a data block.
    spec = TagSpec(5, DataType.INT16, s7_area=0, db_number=3)
    assert spec.s7_area is S7Area.DB and validate_spec(spec) == []
    assert make_decoder(spec).decode(b"\x00\x2a") == 42
    # MODBUS_TABLE_UNSPECIFIED is rejected.
    spec = TagSpec(5, DataType.INT16, modbus_table=0)
    assert spec.modbus_table is ModbusTable.UNSPECIFIED
    assert [(v.field, v.description) for v in validate_spec(spec)] == [("modbus.table", "modbus_table is unspecified")]
    spec = TagSpec(5, DataType.INT16, modbus_table=HR, byte_order=None, word_order=None)
    assert (spec.byte_order, spec.word_order, spec.is_scaled) == (ByteOrder.BIG, WordOrder.BIG, False)


@pytest.mark.parametrize(
    ("kwargs", "field", "message"),
    [
        ({"data_type": 42}, "data_type", "data_type 42 is not a valid DataType"),
        ({"modbus_table": 9}, "modbus.table", "modbus_table 9 is not a valid ModbusTable"),
        ({"s7_area": 5}, "s7.area", "s7_area 5 is not a valid S7Area"),
        ({"byte_order": 3}, "byte_order", "byte_order 3 is not a valid ByteOrder"),
        ({"word_order": "big"}, "word_order", "word_order 'big' is not a valid WordOrder"),
        ({"scale": "x"}, "scale", "scale 'x' is not a number"),
    ],
)
def test_tag_spec_rejects_unknown_enum_numbers(kwargs, field, message):
    kwargs = {"data_type": DataType.INT16, **kwargs}
    with pytest.raises(TagSpecError, match=f"^tag 12: {message}") as caught:
        TagSpec(12, **kwargs)
    assert [v.field for v in caught.value.violations] == [field]


def test_tag_spec_reports_every_unknown_enum_number_at_once():
    with pytest.raises(TagSpecError) as caught:
        TagSpec(12, 42, modbus_table=9, byte_order=3)
    assert [v.field for v in caught.value.violations] == ["data_type", "modbus.table", "byte_order"]


def test_tag_spec_is_frozen_and_hashable():
    spec = modbus(DataType.INT16)
    with pytest.raises(AttributeError):
        spec.address = 3  # type: ignore[misc]
    assert spec == modbus(DataType.INT16)
    assert hash(spec) == hash(modbus(DataType.INT16))


# ------------------------------------------------------------------------------------------- spec errors


@pytest.mark.parametrize(
    ("spec", "field", "problem"),
    [
        (TagSpec(7, DataType.FLOAT32, modbus_table=ModbusTable.COIL),
         "data_type", "a FLOAT32 tag cannot live in the COIL table"),
        (TagSpec(7, DataType.INT16, modbus_table=ModbusTable.DISCRETE_INPUT),
         "data_type", "cannot live in the DISCRETE_INPUT table"),
        (TagSpec(7, DataType.BOOL, modbus_table=ModbusTable.COIL, bit=0),
         "bit", "bit must not be set for the COIL table"),
        (TagSpec(7, DataType.BOOL, modbus_table=HR), "bit", "a BOOL in the HOLDING_REGISTER table needs bit 0..15"),
        (TagSpec(7, DataType.BOOL, modbus_table=HR, bit=16), "bit", "bit 16 is out of range 0..15"),
        (TagSpec(7, DataType.BOOL, modbus_table=HR, bit=-1), "bit", "bit -1 is out of range 0..15"),
        (TagSpec(7, DataType.INT16, modbus_table=HR, bit=3), "bit", "bit must only be set for BOOL tags"),
        (TagSpec(7, DataType.INT16, modbus_table=HR, address=65536),
         "modbus.address", "Modbus address 65536 is out of range 0..65535"),
        (TagSpec(7, DataType.INT16, modbus_table=HR, address=-1),
         "modbus.address", "Modbus address -1 is out of range"),
        (TagSpec(7, DataType.FLOAT64, modbus_table=HR, address=65533),
         "modbus.address", "spans addresses 65533..65536"),
        (TagSpec(7, DataType.STRING, modbus_table=HR), "string_length", "a STRING needs string_length >= 1, got 0"),
        (TagSpec(7, DataType.UNSPECIFIED, modbus_table=HR), "data_type", "data_type is unspecified"),
        (TagSpec(7, DataType.INT32, modbus_table=HR, string_length=4),
         "string_length", "only STRING tags have a string_length, got 4 on a INT32"),
        (TagSpec(7, DataType.BOOL, s7_area=S7Area.MERKERS, bit=0, string_length=1),
         "string_length", "only STRING tags have a string_length"),
        (TagSpec(7, DataType.INT16), "address", "neither modbus_table nor s7_area is set"),
        (TagSpec(7, DataType.INT16, modbus_table=HR, s7_area=S7Area.DB, db_number=1),
         "address", "both modbus_table and s7_area"),
        (TagSpec(7, DataType.INT16, modbus_table=HR, scale=0),
         "scale", "scale must be a finite, non-zero number, got 0.0"),
        (TagSpec(7, DataType.INT16, modbus_table=HR, scale=math.nan), "scale", "scale must be a finite"),
        (TagSpec(7, DataType.INT16, modbus_table=HR, offset=math.inf), "offset", "offset must be a finite number"),
        (TagSpec(0, DataType.INT16, modbus_table=HR), "id", "tag_id must be a positive integer, got 0"),
        (TagSpec(7, DataType.INT16, s7_area=S7Area.DB, db_number=0),
         "s7.db_number", "an S7 DB tag needs db_number 1..65535, got 0"),
        (TagSpec(7, DataType.BOOL, s7_area=S7Area.DB, db_number=1), "bit", "an S7 BOOL needs bit 0..7"),
        (TagSpec(7, DataType.BOOL, s7_area=S7Area.INPUTS, bit=8), "bit", "bit 8 is out of range 0..7 for an S7 BOOL"),
        (TagSpec(7, DataType.FLOAT32, s7_area=S7Area.OUTPUTS, bit=1), "bit", "bit must only be set for BOOL tags"),
        (TagSpec(7, DataType.STRING, s7_area=S7Area.DB, db_number=1, string_length=255),
         "string_length", "at most 254 characters"),
        (TagSpec(7, DataType.INT16, s7_area=S7Area.MERKERS, address=-2),
         "s7.byte_offset", "S7 byte offset -2 is out of range"),
        (TagSpec(7, DataType.INT16, s7_area=S7Area.MERKERS, address=2**21),
         "s7.byte_offset", "S7 byte offset 2097152 is out of range"),
    ],
)
def test_invalid_definitions(spec, field, problem):
    """Each problem is named in words and on the field of the contract's Tag it is about."""
    found = validate_spec(spec)
    assert any(problem in v.description and v.field == field for v in found), found
    with pytest.raises(TagSpecError, match=r"^tag \d+: invalid tag definition: ") as caught:
        make_decoder(spec)
    assert problem in str(caught.value)
    assert caught.value.violations == tuple(found)
    assert isinstance(caught.value, DecodeError) and isinstance(caught.value, ValueError)


def test_all_problems_are_reported_together():
    problems = validate_spec(TagSpec(7, DataType.FLOAT32, modbus_table=ModbusTable.COIL, bit=2, scale=0))
    assert len(problems) == 3


@pytest.mark.parametrize(
    "spec",
    [
        TagSpec(1, DataType.BOOL, modbus_table=ModbusTable.COIL, address=65535),
        TagSpec(1, DataType.BOOL, modbus_table=ModbusTable.INPUT_REGISTER, bit=15),
        TagSpec(1, DataType.FLOAT64, modbus_table=HR, address=65532),
        TagSpec(1, DataType.STRING, modbus_table=HR, string_length=250),
        TagSpec(1, DataType.INT16, s7_area=S7Area.INPUTS, db_number=7),  # DB number ignored outside DBs
        TagSpec(1, DataType.BOOL, s7_area=S7Area.DB, db_number=65535, bit=7, address=2**21 - 1),
        TagSpec(1, DataType.STRING, s7_area=S7Area.DB, db_number=1, string_length=254),
        TagSpec(1, DataType.INT32, modbus_table=HR, scale=-0.5, offset=-1e9),
    ],
)
def test_valid_definitions(spec):
    assert validate_spec(spec) == []
    make_decoder(spec)


# ----------------------------------------------------------------------------------------- decode errors


@pytest.mark.parametrize(
    ("spec", "data", "pos", "message"),
    [
        (modbus(DataType.FLOAT32), [0x42F6], 0, "needs 2 registers from position 0, but only 1 register arrived there (1 in total)"),
        (modbus(DataType.FLOAT64), [1, 2, 3, 4], 2, "needs 4 registers from position 2, but only 2 registers arrived"),
        (modbus(DataType.INT16), [], 0, "needs 1 register from position 0, but only 0 registers arrived there (0 in total)"),
        (modbus(DataType.INT16), [1, 2], 5, "needs 1 register from position 5, but only 0 registers arrived"),
        (modbus(DataType.BOOL, bit=3), [], 0, "BOOL needs 1 register from position 0"),
        (modbus(DataType.STRING, string_length=6), [0x4142, 0x4344], 0, "STRING needs 3 registers"),
        (TagSpec(7, DataType.BOOL, modbus_table=ModbusTable.COIL), [], 0, "BOOL needs 1 bit from position 0, but only 0 bits"),
        (s7(DataType.FLOAT32), b"\x42\xf6\xe9", 0, "FLOAT32 needs 4 bytes from position 0, but only 3 bytes arrived"),
        (s7(DataType.INT32, "CDAB"), b"\x00\x00\x00\x00", 2, "needs 4 bytes from position 2, but only 2 bytes"),
        (s7(DataType.INT16, "DCBA"), b"", 0, "needs 2 bytes"),
        (s7(DataType.BOOL, bit=0), b"", 0, "BOOL needs 1 byte from position 0, but only 0 bytes"),
        (s7(DataType.STRING, string_length=4), b"\x04\x04ABC", 0, "STRING needs 6 bytes from position 0, but only 5 bytes"),
    ],
)
def test_short_data(spec, data, pos, message):
    with pytest.raises(DecodeError, match="short data") as caught:
        make_decoder(spec).decode(data, pos)
    assert str(caught.value).startswith(f"tag {spec.tag_id}: ")
    assert message in str(caught.value)
    assert caught.value.tag_id == spec.tag_id
    assert not isinstance(caught.value, TagSpecError)


@pytest.mark.parametrize(
    ("spec", "registers", "message"),
    [
        (modbus(DataType.UINT16), [70000], "register at position 0 is 70000"),
        (modbus(DataType.UINT16), [65536], "register at position 0 is 65536"),
        (modbus(DataType.INT16, "BADC"), [-1], "register at position 0 is -1"),
        (modbus(DataType.FLOAT32), [0x42F6, None], "register at position 1 is None"),
        (modbus(DataType.INT32, "CDAB"), [1.5, 0], "register at position 0 is 1.5"),
        (modbus(DataType.UINT64, "DCBA"), [0, 0, 0x10000, 0], "register at position 2 is 65536"),
        (modbus(DataType.BOOL, bit=0), [0x10001], "register at position 0 is 65537"),
        (modbus(DataType.BOOL, bit=0), ["1"], "register at position 0 is '1'"),
        (modbus(DataType.STRING, string_length=4), [0x4142, -5], "register at position 1 is -5"),
    ],
)
def test_register_out_of_range(spec, registers, message):
    with pytest.raises(DecodeError) as caught:
        make_decoder(spec).decode(registers)
    assert str(caught.value) == f"tag {spec.tag_id}: {message}, expected an integer 0..65535"


@pytest.mark.parametrize("value", [2, -1, None, "1", 0.5])
def test_bit_value_not_a_bit(value):
    decoder = make_decoder(TagSpec(8, DataType.BOOL, modbus_table=ModbusTable.DISCRETE_INPUT))
    expected = r"^tag 8: DISCRETE_INPUT value at position 0 is .*, expected a bool or 0/1$"
    with pytest.raises(DecodeError, match=expected):
        decoder.decode([value])


def test_register_boundaries_are_accepted():
    assert make_decoder(modbus(DataType.UINT16)).decode([0]) == 0
    assert make_decoder(modbus(DataType.UINT16)).decode([65535]) == 65535
    assert make_decoder(modbus(DataType.INT16)).decode([0x8000]) == -32768
    assert make_decoder(modbus(DataType.INT16)).decode([0x7FFF]) == 32767


def test_decode_error_pickles():
    error = DecodeError(5, "short data")
    copy = pickle.loads(pickle.dumps(error))
    assert (type(copy), str(copy), copy.tag_id, copy.detail) == (DecodeError, "tag 5: short data", 5, "short data")
    spec_error = pickle.loads(pickle.dumps(TagSpecError(6, "bad")))
    assert type(spec_error) is TagSpecError and spec_error.tag_id == 6


def test_decoder_repr():
    assert repr(make_decoder(modbus(DataType.FLOAT32, tag_id=3))) == "Decoder(tag_id=3, data_type=FLOAT32, width=2)"
