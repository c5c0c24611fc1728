"""Device drivers: Modbus TCP, Modbus RTU (on a serial port, or RTU frames over TCP to a serial gateway) and S7.

A driver connects to one PLC, plans the block reads of a poll group (`plan`) and reads blocks (`read`).
Failures come in two kinds, which the poller turns into two reading qualities:

* `CommunicationError`: no usable answer (connect refused, no answer within the PLC's timeout, connection
  lost, a Modbus reply of another transaction, protocol or unit id: see replies.py). The poller drops the connection and reconnects with backoff: after a timeout the state of the
  stream is unknown (a late answer could be taken for the next request's).
* `DeviceError`: the device answered, with an error (a Modbus exception, an S7 return code, an answer
  of the wrong size: a Modbus reply shorter or longer than asked, or whose byte count disagrees with it). The
  connection stays; the tags of that block get QUALITY_DECODE_FAILURE, except when the error says that an
  address does not exist (`DeviceError.illegal_address`: Modbus exception 2, S7 "invalid address"): the
  poller then splits the block to find the tags the device lacks (a configuration error), see
  collector/split.py.

Modbus RTU is a bus: several devices (unit ids) share one serial line, and only one request may be on
the line at a time. `ModbusBus` is that line: one link (serial port, or the TCP connection to a serial
gateway such as an Elfin EW11 in transparent mode, which forwards bytes to its RS-485 port as they come)
and one asyncio.Lock, shared by every PLC on it through a `BusRegistry`. Requests to the devices of a bus
take turns; devices on other buses, and Modbus TCP and S7 PLCs, never wait for them.

python-snap7's client is blocking; each S7 PLC gets its own single-thread executor, so a PLC that hangs
in a call occupies only its own thread (the shared default executor would let a few dead PLCs starve the
others), and the client is never used from two threads at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeAlias

import snap7
from fabrica.config.v1 import plc_pb2
from pymodbus import FramerType
from pymodbus.client import AsyncModbusSerialClient, AsyncModbusTcpClient
from pymodbus.client.base import ModbusBaseClient
from pymodbus.exceptions import ConnectionException, ModbusException, ModbusIOException
from pymodbus.transport.serialtransport import SerialTransport
from snap7.error import S7ConnectionError, S7Error, S7PacketLostError, S7StalePacketError, S7TimeoutError
from snap7.type import Area

from . import replies
from .blocks import ModbusBlock, S7Block, plan_modbus, plan_s7
from ..plcmodel.plc import BlockLimits, port_of
from ..plcmodel.spec import ModbusTable, S7Area, TagSpec
from ..runtime.logs import quiet_libraries

log = logging.getLogger(__name__)
quiet_libraries()  # pymodbus's timeouts at ERROR are noise: each reading says what happened (runtime/logs.py)

Block: TypeAlias = ModbusBlock | S7Block
#: What a block read returns: registers, bits (coils, discrete inputs) or bytes (S7).
BlockData: TypeAlias = list[int] | list[bool] | bytes | bytearray

DEFAULT_TIMEOUT = 1.0
#: After a timeout on an RTU bus the lock is held this much longer, so that a late answer of the slow
#: device lands (and is discarded as unsolicited) before the next device is asked.
RTU_GUARD_SECONDS = 0.05
#: Consecutive timeouts on a bus, of any device, after which the link itself is reopened.
RTU_TIMEOUTS_BEFORE_RELINK = 3
#: S7 read overhead: 12-byte header + 2-byte parameter + 4-byte data item header.
S7_READ_OVERHEAD = 18

MODBUS_EXCEPTIONS = {
    1: "illegal function",
    2: "illegal data address",
    3: "illegal data value",
    4: "server device failure",
    5: "acknowledge",
    6: "server device busy",
    8: "memory parity error",
    10: "gateway path unavailable",
    11: "gateway target device failed to respond",
}
ILLEGAL_DATA_ADDRESS = 2
#: The S7 data item return code that says the address is not there: 0x05 "invalid address" (address out
#: of range: past the end of the DB or area). 0x0A "object does not exist" (no such DB) is not one: a DB
#: is missing for a while during a program download, and its tags should read again as soon as it is back.
S7_ADDRESS_ERROR = 0x05
_S7_RETURN_CODE = re.compile(r"\(0x([0-9a-fA-F]{2})\)\s*$")
_NO_LIMITS = BlockLimits()


class CommunicationError(Exception):
    """No usable answer from the device; the connection is dropped and re-established."""


class DeviceError(Exception):
    """The device answered with an error. `code` is the Modbus exception code, when there is one.

    `illegal_address`: the answer says that (some of) the addresses read do not exist on the device
    (Modbus exception 2 unless told otherwise; the S7 driver sets it for the S7 return codes that say so).
    `answer`: the device's answer in its own words ("exception 2, illegal data address" for Modbus).
    """

    def __init__(self, message: str, code: int | None = None, *, illegal_address: bool | None = None,
                 answer: str = ""):
        super().__init__(message)
        self.code = code
        self.illegal_address = code == ILLEGAL_DATA_ADDRESS if illegal_address is None else illegal_address
        if not answer and code is not None:
            answer = f"exception {code}, {MODBUS_EXCEPTIONS.get(code, 'unknown exception')}"
        self.answer = answer


class PlcConfigError(Exception):
    """The PLC definition cannot be used as it is (e.g. a serial port already open with other settings)."""


def timeout_of(conn: Any) -> float:
    """The per-request timeout of a connection message (1 s when not set)."""
    if conn.HasField("timeout"):
        seconds = conn.timeout.ToTimedelta().total_seconds()
        if seconds > 0:
            return seconds
    return DEFAULT_TIMEOUT


class Driver(ABC):
    """One PLC's connection. Not safe for concurrent use: one poller (or one admin call) at a time."""

    def __init__(self, plc_id: str, timeout: float):
        self.plc_id = plc_id
        self.timeout = timeout
        #: The connection as last noted by `note_up` / `note_down`: None before the first attempt.
        self.link_up: bool | None = None

    def note_up(self) -> None:
        """The device answers (the poller calls it after a poll whose every read was answered): logged once
        per transition, so a device that accepts connections but never answers is not "restored" each retry."""
        if self.link_up is not True:
            if self.link_up is None:
                log.info("PLC %s connected (%s)", self.plc_id, self.endpoint)
            else:
                log.info("PLC %s connection restored (%s)", self.plc_id, self.endpoint)
        self.link_up = True

    def note_down(self, reason: str) -> None:
        """The connection failed: logged once per transition (lost, or never made), not at every retry."""
        if self.link_up is True:
            log.warning("PLC %s connection lost (%s): %s", self.plc_id, self.endpoint, reason)
        elif self.link_up is None:
            log.warning("PLC %s cannot connect (%s): %s", self.plc_id, self.endpoint, reason)
        self.link_up = False

    @property
    @abstractmethod
    def connected(self) -> bool: ...

    @property
    @abstractmethod
    def endpoint(self) -> str:
        """Where the device is, in words (for errors and logs)."""

    @abstractmethod
    async def connect(self) -> None:
        """Connect; raises CommunicationError (or PlcConfigError)."""

    @abstractmethod
    def plan(self, specs: Sequence[TagSpec], limits: BlockLimits = _NO_LIMITS) -> list[Block]:
        """Block reads for the tags of one poll group, within the PLC's block limits. Raises ValueError."""

    @abstractmethod
    async def read(self, block: Block) -> BlockData:
        """Read one block; raises CommunicationError or DeviceError."""

    @abstractmethod
    async def device_info(self) -> str:
        """What the device says it is, or "" (ProbePlc)."""

    @abstractmethod
    async def close(self) -> None:
        """Drop the connection (the driver can connect again)."""

    async def dispose(self) -> None:
        """Release everything for good."""
        await self.close()


