"""The rule evaluator: readings in, condition transitions out. Plain Python, no gRPC, no asyncpg, no clock.

Each (rule, tag) pair a rule's target matches is one *instance* with its own `InstanceState`: whether the
condition is active (after its delays), since when it has been otherwise (the on- or off-delay running),
the last numeric value and time (rate of change), the moving average and variance (EWMA) and the time of
the last good reading (no data). The state is plain data (``to_json``/``from_json``) so that the service
can store it in the same transaction as the events it caused and the cursor of the readings it has seen:
after a crash, evaluation resumes from exactly the state that matches the stored cursor.

Time is whatever the caller passes: a reading's ``read_time`` in `evaluate` (event time), and the caller's
clock in `tick`. Nothing here reads a clock, so the table-driven tests drive it on a fake one.

The condition of a reading (`raw`) is computed with the deadband applied on the way back: an active
threshold alarm on ``> 80`` with a deadband of 2 stays active until the value is ``<= 78``. A change of the
condition must then hold for the rule's on-delay (raising) or off-delay (clearing), measured between read
times; `tick(now)` completes a delay that has run out while no reading came, and raises "no data" for a
tag whose last good reading is older than the rule's timeout.

Values that do not fit a condition (a string, a bool for a band, rate or EWMA, any bad-quality reading for a
value condition) leave the instance as it is: no opinion, no transition.

"No good reading for N seconds" follows how collectors report: a value when it changes, every value again
each integrity interval, and a bad quality at once when a PLC stops answering (then again each integrity
interval). So the condition holds N seconds after the first bad reading (a PLC that stopped answering:
raised at that time + N, by the next bad reading or the tick), or N seconds after the last reading of any
kind (silence: a collector or its network gone; the tick raises it). A steady good value is refreshed by
the integrity reports, so a timeout longer than the integrity interval never raises on it (rules.py refuses
a shorter one when it can ask config). Any good reading clears it.

Tenants: an `Evaluator` holds the rules of one tenant (rule ids are unique per tenant only); `Evaluators`
keeps one per tenant and hands each reading to its own tenant's, so a rule of one tenant never sees
another's readings, whatever their tag ids. Rules, samples and transitions name their tenant.
"""

from __future__ import annotations

import math
import string
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

# Target kinds.
TARGET_TAG = "tag"
TARGET_PLC = "plc"
TARGET_ROLE = "role"

# Condition kinds.
THRESHOLD = "threshold"
BAND = "band"
RATE = "rate"
EWMA = "ewma"
NO_DATA = "no_data"

# Comparisons (the contract's Comparison enum, by name).
GREATER = "GREATER"
LESS = "LESS"
GREATER_OR_EQUAL = "GREATER_OR_EQUAL"
LESS_OR_EQUAL = "LESS_OR_EQUAL"
EQUAL = "EQUAL"
NOT_EQUAL = "NOT_EQUAL"
COMPARISONS = (GREATER, LESS, GREATER_OR_EQUAL, LESS_OR_EQUAL, EQUAL, NOT_EQUAL)

#: Good readings an EWMA rule learns from before it can raise, when the rule says 0.
DEFAULT_WARMUP = 10
#: The placeholders a message template may use.
PLACEHOLDERS = ("value", "unit", "tag", "tag_id", "plc", "rule", "severity")
SEVERITY_NAMES = {1: "low", 2: "medium", 3: "high", 4: "critical"}

NS = 1_000_000_000
#: The tenant of whatever names none (runtime/tenancy.py DEFAULT; repeated: this module imports nothing).
DEFAULT_TENANT = "default"

Value = bool | int | float | str | bytes | None


@dataclass(frozen=True)
class Condition:
    kind: str
    comparison: str = ""
    #: The threshold: a float, or a bool for a bool threshold.
    threshold: float | bool = 0.0
    low: float = 0.0
    high: float = 0.0
    max_per_minute: float = 0.0
    alpha: float = 0.0
    k: float = 0.0
    warmup_samples: int = 0
    timeout_ns: int = 0


