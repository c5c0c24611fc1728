"""The forged-sequence attack of issue 9, with identities: a client that proved another identity (its client
certificate names collector `cell-9`, or a service) cannot open `demo`'s StreamReadings, send a batch of
`demo`'s, or replace `demo`'s tags, and touches nothing of `demo`'s sequence; the real collector (a real
Uplink over a real spool, presenting `demo`'s certificate over mutual TLS) stores every one of its
readings, counted in Postgres. Real ingest with TLS, real Postgres, real gRPC."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest
from grpc_helpers import error_info

from fabrica.ingest.v1 import ingest_service_pb2 as pb
from fabrica.ingest.v1 import ingest_service_pb2_grpc as pb_grpc
from fabrica_svc.collector.spool import Spool
from fabrica_svc.collector.uplink import Uplink
from fabrica_svc.runtime.auth import mint_token
from fabrica_svc.runtime.settings import load_settings
from in_process import Servers, settings_for, start_server
from tls_support import Pki

from .support import T0_US, TEST_CONFIG, batch, batch_request, fetchval, numbered_batches, open_request, reading, \
    wait_for

COLLECTOR = "demo"
SEQUENCE_ROW = "SELECT count(*) FROM ingest.collector_sequences WHERE collector_id = $1"
COMMITTED = "SELECT committed_sequence FROM ingest.collector_sequences WHERE collector_id = $1"
EPOCH = "SELECT epoch FROM ingest.collector_sequences WHERE collector_id = $1"
REAL = "SELECT count(*) FROM ingest.readings WHERE tag_id BETWEEN 1 AND 10"
FORGED = "SELECT count(*) FROM ingest.readings WHERE tag_id = 999"
BATCH = 20


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki(tmp_path / "pki")


@pytest.fixture
async def ingest(database_url: str, servers: Servers, pki: Pki):  # noqa: ANN201 - ServiceHost
    host = await start_server("ingest", settings_for("ingest", {**pki.env("ingest"), "FABRICA_PEER_PORT": "0"},
                                                     database_url=database_url), config=TEST_CONFIG)
    yield host
    await host.stop(grace=0.5)


async def refused_open(channel: grpc.aio.Channel, collector_id: str, *,
                       batch_of: str | None = None) -> grpc.aio.AioRpcError:
    """Open `collector_id`'s stream and, once it resumes, send a batch far ahead (of `batch_of`'s, default
    the same id): the error that ends the stream (at open, or at that batch)."""
    call = pb_grpc.IngestServiceStub(channel).StreamReadings()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        async with asyncio.timeout(20):
            await call.write(open_request(collector_id))
            first = await call.read()  # the resume, or the refusal
            assert first.HasField("resume"), first
            await call.write(batch_request(batch(batch_of or collector_id, 10**12, [reading(999, T0_US, 6.66)])))
            while await call.read() is not grpc.aio.EOF:
                pass
    return err.value


def assert_denied(err: grpc.aio.AioRpcError, caller: str) -> None:
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED, err
    info = error_info(err)
    assert info.reason == "COLLECTOR_IDENTITY_MISMATCH"
    assert dict(info.metadata) == {"collector_id": COLLECTOR, "caller": caller}


class RealCollector:
    """The collector `demo` as it runs: a real Uplink over a real spool, with demo's certificate."""

    def __init__(self, ingest, pki: Pki, state_dir: Path):  # noqa: ANN001
        self.spool = Spool(state_dir / "spool", 64 << 20)
        settings = load_settings("collector", pki.env(collector=COLLECTOR))
        self.uplink = Uplink(ingest.peer_address, COLLECTOR, self.spool, state_dir, backoff_min=0.02,
                             backoff_max=0.2, settings=settings)
        self.appended = 0
        self._made = 0

    async def start(self) -> None:
        self.spool.open()
        await self.spool.start()
        self.uplink.start()

    def append(self, count: int) -> None:
        for b in numbered_batches(COLLECTOR, count, BATCH, start_us=T0_US + self._made * BATCH * 1000):
            b.sequence = self.spool.next_sequence()
            self.spool.append(b.sequence, b.SerializeToString(), len(b.readings), 0)
            self.appended += len(b.readings)
        self._made += count

    async def drained(self) -> None:
        await wait_for(lambda: self.spool.acked == self.spool.high_water and self.spool.backlog_readings == 0,
                       timeout=30, what="every batch acknowledged")

    async def stop(self) -> None:
        await self.uplink.stop()
        await self.spool.close()


