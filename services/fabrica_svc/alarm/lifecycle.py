"""The ISA-18.2 / IEC 62682 alarm lifecycle as plain Python (no gRPC, no SQL).

    NORMAL ──raise──► ACTIVE_UNACKNOWLEDGED ──ack──► ACTIVE_ACKNOWLEDGED ──clear──► NORMAL
                          │                                 ▲
                          └──clear──► CLEARED_UNACKNOWLEDGED ──ack──► NORMAL
                                              └──raise──► ACTIVE_UNACKNOWLEDGED

Shelving and suppression are not states of their own: a shelved alarm keeps moving through these states
(each transition is recorded) but is not annunciated; a suppressed one (its rule disabled or changed) goes
back to NORMAL with a SUPPRESSED event. The names are the contract's enum names without their prefix.
"""

from __future__ import annotations

from ..runtime.errors import FailedPrecondition, PreconditionViolation

NORMAL = "NORMAL"
ACTIVE_UNACKNOWLEDGED = "ACTIVE_UNACKNOWLEDGED"
ACTIVE_ACKNOWLEDGED = "ACTIVE_ACKNOWLEDGED"
CLEARED_UNACKNOWLEDGED = "CLEARED_UNACKNOWLEDGED"
STATES = (NORMAL, ACTIVE_UNACKNOWLEDGED, ACTIVE_ACKNOWLEDGED, CLEARED_UNACKNOWLEDGED)

RAISED = "RAISED"
CLEARED = "CLEARED"
ACKNOWLEDGED = "ACKNOWLEDGED"
SHELVED = "SHELVED"
UNSHELVED = "UNSHELVED"
SUPPRESSED = "SUPPRESSED"
EVENT_TYPES = (RAISED, CLEARED, ACKNOWLEDGED, SHELVED, UNSHELVED, SUPPRESSED)


def on_raise(state: str) -> str | None:
    """The state after the condition raises, or None when it is active already."""
    return ACTIVE_UNACKNOWLEDGED if state in (NORMAL, CLEARED_UNACKNOWLEDGED) else None


def on_clear(state: str) -> str | None:
    """The state after the condition clears, or None when it is not active."""
    if state == ACTIVE_UNACKNOWLEDGED:
        return CLEARED_UNACKNOWLEDGED
    if state == ACTIVE_ACKNOWLEDGED:
        return NORMAL
    return None


def on_acknowledge(state: str, subject: str) -> str:
    """The state after an acknowledgement; FAILED_PRECONDITION when there is nothing to acknowledge."""
    if state == ACTIVE_UNACKNOWLEDGED:
        return ACTIVE_ACKNOWLEDGED
    if state == CLEARED_UNACKNOWLEDGED:
        return NORMAL
    what = "is normal" if state == NORMAL else "is acknowledged already"
    raise FailedPrecondition(f"{subject} {what}: there is nothing to acknowledge", reason="NOTHING_TO_ACKNOWLEDGE",
                             violations=[PreconditionViolation("STATE", subject, f"the alarm is {state}")],
                             metadata={"state": state})


def is_annunciated(event_type: str, shelved: bool) -> bool:
    """Whether an event is notified: every event, except raises and clears of a shelved alarm."""
    return not (shelved and event_type in (RAISED, CLEARED))
