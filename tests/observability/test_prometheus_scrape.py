"""A real Prometheus (Debian's binary) scrapes a running `fabrica run` stack; every metric an alert rule or a
dashboard panel names is among the series it has."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from procs import free_base_port, free_port, wait_for

from .support import dashboard_metrics, debian_tool, rule_metrics

pytestmark = pytest.mark.slow


def _names(port: int) -> set[str]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/label/__name__/values", timeout=5) as r:
        return set(json.load(r)["data"])


def test_every_metric_a_rule_or_panel_names_is_scraped_from_fabrica_run(tmp_path: Path) -> None:
    wanted = rule_metrics() | dashboard_metrics()
    base = free_base_port(8)
    log = tmp_path / "run.log"
    env = {**os.environ, "FABRICA_LOG_FORMAT": "text", "FABRICA_METRICS_PORT": "0"}
    with open(log, "wb") as out:
        run = subprocess.Popen([sys.executable, "-m", "fabrica_svc.cli", "run", "--data-dir", str(tmp_path / "data"),
                                "--base-port", str(base), "--web-port", "0"], stdout=out, stderr=subprocess.STDOUT, env=env)
    prom = None
    try:
        text = ""
        for _ in range(1200):  # bounded: 120 s
            text = log.read_text(errors="replace")
            if "Ctrl-C stops everything" in text or run.poll() is not None:
                break
            time.sleep(0.1)
        assert "Ctrl-C stops everything" in text, text[-3000:]
        # One process: every service's instruments are on each endpoint; scrape them all anyway.
        targets = sorted(set(re.findall(r"metrics http://(127\.0\.0\.1:\d+)/metrics", text)))
        assert targets, text[-3000:]
        port = free_port()
        (tmp_path / "prometheus.yml").write_text(
            "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
            "rule_files: [" + json.dumps(str(Path(__file__).resolve().parents[2] / "deploy/prometheus/rules.yml")) + "]\n"
            "scrape_configs:\n  - job_name: fabrica\n    static_configs:\n      - targets: " + json.dumps(targets) + "\n")
        prom_log = open(tmp_path / "prometheus.log", "wb")  # noqa: SIM115 - the child owns it
        prom = subprocess.Popen([debian_tool("prometheus"), f"--config.file={tmp_path / 'prometheus.yml'}",
                                 f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address=127.0.0.1:{port}"],
                                stdout=prom_log, stderr=subprocess.STDOUT)
        prom_log.close()

        def all_there() -> bool:
            try:
                return wanted <= _names(port)
            except OSError:
                return False

        try:
            asyncio.run(wait_for(all_there, timeout=120, interval=1, what="every metric of the rules and dashboards"))
        except Exception:
            missing = wanted - (_names(port) if prom.poll() is None else set())
            raise AssertionError(f"never scraped: {sorted(missing)}") from None
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/rules", timeout=5) as r:
            groups = json.load(r)["data"]["groups"]
        assert sum(len(g["rules"]) for g in groups) == 8
        assert all(rule["health"] == "ok" for g in groups for rule in g["rules"]), groups
    finally:
        if prom is not None:
            prom.terminate()
            prom.wait(timeout=30)
        run.send_signal(signal.SIGINT)
        try:
            run.wait(timeout=60)
        except subprocess.TimeoutExpired:
            run.kill()
            run.wait()
