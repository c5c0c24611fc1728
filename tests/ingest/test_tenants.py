"""Tenants in ingest: row-level security on every table (a connection that names no tenant sees and writes
nothing), batches stamped with the tenant of the collector that streamed them, collectors of the same id in two
tenants apart, and a tenant's caller that reads another tenant's tag ids gets nothing. Real ingest, real
Postgres, real gRPC; callers name their tenant with the x-fabrica-tenant header (development mode: the caller is
installation-wide, runtime/tenancy.py), or with a collector certificate naming its tenant (mutual TLS)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import asyncpg
import grpc
import pytest
from grpc_helpers import error_info, field_violations

from fabrica.common.v1 import audit_pb2
from fabrica.ingest.v1 import ingest_service_pb2 as pb
from fabrica.ingest.v1 import ingest_service_pb2_grpc as pb_grpc
from fabrica.ingest.v1 import query_pb2
from fabrica_svc.clients.ingest import IngestUplink, ListBatchSource
from fabrica_svc.ingest.convert import batch_from_proto
from fabrica_svc.ingest.store import TENANT_TABLES, UNSCOPED_TABLES
from fabrica_svc.ingest.writer import StreamSession
from fabrica_svc.runtime import tenancy
from fabrica_svc.runtime.channels import PEER_CHANNEL_OPTIONS, peer_channel
from in_process import Servers, settings_for, start_server
from tls_support import Pki

from .support import (
    PRODUCTION_COUNTER, T0_US, TEST_CONFIG, batch, fetch, numbered_batches, open_request, reading, stream_batches,
    ts_us,
)

ACME, GLOBEX = "acme", "globex"
#: The ingest tables without a tenant (store.py UNSCOPED_TABLES: one-row marks and the rollup job's state).
NOT_TENANT_TABLES = set(UNSCOPED_TABLES)


def tenant_channel(address: str, tenant: str) -> grpc.aio.Channel:
    """A channel whose calls name `tenant` (x-fabrica-tenant), as an installation-wide caller's do."""
    return peer_channel(address, None, tenant=tenant)


def plant_batches(collector: str, count: int, *, tag_base: int, plc_id: str = "press-1") -> list:
    """Batches of a measurement and a production counter each (so readings, latest values, tags, tag events
    and the feed all get rows); reading values name the batch."""
    return [batch(collector, s, [reading(tag_base, T0_US + s * 1000, float(s), plc_id=plc_id),
                                 reading(tag_base + 1, T0_US + s * 1000, s * 10, plc_id=plc_id, role=PRODUCTION_COUNTER)])
            for s in range(1, count + 1)]


async def fill_tenant(address: str, tenant: str, tag_base: int) -> None:
    """A tenant's collector `line-1` streams, describes its tags and has its sequence reset (an audit entry)."""
    async with tenant_channel(address, tenant) as channel:
        stub = pb_grpc.IngestServiceStub(channel)
        _, acks = await stream_batches(stub, "line-1", plant_batches("line-1", 3, tag_base=tag_base))
        assert [a.sequence for a in acks] == [1, 2, 3] and all(not a.duplicate for a in acks)
        await stub.SyncTags(pb.SyncTagsRequest(collector_id="line-1", tags=[
            pb.TagInfo(tag_id=tag_base, plc_id="press-1", name="temperature", unit="C", role=1)]))
        await stub.ResetCollectorSequence(pb.ResetCollectorSequenceRequest(collector_id="line-1", committed_sequence=3))