# ------------------------------------------------------------------------------------------------ Modbus


_READ_FUNCTION = {
    ModbusTable.COIL: 1, ModbusTable.DISCRETE_INPUT: 2, ModbusTable.HOLDING_REGISTER: 3, ModbusTable.INPUT_REGISTER: 4,
}


async def _modbus_read(client: ModbusBaseClient, table: ModbusTable, start: int, count: int, unit: int,
                       where: str) -> BlockData:
    """Read one block; the reply is checked against the request (replies.py) whatever the unit id.

    `where` names the device in errors. A reply of another transaction, protocol or unit is a
    CommunicationError; an exception, or a reply shorter or longer than asked, a DeviceError.
    """
    read = {
        ModbusTable.COIL: client.read_coils,
        ModbusTable.DISCRETE_INPUT: client.read_discrete_inputs,
        ModbusTable.INPUT_REGISTER: client.read_input_registers,
        ModbusTable.HOLDING_REGISTER: client.read_holding_registers,
    }[table]
    response = await read(start, count=count, device_id=unit)
    asked = f"reading {count} of {table.name} from {start}"
    if problem := replies.check_read_reply(response, _READ_FUNCTION[table], count):
        kind, reason = problem
        if kind == replies.COMMUNICATION:
            raise CommunicationError(f"{where}: {reason} ({asked})")
        raise DeviceError(f"bad reply from {where}: {reason} ({asked})")
    if response.isError():
        code = getattr(response, "exception_code", None)
        what = MODBUS_EXCEPTIONS.get(code, "unknown exception") if code is not None else "error response"
        raise DeviceError(f"Modbus exception {code}: {what} ({asked})", code)
    if table.is_bit_table:
        return list(response.bits[:count])  # whole bytes of bits, as many as asked for (checked above)
    return list(response.registers)


