"""Readings forwarding: the committed readings of chosen PLCs, from ingest's feed, to another platform.

Each enabled forwarding target has a `Forwarder` task following ``WatchCommittedReadings`` (narrowed to the
target's PLCs) from the cursor stored with the target (``forwarding_targets.cursor``), and sending on:

* **Another Fabrica's ingest** (``FORWARD_INGEST``): one ``StreamReadings`` batch per source batch, as the
  target's own collector id, numbered by the count of batches forwarded so far: the k-th forwarded batch
  has sequence k. The count is stored with the cursor in one row, so after any restart the forwarder
  reads the same source batches again from the stored cursor and gives them the same numbers (the feed
  is immutable and the filter the same); the other ingest acknowledges those it already committed as
  duplicates without storing them again. Storing the state only after the other ingest acknowledged
  means nothing is skipped; the numbering means nothing is stored twice: exactly once, end to end, across
  kills of the forwarder, of either ingest, and of their databases, as long as the source still retains
  the batches after the stored cursor. Batches are sent a feed message at a time (up to 200) and the
  state is stored once all of them are acknowledged.
* **HTTP JSON** (``FORWARD_HTTP``): one POST per source batch, ``{"target_id", "batch": <CommittedBatch in
  the proto3 JSON mapping>}``, signed like a webhook (domain.sign), with ``Idempotency-Key:
  <target id>:<cursor>``, retried with backoff until 2xx, the cursor stored after each 2xx: at least once,
  and a receiver drops a key (or a cursor) it has seen.

Changing a target's PLCs applies from its stored cursor on (for an ingest target, batches forwarded but not
yet stored when it changed are numbered as before: the other ingest keeps the first version).

Tenants: a target is a tenant's and forwards that tenant's readings only. Its forwarder runs in the tenant
(``tenancy.scope``: it reads and commits only its own target's row) and watches ingest's feed as that tenant
(the ``x-fabrica-tenant`` header of its calls), so another tenant's PLC of the same id is never forwarded;
a batch that names another tenant is skipped all the same. The supervisor lists every tenant's targets
(``tenancy.system()``). Stats and metric labels name a target ``<id>`` in the tenant ``default`` and
``<tenant>/<id>`` in the others.

One alarm replica forwards at a time (a session advisory lock, as the webhook dispatcher). A source cursor
older than ingest's retention (OUT_OF_RANGE) is a loss the forwarder cannot repair: it is logged as an
error and recorded as the target's last error, and forwarding goes on from the oldest retained batch.

Metrics: ``fabrica_alarm_forward_lag_seconds{target}`` (how long ago the oldest batch not yet forwarded was
committed: the newest forwarded batch's commit time when more is waiting, else 0),
``fabrica_alarm_forward_lag_batches{target}`` (feed batches of any PLC committed after the cursor) and
``fabrica_alarm_forwarded_readings{target}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import weakref
import zlib
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass

import asyncpg
import grpc
import httpx
from google.protobuf import json_format
from opentelemetry import metrics

from fabrica.common.v1 import reading_pb2
from fabrica.ingest.v1 import committed_pb2, ingest_service_pb2, ingest_service_pb2_grpc

from ...clients.errors import ServerStatus, error_details
from ...runtime import tenancy
from ...runtime.channels import PEER_CHANNEL_OPTIONS, peer_channel
from ...runtime.retry import SERVICE_RETRY, RetryPolicy
from ...runtime.settings import Settings
from ...runtime.tasks import cancel_and_wait
from ...runtime.timefmt import to_datetime
from . import store
from .domain import FORWARD_HTTP, IDEMPOTENCY_HEADER, SIGNATURE_HEADER, TIMESTAMP_HEADER, ForwardingTarget, sign

log = logging.getLogger(__name__)

FORWARD_LOCK_KEY = zlib.crc32(b"fabrica.alarm.forwarding") - 2**31


def target_key(tenant: str, target_id: str) -> str:
    """How stats and metrics name a target: its id in the tenant ``default``, else ``<tenant>/<id>``."""
    return target_id if tenant in ("", tenancy.DEFAULT) else f"{tenant}/{target_id}"


class Superseded(Exception):
    """The target's stored state moved under this forwarder (another one forwards it): stop."""


class _Refused(Exception):
    """The destination refused a batch for good (retrying the same cannot help); back off and retry."""


@dataclass
class ForwardingStats:
    """What one target's forwarder did in this process (for tests, status and the metrics)."""

    cursor: int = 0
    head_cursor: int = 0
    lag_seconds: float = 0.0
    batches: int = 0
    readings: int = 0
    duplicates: int = 0
    restarts: int = 0


