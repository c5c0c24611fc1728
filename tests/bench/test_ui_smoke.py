"""A smoke run of the UI benchmark (benchmarks/ui.py) with a few changes: it runs to the end against a real
stack and Chromium and prints the UI's size and both latency rows. Nothing here looks at the figures."""

from __future__ import annotations

import pytest

from .test_smoke import run_benchmark

pytestmark = pytest.mark.slow


def test_the_ui_benchmark_prints_the_built_size_and_the_value_to_screen_latency() -> None:
    out = run_benchmark("ui", FABRICA_BENCH_UI_CHANGES="3")
    lines = out.splitlines()
    assert any(line.split()[:1] == ["total"] and line.endswith("kB gzipped") for line in lines), out
    rows = [line.split() for line in lines if line.strip().startswith(("baseline: ingest", "Plant screen in Chromium"))]
    assert len(rows) == 2 and all(all(x.isdigit() for x in row[-3:]) for row in rows), out
