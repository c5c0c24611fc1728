"""Writes the Grafana dashboards of deploy/grafana/ (JSON) from the panel lists below.

    .venv/bin/python scripts/grafana_dashboards.py          # rewrite deploy/grafana/*.json
    .venv/bin/python scripts/grafana_dashboards.py --check  # exit 1 when a committed file is not current

Each panel's queries name only metrics a running stack exports (tests/observability checks them against a
real Prometheus scrape, tests/observability/test_dashboards.py that the files are current).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "deploy" / "grafana"

#: dashboard uid -> (title, [(panel title, unit, [(expr, legend)])])
DASHBOARDS: dict[str, tuple[str, list[tuple[str, str, list[tuple[str, str]]]]]] = {
    "fabrica-plant-overview": ("Fabrica: plant overview", [
        ("PLCs connected", "none", [("sum by (collector_id) (fabrica_collector_plc_connected)", "{{collector_id}}")]),
        ("Block reads per second, by outcome", "reqps",
         [("sum by (outcome) (rate(fabrica_collector_block_reads_total[5m]))", "{{outcome}}")]),
        ("Readings stored per second", "short", [("sum(rate(fabrica_ingest_rows_written_total[5m]))", "stored")]),
        ("Parts booked per minute", "short",
         [("sum by (kind) (rate(fabrica_production_booked_parts_total[5m])) * 60", "{{kind}}")]),
        ("Services serving", "none", [("fabrica_health_serving", "{{service}} {{instance}}")]),
    ]),
    "fabrica-collector-health": ("Fabrica: collector health", [
        ("Read latency p50 / p99, by PLC", "s", [
            ("histogram_quantile(0.5, sum by (plc_id, le) (rate(fabrica_collector_block_read_duration_seconds_bucket[5m])))",
             "p50 {{plc_id}}"),
            ("histogram_quantile(0.99, sum by (plc_id, le) (rate(fabrica_collector_block_read_duration_seconds_bucket[5m])))",
             "p99 {{plc_id}}"),
        ]),
        ("Reads failed per second, by PLC", "reqps",
         [("sum by (plc_id, outcome) (rate(fabrica_collector_block_reads_total{outcome!=\"ok\"}[5m]))",
           "{{plc_id}} {{outcome}}")]),
        ("Seconds since the last good read, by PLC", "s",
         [("time() - fabrica_collector_last_good_read_timestamp_seconds", "{{plc_id}}")]),
        ("Readings reported per second, by quality", "short",
         [("sum by (quality) (rate(fabrica_collector_readings_total[5m]))", "{{quality}}")]),
        ("Readings sent (acknowledged by ingest) per second", "short",
         [("sum by (collector_id) (rate(fabrica_collector_readings_sent_total[5m]))", "{{collector_id}}")]),
        ("Backlog", "bytes", [("fabrica_collector_backlog_bytes", "bytes {{collector_id}}")]),
        ("Backlog readings", "short", [("fabrica_collector_backlog_readings", "{{collector_id}}")]),
        ("Oldest unsent reading", "s", [("fabrica_collector_backlog_oldest_age_seconds", "{{collector_id}}")]),
        ("Uplink and configuration connected", "none", [
            ("fabrica_collector_uplink_connected", "uplink {{collector_id}}"),
            ("fabrica_collector_config_connected", "config {{collector_id}}"),
        ]),
        ("Configuration revision applied", "none",
         [("fabrica_collector_config_revision_applied", "{{collector_id}}")]),
        ("Batches acknowledged per second", "short",
         [("sum by (outcome) (rate(fabrica_collector_batches_acknowledged_total[5m]))", "{{outcome}}")]),
        ("Readings dropped per second, by reason", "short",
         [("sum by (reason) (rate(fabrica_collector_dropped_readings_total[5m]))", "{{reason}}")]),
    ]),
    "fabrica-ingest": ("Fabrica: ingest throughput and latency", [
        ("Readings committed per second", "short", [("sum(rate(fabrica_ingest_rows_written_total[5m]))", "rows")]),
        ("Batches per second, by outcome", "short",
         [("sum by (outcome) (rate(fabrica_ingest_batches_total[5m]))", "{{outcome}}")]),
        ("Commit latency p50 / p99", "s", [
            ("histogram_quantile(0.5, sum by (le) (rate(fabrica_ingest_transaction_duration_seconds_bucket[5m])))", "p50"),
            ("histogram_quantile(0.99, sum by (le) (rate(fabrica_ingest_transaction_duration_seconds_bucket[5m])))", "p99"),
        ]),
        ("Group size (rows per commit), mean", "short",
         [("sum(rate(fabrica_ingest_group_rows_sum[5m])) / sum(rate(fabrica_ingest_group_rows_count[5m]))", "rows")]),
        ("RPCs per second, by method and code", "reqps",
         [("sum by (method, code) (rate(fabrica_rpc_calls_total[5m]))", "{{method}} {{code}}")]),
    ]),
    "fabrica-production": ("Fabrica: production bookings", [
        ("Parts booked per minute, by kind", "short",
         [("sum by (kind) (rate(fabrica_production_booked_parts_total[5m])) * 60", "{{kind}}")]),
        ("Tag events applied per second", "short", [("sum(rate(fabrica_production_tag_events_total[5m]))", "events")]),
        ("Counter anomalies per minute", "short",
         [("sum(rate(fabrica_production_tag_anomalies_total[5m])) * 60", "anomalies")]),
        ("Tag-event lag, by consumer", "s", [("fabrica_tag_events_lag_seconds", "{{consumer}}")]),
    ]),
}


def dashboard(uid: str, title: str, panels: list[tuple[str, str, list[tuple[str, str]]]]) -> dict:
    out = []
    for i, (panel_title, unit, targets) in enumerate(panels):
        out.append({
            "id": i + 1, "type": "timeseries", "title": panel_title,
            "datasource": {"type": "prometheus", "uid": "${datasource}"},
            "gridPos": {"h": 8, "w": 12, "x": 12 * (i % 2), "y": 8 * (i // 2)},
            "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
            "targets": [{"refId": chr(ord("A") + j), "expr": expr, "legendFormat": legend}
                        for j, (expr, legend) in enumerate(targets)],
        })
    return {
        "uid": uid, "title": title, "tags": ["fabrica"], "schemaVersion": 39, "version": 1, "editable": True,
        "time": {"from": "now-6h", "to": "now"}, "refresh": "30s",
        "templating": {"list": [{"name": "datasource", "type": "datasource", "query": "prometheus",
                                 "label": "Prometheus"}]},
        "panels": out,
    }


def render() -> dict[str, str]:
    return {f"{uid}.json": json.dumps(dashboard(uid, title, panels), indent=2) + "\n"
            for uid, (title, panels) in DASHBOARDS.items()}


def main(argv: list[str]) -> int:
    files = render()
    if "--check" in argv:
        stale = [n for n, text in files.items() if not (OUT / n).is_file() or (OUT / n).read_text() != text]
        stale += [p.name for p in OUT.glob("*.json") if p.name not in files]
        if stale:
            print(f"deploy/grafana is not current ({', '.join(sorted(stale))}): run scripts/grafana_dashboards.py")
            return 1
        return 0
    OUT.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (OUT / name).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
