"""A small, deterministic demo plant: one cell with a press line and an energy meter.

The model is a pure function of ``(config, elapsed seconds)``: the machine's run/stop
schedule and the scrap pattern are drawn lazily from ``random.Random(seed)``, the
counters are derived from the accumulated running time, and the analog values are
closed-form functions of time and of the current schedule segment (noise comes from
a hash of ``(seed, channel, 100 ms bucket)``). So the same seed and the same clock give
the same values, however often :meth:`Plant.step` is called.

``DEMO_TAGS`` documents where every value lives in each protocol the simulator serves.
The servers build their register / DB images from that table, so it is the single
source of truth for the address map.
"""

from __future__ import annotations

import bisect
import dataclasses
import enum
import math
import random
from dataclasses import dataclass, field
from typing import Literal

__all__ = [
    "DB1",
    "DB1_SIZE",
    "DEMO_TAGS",
    "DemoTag",
    "MachineState",
    "ManualClock",
    "Plant",
    "PlantConfig",
    "PlantSnapshot",
    "Segment",
    "tag_value",
    "tags_for",
]


class MachineState(enum.IntEnum):
    """Machine state word as the PLC reports it."""

    STOPPED = 0
    RUNNING = 1
    FAULT = 2


@dataclass(frozen=True)
class PlantConfig:
    """Tunables of the demo plant. Durations are in seconds."""

    seed: int = 1
    #: Parts per second while running.
    rate: float = 2.0
    #: Mean number of parts between two scrap parts (0 disables scrap).
    scrap_every: float = 25.0
    run_min: float = 30.0
    run_max: float = 120.0
    stop_min: float = 3.0
    stop_max: float = 8.0
    #: Probability that a stop is a fault (state 2) rather than a planned stop (state 0).
    fault_ratio: float = 0.3
    #: Meter reading (kWh) at plant start.
    energy_start_kwh: float = 1234.5

    def __post_init__(self) -> None:
        if self.rate < 0:
            raise ValueError("rate must be >= 0")
        if self.scrap_every < 0:
            raise ValueError("scrap_every must be >= 0")
        if not 0 < self.run_min <= self.run_max:
            raise ValueError("need 0 < run_min <= run_max")
        if not 0 < self.stop_min <= self.stop_max:
            raise ValueError("need 0 < stop_min <= stop_max")
        if not 0.0 <= self.fault_ratio <= 1.0:
            raise ValueError("fault_ratio must be within [0, 1]")


@dataclass(frozen=True)
class Segment:
    """One stretch of the machine schedule, ``start <= t < end`` (seconds since plant start)."""

    start: float
    end: float
    state: MachineState
    door_open: bool
    #: Running seconds accumulated before this segment.
    run_before: float
    #: Press temperature (without ripple) at ``start``.
    temp_start: float
    #: Energy meter reading (kWh) at ``start``.
    energy_start: float


@dataclass(frozen=True)
class PlantSnapshot:
    """All plant values at one instant (engineering units, counters unwrapped)."""

    time: float
    state: MachineState
    running: bool
    fault: bool
    door_open: bool
    production_count: int
    scrap_count: int
    temperature: float
    pressure: float
    motor_current: float
    voltage_l1: float
    voltage_l2: float
    voltage_l3: float
    current_l1: float
    current_l2: float
    current_l3: float
    power_l1: float
    power_l2: float
    power_l3: float
    power_total: float
    energy_kwh: float
    #: Vibration velocity of the press frame (mm/s RMS).
    vibration: float = 0.0

    @property
    def good_count(self) -> int:
        return self.production_count - self.scrap_count

    @property
    def good_part(self) -> bool:
        """The part signal of good parts: it toggles with every good part (odd count: True)."""
        return self.good_count % 2 == 1

    @property
    def bad_part(self) -> bool:
        """The part signal of bad (scrap) parts: it toggles with every scrap part."""
        return self.scrap_count % 2 == 1


# --- physical constants of the demo line --------------------------------------------

_TEMP_START = 64.5
_TEMP_TARGET = {MachineState.RUNNING: 66.0, MachineState.STOPPED: 35.0, MachineState.FAULT: 35.0}
_TEMP_TAU = 300.0  # s, thermal time constant
_V_NOMINAL = 230.0  # V, phase to neutral
_PF = 0.86
_PHASE_SHARE = (1.00, 0.97, 1.03)  # share of motor current on L1/L2/L3
_I_MEAN = {MachineState.RUNNING: 32.0, MachineState.STOPPED: 4.0, MachineState.FAULT: 0.0}
_P_MEAN_W = {s: _V_NOMINAL * i * sum(_PHASE_SHARE) * _PF for s, i in _I_MEAN.items()}

