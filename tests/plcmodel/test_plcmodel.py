"""The shared PLC/tag model: what config accepts is exactly what the collector can poll.

A differential (property) test runs generated tags through the config service's check and through the
collector's compile step; table-driven tests pin register and byte counts, the end of the Modbus address
space they imply, default ports, and the enums' numbers against the generated protos.
"""

from __future__ import annotations

import math

import pytest
from fabrica.common.v1 import reading_pb2
from fabrica.config.v1 import plc_pb2 as T
from google.protobuf import duration_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fabrica_svc.collector.decode import make_decoder
from fabrica_svc.collector.tags import compiled, tag_violations, to_value, value_kind
from fabrica_svc.config.domain import check_plc, normalized
from fabrica_svc.plcmodel import plc as model
from fabrica_svc.plcmodel.spec import (
    MODBUS_ADDRESS_SPACE,
    ByteOrder,
    DataType,
    ModbusTable,
    S7Area,
    TagSpec,
    TagSpecError,
    WordOrder,
    byte_count,
    register_count,
    validate_spec,
)
from fabrica_svc.runtime.errors import FieldViolation, InvalidArgument

PATH = "plc.tags[0]"


def _plc(connection: str, tag: T.Tag) -> T.Plc:
    plc = T.Plc(id="p", collector_id="c", poll_groups=[T.PollGroup(name="g", poll_interval=duration_pb2.Duration(seconds=1))])
    if connection == "modbus_tcp":
        plc.modbus_tcp.host = "h"
    elif connection == "modbus_rtu":
        plc.modbus_rtu.CopyFrom(T.ModbusRtuConnection(serial_port="/dev/ttyUSB0", unit_id=1))
    else:
        plc.s7.host = "h"
    plc.tags.append(tag)
    return plc


def config_verdict(plc: T.Plc) -> list[FieldViolation]:
    """What the config service answers for CreatePlc (its own normalisation and check)."""
    try:
        check_plc(normalized(plc))
    except InvalidArgument as exc:
        return exc.violations
    return []


def collector_verdict(plc: T.Plc) -> tuple[list[FieldViolation], T.Tag]:
    """What the collector's compile step says of the PLC's tag as config would send it (defaults in, an id)."""
    sent = normalized(plc)
    sent.tags[0].id = 1  # config assigns ids when it stores a tag
    return tag_violations(sent.tags[0], sent, PATH), sent.tags[0]


def poll_once(tag: T.Tag) -> reading_pb2.Value:
    """Compile `tag` and decode one all-zero read of the width its decoder asks for, as a poller would."""
    spec = compiled(tag)
    decoder = make_decoder(spec)
    if spec.s7_area is not None:
        data = bytes(decoder.width)
    elif spec.modbus_table.is_bit_table:
        data = [False] * decoder.width
    else:
        data = [0] * decoder.width
    return to_value(value_kind(spec), decoder.decode(data))


# ------------------------------------------------------------------------------------------ the property

_u32 = st.integers(0, 2**32 - 1)
_edges = st.sampled_from([0, 1, 2, 7, 8, 15, 16, 100, 253, 254, 255, 256, 65_532, 65_533, 65_534, 65_535, 65_536,
                          2**21 - 1, 2**21, 2**32 - 1])
_finite = st.floats(allow_nan=False, allow_infinity=False, min_value=-1e12, max_value=1e12)
_INTEGERS = {T.DATA_TYPE_INT16: 16, T.DATA_TYPE_UINT16: 16, T.DATA_TYPE_INT32: 32, T.DATA_TYPE_UINT32: 32,
             T.DATA_TYPE_INT64: 64, T.DATA_TYPE_UINT64: 64}
_REGISTERS = {T.DATA_TYPE_BOOL: 1, T.DATA_TYPE_INT16: 1, T.DATA_TYPE_UINT16: 1, T.DATA_TYPE_INT32: 2,
              T.DATA_TYPE_UINT32: 2, T.DATA_TYPE_FLOAT32: 2, T.DATA_TYPE_INT64: 4, T.DATA_TYPE_UINT64: 4,
              T.DATA_TYPE_FLOAT64: 4}


