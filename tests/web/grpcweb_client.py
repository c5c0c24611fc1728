"""A small gRPC-Web client for the tests, written from the protocol (no gRPC-Web library), so the tests see
exactly what a browser would: the HTTP status, every response header, each length-prefixed message frame
and the trailer frame.

Framing (gRPC-Web, binary): each frame is 1 flag byte, a 4-byte big-endian length, then the payload; flag
0x00 is a message, 0x80 the trailers ("key: value\\r\\n" lines). A trailers-only answer has no body and the
status in the headers.
"""

from __future__ import annotations

import base64
import http.client
import struct
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field

from google.protobuf.message import Message
from google.rpc import status_pb2

CONTENT_TYPE = "application/grpc-web+proto"


@dataclass
class Reply:
    http_status: int
    headers: dict[str, str]
    messages: list[bytes] = field(default_factory=list)
    trailers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""

    @property
    def status(self) -> int | None:
        """The gRPC status code: from the trailer frame, or from the headers of a trailers-only answer."""
        raw = self.trailers.get("grpc-status", self.headers.get("grpc-status"))
        return None if raw is None else int(raw)

    @property
    def message(self) -> str:
        raw = self.trailers.get("grpc-message", self.headers.get("grpc-message", ""))
        return urllib.parse.unquote(raw)

    @property
    def details_bin(self) -> bytes | None:
        raw = self.trailers.get("grpc-status-details-bin", self.headers.get("grpc-status-details-bin"))
        return None if raw is None else base64.b64decode(raw + "=" * (-len(raw) % 4))

    def status_details(self) -> status_pb2.Status | None:
        raw = self.details_bin
        return None if raw is None else status_pb2.Status.FromString(raw)


def frame(message: bytes) -> bytes:
    return struct.pack(">BI", 0, len(message)) + message


def _read_frames(response: http.client.HTTPResponse, reply: Reply, max_messages: int | None) -> None:
    while True:
        head = response.read(5)
        if not head:
            return
        if len(head) < 5:
            raise AssertionError(f"truncated frame header {head!r}")
        flag, length = struct.unpack(">BI", head)
        payload = response.read(length)
        if len(payload) != length:
            raise AssertionError(f"truncated frame: {len(payload)} of {length} bytes")
        if flag & 0x80:
            for line in payload.decode("latin-1").split("\r\n"):
                if line:
                    key, _, value = line.partition(":")
                    reply.trailers[key.strip().lower()] = value.strip()
            return
        reply.messages.append(payload)
        if max_messages is not None and len(reply.messages) >= max_messages:
            return


def call(base_url: str, path: str, request: Message | bytes | None = None, *,
         headers: Mapping[str, str] | None = None, method: str = "POST", content_type: str = CONTENT_TYPE,
         max_messages: int | None = None, timeout: float = 30.0) -> Reply:
    """One call (unary or server streaming) to `path`; with `max_messages`, stops reading (and closes the
    connection) after that many messages."""
    url = urllib.parse.urlsplit(base_url)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=timeout)
    body = b""
    if request is not None:
        body = frame(request if isinstance(request, bytes) else request.SerializeToString())
    all_headers = {"x-grpc-web": "1", "accept": CONTENT_TYPE}
    if content_type:
        all_headers["content-type"] = content_type
    all_headers.update(headers or {})
    try:
        conn.request(method, path, body=body if method == "POST" else None, headers=all_headers)
        response = conn.getresponse()
        reply = Reply(response.status, {k.lower(): v for k, v in response.getheaders()})
        if response.status == 200 and reply.headers.get("content-type", "").startswith("application/grpc-web"):
            _read_frames(response, reply, max_messages)
        else:
            reply.body = response.read()
        return reply
    finally:
        conn.close()
