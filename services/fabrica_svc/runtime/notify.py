"""Postgres LISTEN fanned out to every waiter in one process: the one LISTEN/NOTIFY implementation.

Config's WatchPlcs, production's WatchOrders and ingest's WatchTagEvents all wait on a `Listener` (the first two, and
alarm's WatchAlarms, on a `TenantListener`: wake-ups per tenant). One
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

from . import tenancy
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


def payload_tenant(payload: str) -> str | None:
    """The tenant a notification's payload names: ``<tenant>`` or ``<tenant>:<anything>`` (a revision, a
    kind); None for a payload naming none (a bare revision of an older replica), which wakes everybody."""
    tenant = payload.partition(":")[0]
    return tenant if tenancy.is_code(tenant) else None


class TenantListener(Listener):
    """A `Listener` whose notifications name their tenant (runtime/tenancy.py): a notification wakes the
    waiters of that tenant only (and those across tenants), so a watch of tenant A neither wakes nor reads
    when tenant B changes something; it could not see B's rows anyway (row-level security), and this keeps
    B's activity from even timing A's reads. A reconnect, `stop` and a payload naming no tenant wake
    everybody, as a plain `Listener` does. Config's WatchPlcs, production's WatchOrders and alarm's
    WatchAlarms wait on one; `tenant_of` reads the tenant from a payload (default: `payload_tenant`)."""

    def __init__(self, dsn: str, channel: str, *, tenant_of: Callable[[str], str | None] = payload_tenant,
                 **kwargs: object):
        super().__init__(dsn, channel, **kwargs)  # type: ignore[arg-type]
        self._tenant_of = tenant_of
        self._tenants: dict[str, asyncio.Event] = {}
        #: Notifications that woke one tenant's waiters (the rest of `notifications` woke everybody).
        self.tenant_notifications = 0

    def token(self, tenant: str | None = None) -> asyncio.Event:
        """What the next wake-up of `tenant` (default: the running task's) sets; a task of no single tenant
        (none, or across tenants) takes the token every wake-up sets."""
        tenant = tenant if tenant is not None else tenancy.current()
        if tenant is None or tenant == tenancy.ALL:
            return super().token()
        event = self._tenants.get(tenant)
        if event is None:
            event = self._tenants[tenant] = asyncio.Event()
        return event

    def for_tenant(self, tenant: str) -> TenantWaits:
        """`tenant`'s side of the listener, shaped like a `Listener` (for runtime/watch.py's loop)."""
        return TenantWaits(self, tenant)

    def wake_tenant(self, tenant: str) -> None:
        """Wake the waiters of `tenant`, and those across tenants."""
        event = self._tenants.pop(tenant, None)
        if event is not None:
            event.set()
        super().wake_all()

    def wake_all(self) -> None:
        super().wake_all()
        events, self._tenants = self._tenants, {}
        for event in events.values():
            event.set()

    def _on_notify(self, _conn: object, _pid: int, _channel: str, payload: str) -> None:
        self.notifications += 1
        tenant = self._tenant_of(payload)
        if tenant is None:
            self.wake_all()
        else:
            self.tenant_notifications += 1
            self.wake_tenant(tenant)


class TenantWaits:
    """One tenant's side of a `TenantListener`: `token` and `wait` as a `Listener` has them."""

    def __init__(self, listener: TenantListener, tenant: str):
        self.listener = listener
        self.tenant = tenant

    def token(self) -> asyncio.Event:
        return self.listener.token(self.tenant)

    async def wait(self, token: asyncio.Event, timeout: float | None = None) -> bool:
        return await self.listener.wait(token, timeout)
