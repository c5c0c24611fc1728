"""A Modbus device with a fixed register map: the published map of a meter, for golden tests of profiles.

:class:`RegisterDevice` serves the input registers it is given (``{address: word}``), read-only; every other
address answers exception 2 (illegal data address), as a meter answers for a register it does not have, and so
does any unit id but its own (exception 0x0B). It speaks Modbus TCP, or RTU frames over TCP (a serial gateway)
with ``framer=FramerType.RTU``.
"""

from __future__ import annotations

from collections.abc import Mapping

from pymodbus import FramerType
from pymodbus.server import ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

from .modbus import _catch_all_device, listen_error

__all__ = ["RegisterDevice", "runs"]


def runs(registers: Mapping[int, int]) -> list[tuple[int, list[int]]]:
    """The map as runs of consecutive addresses: [(first address, words), ...] in address order."""
    out: list[tuple[int, list[int]]] = []
    for address in sorted(registers):
        if out and out[-1][0] + len(out[-1][1]) == address:
            out[-1][1].append(registers[address])
        else:
            out.append((address, [registers[address]]))
    return out


class RegisterDevice:
    """A read-only Modbus device serving `registers` as input registers of unit `unit`."""

    def __init__(self, registers: Mapping[int, int], *, unit: int = 1, framer: FramerType = FramerType.SOCKET,
                 host: str = "127.0.0.1") -> None:
        if not registers:
            raise ValueError("a device needs at least one register")
        if any(not 0 <= a <= 0xFFFF or not 0 <= w <= 0xFFFF for a, w in registers.items()):
            raise ValueError("addresses and words are 16-bit")
        self.registers = dict(registers)
        self.unit = unit
        self.framer = framer
        self.host = host
        self._server: ModbusTcpServer | None = None
        self._port: int | None = None

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("device not started")
        return self._port

    def _device(self) -> SimDevice:
        inputs = [SimData(start, values=words, datatype=DataType.REGISTERS, readonly=True)
                  for start, words in runs(self.registers)]
        bits = [SimData(0, values=[False], datatype=DataType.BITS, readonly=True)]
        # No coils, discrete inputs or holding registers: pymodbus wants one block per table.
        return SimDevice(id=self.unit, simdata=(bits, bits, [SimData(0, datatype=DataType.INVALID)], inputs))

    async def start(self) -> int:
        if self._server is None:
            server = ModbusTcpServer([self._device(), _catch_all_device()], framer=self.framer,
                                     address=(self.host, 0))
            try:
                await server.serve_forever(background=True)
            except RuntimeError as exc:
                raise listen_error("Modbus", self.host, 0, exc) from None
            self._server = server
            self._port = server.transport.sockets[0].getsockname()[1]
        return self.port

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            await server.shutdown()

    async def __aenter__(self) -> RegisterDevice:
        await self.start()
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.stop()
