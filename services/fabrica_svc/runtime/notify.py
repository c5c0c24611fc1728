"""Postgres LISTEN fanned out to every waiter in one process: the one LISTEN/NOTIFY implementation.

Config's WatchPlcs, production's WatchOrders and ingest's WatchTagEvents all wait on a `Listener`. One
dedicated connection listens on a channel, and every notification wakes all current waiters. A waiter takes
`listener.token()` *before* it reads the database, then ``await listener.wait(token)``: a notification that
arrives between the read and the wait is never lost, because the token it then waits on is already set.

The connection is watched two ways. asyncpg's termination callback sees the server close it (a restart,
``pg_terminate_backend``). A half-open connection (the peer vanished without closing it: a cable, a NAT
entry, a frozen host) raises nothing and just stops delivering notifications, so every `check_interval`
seconds the listener also sends ``SELECT 1``, which must answer within ``max(check_interval, 1)`` seconds.
Either way the connection is dropped, `on_lost(reason)` is called (ingest ends its idle streams with it),
and a new connection is opened, waiting between attempts by the runtime's retry policy (`SERVICE_RETRY`).
After each (re)connect every waiter is woken once, as if notified, so its next query reads whatever was
committed while nobody listened. While the connection is down, waiters fall back to their timeout: they poll.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

import asyncpg

from .retry import SERVICE_RETRY, RetryPolicy
from .tasks import cancel_and_wait

log = logging.getLogger(__name__)

#: Seconds to open the LISTEN connection before the attempt counts as failed.
CONNECT_TIMEOUT = 5.0


class Listener:
    """One LISTEN connection on `channel`, fanned out to every waiter of this process.

    `poll_interval` is how long `wait` waits when not given a timeout; `on_lost` is called with a reason each
    time a connection that was listening is lost. The counters (`notifications`, `connects`, `waiting`,
    `woken`) say what it did, for status and tests.
    """

    def __init__(self, dsn: str, channel: str, *, poll_interval: float = 2.0, check_interval: float = 2.0,
                 on_lost: Callable[[str], None] | None = None, retry: RetryPolicy = SERVICE_RETRY,
                 application_name: str = "fabrica-listen"):
        self.dsn = dsn
        self.channel = channel
        self.poll_interval = poll_interval
        self.check_interval = check_interval
        self.on_lost = on_lost
        self.retry = retry
        self.application_name = application_name
        #: Set while a connection is listening.
        self.connected = asyncio.Event()
        #: The listening connection's backend process id, while it is connected.
        self.backend_pid: int | None = None
        #: Notifications received.
        self.notifications = 0
        #: Connections that started listening (the first one and each reconnect).
        self.connects = 0
        #: Waiters blocked in `wait` right now.
        self.waiting = 0
        #: Waits that ended with a wake-up (a notification, a reconnect, `stop`) rather than their timeout.
        self.woken = 0
        self._event = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def token(self) -> asyncio.Event:
        """What the next wake-up sets. Take it before reading the database, then `wait` on it."""
        return self._event

    async def wait(self, token: asyncio.Event, timeout: float | None = None) -> bool:
        """Wait for a wake-up newer than `token`, or `timeout` seconds (default `poll_interval`).

        True if woken, False on timeout: either way the caller reads the database again."""
        self.waiting += 1
        try:
            async with asyncio.timeout(self.poll_interval if timeout is None else timeout):
                await token.wait()
        except TimeoutError:
            return False
        finally:
            self.waiting -= 1
        self.woken += 1
        return True

    def wake_all(self) -> None:
        """Wake every current waiter."""
        event, self._event = self._event, asyncio.Event()
        event.set()

    def _on_notify(self, _conn: object, _pid: int, _channel: str, _payload: str) -> None:
        self.notifications += 1
        self.wake_all()

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"listen-{self.channel}")

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None
        self.wake_all()  # nobody waits out a timeout for a listener that is gone

    async def _run(self) -> None:
        backoff = self.retry.backoff()
        while True:
            conn: asyncpg.Connection | None = None
            listening = False
            try:
                conn = await asyncpg.connect(self.dsn, timeout=CONNECT_TIMEOUT,
                                             server_settings={"application_name": self.application_name})
                lost = asyncio.Event()
                conn.add_termination_listener(lambda _c: lost.set())
                await conn.add_listener(self.channel, self._on_notify)
                listening = True
                self.connects += 1
                self.backend_pid = conn.get_server_pid()
                self.connected.set()
                backoff.reset()
                self.wake_all()  # anything committed while nobody listened
                reason = await self._until_lost(conn, lost)
                log.warning("LISTEN connection lost; reconnecting",
                            extra={"channel": self.channel, "error": reason})
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                reason = f"{type(exc).__name__}: {exc}"
                # Once per outage at WARNING; the retries while Postgres stays away at DEBUG.
                log.log(logging.WARNING if listening or backoff.failures == 0 else logging.DEBUG,
                        "LISTEN connection failed; reconnecting", extra={"channel": self.channel, "error": reason})
            finally:
                self.connected.clear()
                self.backend_pid = None
                if conn is not None and not conn.is_closed():
                    conn.terminate()  # not close(): a half-open connection would not answer it
            if listening and self.on_lost is not None:
                self.on_lost(reason)
            await backoff.wait()

    async def _until_lost(self, conn: asyncpg.Connection, lost: asyncio.Event) -> str:
        """Return, with the reason, once the listening connection is closed or no longer answers."""
        check_timeout = max(self.check_interval, 1.0)
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.check_interval):
                    await lost.wait()
            if lost.is_set() or conn.is_closed():
                return "the server closed the LISTEN connection"
            try:
                async with asyncio.timeout(check_timeout):
                    await conn.execute("SELECT 1")  # a dead peer shows here, never as a notification
            except TimeoutError:
                return f"no answer to a check within {check_timeout:g} s (a half-open connection)"
