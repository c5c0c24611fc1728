"""Issue 15, "must show": row-level security fails closed. Every table of the services' schemas has RLS
enabled AND forced (so the tables' owner is held by it too), except tables a service documents as holding
no tenant's data (its ``UNSCOPED_TABLES``); and a raw SELECT through a service's own pool connection
(runtime/db.py create_pool: role fabrica_rls) with no tenant set returns no row of any scoped table that has
rows — what a store method that forgot its tenant would get.

The services run in process over one database (development mode: the default tenant's data, made through
their APIs), so every migration of every schema has run; the catalogue is then walked (pg_class ⋈
pg_namespace), not a list kept by hand, so a new table is covered.

Partitions: a partition (relispartition) is skipped when its parent has RLS forced AND the pool's role
fabrica_rls has no privilege on the partition itself, so that it is only reached through the parent, whose
policy then applies; a partition the role can SELECT directly must have RLS of its own (a direct SELECT on a
partition does not apply the parent's policy).
"""

from __future__ import annotations

import importlib
from pathlib import Path

import asyncpg
import grpc
from fabrica.alarm.v1 import alarm_service_pb2 as alarm_pb
from fabrica.config.v1 import config_service_pb2 as config_pb
from fabrica.production.v1 import production_service_pb2 as prod_pb

from alarm.support import create_press, gt_rule
from fabrica_svc.runtime import tenancy
from fabrica_svc.runtime.db import create_pool
from in_process import Servers, settings_for
from ingest.support import TEST_CONFIG, batch, reading, stream_batches
from production.support import TEST_CONSUMER, new_order, seed

SCHEMAS = ("config", "ingest", "production", "alarm")
#: Modules a service may name its allow-list in (UNSCOPED_TABLES: table name -> why it holds no tenant's data).
ALLOW_LIST_MODULES = {
    "config": ("fabrica_svc.config.store",),
    "ingest": ("fabrica_svc.ingest.store",),
    "production": ("fabrica_svc.production.store", "fabrica_svc.production.store.schema"),
    "alarm": ("fabrica_svc.alarm.store", "fabrica_svc.alarm.notify.schema", "fabrica_svc.alarm.notify"),
}
#: Tables of every schema that hold no tenant's data, whatever a service says.
ALWAYS_UNSCOPED = {"schema_migrations": "the migrations applied to the schema: bookkeeping of the installation"}
#: Allow-lists a service documents in prose rather than as UNSCOPED_TABLES (none now).
DOCUMENTED_UNSCOPED: dict[str, dict[str, str]] = {}


def unscoped_tables(schema: str) -> dict[str, str]:
    """The service's documented allow-list (tolerantly: a module or constant that is not there is none),
    plus ALWAYS_UNSCOPED."""
    out = {**ALWAYS_UNSCOPED, **DOCUMENTED_UNSCOPED.get(schema, {})}
    for name in ALLOW_LIST_MODULES[schema]:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        listed = getattr(module, "UNSCOPED_TABLES", None)
        if isinstance(listed, dict):
            out.update({str(k).split(".")[-1]: str(v) for k, v in listed.items()})
        elif listed:
            out.update({str(k).split(".")[-1]: f"listed in {name}.UNSCOPED_TABLES" for k in listed})
    return out


CATALOGUE = """
SELECT n.nspname AS schema, c.relname AS table, c.relkind, c.relrowsecurity AS enabled,
       c.relforcerowsecurity AS forced, c.relispartition AS partition,
       (SELECT p.relname FROM pg_inherits i JOIN pg_class p ON p.oid = i.inhparent WHERE i.inhrelid = c.oid) AS parent,
       (SELECT p.relforcerowsecurity AND p.relrowsecurity FROM pg_inherits i JOIN pg_class p ON p.oid = i.inhparent
         WHERE i.inhrelid = c.oid) AS parent_forced,
       has_table_privilege('fabrica_rls', c.oid, 'SELECT') AS role_can_select
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = ANY($1::text[]) AND c.relkind IN ('r', 'p')
ORDER BY 1, 2
"""


