"""PLC definitions and tenants as config stores them: normalisation, update masks, who a change concerns,
a tenant's rules (a name that is not blank, retention of downsampled history at least that of its source).

Plain Python over the contract's messages: no gRPC, no SQL. The rules a definition must satisfy (the
proto's own, then those relating fields to each other, reported as field violations with a path such as
``plc.tags[3].string_length``) and the defaults are the shared PLC/tag model's (:mod:`fabrica_svc.plcmodel`),
the same the collector compiles tags with; ``check_plc`` is that model's, used here as config's rule.
"""

from __future__ import annotations

from collections.abc import Iterable

from fabrica.config.v1 import device_profile_pb2, plc_pb2, tenant_pb2

from ..plcmodel.plc import check_plc, plc_violations, with_defaults
from ..runtime.errors import FieldViolation, InvalidArgument
from ..runtime.validation import violations_of

__all__ = ["TENANT_FIELDS", "UPDATABLE_FIELDS", "apply_tenant_mask", "apply_update_mask", "check_plc", "new_profile",
           "new_tenant", "normalized", "profile_violations", "relevant_change", "tenant_mask", "tenant_violations"]

#: Paths UpdatePlc accepts in its update_mask.
UPDATABLE_FIELDS = ("display_name", "collector_id", "enabled", "connection", "poll_groups", "tags", "writable",
                    "mirrors", "block_limits")
_CONNECTIONS = ("modbus_tcp", "modbus_rtu", "modbus_rtu_over_tcp", "s7")


def normalized(plc: plc_pb2.Plc) -> plc_pb2.Plc:
    """A copy with defaults written in (ports, each tag's poll group) and output-only fields cleared."""
    out = plc_pb2.Plc()
    out.CopyFrom(plc)
    for field in ("etag", "revision", "create_time", "update_time"):
        out.ClearField(field)
    for tag in out.tags:
        tag.ClearField("id")
    with_defaults(out)
    return out


def apply_update_mask(current: plc_pb2.Plc, patch: plc_pb2.Plc, paths: Iterable[str]) -> plc_pb2.Plc:
    """`current` with the fields named in `paths` taken from `patch`. Empty paths or "*" take them all."""
    paths = list(paths)
    if not paths or paths == ["*"]:
        paths = list(UPDATABLE_FIELDS)
    bad = [
        FieldViolation(f"update_mask.paths[{i}]",
                       f"{p!r} cannot be updated; updatable: {', '.join(UPDATABLE_FIELDS + _CONNECTIONS)}")
        for i, p in enumerate(paths)
        if p not in UPDATABLE_FIELDS and p not in _CONNECTIONS
    ]
    if bad:
        raise InvalidArgument(bad)
    merged = plc_pb2.Plc()
    merged.CopyFrom(current)
    for path in paths:
        if path in ("connection", *_CONNECTIONS):
            kind = patch.WhichOneof("connection")
            if path != "connection" and kind != path:
                raise InvalidArgument(FieldViolation(f"plc.{path}", f"update_mask names {path} but plc.{path} is not set"))
            if kind is None:
                raise InvalidArgument(FieldViolation("plc.connection", "update_mask names connection but none is set"))
            getattr(merged, kind).CopyFrom(getattr(patch, kind))
        elif path in ("poll_groups", "tags", "mirrors"):
            getattr(merged, path).clear()
            getattr(merged, path).extend(getattr(patch, path))
        elif path == "block_limits":  # a message: replaced as a whole, cleared when the patch has none
            merged.ClearField(path)
            if patch.HasField(path):
                merged.block_limits.CopyFrom(patch.block_limits)
        else:
            setattr(merged, path, getattr(patch, path))
    return merged


def relevant_change(collector_id: str, old_collector: str | None, new_collector: str | None) -> str | None:
    """What a change means to one collector's watcher: "upsert", "delete", or None (not its business)."""
    if new_collector == collector_id:
        return "upsert"
    if old_collector == collector_id:
        return "delete"
    return None


# --- device profiles of a tenant's own -----------------------------------------------------------------

#: The host of the PLC a profile is checked as (never connected to).
_PROFILE_HOST = "profile.invalid"


def profile_violations(profile: device_profile_pb2.DeviceProfile) -> list[FieldViolation]:
    """The rules a PLC's poll groups and tags follow, applied to a profile's: a throwaway PLC with the
    profile's poll groups and tags, on a connection of the profile's protocol, is checked as CreatePlc checks
    one (the shared PLC/tag model), its violations named ``profile.poll_groups[i]...``, ``profile.tags[i]...``.
    Tags without a poll group get the first, as a PLC created from the profile will."""
    plc = plc_pb2.Plc(id="profile", collector_id="profile", poll_groups=profile.poll_groups, tags=profile.tags)
    if profile.protocol == device_profile_pb2.PROTOCOL_S7:
        plc.s7.host = _PROFILE_HOST
    else:
        plc.modbus_tcp.host = _PROFILE_HOST
    with_defaults(plc)
    # Only the profile's own fields: the throwaway's id, collector and connection are this function's.
    return [v for v in plc_violations(plc, "profile") if v.field.startswith(("profile.poll_groups", "profile.tags"))]


