"""Postgres LISTEN fanned out to many waiters in one process.

One dedicated connection listens on a channel; every notification wakes all current waiters. A waiter
takes `listener.token()` *before* reading the database and then `await listener.wait(token, timeout)`:
a notification that arrives between the read and the wait is never lost. The connection is re-opened
with backoff when it drops; while it is down, waiters fall back to their timeout (callers poll).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import asyncpg

from .tasks import cancel_and_wait

log = logging.getLogger(__name__)


class Listener:
    def __init__(self, dsn: str, channel: str, *, retry_delay: float = 1.0):
        self.dsn = dsn
        self.channel = channel
        self.retry_delay = retry_delay
        self._event = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.connected = asyncio.Event()

    def token(self) -> asyncio.Event:
        return self._event

    async def wait(self, token: asyncio.Event, timeout: float) -> bool:
        """Wait until a notification newer than `token`, or `timeout` seconds; True if notified."""
        try:
            async with asyncio.timeout(timeout):
                await token.wait()
            return True
        except TimeoutError:
            return False

    def _notify(self, *_args: object) -> None:
        event, self._event = self._event, asyncio.Event()
        event.set()

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"listen-{self.channel}")

    async def _run(self) -> None:
        delay = self.retry_delay
        while True:
            conn: asyncpg.Connection | None = None
            try:
                conn = await asyncpg.connect(self.dsn, timeout=10)
                lost = asyncio.Event()
                conn.add_termination_listener(lambda _c: lost.set())
                await conn.add_listener(self.channel, self._notify)
                self.connected.set()
                delay = self.retry_delay
                self._notify()  # anything may have happened while we were not listening
                await lost.wait()
                log.warning("LISTEN connection lost", extra={"channel": self.channel})
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # unreachable database: retry with backoff
                log.warning("cannot LISTEN: %s", exc, extra={"channel": self.channel})
            finally:
                self.connected.clear()
                if conn is not None:
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(conn.close(), timeout=2)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 15.0)

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        self._notify()
