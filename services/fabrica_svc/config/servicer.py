"""ConfigService over gRPC: translates requests to the domain and the store. No SQL here.

Tenants. Every RPC works in the tenant of the call (runtime/tenancy.py): the caller's own, or the one an
installation-wide caller names with ``x-fabrica-tenant`` (``default`` without it). The store's row-level
security keeps each statement inside it, so another tenant's PLC or collector is NOT_FOUND and never listed
or watched. PLCs, collectors and WatchPlcs need one tenant: an installation-wide call across tenants
(``*``, e.g. a service certificate without the header) is INVALID_ARGUMENT naming the header. A tenant that
does not exist is NOT_FOUND (reason TENANT_NOT_FOUND). The callers of an inactive tenant are refused on
every config RPC (PERMISSION_DENIED, reason TENANT_INACTIVE); installation-wide callers acting in it are not
(they suspended it and may still look and clean up). Ingest, production and alarm refuse them too, from
config's ListTenants polled by their tenant directory (runtime/tenants.py, within its poll interval).

The tenant RPCs: CreateTenant and UpdateTenant are for installation-wide admins only (PERMISSION_DENIED,
reason INSTALLATION_ADMIN_REQUIRED, for anybody else, a tenant's own admin included). GetTenant and
ListTenants run across tenants (``tenancy.system()``) for an installation-wide caller, and in the caller's
tenant otherwise, where the ``tenants`` table's policy shows that tenant's row only: another code is
NOT_FOUND.

Device profiles: the built-in ones (profiles.py) are every tenant's (``built_in``), and reserve their ids in
every tenant; a tenant's own (CreateDeviceProfile) are rows under the same row-level security as its PLCs,
so another tenant's profile is NOT_FOUND for Get, Delete and CreatePlcFromProfile and never listed. Their
poll groups and tags are checked with the PLC/tag model's rules (domain.profile_violations).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import AsyncIterator

import grpc
from fabrica.config.v1 import config_service_pb2 as pb
from fabrica.config.v1 import config_service_pb2_grpc as pb_grpc
from fabrica.config.v1 import device_profile_pb2, plc_pb2, tenant_pb2

from ..plcmodel.mirrors import mirror_violations, target_ids
from ..plcmodel.plc import is_s7
from ..runtime import audit, principal, tenancy
from ..runtime.errors import (AlreadyExists, FailedPrecondition, FieldViolation, InvalidArgument, NotFound,
                              PermissionDenied, PreconditionViolation)
from ..runtime.notify import Listener
from ..runtime.pages import decode_page_token, encode_page_token
from ..runtime.validation import OFF_LOOP_BYTES
from ..runtime.watch import Page, watch
from . import domain
from .profiles import PROFILES
from .store import ConfigStore

log = logging.getLogger(__name__)



def _built_in(profile: device_profile_pb2.DeviceProfile) -> device_profile_pb2.DeviceProfile:
    out = device_profile_pb2.DeviceProfile()
    out.CopyFrom(profile)
    out.built_in = True
    return out


#: The built-in device profiles as the RPCs answer them (built_in set).
BUILT_IN: dict[str, device_profile_pb2.DeviceProfile] = {id_: _built_in(p) for id_, p in PROFILES.items()}

DEFAULT_PAGE_SIZE = 50
#: Longest a watcher waits for a notification before it looks for changes anyway.
WATCH_POLL_SECONDS = 2.0


async def _check_plc(plc: plc_pb2.Plc) -> None:
    """domain.check_plc, in a thread for a large PLC: the tag model's checks of thousands of tags are plain
    Python, which a thread interleaves with the event loop (the interceptor has checked the proto's rules)."""
    if plc.ByteSize() < OFF_LOOP_BYTES:
        domain.check_plc(plc)
    else:
        await asyncio.to_thread(domain.check_plc, plc)


_PROTOCOL_NAMES = {device_profile_pb2.PROTOCOL_MODBUS: "Modbus", device_profile_pb2.PROTOCOL_S7: "S7"}


def _protocol_mismatch(profile: device_profile_pb2.DeviceProfile, plc: plc_pb2.Plc) -> FieldViolation | None:
    """One violation when the PLC's connection speaks another protocol than the profile's devices (instead of
    one per tag, each with an address of the wrong kind). A PLC without a connection is check_plc's to report."""
    kind = plc.WhichOneof("connection")
    if kind is None or profile.protocol not in _PROTOCOL_NAMES:
        return None
    speaks = device_profile_pb2.PROTOCOL_S7 if is_s7(plc) else device_profile_pb2.PROTOCOL_MODBUS
    if speaks == profile.protocol:
        return None
    return FieldViolation(
        "profile_id",
        f"profile {profile.id!r} is for {_PROTOCOL_NAMES[profile.protocol]} devices, but the PLC's connection "
        f"({kind}) is {_PROTOCOL_NAMES[speaks]}; pick a {_PROTOCOL_NAMES[speaks]} profile or change plc.{kind}",
    )


def _installation_wide() -> bool:
    p = principal.current()
    return p is not None and p.installation_wide


def _require_installation_admin() -> None:
    p = principal.current()
    if p is None or not p.installation_wide or not p.has_role(principal.ADMIN):
        raise PermissionDenied("creating and changing tenants is for the installation's admins (a token of tenant "
                               "'*' with the role admin)", reason="INSTALLATION_ADMIN_REQUIRED")


class ConfigServicer(pb_grpc.ConfigServiceServicer):
    def __init__(self, store: ConfigStore, listener: Listener):
        self.store = store
        self.listener = listener

    async def _admit(self, *, one_tenant: bool = True) -> None:
        """Refuse a call across tenants where one is needed, a tenant that does not exist, and the callers of
        an inactive tenant (see the module docstring)."""
        code = tenancy.current()
        if code is None or code == tenancy.ALL:
            if one_tenant:
                tenancy.require_one("PLCs, collectors and device profiles")
            return
        active = await self.store.tenant_state(code)
        if active is None:
            raise NotFound(f"no tenant {code!r}", reason="TENANT_NOT_FOUND", metadata={"tenant": code})
        if not active and not _installation_wide():
            raise PermissionDenied(f"tenant {code!r} is suspended (inactive)", reason="TENANT_INACTIVE",
                                   metadata={"tenant": code})

    @contextlib.contextmanager
    def _tenants_scope(self):  # noqa: ANN202 - a context manager
        """Where the tenant RPCs run: across tenants for an installation-wide caller, else in the caller's."""
        if _installation_wide():
            with tenancy.system():
                yield
        else:
            yield

    # --- tenants -------------------------------------------------------------------------------------

    async def CreateTenant(self, request: pb.CreateTenantRequest,
                           context: grpc.aio.ServicerContext) -> pb.CreateTenantResponse:
        _require_installation_admin()
        tenant = domain.new_tenant(request.tenant)
        with tenancy.system():
            return pb.CreateTenantResponse(tenant=await self.store.create_tenant(tenant))

    async def GetTenant(self, request: pb.GetTenantRequest, context: grpc.aio.ServicerContext) -> pb.GetTenantResponse:
        await self._admit(one_tenant=False)
        with self._tenants_scope():
            return pb.GetTenantResponse(tenant=await self.store.get_tenant(request.code))

    async def ListTenants(self, request: pb.ListTenantsRequest,
                          context: grpc.aio.ServicerContext) -> pb.ListTenantsResponse:
        await self._admit(one_tenant=False)
        after = decode_page_token(request.page_token, "tenants") if request.page_token else ""
        with self._tenants_scope():
            tenants, more = await self.store.list_tenants(request.page_size or DEFAULT_PAGE_SIZE, after)
        token = encode_page_token("tenants", tenants[-1].code) if more else ""
        return pb.ListTenantsResponse(tenants=tenants, next_page_token=token)

    async def UpdateTenant(self, request: pb.UpdateTenantRequest,
                           context: grpc.aio.ServicerContext) -> pb.UpdateTenantResponse:
        _require_installation_admin()
        if not tenancy.is_code(request.tenant.code):  # the tenant itself is validated after its mask (the proto)
            raise InvalidArgument(FieldViolation("tenant.code", "the code of the tenant to update is required: "
                                                 "lower-case letters, digits and dashes, starting with a letter"))
        paths = list(request.update_mask.paths)
        domain.tenant_mask(paths)  # a bad mask before any read

        def merge(current: tenant_pb2.Tenant) -> tenant_pb2.Tenant:
            return domain.apply_tenant_mask(current, request.tenant, paths)

        with tenancy.system():
            tenant = await self.store.update_tenant(request.tenant.code, request.tenant.etag, merge)
        return pb.UpdateTenantResponse(tenant=tenant)

    # --- PLCs ----------------------------------------------------------------------------------------

    async def _targets(self, plc: plc_pb2.Plc) -> dict[str, plc_pb2.Plc | None]:
        """The stored definitions of the PLCs the mirrors of `plc` write to (None: no such PLC).

        Read before the write's transaction: a target changed in between (made read-only, say) is not seen here;
        the collector checks the same rules again before it runs a mirror."""
        out: dict[str, plc_pb2.Plc | None] = {}
        for plc_id in sorted(target_ids(plc)):
            try:
                out[plc_id] = await self.store.get(plc_id)
            except NotFound:
                out[plc_id] = None
        return out

    async def _check_mirrors(self, plc: plc_pb2.Plc) -> None:
        found = mirror_violations(plc, await self._targets(plc)) if plc.mirrors else []
        if found:
            raise InvalidArgument(found)

    async def CreatePlc(self, request: pb.CreatePlcRequest, context: grpc.aio.ServicerContext) -> pb.CreatePlcResponse:
        await self._admit()
        plc = domain.normalized(request.plc)
        await _check_plc(plc)
        await self._check_mirrors(plc)
        return pb.CreatePlcResponse(plc=await self.store.create(plc, request.request_id))

    async def GetPlc(self, request: pb.GetPlcRequest, context: grpc.aio.ServicerContext) -> pb.GetPlcResponse:
        await self._admit()
        return pb.GetPlcResponse(plc=await self.store.get(request.id))

    async def ListPlcs(self, request: pb.ListPlcsRequest, context: grpc.aio.ServicerContext) -> pb.ListPlcsResponse:
        await self._admit()
        # A token is bound to the collector it lists (the query) and holds the last PLC id of its page.
        after = decode_page_token(request.page_token, request.collector_id) if request.page_token else ""
        plcs, more = await self.store.list(request.collector_id, request.page_size or DEFAULT_PAGE_SIZE, after)
        token = encode_page_token(request.collector_id, plcs[-1].id) if more else ""
        return pb.ListPlcsResponse(plcs=plcs, next_page_token=token)

    async def UpdatePlc(self, request: pb.UpdatePlcRequest, context: grpc.aio.ServicerContext) -> pb.UpdatePlcResponse:
        await self._admit()
        if not request.HasField("plc") or not request.plc.id:
            raise InvalidArgument(FieldViolation("plc.id", "the PLC to update is required"))
        paths = list(request.update_mask.paths)
        # The mirrors' targets, looked up before the transaction (merge runs inside it, under the PLC row lock).
        preview = domain.apply_update_mask(await self.store.get(request.plc.id), request.plc, paths)
        targets = await self._targets(preview) if preview.mirrors else {}

        async def merge(current: plc_pb2.Plc) -> plc_pb2.Plc:
            merged = domain.normalized(domain.apply_update_mask(current, request.plc, paths))
            await _check_plc(merged)  # a large PLC is checked in a thread, as CreatePlc's is
            found = mirror_violations(merged, targets)
            if found:
                raise InvalidArgument(found)
            return merged

        plc = await self.store.update(request.plc.id, request.plc.etag, merge)
        return pb.UpdatePlcResponse(plc=plc)

    async def DeletePlc(self, request: pb.DeletePlcRequest, context: grpc.aio.ServicerContext) -> pb.DeletePlcResponse:
        await self._admit()
        await self.store.delete(request.id, request.etag)
        return pb.DeletePlcResponse()

    # --- device profiles: the built-in ones (profiles.py, every tenant's) and the tenant's own --------

    async def _profile(self, profile_id: str) -> device_profile_pb2.DeviceProfile:
        """A built-in profile, or one of the tenant's own; NOT_FOUND otherwise (another tenant's included)."""
        if profile_id in BUILT_IN:
            return BUILT_IN[profile_id]
        profile = await self.store.get_profile(profile_id)
        if profile is None:
            raise NotFound(f"no device profile {profile_id!r}; ListDeviceProfiles shows them",
                           metadata={"profile_id": profile_id})
        return profile

    async def ListDeviceProfiles(self, request: pb.ListDeviceProfilesRequest,
                                 context: grpc.aio.ServicerContext) -> pb.ListDeviceProfilesResponse:
        await self._admit()
        profiles = [*BUILT_IN.values(), *await self.store.list_profiles()]
        return pb.ListDeviceProfilesResponse(profiles=sorted(profiles, key=lambda p: p.id))

    async def GetDeviceProfile(self, request: pb.GetDeviceProfileRequest,
                               context: grpc.aio.ServicerContext) -> pb.GetDeviceProfileResponse:
        await self._admit()
        return pb.GetDeviceProfileResponse(profile=await self._profile(request.id))

    async def CreateDeviceProfile(self, request: pb.CreateDeviceProfileRequest,
                                  context: grpc.aio.ServicerContext) -> pb.CreateDeviceProfileResponse:
        await self._admit()
        if request.profile.id in BUILT_IN:  # reserved in every tenant: a built-in one has it
            raise AlreadyExists(f"{request.profile.id!r} is the id of a built-in device profile; choose another",
                                reason="BUILT_IN_PROFILE", metadata={"profile_id": request.profile.id})
        if request.profile.ByteSize() < OFF_LOOP_BYTES:  # a large profile is checked in a thread, as a PLC is
            profile = domain.new_profile(request.profile)
        else:
            profile = await asyncio.to_thread(domain.new_profile, request.profile)
        return pb.CreateDeviceProfileResponse(profile=await self.store.create_profile(profile, request.request_id))

    async def DeleteDeviceProfile(self, request: pb.DeleteDeviceProfileRequest,
                                  context: grpc.aio.ServicerContext) -> pb.DeleteDeviceProfileResponse:
        await self._admit()
        if request.id in BUILT_IN:
            raise FailedPrecondition(
                f"{request.id!r} is a built-in device profile; only a tenant's own profiles can be deleted",
                reason="BUILT_IN_PROFILE", metadata={"profile_id": request.id},
                violations=[PreconditionViolation(type="BUILT_IN_PROFILE", subject=f"device-profiles/{request.id}",
                                                  description="shipped with Fabrica, shared by every tenant")])
        await self.store.delete_profile(request.id)
        return pb.DeleteDeviceProfileResponse()

    async def CreatePlcFromProfile(self, request: pb.CreatePlcFromProfileRequest,
                                   context: grpc.aio.ServicerContext) -> pb.CreatePlcFromProfileResponse:
        await self._admit()
        profile = await self._profile(request.profile_id)
        if not request.HasField("plc"):
            raise InvalidArgument(FieldViolation("plc", "the PLC (id, collector, connection) is required"))
        bad = [FieldViolation(f"plc.{f}", "comes from the profile; leave it empty")
               for f in ("poll_groups", "tags") if len(getattr(request.plc, f))]
        if mismatch := _protocol_mismatch(profile, request.plc):
            bad.append(mismatch)
        if bad:
            raise InvalidArgument(bad)
        plc = plc_pb2.Plc()
        plc.CopyFrom(request.plc)
        plc.poll_groups.extend(profile.poll_groups)
        for tag in profile.tags:
            copy = plc.tags.add()
            copy.CopyFrom(tag)
            copy.name = request.tag_name_prefix + tag.name
        plc = domain.normalized(plc)
        await _check_plc(plc)
        await self._check_mirrors(plc)
        return pb.CreatePlcFromProfileResponse(plc=await self.store.create(plc, request.request_id))

    async def WatchPlcs(self, request: pb.WatchPlcsRequest,
                        context: grpc.aio.ServicerContext) -> AsyncIterator[pb.WatchPlcsResponse]:
        principal.require_collector(request.collector_id)
        await self._admit()
        # The cursor is the revision sent last; None until the first snapshot is sent.
        start = request.after_revision or None
        read = functools.partial(self._plc_page, request.collector_id)
        async with contextlib.aclosing(watch(self.listener, read, start, poll_interval=WATCH_POLL_SECONDS)) as out:
            async for response in out:
                yield response

    async def _plc_page(self, collector: str, cursor: int | None) -> Page[pb.WatchPlcsResponse, int | None]:
        """The next page of `collector`'s WatchPlcs: a snapshot first (or when `cursor` cannot be resumed
        from), then one message per relevant change. Each later page checks the tenant again: the watch of a
        tenant suspended meanwhile ends with PERMISSION_DENIED (TENANT_INACTIVE; UpdateTenant wakes it)."""
        if cursor is not None:
            await self._admit()
        if cursor is None:
            return await self._plc_snapshot(collector, resync=False)
        changes, oldest, current = await self.store.changes_after(cursor)
        if cursor > current or cursor < oldest - 1:
            log.info("watch cannot resume; sending a snapshot",
                     extra={"collector_id": collector, "after_revision": cursor, "oldest": oldest})
            return await self._plc_snapshot(collector, resync=True)
        responses = []
        for change in changes:
            kind = domain.relevant_change(collector, change.old_collector_id, change.new_collector_id)
            cursor = change.revision
            if kind == "upsert":
                responses.append(pb.WatchPlcsResponse(revision=cursor, change=pb.PlcChange(
                    type=pb.CHANGE_TYPE_UPSERT, plc_id=change.plc_id, plc=change.plc)))
            elif kind == "delete":
                responses.append(pb.WatchPlcsResponse(revision=cursor, change=pb.PlcChange(
                    type=pb.CHANGE_TYPE_DELETE, plc_id=change.plc_id)))
        return Page(responses, cursor, more=bool(changes))  # a page with changes may have more after it

    async def _plc_snapshot(self, collector: str, *, resync: bool) -> Page[pb.WatchPlcsResponse, int | None]:
        revision, plcs = await self.store.snapshot(collector)
        return Page([pb.WatchPlcsResponse(revision=revision, snapshot=pb.PlcSnapshot(plcs=plcs, resync=resync))],
                    revision, more=True)

    async def ReportCollectorStatus(self, request: pb.ReportCollectorStatusRequest,
                                    context: grpc.aio.ServicerContext) -> pb.ReportCollectorStatusResponse:
        principal.require_collector(request.collector_id)
        await self._admit()
        current = await self.store.report(request.collector_id, request.applied_revision, request.plc_statuses)
        return pb.ReportCollectorStatusResponse(current_revision=current)

    async def ListCollectors(self, request: pb.ListCollectorsRequest,
                             context: grpc.aio.ServicerContext) -> pb.ListCollectorsResponse:
        await self._admit()
        return pb.ListCollectorsResponse(collectors=await self.store.collectors())

    async def ListAuditEntries(self, request: pb.ListAuditEntriesRequest,
                               context: grpc.aio.ServicerContext) -> pb.ListAuditEntriesResponse:
        await self._admit(one_tenant=False)  # across tenants ('*'): every tenant's entries
        return await audit.list_response(self.store.pool, request, pb.ListAuditEntriesResponse)
