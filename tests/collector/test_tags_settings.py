"""Table-driven unit tests: proto Tag -> TagSpec (the one conversion), field violations, Value kinds, golden
vectors through the proto path, the collector's settings, backoff bounds, the demo PLC definitions."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from fabrica.common.v1 import reading_pb2
from fabrica.config.v1 import plc_pb2

from fabrica_svc.runtime.retry import RetryPolicy
from fabrica_svc.collector.decode import make_decoder
from fabrica_svc.collector.demo import demo_plcs
from fabrica_svc.collector.settings import load_collector_settings
from fabrica_svc.collector.tags import tag_spec, tag_violations, to_value, value_kind
from fabrica_svc.config.domain import check_plc, normalized
from fabrica_svc.plcmodel.spec import ByteOrder, DataType, ModbusTable, S7Area, TagSpec, WordOrder
from fabrica_svc.plcsim.plant import DEMO_TAGS
from fabrica_svc.runtime.settings import SettingsError, load_settings
from procs import PLAINTEXT

REPO = Path(__file__).resolve().parents[2]
T = plc_pb2


def mb(**fields) -> T.Tag:
    table = fields.pop("table", T.MODBUS_TABLE_HOLDING_REGISTER)
    fields.setdefault("id", 7)
    return T.Tag(name="t", modbus=T.ModbusAddress(table=table, address=fields.pop("address", 10)), **fields)


def s7(**fields) -> T.Tag:
    area = fields.pop("area", T.S7_AREA_DATA_BLOCK)
    return T.Tag(id=7, name="t", s7=T.S7Address(area=area, db_number=fields.pop("db", 3), byte_offset=fields.pop("at", 4)),
                 **fields)


MODBUS_PLC = T.Plc(id="p", modbus_tcp=T.ModbusTcpConnection(host="h"))
S7_PLC = T.Plc(id="p", s7=T.S7Connection(host="h"))


@pytest.mark.parametrize(("tag", "expected"), [
    (mb(data_type=T.DATA_TYPE_FLOAT32, byte_order=T.BYTE_ORDER_BIG_ENDIAN, word_order=T.WORD_ORDER_LITTLE_ENDIAN,
        scale=0.1, offset=-5.0),
     TagSpec(7, DataType.FLOAT32, modbus_table=ModbusTable.HOLDING_REGISTER, address=10, word_order=WordOrder.LITTLE,
             scale=0.1, offset=-5.0)),
    (mb(data_type=T.DATA_TYPE_BOOL, table=T.MODBUS_TABLE_COIL, address=3),
     TagSpec(7, DataType.BOOL, modbus_table=ModbusTable.COIL, address=3)),
    (mb(data_type=T.DATA_TYPE_BOOL, table=T.MODBUS_TABLE_INPUT_REGISTER, bit=0),
     TagSpec(7, DataType.BOOL, modbus_table=ModbusTable.INPUT_REGISTER, address=10, bit=0)),
    (mb(data_type=T.DATA_TYPE_STRING, string_length=9, byte_order=T.BYTE_ORDER_LITTLE_ENDIAN),
     TagSpec(7, DataType.STRING, modbus_table=ModbusTable.HOLDING_REGISTER, address=10, string_length=9,
             byte_order=ByteOrder.LITTLE)),
    (s7(data_type=T.DATA_TYPE_INT16), TagSpec(7, DataType.INT16, s7_area=S7Area.DB, db_number=3, address=4)),
    (s7(data_type=T.DATA_TYPE_UINT64, area=T.S7_AREA_UNSPECIFIED),
     TagSpec(7, DataType.UINT64, s7_area=S7Area.DB, db_number=3, address=4)),
    (s7(data_type=T.DATA_TYPE_BOOL, area=T.S7_AREA_MARKERS, bit=5),
     TagSpec(7, DataType.BOOL, s7_area=S7Area.MERKERS, db_number=0, address=4, bit=5)),
    (s7(data_type=T.DATA_TYPE_FLOAT64, area=T.S7_AREA_INPUTS, scale=2.0),
     TagSpec(7, DataType.FLOAT64, s7_area=S7Area.INPUTS, db_number=0, address=4, scale=2.0)),
])
def test_a_proto_tag_becomes_the_tag_spec_it_describes(tag: T.Tag, expected: TagSpec) -> None:
    assert tag_spec(tag) == expected
    make_decoder(tag_spec(tag))


@pytest.mark.parametrize(("tag", "plc", "field"), [
    (s7(data_type=T.DATA_TYPE_INT16), MODBUS_PLC, "tag.s7"),
    (mb(data_type=T.DATA_TYPE_INT16), S7_PLC, "tag.modbus"),
    (mb(data_type=T.DATA_TYPE_BOOL), MODBUS_PLC, "tag.bit"),
    (mb(data_type=T.DATA_TYPE_FLOAT32, table=T.MODBUS_TABLE_COIL), MODBUS_PLC, "tag.data_type"),
    (mb(data_type=T.DATA_TYPE_INT16, bit=3), MODBUS_PLC, "tag.bit"),
    (mb(data_type=T.DATA_TYPE_UINT64, address=65533), MODBUS_PLC, "tag.modbus.address"),
    (mb(data_type=T.DATA_TYPE_STRING), MODBUS_PLC, "tag.string_length"),
    (mb(data_type=T.DATA_TYPE_UNSPECIFIED), MODBUS_PLC, "tag.data_type"),
    (s7(data_type=T.DATA_TYPE_INT16, db=0), S7_PLC, "tag.s7.db_number"),
    (s7(data_type=T.DATA_TYPE_BOOL, bit=9), S7_PLC, "tag.bit"),
    (T.Tag(id=1, name="x", data_type=T.DATA_TYPE_INT16), MODBUS_PLC, "tag.address"),
    (mb(data_type=T.DATA_TYPE_INT16, string_length=2), MODBUS_PLC, "tag.string_length"),
    (mb(data_type=T.DATA_TYPE_INT16, id=0), MODBUS_PLC, "tag.id"),
    (mb(data_type=42), MODBUS_PLC, "tag.data_type"),
    (s7(data_type=T.DATA_TYPE_INT16, area=9), S7_PLC, "tag.s7.area"),
])
def test_a_tag_that_does_not_fit_its_plc_is_reported_on_the_right_field(tag: T.Tag, plc: T.Plc, field: str) -> None:
    found = tag_violations(tag, plc)
    assert [v.field for v in found][:1] == [field], found
    assert all(v.description for v in found)


def test_a_good_tag_has_no_violations() -> None:
    assert tag_violations(mb(data_type=T.DATA_TYPE_FLOAT32), MODBUS_PLC) == []
    assert tag_violations(s7(data_type=T.DATA_TYPE_BOOL, bit=7), S7_PLC) == []


@pytest.mark.parametrize(("tag", "raw", "value"), [
    (mb(data_type=T.DATA_TYPE_INT16), -5, reading_pb2.Value(int_value=-5)),
    (mb(data_type=T.DATA_TYPE_UINT32), 4_000_000_000, reading_pb2.Value(uint_value=4_000_000_000)),
    (mb(data_type=T.DATA_TYPE_UINT64), 2**64 - 1, reading_pb2.Value(uint_value=2**64 - 1)),
    (mb(data_type=T.DATA_TYPE_INT16, scale=0.5), 2.5, reading_pb2.Value(double_value=2.5)),
    (mb(data_type=T.DATA_TYPE_INT16, offset=1.0), 3.0, reading_pb2.Value(double_value=3.0)),
    (mb(data_type=T.DATA_TYPE_FLOAT32), 1.5, reading_pb2.Value(double_value=1.5)),
    (mb(data_type=T.DATA_TYPE_BOOL, table=T.MODBUS_TABLE_COIL), True, reading_pb2.Value(bool_value=True)),
    (mb(data_type=T.DATA_TYPE_STRING, string_length=4), "ab", reading_pb2.Value(string_value="ab")),
])
def test_decoded_values_go_into_the_value_field_of_their_type(tag: T.Tag, raw, value: reading_pb2.Value) -> None:
    assert to_value(value_kind(tag_spec(tag)), raw) == value


# Golden vectors through the proto path: 0x42F6E979 is float32 123.456, 0x0102030405060708 an int64; the
# words as they travel in each byte/word order.
F32 = struct.unpack(">f", bytes.fromhex("42F6E979"))[0]
ORDERS = [  # name, byte order, word order, float32 words, int64 words
    ("ABCD", T.BYTE_ORDER_BIG_ENDIAN, T.WORD_ORDER_BIG_ENDIAN, [0x42F6, 0xE979], [0x0102, 0x0304, 0x0506, 0x0708]),
    ("CDAB", T.BYTE_ORDER_BIG_ENDIAN, T.WORD_ORDER_LITTLE_ENDIAN, [0xE979, 0x42F6], [0x0708, 0x0506, 0x0304, 0x0102]),
    ("BADC", T.BYTE_ORDER_LITTLE_ENDIAN, T.WORD_ORDER_BIG_ENDIAN, [0xF642, 0x79E9], [0x0201, 0x0403, 0x0605, 0x0807]),
    ("DCBA", T.BYTE_ORDER_LITTLE_ENDIAN, T.WORD_ORDER_LITTLE_ENDIAN, [0x79E9, 0xF642], [0x0807, 0x0605, 0x0403, 0x0201]),
    ("unset", T.BYTE_ORDER_UNSPECIFIED, T.WORD_ORDER_UNSPECIFIED, [0x42F6, 0xE979], [0x0102, 0x0304, 0x0506, 0x0708]),
]


@pytest.mark.parametrize(("name", "byte_order", "word_order", "f32_words", "i64_words"), ORDERS, ids=[o[0] for o in ORDERS])
def test_golden_vectors_through_the_proto_tag(name: str, byte_order: int, word_order: int, f32_words: list[int],
                                              i64_words: list[int]) -> None:
    f32 = make_decoder(tag_spec(mb(data_type=T.DATA_TYPE_FLOAT32, byte_order=byte_order, word_order=word_order)))
    assert f32.decode(f32_words) == F32
    i64 = make_decoder(tag_spec(mb(data_type=T.DATA_TYPE_INT64, byte_order=byte_order, word_order=word_order)))
    assert i64.decode(i64_words) == 0x0102030405060708
    u16 = make_decoder(tag_spec(mb(data_type=T.DATA_TYPE_UINT16, byte_order=byte_order, word_order=word_order)))
    assert u16.decode([0x1234]) == (0x3412 if byte_order == T.BYTE_ORDER_LITTLE_ENDIAN else 0x1234)
    s7_f32 = make_decoder(tag_spec(s7(data_type=T.DATA_TYPE_FLOAT32, byte_order=byte_order, word_order=word_order)))
    assert s7_f32.decode(b"".join(w.to_bytes(2, "big") for w in f32_words)) == F32


# ------------------------------------------------------------------------------------------------ settings


def collector_settings_from(env: dict[str, str]):  # noqa: ANN201 - CollectorSettings
    """As `fabrica serve collector` reads them: the runtime's settings (id, peers), then the collector's own."""
    return load_collector_settings(load_settings("collector", {**PLAINTEXT, **env}), env)


def test_the_collector_id_is_required_and_checked() -> None:
    with pytest.raises(SettingsError, match="FABRICA_COLLECTOR_ID is required"):
        collector_settings_from({})
    with pytest.raises(SettingsError, match="FABRICA_COLLECTOR_ID='Cell_1'"):
        collector_settings_from({"FABRICA_COLLECTOR_ID": "Cell_1"})


@pytest.mark.parametrize(("name", "value"), [
    ("FABRICA_CONFIG_ADDR", "nohost"),
    ("FABRICA_INGEST_ADDR", "h:99999"),
    ("FABRICA_COLLECTOR_LOG_MAX_BYTES", "lots"),
    ("FABRICA_COLLECTOR_LOG_MAX_BYTES", "10"),
    ("FABRICA_COLLECTOR_BATCH_SIZE", "10001"),
    ("FABRICA_COLLECTOR_BATCH_LATENCY_MS", "0"),
    ("FABRICA_COLLECTOR_RECONNECT_MAX", "0.1"),  # below the minimum of 0.5
])
def test_bad_collector_variables_are_named_in_the_error(name: str, value: str) -> None:
    with pytest.raises(SettingsError, match=name):
        collector_settings_from({"FABRICA_COLLECTOR_ID": "cell-1", name: value})


def test_collector_defaults_and_state_folder(tmp_path: Path) -> None:
    s = collector_settings_from({"FABRICA_DATA_DIR": str(tmp_path), "FABRICA_COLLECTOR_ID": "cell-1"})
    assert (s.config_addr, s.ingest_addr) == ("127.0.0.1:50051", "127.0.0.1:50052")
    assert (s.log_max_bytes, s.batch_size, s.batch_latency, s.reconnect_max) == (256 * 2**20, 500, 0.2, 30.0)
    assert s.state_dir == tmp_path / "collector" / "cell-1"


def test_serve_collector_without_an_id_says_what_is_missing() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FABRICA_")}
    env["PYTHONPATH"] = f"{REPO / 'gen'}:{REPO / 'services'}"
    env.update(PLAINTEXT)
    done = subprocess.run([sys.executable, "-m", "fabrica_svc.cli", "serve", "collector", "--port", "0"],
                          env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "FABRICA_COLLECTOR_ID is required" in done.stderr


def test_backoff_doubles_up_to_its_cap_with_jitter_and_resets() -> None:
    policy = RetryPolicy(0.5, 30.0)
    low, high = policy.backoff(rng=lambda: 0.0), policy.backoff(rng=lambda: 0.999999)
    lows = [low.next_delay() for _ in range(12)]
    highs = [high.next_delay() for _ in range(12)]
    assert lows[:4] == [0.25, 0.5, 1.0, 2.0] and lows[-1] == 15.0
    assert highs[:3] == pytest.approx([0.5, 1.0, 2.0]) and highs[-1] == pytest.approx(30.0)
    assert all(lo <= hi for lo, hi in zip(lows, highs))
    low.reset()
    assert low.next_delay() == 0.25


# ------------------------------------------------------------------------------------------------ demo


def test_the_demo_plcs_are_valid_definitions_that_cover_every_demo_tag() -> None:
    plcs = demo_plcs("cell-1", 5020, 5021, 1102)
    for plc in plcs:
        check_plc(normalized(plc))  # the config service's own rules
    assert [p.WhichOneof("connection") for p in plcs] == ["modbus_tcp", "modbus_rtu_over_tcp", "s7"]
    names = sorted((p.WhichOneof("connection"), t.name) for p in plcs for t in p.tags)
    protocol = {"modbus_tcp": "modbus_tcp", "modbus_rtu": "modbus_rtu_over_tcp", "s7": "s7"}
    assert names == sorted((protocol[d.protocol], d.name) for d in DEMO_TAGS)
    roles = {(p.id, t.name): t.role for p in plcs for t in p.tags}
    for plc_id, good, bad, state in (("press-1", "press.production_count", "press.scrap_count", "press.machine_state"),
                                     ("press-2", "press.good_count", "press.bad_count", "press.machine_on")):
        assert roles[(plc_id, good)] == reading_pb2.TAG_ROLE_PRODUCTION_COUNTER
        assert roles[(plc_id, bad)] == reading_pb2.TAG_ROLE_SCRAP_COUNTER
        assert roles[(plc_id, state)] == reading_pb2.TAG_ROLE_MACHINE_STATE
    assert sum(r == reading_pb2.TAG_ROLE_MACHINE_STATE for r in roles.values()) == 2  # one per press
    pressure = next(t for t in plcs[0].tags if t.name == "press.pressure")
    assert pressure.word_order == T.WORD_ORDER_LITTLE_ENDIAN  # plcsim serves it CDAB
