"""Tests of the read planner: block merging, limits, ordering, and per-tag decoding of block responses."""

from __future__ import annotations

import random

import pytest

from fabrica_svc.collector.blocks import (
    DEFAULT_MODBUS_MAX_GAP,
    MODBUS_MAX_BITS,
    MODBUS_MAX_REGISTERS,
    S7_DEFAULT_MAX_BYTES,
    ModbusBlock,
    S7Block,
    plan_modbus,
    plan_modbus_reads,
    plan_s7,
    plan_s7_reads,
)
from fabrica_svc.plcmodel.plc import BlockLimits
from fabrica_svc.plcmodel.spec import DataType, DecodeError, ModbusTable, S7Area, TagSpec, TagSpecError

HR = ModbusTable.HOLDING_REGISTER
IR = ModbusTable.INPUT_REGISTER
COIL = ModbusTable.COIL
DI = ModbusTable.DISCRETE_INPUT


def mb(tag_id: int, address: int, data_type: DataType = DataType.INT16, table: ModbusTable = HR, **kwargs) -> TagSpec:
    return TagSpec(tag_id, data_type, modbus_table=table, address=address, **kwargs)


def coil(tag_id: int, address: int, table: ModbusTable = COIL) -> TagSpec:
    return TagSpec(tag_id, DataType.BOOL, modbus_table=table, address=address)


def db(tag_id: int, address: int, data_type: DataType = DataType.INT16, db_number: int = 1, **kwargs) -> TagSpec:
    return TagSpec(tag_id, data_type, s7_area=S7Area.DB, db_number=db_number, address=address, **kwargs)


def layout(blocks) -> list[tuple]:
    """(table or area/db, start, count, tag ids) per block, for compact assertions."""
    rows = []
    for block in blocks:
        ids = [spec.tag_id for spec, _ in block.tags]
        if isinstance(block, ModbusBlock):
            rows.append((block.table, block.start, block.count, ids))
        else:
            rows.append((block.area, block.db_number, block.start, block.size, ids))
    return rows


def test_protocol_constants():
    assert (MODBUS_MAX_REGISTERS, MODBUS_MAX_BITS, S7_DEFAULT_MAX_BYTES, DEFAULT_MODBUS_MAX_GAP) == (125, 2000, 222, 16)


# ------------------------------------------------------------------------------------------------ Modbus


def test_empty_plan():
    assert plan_modbus_reads([]) == []
    assert plan_s7_reads([]) == []


def test_adjacent_tags_merge():
    specs = [mb(1, 100), mb(2, 101, DataType.FLOAT32), mb(3, 103, DataType.UINT64), mb(4, 107)]
    assert layout(plan_modbus_reads(specs)) == [(HR, 100, 8, [1, 2, 3, 4])]
    assert [offset for _, offset in plan_modbus_reads(specs)[0].tags] == [0, 1, 3, 7]


def test_overlapping_tags_merge():
    # Two bits of register 10, and a 32-bit view overlapping a 16-bit one.
    specs = [
        mb(1, 10, DataType.BOOL, bit=0),
        mb(2, 10, DataType.BOOL, bit=15),
        mb(3, 11, DataType.INT32),
        mb(4, 12, DataType.UINT16),
    ]
    assert layout(plan_modbus_reads(specs, max_gap=0)) == [(HR, 10, 3, [1, 2, 3, 4])]


@pytest.mark.parametrize(
    ("second_address", "max_gap", "expected"),
    [
        (17, 16, [(HR, 0, 18, [1, 2])]),  # 16 unused registers (1..16) bridged
        (18, 16, [(HR, 0, 1, [1]), (HR, 18, 1, [2])]),  # 17 unused registers split
        (5, 3, [(HR, 0, 1, [1]), (HR, 5, 1, [2])]),
        (4, 3, [(HR, 0, 5, [1, 2])]),
        (1, 0, [(HR, 0, 2, [1, 2])]),  # adjacent is contiguous
        (2, 0, [(HR, 0, 1, [1]), (HR, 2, 1, [2])]),  # a single unused register splits with max_gap=0
    ],
)
def test_gap_bridging(second_address, max_gap, expected):
    assert layout(plan_modbus_reads([mb(1, 0), mb(2, second_address)], max_gap=max_gap)) == expected


