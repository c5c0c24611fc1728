"""The audit trail: one table per service schema, written in the transaction of each change.

A store records a change with ``await audit.record(conn, "orders/42", "PLANNED -> RUNNING")`` on the
connection of the transaction that makes it: the entry commits with the change or not at all. The action is
the RPC's method (``StartOrder``) unless given; who made it is the RPC's principal (runtime/principal.py
``actor()``, ``system`` outside an RPC); the request id is the call's ``x-request-id`` metadata or one the
interceptor made up (:func:`begin_call`). Each service adds
:func:`migration` to its migrations and answers ``ListAuditEntries`` with :func:`list_entries`.

Details are short summaries written by the stores; they never carry secrets (tokens, passwords).
"""

from __future__ import annotations

import contextvars
import re
import uuid
from datetime import datetime
from typing import Any

import asyncpg
from fabrica.common.v1 import audit_pb2
from google.protobuf import message

from . import principal
from .db import Migration
from .errors import FieldViolation, InvalidArgument
from .pages import decode_int_page_token, encode_page_token
from .timefmt import optional_datetime, timestamp_from_datetime

#: The SQL of the audit table, the same in every schema (applied by each service's own migration).
TABLE_SQL = """
CREATE TABLE audit_entries (
    id bigserial PRIMARY KEY,
    time timestamptz NOT NULL DEFAULT now(),
    actor text NOT NULL,
    via text NOT NULL DEFAULT '',
    action text NOT NULL,
    resource text NOT NULL,
    request_id text NOT NULL DEFAULT '',
    details text NOT NULL DEFAULT ''
);
CREATE INDEX audit_entries_actor ON audit_entries (actor, id);
CREATE INDEX audit_entries_resource ON audit_entries (resource, id);
CREATE INDEX audit_entries_time ON audit_entries (time, id);
"""

DEFAULT_PAGE_SIZE = 100
MAX_DETAILS = 1000

_request_id: contextvars.ContextVar[str] = contextvars.ContextVar("fabrica_request_id", default="")
_method: contextvars.ContextVar[str] = contextvars.ContextVar("fabrica_method", default="")
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:/+=-]{1,128}$")


def request_id() -> str:
    """The id of the request being served ("" outside an RPC)."""
    return _request_id.get()


def begin_call(method: str, metadata: Any) -> None:
    """Note the running RPC's method (the default action) and request id: its ``x-request-id`` metadata when
    that is a plain token of at most 128 characters, else a new UUID. The interceptor calls this; each RPC
    runs in a task of its own, so it is that RPC's alone."""
    _method.set(method)
    set_request_id(metadata)


def set_request_id(metadata: Any) -> contextvars.Token[str]:
    """Set the request id from ``x-request-id`` in `metadata`, else a new UUID."""
    given = ""
    for key, value in metadata or ():
        if key.lower() == "x-request-id":
            given = value.decode(errors="replace") if isinstance(value, bytes) else str(value)
            break
    return _request_id.set(given if _REQUEST_ID.match(given) else uuid.uuid4().hex)


def reset_request_id(token: contextvars.Token[str]) -> None:
    _request_id.reset(token)


async def record(conn: asyncpg.Connection, resource: str, details: str = "", *, action: str = "") -> None:
    """Write one entry about `resource` on `conn`, which must be in the transaction of the change it records.
    `action` defaults to the running RPC's method."""
    if not conn.is_in_transaction():
        raise RuntimeError("an audit entry is written in the transaction of its change")
    p = principal.current()
    await conn.execute(
        "INSERT INTO audit_entries (actor, via, action, resource, request_id, details)"
        " VALUES ($1, $2, $3, $4, $5, $6)",
        principal.actor(), p.via if p else "", action or _method.get() or "unknown", resource, request_id(),
        details[:MAX_DETAILS])


def migration(version: int) -> Migration:
    """The migration that adds the audit table to a service's schema, as that service's `version`."""
    return Migration(version, "audit trail: who changed what, when, under which request id", TABLE_SQL)


def isolation_sql(schema: str) -> str:
    """SQL for a service's tenants migration: each audit entry belongs to the tenant of the change it records
    (runtime/tenancy.py; entries from before tenants to ``default``), and a tenant reads only its own."""
    from .tenancy import isolate_sql

    return isolate_sql(schema, "audit_entries")


def _filter_key(f: audit_pb2.AuditFilter) -> str:
    return "audit:" + f.SerializeToString(deterministic=True).hex()


async def list_entries(pool: asyncpg.Pool, filter: audit_pb2.AuditFilter, page_size: int,
                       page_token: str) -> tuple[list[audit_pb2.AuditEntry], str]:
    """A page of entries matching `filter`, newest first, and the token of the next page ("" at the end)."""
    size = page_size or DEFAULT_PAGE_SIZE
    start = optional_datetime(filter, "start_time")
    end = optional_datetime(filter, "end_time")
    if start is not None and end is not None and end <= start:
        raise InvalidArgument(FieldViolation("filter.end_time", "must be after filter.start_time"))
    before = decode_int_page_token(page_token, _filter_key(filter))
    clauses, args = [], []

    def where(sql: str, value: Any) -> None:
        args.append(value)
        clauses.append(sql.format(f"${len(args)}"))

    if filter.actor:
        where("actor = {}", filter.actor)
    if filter.action:
        where("action = {}", filter.action)
    if filter.resource.endswith("/"):
        where("starts_with(resource, {})", filter.resource)
    elif filter.resource:
        where("resource = {}", filter.resource)
    if start is not None:
        where("time >= {}", start)
    if end is not None:
        where("time < {}", end)
    if before is not None:
        where("id < {}", before)
    args.append(size + 1)
    sql = ("SELECT id, time, actor, via, action, resource, request_id, details FROM audit_entries"
           f"{' WHERE ' + ' AND '.join(clauses) if clauses else ''} ORDER BY id DESC LIMIT ${len(args)}")
    rows = await pool.fetch(sql, *args)
    entries = [_entry(r) for r in rows[:size]]
    token = encode_page_token(_filter_key(filter), str(entries[-1].id)) if len(rows) > size else ""
    return entries, token


def _entry(row: asyncpg.Record) -> audit_pb2.AuditEntry:
    time: datetime = row["time"]
    return audit_pb2.AuditEntry(id=row["id"], time=timestamp_from_datetime(time), actor=row["actor"], via=row["via"],
                                action=row["action"], resource=row["resource"], request_id=row["request_id"],
                                details=row["details"])


async def list_response(pool: asyncpg.Pool, request: message.Message, response_type: type[Any]) -> Any:
    """The ListAuditEntriesResponse (of the service's own package) for `request`."""
    entries, token = await list_entries(pool, request.filter, request.page_size, request.page_token)  # type: ignore[attr-defined]
    return response_type(entries=entries, next_page_token=token)
