"""What a service knows of each tenant from config: whether it is active, its quotas and its retention.

`TenantDirectory` polls config's ``ListTenants`` (every ``interval``, 10 s by default, all pages, as an
installation-wide caller: ``peer_channel(settings.config_addr, settings, tenant="*")``) and keeps the last
list it read completely. Ingest reads the readings-per-second quota and the retention from it; ingest,
production and alarm refuse the callers of a suspended tenant with it (runtime/server.py passes
:meth:`TenantDirectory.active` to the interceptor: PERMISSION_DENIED, reason TENANT_INACTIVE).

What it answers for a tenant it does not know (config not configured, not reached yet, a tenant created
since the last poll, or a config that does not serve ListTenants yet: UNIMPLEMENTED) is the permissive
default: active, no quota (``readings_per_second`` 0) and keep-forever retention (all days 0). So no
service refuses a tenant because config is away; a suspension, a quota or a retention takes effect within
one interval of being set, and a config outage keeps the values last read.

A poll that fails (UNAVAILABLE, a deadline, anything) keeps the previous list and is retried at the next
interval; it is logged once per change of state, not at every poll. A partial read (a later page failed) is
dropped whole, so a tenant never loses its values because its page was not reached.

Tests and benchmarks may set a tenant's values directly with :meth:`TenantDirectory.set` (what a poll would
have learned); the next successful poll replaces them with config's.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable, Mapping

import grpc

from fabrica.config.v1 import config_service_pb2 as config_pb
from fabrica.config.v1 import config_service_pb2_grpc as config_grpc
from fabrica.config.v1 import tenant_pb2

from ..runtime import tenancy
from ..runtime.channels import peer_channel
from ..runtime.settings import Settings
from ..runtime.tasks import cancel_and_wait

log = logging.getLogger(__name__)

#: How often the directory asks config for the tenants, in seconds.
POLL_INTERVAL = 10.0
#: Tenants per ListTenants page (the contract's largest page).
PAGE_SIZE = 500
#: A poll that takes longer than this is abandoned (and retried at the next interval).
POLL_TIMEOUT = 10.0

#: A config that does not (yet) serve the tenants, or is not there: "no tenants known", not an error.
_NOT_KNOWN_YET = (grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.UNAVAILABLE)


def _unlimited() -> tenant_pb2.TenantQuota:
    return tenant_pb2.TenantQuota()


def _forever() -> tenant_pb2.RetentionPolicy:
    return tenant_pb2.RetentionPolicy()


class TenantDirectory:
    """The tenants' state, quotas and retention as config last told them (see the module docstring).

    `channel_factory` makes the channel to config (default: ``peer_channel(config_addr, settings,
    tenant="*")``); with no `config_addr` nothing is polled and every tenant is active, unlimited and kept
    for ever.
    """

    def __init__(self, settings: Settings | None = None, *, config_addr: str | None = None,
                 interval: float = POLL_INTERVAL, page_size: int = PAGE_SIZE,
                 channel_factory: Callable[[], grpc.aio.Channel] | None = None,
                 tenants: Iterable[tenant_pb2.Tenant] | None = None):
        self.settings = settings
        self.config_addr = config_addr if config_addr is not None else (settings.config_addr if settings else "")
        self.interval = interval
        self.page_size = page_size
        self._channel_factory = channel_factory
        #: `tenants`: what is known before the first poll (tests).
        self._tenants: dict[str, tenant_pb2.Tenant] = {t.code: t for t in tenants or ()}
        self._channel: grpc.aio.Channel | None = None
        self._task: asyncio.Task[None] | None = None
        self._state = ""  # what the last poll logged ("ok", or the failure), so each change is logged once
        #: Polls that completed (every page read); tests wait on it.
        self.polls = 0
        self._polled = asyncio.Event()

    # --- answers --------------------------------------------------------------------------------------

    def active(self, tenant: str) -> bool:
        """False only for a tenant config has said is suspended (inactive); True for one not known."""
        known = self._tenants.get(tenant)
        return known is None or known.active

    def quota(self, tenant: str) -> tenant_pb2.TenantQuota:
        """`tenant`'s quotas; all 0 (no limit) for a tenant not known."""
        known = self._tenants.get(tenant)
        return known.quota if known is not None and known.HasField("quota") else _unlimited()

    def retention(self, tenant: str) -> tenant_pb2.RetentionPolicy:
        """`tenant`'s retention; all 0 (keep for ever) for a tenant not known."""
        known = self._tenants.get(tenant)
        return known.retention if known is not None and known.HasField("retention") else _forever()

    def known(self) -> list[str]:
        """The codes of the tenants known, sorted."""
        return sorted(self._tenants)

    def set(self, tenant: str, *, quota: tenant_pb2.TenantQuota | None = None,
            retention: tenant_pb2.RetentionPolicy | None = None, active: bool | None = None) -> None:
        """Set what is known of `tenant` (as if a poll had read it; the next poll replaces it)."""
        if not tenancy.is_code(tenant):
            raise ValueError(f"not a tenant code: {tenant!r}")
        entry = tenant_pb2.Tenant()
        entry.CopyFrom(self._tenants.get(tenant, tenant_pb2.Tenant(code=tenant, active=True)))
        if quota is not None:
            entry.quota.CopyFrom(quota)
        if retention is not None:
            entry.retention.CopyFrom(retention)
        if active is not None:
            entry.active = active
        self._replace({**self._tenants, tenant: entry})

    # --- polling --------------------------------------------------------------------------------------

    @property
    def enabled(self) -> bool:
        """Whether there is a config to poll."""
        return bool(self.config_addr) or self._channel_factory is not None

    async def start(self) -> None:
        """Start polling (the first poll right away, in the background: start-up never waits for config)."""
        if not self.enabled or self._task is not None:
            return
        self._task = asyncio.create_task(self._loop(), name="tenant-directory")

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None
        channel, self._channel = self._channel, None
        if channel is not None:
            await channel.close()

    async def wait_polled(self) -> None:
        """Until a poll has completed (tests)."""
        await self._polled.wait()

    async def poll_once(self) -> bool:
        """Read every page of ListTenants and keep the result; False (and the previous list kept) when config
        could not be read."""
        if not self.enabled:
            return False
        if self._channel is None:
            self._channel = (self._channel_factory() if self._channel_factory is not None
                             else peer_channel(self.config_addr, self.settings, tenant=tenancy.ALL))
        stub = config_grpc.ConfigServiceStub(self._channel)
        found: dict[str, tenant_pb2.Tenant] = {}
        token = ""
        try:
            while True:
                page = await stub.ListTenants(config_pb.ListTenantsRequest(page_size=self.page_size, page_token=token),
                                              timeout=POLL_TIMEOUT)
                for t in page.tenants:
                    found[t.code] = t
                token = page.next_page_token
                if not token:
                    break
        except grpc.aio.AioRpcError as exc:
            code = exc.code()
            state = (f"config serves no tenants yet ({code.name}): every tenant unlimited"
                     if code in _NOT_KNOWN_YET else f"ListTenants failed: {code.name}: {exc.details()}")
            self._log_state(state, logging.INFO if code in _NOT_KNOWN_YET else logging.WARNING)
            return False
        self._replace(found)
        self._log_state("ok", logging.INFO)
        self.polls += 1
        self._polled.set()
        return True

    async def _loop(self) -> None:
        while True:
            try:
                await self.poll_once()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # never let the directory die: keep the last known, retry later
                self._log_state(f"polling the tenants failed: {type(exc).__name__}: {exc}", logging.WARNING)
            await asyncio.sleep(self.interval)

    def _replace(self, tenants: Mapping[str, tenant_pb2.Tenant]) -> None:
        self._tenants = dict(tenants)

    def _log_state(self, state: str, level: int) -> None:
        if state != self._state:
            self._state = state
            if state == "ok":
                log.log(level, "tenants read from config", extra={"tenants": len(self._tenants)})
            else:
                log.log(level, state)


def directory_of(tenants: Iterable[tenant_pb2.Tenant]) -> TenantDirectory:
    """A directory that knows `tenants` and polls nothing (tests, benchmarks)."""
    d = TenantDirectory(config_addr="")
    d._replace({t.code: t for t in tenants})
    return d


__all__ = ["POLL_INTERVAL", "TenantDirectory", "directory_of"]
