"""`make bench`: run every benchmark module (or those named on the command line) one after another.

Each benchmark prints its own figures next to a baseline measured in the same run, on this machine, so
the ratio means something even on a shared, noisy host. Nothing here asserts on speed.
"""

from __future__ import annotations

import importlib
import pkgutil
import sys
import time

import benchmarks


def main(argv: list[str]) -> int:
    names = argv or sorted(m.name for m in pkgutil.iter_modules(benchmarks.__path__) if not m.name.startswith("_"))
    failed = []
    for name in names:
        print(f"\n=== benchmark: {name} ===", flush=True)
        started = time.perf_counter()
        code = importlib.import_module(f"benchmarks.{name}").main()
        print(f"=== {name}: {'ok' if code == 0 else f'exit {code}'} in {time.perf_counter() - started:.1f} s ===",
              flush=True)
        if code:
            failed.append(name)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
