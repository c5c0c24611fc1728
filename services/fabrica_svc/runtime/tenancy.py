"""Tenants: whose data an RPC (or a background task) works on, and how Postgres enforces it.

Every resource belongs to one tenant (a company, code e.g. ``acme``). Ids are unique within a tenant.

How a request names its tenant (the contract, also written in ``protos/fabrica/common/v1/auth.proto``):
- A tenant's caller (a token with a ``tenant`` claim, a collector certificate with a
  ``urn:fabrica:tenant:<code>`` URI SAN) acts in its own tenant only. A token or certificate that names no
  tenant is of the tenant ``default`` (the one every installation has; all data from before tenants is
  there). Sending the header ``x-fabrica-tenant`` with another tenant is PERMISSION_DENIED (it confirms
  nothing about that tenant's resources).
- An installation-wide caller (a token with ``"tenant": "*"``, a service's certificate, the development
  mode) says which tenant per request with the header ``x-fabrica-tenant: <code>``. Without the header a
  user acts in ``default``; a service (an internal consumer such as production reading ingest's events)
  acts across tenants (``*``), and every message it receives names its tenant.

How it is enforced: the server interceptor sets the tenant of the RPC (`current`) next to its principal;
every connection taken from a service's pool (runtime/db.py ``create_pool``) sets the session setting
``fabrica.tenant`` to it on acquire, and runs as the role ``fabrica_rls`` (not a superuser, not the
tables' owner), so each table's row-level-security policy (:func:`isolate_sql`) lets a statement see and
write only rows of that tenant. A connection taken outside any tenant (a background task that forgot to
say whose work it does) has ``fabrica.tenant`` empty and sees nothing: a forgotten filter fails closed.
Background work across tenants says so with ``system()``; inside it, an insert must name its tenant.

Why row-level security rather than a ``WHERE tenant_id = $1`` in each query (the trade-off, issue 15):
- A filter written by hand in every statement of every store fails open: the one query that forgets it
  (or a new store method, a join added later, a maintenance job) serves every tenant's rows, and tests of
  the happy path pass. The policy is on the table: whatever the statement, it sees the session's tenant's
  rows only, and a session that names no tenant sees none. Forgetting fails closed, visibly (empty
  answers, NOT NULL violations on insert) rather than silently leaking.
- Costs: the role ``fabrica_rls`` (the policies do not bind a superuser or, unless forced, the owner), whose
  grants `role_sql` renews at every start, and runtime DDL that steps back to the owner (``SET LOCAL ROLE
  NONE``); one ``set_config`` per acquire; ``COPY ... FROM`` is refused on a table with row-level security,
  so bulk loads go through an unpoliced staging (temporary) table and ``INSERT ... SELECT`` under the batch's
  tenant; the planner adds the policy's predicate to every statement (keep ``tenant_id`` leading in the
  primary key or an index, and the ``current_setting`` call is STABLE, evaluated once per statement); a
  partition queried directly does not apply its parent's policy, so each partition is isolated too (or not
  reachable by the role); and writes across tenants (``*``) must name ``tenant_id`` themselves, which the
  ``WITH CHECK`` and the column's NULL default enforce.
- tests/tenancy/test_rls.py proves the fail-closed half (every table forced; a raw SELECT without a tenant
  sees nothing), tests/tenancy/test_isolation.py the contract half (every RPC, generated from the
  descriptors: another tenant's ids are NOT_FOUND or empty).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import inspect
import re
from collections.abc import AsyncIterator, Callable, Collection, Iterable, Iterator
from typing import Any

from .errors import FieldViolation, InvalidArgument

#: The tenant of everything that names none (tokens without a tenant claim, data from before tenants).
DEFAULT = "default"
#: The scope of installation-wide work: every tenant's rows (writes must name their tenant).
ALL = "*"
#: The request header an installation-wide caller names its tenant with.
HEADER = "x-fabrica-tenant"
#: The Postgres session setting the policies read.
SETTING = "fabrica.tenant"
#: The role every service's pool connections run as (row-level security applies to it).
DB_ROLE = "fabrica_rls"
#: A tenant code: lower-case letters, digits and dashes, starting with a letter; at most 63 characters.
CODE_PATTERN = r"^[a-z][a-z0-9-]{0,62}$"
_CODE = re.compile(CODE_PATTERN)

_current: contextvars.ContextVar[str | None] = contextvars.ContextVar("fabrica_tenant", default=None)


def is_code(value: str) -> bool:
    return bool(_CODE.match(value))


def current() -> str | None:
    """The tenant the running task works for: a code, ``*`` (across tenants), or None (nobody said)."""
    return _current.get()


def require() -> str:
    """The single tenant of the running task; RuntimeError when there is none or it is ``*`` (a bug: code
    that needs one tenant runs outside a request or without `scope`)."""
    tenant = _current.get()
    if tenant is None or tenant == ALL:
        raise RuntimeError(f"this needs the tenant of a request, not {tenant!r}")
    return tenant


def require_one(what: str) -> str:
    """The single tenant of the running RPC; INVALID_ARGUMENT (a field violation on the header) for a call
    across tenants (``*``, or no tenant): `what` (e.g. "production's orders") belongs to one tenant."""
    tenant = _current.get()
    if tenant is None or tenant == ALL:
        raise InvalidArgument(FieldViolation(
            HEADER, f"{what} belong to one tenant: an installation-wide caller names it with the {HEADER} header, "
                    "not *"))
    return tenant


def in_one_tenant(method: Callable[..., Any], what: str) -> Callable[..., Any]:
    """A servicer method (unary or server-streaming) that first requires one tenant (`require_one`)."""
    if inspect.isasyncgenfunction(method):
        @functools.wraps(method)
        async def stream(self: Any, request: Any, context: Any) -> AsyncIterator[Any]:  # noqa: ANN401
            require_one(what)
            async with contextlib.aclosing(method(self, request, context)) as out:
                async for response in out:
                    yield response
        return stream

    @functools.wraps(method)
    async def unary(self: Any, request: Any, context: Any) -> Any:  # noqa: ANN401
        require_one(what)
        return await method(self, request, context)
    return unary


def every_rpc_in_one_tenant(cls: type, service: Any, what: str, *, except_: Collection[str] = ()) -> type:
    """Wrap every RPC of `service` (a ServiceDescriptor) that `cls` serves, but `except_`, with
    `in_one_tenant`; returns `cls` (usable as a class decorator)."""
    for name in service.methods_by_name:
        if name in cls.__dict__ and name not in except_:
            setattr(cls, name, in_one_tenant(cls.__dict__[name], what))
    return cls


def set_current(tenant: str | None) -> contextvars.Token[str | None]:
    return _current.set(tenant)


def reset(token: contextvars.Token[str | None]) -> None:
    _current.reset(token)


@contextlib.contextmanager
def scope(tenant: str) -> Iterator[str]:
    """Work for `tenant` (a code or ``*``) inside the block: connections acquired in it are scoped to it."""
    if tenant != ALL and not is_code(tenant):
        raise ValueError(f"not a tenant code: {tenant!r}")
    token = _current.set(tenant)
    try:
        yield tenant
    finally:
        _current.reset(token)


def system() -> contextlib.AbstractContextManager[str]:
    """Installation-wide work (a writer of every tenant's batches, a consumer of every tenant's events)."""
    return scope(ALL)


def requested(metadata: Iterable[tuple[str, Any]] | None) -> str | None:
    """The value of the ``x-fabrica-tenant`` header, or None."""
    for key, value in metadata or ():
        if key.lower() == HEADER:
            return value.decode() if isinstance(value, bytes) else str(value)
    return None


def session_value() -> str:
    """What ``fabrica.tenant`` is set to on a connection acquired now: the tenant, ``*``, or '' (none)."""
    return _current.get() or ""


# --- SQL ---------------------------------------------------------------------------------------------

#: The predicate of every tenant policy: the row's tenant is the session's, or the session is across tenants.
POLICY_PREDICATE = (f"(tenant_id = current_setting('{SETTING}', true)"
                    f" OR current_setting('{SETTING}', true) = '{ALL}')")


def session_tenant_function_sql(schema: str) -> str:
    """``<schema>.session_tenant()``: the session's single tenant, NULL when none or across tenants. It is
    the default of every ``tenant_id`` column, so an insert in a request lands in the caller's tenant and
    one across tenants that forgets to name its tenant fails (NOT NULL)."""
    return (f'CREATE OR REPLACE FUNCTION "{schema}".session_tenant() RETURNS text LANGUAGE sql STABLE AS '
            f"$$ SELECT NULLIF(NULLIF(current_setting('{SETTING}', true), ''), '{ALL}') $$;")


def isolate_sql(schema: str, table: str, *, existing_rows_tenant: str = DEFAULT) -> str:
    """SQL (for a migration) that gives `table` a ``tenant_id`` column (existing rows: `existing_rows_tenant`;
    new rows: the session's tenant) and turns on row-level security with the tenant policy, forced, so that
    the table's owner is subject to it too. Primary keys and unique constraints are the caller's to widen
    to (tenant_id, ...)."""
    qualified = f'"{schema}".{table}'
    return f"""
        {session_tenant_function_sql(schema)}
        ALTER TABLE {qualified} ADD COLUMN IF NOT EXISTS tenant_id text NOT NULL DEFAULT '{existing_rows_tenant}';
        ALTER TABLE {qualified} ALTER COLUMN tenant_id SET DEFAULT "{schema}".session_tenant();
        ALTER TABLE {qualified} ADD CONSTRAINT {table}_tenant_id_code CHECK (tenant_id <> '{ALL}' AND tenant_id <> '');
        ALTER TABLE {qualified} ENABLE ROW LEVEL SECURITY;
        ALTER TABLE {qualified} FORCE ROW LEVEL SECURITY;
        DROP POLICY IF EXISTS tenant_isolation ON {qualified};
        CREATE POLICY tenant_isolation ON {qualified} USING {POLICY_PREDICATE} WITH CHECK {POLICY_PREDICATE};
    """


def role_sql(schema: str) -> str:
    """SQL run (by runtime/db.py ``apply_migrations``, as the migrating user) after each start's migrations:
    the role ``fabrica_rls`` exists, may use `schema` and its tables, sequences and functions, and the
    migrating user may SET ROLE to it. Idempotent; safe when several services start at once."""
    return f"""
        DO $$ BEGIN
            CREATE ROLE {DB_ROLE} NOLOGIN NOBYPASSRLS;
        EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL;
        END $$;
        DO $$ BEGIN
            IF NOT (SELECT rolsuper FROM pg_roles WHERE rolname = current_user) THEN
                EXECUTE format('GRANT {DB_ROLE} TO %I', current_user);
            END IF;
        EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL;
        END $$;
        GRANT USAGE, CREATE ON SCHEMA "{schema}" TO {DB_ROLE};
        GRANT SELECT, INSERT, UPDATE, DELETE, TRUNCATE, REFERENCES, TRIGGER ON ALL TABLES IN SCHEMA "{schema}" TO {DB_ROLE};
        GRANT USAGE, SELECT, UPDATE ON ALL SEQUENCES IN SCHEMA "{schema}" TO {DB_ROLE};
        GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA "{schema}" TO {DB_ROLE};
    """


__all__ = [
    "ALL", "CODE_PATTERN", "DB_ROLE", "DEFAULT", "HEADER", "POLICY_PREDICATE", "SETTING", "current",
    "every_rpc_in_one_tenant", "in_one_tenant", "is_code", "isolate_sql", "requested", "require", "require_one",
    "reset", "role_sql", "scope", "session_tenant_function_sql",
    "session_value", "set_current", "system",
]
