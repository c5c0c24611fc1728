"""WatchOrders' wake-ups, per tenant: a notification of tenant A's revision wakes A's watchers only.

Every order revision is announced with ``NOTIFY fabrica_production_orders, '<tenant>:<revision>'``
(store/common.py notify). `TenantListener` is the runtime's one LISTEN connection (runtime/notify.py
``Listener``: reconnects, half-open checks, a wake-up of everyone after each reconnect) with its fan-out
split by the tenant the payload names, and `for_tenant` gives a watch (runtime/watch.py) the token and wait
of one tenant. A watcher of B is not woken by A's changes: it neither reads nor sends anything for them,
so it cannot even time them. (What it would read is its own tenant's rows anyway: row-level security.)
A payload without a tenant (none is sent) wakes everyone, as a reconnect does.
"""

from __future__ import annotations

import asyncio
from typing import Any

from ..runtime.notify import Listener
from .store.common import notice_tenant


class TenantListener(Listener):
    """A `Listener` whose notifications wake the waiters of the tenant they name."""

    def __init__(self, dsn: str, channel: str, **kwargs: Any):  # noqa: ANN401 - Listener's keywords
        super().__init__(dsn, channel, **kwargs)
        self._tenants: dict[str, asyncio.Event] = {}

    def tenant_token(self, tenant: str) -> asyncio.Event:
        """What the next wake-up of `tenant` sets. Take it before reading the database, then `wait` on it."""
        event = self._tenants.get(tenant)
        if event is None:
            event = self._tenants[tenant] = asyncio.Event()
        return event

    def wake_tenant(self, tenant: str) -> None:
        event = self._tenants.pop(tenant, None)
        if event is not None:
            event.set()

    def wake_all(self) -> None:
        super().wake_all()
        events, self._tenants = self._tenants, {}
        for event in events.values():
            event.set()

    def _on_notify(self, _conn: object, _pid: int, _channel: str, payload: str) -> None:
        self.notifications += 1
        tenant = notice_tenant(payload)
        if tenant is None:
            self.wake_all()
        else:
            self.wake_tenant(tenant)

    def for_tenant(self, tenant: str) -> TenantWaits:
        return TenantWaits(self, tenant)


class TenantWaits:
    """One tenant's side of a `TenantListener`, shaped like a `Listener` for runtime/watch.py's loop."""

    def __init__(self, listener: TenantListener, tenant: str):
        self.listener = listener
        self.tenant = tenant

    def token(self) -> asyncio.Event:
        return self.listener.tenant_token(self.tenant)

    async def wait(self, token: asyncio.Event, timeout: float | None = None) -> bool:
        return await self.listener.wait(token, timeout)