class Forwarder:
    """Forwards one target until cancelled (see the module docstring)."""

    def __init__(self, pool: asyncpg.Pool, target: ForwardingTarget, source: ingest_service_pb2_grpc.IngestServiceStub,
                 *, retry: RetryPolicy = SERVICE_RETRY, request_timeout: float = 30.0,
                 stats: ForwardingStats | None = None):
        self.pool = pool
        self.target = target
        self.source = source
        self.retry = retry
        self.request_timeout = request_timeout
        self.stats = stats if stats is not None else ForwardingStats()
        #: Start after ingest's newest batch: only until a first cursor is stored (store.commit_forwarded).
        self._start_at_end = target.start_at_end

    async def run(self) -> None:
        backoff = self.retry.backoff()
        while True:
            try:
                await self._forward(backoff)
            except asyncio.CancelledError:
                raise
            except Superseded:
                log.warning("forwarding target %s: another forwarder moved its cursor; stopping", self.target.id)
                return
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.OUT_OF_RANGE:
                    state = await store.get_forwarding_target(self.pool, self.target.id)
                    message = (f"ingest no longer retains the committed batches after cursor {state.cursor}: "
                               "readings in the gap are not forwarded; continuing from the oldest retained batch")
                    log.error("forwarding target %s: %s", self.target.id, message)
                    await self._commit(state.cursor, 0, 0, 0, None)  # 0: the oldest retained (not the end)
                    await store.note_forwarding_error(self.pool, self.target.id, message)
                    continue
                await self._note(str(error_details(exc)))
            except (OSError, asyncio.TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError,
                    httpx.HTTPError, _Refused) as exc:
                await self._note(f"{type(exc).__name__}: {exc}")
            except Exception as exc:  # a bug must not stop forwarding for good: log, back off, resume from the cursor
                log.exception("forwarding target %s failed", self.target.id)
                await self._note(f"{type(exc).__name__}: {exc}")
            self.stats.restarts += 1
            await backoff.wait()

    async def _note(self, error: str) -> None:
        log.warning("forwarding target %s: %s; retrying from its cursor", self.target.id, error)
        with contextlib.suppress(Exception):
            await store.note_forwarding_error(self.pool, self.target.id, error)

    async def _commit(self, from_cursor: int, cursor: int, batches: int, readings: int,
                      commit_time: object) -> None:
        if not await store.commit_forwarded(self.pool, self.target.id, from_cursor=from_cursor, cursor=cursor,
                                            batches=batches, readings=readings, commit_time=commit_time):  # type: ignore[arg-type]
            raise Superseded()
        self.stats.cursor = cursor
        self._start_at_end = False

    def _watch(self, cursor: int) -> grpc.aio.UnaryStreamCall:
        tenant = self.target.tenant or tenancy.DEFAULT
        return self.source.WatchCommittedReadings(ingest_service_pb2.WatchCommittedReadingsRequest(
            after_cursor=cursor, plc_ids=list(self.target.plc_ids),
            start_at_end=self._start_at_end and cursor == 0), metadata=((tenancy.HEADER, tenant),))

    def _own(self, committed: committed_pb2.CommittedBatch) -> bool:
        """Whether a batch of the feed is the target's tenant's (ingest names the tenant of each batch; a
        batch of no tenant is from an ingest before tenants, whose readings are all the default tenant's)."""
        return (committed.tenant or tenancy.DEFAULT) == (self.target.tenant or tenancy.DEFAULT)

    def _observe(self, message: ingest_service_pb2.WatchCommittedReadingsResponse) -> None:
        s = self.stats
        s.head_cursor = message.head_cursor
        if message.cursor < message.head_cursor and message.batches:
            s.lag_seconds = max(0.0, time.time() - message.batches[-1].commit_time.ToMicroseconds() / 1e6)
        elif message.cursor >= message.head_cursor:
            s.lag_seconds = 0.0

    async def _forward(self, backoff: object) -> None:
        state = await store.get_forwarding_target(self.pool, self.target.id)
        self.stats.cursor = state.cursor
        if self.target.kind == FORWARD_HTTP:
            await self._forward_http(state, backoff)
        else:
            await self._forward_ingest(state, backoff)

    # --- into another Fabrica's ingest ----------------------------------------------------------------

    async def _forward_ingest(self, state: ForwardingTarget, backoff: object) -> None:
        cursor, sent = state.cursor, state.forwarded_batches
        async with grpc.aio.insecure_channel(self.target.ingest_address, options=PEER_CHANNEL_OPTIONS) as channel:
            stream = ingest_service_pb2_grpc.IngestServiceStub(channel).StreamReadings()
            status = ServerStatus(stream)  # the other ingest's own status, should a write race its end
            watch = self._watch(cursor)
            try:
                await stream.write(ingest_service_pb2.StreamReadingsRequest(
                    open=ingest_service_pb2.StreamOpen(collector_id=self.target.collector_id)))
                first = await stream.read()
                if first is grpc.aio.EOF or first.WhichOneof("kind") != "resume":
                    raise _Refused("the other ingest did not answer the stream's open with a resume")
                async for message in _messages(watch):
                    self._observe(message)
                    readings = 0
                    own = [c for c in message.batches if self._own(c)]  # another tenant's: never forwarded
                    for committed in own:
                        sent += 1
                        readings += len(committed.batch.readings)
                        await stream.write(ingest_service_pb2.StreamReadingsRequest(batch=reading_pb2.ReadingBatch(
                            collector_id=self.target.collector_id, sequence=sent, readings=committed.batch.readings)))
                    for n in range(sent - len(own) + 1, sent + 1):
                        response = await stream.read()
                        if response is grpc.aio.EOF:  # (a refusal, e.g. SEQUENCE_GAP, raises from read())
                            raise _Refused("the other ingest ended the stream")
                        if response.ack.sequence != n:
                            raise _Refused(f"acknowledged {response.ack.sequence}, expected {n}")
                        self.stats.duplicates += response.ack.duplicate
                    commit_time = to_datetime(own[-1].commit_time) if own else None
                    await self._commit(cursor, message.cursor, len(own), readings, commit_time)
                    cursor = message.cursor
                    self._count(len(own), readings)
                    backoff.reset()  # type: ignore[attr-defined]
            except grpc.aio.AioRpcError as exc:
                raise status.real(exc) from None
            finally:
                watch.cancel()
                stream.cancel()

    # --- HTTP JSON ------------------------------------------------------------------------------------

    async def _forward_http(self, state: ForwardingTarget, backoff: object) -> None:
        cursor = state.cursor
        watch = self._watch(cursor)
        try:
            async with httpx.AsyncClient(timeout=self.request_timeout, follow_redirects=False) as client:
                async for message in _messages(watch):
                    self._observe(message)
                    for committed in message.batches:
                        if not self._own(committed):  # another tenant's: never forwarded
                            continue
                        await self._post(client, committed)
                        readings = len(committed.batch.readings)
                        await self._commit(cursor, committed.cursor, 1, readings, to_datetime(committed.commit_time))
                        cursor = committed.cursor
                        self._count(1, readings)
                    if message.cursor != cursor:  # past batches the filter left out
                        await self._commit(cursor, message.cursor, 0, 0, None)
                        cursor = message.cursor
                    backoff.reset()  # type: ignore[attr-defined]
        finally:
            watch.cancel()

    async def _post(self, client: httpx.AsyncClient, committed: committed_pb2.CommittedBatch) -> None:
        body = json.dumps({"target_id": self.target.id,
                           "batch": json_format.MessageToDict(committed, preserving_proto_field_name=True)},
                          separators=(",", ":"), sort_keys=True).encode()
        timestamp = int(time.time())
        response = await client.post(self.target.url, content=body, headers={
            "Content-Type": "application/json",
            IDEMPOTENCY_HEADER: f"{self.target.id}:{committed.cursor}",
            TIMESTAMP_HEADER: str(timestamp),
            SIGNATURE_HEADER: sign(self.target.secret, timestamp, body),
            "User-Agent": "fabrica-alarm-forward/1",
        })
        if not 200 <= response.status_code < 300:
            raise _Refused(f"HTTP {response.status_code}: {response.text[:200]}")

    def _count(self, batches: int, readings: int) -> None:
        self.stats.batches += batches
        self.stats.readings += readings
        if readings:
            _forwarded_readings.add(readings, {"target": target_key(self.target.tenant, self.target.id)})


