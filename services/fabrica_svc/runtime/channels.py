"""The long-lived channels one Fabrica service keeps to another (collector → config and ingest, production →
ingest and config, the demo), all made by :func:`peer_channel` (TLS, the bearer token and client spans), and the one
message size limit of every server and channel."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc

from . import tenancy
from .settings import Settings, SettingsError
from .telemetry import client_interceptors

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


class _TokenSource:
    """The bearer token a service sends its peers: FABRICA_TOKEN_FILE (re-read when the file changes, so a
    rotated token is picked up without a restart) or FABRICA_TOKEN. A file that cannot be read at start is a
    SettingsError naming the variable; later, the last token read is kept."""

    def __init__(self, token_file: Path | None, token: str):
        self.file, self._token = token_file, token
        self._mtime: float | None = None
        if token_file is not None:
            try:
                self._load()
            except OSError as exc:
                raise SettingsError(f"FABRICA_TOKEN_FILE={token_file}: cannot read it: {exc.strerror or exc}") from None
            if not self._token:
                raise SettingsError(f"FABRICA_TOKEN_FILE={token_file} is empty")

    def _load(self) -> None:
        assert self.file is not None
        mtime = self.file.stat().st_mtime
        if mtime != self._mtime:
            self._token, self._mtime = self.file.read_text().strip(), mtime

    def get(self) -> str:
        if self.file is not None:
            with contextlib.suppress(OSError):
                self._load()
        return self._token

    def __repr__(self) -> str:  # never the token itself
        return f"_TokenSource(file={self.file}, token={'set' if self._token else 'unset'})"


class _BearerToken:
    """Adds ``authorization: Bearer <token>`` (when `source` has one) and ``x-fabrica-tenant`` (when
    `tenant` is set) to a call's metadata (so it works over plaintext as over TLS)."""

    def __init__(self, source: _TokenSource | None, tenant: str = ""):
        self.source = source
        self.tenant = tenant

    def _details(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        token = self.source.get() if self.source is not None else ""
        if not token and not self.tenant:
            return details
        metadata = grpc.aio.Metadata(*(details.metadata or ()))
        if token:
            metadata["authorization"] = f"Bearer {token}"
        if self.tenant and tenancy.HEADER not in metadata:
            metadata[tenancy.HEADER] = self.tenant
        return details._replace(metadata=metadata)  # type: ignore[attr-defined]


# grpc.aio files each interceptor under the first of the four call shapes it implements, so each shape has
# a class of its own.
class _UnaryUnaryToken(_BearerToken, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation, client_call_details, request):  # type: ignore[no-untyped-def]
        return await continuation(self._details(client_call_details), request)


class _UnaryStreamToken(_BearerToken, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation, client_call_details, request):  # type: ignore[no-untyped-def]
        return await continuation(self._details(client_call_details), request)


class _StreamUnaryToken(_BearerToken, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation, client_call_details, request_iterator):  # type: ignore[no-untyped-def]
        return await continuation(self._details(client_call_details), request_iterator)


class _StreamStreamToken(_BearerToken, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation, client_call_details, request_iterator):  # type: ignore[no-untyped-def]
        return await continuation(self._details(client_call_details), request_iterator)


def peer_channel(address: str, settings: Settings | None = None,
                 options: Sequence[tuple[str, Any]] = PEER_CHANNEL_OPTIONS, *, tenant: str | None = None) -> grpc.aio.Channel:
    """The one way a Fabrica service opens a channel to another (collector → config and ingest, production →
    ingest and config, the demo), with PEER_CHANNEL_OPTIONS:

    - TLS with this service's certificate as the client certificate when it has one (``settings.tls``,
      runtime/tls.py: the server is verified against FABRICA_TLS_CA, and the peer's port is its mutual-TLS
      FABRICA_PEER_PORT); plaintext only in development mode (FABRICA_INSECURE=1);
    - the bearer token of `settings` (FABRICA_TOKEN_FILE / FABRICA_TOKEN) as call metadata on every call;
    - a client span per call (runtime/telemetry.py client_interceptors), its W3C traceparent in the metadata;
    - the header ``x-fabrica-tenant`` (runtime/tenancy.py) with `tenant`, else ``settings.tenant``
      (FABRICA_TENANT), when either is set: an internal consumer of every tenant's events passes ``*``.

    `settings` None is plaintext without a token: for a test that builds a client part without a service
    around it. SettingsError for an unreadable token file."""
    # Outermost first: the client span (its traceparent goes into the metadata), then the token.
    interceptors: list[Any] = list(client_interceptors())
    source = (_TokenSource(settings.token_file, settings.token)
              if settings is not None and (settings.token_file is not None or settings.token) else None)
    named = tenant if tenant is not None else (settings.tenant if settings is not None else "")
    if source is not None or named:
        interceptors += [shape(source, named) for shape in (_UnaryUnaryToken, _UnaryStreamToken, _StreamUnaryToken,
                                                            _StreamStreamToken)]
    if settings is not None and settings.tls is not None:
        return grpc.aio.secure_channel(address, settings.tls.channel_credentials(), options=list(options),
                                       interceptors=interceptors)
    return grpc.aio.insecure_channel(address, options=list(options), interceptors=interceptors)


def check_peer_token(settings: Settings) -> None:
    """SettingsError (naming FABRICA_TOKEN_FILE) now, at start, for a token file peer_channel could not read."""
    _TokenSource(settings.token_file, settings.token)