async def test_every_ingest_table_is_isolated_and_a_connection_without_a_tenant_sees_and_writes_nothing(ingest) -> None:
    await fill_tenant(ingest.address, ACME, 1000)
    await fill_tenant(ingest.address, GLOBEX, 2000)
    tables = await fetch(ingest.database_url,
                         "SELECT c.relname, c.relrowsecurity AND c.relforcerowsecurity AS isolated FROM pg_class c"
                         " JOIN pg_namespace n ON n.oid = c.relnamespace"
                         " WHERE n.nspname = 'ingest' AND c.relkind IN ('r', 'p') ORDER BY 1")
    isolated = [r["relname"] for r in tables if r["isolated"]]
    assert {r["relname"] for r in tables if not r["isolated"]} == NOT_TENANT_TABLES
    assert set(TENANT_TABLES) | {"audit_entries", "readings_default"} <= set(isolated)
    assert any(name.startswith("readings_p") for name in isolated)  # today's partitions, made at runtime
    owner_counts = {name: await one(ingest.database_url, f'SELECT count(*) FROM ingest."{name}"') for name in isolated}
    # Every tenant table has rows of both tenants (partitions: those that hold the test's day).
    for name in (*TENANT_TABLES, "audit_entries"):
        by_tenant = await fetch(ingest.database_url, f"SELECT DISTINCT tenant_id FROM ingest.{name} ORDER BY 1")
        assert [r["tenant_id"] for r in by_tenant] == [ACME, GLOBEX], name

    pool = ingest.app.store.pool
    assert tenancy.current() is None  # the test's own task: no RPC, no scope
    async with pool.acquire() as conn:
        assert await conn.fetchval("SELECT current_setting('fabrica.tenant', true)") == ""
        assert await conn.fetchval("SELECT current_user") == tenancy.DB_ROLE
        for name in isolated:  # the raw SQL a store method would run, with the tenant forgotten
            assert await conn.fetchval(f'SELECT count(*) FROM ingest."{name}"') == 0, name
        assert await conn.fetch("SELECT * FROM ingest.latest WHERE tag_id = ANY($1::bigint[])", [1000, 2000]) == []
        # Writing without a tenant fails: the row's tenant (the column's default: none) is not the session's,
        # and naming one is refused likewise.
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match="row-level security"):
            await conn.execute("INSERT INTO ingest.tags (tag_id, plc_id, role) VALUES (9, 'p', 1)")
        for sql in ("INSERT INTO ingest.tags (tenant_id, tag_id, plc_id, role) VALUES ('acme', 9, 'p', 1)",
                    "INSERT INTO ingest.readings (tenant_id, tag_id, read_time, quality, kind)"
                    " VALUES ('acme', 9, now(), 1, 0)"):
            with pytest.raises(asyncpg.InsufficientPrivilegeError, match="row-level security"):
                await conn.execute(sql)
        assert await conn.execute("UPDATE ingest.collector_sequences SET committed_sequence = 99") == "UPDATE 0"
        assert await conn.execute("DELETE FROM ingest.readings") == "DELETE 0"
    with tenancy.scope(ACME):  # a tenant sees its rows only, and cannot write another's
        async with pool.acquire() as conn:
            for name in isolated:
                mine = await one(ingest.database_url, f"SELECT count(*) FROM ingest.\"{name}\" WHERE tenant_id = 'acme'")
                assert await conn.fetchval(f'SELECT count(*) FROM ingest."{name}"') == mine, name
            with pytest.raises(asyncpg.InsufficientPrivilegeError, match="row-level security"):
                await conn.execute("INSERT INTO ingest.tags (tenant_id, tag_id, plc_id, role) VALUES ('globex', 9, 'p', 1)")
            assert await conn.execute("UPDATE ingest.latest SET value = -1 WHERE tag_id = 2000") == "UPDATE 0"
    with tenancy.system():  # across tenants: everything (maintenance, installation-wide consumers)
        async with pool.acquire() as conn:
            for name in isolated:
                assert await conn.fetchval(f'SELECT count(*) FROM ingest."{name}"') == owner_counts[name], name
            with pytest.raises(asyncpg.NotNullViolationError):  # an insert across tenants must name its tenant
                await conn.execute("INSERT INTO ingest.tags (tag_id, plc_id, role) VALUES (9, 'p', 1)")


async def one(dsn: str, sql: str) -> int:
    rows = await fetch(dsn, sql)
    return int(rows[0][0])


