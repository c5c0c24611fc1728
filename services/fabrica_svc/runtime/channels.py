"""The long-lived channels one Fabrica service keeps to another (collector → config and ingest, production →
ingest and config), all made by :func:`peer_channel`, and the one message size limit of every server and
channel."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

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


def peer_channel(address: str, settings: Settings | None,
                 options: Sequence[tuple[str, Any]] = PEER_CHANNEL_OPTIONS) -> grpc.aio.Channel:
    """The channel every outbound call of a service uses (collector → config and ingest, production →
    ingest and config): TLS with this service's certificate as the client certificate when it has one
    (``settings.tls``, runtime/tls.py: the server is verified against FABRICA_TLS_CA, and the peer's
    port is its mutual-TLS FABRICA_PEER_PORT), plaintext only in development mode (FABRICA_INSECURE=1).
    `settings` None is plaintext too: for a test that builds a client part without a service around it."""
    if settings is not None and settings.tls is not None:
        return grpc.aio.secure_channel(address, settings.tls.channel_credentials(), options=options)
    return grpc.aio.insecure_channel(address, options=options)
