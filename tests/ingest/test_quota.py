"""A tenant's readings/s quota: the token bucket (table-driven), the admission of a tenant's streams (slowed,
then RESOURCE_EXHAUSTED with a QuotaFailure for the excess), the tenant directory polling a real gRPC
ConfigService, and end to end: tenant A over a small quota and tenant B unlimited streaming at once through
the ingest client against a real ingest; A's readings all arrive exactly once (counted in Postgres), A is
slowed and refused, B's rate beside A is compared with B's rate alone, measured in the same test."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
from grpc_helpers import error_info

from fabrica.config.v1 import tenant_pb2
from fabrica.ingest.v1 import ingest_service_pb2_grpc as pb_grpc
from fabrica_svc.clients.errors import error_details
from fabrica_svc.clients.ingest import IngestUplink, ListBatchSource
from fabrica_svc.ingest.config import IngestConfig, load_ingest_config
from fabrica_svc.ingest.quota import TenantQuotas, TokenBucket
from fabrica_svc.runtime.tenants import TenantDirectory, directory_of
from fabrica_svc.runtime.channels import peer_channel
from fabrica_svc.runtime.errors import ResourceExhausted
from fabrica_svc.runtime.retry import RetryPolicy
from fabrica_svc.runtime.settings import SettingsError

from .support import (
    TenantsConfig, batch_request, fetch, numbered_batches, open_request, serve_config, tenant, wait_for,
)

ACME, GLOBEX = "acme", "globex"


# --- the bucket ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("steps", "expected"), [
    # (time, readings, max_wait) -> wait (None: refused); the bucket: 100 a second, 100 held, full at t=0
    ([(0.0, 100, 0.0)], [0.0]),  # a full bucket's worth at once
    ([(0.0, 60, 0.0), (0.0, 60, 0.0)], [0.0, None]),  # the second finds 40: it would wait, and may not
    ([(0.0, 60, 0.0), (0.0, 60, 1.0)], [0.0, 0.2]),  # ...or waits its 0.2 s when it may
    ([(0.0, 100, 0.0), (0.5, 50, 0.0)], [0.0, 0.0]),  # half a second refills half
    ([(0.0, 100, 0.0), (10.0, 100, 0.0), (10.0, 1, 0.0)], [0.0, 0.0, None]),  # never more than one second's worth
    ([(0.0, 100, 1.0), (0.0, 100, 1.0), (0.0, 100, 1.0)], [0.0, 1.0, None]),  # reservations queue up: 2 s > 1 s
    ([(0.0, 250, 0.0), (0.0, 1, 5.0)], [0.0, 1.51]),  # larger than the bucket: taken when full, into debt
    ([(0.0, 10, 0.0), (0.0, 250, 0.0)], [0.0, None]),  # ...only when full
])
def test_the_token_bucket(steps: list[tuple[float, int, float]], expected: list[float | None]) -> None:
    bucket = TokenBucket.full(100, 0.0)
    got = [bucket.reserve(n, t, max_wait) for t, n, max_wait in steps]
    assert [None if g is None else round(g, 2) for g in got] == expected


def test_a_rate_change_keeps_the_tokens_within_the_new_capacity() -> None:
    bucket = TokenBucket.full(100, 0.0)
    bucket.set_rate(10, 0.0)
    assert bucket.tokens == 10 and bucket.wait_for(10, 0.0) == 0.0 and bucket.wait_for(11, 0.0) == 0.0
    bucket.reserve(10, 0.0, 0.0)
    bucket.set_rate(1000, 0.0)
    assert round(bucket.wait_for(1000, 0.0), 3) == 1.0


class FakeTime:
    def __init__(self) -> None:
        self.now = 0.0
        self.slept: list[float] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.slept.append(round(seconds, 3))


async def test_admission_slows_a_tenant_over_its_quota_refuses_the_excess_and_never_holds_another_tenant() -> None:
    directory = directory_of([tenant(ACME, readings_per_second=100), tenant(GLOBEX)])
    fake = FakeTime()
    quotas = TenantQuotas(directory, max_delay=0.5, clock=fake.clock, sleep=fake.sleep)
    await quotas.admit(ACME, 100)  # the full bucket
    await quotas.admit(ACME, 40)  # waits its turn
    assert fake.slept == [0.4]
    with pytest.raises(ResourceExhausted) as err:  # would wait 0.8 s
        await quotas.admit(ACME, 40, sequence=7)
    e = err.value
    assert e.reason == "QUOTA_EXCEEDED" and [v.subject for v in e.quota_violations] == ["tenants/acme"]
    assert e.metadata == {"quota": "readings_per_second", "limit": "100", "retry_after_ms": "800", "tenant": ACME,
                          "sequence": "7"}
    for _ in range(50):  # unlimited, and unknown tenants too: never a wait
        await quotas.admit(GLOBEX, 10_000)
        await quotas.admit("initech", 10_000)
    assert fake.slept == [0.4]
    fake.now = 1.0  # the 40 reserved are paid back by 0.4 s; 60 of the next second's are there
    await quotas.admit(ACME, 60)
    assert fake.slept == [0.4]
    assert (quotas.stats_of(ACME).delayed_batches, quotas.stats_of(ACME).refused_batches) == (1, 1)
    assert (quotas.stats_of(GLOBEX).delayed_batches, quotas.stats_of(GLOBEX).refused_batches) == (0, 0)
    directory.set(ACME, quota=tenant_pb2.TenantQuota(readings_per_second=0))  # the quota lifted
    await quotas.admit(ACME, 10**6)
    assert fake.slept == [0.4]


def test_the_quota_settings() -> None:
    assert (load_ingest_config({}).quota_max_delay, load_ingest_config({}).tenants_poll_interval) == (1.0, 10.0)
    cfg = load_ingest_config({"FABRICA_INGEST_QUOTA_MAX_DELAY_MS": "250", "FABRICA_INGEST_TENANTS_POLL_SECONDS": "0.5"})
    assert (cfg.quota_max_delay, cfg.tenants_poll_interval) == (0.25, 0.5)
    for name, value in (("FABRICA_INGEST_QUOTA_MAX_DELAY_MS", "-1"), ("FABRICA_INGEST_TENANTS_POLL_SECONDS", "0")):
        with pytest.raises(SettingsError, match=name):
            load_ingest_config({name: value})


# --- the directory, polling a real ConfigService ----------------------------------------------------------


async def test_the_directory_reads_every_page_keeps_the_last_known_and_treats_unknown_tenants_as_unlimited() -> None:
    servicer = TenantsConfig([tenant(f"t{i}", readings_per_second=i * 10, raw_days=i) for i in range(1, 6)])
    server, address = await serve_config(servicer)
    directory = TenantDirectory(config_addr=address, interval=0.05, page_size=2)
    try:
        assert directory.quota("t3").readings_per_second == 0  # nothing read yet: unlimited
        await directory.start()
        await asyncio.wait_for(directory.wait_polled(), 10)
        assert directory.known() == ["t1", "t2", "t3", "t4", "t5"] and servicer.calls >= 3  # three pages
        assert (directory.quota("t3").readings_per_second, directory.retention("t4").raw_days) == (30, 4)
        assert (directory.quota("nobody").readings_per_second, directory.retention("nobody").raw_days) == (0, 0)
        servicer.tenants["t3"] = tenant("t3", readings_per_second=7)  # a quota changed in config
        await wait_for(lambda: directory.quota("t3").readings_per_second == 7, what="the new quota")
        await server.stop(None)  # config away: the last known stay
        polls = directory.polls
        await asyncio.sleep(0.3)
        assert directory.polls == polls and directory.quota("t3").readings_per_second == 7
    finally:
        await directory.stop()
        await server.stop(None)


async def test_a_config_that_does_not_serve_tenants_yet_means_no_tenant_known() -> None:
    servicer = TenantsConfig([tenant(ACME, readings_per_second=5)])
    servicer.unimplemented = True
    server, address = await serve_config(servicer)
    directory = TenantDirectory(config_addr=address, interval=0.05)
    try:
        assert await directory.poll_once() is False
        assert directory.known() == [] and directory.quota(ACME).readings_per_second == 0
        servicer.unimplemented = False
        assert await directory.poll_once() is True and directory.quota(ACME).readings_per_second == 5
        servicer.unimplemented = True
        assert await directory.poll_once() is False and directory.quota(ACME).readings_per_second == 5
    finally:
        await directory.stop()
        await server.stop(None)
    unset = TenantDirectory(config_addr="")
    await unset.start()  # nothing to poll: a no-op
    assert not unset.enabled and await unset.poll_once() is False and unset.quota(ACME).readings_per_second == 0
    assert unset.active(ACME)  # a tenant nobody said is suspended is served
    await unset.stop()


# --- end to end --------------------------------------------------------------------------------------------


@pytest.fixture
async def tenants_config():  # noqa: ANN201
    servicer = TenantsConfig([tenant(ACME, readings_per_second=QUOTA), tenant(GLOBEX)])
    server, address = await serve_config(servicer)
    yield servicer, address
    await server.stop(None)


QUOTA = 1_000


async def quota_ingest(ingest_factory, address: str, **config: object):  # noqa: ANN001, ANN201
    ingest = await ingest_factory(IngestConfig(group_max_delay=0.002, tenants_poll_interval=0.1, **config),
                                  config_addr=address)
    await wait_for(lambda: ingest.app.tenant_directory.quota(ACME).readings_per_second == QUOTA, what="acme's quota read")
    return ingest


async def test_a_batch_over_the_quota_is_refused_with_a_quota_failure_and_stored_once_when_sent_again(
        ingest_factory, tenants_config) -> None:
    _, address = tenants_config
    ingest = await quota_ingest(ingest_factory, address, quota_max_delay=0.0)
    first, second = numbered_batches("line-1", 2, QUOTA, tag_base=100)
    async with peer_channel(ingest.address, None, tenant=ACME) as channel:
        call = pb_grpc.IngestServiceStub(channel).StreamReadings()
        await call.write(open_request("line-1"))
        assert (await call.read()).resume.committed_sequence == 0
        await call.write(batch_request(first))  # the bucket's second's worth
        await call.write(batch_request(second))  # one more second's worth: now over the quota
        ack = await call.read()
        assert (ack.ack.sequence, ack.ack.written) == (1, QUOTA)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call.read()
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        details = error_details(err.value)
        assert details.quota_violations[0][0] == "tenants/acme" and "1000 readings per second" in details.quota_violations[0][1]
        info = error_info(err.value)
        assert info.reason == "QUOTA_EXCEEDED" and info.metadata["quota"] == "readings_per_second"
        assert info.metadata["limit"] == str(QUOTA) and 0 < int(info.metadata["retry_after_ms"]) <= 1000
        assert await count(ingest, ACME) == (QUOTA, QUOTA)  # nothing of the refused batch
        # The client sends it again after retry_after_ms, on a new stream: stored once.
        stats = await IngestUplink(channel, "line-1", ListBatchSource([first, second])).run()
    assert stats.batches_written == 1  # (refused again while its turn had not come)
    assert await count(ingest, ACME) == (2 * QUOTA, 2 * QUOTA)


async def count(ingest, tenant_id: str) -> tuple[int, int]:  # noqa: ANN001
    rows = await fetch(ingest.database_url, "SELECT count(*), count(DISTINCT (tag_id, read_time)) FROM ingest.readings"
                                            " WHERE tenant_id = $1", tenant_id)
    return rows[0][0], rows[0][1]


async def uplink(address: str, tenant_code: str, collector: str, batches: list) -> tuple[float, object]:
    """Stream `batches` as `collector` of `tenant_code` with the ingest client; (seconds, stats)."""
    async with peer_channel(address, None, tenant=tenant_code) as channel:
        started = time.monotonic()
        stats = await IngestUplink(channel, collector, ListBatchSource(batches), max_in_flight=8,
                                   retry=RetryPolicy(initial=0.05, maximum=1.0)).run()
        return time.monotonic() - started, stats


async def test_a_tenant_over_its_quota_is_slowed_and_loses_nothing_and_another_tenant_is_not_slowed(
        ingest_factory, tenants_config) -> None:
    ingest = await quota_ingest(ingest_factory, tenants_config[1], quota_max_delay=0.3)
    b_readings = 20_000
    # B alone, for the baseline.
    alone_s, alone = await uplink(ingest.address, GLOBEX, "line-b1", numbered_batches("line-b1", 40, 500, tag_base=2000))
    assert alone.readings_written == b_readings
    # A (1,000 readings/s) on two collectors, 3,000 readings (at least 2 s past its bucket's first second's
    # worth), and B again, at the same time.
    a_batches = [numbered_batches(f"line-a{k}", 6, 250, tag_base=1000 + 100 * k) for k in (1, 2)]
    started = time.monotonic()
    a1, a2, (beside_s, beside) = await asyncio.gather(
        uplink(ingest.address, ACME, "line-a1", a_batches[0]), uplink(ingest.address, ACME, "line-a2", a_batches[1]),
        uplink(ingest.address, GLOBEX, "line-b2", numbered_batches("line-b2", 40, 500, tag_base=3000)))
    a_seconds = max(a1[0], a2[0])
    assert beside.readings_written == b_readings
    a_stats = [a1[1], a2[1]]
    b_alone, b_beside, a_rate = b_readings / alone_s, b_readings / beside_s, 3000 / a_seconds
    print(f"\nB alone {b_alone:,.0f} readings/s; B beside A {b_beside:,.0f} readings/s ({b_beside / b_alone:.0%});"
          f" A {a_rate:,.0f} readings/s against its quota of {QUOTA:,}; A refused {sum(s.quota_refusals for s in a_stats)}"
          f" times, slowed {ingest.app.quotas.stats_of(ACME).delayed_batches} batches; total {time.monotonic() - started:.1f} s")
    # A: every reading exactly once, its sequences at their last batch; slowed and refused on the way.
    assert [s.readings_written for s in a_stats] == [1500, 1500]
    assert await count(ingest, ACME) == (3000, 3000)
    sequences = await fetch(ingest.database_url, "SELECT collector_id, committed_sequence FROM ingest.collector_sequences"
                                                 " WHERE tenant_id = 'acme' ORDER BY 1")
    assert [tuple(r) for r in sequences] == [("line-a1", 6), ("line-a2", 6)]
    acme = ingest.app.quotas.stats_of(ACME)
    assert acme.delayed_batches > 0 and acme.refused_batches > 0
    assert sum(s.quota_refusals for s in a_stats) == acme.refused_batches, [(s.errors, s.streams) for s in a_stats]
    assert all(code == grpc.StatusCode.RESOURCE_EXHAUSTED for s in a_stats for code in s.errors)
    assert a_rate <= 1.6 * QUOTA  # its bucket holds one second's worth: 3,000 readings take at least 2 s
    # B: never held by the quota, and not slowed by A (a generous bound on the ratio of the two measured rates:
    # A's streams cost this one CPU a little).
    globex = ingest.app.quotas.stats_of(GLOBEX)
    assert (globex.delayed_batches, globex.refused_batches) == (0, 0)
    assert all(s.errors == [] for s in (alone, beside))
    assert await count(ingest, GLOBEX) == (2 * b_readings, 2 * b_readings)
    assert b_beside >= 0.3 * b_alone, (b_alone, b_beside)
