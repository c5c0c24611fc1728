"""What makes a rule acceptable: its own fields (protovalidate plus the cross-field rules below), and, when the
alarm service knows the config service, the tags it names.

Cross-field rules (INVALID_ARGUMENT, field violations under ``rule.``):

* a band with low > high, or a deadband of half the band or more (it could never clear);
* a bool threshold with a comparison other than == or !=;
* a message template with an unknown placeholder or bad braces.

Against config (ConfigService.GetPlc of the target's PLC), a one-tag target and a PLC target, and a role
target limited to a PLC:

* the PLC or the tag does not exist: FAILED_PRECONDITION, PreconditionFailure of type ``PLC_NOT_FOUND``
  (subject ``plcs/<id>``) or ``TAG_NOT_FOUND`` (``tags/<id>``), each description naming the field;
* a one-tag target whose data type the condition cannot use (a rate, band or deviation on a bool or string
  tag, a numeric threshold on a string tag, a bool threshold on a numeric tag): INVALID_ARGUMENT on
  ``rule.condition.<kind>``;
* a "no data" timeout not longer than the integrity interval of the tag's poll group (of any poll group of
  the PLC, for a PLC target): a collector reports a steady value only that often, so the rule would raise on
  it. INVALID_ARGUMENT on ``rule.condition.no_data.timeout``.

Config unreachable: UNAVAILABLE, never unchecked. No config address (FABRICA_CONFIG_ADDR unset): the tags
are taken as given, and the app says so once at start.
"""

from __future__ import annotations

import logging
from typing import Protocol

import grpc
from fabrica.alarm.v1 import rule_pb2
from fabrica.config.v1 import config_service_pb2, config_service_pb2_grpc, plc_pb2

from ..runtime import tenancy
from ..runtime.errors import FailedPrecondition, FieldViolation, InvalidArgument, PreconditionViolation, Unavailable
from ..runtime.timefmt import seconds_of
from ..runtime.validation import violations_of
from .evaluator import template_errors

log = logging.getLogger(__name__)

CONFIG_TIMEOUT_SECONDS = 5.0
UPDATABLE = ("display_name", "target", "condition", "severity", "deadband", "on_delay", "off_delay",
             "message_template", "enabled")
#: Fields whose change restarts the evaluation of the rule's alarms (and suppresses those not normal).
EVALUATION_FIELDS = ("target", "condition", "deadband", "on_delay", "off_delay")


def rule_violations(rule: rule_pb2.AlarmRule, prefix: str = "rule") -> list[FieldViolation]:
    out = violations_of(rule, prefix)
    cond = rule.condition
    kind = cond.WhichOneof("kind")
    if kind == "band":
        if cond.band.low > cond.band.high:
            out.append(FieldViolation(f"{prefix}.condition.band.low",
                                      f"low ({cond.band.low:g}) must not be above high ({cond.band.high:g})"))
        elif rule.deadband and 2 * rule.deadband >= cond.band.high - cond.band.low:
            out.append(FieldViolation(f"{prefix}.deadband", "must be less than half the band's width, or the alarm "
                                                            "could never clear"))
    if kind == "threshold" and cond.threshold.WhichOneof("threshold") == "flag" and cond.threshold.comparison not in (
            rule_pb2.COMPARISON_EQUAL, rule_pb2.COMPARISON_NOT_EQUAL):
        out.append(FieldViolation(f"{prefix}.condition.threshold.comparison",
                                  "a bool threshold takes COMPARISON_EQUAL or COMPARISON_NOT_EQUAL"))
    for error in template_errors(rule.message_template):
        out.append(FieldViolation(f"{prefix}.message_template", error))
    return out


def check_rule(rule: rule_pb2.AlarmRule) -> None:
    found = rule_violations(rule)
    if found:
        raise InvalidArgument(found)


#: config's integrity interval when a poll group sets none (plc.proto: "60 s when not set").
DEFAULT_INTEGRITY_SECONDS = 60.0

_NUMERIC = frozenset(range(plc_pb2.DATA_TYPE_INT16, plc_pb2.DATA_TYPE_FLOAT64 + 1))


def _type_violation(cond: rule_pb2.Condition, tag: plc_pb2.Tag) -> FieldViolation | None:
    kind = cond.WhichOneof("kind")
    if kind == "no_data":
        return None
    is_bool = tag.data_type == plc_pb2.DATA_TYPE_BOOL
    numeric = tag.data_type in _NUMERIC
    what = f"tag {tag.id} ({tag.name!r}) is a {plc_pb2.DataType.Name(tag.data_type).removeprefix('DATA_TYPE_').lower()}"
    if kind == "threshold":
        flag = cond.threshold.WhichOneof("threshold") == "flag"
        if flag and not is_bool:
            return FieldViolation("rule.condition.threshold.flag", f"{what} tag: a bool threshold needs a bool tag")
        if not flag and not (numeric or is_bool):
            return FieldViolation("rule.condition.threshold.number", f"{what} tag: a numeric threshold needs a "
                                                                     "numeric or bool tag")
        return None
    if not numeric:
        names = {"band": "a band", "rate": "a rate of change", "ewma": "a deviation from the moving average"}
        return FieldViolation(f"rule.condition.{kind}", f"{what} tag: {names[kind]} needs a numeric tag")
    return None


