"""Config's tag roles are the one truth: a work centre's binding is checked against them.

The collector copies each tag's role from config onto its readings, and ingest routes events by it; a work
centre that bound a tag config calls a MEASUREMENT would never book, silently. So when a work centre's
bindings are created or changed, production asks config (ConfigService.GetPlc of the work centre's
``plc_id``) for the bound tags and refuses, FAILED_PRECONDITION with a PreconditionFailure naming each tag,

* a tag the PLC does not have (or a PLC config does not know): violation type ``TAG_NOT_FOUND``;
* a tag whose role is not the binding's purpose (production counter, scrap counter, machine state):
  ``TAG_ROLE``;
* a counter tag for which config declares a ``counter_width`` other than the work centre's (16, 32 or 64;
  32 when 0): ``COUNTER_WIDTH``. Production books at the work centre's width; config's declared width must
  agree with it, so the one field is never silently ignored.

A create is checked before its transaction; an update is checked inside it, after the row is locked and the
update mask merged (only if the plc, a bound tag or the counter width changed), so what is checked is what is
written. A production service with no config address (FABRICA_CONFIG_ADDR unset) skips the check and says so once
at start. Config being unreachable makes the write UNAVAILABLE (retry), never unchecked. Config is asked in the
request's tenant (header x-fabrica-tenant): a tag of another tenant's PLC is TAG_NOT_FOUND.
"""

from __future__ import annotations

import logging
from typing import Protocol

import grpc
from fabrica.common.v1 import reading_pb2
from fabrica.config.v1 import config_service_pb2, config_service_pb2_grpc

from ..runtime import tenancy
from ..runtime.errors import FailedPrecondition, PreconditionViolation, Unavailable
from . import domain
from .resources import TAG_FIELDS
from .store.records import WorkCenter

log = logging.getLogger(__name__)

#: How long one GetPlc may take before the write is refused as UNAVAILABLE.
CONFIG_TIMEOUT_SECONDS = 5.0


def _role_name(role: int) -> str:
    return reading_pb2.TagRole.Name(role) if role in reading_pb2.TagRole.values() else str(role)


def binding_of(wc: WorkCenter) -> tuple[str, tuple[int, ...], int]:
    """What the check depends on: the PLC, the bound tags (in field order) and the counter width."""
    return wc.plc_id, tuple(getattr(wc, f) for f in TAG_FIELDS), wc.counter_width


class TagCheck(Protocol):
    async def check(self, wc: WorkCenter) -> None:
        """Raise FailedPrecondition if config disagrees with the work centre's bindings."""


class NoTagCheck:
    """No config to ask (FABRICA_CONFIG_ADDR unset): bindings are taken as given."""

    async def check(self, wc: WorkCenter) -> None:
        return None


class ConfigTagCheck:
    """Checks bindings against config's ConfigService on `channel`."""

    def __init__(self, channel: grpc.aio.Channel, timeout: float = CONFIG_TIMEOUT_SECONDS):
        self._stub = config_service_pb2_grpc.ConfigServiceStub(channel)
        self._timeout = timeout

    async def check(self, wc: WorkCenter) -> None:
        bound = {f: getattr(wc, f) for f in TAG_FIELDS if getattr(wc, f)}
        if not bound:
            return
        try:
            # Asked in the request's tenant: a PLC and tags of another tenant are not found.
            plc = (await self._stub.GetPlc(config_service_pb2.GetPlcRequest(id=wc.plc_id), timeout=self._timeout,
                                           metadata=((tenancy.HEADER, tenancy.require()),))).plc
            tags = {t.id: t for t in plc.tags}
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.NOT_FOUND:
                log.warning("config did not answer GetPlc: %s %s", exc.code().name, exc.details(),
                            extra={"plc_id": wc.plc_id})
                raise Unavailable(f"cannot check the tag bindings with config: {exc.code().name}",
                                  metadata={"plc_id": wc.plc_id}) from None
            tags = {}
        width = domain.resolve_counter_settings(wc.counter_width, 1)[0]
        violations = []
        for name, tag_id in bound.items():
            want = TAG_FIELDS[name]
            tag = tags.get(tag_id)
            subject = f"tags/{tag_id}"
            if tag is None:
                violations.append(PreconditionViolation(
                    "TAG_NOT_FOUND", subject, f"{name}: PLC {wc.plc_id!r} has no tag {tag_id} in config"))
            elif tag.role != want:
                violations.append(PreconditionViolation(
                    "TAG_ROLE", subject, f"{name}: tag {tag_id} ({tag.name!r}) has role {_role_name(tag.role)} in "
                    f"config; this binding needs {_role_name(want)}"))
            elif want != reading_pb2.TAG_ROLE_MACHINE_STATE and tag.counter_width and tag.counter_width != width:
                violations.append(PreconditionViolation(
                    "COUNTER_WIDTH", subject, f"{name}: tag {tag_id} ({tag.name!r}) wraps at {tag.counter_width} "
                    f"bits in config; the work centre's counter_width is {width}"))
        if violations:
            raise FailedPrecondition("; ".join(v.description for v in violations), violations=violations,
                                     reason="TAG_BINDING_MISMATCH",
                                     metadata={"work_center_id": wc.id, "plc_id": wc.plc_id})