def test_default_gap_is_sixteen():
    assert len(plan_modbus_reads([mb(1, 0), mb(2, 17)])) == 1
    assert len(plan_modbus_reads([mb(1, 0), mb(2, 18)])) == 2


def test_gap_bridging_applies_in_bits_for_bit_tables():
    assert layout(plan_modbus_reads([coil(1, 0), coil(2, 17)])) == [(COIL, 0, 18, [1, 2])]
    assert layout(plan_modbus_reads([coil(1, 0), coil(2, 18)])) == [(COIL, 0, 1, [1]), (COIL, 18, 1, [2])]


def test_max_gap_zero_keeps_blocks_contiguous():
    specs = [mb(1, 0), mb(2, 1, DataType.FLOAT32), mb(3, 4), mb(4, 5), mb(5, 7, DataType.BOOL, bit=2)]
    blocks = plan_modbus_reads(specs, max_gap=0)
    assert layout(blocks) == [(HR, 0, 3, [1, 2]), (HR, 4, 2, [3, 4]), (HR, 7, 1, [5])]
    for block in blocks:  # every register of every block belongs to a tag
        covered = set()
        for spec, offset in block.tags:
            width = 2 if spec.data_type is DataType.FLOAT32 else 1
            covered.update(range(offset, offset + width))
        assert covered == set(range(block.count))


def test_register_limit_125():
    specs = [mb(i + 1, i) for i in range(125)]
    assert layout(plan_modbus_reads(specs)) == [(HR, 0, 125, list(range(1, 126)))]
    blocks = plan_modbus_reads([*specs, mb(126, 125)])
    assert [(b.start, b.count) for b in blocks] == [(0, 125), (125, 1)]


def test_tag_straddling_the_limit_starts_a_new_block():
    head = [mb(i + 1, i) for i in range(123)]  # registers 0..122
    fits = plan_modbus_reads([*head, mb(200, 123, DataType.FLOAT32)])  # 123..124: ends exactly at 125
    assert [(b.start, b.count) for b in fits] == [(0, 125)]
    straddles = plan_modbus_reads([*head, mb(200, 124, DataType.FLOAT32)])  # 124..125 would need 126
    assert layout(straddles) == [(HR, 0, 123, list(range(1, 124))), (HR, 124, 2, [200])]


def test_bridged_gap_never_exceeds_the_limit():
    blocks = plan_modbus_reads([mb(1, 0), mb(2, 120, DataType.UINT64)], max_gap=200)
    assert [(b.start, b.count) for b in blocks] == [(0, 124)]
    blocks = plan_modbus_reads([mb(1, 0), mb(2, 122, DataType.UINT64)], max_gap=200)
    assert [(b.start, b.count) for b in blocks] == [(0, 1), (122, 4)]


def test_lower_register_limit():
    specs = [mb(i + 1, 2 * i, DataType.FLOAT32) for i in range(10)]  # registers 0..19
    assert [(b.start, b.count) for b in plan_modbus_reads(specs, max_registers=8)] == [(0, 8), (8, 8), (16, 4)]


def test_bit_limit_2000():
    specs = [coil(1, 0), coil(2, 1999)]
    assert layout(plan_modbus_reads(specs, max_gap=5000)) == [(COIL, 0, 2000, [1, 2])]
    blocks = plan_modbus_reads([*specs, coil(3, 2000)], max_gap=5000)
    assert layout(blocks) == [(COIL, 0, 2000, [1, 2]), (COIL, 2000, 1, [3])]
    assert [(b.start, b.count) for b in plan_modbus_reads(specs, max_gap=5000, max_bits=1000)] == [(0, 1), (1999, 1)]


def test_bit_limit_is_independent_of_register_limit():
    specs = [coil(i + 1, i) for i in range(300)]
    assert [(b.start, b.count) for b in plan_modbus_reads(specs)] == [(0, 300)]


def test_tables_are_never_merged_and_order_is_by_table_then_address():
    specs = [
        mb(1, 0, table=HR),
        mb(2, 50, table=HR),
        mb(3, 0, table=IR),
        mb(4, 1, table=IR),
        coil(5, 0, table=DI),
        coil(6, 0, table=COIL),
        coil(7, 1, table=COIL),
    ]
    assert layout(plan_modbus_reads(specs)) == [
        (COIL, 0, 2, [6, 7]),
        (DI, 0, 1, [5]),
        (IR, 0, 2, [3, 4]),
        (HR, 0, 1, [1]),
        (HR, 50, 1, [2]),
    ]


