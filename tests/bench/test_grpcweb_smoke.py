"""A smoke run of the gRPC-Web gateway benchmark (benchmarks/grpcweb.py) with tiny sizes: it runs to the end
and prints both modes for both RPCs. Nothing here looks at the figures."""

from __future__ import annotations

import pytest

from .test_smoke import run_benchmark

pytestmark = pytest.mark.slow


def test_the_grpcweb_benchmark_measures_both_modes() -> None:
    out = run_benchmark("grpcweb", FABRICA_BENCH_GRPCWEB_CALLS="30", FABRICA_BENCH_GRPCWEB_CLIENTS="2")
    table = out[out.index("\nRPC ") + 1:].splitlines()
    modes = [line for line in table if "gRPC direct (base)" in line or "gRPC-Web via gateway" in line]
    assert len(modes) == 4, table
    assert sum("gateway adds" in line for line in table) == 2, table
