"""``fabrica plcsim``: run the demo plant behind Modbus TCP, Modbus RTU-over-TCP and S7 servers.

:class:`Simulator` is the embeddable form (tests, ``fabrica run``)::

    async with Simulator(seed=1) as sim:          # ports default to 0 = ephemeral
        sim.modbus_port, sim.rtu_port, sim.s7_port
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
import time
from collections.abc import Callable

from .modbus import ListenError, ModbusSim
from .plant import ManualClock, Plant, PlantConfig, PlantSnapshot
from .s7 import S7Sim

__all__ = ["Simulator", "main"]

log = logging.getLogger("fabrica.plcsim")

PROG = "fabrica plcsim"


class Simulator:
    """The demo plant and its three servers. Use as ``async with`` or call start()/stop().

    The servers share one :class:`Plant`; each steps it from ``clock`` on its own
    ``refresh_interval`` timer (stepping is idempotent, so that is consistent). On a
    :class:`~.plant.ManualClock` nothing moves until :meth:`make_parts` (or the clock) says so.
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        modbus_port: int = 0,
        rtu_port: int = 0,
        s7_port: int = 0,
        seed: int = 1,
        rate: float = 2.0,
        config: PlantConfig | None = None,
        refresh_interval: float = 0.1,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        cfg = config or PlantConfig(seed=seed, rate=rate)
        self.host = host
        self.clock = clock
        self.plant = Plant(cfg)
        common = {"host": host, "refresh_interval": refresh_interval, "clock": clock}
        self.modbus = ModbusSim(self.plant, "modbus_tcp", port=modbus_port, **common)
        self.rtu = ModbusSim(self.plant, "modbus_rtu", port=rtu_port, **common)
        self.s7 = S7Sim(self.plant, port=s7_port, **common)
        self._started = False

    @property
    def servers(self) -> tuple[ModbusSim, ModbusSim, S7Sim]:
        return (self.modbus, self.rtu, self.s7)

    @property
    def modbus_port(self) -> int:
        return self.modbus.port

    @property
    def rtu_port(self) -> int:
        return self.rtu.port

    @property
    def s7_port(self) -> int:
        return self.s7.port

    def endpoints(self) -> dict[str, tuple[str, int]]:
        """``{"modbus_tcp": (host, port), "modbus_rtu": ..., "s7": ...}``."""
        return {
            "modbus_tcp": (self.host, self.modbus.port),
            "modbus_rtu": (self.host, self.rtu.port),
            "s7": (self.host, self.s7.port),
        }

    async def start(self) -> Simulator:
        """Start the plant clock and all servers; on failure, stop what started and re-raise."""
        if self._started:
            return self
        self.plant.step(self.clock())
        try:
            for server in self.servers:
                await server.start()
        except BaseException:
            await self.stop()
            raise
        self._started = True
        return self

    async def stop(self) -> None:
        """Stop all servers. Idempotent."""
        self._started = False
        for server in self.servers:
            await server.stop()

    def refresh(self) -> PlantSnapshot:
        """Step the plant now and push the values to all servers (besides their timers)."""
        for server in self.servers:
            snap = server.refresh()
        return snap

    def make_parts(self, parts: int = 1) -> PlantSnapshot:
        """On a :class:`~.plant.ManualClock`: advance the clock to the instant the press has made ``parts``
        more parts (through stops, if any), push the values to every server now, and return the snapshot.

        Between two calls nothing the servers serve changes, so a test knows every counter value that
        existed, and for how long a client could have seen it.
        """
        clock = self.clock
        if not isinstance(clock, ManualClock):
            raise TypeError("make_parts needs a Simulator on a ManualClock")
        if parts < 1:
            raise ValueError("parts must be >= 1")
        plant = self.plant
        start = plant.start_time if plant.start_time is not None else clock()
        target = plant.time_of_count(plant.snapshot.production_count + parts)
        clock.t = max(clock.t, start + target)
        return self.refresh()

    async def pause(self) -> None:
        for server in self.servers:
            await server.pause()

    async def resume(self) -> None:
        for server in self.servers:
            await server.resume()

    async def __aenter__(self) -> Simulator:
        return await self.start()

    async def __aexit__(self, *exc_info) -> None:
        await self.stop()


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError("port must be within 0..65535 (0 = any free port)")
    return value


def _rate(text: str) -> float:
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError("rate must be >= 0")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="PLC simulator: a demo press line served over Modbus TCP, "
        "Modbus RTU-over-TCP (energy meter) and S7 (DB1). Runs until SIGINT/SIGTERM.",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default %(default)s)")
    p.add_argument("--modbus-port", type=_port, default=5020, help="Modbus TCP port (default %(default)s)")
    p.add_argument("--rtu-port", type=_port, default=5021, help="Modbus RTU-over-TCP port (default %(default)s)")
    p.add_argument("--s7-port", type=_port, default=1102,
                   help="S7 ISO-on-TCP port (default %(default)s; 102 needs root)")
    p.add_argument("--seed", type=int, default=1, help="plant random seed (default %(default)s)")
    p.add_argument("--rate", type=_rate, default=2.0, help="parts per second while running (default %(default)s)")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return p


async def _serve(args: argparse.Namespace, stop: asyncio.Event) -> None:
    sim = Simulator(
        host=args.host,
        modbus_port=args.modbus_port,
        rtu_port=args.rtu_port,
        s7_port=args.s7_port,
        seed=args.seed,
        rate=args.rate,
    )
    async with sim:
        for name, (host, port) in sim.endpoints().items():
            log.info("plcsim %s listening on %s:%d", name, host, port)
        log.info("plcsim ready (seed %d, %.3g parts/s); stop with Ctrl-C", args.seed, args.rate)
        await stop.wait()
        log.info("plcsim stopping")


async def _run(args: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    installed = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(sig, stop.set)
            installed.append(sig)
    try:
        await _serve(args, stop)
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``fabrica plcsim``; returns the exit status."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, args.log_level),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # pymodbus and snap7 are chatty at INFO (every connection); keep their warnings.
    for noisy in ("pymodbus", "snap7", "s7"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, getattr(logging, args.log_level)))
    try:
        asyncio.run(_run(args))
    except ListenError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