def test_plan_is_deterministic():
    specs = [mb(i + 1, (i * 7) % 400, DataType.FLOAT32 if i % 3 else DataType.INT16) for i in range(120)]
    specs += [coil(1000 + i, i * 3) for i in range(50)]
    expected = plan_modbus_reads(specs)
    for seed in range(5):
        shuffled = specs[:]
        random.Random(seed).shuffle(shuffled)
        assert plan_modbus_reads(shuffled) == expected
    assert layout(expected) == sorted(layout(expected), key=lambda row: (row[0], row[1]))
    for block in expected:  # within a block, tags are sorted by offset
        assert [offset for _, offset in block.tags] == sorted(offset for _, offset in block.tags)


def test_single_tag_larger_than_the_limit_raises():
    huge = mb(9, 0, DataType.STRING, string_length=251)  # 126 registers
    with pytest.raises(ValueError, match=r"^tag 9: a STRING of 126 registers does not fit in one read of at most 125"):
        plan_modbus_reads([huge])
    assert plan_modbus_reads([mb(9, 0, DataType.STRING, string_length=250)])[0].count == 125
    with pytest.raises(ValueError, match="tag 4: a FLOAT64 of 4 registers .* at most 2 registers"):
        plan_modbus_reads([mb(4, 0, DataType.FLOAT64)], max_registers=2)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_registers": 126}, "max_registers must be an integer 1..125, got 126"),
        ({"max_registers": 0}, "max_registers must be an integer 1..125, got 0"),
        ({"max_bits": 2001}, "max_bits must be an integer 1..2000, got 2001"),
        ({"max_gap": -1}, "max_gap must be an integer >= 0, got -1"),
        ({"max_gap": 1.5}, "max_gap must be an integer >= 0, got 1.5"),
    ],
)
def test_modbus_limits_are_checked(kwargs, message):
    with pytest.raises(ValueError, match=f"^{message}$"):
        plan_modbus_reads([mb(1, 0)], **kwargs)


def test_modbus_planner_rejects_bad_input():
    with pytest.raises(ValueError, match="tag 3 is not a Modbus tag"):
        plan_modbus_reads([mb(1, 0), db(3, 0)])
    with pytest.raises(ValueError, match="tag 1 appears more than once"):
        plan_modbus_reads([mb(1, 0), mb(1, 5)])
    with pytest.raises(TagSpecError, match="tag 2: invalid tag definition: a FLOAT32 tag cannot live in the COIL"):
        plan_modbus_reads([mb(2, 0, DataType.FLOAT32, table=COIL)])


# ---------------------------------------------------------------------------------- Modbus block decoding


def test_modbus_block_decodes_each_tag():
    specs = [
        mb(1, 100, DataType.INT16),
        mb(2, 101, DataType.FLOAT32),
        mb(3, 103, DataType.BOOL, bit=15),
        mb(4, 103, DataType.BOOL, bit=0),
        mb(5, 106, DataType.STRING, string_length=4),
    ]
    (block,) = plan_modbus_reads(specs)
    assert (block.start, block.count, block.end) == (100, 8, 108)
    # 100: -12345; 101-102: 123.456 ABCD; 103: 0x8000; 104-105: unused; 106-107: "AB", "C"
    response = [0xCFC7, 0x42F6, 0xE979, 0x8000, 0xDEAD, 0xBEEF, 0x4142, 0x4300]
    results = {spec.tag_id: value for spec, value in block.decode(response)}
    assert results == {1: -12345, 2: 123.45600128173828, 3: True, 4: False, 5: "ABC"}


def test_one_bad_tag_does_not_spoil_the_block():
    specs = [mb(1, 0, DataType.INT16), mb(2, 1, DataType.FLOAT32), mb(3, 3, DataType.UINT16), mb(4, 4)]
    (block,) = plan_modbus_reads(specs)
    results = block.decode([0x0001, 0x42F6, 0xE979, 70000, 0x0005])
    assert [spec.tag_id for spec, _ in results] == [1, 2, 3, 4]
    assert results[0][1] == 1
    assert results[1][1] == 123.45600128173828
    error = results[2][1]
    assert isinstance(error, DecodeError) and error.tag_id == 3
    assert str(error) == "tag 3: register at position 3 is 70000, expected an integer 0..65535"
    assert results[3][1] == 5


