"""Replies the collector must never accept, from a Modbus device written by hand for the purpose.

`BadDevice` (bad_device.py) is a raw asyncio TCP server on 127.0.0.1:0 that speaks Modbus TCP (MBAP)
framing, or RTU framing (an RTU-over-TCP gateway), byte by byte, and mangles its replies as the test says: another
transaction id, unit id or protocol id, a short PDU, a byte count that lies, an extra-long reply, a bad
CRC. None of them may become a GOOD reading: each gives the quality and the reason it deserves, and a
correct reply after a bad one is GOOD again (the connection recovers). The ids and lengths in the reasons
are those of the requests the device really received.
"""

from __future__ import annotations

import logging
import re

import pytest
from fabrica.config.v1 import plc_pb2

from .bad_device import BASE, BadDevice, Polled, polling
from .support import COIL, COMM, DECODE, GOOD, gateway_plc, mb_tag, modbus_plc, value_of, wait_for

T = plc_pb2
REGISTERS = 4  # the holding registers the PLC's tags read: 0 to 3, one block
COILS = 10  # coils 0 to 9, one block (two bytes of bits)


def _tags() -> tuple[list[T.Tag], list[T.Tag]]:
    registers = [mb_tag(f"r{i}", i) for i in range(REGISTERS)]
    coils = [mb_tag(f"c{i}", i, T.DATA_TYPE_BOOL, table=COIL) for i in range(COILS)]
    return registers, coils


async def _good_then(device: BadDevice, polled: Polled, tags: list[T.Tag], mode: str, quality: int) -> list:
    """Wait for GOOD readings of every tag, switch the device to `mode`, wait until every tag reported
    `quality`; then back to correct replies, and wait until every tag is GOOD again. Returns the bad readings."""
    await wait_for(lambda: all(polled.of(t, GOOD) for t in tags), what="good readings first")
    assert [value_of(polled.of(t, GOOD)[0]) for t in tags if t.modbus.table != COIL] == \
        [BASE + t.modbus.address for t in tags if t.modbus.table != COIL]
    mark = len(polled.readings)
    device.mode = mode
    await wait_for(lambda: all(any(r.tag_id == t.id and r.quality == quality for r in polled.since(mark))
                               for t in tags), what=f"every tag to report quality {quality} in mode {mode!r}")
    bad_phase = polled.since(mark)
    recovered = len(polled.readings)
    device.mode = "ok"
    await wait_for(lambda: all(any(r.tag_id == t.id and r.quality == GOOD for r in polled.since(recovered))
                               for t in tags), what=f"good readings again after mode {mode!r}")
    # Nothing GOOD came from a mangled reply: between the switch and the repair, no GOOD reading at all.
    assert [r for r in bad_phase if r.quality == GOOD] == []
    return [r for r in bad_phase if r.quality == quality]


# ------------------------------------------------------------------------------------------ Modbus TCP


@pytest.mark.parametrize("unit", [0, 1])
async def test_a_reply_from_another_unit_is_a_communication_failure_whatever_the_plcs_unit(unit: int) -> None:
    registers, coils = _tags()
    async with BadDevice() as device, polling(modbus_plc("meter", device.port, registers + coils,
                                                         unit=unit, interval=0.02)) as polled:
        bad = await _good_then(device, polled, registers + coils, "unit", COMM)
        assert bad and all(f"reply from unit 255, expected unit {unit}" in r.error for r in bad)
        assert {u for _, u, *_ in device.requests} == {unit}


@pytest.mark.parametrize("unit", [0, 1])
async def test_a_reply_for_another_transaction_is_a_communication_failure_naming_both_ids(unit: int) -> None:
    registers, coils = _tags()
    async with BadDevice() as device, polling(modbus_plc("meter", device.port, registers + coils,
                                                         unit=unit, interval=0.02)) as polled:
        first = len(device.requests)
        bad = await _good_then(device, polled, registers + coils, "transaction", COMM)
        sent = {tid for tid, *_ in device.requests[first:]}
        named = [re.search(r"reply for transaction (\d+), expected (\d+)", r.error) for r in bad]
        # Each reason names the id the device put in its reply and the one its request carried.
        assert named and all(m and int(m[2]) in sent and int(m[1]) == (int(m[2]) + 5) % 65536 for m in named), \
            ([r.error for r in bad], sent)
        assert device.connections > 1  # out of step: the driver dropped the connection and made a new one


