"""Modbus TCP and Modbus RTU-over-TCP servers serving the demo plant.

Built on the pymodbus 3.16 server simulator API (``SimDevice``/``SimData`` handed to
``ModbusTcpServer``). The register layout comes from :data:`~.plant.DEMO_TAGS`: every
tag becomes a read-only ``SimData`` block, so addresses outside the map answer
*illegal data address* and writes are refused. Values reach the server through the
device ``action`` hook, which pymodbus calls with the live register list before every
request: a timer steps the plant and rebuilds a register image every
``refresh_interval`` seconds, and the hook copies that image into the registers.

The same hook implements the fault modes: :meth:`ModbusSim.set_exception` answers every
request with a Modbus exception, :meth:`ModbusSim.set_delay` delays every answer.
:meth:`ModbusSim.pause` closes the listener and all connections (clients get
connection errors); :meth:`ModbusSim.resume` listens again on the same port.

An RTU-over-TCP server is a ``ModbusTcpServer`` with ``framer=FramerType.RTU``: RTU
frames (unit id, PDU, CRC-16, no MBAP header) over a TCP stream, which is what serial
device servers such as the Elfin EW11 in transparent mode speak. Clients use
``AsyncModbusTcpClient(host, port=..., framer=FramerType.RTU)``.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
import struct
import time
from collections.abc import Callable
from typing import Literal

from pymodbus import FramerType
from pymodbus.constants import ExcCodes
from pymodbus.server import ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

from .plant import DemoTag, Plant, PlantSnapshot, tag_value, tags_for

__all__ = [
    "ExcCodes",
    "ListenError",
    "ModbusSim",
    "encode_registers",
    "probe_bind",
    "start_modbus_rtu_over_tcp",
    "start_modbus_tcp",
]

log = logging.getLogger(__name__)

Table = Literal["holding", "input", "coil", "discrete"]

#: Function code -> table it addresses.
_FC_TABLE: dict[int, Table] = {
    1: "coil",
    5: "coil",
    15: "coil",
    2: "discrete",
    3: "holding",
    6: "holding",
    16: "holding",
    22: "holding",
    23: "holding",
    4: "input",
}
_TABLES: tuple[Table, ...] = ("coil", "discrete", "holding", "input")  # SimDevice tuple order
_STRUCT = {"int16": "h", "uint16": "H", "int32": "i", "uint32": "I", "float32": "f"}


class ListenError(OSError):
    """A server could not bind its port (busy, privileged, bad address)."""

    def __init__(self, what: str, host: str, port: int, reason: str, err: int | None = None) -> None:
        super().__init__(err if err is not None else errno.EADDRINUSE, reason)
        self.what = what
        self.host = host
        self.port = port
        self.reason = reason

    def __str__(self) -> str:
        return f"cannot listen on {self.host}:{self.port} for {self.what}: {self.reason}"


def probe_bind(host: str, port: int) -> OSError | None:
    """Try to bind ``(host, port)`` like a listener would; return the error, if any.

    Uses ``SO_REUSEADDR`` (like the servers) but not ``SO_REUSEPORT``, so any existing
    listener on the port makes it fail.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
    except OSError as exc:
        return exc
    return None


def listen_error(what: str, host: str, port: int, cause: BaseException | None = None) -> ListenError:
    """Build a :class:`ListenError`, probing the port to find out why listening failed."""
    exc = cause if isinstance(cause, OSError) else probe_bind(host, port)
    if exc is not None:
        return ListenError(what, host, port, exc.strerror or str(exc), exc.errno)
    return ListenError(what, host, port, str(cause) if cause else "listen failed")


def encode_registers(dtype: str, value: bool | int | float, word_order: str | None = "ABCD") -> list[int]:
    """Encode a value into 16-bit registers: big-endian bytes, words in ``word_order``."""
    if dtype == "bool":
        return [1 if value else 0]
    raw = struct.pack(">" + _STRUCT[dtype], value)
    words = [int.from_bytes(raw[i : i + 2], "big") for i in range(0, len(raw), 2)]
    if len(words) == 2 and word_order == "CDAB":
        words.reverse()
    elif len(words) == 2 and word_order not in (None, "ABCD"):
        raise ValueError(f"unsupported word order {word_order!r}")
    return words