async def _seed_everything(servers: Servers, database_url: str, tmp_path: Path) -> None:
    """Rows in the services' tables, made through their APIs (development mode: the default tenant)."""
    def settings(name: str, **kw: object):  # noqa: ANN202
        return settings_for(name, database_url=database_url, data_dir=tmp_path / name, **kw)

    config = await servers.start("config", settings("config"))
    ingest = await servers.start("ingest", settings("ingest", config_addr=config.address), grace=0.5,
                                 config=TEST_CONFIG)
    production = await servers.start("production", settings("production", ingest_addr=ingest.address,
                                                             config_addr=config.address), consumer=TEST_CONSUMER)
    alarm = await servers.start("alarm", settings("alarm", ingest_addr=ingest.address, config_addr=config.address))
    press = await create_press(config.stub, collector_id="cell-1")
    await config.stub.ReportCollectorStatus(config_pb.ReportCollectorStatusRequest(collector_id="cell-1",
                                                                                   applied_revision=1))
    temperature = next(t.id for t in press.tags if t.name == "press.temperature")
    await alarm.stub.CreateAlarmRule(alarm_pb.CreateAlarmRuleRequest(rule=gt_rule("hot", press.id, temperature, 1.0)))
    import time
    now_us = int(time.time() * 1e6)
    await stream_batches(ingest.stub, "cell-1", [batch("cell-1", s, [reading(temperature, now_us + s, 50.0,
                                                                             plc_id=press.id)]) for s in (1, 2, 3)])
    await seed(production.stub)
    order = await new_order(production.stub, start=True)
    await production.stub.CreateBooking(prod_pb.CreateBookingRequest(booking={"order_id": order.id,
                                                                              "good_quantity": 3}))


async def test_every_table_has_row_level_security_forced_and_a_raw_select_without_a_tenant_sees_nothing(
        database_url: str, servers: Servers, tmp_path: Path) -> None:
    try:
        await _seed_everything(servers, database_url, tmp_path)
    except grpc.aio.AioRpcError as err:  # the walk below still says what is not isolated
        print(f"seeding stopped early: {err.code().name} {err.details()}")
    owner = await asyncpg.connect(database_url)
    try:
        rows = await owner.fetch(CATALOGUE, list(SCHEMAS))
        counts = {}
        for r in rows:
            counts[(r["schema"], r["table"])] = await owner.fetchval(
                f'SELECT count(*) FROM ONLY "{r["schema"]}"."{r["table"]}"' if r["relkind"] == "r" else
                f'SELECT count(*) FROM "{r["schema"]}"."{r["table"]}"')
    finally:
        await owner.close()
    assert {r["schema"] for r in rows} == set(SCHEMAS), "a schema has no tables: did every service migrate?"

    problems: list[str] = []
    scoped: dict[str, list[str]] = {s: [] for s in SCHEMAS}
    skipped: list[str] = []
    for r in rows:
        schema, table = r["schema"], r["table"]
        allowed = unscoped_tables(schema)
        if table in allowed:
            skipped.append(f"{schema}.{table}: unscoped ({allowed[table]})")
            continue
        if r["partition"] and r["parent_forced"] and not r["role_can_select"]:
            skipped.append(f"{schema}.{table}: a partition of {r['parent']} (RLS forced), reached only through it")
            continue
        if not (r["enabled"] and r["forced"]):
            what = "not enabled" if not r["enabled"] else "enabled but not forced (its owner bypasses it)"
            hint = (f" (a partition of {r['parent']} that fabrica_rls can SELECT directly: a direct SELECT does "
                    "not apply the parent's policy)") if r["partition"] else ""
            problems.append(f"{schema}.{table}: row-level security {what}{hint}; isolate it or add it to "
                            f"the service's UNSCOPED_TABLES with the reason")
        scoped[schema].append(table)

    # A raw SELECT through each service's own pool, outside any tenant: nothing of any scoped table.
    checked = 0
    for schema in SCHEMAS:
        pool = await create_pool(database_url, schema, min_size=1, max_size=1)
        try:
            assert tenancy.current() is None
            for table in scoped[schema]:
                if not counts[(schema, table)]:
                    continue
                async with pool.acquire() as conn:
                    try:
                        seen = await conn.fetchval(f'SELECT count(*) FROM "{schema}"."{table}"')
                    except asyncpg.InsufficientPrivilegeError as err:
                        problems.append(f"{schema}.{table}: the pool's role may not read it at all ({err}): "
                                        "apply_migrations' grants miss it")
                        continue
                checked += 1
                if seen:
                    problems.append(f"{schema}.{table}: a SELECT without a tenant sees {seen} of its "
                                    f"{counts[(schema, table)]} rows (row-level security does not fail closed)")
            # The control: in the rows' tenant the same pool sees them (the zeros above are the policy's).
            with tenancy.scope(tenancy.DEFAULT):
                for table in scoped[schema]:
                    if counts[(schema, table)] and not problems:
                        async with pool.acquire() as conn:
                            assert await conn.fetchval(f'SELECT count(*) FROM "{schema}"."{table}"') > 0, table
        finally:
            await pool.close()
    print("\n".join(skipped))
    with_rows = {s: [t for t in scoped[s] if counts[(s, t)]] for s in SCHEMAS}
    assert not problems, f"{len(problems)} table(s) not isolated:\n" + "\n".join(problems)
    assert all(with_rows.values()), f"no scoped table with rows in some schema (the seeding broke): {with_rows}"
    assert checked == sum(len(v) for v in with_rows.values())