def _plan_modbus(specs: Sequence[TagSpec], limits: BlockLimits) -> list[Block]:
    return list(plan_modbus(specs, limits))


class ModbusTcpDriver(Driver):
    """Modbus TCP (MBAP framing), one TCP connection per PLC."""

    def __init__(self, plc_id: str, host: str, port: int, unit: int, timeout: float):
        super().__init__(plc_id, timeout)
        self.host, self.port, self.unit = host, port, unit
        self._client: AsyncModbusTcpClient | None = None

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def connected(self) -> bool:
        return self._client is not None and self._client.connected

    async def connect(self) -> None:
        if self._client is None:
            # retries=0 and reconnect_delay=0: the poller owns retries and reconnects (with backoff and
            # jitter); pymodbus would otherwise reconnect on its own schedule in the background.
            self._client = replies.install(AsyncModbusTcpClient(
                self.host, port=self.port, timeout=self.timeout, retries=0, reconnect_delay=0, name=self.plc_id
            ))
        if not await self._client.connect():
            self._client.close()
            raise CommunicationError(
                f"cannot connect to {self.endpoint} (refused, unreachable or no answer within {self.timeout:g} s)"
            )

    def plan(self, specs: Sequence[TagSpec], limits: BlockLimits = _NO_LIMITS) -> list[Block]:
        return _plan_modbus(specs, limits)

    async def read(self, block: Block) -> BlockData:
        assert isinstance(block, ModbusBlock)
        client = self._client
        if client is None or not client.connected:
            raise CommunicationError(f"connection to {self.endpoint} lost")
        try:
            return await _modbus_read(client, block.table, block.start, block.count, self.unit, self.endpoint)
        except ModbusIOException:
            raise CommunicationError(f"no answer from {self.endpoint} within {self.timeout:g} s") from None
        except ConnectionException as exc:
            raise CommunicationError(f"connection to {self.endpoint} lost: {exc}") from None
        except ModbusException as exc:
            raise DeviceError(f"bad answer from {self.endpoint}: {exc}") from None

    async def device_info(self) -> str:
        return ""

    async def close(self) -> None:
        if self._client is not None:
            self._client.close()


class _SerialTransport(SerialTransport):
    """pymodbus's serial transport with a close that does not block the event loop.

    pyserial's close of a ``socket://`` port sleeps 0.3 s ("give the server some time"), and pymodbus
    calls it on the event loop, also when the peer hangs up: every PLC of the collector would stall. Here
    the port is detached from the loop at once and closed in a worker thread.
    """

    def close(self, exc: Exception | None = None) -> None:
        port = self.sync_serial
        if not port:
            return
        self.flush()
        if self.poll_task:
            self.poll_task.cancel()
            self.poll_task = None
        else:
            self.async_loop.remove_reader(port.fileno())
        self.sync_serial = None  # type: ignore[assignment]
        self.async_loop.run_in_executor(None, port.close)
        if exc:
            with contextlib.suppress(Exception):
                self.intern_protocol.connection_lost(exc)