def _integrity_seconds(plc: plc_pb2.Plc, group_name: str | None) -> float:
    """The integrity interval of a poll group of `plc` (a tag's, whose empty name means the first group), or
    the longest of all of them for None."""
    groups = list(plc.poll_groups)
    if group_name:
        groups = [g for g in groups if g.name == group_name]
    elif group_name is not None:  # a tag without a poll group is polled with the first group
        groups = groups[:1]
    values = [seconds_of(g.integrity_interval, DEFAULT_INTEGRITY_SECONDS) for g in groups]
    return max(values, default=DEFAULT_INTEGRITY_SECONDS)


def _timeout_violation(rule: rule_pb2.AlarmRule, plc: plc_pb2.Plc, tag: plc_pb2.Tag | None) -> FieldViolation | None:
    if rule.condition.WhichOneof("kind") != "no_data":
        return None
    integrity = _integrity_seconds(plc, tag.poll_group if tag is not None else None)
    timeout = rule.condition.no_data.timeout.ToTimedelta().total_seconds()
    if timeout > integrity:
        return None
    whose = f"tag {tag.id} ({tag.name!r})" if tag is not None else f"PLC {plc.id!r}"
    return FieldViolation("rule.condition.no_data.timeout",
                          f"{whose} reports a steady value only every {integrity:g} s (the integrity interval of its "
                          f"poll group): the timeout must be longer, or a steady value would raise the alarm")


class TagCatalog(Protocol):
    async def check(self, rule: rule_pb2.AlarmRule) -> None:
        """Raise when config disagrees with the tags the rule names."""


class NoTagCatalog:
    """No config to ask: the rule's tags are taken as given."""

    async def check(self, rule: rule_pb2.AlarmRule) -> None:
        return None


class ConfigTagCatalog:
    """Asks config's ConfigService (GetPlc) on `channel`."""

    def __init__(self, channel: grpc.aio.Channel, timeout: float = CONFIG_TIMEOUT_SECONDS):
        self._stub = config_service_pb2_grpc.ConfigServiceStub(channel)
        self._timeout = timeout

    async def _plc(self, plc_id: str) -> plc_pb2.Plc | None:
        try:
            # In the request's tenant: the rule's PLC is the caller's tenant's (config answers NOT_FOUND for another's).
            tenant = tenancy.current() or tenancy.DEFAULT
            return (await self._stub.GetPlc(config_service_pb2.GetPlcRequest(id=plc_id), timeout=self._timeout,
                                            metadata=((tenancy.HEADER, tenant),))).plc
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                return None
            log.warning("config did not answer GetPlc: %s %s", exc.code().name, exc.details(), extra={"plc_id": plc_id})
            raise Unavailable(f"cannot check the rule's tags with config: {exc.code().name}",
                              metadata={"plc_id": plc_id}) from None

    async def check(self, rule: rule_pb2.AlarmRule) -> None:
        target = rule.target
        kind = target.WhichOneof("kind")
        plc_id = getattr(target, kind).plc_id if kind else ""
        if not plc_id:
            return
        plc = await self._plc(plc_id)
        if plc is None:
            raise FailedPrecondition(
                f"config has no PLC {plc_id!r}", reason="PLC_NOT_FOUND", metadata={"plc_id": plc_id},
                violations=[PreconditionViolation("PLC_NOT_FOUND", f"plcs/{plc_id}",
                                                  f"rule.target.{kind}.plc_id: config has no PLC {plc_id!r}")])
        if kind != "tag":
            problem = _timeout_violation(rule, plc, None) if kind == "plc" else None
            if problem is not None:
                raise InvalidArgument(problem)
            return
        tag = next((t for t in plc.tags if t.id == target.tag.tag_id), None)
        if tag is None:
            tag_id = target.tag.tag_id
            raise FailedPrecondition(
                f"PLC {plc_id!r} has no tag {tag_id} in config", reason="TAG_NOT_FOUND",
                metadata={"plc_id": plc_id, "tag_id": str(tag_id)},
                violations=[PreconditionViolation("TAG_NOT_FOUND", f"tags/{tag_id}",
                                                  f"rule.target.tag.tag_id: PLC {plc_id!r} has no tag {tag_id}")])
        problem = _type_violation(rule.condition, tag) or _timeout_violation(rule, plc, tag)
        if problem is not None:
            raise InvalidArgument(problem)