async def _messages(call: grpc.aio.UnaryStreamCall) -> AsyncIterator[ingest_service_pb2.WatchCommittedReadingsResponse]:
    async for message in call:
        yield message


_meter = metrics.get_meter("fabrica.alarm")
_forwarded_readings = _meter.create_counter("fabrica_alarm_forwarded_readings",
                                            description="Readings forwarded, by forwarding target")


#: The supervisors of this process (one, except in tests), whose forwarders the lag gauges report.
_supervisors: weakref.WeakSet[ForwardingSupervisor] = weakref.WeakSet()


def _active_stats() -> list[tuple[str, ForwardingStats]]:
    return [(t, st) for sup in list(_supervisors) if sup.active.is_set() for t, st in sup.stats.items()]


def _lag_seconds(_options: object) -> Iterable[metrics.Observation]:
    return [metrics.Observation(st.lag_seconds, {"target": t}) for t, st in _active_stats()]


def _lag_batches(_options: object) -> Iterable[metrics.Observation]:
    return [metrics.Observation(max(0, st.head_cursor - st.cursor), {"target": t}) for t, st in _active_stats()]


_meter.create_observable_gauge("fabrica_alarm_forward_lag_seconds", callbacks=[_lag_seconds], unit="s",
                               description="Age of the oldest committed batch not yet forwarded, by target")
