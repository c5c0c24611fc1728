"""What every simulated PLC server (Modbus TCP, Modbus RTU-over-TCP, S7) does the same way.

It binds its port (``port=0``: an ephemeral one, told by :attr:`SimServer.port` after :meth:`SimServer.start`),
steps the plant and rewrites what it serves every ``refresh_interval`` seconds, stops answering on
:meth:`SimServer.pause` (the listener and every client connection closed: clients see connection errors) and
listens again on the same port on :meth:`SimServer.resume`. A protocol supplies how to listen and close
(:meth:`SimServer._listen`, :meth:`SimServer._close`) and how to rewrite its image (:meth:`SimServer.refresh`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any, Self

from .plant import Plant, PlantSnapshot


class SimServer:
    """One simulated PLC server fed from ``plant``; subclasses speak the protocol."""

    #: What it speaks, in messages ("Modbus TCP", "S7").
    label: str
    #: Its protocol's short name, in the refresh task's name ("modbus_tcp", "s7").
    protocol: str

    def __init__(self, plant: Plant, *, host: str, port: int, refresh_interval: float,
                 clock: Callable[[], float]) -> None:
        if refresh_interval <= 0:
            raise ValueError("refresh_interval must be > 0")
        self.plant = plant
        self.host = host
        self.refresh_interval = refresh_interval
        self._clock = clock
        self._requested_port = port
        self._port: int | None = None
        #: The protocol's server object while it listens (None when stopped or paused).
        self._server: Any = None
        self._task: asyncio.Task | None = None
        self._paused = False
        self._log = logging.getLogger(type(self).__module__)

    # --- what a protocol supplies -----------------------------------------------------

    def refresh(self) -> PlantSnapshot:
        """Step the plant to the clock's now and rewrite what the server answers with."""
        raise NotImplementedError

    async def _listen(self, port: int) -> None:
        """Serve on `port` (0: any); set ``_server`` and ``_port``. ListenError when it cannot bind."""
        raise NotImplementedError

    async def _close(self) -> None:
        """Close the listener and every client connection; set ``_server`` to None."""
        raise NotImplementedError

    def _details(self) -> str:
        """What the start-up log line says about the device after its address."""
        return ""

    # --- state ------------------------------------------------------------------------

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
        self._log.debug("%s listening on %s:%d (%s)", self.label, self.host, self.port, self._details())
        return self.port

    async def stop(self) -> None:
        """Stop serving and the refresh timer. Idempotent."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self._close()
        self._paused = False

    async def pause(self) -> None:
        """Stop answering: close the listener and every client connection."""
        if self._task is None or self._paused:
            return
        self._paused = True
        await self._close()
        self._log.debug("%s on port %d paused", self.label, self.port)

    async def resume(self) -> None:
        """Listen again on the same port after :meth:`pause`."""
        if self._task is None or not self._paused:
            return
        await self._listen(self.port)
        self._paused = False
        self._log.debug("%s on port %d resumed", self.label, self.port)

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def _refresh_loop(self) -> None:
        while True:
            await asyncio.sleep(self.refresh_interval)
            try:
                self.refresh()
            except Exception:  # keep serving the last image
                self._log.exception("%s refresh failed", self.label)