def _serial_client(port: str, baud_rate: int, parity: str, stop_bits: int, timeout: float) -> AsyncModbusSerialClient:
    """An RTU client on a serial port (or any pyserial URL, e.g. socket://host:port).

    Opening goes to a worker thread as well: pyserial opens a socket:// URL with a blocking connect, and
    pymodbus 3.16 would do it on the event loop. The rest is pymodbus's own create_serial_connection.
    """
    client = AsyncModbusSerialClient(
        port, framer=FramerType.RTU, baudrate=baud_rate, parity=parity, stopbits=stop_bits,
        timeout=timeout, retries=0, reconnect_delay=0,
    )
    ctx = client.ctx

    async def create() -> tuple[SerialTransport, Any]:
        loop = asyncio.get_running_loop()
        protocol = ctx.handle_new_connection()
        p = ctx.comm_params
        opening = loop.run_in_executor(
            None, partial(_SerialTransport, loop, protocol, p.host, p.baudrate, p.bytesize, p.parity, p.stopbits,
                          p.timeout_connect)
        )
        try:
            transport = await asyncio.shield(opening)
        except asyncio.CancelledError:
            # Timed out (or cancelled) while the thread was still opening: close the port when it is open.
            def discard(done: asyncio.Future) -> None:
                if not done.cancelled() and done.exception() is None:
                    with contextlib.suppress(Exception):
                        done.result().sync_serial.close()

            opening.add_done_callback(discard)
            raise
        loop.call_soon(transport.setup)
        return transport, protocol

    ctx.call_create = create
    return replies.install(client)