_meter.create_observable_gauge("fabrica_alarm_forward_lag_batches", callbacks=[_lag_batches],
                               description="Feed batches committed after the forwarded cursor, by target")


class ForwardingSupervisor:
    """Runs a Forwarder per enabled forwarding target while this replica holds the forwarding lock, and
    follows changes to the targets (every `poll_interval` seconds: a changed target's forwarder restarts
    from its stored state, a disabled or deleted one stops). `ingest_addr` is the source ingest."""

    def __init__(self, pool: asyncpg.Pool, dsn: str, ingest_addr: str, *, retry: RetryPolicy = SERVICE_RETRY,
                 poll_interval: float = 2.0, standby_interval: float = 2.0, request_timeout: float = 30.0,
                 settings: Settings | None = None):
        self.pool = pool
        self.dsn = dsn
        self.ingest_addr = ingest_addr
        #: The service's settings: the source channel's TLS and token (runtime/channels.peer_channel).
        self.settings = settings
        self.retry = retry
        self.poll_interval = poll_interval
        self.standby_interval = standby_interval
        self.request_timeout = request_timeout
        #: Set while this replica holds the lock and forwards.
        self.active = asyncio.Event()
        #: Per target (`target_key`), what its forwarders did in this process.
        self.stats: dict[str, ForwardingStats] = {}
        self._running: dict[str, tuple[int, asyncio.Task[None]]] = {}
        self._task: asyncio.Task[None] | None = None
        _supervisors.add(self)

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="alarm-forwarding")

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None

    async def _run(self) -> None:
        backoff = self.retry.backoff()
        standing_by = False
        while True:
            conn: asyncpg.Connection | None = None
            try:
                conn = await asyncpg.connect(self.dsn, timeout=10,
                                             server_settings={"application_name": "fabrica-alarm-forwarding"})
                if not await conn.fetchval("SELECT pg_try_advisory_lock($1)", FORWARD_LOCK_KEY):
                    if not standing_by:
                        log.info("another replica forwards readings; standing by")
                        standing_by = True
                    await conn.close()
                    conn = None
                    await asyncio.sleep(self.standby_interval)
                    continue
                standing_by = False
                self.active.set()
                backoff.reset()
                async with peer_channel(self.ingest_addr, self.settings) as channel:
                    await self._supervise(conn, ingest_service_pb2_grpc.IngestServiceStub(channel))
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("forwarding stopped: %s; restarting", f"{type(exc).__name__}: {exc}")
            finally:
                self.active.clear()
                for _, task in self._running.values():
                    task.cancel()
                for _, task in list(self._running.values()):
                    with contextlib.suppress(BaseException):
                        await task
                self._running.clear()
                if conn is not None:
                    conn.terminate()  # releases the lock with the session
            await backoff.wait()

    async def _supervise(self, conn: asyncpg.Connection, source: ingest_service_pb2_grpc.IngestServiceStub) -> None:
        while not conn.is_closed():
            with tenancy.system():  # every tenant's targets
                targets = await store.list_forwarding_targets(self.pool)
            wanted = {target_key(t.tenant, t.id): t for t in targets if t.enabled}
            for target_id, (revision, task) in list(self._running.items()):
                target = wanted.get(target_id)
                if target is None or target.revision != revision or task.done():
                    task.cancel()
                    with contextlib.suppress(BaseException):
                        await task
                    del self._running[target_id]
            for target_id, target in wanted.items():
                if target_id not in self._running:
                    stats = self.stats.setdefault(target_id, ForwardingStats())
                    forwarder = Forwarder(self.pool, target, source, retry=self.retry,
                                          request_timeout=self.request_timeout, stats=stats)
                    with tenancy.scope(target.tenant):  # the forwarder's task works in its target's tenant
                        task = asyncio.create_task(forwarder.run(), name=f"forward-{target_id}")
                    self._running[target_id] = (target.revision, task)
            await asyncio.sleep(self.poll_interval)
            await asyncio.wait_for(conn.execute("SELECT 1"), 10)  # the lock's session is still ours
