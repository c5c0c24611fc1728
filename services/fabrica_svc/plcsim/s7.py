"""S7 (ISO-on-TCP) server serving the demo plant's DB1, built on python-snap7's pure-Python server.

DB1 layout: the edge seed's 14 bytes, big-endian (see :data:`~.plant.DEMO_TAGS`); a read past byte 13 fails::

    DBX0.0 bad part   DBX0.1 good part   DBX0.2 machine on     (BOOL)
    DBD2   REAL motor current (A)        DBD6  REAL vibration (mm/s)
    DBW10  INT  good parts mod 32768      DBW12 INT  bad parts mod 32768

:class:`S7Device` is a bare S7 server with data blocks of given sizes, for tests that need a device someone
else's program fills (a mirror's source and target, a profile's golden test): it counts the reads and writes
it serves.

snap7 3.3 quirks handled here:

* ``Server.start_to(ip, 0)`` binds an ephemeral port but leaves ``server.port`` at 0;
  the bound port is read from ``server.server_socket.getsockname()``.
* The listener sets ``SO_REUSEPORT``, so binding a port another ``SO_REUSEPORT``
  listener holds silently succeeds. :meth:`S7Sim.start` probes the port first and
  raises :class:`~.modbus.ListenError` when it is taken.
* ``Server.stop()`` does not close client sockets: client threads sit in ``recv``
  (5 s timeout) and may still answer one more request. The server here tracks client
  sockets and shuts them down on stop/pause, so clients see the connection drop.
* The server runs in its own threads; the DB bytearray is updated in place under
  ``lock_area``/``unlock_area`` (the same per-area lock the server reads under).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

from snap7.server import Server
from snap7.type import SrvArea

from .modbus import ListenError, probe_bind
from .plant import DB1, DB1_SIZE, DemoTag, Plant, PlantSnapshot, tag_value, tags_for
from .server import AnswerFaults, SimServer

__all__ = ["S7Access", "S7Device", "S7Sim", "encode_db", "start_s7"]

_STRUCT = {"int16": ">h", "uint16": ">H", "int32": ">i", "uint32": ">I", "float32": ">f"}


def encode_db(tags: tuple[DemoTag, ...], snap: PlantSnapshot, size: int = DB1_SIZE) -> bytearray:
    """The DB image for ``tags`` (all rows must be S7 rows of one DB)."""
    data = bytearray(size)
    for tag in tags:
        assert tag.offset is not None
        value = tag_value(tag, snap)
        if tag.dtype == "bool":
            assert tag.bit is not None
            if value:
                data[tag.offset] |= 1 << tag.bit
            else:
                data[tag.offset] &= ~(1 << tag.bit) & 0xFF
        else:
            struct.pack_into(_STRUCT[tag.dtype], data, tag.offset, value)
    return data


class _Server(Server):
    """snap7 server that can drop its clients (snap7's ``stop()`` leaves them connected) and answers reads
    through ``faults`` (late, or held until released)."""

    def __init__(self, faults: AnswerFaults) -> None:
        super().__init__(log=False)
        self._faults = faults
        self._sockets: set[socket.socket] = set()
        self._sockets_lock = threading.Lock()
        self._refuse = False
        #: Every read and write request served (also the refused ones), in order; appended from client threads.
        self.reads: list[S7Access] = []
        self.writes: list[S7Access] = []

    def _read_from_memory_area(self, area, db_number: int, start: int, count: int):  # noqa: ANN001, ANN202
        self.reads.append(S7Access(db_number, start, count))
        return super()._read_from_memory_area(area, db_number, start, count)

    def _write_to_memory_area(self, area, db_number: int, start: int, write_data: bytearray) -> bool:  # noqa: ANN001
        self.writes.append(S7Access(db_number, start, len(write_data)))
        return super()._write_to_memory_area(area, db_number, start, write_data)

    def _handle_client(self, client_socket: socket.socket, address) -> None:  # runs in a client thread
        with self._sockets_lock:
            self._sockets.add(client_socket)
            if self._refuse:
                _shutdown(client_socket)
        try:
            super()._handle_client(client_socket, address)
        finally:
            with self._sockets_lock:
                self._sockets.discard(client_socket)

    def _handle_read_area(self, request, client_address):  # noqa: ANN001, ANN202 - runs in a client thread
        self._faults.before_answer_blocking()
        return super()._handle_read_area(request, client_address)

    def bound_port(self) -> int:
        assert self.server_socket is not None
        return self.server_socket.getsockname()[1]

    def halt(self) -> None:
        """Close the listener and every client connection (blocking, < ~0.5 s)."""
        with self._sockets_lock:
            self._refuse = True
            sockets = list(self._sockets)
        for sock in sockets:
            _shutdown(sock)
        try:
            self.stop()
        finally:
            with self._sockets_lock:
                self._refuse = False


class S7Access(NamedTuple):
    """One read or write request a simulated S7 server served: DB number, first byte, byte count."""

    db_number: int
    start: int
    size: int

    @property
    def end(self) -> int:
        """One past the last byte asked for."""
        return self.start + self.size


def _serve(label: str, host: str, port: int, areas: Mapping[int, bytearray],
           faults: AnswerFaults | None = None) -> _Server:
    """A started server on host:port (0: ephemeral) with these data blocks, answering through `faults` (none:
    at once); ListenError when it cannot bind."""
    try:  # snap7's start_to() only takes an IPv4 literal
        ip = socket.gethostbyname(host)
    except OSError as exc:
        raise ListenError(label, host, port, str(exc)) from None
    if port and (err := probe_bind(ip, port)) is not None:
        raise ListenError(label, host, port, err.strerror or str(err), err.errno)
    server = _Server(faults if faults is not None else AnswerFaults())
    for number, data in areas.items():
        server.register_area(SrvArea.DB, number, data)
    try:
        server.start_to(ip, port)
    except Exception as exc:  # snap7 wraps the OSError into S7ConnectionError
        cause = exc.__cause__ or exc.__context__
        if isinstance(cause, OSError):
            raise ListenError(label, host, port, cause.strerror or str(cause), cause.errno) from None
        raise ListenError(label, host, port, str(exc)) from None
    return server


def _shutdown(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)


class S7Sim(SimServer):
    """An S7 PLC with DB1 fed from ``plant``. ``port=0`` binds an ephemeral port.

    Faults: those of :class:`~.server.SimServer` (a delay or a hold applies to reads), and
    :meth:`set_db_missing`.
    """

    label = "S7"

    def __init__(self, plant: Plant, *, tags: tuple[DemoTag, ...] | None = None, **server: Any) -> None:
        """``server``: ``host``, ``port``, ``refresh_interval`` and ``clock`` of :class:`~.server.SimServer`."""
        super().__init__(plant, **server)
        self.tags = tags if tags is not None else tags_for("s7")
        self.db_number = DB1
        self._db = bytearray(DB1_SIZE)
        self._db_missing = False

    def set_db_missing(self, missing: bool = True) -> None:
        """Unregister DB1 so reads fail with an S7 error ("object does not exist")."""
        self._db_missing = missing
        server = self._server
        if server is None:
            return
        if missing:
            server.unregister_area(SrvArea.DB, DB1)
        else:
            server.register_area(SrvArea.DB, DB1, self._db)

    def refresh(self) -> PlantSnapshot:
        """Step the plant to the clock's now and rewrite DB1 in place."""
        snap = self.step_plant()
        image = encode_db(self.tags, snap, DB1_SIZE)
        server = self._server
        if server is not None and not self._db_missing:
            server.lock_area(SrvArea.DB, DB1)
            try:
                self._db[:] = image
            finally:
                server.unlock_area(SrvArea.DB, DB1)
        else:
            self._db[:] = image
        return snap

    # --- internals --------------------------------------------------------------------

    def _details(self) -> str:
        return f" (rack 0, slot 1; DB{DB1}, {DB1_SIZE} bytes)"

    async def _listen(self, port: int) -> None:
        await asyncio.to_thread(self._start_server, port)

    def _start_server(self, port: int) -> None:
        server = _serve(self.label, self.host, port, {} if self._db_missing else {DB1: self._db}, self.faults)
        self._server = server
        self._port = server.bound_port()

    async def _close(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            await asyncio.to_thread(server.halt)


class S7Device:
    """A bare S7 PLC serving data blocks of fixed sizes (``{db_number: size or initial bytes}``) that nobody
    but its clients (and :meth:`set_bytes`) changes. A read or write past the end of a block is refused, as a
    real CPU refuses it. ``reads`` and ``writes`` list every request served since :meth:`start`."""

    label = "S7"

    def __init__(self, blocks: Mapping[int, int | bytes], *, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host = host
        self._requested_port = port
        self._port: int | None = None
        self._blocks = {n: bytearray(b) for n, b in blocks.items()}  # a size gives zeros, bytes are copied
        self._server: _Server | None = None
        self.reads: list[S7Access] = []
        self.writes: list[S7Access] = []

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("S7 device not started")
        return self._port

    @property
    def serving(self) -> bool:
        return self._server is not None

    def block(self, db_number: int) -> bytes:
        """The data block's bytes now."""
        return self._locked(db_number, lambda data: bytes(data))

    def set_bytes(self, db_number: int, offset: int, data: bytes) -> None:
        """Change bytes of a data block from outside (the PLC program, or an engineer)."""
        def put(block: bytearray) -> None:
            if offset + len(data) > len(block):
                raise ValueError(f"DB{db_number} has {len(block)} bytes; cannot set {len(data)} at {offset}")
            block[offset:offset + len(data)] = data
        self._locked(db_number, put)

    def _locked(self, db_number: int, fn: Callable[[bytearray], object]):  # noqa: ANN202
        data = self._blocks[db_number]
        server = self._server
        if server is None:
            return fn(data)
        server.lock_area(SrvArea.DB, db_number)
        try:
            return fn(data)
        finally:
            server.unlock_area(SrvArea.DB, db_number)

    async def start(self) -> int:
        if self._server is None:
            await asyncio.to_thread(self._start, self._port or self._requested_port)
        return self.port

    def _start(self, port: int) -> None:
        server = _serve(self.label, self.host, port, self._blocks)
        # The request logs live on: a restarted device appends to the same lists.
        server.reads, server.writes = self.reads, self.writes
        self._server = server
        self._port = server.bound_port()

    async def stop(self) -> None:
        """Stop answering and drop every client (the device is down); :meth:`start` brings it back."""
        server, self._server = self._server, None
        if server is not None:
            await asyncio.to_thread(server.halt)

    async def __aenter__(self) -> S7Device:
        await self.start()
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.stop()


async def start_s7(plant: Plant, host: str = "127.0.0.1", port: int = 0, **kwargs) -> S7Sim:
    """Start the S7 server; ``await sim.stop()`` when done."""
    sim = S7Sim(plant, host=host, port=port, **kwargs)
    await sim.start()
    return sim
