"""The LISTEN/NOTIFY fan-out of config's changes, per tenant.

Each change is announced on ``fabrica_config_changes`` with the payload ``<tenant>:<revision>``
(store.py), and a change of the tenant itself (UpdateTenant) with ``<tenant>:tenant``. A waiter takes
its token in the tenant of its RPC (runtime/tenancy.py ``current``), and a notification wakes that tenant's waiters only: a WatchPlcs of tenant A is not woken, and reads nothing,
when tenant B changes a PLC. A reconnect of the LISTEN connection (or `stop`) wakes every tenant's
waiters, as runtime/notify.py's Listener does, since a change of any tenant may have been missed.
"""

from __future__ import annotations

import asyncio

from ..runtime import tenancy
from ..runtime.notify import Listener


class TenantListener(Listener):
    """runtime/notify.py's Listener whose wake-ups go to the waiters of the notified tenant only."""

    def __init__(self, *args: object, **kwargs: object):
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self._tenants: dict[str, asyncio.Event] = {}

    def token(self) -> asyncio.Event:
        tenant = tenancy.current() or ""
        event = self._tenants.get(tenant)
        if event is None:
            event = self._tenants[tenant] = asyncio.Event()
        return event

    def wake(self, tenant: str) -> None:
        """Wake the waiters of `tenant` (a tenant code)."""
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
        tenant, sep, _revision = payload.partition(":")
        if sep:
            self.wake(tenant)
        else:  # not ours (an older replica's bare revision): whose it is is unknown, so everyone looks
            self.wake_all()
