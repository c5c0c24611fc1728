"""What ingest knows of the tenants: their quotas and retention policies, polled from config's ListTenants.

A minimal directory (the rollup helper's; the ingest helper's quota work shares the same name and methods:
``quota(tenant)``, ``retention(tenant)``, ``start()``, ``stop()``). Every ``interval`` (10 s) it lists the
tenants from config (``peer_channel(settings.config_addr, settings, tenant="*")``, every page) and keeps
the last list it got:

- no config address, or config answers UNIMPLEMENTED (a config that does not serve tenants yet): no tenant
  is known, so no quota applies and everything is kept forever (retention None);
- any other failure (config away, UNAVAILABLE): the last known list stays (quotas and retention do not
  flap while config restarts).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable

import grpc

from fabrica.config.v1 import config_service_pb2 as config_pb
from fabrica.config.v1 import config_service_pb2_grpc as config_grpc
from fabrica.config.v1 import tenant_pb2

from ..runtime.channels import peer_channel
from ..runtime.settings import Settings
from ..runtime.tasks import cancel_and_wait

log = logging.getLogger(__name__)

POLL_SECONDS = 10.0
_PAGE = 500


class TenantDirectory:
    """Tenants by code, as config last listed them."""

    def __init__(self, settings: Settings | None, *, interval: float = POLL_SECONDS,
                 tenants: Iterable[tenant_pb2.Tenant] | None = None):
        self.settings = settings
        self.interval = interval
        self._tenants: dict[str, tenant_pb2.Tenant] = {t.code: t for t in tenants or ()}
        self._task: asyncio.Task[None] | None = None
        self._channel: grpc.aio.Channel | None = None

    # --- what ingest asks -----------------------------------------------------------------------------

    def codes(self) -> list[str]:
        """Every known tenant's code, sorted."""
        return sorted(self._tenants)

    def tenant(self, code: str) -> tenant_pb2.Tenant | None:
        return self._tenants.get(code)

    def quota(self, code: str) -> tenant_pb2.TenantQuota | None:
        """The tenant's quotas (0 in a field: unlimited), None when the tenant is not known (unlimited)."""
        t = self._tenants.get(code)
        return t.quota if t is not None and t.HasField("quota") else None

    def retention(self, code: str) -> tenant_pb2.RetentionPolicy | None:
        """The tenant's retention (0 days: forever), None when not known (everything is kept)."""
        t = self._tenants.get(code)
        return t.retention if t is not None and t.HasField("retention") else None

    def replace(self, tenants: Iterable[tenant_pb2.Tenant]) -> None:
        """Take `tenants` as the whole list (what a poll does)."""
        self._tenants = {t.code: t for t in tenants}

    # --- polling --------------------------------------------------------------------------------------

    async def refresh(self) -> bool:
        """List the tenants from config once; True when the list was replaced."""
        address = self.settings.config_addr if self.settings is not None else ""
        if not address:
            self._tenants = {}
            return True
        if self._channel is None:
            self._channel = peer_channel(address, self.settings, tenant="*")
        stub = config_grpc.ConfigServiceStub(self._channel)
        found: list[tenant_pb2.Tenant] = []
        token = ""
        try:
            while True:
                page = await stub.ListTenants(config_pb.ListTenantsRequest(page_size=_PAGE, page_token=token),
                                              timeout=10)
                found.extend(page.tenants)
                token = page.next_page_token
                if not token:
                    break
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
                self._tenants = {}
                return True
            log.info("could not list tenants from config; keeping the last known",
                     extra={"error": f"{exc.code().name}: {exc.details()}"})
            return False
        self.replace(found)
        return True

    async def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="ingest-tenants")

    async def _loop(self) -> None:
        while True:
            try:
                await self.refresh()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # never let the poll die
                log.warning("tenant poll failed", extra={"error": f"{type(exc).__name__}: {exc}"})
            await asyncio.sleep(self.interval)

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None
        if self._channel is not None:
            await self._channel.close()
            self._channel = None
