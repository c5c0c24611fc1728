"""PLC simulator: a deterministic demo press line served over Modbus TCP, Modbus RTU-over-TCP and S7.

Entry points: :class:`Simulator` (async context manager used by tests and ``fabrica run``),
:func:`fabrica_svc.plcsim.cli.main` (``fabrica plcsim``), and :data:`DEMO_TAGS` (the address map).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .modbus import ListenError, ModbusSim, start_modbus_rtu_over_tcp, start_modbus_tcp
from .plant import DEMO_TAGS, DemoTag, MachineState, ManualClock, Plant, PlantConfig, PlantSnapshot, tags_for
from .s7 import S7Device, S7Sim, start_s7
from .server import AnswerFaults, SimServer

if TYPE_CHECKING:
    from .cli import Simulator, main

__all__ = [
    "DEMO_TAGS",
    "AnswerFaults",
    "DemoTag",
    "ListenError",
    "MachineState",
    "ManualClock",
    "ModbusSim",
    "Plant",
    "PlantConfig",
    "PlantSnapshot",
    "S7Device",
    "S7Sim",
    "SimServer",
    "Simulator",
    "main",
    "start_modbus_rtu_over_tcp",
    "start_modbus_tcp",
    "start_s7",
    "tags_for",
]


def __getattr__(name: str) -> Any:
    # Lazy, so that `python -m fabrica_svc.plcsim.cli` does not import cli twice.
    if name in ("Simulator", "main"):
        from . import cli

        return getattr(cli, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
