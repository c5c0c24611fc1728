"""Options for the long-lived channels one Fabrica service keeps to another (collector → config and
ingest, production → ingest)."""

from __future__ import annotations

#: gRPC's default reconnect backoff grows to two minutes: after a peer restarts, data would lag that long.
#: Reconnect within 100 ms to 2 s instead. Keepalive notices a peer that vanished without closing the
#: connection, and keeps idle streams (a watch with nothing to say) open through middleboxes.
PEER_CHANNEL_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 2_000),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
)