def test_short_block_response_fails_only_the_uncovered_tags():
    (block,) = plan_modbus_reads([mb(1, 0), mb(2, 1, DataType.FLOAT32), mb(3, 3)])
    results = block.decode([0x0007, 0x42F6])
    assert results[0][1] == 7
    assert isinstance(results[1][1], DecodeError) and "short data" in str(results[1][1])
    assert isinstance(results[2][1], DecodeError) and results[2][1].tag_id == 3


def test_bit_block_decoding_ignores_byte_padding():
    (block,) = plan_modbus_reads([coil(1, 20), coil(2, 22), coil(3, 24)])
    assert (block.start, block.count) == (20, 5)
    response = [True, False, False, True, True, False, False, False]  # pymodbus pads to whole bytes
    assert [(spec.tag_id, value) for spec, value in block.decode(response)] == [(1, True), (2, False), (3, True)]
    # Bits between the tags are not looked at; a bad bit fails only its own tag.
    assert [value for _, value in block.decode([True, 7, 0, None, 1])] == [True, False, True]
    results = block.decode([True, 0, 2, 0, 1])
    assert results[0][1] is True and results[2][1] is True
    assert isinstance(results[1][1], DecodeError) and results[1][1].tag_id == 2


def test_modbus_block_checks_its_tags():
    with pytest.raises(ValueError, match="tag 1 .* is not at offset 0 of a HOLDING_REGISTER block starting at 10"):
        ModbusBlock(HR, 10, 5, ((mb(1, 11), 0),))
    with pytest.raises(ValueError, match="tag 1 .* is not at offset 1 of a HOLDING_REGISTER block"):
        ModbusBlock(HR, 10, 5, ((mb(1, 11, table=IR), 1),))
    with pytest.raises(ValueError, match=r"tag 1 at offset 4 \(2 registers\) does not fit in a block of 5 registers"):
        ModbusBlock(HR, 10, 5, ((mb(1, 14, DataType.FLOAT32), 4),))
    with pytest.raises(ValueError, match="outside addresses 0..65535"):
        ModbusBlock(HR, 65535, 2, ())
    block = ModbusBlock(4, 10, 2, [(mb(1, 11), 1)])  # type: ignore[arg-type]
    assert block.table is HR and isinstance(block.tags, tuple)
    assert hash(block) == hash(ModbusBlock(HR, 10, 2, ((mb(1, 11), 1),)))
    assert repr(block) == "ModbusBlock(HOLDING_REGISTER, start=10, count=2, tags=[1])"


# ---------------------------------------------------------------------------------------------------- S7


def test_s7_merges_within_a_db():
    specs = [
        db(1, 0, DataType.FLOAT32),
        db(2, 4, DataType.INT16),
        db(3, 6, DataType.BOOL, bit=3),
        db(4, 6, DataType.BOOL, bit=4),
    ]
    assert layout(plan_s7_reads(specs)) == [(S7Area.DB, 1, 0, 7, [1, 2, 3, 4])]


def test_s7_dbs_and_areas_are_never_merged():
    specs = [
        db(1, 0, db_number=2),
        db(2, 2, db_number=1),
        db(3, 0, db_number=1),
        TagSpec(4, DataType.BOOL, s7_area=S7Area.MERKERS, address=0, bit=0),
        TagSpec(5, DataType.INT16, s7_area=S7Area.INPUTS, address=0),
        TagSpec(6, DataType.INT16, s7_area=S7Area.OUTPUTS, address=0),
    ]
    assert layout(plan_s7_reads(specs)) == [
        (S7Area.DB, 1, 0, 4, [3, 2]),
        (S7Area.DB, 2, 0, 2, [1]),
        (S7Area.INPUTS, 0, 0, 2, [5]),
        (S7Area.OUTPUTS, 0, 0, 2, [6]),
        (S7Area.MERKERS, 0, 0, 1, [4]),
    ]


def test_s7_db_number_is_ignored_outside_dbs():
    specs = [
        TagSpec(1, DataType.INT16, s7_area=S7Area.MERKERS, address=10, db_number=0),
        TagSpec(2, DataType.INT16, s7_area=S7Area.MERKERS, address=12, db_number=5),
    ]
    assert layout(plan_s7_reads(specs)) == [(S7Area.MERKERS, 0, 10, 4, [1, 2])]


