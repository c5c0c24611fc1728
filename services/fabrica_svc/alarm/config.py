"""Settings of the alarm service, from FABRICA_ALARM_* environment variables.

=====================================  ===========================================================  =======
Variable                               Meaning                                                      Default
=====================================  ===========================================================  =======
FABRICA_ALARM_TICK_SECONDS             How often the evaluator looks for silent tags ("no data"),   1
                                       delays that ran out and shelving that ended
FABRICA_ALARM_LIVE_WINDOW_SECONDS      The stream counts as live (so the clock may raise "no data")  5
                                       while its newest read time is this close to now
FABRICA_ALARM_GROUP_MESSAGES           One evaluator commit covers at most this many feed messages  64
                                       already received (1: a commit per message)
FABRICA_ALARM_GROUP_READINGS           ... and stops adding messages past this many readings        50000
=====================================  ===========================================================  =======

Peers come from the shared settings: FABRICA_INGEST_ADDR (the committed readings; unset: nothing is
evaluated) and FABRICA_CONFIG_ADDR (rules' tags are checked there; unset: not checked).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from ..runtime.settings import env_float, env_int


@dataclass(frozen=True)
class AlarmConfig:
    tick_interval: float = 1.0
    live_window: float = 5.0
    group_messages: int = 64
    group_readings: int = 50_000


def load_alarm_config(env: Mapping[str, str] | None = None) -> AlarmConfig:
    env = os.environ if env is None else env
    return AlarmConfig(
        tick_interval=env_float(env, "FABRICA_ALARM_TICK_SECONDS", 1.0, 0.05, 60.0),
        live_window=env_float(env, "FABRICA_ALARM_LIVE_WINDOW_SECONDS", 5.0, 0.1, 3600.0),
        group_messages=env_int(env, "FABRICA_ALARM_GROUP_MESSAGES", 64, 1, 10_000),
        group_readings=env_int(env, "FABRICA_ALARM_GROUP_READINGS", 50_000, 1, 10_000_000),
    )