def build_image(tags: tuple[DemoTag, ...], snap: PlantSnapshot) -> dict[Table, dict[int, int]]:
    """Register image per table: address -> register (0/1 for coils and discrete inputs)."""
    image: dict[Table, dict[int, int]] = {t: {} for t in _TABLES}
    for tag in tags:
        assert tag.table is not None and tag.address is not None
        for i, word in enumerate(encode_registers(tag.dtype, tag_value(tag, snap), tag.word_order)):
            image[tag.table][tag.address + i] = word
    return image


def _build_device(unit: int, tags: tuple[DemoTag, ...], action) -> SimDevice:
    blocks: dict[Table, list[SimData]] = {t: [] for t in _TABLES}
    for tag in sorted(tags, key=lambda t: (t.table, t.address)):
        assert tag.table is not None and tag.address is not None
        if tag.table in ("coil", "discrete"):
            entry = SimData(tag.address, values=[False], datatype=DataType.BITS, readonly=True)
        else:
            entry = SimData(tag.address, count=tag.register_count, datatype=DataType.REGISTERS, readonly=True)
        blocks[tag.table].append(entry)
    # pymodbus needs at least one block per table; the action refuses unmapped tables.
    for table in ("coil", "discrete"):
        blocks[table] = blocks[table] or [SimData(0, values=[False], datatype=DataType.BITS, readonly=True)]
    for table in ("holding", "input"):
        blocks[table] = blocks[table] or [SimData(0, datatype=DataType.INVALID)]
    return SimDevice(
        id=unit,
        simdata=(blocks["coil"], blocks["discrete"], blocks["holding"], blocks["input"]),
        action=action,
    )


async def _no_such_unit(*_args) -> ExcCodes:
    return ExcCodes.GATEWAY_NO_RESPONSE


def _catch_all_device() -> SimDevice:
    """Device id 0 answers every unit that is not configured with exception 0x0B.

    Without it, pymodbus raises KeyError inside the request handler (logged with a
    traceback) and answers DEVICE_FAILURE.
    """
    return SimDevice(id=0, simdata=SimData(0, count=65536, datatype=DataType.REGISTERS), action=_no_such_unit)


