"""The ingest service: stores readings exactly once and answers history, latest values and tag events.

Modules: ``config`` (FABRICA_INGEST_* settings), ``domain`` (plain rules: value encoding, grouping,
page cursors, partition days), ``convert`` (proto ⇄ domain), ``writer`` (batching, grouping, backpressure),
``store`` (all SQL, with the schema and the index trade-off), ``events`` (LISTEN fan-out to watchers),
``maintenance`` (partitions ahead, retention), ``servicer`` (the gRPC methods), ``app`` (wiring), and
``client`` (``IngestUplink``, the reusable StreamReadings client). README.md in this folder: where a
reading's CPU goes, and how ingest scales out (replicas; past one Postgres: time partitions, then Citus or
TimescaleDB, with what changes in the schema and the writer).
"""