@dataclass(frozen=True)
class Rule:
    id: str
    condition: Condition
    target_kind: str
    #: The target: the tag's PLC and id (TARGET_TAG), the PLC (TARGET_PLC), the role and optionally a PLC
    #: (TARGET_ROLE).
    plc_id: str = ""
    tag_id: int = 0
    role: int = 0
    display_name: str = ""
    severity: int = 0
    deadband: float = 0.0
    on_delay_ns: int = 0
    off_delay_ns: int = 0
    message_template: str = ""
    enabled: bool = True
    #: Bumped by every change; the evaluation of a rule's instances restarts when it changes.
    revision: int = 0
    #: When the rule started watching (its last change): a tag target that never reports raises "no data"
    #: `timeout` after this.
    since_ns: int = 0
    #: The tenant whose rule it is (it sees only that tenant's readings).
    tenant: str = DEFAULT_TENANT

    def matches(self, tag_id: int, plc_id: str, role: int) -> bool:
        if self.target_kind == TARGET_TAG:
            return tag_id == self.tag_id
        if self.target_kind == TARGET_PLC:
            return plc_id == self.plc_id
        return role == self.role and (not self.plc_id or plc_id == self.plc_id)


@dataclass(slots=True)
class Sample:
    """One committed reading as the evaluator needs it (treated as immutable; not frozen only because a
    frozen dataclass takes five times as long to build, and the evaluation builds one per reading)."""

    tag_id: int
    plc_id: str
    time_ns: int
    good: bool
    value: Value = None
    role: int = 0
    tag_name: str = ""
    unit: str = ""
    #: The tenant whose reading it is.
    tenant: str = DEFAULT_TENANT


@dataclass
class InstanceState:
    """The evaluation state of one rule on one tag (see the module docstring)."""

    plc_id: str = ""
    tag_name: str = ""
    unit: str = ""
    #: The condition, after its delays.
    active: bool = False
    #: Read time since which the condition has been the opposite of `active` (a delay running), or None.
    pending_since: int | None = None
    #: The value and read time of the last reading with a value (for messages and transitions).
    value: Value = None
    value_ns: int | None = None
    #: The last numeric value and its time, for the rate of change.
    last_number: float | None = None
    last_number_ns: int | None = None
    ewma_mean: float = 0.0
    ewma_var: float = 0.0
    ewma_n: int = 0
    #: Read time of the last good reading; None before the first.
    last_good_ns: int | None = None
    #: Read time of the last reading of any quality (silence is measured from it); None before the first.
    last_seen_ns: int | None = None
    #: Read time of the first bad reading since the last good one (the PLC stopped answering); None while good.
    bad_since_ns: int | None = None

    def to_json(self) -> dict[str, Any]:
        out = dict(self.__dict__)  # the fields, in order (a plain dataclass keeps nothing else there)
        if isinstance(self.value, bytes):
            out["value"] = {"bytes": self.value.hex()}
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> InstanceState:
        known = {f.name for f in fields(cls)}
        state = cls(**{k: v for k, v in data.items() if k in known})
        if isinstance(state.value, dict):
            state.value = bytes.fromhex(state.value["bytes"])
        return state


@dataclass(frozen=True)
class Transition:
    """The condition of `rule_id` on `tag_id` became active (`raised`) or inactive, at `time_ns`."""

    rule_id: str
    tag_id: int
    raised: bool
    time_ns: int
    value: Value
    message: str
    plc_id: str
    tag_name: str
    #: The tenant of the rule (and of the reading).
    tenant: str = DEFAULT_TENANT


Key = tuple[str, int]


