"""Replies the collector must never accept, from a Modbus device written by hand for the purpose.

`BadDevice` is a raw asyncio TCP server on 127.0.0.1:0 that speaks Modbus TCP (MBAP) framing, or RTU
framing (an RTU-over-TCP gateway), byte by byte, and mangles its replies as the test says: another
transaction id, unit id or protocol id, a short PDU, a byte count that lies, an extra-long reply, a bad
CRC. None of them may become a GOOD reading: each gives the quality and the reason it deserves, and a
correct reply after a bad one is GOOD again (the connection recovers). The ids and lengths in the reasons
are those of the requests the device really received.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import struct
from collections.abc import AsyncIterator

import pytest
from fabrica.common.v1 import reading_pb2
from fabrica.config.v1 import plc_pb2
from pymodbus.framer import FramerRTU

from fabrica_svc.collector.drivers import BusRegistry, make_driver
from fabrica_svc.collector.poller import Poller

from .support import COIL, COMM, DECODE, GOOD, HOST, gateway_plc, mb_tag, modbus_plc, value_of, wait_for

T = plc_pb2
#: Register n of the device holds this (coils: n is on when odd).
BASE = 1000
REGISTERS = 4  # the holding registers the PLC's tags read: 0 to 3, one block
COILS = 10  # coils 0 to 9, one block (two bytes of bits)


def _crc(frame: bytes) -> bytes:
    return FramerRTU.compute_CRC(frame).to_bytes(2, "big")


class BadDevice:
    """A Modbus device on loopback whose replies are mangled as `mode` says (\"ok\": correct replies).

    `requests` records (transaction id, unit id, function, start, count) of every request received.
    """

    def __init__(self, *, rtu: bool = False) -> None:
        self.rtu = rtu
        self.mode = "ok"
        self.requests: list[tuple[int, int, int, int, int]] = []
        self._server: asyncio.Server | None = None
        self.port = 0
        self.connections = 0

    async def __aenter__(self) -> BadDevice:
        self._server = await asyncio.start_server(self._serve, HOST, 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._server.wait_closed(), 5)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            for _ in range(100_000):  # bounded: far more requests than any test makes
                if self.rtu:
                    frame = await reader.readexactly(8)  # unit, function, start, count, CRC
                    tid, (unit, function, start, count) = 0, struct.unpack(">BBHH", frame[:6])
                else:
                    tid, _, length, unit = struct.unpack(">HHHB", await reader.readexactly(7))
                    function, start, count = struct.unpack(">BHH", await reader.readexactly(length - 1))
                self.requests.append((tid, unit, function, start, count))
                if self.mode == "silent":
                    continue
                writer.write(self.reply(tid, unit, function, start, count))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    def reply(self, tid: int, unit: int, function: int, start: int, count: int) -> bytes:
        mode = self.mode
        if function in (1, 2):
            bits = [(start + i) % 2 == 1 for i in range(count)]
            data = bytes(sum(1 << j for j, on in enumerate(bits[i:i + 8]) if on) for i in range(0, count, 8))
            unit_size = 1
        else:
            data = b"".join(struct.pack(">H", BASE + start + i) for i in range(count))
            unit_size = 2
        byte_count = None
        pid = 0
        if mode == "short":  # one item fewer than asked; byte count and length agree
            data = data[:-unit_size]
        elif mode == "long":  # one item more than asked; byte count and length agree
            data += b"\x00" * unit_size
        elif mode == "count says more":  # the byte count claims two bytes the reply does not carry
            byte_count = len(data) + 2
        elif mode == "count says less":  # the reply carries two bytes its byte count does not claim
            byte_count = len(data) - 2
        elif mode == "transaction":
            tid = (tid + 5) % 65536
        elif mode == "unit":
            unit = 0xFF
        elif mode == "protocol":
            pid = 1
        pdu = bytes([function, len(data) if byte_count is None else byte_count]) + data
        if self.rtu:
            frame = bytes([unit]) + pdu
            crc = _crc(frame)
            if mode == "crc":
                crc = bytes([crc[0] ^ 0xFF, crc[1]])
            return frame + crc
        return struct.pack(">HHHB", tid, pid, len(pdu) + 1, unit) + pdu


class Polled:
    """One poller against a BadDevice, with everything it reported."""

    def __init__(self, plc: T.Plc) -> None:
        self.readings: list[reading_pb2.Reading] = []
        self.buses = BusRegistry()
        self.poller = Poller(plc, lambda p: make_driver(p, self.buses), self.readings.append,
                             backoff_min=0.02, backoff_max=0.1)

    def of(self, tag: T.Tag, quality: int | None = None) -> list[reading_pb2.Reading]:
        return [r for r in self.readings if r.tag_id == tag.id and (quality is None or r.quality == quality)]

    def since(self, mark: int) -> list[reading_pb2.Reading]:
        return self.readings[mark:]


@contextlib.asynccontextmanager
async def polling(plc: T.Plc) -> AsyncIterator[Polled]:
    polled = Polled(plc)
    polled.poller.start()
    try:
        yield polled
    finally:
        await polled.poller.stop()


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
    ("unit", COMM, "reply from unit 255, expected unit 1"),
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
