"""Wire fuzz: how fast each service refuses hostile messages, and whether its memory grows with them.

Every service runs as its own process (``fabrica serve <service>``, over one embedded Postgres; production
asks config about bindings, the collector's peers are addresses where nothing listens). Per service, over
every RPC of its contract plus grpc.health.v1 (tests/fuzz/wire.py generates the cases from the
descriptors, as the suite's fuzz test does):

1. baseline: valid-looking messages (the generator's ``valid`` kind) to the same RPCs, messages/s;
2. fuzz: FABRICA_BENCH_FUZZ_MESSAGES (10,000) fuzz cases round robin over the RPCs and the kinds (random
   bytes, truncations, bit flips, extreme numbers, NUL, bad timestamps and durations, oversized strings
   and lists, unknown enum numbers), messages/s;

and the service process's RSS before the fuzz (after the baseline warmed it up) and after it, and its peak
(VmHWM), plus how many answers were a server-bug code (UNKNOWN, INTERNAL, DATA_LOSS, UNAVAILABLE) and how
many of those are unexplained (the request had no NUL, bad timestamp or bad duration, which the contract
rules refuse). A watch that stays open is read until idle for 50 ms, then cancelled (that time counts). Nothing asserts.

Knobs: FABRICA_BENCH_FUZZ_MESSAGES (10,000 per service), FABRICA_BENCH_FUZZ_BASELINE (1,000 per service),
FABRICA_BENCH_FUZZ_SEED (random when unset; printed), FABRICA_BENCH_FUZZ_SERVICES (e.g. ``config,ingest``),
FABRICA_BENCH_FUZZ_CONCURRENCY (16 calls in flight). Run: ``make bench`` or
``.venv/bin/python -m benchmarks.fuzz``.
"""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SERVICES = ("config", "ingest", "production", "collector", "alarm")
IDLE = 0.05


def _env_int(name: str, default: int) -> int:
    return int(os.environ.get(name) or default)


def _status_kib(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1])
    return 0


async def _fire(address: str, work: list, concurrency: int, closed_port: int) -> tuple[float, dict, int]:
    """Send every (rpc, case) of `work`; seconds taken, the count of each status code, and how many
    server-bug answers came for a request without a flaw the contract rules of issue 14 refuse (NUL,
    timestamp and duration ranges: ``wire.contract_flaws``)."""
    import grpc
    from fuzz import wire

    work = [(rpc, wire.Case(case.kind, tuple(wire.loopback_only(rpc.request, p, closed_port) for p in case.payloads)))
            for rpc, case in work]
    counts: dict = {}
    unexplained = 0
    gate = asyncio.Semaphore(concurrency)
    async with grpc.aio.insecure_channel(address, options=wire.CHANNEL_OPTIONS) as channel:

        async def one(rpc: wire.Rpc, case: wire.Case) -> None:
            async with gate:
                code = await wire.call(channel, rpc, case, idle=IDLE)
            counts[code] = counts.get(code, 0) + 1
            if code in wire.SERVER_BUG and not wire.contract_flaws(rpc.request, case.payloads):
                nonlocal unexplained
                unexplained += 1

        started = time.perf_counter()
        await asyncio.gather(*(one(rpc, case) for rpc, case in work))
        return time.perf_counter() - started, counts, unexplained