async def test_collectors_of_the_same_id_in_two_tenants_stream_the_same_sequences_without_clashing(ingest) -> None:
    batches = {ACME: numbered_batches("line-1", 20, 50, tag_base=1000), GLOBEX: numbered_batches("line-1", 20, 50, tag_base=2000)}
    channels = {t: tenant_channel(ingest.address, t) for t in batches}
    try:
        stats = await asyncio.gather(*(IngestUplink(channels[t], "line-1", ListBatchSource(b), max_in_flight=8).run()
                                       for t, b in batches.items()))
        assert [s.readings_written for s in stats] == [1000, 1000]
        rows = await fetch(ingest.database_url,
                           "SELECT tenant_id, count(*) AS n, count(DISTINCT (tag_id, read_time)) AS distinct_n,"
                           " min(tag_id) AS lo, max(tag_id) AS hi FROM ingest.readings GROUP BY tenant_id ORDER BY 1")
        assert [tuple(r) for r in rows] == [(ACME, 1000, 1000, 1000, 1009), (GLOBEX, 1000, 1000, 2000, 2009)]
        sequences = await fetch(ingest.database_url, "SELECT tenant_id, collector_id, committed_sequence"
                                                     " FROM ingest.collector_sequences ORDER BY 1")
        assert [tuple(r) for r in sequences] == [(ACME, "line-1", 20), (GLOBEX, "line-1", 20)]
        # acme's collector sending its batches again: duplicates, in acme only; globex's sequence does not move.
        resumed, acks = await stream_batches(pb_grpc.IngestServiceStub(channels[ACME]), "line-1", batches[ACME][:3])
        assert resumed == 20 and all(a.duplicate for a in acks)
        # A third tenant's collector of that id starts from nothing.
        async with tenant_channel(ingest.address, "initech") as channel:
            resumed, acks = await stream_batches(pb_grpc.IngestServiceStub(channel), "line-1", batches[ACME][:1])
        assert resumed == 0 and [(a.sequence, a.duplicate) for a in acks] == [(1, False)]
        assert await one(ingest.database_url, "SELECT count(*) FROM ingest.readings") == 2050
    finally:
        for channel in channels.values():
            await channel.close()


async def test_one_write_transaction_writes_each_tenants_batches_under_its_tenant(ingest) -> None:
    """Batches of two tenants (same collector id, same sequence, same tag id) queued together: each lands
    in its tenant, with its tags, latest value, event and feed row."""
    writer = ingest.app.writer
    made = []
    for tenant, value in ((ACME, 1.0), (GLOBEX, 2.0)):
        b = batch_from_proto(batch("line-1", 1, [reading(7, T0_US, value), reading(8, T0_US, 5, role=PRODUCTION_COUNTER)]))
        b.tenant = tenant
        b.payload = batch("line-1", 1, [reading(7, T0_US, value)]).SerializeToString()
        made.append((StreamSession("line-1", tenant=tenant), b))
    futures = [await writer.submit(s, b) for s, b in made]  # queued before the writer takes a group
    results = await asyncio.gather(*futures)
    assert [r.written for r in results] == [2, 2]
    for table, column in (("readings", "value"), ("latest", "value"), ("tag_events", "int_value")):
        rows = await fetch(ingest.database_url, f"SELECT tenant_id, {column} FROM ingest.{table}"
                                                f" WHERE tag_id = {8 if table == 'tag_events' else 7} ORDER BY 1")
        assert [r["tenant_id"] for r in rows] == [ACME, GLOBEX], table
    assert [tuple(r) for r in await fetch(ingest.database_url, "SELECT tenant_id, value FROM ingest.latest"
                                                             " WHERE tag_id = 7 ORDER BY 1")] == [(ACME, 1.0), (GLOBEX, 2.0)]
    for table in ("tags", "committed_batches", "collector_sequences"):
        rows = await fetch(ingest.database_url, f"SELECT tenant_id FROM ingest.{table} ORDER BY 1")
        assert [r["tenant_id"] for r in rows] == ([ACME, ACME, GLOBEX, GLOBEX] if table == "tags" else [ACME, GLOBEX])