class ModbusBus:
    """One RTU line shared by every PLC on it: one link, one request at a time."""

    def __init__(self, key: str, signature: tuple[Any, ...], make_client: Callable[[float], ModbusBaseClient]):
        self.key = key
        self.signature = signature
        self.lock = asyncio.Lock()
        self.users = 0
        self._make_client = make_client
        self._client: ModbusBaseClient | None = None
        self._timeouts_in_a_row = 0

    @property
    def connected(self) -> bool:
        return self._client is not None and self._client.connected

    def _set_timeout(self, timeout: float) -> None:
        # Devices on one bus may have different timeouts; pymodbus reads this one per request.
        assert self._client is not None
        self._client.ctx.comm_params.timeout_connect = timeout

    async def ensure_connected(self, timeout: float) -> None:
        async with self.lock:
            if self.connected:
                return
            if self._client is None:
                self._client = self._make_client(timeout)
            self._set_timeout(timeout)
            if not await self._client.connect():
                self._client.close()
                raise CommunicationError(f"cannot open {self.key} (not there, busy, or no answer within {timeout:g} s)")
            self._timeouts_in_a_row = 0

    async def read(self, table: ModbusTable, start: int, count: int, unit: int, timeout: float) -> BlockData:
        async with self.lock:
            client = self._client
            if client is None or not client.connected:
                raise CommunicationError(f"{self.key} is not open")
            self._set_timeout(timeout)
            framer = client.ctx.framer
            framer.skipped = ""  # a reply of another unit skipped during this request (replies.py)
            try:
                data = await _modbus_read(client, table, start, count, unit, f"unit {unit} on {self.key}")
            except ModbusIOException:
                self._timeouts_in_a_row += 1
                if self._timeouts_in_a_row >= RTU_TIMEOUTS_BEFORE_RELINK:
                    log.info("no device on %s answered %d requests in a row; reopening it", self.key, self._timeouts_in_a_row)
                    self.close_link()
                else:
                    await asyncio.sleep(RTU_GUARD_SECONDS)
                skipped = f" (skipped a {framer.skipped})" if framer.skipped else ""
                raise CommunicationError(f"unit {unit} on {self.key}: no answer within {timeout:g} s{skipped}") from None
            except ConnectionException as exc:
                self.close_link()
                raise CommunicationError(f"{self.key} lost: {exc}") from None
            except DeviceError:
                self._timeouts_in_a_row = 0
                raise
            except ModbusException as exc:
                raise DeviceError(f"unit {unit} on {self.key}: bad answer: {exc}") from None
            self._timeouts_in_a_row = 0
            return data

    def close_link(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None


class BusRegistry:
    """The RTU buses of one collector, by serial port or gateway address."""

    def __init__(self) -> None:
        self._buses: dict[str, ModbusBus] = {}

    def acquire(self, key: str, signature: tuple[Any, ...], make_client: Callable[[float], ModbusBaseClient],
                plc_id: str) -> ModbusBus:
        bus = self._buses.get(key)
        if bus is None:
            bus = self._buses[key] = ModbusBus(key, signature, make_client)
        elif bus.signature != signature:
            raise PlcConfigError(
                f"{key} is already in use with other line settings {bus.signature}; PLC {plc_id} asks for {signature}"
            )
        bus.users += 1
        return bus

    def release(self, bus: ModbusBus) -> None:
        bus.users -= 1
        if bus.users <= 0 and self._buses.get(bus.key) is bus:
            del self._buses[bus.key]
            bus.close_link()

    def __len__(self) -> int:
        return len(self._buses)


class ModbusRtuDriver(Driver):
    """A device on an RTU bus (serial port or serial gateway); requests take turns with the bus's others."""

    def __init__(self, plc_id: str, bus: ModbusBus, unit: int, timeout: float, registry: BusRegistry):
        super().__init__(plc_id, timeout)
        self.bus, self.unit = bus, unit
        self._registry = registry
        self._attached = False
        self._disposed = False

    @property
    def endpoint(self) -> str:
        return f"unit {self.unit} on {self.bus.key}"

    @property
    def connected(self) -> bool:
        return self._attached and self.bus.connected

    async def connect(self) -> None:
        await self.bus.ensure_connected(self.timeout)
        self._attached = True

    def plan(self, specs: Sequence[TagSpec], limits: BlockLimits = _NO_LIMITS) -> list[Block]:
        return _plan_modbus(specs, limits)

    async def read(self, block: Block) -> BlockData:
        assert isinstance(block, ModbusBlock)
        if not self._attached:
            raise CommunicationError(f"{self.endpoint}: not connected")
        return await self.bus.read(block.table, block.start, block.count, self.unit, self.timeout)

    async def device_info(self) -> str:
        return ""

    async def close(self) -> None:
        # The link belongs to the bus; the other devices on it keep using it.
        self._attached = False

    async def dispose(self) -> None:
        await self.close()
        if not self._disposed:
            self._disposed = True
            self._registry.release(self.bus)


# ---------------------------------------------------------------------------------------------------- S7

_S7_AREAS = {S7Area.DB: Area.DB, S7Area.INPUTS: Area.PE, S7Area.OUTPUTS: Area.PA, S7Area.MERKERS: Area.MK}


def s7_range_name(area: int, db_number: int, start: int, size: int) -> str:
    """An S7 byte range in the PLC's words, e.g. "DB2 bytes 0-13" or "M bytes 10-11"."""
    where = f"DB{db_number}" if S7Area(area or S7Area.DB) == S7Area.DB else {
        S7Area.INPUTS: "I", S7Area.OUTPUTS: "Q", S7Area.MERKERS: "M"}[S7Area(area)]
    return f"{where} bytes {start}-{start + size - 1}"


class S7Driver(Driver):
    """Siemens S7 over ISO-on-TCP with python-snap7, in a thread of its own."""

    def __init__(self, plc_id: str, host: str, port: int, rack: int, slot: int, timeout: float):
        super().__init__(plc_id, timeout)
        self.host, self.port, self.rack, self.slot = host, port, rack, slot
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"s7-{plc_id}")
        self._client: snap7.client.Client | None = None
        self.pdu_length = 240

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.port} rack {self.rack} slot {self.slot}"

    @property
    def connected(self) -> bool:
        client = self._client
        return client is not None and client.connected and client.connection is not None and client.connection.connected

    async def _call(self, fn: Callable[..., Any], *args: Any) -> Any:
        future = asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)
        # The socket timeout bounds a read; this bounds anything else, with a margin for the thread hop.
        # A call cut short here keeps its thread until snap7 gives up (at most 5 s for a connect): the
        # next call of this PLC queues behind it, no other PLC notices.
        async with asyncio.timeout(self.timeout + 0.5):
            return await future

    def _connect_blocking(self) -> tuple[snap7.client.Client, int]:
        client = snap7.client.Client()
        client.connect(self.host, self.rack, self.slot, self.port)
        try:
            # snap7 3.3 has no timeout setting; its connection waits up to 5 s. Apply the PLC's own.
            client.connection.timeout = self.timeout
            client.connection.socket.settimeout(self.timeout)
        except Exception:
            client.disconnect()
            raise
        return client, client.get_pdu_length()

    async def connect(self) -> None:
        await self.close()
        try:
            self._client, self.pdu_length = await self._call(self._connect_blocking)
        except TimeoutError:
            raise CommunicationError(f"cannot connect to {self.endpoint}: no answer within {self.timeout:g} s") from None
        except (S7Error, OSError) as exc:
            raise CommunicationError(f"cannot connect to {self.endpoint}: {exc}") from None

    def plan(self, specs: Sequence[TagSpec], limits: BlockLimits = _NO_LIMITS) -> list[Block]:
        # The negotiated PDU bounds a read, and the PLC's limits within it.
        return list(plan_s7(specs, limits, payload=max(1, self.pdu_length - S7_READ_OVERHEAD)))

    async def read(self, block: Block) -> BlockData:
        assert isinstance(block, S7Block)
        client = self._client
        if client is None or not self.connected:
            raise CommunicationError(f"connection to {self.endpoint} lost")
        try:
            return await self._call(client.read_area, _S7_AREAS[block.area], block.db_number, block.start, block.size)
        except (TimeoutError, S7TimeoutError):
            raise CommunicationError(f"no answer from {self.endpoint} within {self.timeout:g} s") from None
        except (S7ConnectionError, S7PacketLostError, S7StalePacketError, OSError) as exc:
            raise CommunicationError(f"connection to {self.endpoint} lost: {exc}") from None
        except S7Error as exc:  # the PLC answered with an error code, or an answer of the wrong shape
            raise _s7_device_error(self.endpoint, block, exc) from None

    @contextlib.asynccontextmanager
    async def _s7_call(self, what: str):  # noqa: ANN202 - an async context manager
        """Map snap7's errors around one call, as `read` does: no answer or a lost connection is a
        CommunicationError, an answer with an error code a DeviceError naming `what`."""
        try:
            yield
        except (TimeoutError, S7TimeoutError):
            raise CommunicationError(f"no answer from {self.endpoint} within {self.timeout:g} s ({what})") from None
        except (S7ConnectionError, S7PacketLostError, S7StalePacketError, OSError) as exc:
            raise CommunicationError(f"connection to {self.endpoint} lost ({what}): {exc}") from None
        except S7Error as exc:
            raise DeviceError(f"S7 error from {self.endpoint} ({what}): {exc}") from None

    def _connected_client(self) -> snap7.client.Client:
        client = self._client
        if client is None or not self.connected:
            raise CommunicationError(f"connection to {self.endpoint} lost")
        return client

    async def read_range(self, area: S7Area, db_number: int, start: int, size: int) -> bytes:
        """Read `size` bytes at `start` of an area (a raw block, e.g. a mirror's source): exactly `size` bytes,
        or CommunicationError / DeviceError."""
        client = self._connected_client()
        what = f"reading {s7_range_name(area, db_number, start, size)}"
        async with self._s7_call(what):
            data = bytes(await self._call(client.read_area, _S7_AREAS[S7Area(area or S7Area.DB)], db_number, start,
                                          size))
        if len(data) != size:
            raise DeviceError(f"S7 answer from {self.endpoint} has {len(data)} bytes, asked {size} ({what})")
        return data

    async def write_range(self, area: S7Area, db_number: int, start: int, data: bytes) -> None:
        """Write `data` at `start` of an area (snap7 splits it to fit the PDU); CommunicationError or
        DeviceError when the PLC does not confirm it."""
        client = self._connected_client()
        async with self._s7_call(f"writing {s7_range_name(area, db_number, start, len(data))}"):
            await self._call(client.write_area, _S7_AREAS[S7Area(area or S7Area.DB)], db_number, start,
                             bytearray(data))

    async def device_info(self) -> str:
        client = self._client
        if client is None:
            return ""

        def ask() -> str:
            parts = []
            with contextlib.suppress(Exception):
                order = client.get_order_code()
                code = order.OrderCode.decode("ascii", "replace").strip("\x00 ") if isinstance(order.OrderCode, bytes) else str(order.OrderCode)
                parts.append(f"order code {code} v{order.V1}.{order.V2}.{order.V3}")
            with contextlib.suppress(Exception):
                parts.append(f"CPU {client.get_cpu_state()}")
            return ", ".join(parts)

        try:
            return await self._call(ask)
        except TimeoutError:
            return ""

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            # Queued on the PLC's thread, behind any call still running there; not awaited beyond a bound.
            future = asyncio.get_running_loop().run_in_executor(self._executor, client.disconnect)
            with contextlib.suppress(Exception):
                async with asyncio.timeout(self.timeout + 0.5):
                    await future

    async def dispose(self) -> None:
        await self.close()
        self._executor.shutdown(wait=False, cancel_futures=False)


