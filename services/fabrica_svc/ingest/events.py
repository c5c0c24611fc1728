"""One LISTEN connection per ingest process, fanned out to every WatchTagEvents watcher.

Each notification (on ``fabrica_ingest_events``, sent by any replica's write transaction at commit) sets
the current :class:`asyncio.Event` and puts a fresh one in its place. A watcher takes the current event
*before* it queries, so a notification that arrives while it queries is never lost: the event it then
waits on is already set. Watchers also wake every ``poll_interval`` whatever happens, and the hub wakes
them all after (re)connecting, so a notification missed while the connection was down only delays them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

import asyncpg

from ..runtime.tasks import cancel_and_wait
from .store import EVENTS_CHANNEL

log = logging.getLogger(__name__)


class EventHub:
    def __init__(self, dsn: str, *, poll_interval: float = 2.0, channel: str = EVENTS_CHANNEL,
                 on_lost: Callable[[str], None] | None = None):
        self.dsn = dsn
        #: Called when the connection to Postgres is lost (the app ends idle streams with it).
        self.on_lost = on_lost
        self.poll_interval = poll_interval
        self.channel = channel
        self.notifications = 0
        self._event = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.connected = asyncio.Event()

    def current(self) -> asyncio.Event:
        """The event the next notification will set. Take it before querying, then wait on it."""
        return self._event

    async def wait(self, event: asyncio.Event) -> None:
        """Wait for `event` (from :meth:`current`) or the poll interval, whichever comes first."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.poll_interval):
                await event.wait()

    def wake_all(self) -> None:
        event, self._event = self._event, asyncio.Event()
        event.set()

    def _on_notify(self, _conn: object, _pid: int, _channel: str, _payload: str) -> None:
        self.notifications += 1
        self.wake_all()

    async def start(self) -> None:
        self._task = asyncio.create_task(self._listen(), name="ingest-events-listen")

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None

    async def _listen(self) -> None:
        delay = 0.1
        while True:
            conn: asyncpg.Connection | None = None
            lost = asyncio.Event()
            was_connected = False
            try:
                conn = await asyncpg.connect(
                    self.dsn, timeout=5, server_settings={"application_name": "fabrica-ingest-listen"}
                )
                conn.add_termination_listener(lambda _c: lost.set())
                await conn.add_listener(self.channel, self._on_notify)
                self.connected.set()
                was_connected = True
                delay = 0.1
                self.wake_all()  # anything committed while we were not listening
                while not conn.is_closed():
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(self.poll_interval):
                            await lost.wait()
                    if lost.is_set():
                        break
                    async with asyncio.timeout(max(self.poll_interval, 1.0)):
                        await conn.execute("SELECT 1")  # a dead peer shows here, not as a notification
                reason = "the listening connection was closed"
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                reason = f"{type(exc).__name__}: {exc}"
                # Once per outage at WARNING; the retries while Postgres stays away at DEBUG.
                log.log(logging.WARNING if was_connected or delay == 0.1 else logging.DEBUG,
                        "event listener connection failed; reconnecting", extra={"error": reason})
            finally:
                self.connected.clear()
                if conn is not None and not conn.is_closed():
                    conn.terminate()
            if self.on_lost is not None and was_connected:
                self.on_lost(reason)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)