def test_s7_pdu_limit():
    specs = [db(i + 1, 2 * i) for i in range(111)]  # 222 bytes
    assert [(b.start, b.size) for b in plan_s7_reads(specs)] == [(0, 222)]
    assert [(b.start, b.size) for b in plan_s7_reads([*specs, db(112, 222)])] == [(0, 222), (222, 2)]
    # A 480-byte PDU carries 462 bytes.
    assert [(b.start, b.size) for b in plan_s7_reads([*specs, db(112, 222)], max_bytes=462)] == [(0, 224)]


def test_s7_tag_straddling_the_limit_starts_a_new_block():
    blocks = plan_s7_reads([db(1, 0), db(2, 218, DataType.FLOAT32)])  # 218..221: fits exactly
    assert [(b.start, b.size) for b in blocks] == [(0, 222)]
    blocks = plan_s7_reads([db(1, 0), db(2, 220, DataType.FLOAT32)])  # 220..223: would need 224
    assert [(b.start, b.size) for b in blocks] == [(0, 2), (220, 4)]


def test_s7_gap_bridging():
    specs = [db(1, 0), db(2, 100)]
    assert [(b.start, b.size) for b in plan_s7_reads(specs)] == [(0, 102)]  # default: any gap within the PDU
    assert [(b.start, b.size) for b in plan_s7_reads(specs, max_gap=98)] == [(0, 102)]
    assert [(b.start, b.size) for b in plan_s7_reads(specs, max_gap=97)] == [(0, 2), (100, 2)]
    contiguous = plan_s7_reads([db(1, 0), db(2, 2), db(3, 5, DataType.BOOL, bit=0)], max_gap=0)
    assert [(b.start, b.size) for b in contiguous] == [(0, 4), (5, 1)]


def test_s7_single_tag_larger_than_the_pdu_raises():
    with pytest.raises(ValueError, match="tag 5: a STRING of 256 bytes does not fit in one read of at most 222 bytes"):
        plan_s7_reads([db(5, 0, DataType.STRING, string_length=254)])
    assert plan_s7_reads([db(5, 0, DataType.STRING, string_length=254)], max_bytes=462)[0].size == 256


def test_s7_planner_rejects_bad_input():
    with pytest.raises(ValueError, match="tag 1 is not an S7 tag"):
        plan_s7_reads([mb(1, 0)])
    with pytest.raises(ValueError, match="tag 2 appears more than once"):
        plan_s7_reads([db(2, 0), db(2, 4, db_number=3)])
    with pytest.raises(TagSpecError, match="tag 3: invalid tag definition: an S7 DB tag needs db_number"):
        plan_s7_reads([db(3, 0, db_number=0)])
    with pytest.raises(ValueError, match="max_bytes must be an integer >= 1, got 0"):
        plan_s7_reads([db(1, 0)], max_bytes=0)
    with pytest.raises(ValueError, match="max_gap must be an integer >= 0, got -1"):
        plan_s7_reads([db(1, 0)], max_gap=-1)


def test_s7_block_decoding_with_a_short_response():
    specs = [
        db(1, 10, DataType.FLOAT32),  # REAL 123.456
        db(2, 14, DataType.INT16),  # INT -12345
        db(3, 16, DataType.BOOL, bit=7),
        db(4, 17, DataType.STRING, string_length=4),
    ]
    (block,) = plan_s7_reads(specs)
    assert (block.start, block.size, block.end) == (10, 13, 23)
    response = b"\x42\xf6\xe9\x79" + b"\xcf\xc7" + b"\x80" + b"\x04\x02OK\x00\x00"
    assert [value for _, value in block.decode(response)] == [123.45600128173828, -12345, True, "OK"]
    results = block.decode(response[:9])
    assert [value for _, value in results[:3]] == [123.45600128173828, -12345, True]
    assert isinstance(results[3][1], DecodeError) and results[3][1].tag_id == 4