async def test_a_reply_with_another_protocol_id_is_a_communication_failure() -> None:
    registers, _ = _tags()
    async with BadDevice() as device, polling(modbus_plc("meter", device.port, registers, interval=0.02)) as polled:
        bad = await _good_then(device, polled, registers, "protocol", COMM)
        assert bad and all("reply with protocol id 1, expected 0" in r.error for r in bad)


@pytest.mark.parametrize(("mode", "register_reason", "coil_reason"), [
    ("short", "reply carries 3 registers (6 bytes), asked for 4 (8 bytes)",
     "reply carries 1 bytes of bits, asked for 10 bits (2 bytes)"),
    ("long", "reply carries 5 registers (10 bytes), asked for 4 (8 bytes)",
     "reply carries 3 bytes of bits, asked for 10 bits (2 bytes)"),
    ("count says more", "byte count 10 but 8 data bytes follow", "byte count 4 but 2 data bytes follow"),
    ("count says less", "byte count 6 but 8 data bytes follow", "byte count 0 but 2 data bytes follow"),
])
async def test_a_reply_shorter_or_longer_than_asked_is_a_decode_failure_naming_the_lengths(
        mode: str, register_reason: str, coil_reason: str) -> None:
    registers, coils = _tags()
    async with BadDevice() as device, polling(modbus_plc("meter", device.port, registers + coils,
                                                         interval=0.02)) as polled:
        bad = await _good_then(device, polled, registers + coils, mode, DECODE)
        assert bad and all(register_reason in r.error for r in bad if r.tag_id in {t.id for t in registers})
        assert all(coil_reason in r.error for r in bad if r.tag_id in {t.id for t in coils})
        assert all("bad reply from 127.0.0.1:" in r.error for r in bad)
        assert device.connections == 1  # the device answered, wrongly: the connection stays


async def test_a_timeout_is_a_communication_failure_and_pymodbus_logs_no_error(
        caplog: pytest.LogCaptureFixture) -> None:
    registers, _ = _tags()
    caplog.set_level(logging.INFO)
    async with BadDevice() as device, polling(modbus_plc("meter", device.port, registers, interval=0.02,
                                                         timeout=0.1)) as polled:
        await _good_then(device, polled, registers, "silent", COMM)
        assert "no answer from" in polled.of(registers[0], COMM)[0].error
    library = [r for r in caplog.records if r.name.startswith(("pymodbus", "snap7")) and r.levelno >= logging.WARNING]
    assert library == [], [r.getMessage() for r in library]


# ------------------------------------------------------------------------------- RTU through a gateway


@pytest.mark.parametrize(("mode", "quality", "reason"), [
    # On a bus, another unit's reply is skipped (the late answer of the device asked before): then no answer.
    ("unit", COMM, "no answer within 0.5 s (skipped a reply from unit 255, expected unit 1)"),
    ("crc", COMM, "reply failed its CRC check"),
    ("short", DECODE, "reply carries 3 registers (6 bytes), asked for 4 (8 bytes)"),
    ("long", DECODE, "reply carries 5 registers (10 bytes), asked for 4 (8 bytes)"),
])
async def test_rtu_replies_are_checked_for_unit_crc_and_length(mode: str, quality: int, reason: str) -> None:
    registers, _ = _tags()
    async with BadDevice(rtu=True) as device, polling(gateway_plc("meter", device.port, registers,
                                                                  interval=0.02)) as polled:
        bad = await _good_then(device, polled, registers, mode, quality)
        assert bad and all(reason in r.error and "unit 1 on gateway 127.0.0.1:" in r.error for r in bad)


async def test_on_a_bus_a_late_reply_of_another_unit_is_skipped_and_the_right_one_read() -> None:
    registers, _ = _tags()
    async with BadDevice(rtu=True) as device, polling(gateway_plc("meter", device.port, registers,
                                                                  interval=0.02)) as polled:
        await wait_for(lambda: all(polled.of(t, GOOD) for t in registers), what="good readings first")
        mark, asked = len(polled.readings), len(device.requests)
        device.mode = "late reply of unit 7 first"
        await wait_for(lambda: len(device.requests) >= asked + 10, what="ten polls with a late reply in front")
        assert [r for r in polled.since(mark) if r.quality != GOOD] == []
        assert polled.poller.status.error_count == 0 and polled.poller.status.last_error == ""
