"""The rules of a DB mirror (``Plc.mirrors``) that need no device: one owner for config and the collector.

:func:`mirror_problems` judges one mirror of a source PLC against its target's definition; the config service
reports each problem as a field violation under the mirror's path when the source PLC is created or changed
(:func:`mirror_violations`), and the collector refuses to run a mirror with a problem (collector/mirror.py).
The one rule only a device can check, that the target's block is large enough for the range, is the
collector's probe.
"""

from __future__ import annotations

from collections.abc import Mapping

from fabrica.config.v1 import plc_pb2

from ..runtime.errors import FieldViolation
from .plc import is_s7
from .spec import S7Area

__all__ = ["mirror_problems", "mirror_violations", "target_ids"]


def _span(r: plc_pb2.S7Range, size: int) -> tuple[int, int, int, int]:
    area = r.area or S7Area.DB
    return area, r.db_number if area == S7Area.DB else 0, r.byte_offset, r.byte_offset + size


def mirror_problems(source: plc_pb2.Plc, mirror: plc_pb2.Mirror,
                    target: plc_pb2.Plc | None) -> list[tuple[str, str]]:
    """(field under the mirror, what is wrong) for each problem of `mirror` of `source` with `target` (None: no
    such PLC where it is looked for). Empty when the mirror can run, its target's size aside."""
    out: list[tuple[str, str]] = []
    if not is_s7(source):
        out.append(("", f"PLC {source.id} is not an S7 PLC: mirrors copy S7 memory"))
    for side in ("source", "target"):
        r = getattr(mirror, side)
        if (r.area or S7Area.DB) == S7Area.DB and r.db_number == 0:
            out.append((f"{side}.db_number", "a data block range needs its DB number (1 to 65535)"))
    if target is None:
        out.append(("target_plc_id", f"no PLC {mirror.target_plc_id!r} on collector {source.collector_id!r}"))
        return out
    if target.collector_id != source.collector_id:
        out.append(("target_plc_id", f"PLC {target.id} is polled by collector {target.collector_id!r}: the target "
                                     f"must be on the source's collector ({source.collector_id!r})"))
    if not is_s7(target):
        out.append(("target_plc_id", f"target PLC {target.id} is not an S7 PLC"))
    if not target.writable:
        out.append(("target_plc_id", f"target PLC {target.id} is not writable (set writable on its definition "
                                     "to allow writes)"))
    if target.id == source.id:
        sa, sdb, s0, s1 = _span(mirror.source, mirror.size)
        ta, tdb, t0, t1 = _span(mirror.target, mirror.size)
        if (sa, sdb) == (ta, tdb) and s0 < t1 and t0 < s1:
            out.append(("target", "source and target ranges overlap on the same PLC"))
    return out


def target_ids(plc: plc_pb2.Plc) -> set[str]:
    """The other PLCs the mirrors of `plc` write to."""
    return {m.target_plc_id for m in plc.mirrors if m.target_plc_id != plc.id}


def mirror_violations(plc: plc_pb2.Plc, targets: Mapping[str, plc_pb2.Plc | None],
                      prefix: str = "plc") -> list[FieldViolation]:
    """Every problem of the mirrors of `plc`, its targets looked up in `targets` (by id; `plc` itself for a
    mirror within one PLC), as field violations (``plc.mirrors[0].target_plc_id``)."""
    out: list[FieldViolation] = []
    names: dict[str, int] = {}
    for i, mirror in enumerate(plc.mirrors):
        path = f"{prefix}.mirrors[{i}]"
        if mirror.name in names:
            out.append(FieldViolation(f"{path}.name", f"duplicate mirror name {mirror.name!r} "
                                                      f"(also mirrors[{names[mirror.name]}])"))
        names.setdefault(mirror.name, i)
        target = plc if mirror.target_plc_id == plc.id else targets.get(mirror.target_plc_id)
        for field, description in mirror_problems(plc, mirror, target):
            out.append(FieldViolation(f"{path}.{field}" if field else path, description))
    return out
