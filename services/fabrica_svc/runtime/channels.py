"""Options for the long-lived channels one Fabrica service keeps to another (collector → config and
ingest, production → ingest and config), and the one message size limit of every server and channel."""

from __future__ import annotations

from typing import TYPE_CHECKING

import grpc

if TYPE_CHECKING:
    from .settings import Settings

#: The largest message any Fabrica server or channel sends or receives, in bytes: 64 MiB. Servers
#: (runtime/server.py) and every peer channel take it from here, so whatever a service sends fits in what
#: its own clients accept. The contract keeps messages well inside it: a tag event's value is at most
#: 64 KiB (reading.proto), and WatchTagEvents sends at most 500 events a message (about 33 MB at worst;
#: tests/runtime/test_limits.py checks that bound). A larger message is the transport's RESOURCE_EXHAUSTED.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024

#: The message size options for grpc.aio.server() and grpc.aio.*_channel(): send and receive alike.
MESSAGE_LIMITS: tuple[tuple[str, int], ...] = (
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
)

#: gRPC's default reconnect backoff grows to two minutes: after a peer restarts, data would lag that long.
#: Reconnect within 100 ms to 2 s instead. Keepalive notices a peer that vanished without closing the
#: connection, and keeps idle streams (a watch with nothing to say) open through middleboxes. Message
#: sizes: MESSAGE_LIMITS.
PEER_CHANNEL_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 2_000),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    *MESSAGE_LIMITS,
)


def peer_channel(address: str, settings: Settings | None = None) -> grpc.aio.Channel:
    """The long-lived channel from one Fabrica process to another at `address` (host:port), with
    PEER_CHANNEL_OPTIONS. `settings` are the calling process's: whatever they say about the transport to
    peers applies here, so every caller that opens its channels through this function gets it alike.
    Today that is plaintext on a trusted network."""
    return grpc.aio.insecure_channel(address, options=PEER_CHANNEL_OPTIONS)
