"""A Modbus device written by hand (`BadDevice`), and one poller against it (`polling`), for the tests of the
replies the collector must never accept and of what the engineer sees in the logs.

`BadDevice` is a raw asyncio TCP server on 127.0.0.1:0 that speaks Modbus TCP (MBAP) framing, or RTU framing
(an RTU-over-TCP gateway), byte by byte, and mangles its replies as its `mode` says.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
from collections.abc import AsyncIterator

from fabrica.common.v1 import reading_pb2
from fabrica.config.v1 import plc_pb2
from pymodbus.framer import FramerRTU

from fabrica_svc.collector.drivers import BusRegistry, make_driver
from fabrica_svc.collector.poller import Poller

from .support import HOST

T = plc_pb2
#: Register n of the device holds this (coils: n is on when odd).
BASE = 1000


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
            if mode == "late reply of unit 7 first":  # another device's late answer, then this one's, in one write
                late = bytes([7]) + pdu
                return late + _crc(late) + frame + crc
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