def template_errors(template: str) -> list[str]:
    """What is wrong with a message template (unknown placeholders, bad braces); empty when it is usable."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        return [f"not a valid template: {exc}"]
    errors = []
    for _literal, name, spec, conversion in parsed:
        if name is None:
            continue
        if name not in PLACEHOLDERS:
            errors.append(f"unknown placeholder {{{name}}}; the placeholders are "
                          + ", ".join(f"{{{p}}}" for p in PLACEHOLDERS))
        elif spec or conversion:
            errors.append(f"placeholder {{{name}}} takes no format or conversion")
    return errors


def format_value(value: Value) -> str:
    if value is None:
        return "no value"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return format(value, ".6g")
    if isinstance(value, bytes):
        return value.hex()
    return str(value)


def render_message(rule: Rule, tag_id: int, state: InstanceState, value: Value) -> str:
    template = rule.message_template or f"{rule.display_name or rule.id}: {{tag}} = {{value}} {{unit}}"
    fill = {
        "value": format_value(value), "unit": state.unit, "tag": state.tag_name or f"tag {tag_id}",
        "tag_id": str(tag_id), "plc": state.plc_id, "rule": rule.display_name or rule.id,
        "severity": SEVERITY_NAMES.get(rule.severity, ""),
    }
    try:
        return template.format_map(fill).strip()
    except (KeyError, ValueError, IndexError):  # a template stored before a rule changed: never fail evaluation
        return template


def _number(value: Value) -> float | None:
    """A numeric value as a float; None for anything else (bools included: they are not measurements)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def _compare(comparison: str, value: float | bool, threshold: float | bool, deadband: float, active: bool) -> bool:
    """value <comparison> threshold; an active alarm's limit moves back by the deadband (not for == and !=)."""
    if comparison == EQUAL:
        return value == threshold
    if comparison == NOT_EQUAL:
        return value != threshold
    shift = deadband if active else 0.0
    v, t = float(value), float(threshold)
    if comparison == GREATER:
        return v > t - shift
    if comparison == GREATER_OR_EQUAL:
        return v >= t - shift
    if comparison == LESS:
        return v < t + shift
    return v <= t + shift  # LESS_OR_EQUAL


def _raw(rule: Rule, state: InstanceState, sample: Sample) -> bool | None:
    """The condition at this reading (None: no opinion), updating the state the condition keeps."""
    cond = rule.condition
    if cond.kind == NO_DATA:
        if sample.good:
            state.bad_since_ns = None
            return False
        if state.bad_since_ns is None:
            state.bad_since_ns = sample.time_ns
        return True if sample.time_ns - state.bad_since_ns >= cond.timeout_ns else None
    if not sample.good:
        return None
    db = rule.deadband
    if cond.kind == THRESHOLD:
        if isinstance(cond.threshold, bool):
            if not isinstance(sample.value, bool):
                return None
            return _compare(cond.comparison, sample.value, cond.threshold, 0.0, state.active)
        value = float(sample.value) if isinstance(sample.value, bool) else _number(sample.value)
        if value is None:
            return None
        return _compare(cond.comparison, value, cond.threshold, db, state.active)
    number = _number(sample.value)
    if number is None:
        return None
    if cond.kind == BAND:
        shift = db if state.active else 0.0
        return number < cond.low + shift or number > cond.high - shift
    if cond.kind == RATE:
        last, last_ns = state.last_number, state.last_number_ns
        state.last_number, state.last_number_ns = number, sample.time_ns
        if last is None or last_ns is None or sample.time_ns <= last_ns:
            return None
        per_minute = abs(number - last) / ((sample.time_ns - last_ns) / NS) * 60.0
        return per_minute > cond.max_per_minute - (db if state.active else 0.0)
    # EWMA: compare with the average before this reading, then let the reading update it.
    warmup = cond.warmup_samples or DEFAULT_WARMUP
    verdict: bool | None = None
    if state.ewma_n >= warmup:
        deviation = abs(number - state.ewma_mean)
        limit = cond.k * math.sqrt(state.ewma_var)
        verdict = deviation > limit - (db if state.active else 0.0)
    if state.ewma_n == 0:
        state.ewma_mean, state.ewma_var = number, 0.0
    else:
        diff = number - state.ewma_mean
        incr = cond.alpha * diff
        state.ewma_mean += incr
        state.ewma_var = (1.0 - cond.alpha) * (state.ewma_var + diff * incr)
    state.ewma_n += 1
    return verdict