@st.composite
def good_tags(draw: st.DrawFn, s7: bool) -> T.Tag:
    """A tag written as the contract's comments describe it, independent of the model's code."""
    data_type = draw(st.integers(T.DATA_TYPE_BOOL, T.DATA_TYPE_STRING))
    tag = T.Tag(name="t", data_type=data_type, byte_order=draw(st.integers(0, 2)), word_order=draw(st.integers(0, 2)))
    is_bool, is_string = data_type == T.DATA_TYPE_BOOL, data_type == T.DATA_TYPE_STRING
    if is_string:
        tag.string_length = draw(st.integers(1, 254))
    if s7:
        tag.s7.area = draw(st.integers(0, 4))
        data_block = tag.s7.area in (T.S7_AREA_UNSPECIFIED, T.S7_AREA_DATA_BLOCK)
        tag.s7.db_number = draw(st.integers(1 if data_block else 0, 65_535))
        tag.s7.byte_offset = draw(st.integers(0, 65_535))
        if is_bool:
            tag.bit = draw(st.integers(0, 7))
    else:
        bits = is_bool and draw(st.booleans())
        tag.modbus.table = draw(st.sampled_from([T.MODBUS_TABLE_COIL, T.MODBUS_TABLE_DISCRETE_INPUT] if bits else
                                                [T.MODBUS_TABLE_INPUT_REGISTER, T.MODBUS_TABLE_HOLDING_REGISTER]))
        registers = (tag.string_length + 1) // 2 if is_string else _REGISTERS[data_type]
        tag.modbus.address = draw(st.integers(0, 65_536 - registers))
        if is_bool and not bits:
            tag.bit = draw(st.integers(0, 15))
    if draw(st.booleans()):
        tag.scale = draw(_finite.filter(lambda x: x != 0))
    tag.offset = draw(_finite)
    if data_type in _INTEGERS and draw(st.booleans()):
        tag.role = draw(st.sampled_from([reading_pb2.TAG_ROLE_PRODUCTION_COUNTER, reading_pb2.TAG_ROLE_SCRAP_COUNTER]))
        tag.counter_width = draw(st.sampled_from([w for w in (0, 16, 32, 64) if w <= _INTEGERS[data_type]]))
    else:
        tag.role = draw(st.sampled_from([reading_pb2.TAG_ROLE_UNSPECIFIED, reading_pb2.TAG_ROLE_MEASUREMENT,
                                         reading_pb2.TAG_ROLE_MACHINE_STATE]))
    tag.poll_group = draw(st.sampled_from(["", "g"]))
    return tag


def _set(field: str, values: st.SearchStrategy) -> st.SearchStrategy:
    return values.map(lambda v: (field, v))


# One field set to a value anywhere in its type's range, edges first.
_MUTATIONS = st.one_of(
    _set("data_type", st.integers(0, 11)),
    _set("byte_order", st.integers(0, 3)),
    _set("word_order", st.integers(0, 3)),
    _set("bit", st.one_of(st.none(), st.integers(0, 17), _u32)),
    _set("string_length", st.one_of(st.sampled_from([0, 1, 2, 253, 254, 255]), st.integers(0, 300))),
    _set("scale", st.sampled_from([None, 0.0, -0.0, math.nan, math.inf, 1e308])),
    _set("offset", st.sampled_from([math.nan, -math.inf, 1e308])),
    _set("deadband", st.sampled_from([-1.0, math.nan])),
    _set("role", st.integers(0, 5)),
    _set("counter_width", st.sampled_from([8, 16, 32, 64, 128])),
    _set("poll_group", st.just("nope")),
    _set("name", st.sampled_from(["", "bad name"])),
    _set("modbus.table", st.integers(0, 5)),
    _set("modbus.address", st.one_of(_edges, _u32)),
    _set("s7.area", st.integers(0, 5)),
    _set("s7.db_number", st.one_of(_edges, _u32)),
    _set("s7.byte_offset", st.one_of(_edges, _u32)),
    _set("address", st.just(None)),
)