async def test_a_tenant_reading_another_tenants_tags_gets_nothing(ingest) -> None:
    await fill_tenant(ingest.address, ACME, 1000)
    # globex has tags of its own, on a PLC of the same id
    async with tenant_channel(ingest.address, GLOBEX) as channel:
        await stream_batches(pb_grpc.IngestServiceStub(channel), "line-9", plant_batches("line-9", 2, tag_base=2000))
    window = query_pb2.ReadingFilter(tag_ids=[1000, 1001], start_time=ts_us(T0_US - 10**9), end_time=ts_us(T0_US + 10**9))
    async with tenant_channel(ingest.address, GLOBEX) as channel:
        stub = pb_grpc.IngestServiceStub(channel)
        assert not (await stub.QueryReadings(pb.QueryReadingsRequest(filter=window))).readings
        assert [m async for m in stub.ExportReadings(pb.ExportReadingsRequest(filter=window))] == []
        buckets = await stub.AggregateReadings(pb.AggregateReadingsRequest(filter=window, bucket_seconds=3600))
        assert not buckets.buckets
        summary = await stub.SummarizeReadings(pb.SummarizeReadingsRequest(
            tag_id=1000, start_time=window.start_time, end_time=window.end_time))
        assert summary.summary.count == 0
        assert not (await stub.GetLatestValues(pb.GetLatestValuesRequest(tag_ids=[1000, 1001]))).readings
        by_plc = await stub.GetLatestValues(pb.GetLatestValuesRequest(plc_id="press-1"))
        assert sorted(r.tag_id for r in by_plc.readings) == [2000, 2001]  # its own tags of that PLC id only
        plc_filter = query_pb2.ReadingFilter(plc_id="press-1", start_time=window.start_time, end_time=window.end_time)
        assert {r.tag_id for r in (await stub.QueryReadings(pb.QueryReadingsRequest(filter=plc_filter))).readings} == {2000, 2001}
        watch = stub.WatchLatestValues(pb.WatchLatestValuesRequest(tag_ids=[1000, 1001]))
        first = await asyncio.wait_for(watch.read(), 10)
        assert first.snapshot and not first.readings
        watch.cancel()
        events = await first_events(stub, 2)
        assert {(e.tag_id, e.tenant) for e in events} == {(2001, GLOBEX)}
        fed = await first_batches(stub, 2)
        assert {(b.tenant, b.batch.collector_id) for b in fed} == {(GLOBEX, "line-9")}
        with pytest.raises(grpc.aio.AioRpcError) as err:  # acme's collector: not there for globex
            await stub.ResetCollectorSequence(pb.ResetCollectorSequenceRequest(collector_id="line-1"))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        audit = await stub.ListAuditEntries(pb.ListAuditEntriesRequest(filter=audit_pb2.AuditFilter()))
        assert audit.entries == []  # acme's SyncTags and reset are acme's
    async with tenant_channel(ingest.address, ACME) as channel:
        stub = pb_grpc.IngestServiceStub(channel)
        assert {r.tag_id for r in (await stub.GetLatestValues(pb.GetLatestValuesRequest(plc_id="press-1"))).readings} == {1000, 1001}
        assert len((await stub.ListAuditEntries(pb.ListAuditEntriesRequest())).entries) == 2


async def first_events(stub: pb_grpc.IngestServiceStub, n: int) -> list:
    call = stub.WatchTagEvents(pb.WatchTagEventsRequest())
    events: list = []
    try:
        async with asyncio.timeout(10):
            async for response in call:
                events += response.events
                if len(events) >= n:
                    break
    finally:
        call.cancel()
    return events


async def first_batches(stub: pb_grpc.IngestServiceStub, n: int) -> list:
    call = stub.WatchCommittedReadings(pb.WatchCommittedReadingsRequest())
    batches: list = []
    try:
        async with asyncio.timeout(10):
            async for response in call:
                batches += response.batches
                if len(batches) >= n:
                    break
    finally:
        call.cancel()
    return batches