def _step(rule: Rule, key: Key, state: InstanceState, raw: bool | None, time_ns: int) -> Transition | None:
    """Apply the delays to a condition verdict; the transition when the condition changes for good."""
    if raw is None:
        return None
    if raw == state.active:
        state.pending_since = None
        return None
    if state.pending_since is None:
        state.pending_since = time_ns
    delay = rule.on_delay_ns if raw else rule.off_delay_ns
    if time_ns - state.pending_since < delay:
        return None
    return _flip(rule, key, state, raw, time_ns)


def _flip(rule: Rule, key: Key, state: InstanceState, raised: bool, time_ns: int) -> Transition:
    state.active = raised
    state.pending_since = None
    value = state.value if rule.condition.kind != NO_DATA or not raised else None
    return Transition(rule.id, key[1], raised, time_ns, value, render_message(rule, key[1], state, value),
                      state.plc_id, state.tag_name, rule.tenant)


def no_data_due(rule: Rule, state: InstanceState) -> int:
    """When a "no data" rule's condition holds without another reading: `timeout` after the first bad reading
    (a PLC that stopped answering: the collector reports that at once), or after the last reading of any
    kind (silence: a collector or network gone), whichever is first. A steady good value is not silence:
    the collector reports it again every integrity interval, which the rule's timeout must exceed
    (rules.py checks it against config)."""
    seen = state.last_seen_ns if state.last_seen_ns is not None else rule.since_ns
    due = seen + rule.condition.timeout_ns
    if state.bad_since_ns is not None:
        due = min(due, state.bad_since_ns + rule.condition.timeout_ns)
    return due


@dataclass
class Evaluator:
    """Every enabled rule and the state of each of its instances. `evaluate` and `tick` mutate the states and
    record the keys they touched in `dirty`, which the caller stores and then clears."""

    rules: dict[str, Rule] = field(default_factory=dict)
    states: dict[Key, InstanceState] = field(default_factory=dict)
    dirty: set[Key] = field(default_factory=set)

    def __post_init__(self) -> None:
        self._by_tag: dict[int, list[Rule]] = {}
        self._by_plc: dict[str, list[Rule]] = {}
        self._by_role: dict[int, list[Rule]] = {}
        self._match_cache: dict[tuple[int, str, int], tuple[Rule, ...]] = {}
        for rule in list(self.rules.values()):
            self._index(rule)

    @classmethod
    def build(cls, rules: Iterable[Rule], states: Mapping[Key, InstanceState] | None = None) -> Evaluator:
        enabled = {r.id: r for r in rules if r.enabled}
        kept = {k: s for k, s in (states or {}).items() if k[0] in enabled}
        return cls(enabled, kept)

    def _index(self, rule: Rule) -> None:
        if rule.target_kind == TARGET_TAG:
            self._by_tag.setdefault(rule.tag_id, []).append(rule)
            key = (rule.id, rule.tag_id)
            if key not in self.states:  # known up front: "no data" counts from the rule's start
                self.states[key] = InstanceState(plc_id=rule.plc_id)
        elif rule.target_kind == TARGET_PLC:
            self._by_plc.setdefault(rule.plc_id, []).append(rule)
        else:
            self._by_role.setdefault(rule.role, []).append(rule)

    def rules_for(self, tag_id: int, plc_id: str, role: int) -> tuple[Rule, ...]:
        key = (tag_id, plc_id, role)
        found = self._match_cache.get(key)
        if found is None:
            found = tuple(
                r for r in (*self._by_tag.get(tag_id, ()), *self._by_plc.get(plc_id, ()), *self._by_role.get(role, ()))
                if r.matches(tag_id, plc_id, role))
            self._match_cache[key] = found
        return found

    def evaluate(self, sample: Sample) -> list[Transition]:
        """The transitions one reading causes, in rule order."""
        out: list[Transition] = []
        for rule in self.rules_for(sample.tag_id, sample.plc_id, sample.role):
            key = (rule.id, sample.tag_id)
            state = self.states.get(key)
            if state is None:
                state = self.states[key] = InstanceState()
            state.plc_id = sample.plc_id
            if sample.tag_name:
                state.tag_name = sample.tag_name
            if sample.unit:
                state.unit = sample.unit
            if sample.good and sample.value is not None:
                state.value, state.value_ns = sample.value, sample.time_ns
            raw = _raw(rule, state, sample)
            state.last_seen_ns = sample.time_ns
            if sample.good:
                state.last_good_ns = sample.time_ns
            transition = _step(rule, key, state, raw, sample.time_ns)
            self.dirty.add(key)
            if transition is not None:
                out.append(transition)
        return out

    def tick(self, now_ns: int) -> list[Transition]:
        """Transitions due by `now_ns` without a reading: a delay that has run out (the condition held since
        the last reading), and "no data" for tags silent longer than their rule's timeout."""
        out: list[Transition] = []
        for key, state in self.states.items():
            rule = self.rules.get(key[0])
            if rule is None:
                continue
            if rule.condition.kind == NO_DATA and not state.active:
                due = no_data_due(rule, state)
                if state.pending_since is None and due <= now_ns:
                    state.pending_since = due
                if state.pending_since is not None and state.pending_since + rule.on_delay_ns <= now_ns:
                    out.append(_flip(rule, key, state, True, max(due, state.pending_since + rule.on_delay_ns)))
                    self.dirty.add(key)
                continue
            if state.pending_since is None:
                continue
            delay = rule.off_delay_ns if state.active else rule.on_delay_ns
            if state.pending_since + delay <= now_ns:
                out.append(_flip(rule, key, state, not state.active, state.pending_since + delay))
                self.dirty.add(key)
        return out

    def take_dirty(self) -> dict[Key, InstanceState]:
        """The states touched since the last call (to store), and forget that they were."""
        out = {k: self.states[k] for k in self.dirty if k in self.states}
        self.dirty.clear()
        return out