def _mutate(tag: T.Tag, field: str, value: object) -> None:
    if field == "address":
        tag.ClearField("address")
        return
    target = tag
    if "." in field:
        kind, field = field.split(".")
        target = getattr(tag, kind)  # may switch the address to the other protocol: also a case
    if value is None:
        target.ClearField(field)
    else:
        setattr(target, field, value)


@st.composite
def tags(draw: st.DrawFn, s7: bool) -> T.Tag:
    """A good tag with up to three of its fields set to anything their type can hold."""
    tag = draw(good_tags(s7))
    for field, value in draw(st.lists(_MUTATIONS, max_size=3)):
        _mutate(tag, field, value)
    return tag


@st.composite
def cases(draw: st.DrawFn) -> tuple[str, T.Tag]:
    connection = draw(st.sampled_from(["modbus_tcp", "modbus_rtu", "s7"]))
    return connection, draw(tags(connection == "s7"))


@settings(max_examples=1500, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(case=cases())
def test_config_and_the_collector_give_the_same_verdict(case: tuple[str, T.Tag]) -> None:
    connection, tag = case
    plc = _plc(connection, tag)
    accepted = config_verdict(plc)
    refused, sent = collector_verdict(plc)
    config_fields = {v.field for v in accepted}
    # Every reason the collector has to refuse the tag, config gives on the same field.
    assert {v.field for v in refused} <= config_fields, (refused, accepted)
    if not accepted:
        # What config accepts, the collector compiles and can poll.
        assert refused == []
        poll_once(sent)
    # The collector's check and its compile step agree with each other.
    if sent.WhichOneof("address") == ("s7" if connection == "s7" else "modbus"):
        try:
            compiled(sent)
        except TagSpecError as exc:
            assert refused, exc
            assert {f"{PATH}.{v.field}" for v in exc.violations} <= {v.field for v in refused}
        else:
            assert refused == []


def test_the_property_sees_both_verdicts() -> None:
    """The generator reaches accepted tags and refused ones on each protocol (else the property proves little)."""
    seen: set[tuple[str, bool]] = set()

    @settings(max_examples=400, deadline=None, derandomize=True)
    @given(case=cases())
    def collect(case: tuple[str, T.Tag]) -> None:
        connection, tag = case
        seen.add((connection, not config_verdict(_plc(connection, tag))))

    collect()
    assert seen == {(c, ok) for c in ("modbus_tcp", "modbus_rtu", "s7") for ok in (True, False)}


@settings(max_examples=300, deadline=None, derandomize=True)
@given(case=st.sampled_from(["modbus_tcp", "s7"]).flatmap(lambda c: st.tuples(st.just(c), good_tags(c == "s7"))))
def test_a_tag_written_as_the_contract_describes_is_accepted_and_polled(case: tuple[str, T.Tag]) -> None:
    connection, tag = case
    plc = _plc(connection, tag)
    assert config_verdict(plc) == []
    refused, sent = collector_verdict(plc)
    assert refused == []
    poll_once(sent)


# The cases where config and the collector disagreed before they shared the model, now the same on both.
@pytest.mark.parametrize(("connection", "tag", "field"), [
    # A length on a non-STRING tag: config refused it, the collector ignored it.
    ("modbus_tcp", T.Tag(name="t", data_type=T.DATA_TYPE_INT32, string_length=4,
                         modbus=T.ModbusAddress(table=T.MODBUS_TABLE_HOLDING_REGISTER)), f"{PATH}.string_length"),
    ("s7", T.Tag(name="t", data_type=T.DATA_TYPE_BOOL, bit=1, string_length=1, s7=T.S7Address(db_number=1)),
     f"{PATH}.string_length"),
    # No address: config said plc.tags[0].address, the collector the tag itself.
    ("modbus_tcp", T.Tag(name="t", data_type=T.DATA_TYPE_INT16), f"{PATH}.address"),
    # A value running past the last register: the same rule, counted the same way.
    ("modbus_tcp", T.Tag(name="t", data_type=T.DATA_TYPE_STRING, string_length=5,
                         modbus=T.ModbusAddress(table=T.MODBUS_TABLE_INPUT_REGISTER, address=65_534)),
     f"{PATH}.modbus.address"),
])
def test_former_disagreements_are_refused_by_both_on_the_same_field(connection: str, tag: T.Tag, field: str) -> None:
    plc = _plc(connection, tag)
    refused, _ = collector_verdict(plc)
    assert field in {v.field for v in refused}
    assert field in {v.field for v in config_verdict(plc)}


def test_rules_about_the_role_are_configs_alone() -> None:
    """A FLOAT32 counter can be decoded; config refuses it for production's sake, on data_type."""
    tag = T.Tag(name="t", data_type=T.DATA_TYPE_FLOAT32, role=reading_pb2.TAG_ROLE_PRODUCTION_COUNTER,
                modbus=T.ModbusAddress(table=T.MODBUS_TABLE_HOLDING_REGISTER))
    plc = _plc("modbus_tcp", tag)
    assert [v.field for v in config_verdict(plc)] == [f"{PATH}.data_type"]
    refused, sent = collector_verdict(plc)
    assert refused == []
    assert poll_once(sent) == reading_pb2.Value(double_value=0.0)


def test_a_field_the_proto_rules_reported_is_not_reported_twice() -> None:
    tag = T.Tag(name="t", data_type=T.DATA_TYPE_STRING, string_length=300, s7=T.S7Address(db_number=1))
    found = [v.field for v in config_verdict(_plc("s7", tag))]
    assert found == [f"{PATH}.string_length"]


# ---------------------------------------------------------------------------------------- register counts

# data type -> (Modbus registers, S7 bytes) of every fixed-size type; STRING rows below.
FIXED = {
    T.DATA_TYPE_BOOL: (1, 1),
    T.DATA_TYPE_INT16: (1, 2),
    T.DATA_TYPE_UINT16: (1, 2),
    T.DATA_TYPE_INT32: (2, 4),
    T.DATA_TYPE_UINT32: (2, 4),
    T.DATA_TYPE_FLOAT32: (2, 4),
    T.DATA_TYPE_INT64: (4, 8),
    T.DATA_TYPE_UINT64: (4, 8),
    T.DATA_TYPE_FLOAT64: (4, 8),
}
STRINGS = [(1, 1, 3), (2, 1, 4), (3, 2, 5), (4, 2, 6), (9, 5, 11), (253, 127, 255), (254, 127, 256)]


def test_the_table_covers_every_data_type_of_the_contract() -> None:
    named = {v.number for v in T.DataType.DESCRIPTOR.values} - {T.DATA_TYPE_UNSPECIFIED, T.DATA_TYPE_STRING}
    assert set(FIXED) == named


def _spec(data_type: int, string_length: int = 0, address: int = 0, s7: bool = False) -> TagSpec:
    bit = 0 if data_type == T.DATA_TYPE_BOOL else None
    if s7:
        return TagSpec(1, data_type, s7_area=S7Area.DB, db_number=1, address=address, bit=bit, string_length=string_length)
    return TagSpec(1, data_type, modbus_table=ModbusTable.HOLDING_REGISTER, address=address, bit=bit,
                   string_length=string_length)


@pytest.mark.parametrize(("data_type", "registers", "s7_bytes"), [(t, r, b) for t, (r, b) in FIXED.items()],
                         ids=[T.DataType.Name(t) for t in FIXED])
def test_register_and_byte_counts_per_type(data_type: int, registers: int, s7_bytes: int) -> None:
    assert register_count(_spec(data_type)) == registers
    assert byte_count(_spec(data_type, s7=True)) == s7_bytes
    assert make_decoder(_spec(data_type)).width == registers
    assert make_decoder(_spec(data_type, s7=True)).width == s7_bytes


@pytest.mark.parametrize(("length", "registers", "s7_bytes"), STRINGS)
def test_register_and_byte_counts_of_strings(length: int, registers: int, s7_bytes: int) -> None:
    assert register_count(_spec(T.DATA_TYPE_STRING, length)) == registers
    assert byte_count(_spec(T.DATA_TYPE_STRING, length, s7=True)) == s7_bytes
    assert make_decoder(_spec(T.DATA_TYPE_STRING, length)).width == registers


@pytest.mark.parametrize(("data_type", "length", "registers"),
                         [(t, 0, r) for t, (r, _) in FIXED.items()] + [(T.DATA_TYPE_STRING, n, r) for n, r, _ in STRINGS])
def test_the_last_address_a_value_fits_at_is_where_its_registers_end(data_type: int, length: int, registers: int) -> None:
    last = MODBUS_ADDRESS_SPACE - registers
    assert validate_spec(_spec(data_type, length, address=last)) == []
    assert [v.field for v in validate_spec(_spec(data_type, length, address=last + 1))] == ["modbus.address"]
    tag = T.Tag(name="t", data_type=data_type, string_length=length, bit=0 if data_type == T.DATA_TYPE_BOOL else None,
                modbus=T.ModbusAddress(table=T.MODBUS_TABLE_HOLDING_REGISTER, address=last))
    assert config_verdict(_plc("modbus_tcp", tag)) == []
    tag.modbus.address = last + 1
    assert f"{PATH}.modbus.address" in {v.field for v in config_verdict(_plc("modbus_tcp", tag))}


# ------------------------------------------------------------------------------------ defaults and enums

@pytest.mark.parametrize(("connection", "port"), [("modbus_tcp", 502), ("modbus_rtu_over_tcp", 502), ("s7", 102)])
def test_default_ports_are_written_in_and_read_back(connection: str, port: int) -> None:
    plc = T.Plc(id="p", poll_groups=[T.PollGroup(name="fast"), T.PollGroup(name="slow")],
                tags=[T.Tag(name="a"), T.Tag(name="b", poll_group="slow")])
    getattr(plc, connection).host = "h"
    assert model.port_of(plc) == port
    model.with_defaults(plc)
    assert getattr(plc, connection).HasField("port") and getattr(plc, connection).port == port
    assert [t.poll_group for t in plc.tags] == ["fast", "slow"]
    getattr(plc, connection).port = 1502
    model.with_defaults(plc)
    assert model.port_of(plc) == 1502


def test_a_serial_line_has_no_port() -> None:
    plc = T.Plc(id="p", modbus_rtu=T.ModbusRtuConnection(serial_port="/dev/ttyUSB0", unit_id=1))
    model.with_defaults(plc)
    assert model.port_of(plc) is None


@pytest.mark.parametrize(("model_enum", "proto_enum"), [
    (DataType, T.DataType), (ByteOrder, T.ByteOrder), (WordOrder, T.WordOrder), (ModbusTable, T.ModbusTable),
    (S7Area, T.S7Area),
])
def test_the_model_enums_are_the_contracts(model_enum, proto_enum) -> None:
    assert sorted(m.value for m in model_enum) == sorted(v.number for v in proto_enum.DESCRIPTOR.values)


def test_counter_roles_are_the_counter_roles_of_the_contract() -> None:
    counters = {v.number for v in reading_pb2.TagRole.DESCRIPTOR.values if v.name.endswith("_COUNTER")}
    assert model.COUNTER_ROLES == counters


@pytest.mark.parametrize(("connection", "tag", "fields"), [
    ("modbus_tcp", T.Tag(name="t", data_type=42, bit=3, scale=0.0,
                         modbus=T.ModbusAddress(table=T.MODBUS_TABLE_HOLDING_REGISTER)), ["data_type", "scale", "bit"]),
    ("modbus_tcp", T.Tag(name="t", data_type=T.DATA_TYPE_BOOL, modbus=T.ModbusAddress(table=9)), ["modbus.table", "bit"]),
    ("s7", T.Tag(name="t", data_type=T.DATA_TYPE_INT16, word_order=7, s7=T.S7Address(area=9)), ["s7.area", "word_order"]),
    ("s7", T.Tag(name="t", data_type=T.DATA_TYPE_INT16, string_length=2, scale=0.0), ["address", "scale", "string_length"]),
])
def test_an_unknown_number_or_a_missing_address_does_not_hide_the_other_problems(connection: str, tag: T.Tag,
                                                                                  fields: list[str]) -> None:
    found = model.tag_violations(tag, "tag", connection == "s7")
    assert sorted(v.field for v in found) == sorted(f"tag.{f}" for f in fields), found