async def test_an_installation_wide_watcher_receives_every_tenants_events_and_feed_each_naming_its_tenant(ingest) -> None:
    await fill_tenant(ingest.address, ACME, 1000)
    await fill_tenant(ingest.address, GLOBEX, 2000)
    async with tenant_channel(ingest.address, tenancy.ALL) as channel:  # as production and alarm call
        stub = pb_grpc.IngestServiceStub(channel)
        events = await first_events(stub, 6)
        assert [(e.tenant, e.tag_id, e.value.int_value) for e in events] == \
            [(ACME, 1001, 10), (ACME, 1001, 20), (ACME, 1001, 30), (GLOBEX, 2001, 10), (GLOBEX, 2001, 20), (GLOBEX, 2001, 30)]
        assert [e.cursor for e in events] == sorted({e.cursor for e in events})
        fed = await first_batches(stub, 6)
        assert [(b.tenant, b.batch.sequence) for b in fed] == [(ACME, 1), (ACME, 2), (ACME, 3), (GLOBEX, 1), (GLOBEX, 2), (GLOBEX, 3)]
        # A tenant's watch resumes from any cursor, including another tenant's (cursors are global positions).
        async with tenant_channel(ingest.address, GLOBEX) as own:
            call = pb_grpc.IngestServiceStub(own).WatchTagEvents(pb.WatchTagEventsRequest(after_cursor=events[1].cursor))
            response = await asyncio.wait_for(call.read(), 10)
            call.cancel()
        assert [e.tenant for e in response.events] == [GLOBEX] * 3
        # What belongs to one tenant cannot be written across tenants.
        call = stub.StreamReadings()
        await call.write(open_request("line-1"))
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call.read()
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert tenancy.HEADER in field_violations(err.value)
        for rpc, request in ((stub.SyncTags, pb.SyncTagsRequest(collector_id="line-1")),
                             (stub.ResetCollectorSequence, pb.ResetCollectorSequenceRequest(collector_id="line-1"))):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await rpc(request)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert tenancy.HEADER in field_violations(err.value)


# --- the tenant of a collector's certificate ---------------------------------------------------------------


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki(tmp_path / "pki")


async def test_a_collector_certificate_names_the_tenant_its_batches_are_stored_in(database_url: str, servers: Servers,
                                                                                 pki: Pki) -> None:
    host = await start_server("ingest", settings_for("ingest", {**pki.env("ingest"), "FABRICA_PEER_PORT": "0"},
                                                     database_url=database_url), config=TEST_CONFIG)
    try:
        for tenant, tag_base in ((ACME, 1000), (GLOBEX, 2000)):
            issued = pki.ca.issue_collector("line-1", tenant=tenant)
            credentials = grpc.ssl_channel_credentials(pki.ca.cert_pem, issued.key_pem, issued.cert_pem)
            async with grpc.aio.secure_channel(host.peer_address, credentials, options=PEER_CHANNEL_OPTIONS) as channel:
                stub = pb_grpc.IngestServiceStub(channel)
                _, acks = await stream_batches(stub, "line-1", numbered_batches("line-1", 2, 5, tag_base=tag_base))
                assert [a.written for a in acks] == [5, 5]
                # Its certificate's tenant is the only one it may name.
                other = GLOBEX if tenant == ACME else ACME
                call = stub.StreamReadings(metadata=((tenancy.HEADER, other),))
                await call.write(open_request("line-1"))
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await call.read()
                assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
                assert error_info(err.value).reason == "TENANT_MISMATCH"
        rows = await fetch(database_url, "SELECT tenant_id, min(tag_id), count(*) FROM ingest.readings GROUP BY 1 ORDER BY 1")
        assert [tuple(r) for r in rows] == [(ACME, 1000, 10), (GLOBEX, 2000, 10)]
    finally:
        await host.stop(grace=0.5)
