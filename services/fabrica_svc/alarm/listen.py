"""WatchAlarms' wake-ups, per tenant: runtime/notify.py's Listener, whose notifications name their tenant.

Every alarm event (and rule change) NOTIFYs the alarm channel with the tenant it was committed in as the
payload (store.insert_events: ``pg_notify(channel, session_tenant())``). A watcher takes its token in its
request's tenant (runtime/tenancy.py ``current``), and a notification wakes only the watchers of its tenant:
a WatchAlarms of one tenant neither wakes nor reads when another tenant's alarm changes. (It could not see
the change anyway: its reads are scoped by row-level security; this keeps another tenant's activity from
even timing its reads.) What wakes everybody still does: a reconnect of the LISTEN connection, `stop`, and a
notification without a tenant code.
"""

from __future__ import annotations

import asyncio

from ..runtime import tenancy
from ..runtime.notify import Listener


class TenantListener(Listener):
    """A `Listener` whose tokens and wake-ups are per tenant (see the module docstring)."""

    def __init__(self, *args: object, **kwargs: object):
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self._tenants: dict[str, asyncio.Event] = {}
        #: Notifications that woke one tenant's watchers (the rest of `notifications` woke everybody).
        self.tenant_notifications = 0

    def token(self) -> asyncio.Event:
        """What the next wake-up of the running task's tenant sets (installation-wide or no tenant: any)."""
        tenant = tenancy.current()
        if tenant is None or tenant == tenancy.ALL:
            return super().token()
        event = self._tenants.get(tenant)
        if event is None:
            event = self._tenants[tenant] = asyncio.Event()
        return event

    def wake_tenant(self, tenant: str) -> None:
        """Wake the watchers of `tenant` (and those of no single tenant)."""
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
        if payload and tenancy.is_code(payload):
            self.tenant_notifications += 1
            self.wake_tenant(payload)
        else:
            self.wake_all()
