"""The alert rules pass promtool (check and unit tests: each alert fires on trouble, stays quiet when healthy),
and the committed Grafana dashboards are what scripts/grafana_dashboards.py generates."""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

from .support import PROMETHEUS_DIR, REPO, dashboard_metrics, debian_tool, rule_metrics


def test_alert_rules_pass_promtool_check() -> None:
    out = subprocess.run([debian_tool("promtool"), "check", "rules", "rules.yml"], cwd=PROMETHEUS_DIR,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS: 8 rules found" in out.stdout


def test_each_alert_fires_on_trouble_and_stays_quiet_when_healthy() -> None:
    out = subprocess.run([debian_tool("promtool"), "test", "rules", "rules_test.yml"], cwd=PROMETHEUS_DIR,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    tests = (PROMETHEUS_DIR / "rules_test.yml").read_text()
    rules = (PROMETHEUS_DIR / "rules.yml").read_text()
    for alert in [line.split(":", 1)[1].strip() for line in rules.splitlines() if line.strip().startswith("- alert:")]:
        # Every alert has a firing case and a quiet one.
        assert tests.count(f"alertname: {alert}\n") >= 2, alert


def test_promtool_unit_tests_can_fail() -> None:
    """The unit tests are not vacuous: with a threshold moved, promtool reports the missed alert."""
    rules = (PROMETHEUS_DIR / "rules.yml").read_text().replace("> 600", "> 60000")
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "rules.yml").write_text(rules)
        (Path(tmp) / "rules_test.yml").write_text((PROMETHEUS_DIR / "rules_test.yml").read_text())
        out = subprocess.run([debian_tool("promtool"), "test", "rules", "rules_test.yml"], cwd=tmp,
                             capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "FabricaOldestUnsentTooOld" in out.stdout + out.stderr


def test_dashboards_are_generated_and_current() -> None:
    out = subprocess.run([sys.executable, "scripts/grafana_dashboards.py", "--check"], cwd=REPO,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert {"fabrica_collector_block_read_duration_seconds_bucket", "fabrica_ingest_rows_written_total",
            "fabrica_production_booked_parts_total"} <= dashboard_metrics()
    assert "fabrica_health_serving" in rule_metrics()
