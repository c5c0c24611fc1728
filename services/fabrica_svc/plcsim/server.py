"""What every simulated PLC server has in common: its life cycle and the ways it can answer badly.

:class:`SimServer` is the base of :class:`~.modbus.ModbusSim` and :class:`~.s7.S7Sim`. It owns

* the life cycle: :meth:`~SimServer.start` (bind, then a timer steps the plant every
  ``refresh_interval`` seconds and rebuilds the served image), :meth:`~SimServer.stop`,
  :meth:`~SimServer.pause` (close the listener and every connection: clients get connection
  errors) and :meth:`~SimServer.resume` (listen again on the same port);
* the answer faults every protocol shares (:class:`AnswerFaults`): answer ``delay`` seconds late
  (:meth:`~SimServer.set_delay`), or not at all until the test says so (:meth:`~SimServer.hold`,
  :meth:`~SimServer.release`), with a count of the requests received and of those held right now,
  so that a test can wait for "the client's request is outstanding" instead of for a time.

A subclass says how to listen (``_listen(port)``, which sets ``_server`` and ``_port``), how to stop
listening (``_close()``) and how to turn a plant snapshot into what it serves (``refresh()``).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

from .plant import Plant, PlantSnapshot
from ..runtime.tasks import cancel_and_wait

__all__ = ["AnswerFaults", "SimServer"]

log = logging.getLogger(__name__)


class AnswerFaults:
    """When a server answers a request: at once, ``delay`` seconds late, or not before :meth:`release`.

    Used from the event loop (the Modbus servers, :meth:`before_answer`) and from server threads (the
    S7 server's client threads, :meth:`before_answer_blocking`), hence the thread-safe state.
    """

    #: Seconds between two looks at the gate while an answer is held on the event loop.
    POLL = 0.005

    def __init__(self) -> None:
        self._open = threading.Event()
        self._open.set()
        self._lock = threading.Lock()
        self._delay = 0.0
        self._received = 0
        self._waiting = 0

    @property
    def delay(self) -> float:
        return self._delay

    @delay.setter
    def delay(self, seconds: float) -> None:
        self._delay = max(0.0, float(seconds))

    @property
    def held(self) -> bool:
        """Answers wait for :meth:`release`."""
        return not self._open.is_set()

    @property
    def received(self) -> int:
        """Requests received so far (answered or not)."""
        return self._received

    @property
    def waiting(self) -> int:
        """Requests held right now."""
        return self._waiting

    def hold(self) -> None:
        """From now on every answer waits until :meth:`release` (requests already answered are not affected)."""
        self._open.clear()

    def release(self) -> None:
        """Let the held answers go, and answer at once again."""
        self._open.set()

    def _count(self, received: int = 0, waiting: int = 0) -> None:
        with self._lock:
            self._received += received
            self._waiting += waiting

    async def before_answer(self) -> None:
        """Called on the event loop before a request is answered."""
        self._count(received=1)
        if self._delay:
            await asyncio.sleep(self._delay)
        if self._open.is_set():
            return
        self._count(waiting=1)
        try:
            while not self._open.is_set():  # ends with release(); stop() releases
                await asyncio.sleep(self.POLL)
        finally:
            self._count(waiting=-1)

    def before_answer_blocking(self) -> None:
        """Called in a server thread before a request is answered."""
        self._count(received=1)
        if self._delay:
            time.sleep(self._delay)
        if self._open.is_set():
            return
        self._count(waiting=1)
        try:
            self._open.wait()
        finally:
            self._count(waiting=-1)


class SimServer(ABC):
    """One simulated PLC server fed from ``plant``. ``port=0`` binds an ephemeral port."""

    label = "PLC"

    def __init__(
        self,
        plant: Plant,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        refresh_interval: float = 0.1,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if refresh_interval <= 0:
            raise ValueError("refresh_interval must be > 0")
        self.plant = plant
        self.host = host
        self.refresh_interval = refresh_interval
        self.faults = AnswerFaults()
        self._clock = clock
        self._requested_port = port
        self._port: int | None = None
        self._server: Any = None
        self._task: asyncio.Task | None = None
        self._paused = False

    # --- properties -------------------------------------------------------------------

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

    # --- life cycle -------------------------------------------------------------------

    async def start(self) -> int:
        """Bind and serve; return the bound port."""
        if self._task is not None:
            return self.port
        self.refresh()
        await self._listen(self._requested_port)
        self._task = asyncio.create_task(self._refresh_loop(), name=f"plcsim {self.label} refresh")
        log.debug("%s listening on %s:%d%s", self.label, self.host, self.port, self._details())
        return self.port

    async def stop(self) -> None:
        """Stop serving and the refresh timer; held answers are let go. Idempotent."""
        task, self._task = self._task, None
        await cancel_and_wait(task)
        self.faults.release()
        await self._close()
        self._paused = False

    async def pause(self) -> None:
        """Stop answering: close the listener and every client connection."""
        if self._task is None or self._paused:
            return
        self._paused = True
        await self._close()
        log.debug("%s on port %d paused", self.label, self.port)

    async def resume(self) -> None:
        """Listen again on the same port after :meth:`pause`."""
        if self._task is None or not self._paused:
            return
        await self._listen(self.port)
        self._paused = False
        log.debug("%s on port %d resumed", self.label, self.port)

    # --- answer faults ----------------------------------------------------------------

    def set_delay(self, seconds: float) -> None:
        """Delay every answer by ``seconds`` (0 disables)."""
        self.faults.delay = seconds

    def hold(self) -> None:
        """Answer nothing until :meth:`release` (see :class:`AnswerFaults`)."""
        self.faults.hold()

    def release(self) -> None:
        self.faults.release()

    # --- plant ------------------------------------------------------------------------

    def step_plant(self) -> PlantSnapshot:
        """Step the plant to the clock's now."""
        return self.plant.step(self._clock())

    @abstractmethod
    def refresh(self) -> PlantSnapshot:
        """Step the plant to the clock's now and rebuild what the server serves."""

    async def __aenter__(self) -> Any:
        await self.start()
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.stop()

    # --- internals --------------------------------------------------------------------

    def _details(self) -> str:
        """Extra words for the "listening" log line."""
        return ""

    @abstractmethod
    async def _listen(self, port: int) -> None:
        """Bind ``port`` (0: any) and serve; set ``_server`` and ``_port``."""

    @abstractmethod
    async def _close(self) -> None:
        """Close the listener and every connection; clear ``_server``."""

    async def _refresh_loop(self) -> None:
        while True:
            await asyncio.sleep(self.refresh_interval)
            try:
                self.refresh()
            except Exception:  # keep serving the last image
                log.exception("%s refresh failed", self.label)