def _work(rpcs: list, seed: str, total: int, kinds: tuple[str, ...]) -> list:
    """`total` cases round robin over `rpcs`, each RPC's cycling over `kinds`."""
    from fuzz import wire

    generators = [wire.Generator(rpc, seed) for rpc in rpcs]
    out = []
    for i in range(total):
        rpc, gen = rpcs[i % len(rpcs)], generators[i % len(rpcs)]
        out.append((rpc, gen.case(kinds[(i // len(rpcs)) % len(kinds)])))
    return out


def _start(name: str, env: dict[str, str], root: Path):  # noqa: ANN202 - procs.ServiceProcess
    from procs import ServiceProcess

    return ServiceProcess(name, env, root / f"{name}.log").start(timeout=120)


def main() -> int:
    sys.path[:0] = [str(REPO / "tests"), str(REPO / "gen"), str(REPO / "services")]
    import embedded_postgres
    from fuzz import wire
    from procs import free_port

    total = _env_int("FABRICA_BENCH_FUZZ_MESSAGES", 10_000)
    baseline = _env_int("FABRICA_BENCH_FUZZ_BASELINE", 1_000)
    concurrency = _env_int("FABRICA_BENCH_FUZZ_CONCURRENCY", 16)
    seed = os.environ.get("FABRICA_BENCH_FUZZ_SEED") or str(random.randrange(1_000_000))
    chosen = [s for s in (os.environ.get("FABRICA_BENCH_FUZZ_SERVICES") or ",".join(SERVICES)).split(",") if s]
    descriptors = {s.full_name.split(".")[1]: s for s in wire.fabrica_services()}
    fuzz_kinds = tuple(k for k in wire.KINDS if k != "valid")
    print(f"wire fuzz: {total:,} fuzz messages and {baseline:,} valid ones per service, seed {seed}"
          f" (FABRICA_BENCH_FUZZ_SEED), {concurrency} calls in flight; {os.cpu_count()} CPUs", flush=True)

    root = Path(tempfile.mkdtemp(prefix="fabrica-bench-fuzz-"))
    os.chmod(root, 0o755)  # as root, Postgres runs as its own user and must reach the folder
    pg = embedded_postgres.get_server(root / "pg", cleanup_mode="delete")
    procs: dict = {}
    rows = []
    try:
        # Development mode (no token verifier): the fuzzer reaches the handlers, not just the token check.
        base_env = {"DATABASE_URL": pg.get_uri(), "FABRICA_LOG_LEVEL": "WARNING", "FABRICA_INSECURE": "1",
                    "PYTHONPATH": os.pathsep.join([str(REPO / "gen"), str(REPO / "services")])}
        for name in chosen:
            env = dict(base_env)
            if name in ("production", "alarm") and "config" in procs:
                env["FABRICA_CONFIG_ADDR"] = procs["config"].address
            if name == "collector":
                env.update({"FABRICA_COLLECTOR_ID": "bench-fuzz", "FABRICA_DATA_DIR": str(root / "collector"),
                            "FABRICA_CONFIG_ADDR": f"127.0.0.1:{free_port()}",
                            "FABRICA_INGEST_ADDR": f"127.0.0.1:{free_port()}"})
            procs[name] = _start(name, env, root)
        closed_port = free_port()
        for name in chosen:
            proc = procs[name]
            rpcs = wire.rpcs(descriptors[name]) + wire.rpcs(wire.HEALTH)
            valid_s, valid_codes, _ = asyncio.run(_fire(proc.address, _work(rpcs, seed, baseline, ("valid",)),
                                                     concurrency, closed_port))
            before = _status_kib(proc.proc.pid, "VmRSS")
            fuzz_s, fuzz_codes, unexplained = asyncio.run(_fire(proc.address, _work(rpcs, seed, total, fuzz_kinds),
                                                   concurrency, closed_port))
            after, peak = _status_kib(proc.proc.pid, "VmRSS"), _status_kib(proc.proc.pid, "VmHWM")
            alive = proc.proc.poll() is None
            bugs = sum(n for c, n in fuzz_codes.items() if c in wire.SERVER_BUG)
            rows.append((name, len(rpcs), baseline / valid_s, total / fuzz_s, before, after, peak, bugs,
                         unexplained, alive))
            codes = {c.name: n for c, n in sorted(fuzz_codes.items(), key=lambda kv: kv[0].value[0])}
            print(f"  {name}: fuzz codes {codes}; valid codes {({c.name: n for c, n in valid_codes.items()})}",
                  flush=True)
    finally:
        for proc in procs.values():
            proc.kill()
        pg.cleanup()
        shutil.rmtree(root, ignore_errors=True)

    print()
    print(f"{'service':<12}{'RPCs':>6}{'valid msg/s':>13}{'fuzz msg/s':>12}{'RSS before':>12}{'RSS after':>11}"
          f"{'growth':>9}{'peak':>9}{'bug codes':>11}{'unexplained':>13}{'alive':>7}")
    for name, n, valid, fuzz, before, after, peak, bugs, unexplained, alive in rows:
        print(f"{name:<12}{n:>6}{valid:>13,.0f}{fuzz:>12,.0f}{before / 1024:>10.1f}Mi{after / 1024:>9.1f}Mi"
              f"{(after - before) / 1024:>+7.1f}Mi{peak / 1024:>7.1f}Mi{bugs:>11,}{unexplained:>13,}"
              f"{'yes' if alive else 'NO':>7}")
    print("  (valid msg/s: the same RPCs with valid-looking messages, measured first in this run; RSS in MiB;"
          " bug codes: UNKNOWN, INTERNAL, DATA_LOSS, UNAVAILABLE answers, unexplained: those for a request"
          " with no NUL, bad timestamp or bad duration in it)")
    return 0 if all(row[-1] for row in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