async def test_another_identity_cannot_open_demos_stream_and_every_reading_of_the_real_collector_arrives(
        ingest, pki: Pki, tmp_path: Path) -> None:
    dsn = ingest.settings.database_url
    async with pki.channel(ingest.peer_address, collector="cell-9") as forger:
        # Before the collector ever connected: refused at open, and no sequence row is created for demo.
        assert_denied(await refused_open(forger, COLLECTOR), "collector:cell-9")
        assert await fetchval(dsn, SEQUENCE_ROW, COLLECTOR) == 0

        real = RealCollector(ingest, pki, tmp_path / "collector")
        await real.start()
        try:
            for _ in range(4):  # interleaved with the collector's own batches
                real.append(7)
                await wait_for(lambda: real.spool.acked > 0, what="the collector storing")
                before = (await fetchval(dsn, COMMITTED, COLLECTOR), await fetchval(dsn, EPOCH, COLLECTOR))
                assert_denied(await refused_open(forger, COLLECTOR), "collector:cell-9")
                # Its own stream, with a batch of demo's in it: refused at that batch.
                assert_denied(await refused_open(forger, "cell-9", batch_of=COLLECTOR), "collector:cell-9")
                # demo's sequence went nowhere the collector did not take it (the collector may have moved it on).
                committed, epoch = await fetchval(dsn, COMMITTED, COLLECTOR), await fetchval(dsn, EPOCH, COLLECTOR)
                assert epoch == before[1] and committed >= before[0]
            real.append(7)
            await real.drained()
        finally:
            await real.stop()
    # A service's certificate is not a collector's either: it proves role viewer, and StreamReadings needs
    # role collector (the interceptor refuses it before the servicer's collector-id check).
    async with pki.channel(ingest.peer_address, "production") as service:
        err = await refused_open(service, COLLECTOR)
        assert err.code() == grpc.StatusCode.PERMISSION_DENIED, err
        assert (error_info(err).reason, error_info(err).metadata["role"]) == ("ROLE_REQUIRED", "collector")
        assert error_info(err).metadata["caller"] == "service:production"
    # Every reading of the real collector, exactly once; nothing of the forger's; the sequence is the collector's.
    assert await fetchval(dsn, REAL) == real.appended == 5 * 7 * BATCH
    assert await fetchval(dsn, FORGED) == 0
    assert await fetchval(dsn, COMMITTED, COLLECTOR) == 35
    assert real.spool.dropped_readings == 0 and real.spool.suspicious_duplicates == 0


async def test_a_caller_that_proves_nothing_cannot_act_as_a_collector(ingest, pki: Pki) -> None:
    """The gRPC port asks for no client certificate (users come with tokens): without one, and without a
    token, no collector-facing call is taken, and nothing of demo's sequence is created."""
    async with pki.channel(ingest.address, client_cert=False) as anonymous:
        err = await refused_open(anonymous, COLLECTOR)
        assert err.code() == grpc.StatusCode.UNAUTHENTICATED, err
        assert error_info(err).reason == "TOKEN_MISSING"  # neither a token nor a certificate
        with pytest.raises(grpc.aio.AioRpcError) as sync:
            await pb_grpc.IngestServiceStub(anonymous).SyncTags(pb.SyncTagsRequest(collector_id=COLLECTOR, tags=[]))
        assert sync.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert await fetchval(ingest.settings.database_url, SEQUENCE_ROW, COLLECTOR) == 0