def s7_range(area: S7Area, db_number: int, start: int, size: int) -> str:
    """An S7 byte range in words: "DB1 bytes 14..17", "M byte 3"."""
    where = f"DB{db_number}" if area is S7Area.DB else {S7Area.INPUTS: "I", S7Area.OUTPUTS: "Q",
                                                          S7Area.MERKERS: "M"}.get(area, area.name)
    return f"{where} byte {start}" if size == 1 else f"{where} bytes {start}..{start + size - 1}"


def _s7_device_error(endpoint: str, block: S7Block, exc: S7Error) -> DeviceError:
    """The PLC's error answer to a read, naming the area, DB number, byte range and the answer."""
    answer = str(exc).removeprefix("Read operation failed: ")
    match = _S7_RETURN_CODE.search(answer)
    code = int(match.group(1), 16) if match else None
    # Without a return code in the text (another snap7 build), its words: "CPU : Address out of range".
    illegal = code == S7_ADDRESS_ERROR if code is not None else "address out of range" in answer.lower()
    where = s7_range(block.area, block.db_number, block.start, block.size)
    return DeviceError(f"S7 read of {where} ({block.size} bytes) from {endpoint} failed: the PLC answered {answer!r}",
                       illegal_address=illegal, answer=f"the PLC answered {answer!r}")


