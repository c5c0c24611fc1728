"""A meter whose register map has holes, and an S7 DB shorter than a tag's range, polled by a real poller.

The Modbus device is a real pymodbus TCP server whose datastore answers exception 2 (illegal data address)
for every read that touches an address in its holes, as meters without some registers do; the holes can be
filled while it runs (a firmware update). The S7 device is python-snap7's server with a 14-byte DB1. The
PLC definitions are profile-like: they define tags inside the holes. Polls are counted on a clock the test
moves (TickClock), never timed: every tag the device has is GOOD and each absent one CONFIG_ERROR naming
its address after the first poll; the split plan is kept (the device sees exactly one request per block
from then on), it is visible in the collector's GetStatus, and the absent tags are read again only after
the retry interval, GOOD once the device has them.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
import snap7
from fabrica.collector.v1 import collector_service_pb2 as pb
from fabrica.config.v1 import plc_pb2
from pymodbus.constants import ExcCodes
from pymodbus.server import ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice
from snap7.type import SrvArea

from fabrica_svc.collector.poller import Poller
from grpc_helpers import field_violations
from in_process import Servers

from .support import (COMM, CONFIG, DECODE, GOOD, HOST, HR, IR, collector_settings, duration, free_port, mb_tag,
                      modbus_plc, s7_plc, s7_tag, store_config, value_of, wait_for)
from .test_polling import Running, TickClock

T = plc_pb2
RETRY = 600.0  # seconds between reads of the absent tags (BlockLimits.absent_retry_interval)
READ_INPUT_REGISTERS, READ_HOLDING_REGISTERS = 4, 3

#: The meter variant's values (float32, big-endian words); per-phase power (input registers 12..17) is
#: what this variant lacks, and so are the reserved input registers 54..69 between total power and frequency.
VALUES = {"v_l1": 230.5, "v_l2": 231.25, "v_l3": 229.75, "i_l1": 5.5, "i_l2": 6.25, "i_l3": 7.0,
          "p_l1": 1200.0, "p_l2": 1300.0, "p_l3": 1400.0, "p_total": 3900.5, "frequency": 50.0}
IR_ADDRESS = {"v_l1": 0, "v_l2": 2, "v_l3": 4, "i_l1": 6, "i_l2": 8, "i_l3": 10, "p_l1": 12, "p_l2": 14, "p_l3": 16,
              "p_total": 52, "frequency": 70}
HR_VALUES = {"ct_ratio": (0, 100), "pt_ratio_hi": (2, 7), "pt_ratio": (4, 1)}  # name: (address, value)
IR_HOLES = set(range(12, 18)) | set(range(54, 70))
HR_HOLES = {2}
ABSENT = {"p_l1", "p_l2", "p_l3", "pt_ratio_hi"}


class HoleyMeter:
    """A pymodbus TCP server (unit 1) with input registers 0..99 and holding registers 0..9, answering exception 2
    for any read that touches an address in `holes` (by function code). Counts the reads it answers."""

    def __init__(self, holes: dict[int, set[int]]) -> None:
        self.holes = holes
        self.requests = 0
        ir = [0] * 100
        for name, address in IR_ADDRESS.items():
            ir[address:address + 2] = struct.unpack(">HH", struct.pack(">f", VALUES[name]))
        hr = [0] * 10
        for address, value in HR_VALUES.values():
            hr[address] = value
        device = SimDevice(id=1, simdata=(
            [SimData(0, count=16, values=False, datatype=DataType.BITS)],
            [SimData(0, count=16, values=False, datatype=DataType.BITS)],
            [SimData(0, values=hr, datatype=DataType.REGISTERS)],
            [SimData(0, values=ir, datatype=DataType.REGISTERS)],
        ), action=self._action)
        self.server = ModbusTcpServer(device, address=(HOST, 0))

    async def _action(self, function_code: int, start_address: int, address: int, count: int,
                      registers: list[int], values: object) -> ExcCodes | None:
        self.requests += 1
        if self.holes.get(function_code, set()) & set(range(address, address + count)):
            return ExcCodes.ILLEGAL_ADDRESS
        return None

    @property
    def port(self) -> int:
        return self.server.transport.sockets[0].getsockname()[1]

    def drop_clients(self) -> None:
        """Close every client connection (as a meter that restarts does)."""
        for connection in list(self.server.active_connections.values()):
            connection.close()


@pytest.fixture
async def meter() -> AsyncIterator[HoleyMeter]:
    device = HoleyMeter({READ_INPUT_REGISTERS: set(IR_HOLES), READ_HOLDING_REGISTERS: set(HR_HOLES)})
    await device.server.serve_forever(background=True)
    try:
        yield device
    finally:
        await device.server.shutdown()


@pytest.fixture
async def running() -> AsyncIterator[Running]:
    r = Running()
    yield r
    await r.stop()


def meter_tags() -> list[T.Tag]:
    tags = [mb_tag(name, address, T.DATA_TYPE_FLOAT32, table=IR) for name, address in IR_ADDRESS.items()]
    tags += [mb_tag(name, address, table=HR) for name, (address, _) in HR_VALUES.items()]
    return tags


def meter_plc(port: int, **kwargs: object) -> T.Plc:
    out = modbus_plc("meter", port, meter_tags(), interval=0.25, integrity=86_400.0, **kwargs)
    out.block_limits.absent_retry_interval.CopyFrom(duration(RETRY))
    return out


def expected(tag: T.Tag) -> float | int:
    return VALUES[tag.name] if tag.name in VALUES else HR_VALUES[tag.name][1]


def absent_error(tag: T.Tag) -> str:
    address = tag.modbus.address
    if tag.modbus.table == IR:
        return f"device has no input registers {address}..{address + 1} (exception 2, illegal data address)"
    return f"device has no holding register {address} (exception 2, illegal data address)"


#: The plan after the split: (table, start, count, tag names) per read, input registers first. The two halves
#: of voltages and currents were merged again; total power and frequency stay apart (reserved 54..69).
SPLIT_PLAN = [
    (IR, 0, 12, ["v_l1", "v_l2", "v_l3", "i_l1", "i_l2", "i_l3"]),
    (IR, 52, 2, ["p_total"]),
    (IR, 70, 2, ["frequency"]),
    (HR, 0, 1, ["ct_ratio"]),
    (HR, 4, 1, ["pt_ratio"]),
]


def layout(poller: Poller, names: dict[int, str]) -> list[tuple[int, int, int, list[str]]]:
    return [(int(b.table), b.start, b.count, [names[s.tag_id] for s, _ in b.tags]) for _, b in poller.status.reads]


async def start(running: Running, plc: T.Plc) -> tuple[Poller, TickClock]:
    """A poller of `plc` on a clock the test moves, connected and sleeping towards its first tick."""
    clock = TickClock()
    poller = running.start(plc, clock=clock, sleep=clock.sleep)
    await wait_for(lambda: poller.status.connected and clock.sleeps > 0, interval=0.002, what="the poller to connect")
    return poller, clock


async def test_a_meter_with_holes_reports_what_it_has_good_and_each_absent_tag_as_a_config_error(
        meter: HoleyMeter, running: Running) -> None:
    plc = meter_plc(meter.port)
    names = {tag.id: tag.name for tag in plc.tags}
    poller, clock = await start(running, plc)

    # Poll 1 splits the refused blocks and reads every tag the meter has.
    await clock.tick(poller)
    assert poller.polls == 1
    for tag in plc.tags:
        (reading,) = running.of(tag)
        if tag.name in ABSENT:
            assert reading.quality == CONFIG and reading.error == absent_error(tag), reading
        else:
            assert reading.quality == GOOD and value_of(reading) == expected(tag), reading
    assert layout(poller, names) == SPLIT_PLAN
    assert sorted(a.name for a in poller.status.absent) == sorted(ABSENT)

    # Poll 2 and on: the split plan is kept, one request per block, nothing discovered again or re-reported.
    for poll in (2, 3):
        before = meter.requests
        await clock.tick(poller)
        assert poller.polls == poll and meter.requests - before == len(SPLIT_PLAN)
    assert all(len(running.of(tag)) == 1 for tag in plc.tags)
    # The refused requests of the first poll, no more: 7 + 1 + 3 to split, 2 merges tried (52..71, HR 0..4).
    assert poller.status.error_count == 13

    # At the retry interval the absent tags are read again (and refused again: the meter still lacks them).
    before = meter.requests
    await clock.tick(poller, to=poller.groups[0].next_absent_retry)
    assert meter.requests - before == len(SPLIT_PLAN) + 6  # IR 12..17 split to its three tags, HR 2
    assert len(running.readings) == len(plc.tags)  # nothing re-reported
    assert sorted(a.name for a in poller.status.absent) == sorted(ABSENT)

    # A firmware update adds per-phase power; before the next retry the tags stay absent (not read) ...
    meter.holes[READ_INPUT_REGISTERS] -= set(range(12, 18))
    before = meter.requests
    await clock.tick(poller)
    assert meter.requests - before == len(SPLIT_PLAN)
    # ... at the retry they are read, GOOD with their values, and read with every poll from then on.
    await clock.tick(poller, to=poller.groups[0].next_absent_retry)
    for tag in plc.tags:
        last = running.of(tag)[-1]
        if tag.name == "pt_ratio_hi":
            assert last.quality == CONFIG and len(running.of(tag)) == 1
        else:
            assert last.quality == GOOD and value_of(last) == expected(tag), last
    assert layout(poller, names) == SPLIT_PLAN[:1] + [(IR, 12, 6, ["p_l1", "p_l2", "p_l3"])] + SPLIT_PLAN[1:]
    assert [a.name for a in poller.status.absent] == ["pt_ratio_hi"]
    before = meter.requests
    await clock.tick(poller)
    assert meter.requests - before == len(SPLIT_PLAN) + 1


async def test_the_split_plan_survives_a_reconnect(meter: HoleyMeter, running: Running) -> None:
    plc = meter_plc(meter.port)
    names = {tag.id: tag.name for tag in plc.tags}
    poller, clock = await start(running, plc)
    await clock.tick(poller)
    assert layout(poller, names) == SPLIT_PLAN

    meter.drop_clients()
    for _ in range(50):  # the poller notices, backs off and reconnects on the test's clock
        await clock.tick(poller, to=clock.t + 0.25)
        if poller.status.connected and not poller.status.last_error:
            break
    else:
        raise AssertionError("the poller did not reconnect")
    assert {r.tag_id for r in running.readings if r.quality == COMM} == {
        tag.id for tag in plc.tags if tag.name not in ABSENT}
    before = meter.requests
    await clock.tick(poller)
    assert meter.requests - before == len(SPLIT_PLAN) and layout(poller, names) == SPLIT_PLAN
    for tag in plc.tags:  # the absent tags stayed configuration errors through the outage
        if tag.name in ABSENT:
            assert [r.quality for r in running.of(tag)] == [CONFIG]
        else:
            assert running.of(tag)[-1].quality == GOOD


async def test_a_device_that_refuses_multi_register_reads_is_read_tag_by_tag_with_no_merge(
        meter: HoleyMeter, running: Running) -> None:
    meter.holes = {}  # no holes, but...
    plc = meter_plc(meter.port)
    plc.block_limits.no_merge = True
    poller, clock = await start(running, plc)
    await clock.tick(poller)
    assert [b.count for _, b in poller.status.reads] == [2] * len(IR_ADDRESS) + [1] * len(HR_VALUES)
    assert all(running.of(tag)[0].quality == GOOD and value_of(running.of(tag)[0]) == expected(tag)
               for tag in plc.tags)
    before = meter.requests
    await clock.tick(poller)
    assert meter.requests - before == len(plc.tags)


async def test_the_split_plan_and_the_absent_tags_are_in_the_collector_status(
        meter: HoleyMeter, servers: Servers, tmp_path: Path) -> None:
    plc = meter_plc(meter.port)
    names = {tag.id: tag.name for tag in plc.tags}
    settings = collector_settings(tmp_path)
    store_config(settings, [plc])
    server = await servers.start("collector", settings.base, config=settings)

    async def settled() -> pb.PlcRuntimeStatus | None:
        (status,) = (await server.stub.GetStatus(pb.GetStatusRequest())).plcs
        return status if len(status.absent_tags) == len(ABSENT) else None

    status = await wait_for(settled, what="the meter's absent tags in GetStatus")
    reads = [(r.range.modbus_table, r.range.start, r.range.count, [names[i] for i in r.tag_ids]) for r in status.reads]
    assert reads == SPLIT_PLAN and {r.poll_group for r in status.reads} == {"default"}
    by_name = {a.tag_name: a for a in status.absent_tags}
    assert set(by_name) == ABSENT
    for tag in plc.tags:
        if tag.name in ABSENT:
            absent = by_name[tag.name]
            assert absent.tag_id == tag.id and absent.error == absent_error(tag)
            assert (absent.range.modbus_table, absent.range.start, absent.range.count) == (
                tag.modbus.table, tag.modbus.address, 2 if tag.modbus.table == IR else 1)
            assert absent.next_retry_time.seconds > 0
    assert status.connected and "the device lacks 4 tag(s)" in status.last_error


async def test_preview_of_a_tag_and_of_the_whole_plc_agree_with_the_poll(
        meter: HoleyMeter, servers: Servers, tmp_path: Path) -> None:
    plc = meter_plc(meter.port)
    settings = collector_settings(tmp_path)
    server = await servers.start("collector", settings.base, config=settings)
    stub = server.stub

    whole = await stub.PreviewPlc(pb.PreviewPlcRequest(plc=plc))
    assert whole.error == ""
    assert [(t.tag_name, t.quality) for t in whole.tags] == [
        (tag.name, CONFIG if tag.name in ABSENT else GOOD) for tag in plc.tags]
    for tag, preview in zip(plc.tags, whole.tags):
        assert preview.tag_id == tag.id
        if tag.name in ABSENT:
            assert preview.error == absent_error(tag)
        else:
            assert value_of(preview) == expected(tag)
    names = {tag.id: tag.name for tag in plc.tags}
    assert [(r.range.modbus_table, r.range.start, r.range.count, [names[i] for i in r.tag_ids])
            for r in sorted(whole.reads, key=lambda r: (r.range.modbus_table, r.range.start))] == SPLIT_PLAN
    assert sorted(a.tag_name for a in whole.absent_tags) == sorted(ABSENT)

    # One tag, read in the block the poll reads it in (with the PLC's other tags), says the same.
    for tag in plc.tags:
        one = await stub.PreviewDecode(pb.PreviewDecodeRequest(plc=plc, tag=tag))
        if tag.name in ABSENT:
            assert (one.quality, one.error) == (CONFIG, absent_error(tag))
        else:
            assert one.quality == GOOD and value_of(one) == expected(tag)
            assert len(one.registers) == (2 if tag.modbus.table == IR else 1)
    # The tag's block: v_l2 is read with the other voltages and currents (input registers 0..11), as the poll does.
    v_l2 = await stub.PreviewDecode(pb.PreviewDecodeRequest(plc=plc, tag=plc.tags[1]))
    assert (v_l2.read.modbus_table, v_l2.read.start, v_l2.read.count) == (IR, 0, 12)

    # A device that cannot be reached: said in the response; an invalid definition: INVALID_ARGUMENT.
    dead = await stub.PreviewPlc(pb.PreviewPlcRequest(plc=meter_plc(free_port())))
    assert "cannot connect" in dead.error and {t.quality for t in dead.tags} == {COMM}
    twice = meter_plc(meter.port)
    twice.tags[1].name = twice.tags[0].name
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.PreviewPlc(pb.PreviewPlcRequest(plc=twice))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "plc.tags[1].name" in field_violations(err.value)


# ---------------------------------------------------------------------------------------------------- S7

S7_VALUES = {"bad_part": True, "good_part": False, "machine_on": True, "current": 12.5, "vibration": 0.75,
             "good_count": 1234, "bad_count": -7, "total": 99, "speed": 2.5}


def db1(size: int) -> bytearray:
    data = bytearray(size)
    data[0] = 0b101  # bad_part, machine_on
    struct.pack_into(">ffhh", data, 2, 12.5, 0.75, 1234, -7)
    if size >= 20:
        struct.pack_into(">if", data, 14, 99, 2.5)
    return data


def s7_tags() -> list[T.Tag]:
    return [
        s7_tag("bad_part", 0, T.DATA_TYPE_BOOL, bit=0), s7_tag("good_part", 0, T.DATA_TYPE_BOOL, bit=1),
        s7_tag("machine_on", 0, T.DATA_TYPE_BOOL, bit=2), s7_tag("current", 2, T.DATA_TYPE_FLOAT32),
        s7_tag("vibration", 6, T.DATA_TYPE_FLOAT32), s7_tag("good_count", 10, T.DATA_TYPE_INT16),
        s7_tag("bad_count", 12, T.DATA_TYPE_INT16),
        # A bigger variant's layout: beyond the 14 bytes of this PLC's DB1.
        s7_tag("total", 14, T.DATA_TYPE_INT32), s7_tag("speed", 18, T.DATA_TYPE_FLOAT32),
    ]


@pytest.fixture
async def s7_server() -> AsyncIterator[snap7.server.Server]:
    server = snap7.server.Server(log=False)
    server.register_area(SrvArea.DB, 1, db1(14))
    server.start_to(HOST, 0)
    try:
        yield server
    finally:
        await asyncio.to_thread(server.stop)


async def test_an_s7_db_shorter_than_the_tags_reports_the_tags_beyond_its_end_as_config_errors(
        s7_server: snap7.server.Server, running: Running) -> None:
    port = s7_server.server_socket.getsockname()[1]
    plc = s7_plc("press", port, s7_tags(), interval=0.25, integrity=86_400.0)
    plc.block_limits.absent_retry_interval.CopyFrom(duration(RETRY))
    other_db = s7_tag("other_db", 0, T.DATA_TYPE_FLOAT32, db=2)  # no DB2 on this PLC: not absent, failing
    plc.tags.append(other_db)
    poller, clock = await start(running, plc)
    await clock.tick(poller)
    assert poller.polls == 1
    (failed,) = running.of(other_db)
    assert failed.quality == DECODE and failed.error == (
        f"S7 read of DB2 bytes 0..3 (4 bytes) from {HOST}:{port} rack 0 slot 1 failed: "
        "the PLC answered 'Object does not exist (0x0a)'")
    errors = {"total": "device has no DB1 bytes 14..17 (the PLC answered 'Invalid address (0x05)')",
              "speed": "device has no DB1 bytes 18..21 (the PLC answered 'Invalid address (0x05)')"}
    for tag in plc.tags[:-1]:
        (reading,) = running.of(tag)
        if tag.name in errors:
            assert (reading.quality, reading.error) == (CONFIG, errors[tag.name])
        else:
            assert reading.quality == GOOD and value_of(reading) == S7_VALUES[tag.name], reading
    # The split halves of DB1 0..13 were merged again: one read, as before the split, but ending at byte 13.
    assert [(b.db_number, b.start, b.size) for _, b in poller.status.reads] == [(1, 0, 14), (2, 0, 4)]

    # The DB grows to 22 bytes (a new program version): the next retry reads the two tags.
    s7_server.register_area(SrvArea.DB, 1, db1(22))
    await clock.tick(poller, to=poller.groups[0].next_absent_retry)
    for name in errors:
        (tag,) = [t for t in plc.tags if t.name == name]
        last = running.of(tag)[-1]
        assert last.quality == GOOD and value_of(last) == S7_VALUES[name], last
    assert poller.status.absent == []