_MASK64 = (1 << 64) - 1


def _mix64(x: int) -> int:
    """splitmix64 finaliser."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def _noise(seed: int, channel: int, t: float) -> float:
    """Deterministic noise in [-1, 1), constant within a 100 ms bucket."""
    bucket = math.floor(t * 10.0)
    x = _mix64((seed & _MASK64) ^ _mix64(channel) ^ _mix64(bucket & _MASK64))
    return (x >> 11) / float(1 << 52) - 1.0


class ManualClock:
    """A clock that moves only when told to: ``Simulator(clock=ManualClock())`` serves values that change
    only when a test (or a demo script) advances it, e.g. with :meth:`~fabrica_svc.plcsim.Simulator.make_parts`."""

    def __init__(self, t: float = 0.0) -> None:
        self.t = float(t)

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> float:
        """Move forward by ``seconds`` (>= 0); return the new time."""
        if seconds < 0:
            raise ValueError("a clock does not go back")
        self.t += seconds
        return self.t


class Plant:
    """The demo press line. Advance it with :meth:`step`; read :attr:`snapshot`.

    ``start_time`` is the clock value at which the plant starts; when omitted, the
    first :meth:`step` call defines it. ``step`` ignores a clock that goes backwards.
    """

    def __init__(
        self,
        config: PlantConfig | None = None,
        *,
        seed: int | None = None,
        rate: float | None = None,
        start_time: float | None = None,
    ) -> None:
        cfg = config or PlantConfig()
        if seed is not None:
            cfg = dataclasses.replace(cfg, seed=seed)
        if rate is not None:
            cfg = dataclasses.replace(cfg, rate=rate)
        self._cfg = cfg
        self._start_time = start_time
        self._sched_rng = random.Random(cfg.seed)
        self._scrap_rng = random.Random(cfg.seed ^ 0x5C4A9)
        self._segments: list[Segment] = []
        self._seg_starts: list[float] = []
        self._scrap_parts: list[int] = []
        self._elapsed = 0.0
        self._append_segment(0.0, MachineState.RUNNING, False, 0.0, _TEMP_START, cfg.energy_start_kwh)
        self._snapshot = self.at(0.0)

    # --- public API -------------------------------------------------------------------

    @property
    def config(self) -> PlantConfig:
        return self._cfg

    @property
    def start_time(self) -> float | None:
        return self._start_time

    @property
    def elapsed(self) -> float:
        """Seconds since plant start as of the last :meth:`step`."""
        return self._elapsed

    @property
    def snapshot(self) -> PlantSnapshot:
        """Values as of the last :meth:`step` (``at(0)`` before the first one)."""
        return self._snapshot

    def step(self, now: float) -> PlantSnapshot:
        """Advance the plant to clock time ``now`` and return the new snapshot."""
        if self._start_time is None:
            self._start_time = now
        elapsed = now - self._start_time
        if elapsed > self._elapsed:
            self._elapsed = elapsed
            self._snapshot = self.at(elapsed)
        return self._snapshot

    def at(self, elapsed: float) -> PlantSnapshot:
        """Values ``elapsed`` seconds after plant start (pure; does not advance the plant)."""
        t = max(0.0, float(elapsed))
        seg = self._segment_at(t)
        state = seg.state
        cfg = self._cfg
        seed = cfg.seed
        dt = t - seg.start
        running = state is MachineState.RUNNING

        run_time = seg.run_before + (dt if running else 0.0)
        production = math.floor(run_time * cfg.rate + 1e-9)
        scrap = self._scrap_count(production)

        target = _TEMP_TARGET[state]
        temperature = target + (seg.temp_start - target) * math.exp(-dt / _TEMP_TAU)
        temperature += (0.8 * math.sin(2 * math.pi * t / 240.0) if running else 0.0) + 0.05 * _noise(seed, 1, t)

        stroke = math.sin(2 * math.pi * cfg.rate * t) if running else 0.0
        if state is MachineState.RUNNING:
            pressure = 180.0 + 20.0 * stroke + 0.5 * _noise(seed, 2, t)
            motor = _I_MEAN[state] + 3.0 * stroke + 0.3 * _noise(seed, 3, t)
            vibration = 2.8 + 0.6 * abs(stroke) + 0.1 * _noise(seed, 4, t)
        elif state is MachineState.STOPPED:
            pressure = 12.0 + 0.2 * _noise(seed, 2, t)
            motor = _I_MEAN[state] + 0.1 * _noise(seed, 3, t)
            vibration = 0.3 + 0.05 * _noise(seed, 4, t)
        else:
            pressure = 2.0 + 0.1 * _noise(seed, 2, t)
            motor = 0.0
            vibration = 0.0

        volts = tuple(
            _V_NOMINAL + 1.5 * math.sin(2 * math.pi * t / 600.0 + k * 2.0944) + 0.2 * _noise(seed, 10 + k, t)
            for k in range(3)
        )
        amps = tuple(motor * share for share in _PHASE_SHARE)
        watts = tuple(v * i * _PF for v, i in zip(volts, amps))
        energy = seg.energy_start + _P_MEAN_W[state] * dt / 3_600_000.0

        return PlantSnapshot(
            time=t,
            state=state,
            running=running,
            fault=state is MachineState.FAULT,
            door_open=seg.door_open,
            production_count=production,
            scrap_count=scrap,
            temperature=temperature,
            pressure=pressure,
            motor_current=motor,
            voltage_l1=volts[0],
            voltage_l2=volts[1],
            voltage_l3=volts[2],
            current_l1=amps[0],
            current_l2=amps[1],
            current_l3=amps[2],
            power_l1=watts[0],
            power_l2=watts[1],
            power_l3=watts[2],
            power_total=sum(watts),
            energy_kwh=energy,
            vibration=vibration,
        )

    def time_of_count(self, count: int) -> float:
        """The earliest elapsed time (seconds since plant start) at which ``production_count`` is ``count``.

        Pure, like :meth:`at`. Raises ValueError when the plant makes no parts (``rate`` 0).
        """
        if count <= 0:
            return 0.0
        rate = self._cfg.rate
        if rate <= 0:
            raise ValueError("the plant makes no parts (rate 0)")
        need = count / rate  # running seconds
        i = 0
        while True:  # ends: every other segment runs, for at least run_min > 0 seconds
            while i >= len(self._segments):
                self._extend()
            seg = self._segments[i]
            if seg.state is MachineState.RUNNING and seg.run_before + (seg.end - seg.start) >= need:
                t = seg.start + max(0.0, need - seg.run_before)
                break
            i += 1
        # count / rate * rate may round below count: move up to the first float that makes it.
        for _ in range(64):
            if self.at(t).production_count >= count:
                return t
            t = math.nextafter(t, math.inf)
        raise AssertionError(f"no time found for count {count}")  # pragma: no cover - floor has a 1e-9 margin

    def segments(self, until: float) -> list[Segment]:
        """The schedule segments that start before ``until`` seconds."""
        self._segment_at(until)
        return [s for s in self._segments if s.start < until]

    # --- internals --------------------------------------------------------------------

    def _append_segment(
        self, start: float, state: MachineState, door_open: bool, run_before: float, temp: float, energy: float
    ) -> None:
        cfg, rng = self._cfg, self._sched_rng
        if state is MachineState.RUNNING:
            duration = rng.uniform(cfg.run_min, cfg.run_max)
        else:
            duration = rng.uniform(cfg.stop_min, cfg.stop_max)
        seg = Segment(start, start + duration, state, door_open, run_before, temp, energy)
        self._segments.append(seg)
        self._seg_starts.append(start)

    def _extend(self) -> None:
        last = self._segments[-1]
        duration = last.end - last.start
        target = _TEMP_TARGET[last.state]
        temp = target + (last.temp_start - target) * math.exp(-duration / _TEMP_TAU)
        energy = last.energy_start + _P_MEAN_W[last.state] * duration / 3_600_000.0
        run_before = last.run_before + (duration if last.state is MachineState.RUNNING else 0.0)
        if last.state is MachineState.RUNNING:
            fault = self._sched_rng.random() < self._cfg.fault_ratio
            state = MachineState.FAULT if fault else MachineState.STOPPED
        else:
            state = MachineState.RUNNING
        self._append_segment(last.end, state, state is MachineState.STOPPED, run_before, temp, energy)

    def _segment_at(self, t: float) -> Segment:
        while self._segments[-1].end <= t:
            self._extend()
        return self._segments[bisect.bisect_right(self._seg_starts, t) - 1]

    def _scrap_count(self, production: int) -> int:
        every = self._cfg.scrap_every
        if every <= 0:
            return 0
        lo = max(1, round(every * 0.5))
        hi = max(lo, round(every * 1.5))
        parts = self._scrap_parts
        while not parts or parts[-1] <= production:
            parts.append((parts[-1] if parts else 0) + self._scrap_rng.randint(lo, hi))
        return bisect.bisect_right(parts, production)


# --- address map ---------------------------------------------------------------------

Protocol = Literal["modbus_tcp", "modbus_rtu", "s7"]
DType = Literal["bool", "int16", "uint16", "int32", "uint32", "float32"]

_REGISTERS = {"bool": 1, "int16": 1, "uint16": 1, "int32": 2, "uint32": 2, "float32": 2}
_S7_TYPE = {"bool": "BOOL", "int16": "INT", "uint16": "WORD", "int32": "DINT", "uint32": "DWORD", "float32": "REAL"}
_BYTES = {"bool": 1, "int16": 2, "uint16": 2, "int32": 4, "uint32": 4, "float32": 4}


@dataclass(frozen=True)
class DemoTag:
    """Where one plant value lives in one protocol.

    Modbus rows use ``unit``, ``table`` (holding/input/coil/discrete), ``address`` and, for
    32-bit types, ``word_order`` ("ABCD" = high word first, "CDAB" = low word first; bytes
    within a word are always big-endian). S7 rows use ``db``, ``offset`` (byte) and ``bit``
    (BOOL only); S7 values are big-endian. Signed integers wrap modulo 2**(bits-1) (so the
    S7 INT scrap count is ``scrap % 32768``), unsigned ones modulo 2**bits.
    """

    name: str
    #: Attribute of :class:`PlantSnapshot` the value comes from.
    source: str
    protocol: Protocol
    dtype: DType
    unit: int | None = None
    table: Literal["holding", "input", "coil", "discrete"] | None = None
    address: int | None = None
    word_order: Literal["ABCD", "CDAB"] | None = None
    db: int | None = None
    offset: int | None = None
    bit: int | None = None
    eng_unit: str = ""
    description: str = field(default="", compare=False)
    #: What the value means to production: "production_counter", "scrap_counter", "machine_state" or "".
    role: str = ""

    @property
    def register_count(self) -> int:
        """Modbus registers (or coils, for bool) the value occupies."""
        return _REGISTERS[self.dtype]

    @property
    def s7_type(self) -> str:
        return _S7_TYPE[self.dtype]

    @property
    def byte_size(self) -> int:
        return _BYTES[self.dtype]

    @property
    def location(self) -> str:
        """Human-readable address, e.g. ``hr 4-5 ABCD`` or ``DB1.DBX0.1``."""
        if self.protocol == "s7":
            if self.dtype == "bool":
                return f"DB{self.db}.DBX{self.offset}.{self.bit}"
            width = {2: "W", 4: "D"}[self.byte_size]
            return f"DB{self.db}.DB{width}{self.offset}"
        prefix = {"holding": "hr", "input": "ir", "coil": "co", "discrete": "di"}[self.table or "holding"]
        assert self.address is not None
        end = self.address + self.register_count - 1
        span = f"{self.address}" if end == self.address else f"{self.address}-{end}"
        return f"unit {self.unit} {prefix} {span}" + (f" {self.word_order}" if self.word_order else "")


def _mb(name, source, dtype, table, address, word_order=None, eng_unit="", description="", protocol="modbus_tcp",
        role=""):
    if word_order is None and _REGISTERS[dtype] == 2:
        word_order = "ABCD"
    return DemoTag(name, source, protocol, dtype, unit=1, table=table, address=address,
                   word_order=word_order, eng_unit=eng_unit, description=description, role=role)


def _meter(name, source, address, eng_unit, description):
    return _mb(name, source, "float32", "input", address, "ABCD", eng_unit, description, protocol="modbus_rtu")


def _s7(name, source, dtype, offset, bit=None, eng_unit="", description="", role=""):
    return DemoTag(name, source, "s7", dtype, db=DB1, offset=offset, bit=bit, eng_unit=eng_unit,
                   description=description, role=role)


DB1 = 1
#: The edge seed's DB1 is 14 bytes: nothing lives past byte 13.
DB1_SIZE = 14

#: Every value the simulator serves, one row per (protocol, location).
DEMO_TAGS: tuple[DemoTag, ...] = (
    # Modbus TCP, unit 1: the press PLC.
    _mb("press.production_count", "production_count", "uint32", "holding", 0, eng_unit="parts",
        description="parts produced (good + scrap)", role="production_counter"),
    _mb("press.scrap_count", "scrap_count", "uint16", "holding", 2, eng_unit="parts", description="scrap parts",
        role="scrap_counter"),
    _mb("press.machine_state", "state", "uint16", "holding", 3, description="0 stopped, 1 running, 2 fault",
        role="machine_state"),
    _mb("press.temperature", "temperature", "float32", "holding", 4, "ABCD", "°C", "hydraulic oil temperature"),
    _mb("press.pressure", "pressure", "float32", "holding", 6, "CDAB", "bar", "press pressure (low word first)"),
    _mb("press.motor_current", "motor_current", "float32", "holding", 8, "ABCD", "A", "main motor current"),
    _mb("press.running", "running", "bool", "coil", 0),
    _mb("press.fault", "fault", "bool", "coil", 1),
    _mb("press.door_open", "door_open", "bool", "coil", 2),
    # Modbus RTU over TCP (serial gateway), unit 1: an Eastron SDM630-style energy meter.
    _meter("meter.voltage_l1", "voltage_l1", 0x0000, "V", "L1 voltage"),
    _meter("meter.voltage_l2", "voltage_l2", 0x0002, "V", "L2 voltage"),
    _meter("meter.voltage_l3", "voltage_l3", 0x0004, "V", "L3 voltage"),
    _meter("meter.current_l1", "current_l1", 0x0006, "A", "L1 current"),
    _meter("meter.current_l2", "current_l2", 0x0008, "A", "L2 current"),
    _meter("meter.current_l3", "current_l3", 0x000A, "A", "L3 current"),
    _meter("meter.power_l1", "power_l1", 0x000C, "W", "L1 active power"),
    _meter("meter.power_l2", "power_l2", 0x000E, "W", "L2 active power"),
    _meter("meter.power_l3", "power_l3", 0x0010, "W", "L3 active power"),
    _meter("meter.power_total", "power_total", 0x0034, "W", "total system active power"),
    _meter("meter.energy_kwh", "energy_kwh", 0x0156, "kWh", "total import active energy"),
    # S7, DB1: the edge seed's 14-byte layout (the "s7-press-db1" device profile).
    _s7("press.bad_part", "bad_part", "bool", 0, 0, description="bad-part signal: toggles with every scrap part"),
    _s7("press.good_part", "good_part", "bool", 0, 1, description="good-part signal: toggles with every good part"),
    _s7("press.machine_on", "running", "bool", 0, 2, description="machine on (running)", role="machine_state"),
    _s7("press.current", "motor_current", "float32", 2, eng_unit="A", description="main motor current"),
    _s7("press.vibration", "vibration", "float32", 6, eng_unit="mm/s", description="frame vibration velocity"),
    _s7("press.good_count", "good_count", "int16", 10, eng_unit="parts", description="good parts, INT counter",
        role="production_counter"),
    _s7("press.bad_count", "scrap_count", "int16", 12, eng_unit="parts", description="scrap parts, INT counter",
        role="scrap_counter"),
)


def tags_for(protocol: Protocol) -> tuple[DemoTag, ...]:
    """The ``DEMO_TAGS`` rows of one protocol."""
    return tuple(t for t in DEMO_TAGS if t.protocol == protocol)


def tag_value(tag: DemoTag, snap: PlantSnapshot) -> bool | int | float:
    """The value of ``tag`` in ``snap``, converted to the tag's type (integers wrapped)."""
    raw = getattr(snap, tag.source)
    if tag.dtype == "bool":
        return bool(raw)
    if tag.dtype == "float32":
        return float(raw)
    bits = 8 * _BYTES[tag.dtype]
    modulus = 1 << (bits - 1 if tag.dtype.startswith("int") else bits)
    return int(raw) % modulus