@dataclass
class Evaluators:
    """One `Evaluator` per tenant (of the tenants that have enabled rules). `evaluate` hands a reading to its
    tenant's evaluator only: a reading of a tenant without rules costs a dictionary lookup."""

    by_tenant: dict[str, Evaluator] = field(default_factory=dict)
    #: The version of the rules it was built from (alarm/store.py rules_version; None: not from the store).
    rules_version: int | None = None

    @classmethod
    def build(cls, rules: Iterable[Rule], states: Mapping[tuple[str, str, int], InstanceState] | None = None
              ) -> Evaluators:
        """From every tenant's rules and the states stored per (tenant, rule id, tag id)."""
        rules_of: dict[str, list[Rule]] = {}
        for rule in rules:
            rules_of.setdefault(rule.tenant, []).append(rule)
        states_of: dict[str, dict[Key, InstanceState]] = {}
        for (tenant, rule_id, tag_id), state in (states or {}).items():
            states_of.setdefault(tenant, {})[(rule_id, tag_id)] = state
        built = {t: Evaluator.build(r, states_of.get(t)) for t, r in sorted(rules_of.items())}
        return cls({t: e for t, e in built.items() if e.rules})

    @property
    def rule_count(self) -> int:
        return sum(len(e.rules) for e in self.by_tenant.values())

    def evaluate(self, sample: Sample) -> list[Transition]:
        evaluator = self.by_tenant.get(sample.tenant)
        return evaluator.evaluate(sample) if evaluator is not None else []

    def tick(self, now_ns: int) -> list[Transition]:
        out: list[Transition] = []
        for evaluator in self.by_tenant.values():
            out += evaluator.tick(now_ns)
        return out

    def take_dirty(self) -> dict[str, dict[Key, InstanceState]]:
        """Per tenant, the states touched since the last call (tenants with none left out)."""
        out = {t: e.take_dirty() for t, e in self.by_tenant.items()}
        return {t: d for t, d in out.items() if d}