class ModbusSim:
    """One Modbus server (TCP or RTU-over-TCP) with one device fed from ``plant``.

    ``protocol`` selects the tag rows (``"modbus_tcp"``: the press PLC, ``"modbus_rtu"``:
    the energy meter) and the framer. ``port=0`` binds an ephemeral port; :attr:`port`
    tells the bound one after :meth:`start`.
    """

    def __init__(
        self,
        plant: Plant,
        protocol: Literal["modbus_tcp", "modbus_rtu"] = "modbus_tcp",
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        unit: int = 1,
        refresh_interval: float = 0.1,
        clock: Callable[[], float] = time.monotonic,
        tags: tuple[DemoTag, ...] | None = None,
    ) -> None:
        if protocol not in ("modbus_tcp", "modbus_rtu"):
            raise ValueError(f"unknown protocol {protocol!r}")
        if refresh_interval <= 0:
            raise ValueError("refresh_interval must be > 0")
        self.plant = plant
        self.protocol = protocol
        self.framer = FramerType.SOCKET if protocol == "modbus_tcp" else FramerType.RTU
        self.host = host
        self.unit = unit
        self.refresh_interval = refresh_interval
        self.tags = tags if tags is not None else tags_for(protocol)
        self._clock = clock
        self._requested_port = port
        self._port: int | None = None
        self._server: ModbusTcpServer | None = None
        self._task: asyncio.Task | None = None
        self._paused = False
        self._exception: ExcCodes | None = None
        self._delay = 0.0
        self._tables = {t.table for t in self.tags}
        self._image: dict[Table, dict[int, int]] = {t: {} for t in _TABLES}
        self._devices = [_build_device(unit, self.tags, self._action), _catch_all_device()]

    # --- properties -------------------------------------------------------------------

    @property
    def label(self) -> str:
        return "Modbus TCP" if self.protocol == "modbus_tcp" else "Modbus RTU-over-TCP"

    @property
    def port(self) -> int:
        """The bound port (raises before :meth:`start`)."""
        if self._port is None:
            raise RuntimeError(f"{self.label} server not started")
        return self._port

    @property
    def running(self) -> bool:
        """Started and not stopped (may be paused)."""
        return self._task is not None

    @property
    def paused(self) -> bool:
        return self._paused

    @property
    def serving(self) -> bool:
        """Currently accepting connections."""
        return self._server is not None

    # --- lifecycle --------------------------------------------------------------------

    async def start(self) -> int:
        """Bind and serve; return the bound port."""
        if self._task is not None:
            return self.port
        self.refresh()
        await self._listen(self._requested_port)
        self._task = asyncio.create_task(self._refresh_loop(), name=f"plcsim {self.protocol} refresh")
        log.debug("%s listening on %s:%d (unit %d)", self.label, self.host, self.port, self.unit)
        return self.port

    async def stop(self) -> None:
        """Stop serving and the refresh timer. Idempotent."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self._close_server()
        self._paused = False

    async def pause(self) -> None:
        """Stop answering: close the listener and every client connection."""
        if self._task is None or self._paused:
            return
        self._paused = True
        await self._close_server()
        log.debug("%s on port %d paused", self.label, self.port)

    async def resume(self) -> None:
        """Listen again on the same port after :meth:`pause`."""
        if self._task is None or not self._paused:
            return
        await self._listen(self.port)
        self._paused = False
        log.debug("%s on port %d resumed", self.label, self.port)

    def set_exception(self, code: ExcCodes | int | None = ExcCodes.ILLEGAL_ADDRESS) -> None:
        """Answer every request with Modbus exception ``code`` (``None``: answer normally)."""
        self._exception = None if code is None else ExcCodes(code)

    def set_delay(self, seconds: float) -> None:
        """Delay every answer by ``seconds`` (0 disables)."""
        self._delay = max(0.0, float(seconds))

    def refresh(self) -> PlantSnapshot:
        """Step the plant to the clock's now and rebuild the register image."""
        snap = self.plant.step(self._clock())
        self._image = build_image(self.tags, snap)
        return snap

    async def __aenter__(self) -> ModbusSim:
        await self.start()
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.stop()

    # --- internals --------------------------------------------------------------------

    async def _listen(self, port: int) -> None:
        # Probe first: pymodbus only logs the bind error and raises a bare RuntimeError.
        if port and (err := probe_bind(self.host, port)) is not None:
            raise listen_error(self.label, self.host, port, err)
        server = ModbusTcpServer(self._devices, framer=self.framer, address=(self.host, port))
        try:
            await server.serve_forever(background=True)
        except RuntimeError as exc:  # pymodbus turns the bind OSError into this
            raise listen_error(self.label, self.host, port, exc) from None
        self._server = server
        self._port = server.transport.sockets[0].getsockname()[1]

    async def _close_server(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            await server.shutdown()
            await asyncio.sleep(0)  # let the closed connections' transports finish

    async def _refresh_loop(self) -> None:
        while True:
            await asyncio.sleep(self.refresh_interval)
            try:
                self.refresh()
            except Exception:  # keep serving the last image
                log.exception("%s refresh failed", self.label)

    async def _action(
        self,
        function_code: int,
        start_address: int,
        _address: int,
        _count: int,
        registers: list[int],
        values,
    ) -> ExcCodes | None:
        if self._delay:
            await asyncio.sleep(self._delay)
        if self._exception is not None:
            return self._exception
        if values is not None:
            # Everything is read-only. pymodbus enforces SimData(readonly=True) for
            # registers but not for bit blocks (coils), so refuse writes here too.
            return ExcCodes.ILLEGAL_ADDRESS
        table = _FC_TABLE.get(function_code)
        if table is None or table not in self._tables:
            return ExcCodes.ILLEGAL_ADDRESS
        image = self._image[table]
        n = len(registers)
        if table in ("coil", "discrete"):
            # Bit tables: registers hold 16 bits each and start_address counts registers.
            for addr, bit in image.items():
                idx = addr // 16 - start_address
                if 0 <= idx < n:
                    mask = 1 << (addr % 16)
                    registers[idx] = (registers[idx] | mask) if bit else (registers[idx] & ~mask)
        else:
            for addr, word in image.items():
                idx = addr - start_address
                if 0 <= idx < n:
                    registers[idx] = word
        return None


async def start_modbus_tcp(plant: Plant, host: str = "127.0.0.1", port: int = 0, **kwargs) -> ModbusSim:
    """Start the press PLC's Modbus TCP server; ``await sim.stop()`` when done."""
    sim = ModbusSim(plant, "modbus_tcp", host=host, port=port, **kwargs)
    await sim.start()
    return sim


async def start_modbus_rtu_over_tcp(plant: Plant, host: str = "127.0.0.1", port: int = 0, **kwargs) -> ModbusSim:
    """Start the energy meter behind an RTU-over-TCP gateway; ``await sim.stop()`` when done."""
    sim = ModbusSim(plant, "modbus_rtu", host=host, port=port, **kwargs)
    await sim.start()
    return sim