def test_s7_block_checks_its_tags():
    with pytest.raises(ValueError, match="tag 1 .* is not at offset 0 of a DB block \\(DB 2\\)"):
        S7Block(S7Area.DB, 2, 0, 2, ((db(1, 0, db_number=1), 0),))
    with pytest.raises(ValueError, match="db_number must be 0 for the MERKERS area"):
        S7Block(S7Area.MERKERS, 1, 0, 2, ())
    with pytest.raises(ValueError, match="an S7 DB block needs db_number 1..65535"):
        S7Block(S7Area.DB, 0, 0, 2, ())
    block = S7Block(1, 3, 4, 2, ((db(1, 4, db_number=3), 0),))
    assert block.area is S7Area.DB
    assert repr(block) == "S7Block(DB3, start=4, size=2, tags=[1])"


# ------------------------------------------------------------------------------------------ block limits


def test_no_merge_reads_every_tag_on_its_own_but_tags_on_the_same_addresses_share_a_read():
    specs = [mb(1, 10, DataType.BOOL, bit=0), mb(2, 10, DataType.BOOL, bit=3), mb(3, 11, DataType.FLOAT32),
             mb(4, 13), coil(5, 0), coil(6, 1)]
    assert layout(plan_modbus_reads(specs, no_merge=True)) == [
        (COIL, 0, 1, [5]), (COIL, 1, 1, [6]), (HR, 10, 1, [1, 2]), (HR, 11, 2, [3]), (HR, 13, 1, [4])]
    s7 = [db(1, 0, DataType.BOOL, bit=0), db(2, 0, DataType.BOOL, bit=1), db(3, 2, DataType.FLOAT32)]
    assert layout(plan_s7_reads(s7, no_merge=True)) == [(S7Area.DB, 1, 0, 1, [1, 2]), (S7Area.DB, 1, 2, 4, [3])]


def test_a_plcs_block_limits_bound_the_plan_and_unset_ones_keep_the_defaults():
    specs = [mb(i + 1, 2 * i, DataType.INT32) for i in range(10)]  # registers 0..19, contiguous
    assert plan_modbus(specs) == plan_modbus_reads(specs)
    assert layout(plan_modbus(specs, BlockLimits(max_registers=8))) == [
        (HR, 0, 8, [1, 2, 3, 4]), (HR, 8, 8, [5, 6, 7, 8]), (HR, 16, 4, [9, 10])]
    gapped = [mb(1, 0), mb(2, 5), mb(3, 30)]
    assert layout(plan_modbus(gapped)) == [(HR, 0, 6, [1, 2]), (HR, 30, 1, [3])]  # default gap 16
    assert layout(plan_modbus(gapped, BlockLimits(max_gap=0))) == [(HR, 0, 1, [1]), (HR, 5, 1, [2]), (HR, 30, 1, [3])]
    assert layout(plan_modbus(gapped, BlockLimits(max_gap=40))) == [(HR, 0, 31, [1, 2, 3])]
    bits = [coil(i + 1, i) for i in range(10)]
    assert [b.count for b in plan_modbus(bits, BlockLimits(max_bits=4))] == [4, 4, 2]
    assert len(plan_modbus(specs, BlockLimits(no_merge=True))) == 10

    s7 = [db(1, 0, DataType.FLOAT32), db(2, 100, DataType.FLOAT32), db(3, 400, DataType.FLOAT32)]
    assert layout(plan_s7(s7)) == [(S7Area.DB, 1, 0, 104, [1, 2]), (S7Area.DB, 1, 400, 4, [3])]  # 222 bytes
    assert layout(plan_s7(s7, payload=462)) == [(S7Area.DB, 1, 0, 404, [1, 2, 3])]  # a 480-byte PDU
    # The user's limit applies within the PDU's, never beyond it.
    assert layout(plan_s7(s7, BlockLimits(max_s7_bytes=64), payload=462)) == [
        (S7Area.DB, 1, 0, 4, [1]), (S7Area.DB, 1, 100, 4, [2]), (S7Area.DB, 1, 400, 4, [3])]
    assert plan_s7(s7, BlockLimits(max_s7_bytes=4000), payload=222) == plan_s7(s7, payload=222)
    assert layout(plan_s7(s7, BlockLimits(max_gap=10), payload=462)) == [
        (S7Area.DB, 1, 0, 4, [1]), (S7Area.DB, 1, 100, 4, [2]), (S7Area.DB, 1, 400, 4, [3])]
    with pytest.raises(ValueError, match="does not fit"):
        plan_modbus([mb(1, 0, DataType.INT64)], BlockLimits(max_registers=2))
