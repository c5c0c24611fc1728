"""PLC definitions as config stores them: normalisation, update masks, who a change concerns.

Plain Python over the contract's messages: no gRPC, no SQL. The rules a definition must satisfy (the
proto's own, then those relating fields to each other, reported as field violations with a path such as
``plc.tags[3].string_length``) and the defaults are the shared PLC/tag model's (:mod:`fabrica_svc.plcmodel`),
the same the collector compiles tags with; ``check_plc`` is that model's, used here as config's rule.
"""

from __future__ import annotations

from collections.abc import Iterable

from fabrica.config.v1 import plc_pb2

from ..plcmodel.plc import check_plc, with_defaults
from ..runtime.errors import FieldViolation, InvalidArgument

__all__ = ["UPDATABLE_FIELDS", "apply_update_mask", "check_plc", "normalized", "relevant_change"]

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
