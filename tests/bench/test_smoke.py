"""A smoke run of each benchmark (``make bench``) with tiny sizes: it runs to the end and prints its table.
Nothing here looks at the figures (a test never asserts on speed)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]


def run_benchmark(name: str, **env: str) -> str:
    """``python -m benchmarks.<name>`` with `env`; its output (the test fails when it exits non-zero)."""
    path = os.pathsep.join([str(REPO / "gen"), str(REPO / "services")])
    proc = subprocess.run([sys.executable, "-m", f"benchmarks.{name}"], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env={**os.environ, **env, "PYTHONPATH": path})
    assert proc.returncode == 0, \
        f"benchmark {name} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def test_the_fuzz_benchmark_fuzzes_every_service_and_reports_throughput_and_memory() -> None:
    out = run_benchmark("fuzz", FABRICA_BENCH_FUZZ_MESSAGES="40", FABRICA_BENCH_FUZZ_BASELINE="15",
                        FABRICA_BENCH_FUZZ_SEED="14")
    table = out[out.index("\nservice ") + 1:].splitlines()
    assert table[0].split()[:4] == ["service", "RPCs", "valid", "msg/s"]
    rows = {line.split()[0]: line.split() for line in table[1:6]}
    assert sorted(rows) == ["alarm", "collector", "config", "ingest", "production"]
    assert all(row[-1] == "yes" for row in rows.values()), table  # every server alive after its fuzz


def test_the_ingest_benchmark_runs_its_modes_with_row_level_security_on_beside_off(tmp_path: Path) -> None:
    out = run_benchmark("ingest", FABRICA_BENCH_ROWS="3000", FABRICA_BENCH_CLIENTS="1", FABRICA_BENCH_BATCH="500",
                        FABRICA_BENCH_PYSPY=str(tmp_path / "ingest.pyspy"))
    for mode in ("1. raw asyncpg COPY", "2. naive", "3. Fabrica end to end", "4. Fabrica, 2 ingest processes",
                 "5. write path, row-level security on", "6. write path, row-level security off"):
        assert mode in out
    assert "ingest rate with row-level security on:" in out and "ratio 5/6" in out
    assert "ratio 3/1" in out and "µs per reading" in out and "ingest peak RSS" in out
    assert "scale-out 4/3" in out and "CPU µs per reading, measured apart" in out
    assert "py-spy" in out  # its profile of the ingest process, or that it could not take one here


def test_the_freshness_benchmark_measures_each_load_with_and_without_flush_when_idle() -> None:
    out = run_benchmark("freshness", FABRICA_BENCH_FRESH_SECONDS="0.5")
    assert "sustained:" in out
    table = out[out.index("\nload ") + 1:].splitlines()
    assert table[0].split()[:2] == ["load", "batching"]
    loads = [line for line in table[1:] if line.startswith(("light", "50%", "90%"))]
    assert len(loads) == 6 and sum("flush when idle" in line for line in loads) == 3


def test_the_collector_benchmark_runs_a_step() -> None:
    out = run_benchmark("collector", FABRICA_BENCH_MAX_DEVICES="2", FABRICA_BENCH_UPLINK_READINGS="2000")
    assert "2 devices: p99" in out and "decoder alone, tags/s" in out
    assert "spool + uplink CPU per reading" in out


def test_the_tracing_benchmark_compares_tracing_on_and_off_for_ingest_and_collector() -> None:
    out = run_benchmark("tracing", FABRICA_BENCH_TRACE_ROWS="4000", FABRICA_BENCH_TRACE_READINGS="5000")
    table = out[out.index("\nreadings/s") + 1:].splitlines()
    assert table[0].split()[:3] == ["readings/s", "tracing", "off"]
    assert table[1].startswith("ingest (acknowledged)") and table[2].startswith("collector (poll->batch")
    assert "spans received by the OTLP receiver while tracing was on" in out


def test_the_alarm_benchmark_prints_the_evaluator_beside_ingest() -> None:
    out = run_benchmark("alarm", FABRICA_BENCH_ALARM_READINGS="4000", FABRICA_BENCH_ALARM_BATCH="1000")
    assert "1,000 rules over 10,000 tags" in out
    for mode in ("1. ingest write rate", "2. evaluator alone", "3. feed alone", "4. alarm end to end",
                 "5. alarm end to end, a commit per message", "6. alarm live", "7. alarm live"):
        assert mode in out


def test_the_rollup_benchmark_compares_rollup_and_raw_answers() -> None:
    out = run_benchmark("rollup", FABRICA_BENCH_ROLLUP_DAYS="2", FABRICA_BENCH_ROLLUP_FAST_DAYS="1",
                        FABRICA_BENCH_ROLLUP_REPEAT="1", FABRICA_BENCH_ROLLUP_FEED_BATCHES="5")
    table = out[out.index("\nquery ") + 1:].splitlines()
    assert "speed-up" in table[0] and len([line for line in table[1:] if line.endswith("x")]) == 4
    assert "differs" not in out and "readings/s" in out and "the job following the feed" in out