# ----------------------------------------------------------------------------------------------- factory


@dataclass(frozen=True)
class SerialLine:
    port: str
    baud_rate: int
    parity: str
    stop_bits: int


_PARITY = {plc_pb2.PARITY_UNSPECIFIED: "E", plc_pb2.PARITY_NONE: "N", plc_pb2.PARITY_EVEN: "E", plc_pb2.PARITY_ODD: "O"}


def make_driver(plc: plc_pb2.Plc, buses: BusRegistry) -> Driver:
    """The driver for a PLC definition. Raises PlcConfigError for a definition it cannot serve."""
    kind = plc.WhichOneof("connection")
    if kind == "modbus_tcp":
        c = plc.modbus_tcp
        return ModbusTcpDriver(plc.id, c.host, port_of(plc), c.unit_id, timeout_of(c))
    if kind == "modbus_rtu_over_tcp":
        c = plc.modbus_rtu_over_tcp
        port = port_of(plc)
        host = c.host

        def gateway_client(timeout: float) -> ModbusBaseClient:
            return replies.install(AsyncModbusTcpClient(host, port=port, framer=FramerType.RTU, timeout=timeout,
                                                        retries=0, reconnect_delay=0))

        bus = buses.acquire(f"gateway {host}:{port}", (), gateway_client, plc.id)
        return ModbusRtuDriver(plc.id, bus, c.unit_id, timeout_of(c), buses)
    if kind == "modbus_rtu":
        c = plc.modbus_rtu
        line = SerialLine(
            c.serial_port,
            c.baud_rate if c.HasField("baud_rate") else 9600,
            _PARITY.get(c.parity, "E"),
            c.stop_bits if c.HasField("stop_bits") else 1,
        )

        def serial_client(timeout: float) -> ModbusBaseClient:
            return _serial_client(line.port, line.baud_rate, line.parity, line.stop_bits, timeout)

        bus = buses.acquire(f"serial port {line.port}", (line.baud_rate, line.parity, line.stop_bits), serial_client,
                            plc.id)
        return ModbusRtuDriver(plc.id, bus, c.unit_id, timeout_of(c), buses)
    if kind == "s7":
        c = plc.s7
        return S7Driver(plc.id, c.host, port_of(plc), c.rack, c.slot, timeout_of(c))
    raise PlcConfigError("the PLC has no connection")
