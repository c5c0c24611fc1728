"""Clients of the services' contracts, for other services, tests and benchmarks (no server code here).

- ``ingest``: ``IngestUplink``, the client side of ingest's StreamReadings (the collector's uplink runs it).
- ``tags``: ``sync_tags``, ingest's SyncTags (the collector tells ingest the names and units of its tags).
- ``errors``: decodes a ``google.rpc.Status`` from a failed call (ErrorInfo reason, field violations) for
  the clients' logs and retry decisions.
"""