async def test_another_identity_cannot_replace_demos_tags(ingest, pki: Pki) -> None:
    tags = [pb.TagInfo(tag_id=1, plc_id="press-1", name="good_count")]
    async with pki.channel(ingest.peer_address, collector=COLLECTOR) as own:
        reply = await pb_grpc.IngestServiceStub(own).SyncTags(pb.SyncTagsRequest(collector_id=COLLECTOR, tags=tags))
        assert reply.changed == 1
    async with pki.channel(ingest.peer_address, collector="cell-9") as forger:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await pb_grpc.IngestServiceStub(forger).SyncTags(pb.SyncTagsRequest(collector_id=COLLECTOR, tags=[]))
    assert_denied(err.value, "collector:cell-9")
    # demo's tag is still there, not marked removed.
    removed = await fetchval(ingest.settings.database_url,
                             "SELECT count(*) FROM ingest.tag_metadata WHERE tag_id = 1 AND NOT removed")
    assert removed == 1


def _bearer(pki: Pki, subject: str, *roles: str, **claims: str) -> tuple[tuple[str, str], ...]:
    token = mint_token(pki.key, subject=subject, roles=roles, ttl_seconds=600, **claims)
    return (("authorization", f"Bearer {token}"),)


async def test_a_collector_token_proves_its_collector_and_no_other(ingest, pki: Pki) -> None:
    """The other way a collector proves who it is: a token (role collector, claim collector_id), here on the
    gRPC port, which asks for no certificate. Its own id is taken; demo's is refused like a certificate's."""
    async with pki.channel(ingest.address, client_cert=False) as channel:
        stub = pb_grpc.IngestServiceStub(channel)
        cell9 = _bearer(pki, "cell-9", "collector", collector_id="cell-9")
        reply = await stub.SyncTags(pb.SyncTagsRequest(collector_id="cell-9", tags=[]), metadata=cell9)
        assert reply.changed == 0
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.SyncTags(pb.SyncTagsRequest(collector_id=COLLECTOR, tags=[]), metadata=cell9)
        assert_denied(err.value, "collector:cell-9")
        # A user's token, even an admin's, is no collector's.
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.SyncTags(pb.SyncTagsRequest(collector_id=COLLECTOR, tags=[]),
                                metadata=_bearer(pki, "root", "admin"))
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert error_info(err.value).reason == "ROLE_REQUIRED"
    assert await fetchval(ingest.settings.database_url, SEQUENCE_ROW, COLLECTOR) == 0


async def test_productions_certificate_or_token_may_watch_tag_events(ingest, pki: Pki) -> None:
    """Production proves itself by its certificate on the peer port (service:production, role viewer) or by
    a viewer token: either opens WatchTagEvents (what its consumer calls)."""
    async def admitted(channel: grpc.aio.Channel, metadata: tuple[tuple[str, str], ...] = ()) -> None:
        call = pb_grpc.IngestServiceStub(channel).WatchTagEvents(pb.WatchTagEventsRequest(), metadata=metadata)
        try:  # a refusal would raise AioRpcError here and fail the test
            async with asyncio.timeout(2):
                await call.read()
        except TimeoutError:
            pass  # no event yet: the call was admitted and is waiting for one
        call.cancel()

    async with pki.channel(ingest.peer_address, "production") as by_certificate:
        await admitted(by_certificate)
    async with pki.channel(ingest.address, client_cert=False) as by_token:
        await admitted(by_token, _bearer(pki, "service-production", "viewer"))
        with pytest.raises(grpc.aio.AioRpcError) as err:  # and neither: refused
            await pb_grpc.IngestServiceStub(by_token).WatchTagEvents(pb.WatchTagEventsRequest()).read()
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