def new_profile(profile: device_profile_pb2.DeviceProfile) -> device_profile_pb2.DeviceProfile:
    """A copy of a tenant's profile to store (output-only built_in and the tags' ids cleared);
    INVALID_ARGUMENT with every violation of its poll groups and tags (`profile_violations`)."""
    out = device_profile_pb2.DeviceProfile()
    out.CopyFrom(profile)
    out.ClearField("built_in")
    for tag in out.tags:
        tag.ClearField("id")
    if bad := profile_violations(out):
        raise InvalidArgument(bad)
    return out


# --- tenants ----------------------------------------------------------------------------------------

#: Paths UpdateTenant accepts in its update_mask (a message's fields one by one too, e.g. quota.max_plcs).
TENANT_FIELDS = ("name", "trade_name", "legal_id", "contact", "active", "quota", "retention")
_TENANT_SUBFIELDS = tuple(f"{m}.{f.name}" for m, d in (("quota", tenant_pb2.TenantQuota.DESCRIPTOR),
                                                       ("retention", tenant_pb2.RetentionPolicy.DESCRIPTOR))
                          for f in d.fields)


def tenant_violations(t: tenant_pb2.Tenant, prefix: str = "tenant") -> list[FieldViolation]:
    """The rules of a tenant beyond the proto's: a name that is not blank, and downsampled history kept at
    least as long as what it is computed from (0 = for ever)."""
    out = []
    if not t.name.strip():
        out.append(FieldViolation(f"{prefix}.name", "must not be blank"))
    r = t.retention
    for longer, shorter in (("minute_days", "raw_days"), ("hour_days", "minute_days")):
        kept, source = getattr(r, longer), getattr(r, shorter)
        if source == 0 and kept != 0:
            out.append(FieldViolation(f"{prefix}.retention.{longer}",
                                      f"must be 0 (for ever) while retention.{shorter} is 0: downsampled history "
                                      "is kept at least as long as what it is computed from"))
        elif kept != 0 and kept < source:
            out.append(FieldViolation(f"{prefix}.retention.{longer}",
                                      f"must be 0 (for ever) or at least retention.{shorter} ({source})"))
    return out


def new_tenant(t: tenant_pb2.Tenant) -> tenant_pb2.Tenant:
    """A copy of a tenant to create, output-only fields cleared; INVALID_ARGUMENT when it breaks a rule."""
    out = tenant_pb2.Tenant()
    out.CopyFrom(t)
    for name in ("etag", "create_time", "update_time"):
        out.ClearField(name)
    if bad := tenant_violations(out):
        raise InvalidArgument(bad)
    return out


def apply_tenant_mask(current: tenant_pb2.Tenant, patch: tenant_pb2.Tenant, paths: Iterable[str]) -> tenant_pb2.Tenant:
    """`current` with the fields named in `paths` taken from `patch` (all updatable ones when empty or "*"),
    checked whole (the proto's rules and the domain's): UpdateTenant's request is validated after its mask."""
    merged = tenant_pb2.Tenant()
    merged.CopyFrom(current)
    for path in tenant_mask(paths):
        if "." in path:
            message, field = path.split(".")
            setattr(getattr(merged, message), field, getattr(getattr(patch, message), field))
        elif path in ("quota", "retention"):
            getattr(merged, path).CopyFrom(getattr(patch, path))
        else:
            setattr(merged, path, getattr(patch, path))
    if bad := violations_of(merged, "tenant") + tenant_violations(merged):
        raise InvalidArgument(bad)
    return merged


def tenant_mask(paths: Iterable[str]) -> list[str]:
    """The paths of an UpdateTenant mask (all updatable ones when empty or "*"); INVALID_ARGUMENT for others."""
    paths = list(paths)
    if not paths or paths == ["*"]:
        paths = list(TENANT_FIELDS)
    bad = [FieldViolation(f"update_mask.paths[{i}]",
                          f"{p!r} cannot be updated; updatable: {', '.join(TENANT_FIELDS + _TENANT_SUBFIELDS)}")
           for i, p in enumerate(paths) if p not in TENANT_FIELDS and p not in _TENANT_SUBFIELDS]
    if bad:
        raise InvalidArgument(bad)
    return paths
