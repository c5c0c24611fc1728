"""Page tokens and etags, one way for every service.

A page token is opaque to clients (AIP-158): URL-safe base64 of ``v1 NUL query NUL position``. `query` is
whatever identifies the list being paged (a filter's fingerprint, a collector id, a resource kind), so a
token handed back with a different query is refused instead of silently skipping rows; `position` is the
service's own cursor (the last id, or a few numbers joined by commas). An etag is the resource's
revision, ``r<revision>``; a stale one is ABORTED (the service compares).
"""

from __future__ import annotations

import base64
import binascii

from .errors import FieldViolation, InvalidArgument

_VERSION = "v1"


def etag_of(revision: int) -> str:
    """The etag of a resource at `revision`."""
    return f"r{revision}"


def encode_page_token(query: str, position: str) -> str:
    """The token that resumes `query` after `position`."""
    return base64.urlsafe_b64encode(f"{_VERSION}\0{query}\0{position}".encode()).decode()


def decode_page_token(token: str, query: str) -> str:
    """The position a token stands for; INVALID_ARGUMENT(page_token) if it is not ours or is another query's."""
    try:
        version, owner, position = base64.urlsafe_b64decode(token.encode()).decode().split("\0")
    except (ValueError, UnicodeDecodeError, binascii.Error):
        raise InvalidArgument(FieldViolation("page_token", "not a token this service issued")) from None
    if version != _VERSION or owner != query:
        raise InvalidArgument(FieldViolation("page_token", "the token belongs to a different query"))
    return position


def decode_int_page_token(token: str, query: str) -> int | None:
    """A token whose position is one whole number (a service-assigned id); None for no token."""
    if not token:
        return None
    position = decode_page_token(token, query)
    if not position.isascii() or not position.isdigit():
        raise InvalidArgument(FieldViolation("page_token", "not a token this service issued"))
    return int(position)
