"""The tag-event consumer: ingest's WatchTagEvents turned into bookings and downtime, exactly once.

It runs as a background task of the production service. Of all replicas, one consumes at a time: the one
holding a session advisory lock (``pg_try_advisory_lock``) on its own dedicated connection. The others
stand by and try again every ``standby_interval`` seconds; when the holder dies, Postgres ends its
session, the lock is free, and a stand-by takes over from the stored cursor.

The active consumer asks ingest for the events after the stored cursor and applies each message in one
transaction on the lock's connection, together with moving the cursor (service.TagEventService): a crash
at any point leaves either the whole message applied with its cursor, or none of it. Processing on the
lock's own connection also means a consumer that lost its lock (its connection died) cannot write any more.

Ingest being unavailable is normal (it restarts, it is deployed separately): the consumer retries under
the runtime's one retry policy (runtime/retry.py; SERVICE_RETRY unless the app passes another) and keeps
its lock meanwhile. Errors are logged with their decoded details (google.rpc.Status, via grpcio-status). A
message that cannot be applied because the database is gone is retried the same way, from the stored
cursor. An event that cannot be applied because of what it holds (service.UNTAKEABLE_ERRORS: it would fail
the same way on every retry) is recorded as an ``UNTAKEABLE`` anomaly and passed, the cursor moved past it
in the same transaction, and logged once (TagEventService.apply_tag_events): one event never stops every
later booking.

Tenants: the consumer is installation-wide. It asks ingest as ``*`` (peer_channel(..., tenant="*")), so one
stream carries every tenant's events, each naming its tenant (TagEvent.tenant; ``default`` when empty). Its
connection runs as the row-level-security role (runtime/tenancy.py) and sees no tenant's rows until a
transaction names one: each tenant's events are booked under that tenant (TagEventService), so an event of
tenant A's tag finds A's bindings and orders only, even where B bound a tag with the same id. The cursor
(``consumer_cursor``, the installation's position in the one stream) is the one table without a tenant, and
it moves in the same transaction as before: exactly once holds across tenants. A service whose identity is
one tenant's (a token of that tenant: ingest refuses it "*", PERMISSION_DENIED TENANT_MISMATCH) consumes
that tenant's events only, and says so in an error log line. The channel's message size limit is the one of every Fabrica server and channel
(runtime/channels.py), so whatever ingest sends fits in what this consumer accepts.
"""

from __future__ import annotations

import asyncio
import logging
import time

import asyncpg
import grpc
from fabrica.ingest.v1 import ingest_service_pb2, ingest_service_pb2_grpc
from opentelemetry import metrics, trace

from ..clients.errors import ErrorDetails, error_details
from ..runtime import tenancy
from ..runtime.channels import peer_channel
from ..runtime.settings import Settings
from ..runtime.telemetry import ConsumerLag, from_proto, parent_of
from ..runtime.retry import SERVICE_RETRY, RetryPolicy
from ..runtime.tasks import cancel_and_wait
from .service import TagEventService

log = logging.getLogger(__name__)
tracer = trace.get_tracer("fabrica.production")


def booking_span(events) -> trace.Span:
    """The span of applying one message of tag events (the bookings derived from them): a child of the first
    sampled event's batch (TagEvent.trace_context), with a link to each batch, so the booking closes the trace
    that began with the PLC read."""
    parent, links = parent_of([from_proto(e.trace_context) for e in events if e.HasField("trace_context")])
    return tracer.start_as_current_span(
        "production.book", context=parent or trace.set_span_in_context(trace.INVALID_SPAN), links=links,
        attributes={"fabrica.production.events": len(events)})


class TagEventConsumer:
    def __init__(self, dsn: str, ingest_addr: str, tag_events: TagEventService, *, standby_interval: float = 1.0,
                 retry: RetryPolicy = SERVICE_RETRY, settings: Settings | None = None):
        self.dsn = dsn
        #: Its service's settings: the channel's TLS and the token it sends (runtime/channels.peer_channel);
        #: None: plaintext without a token (tests).
        self.settings = settings
        self.ingest_addr = ingest_addr
        self.tag_events = tag_events
        self.standby_interval = standby_interval
        self.retry = retry
        #: Set while this replica holds the lock and consumes.
        self.active = asyncio.Event()
        #: The tenant it asks ingest for: every tenant's events ("*"), unless its identity turned out to be one
        #: tenant's (see _one_tenant_only).
        self.tenant = tenancy.ALL
        #: The cursor of the last message applied by this replica (None before the first).
        self.cursor: int | None = None
        self._backoff = retry.backoff()
        self._task: asyncio.Task[None] | None = None
        self._last_problem = ""
        self._last_warning = 0.0
        meter = metrics.get_meter("fabrica.production")
        self._events = meter.create_counter("fabrica_production_tag_events", description="Tag events applied")
        self._parts = meter.create_counter("fabrica_production_booked_parts",
                                           description="Parts booked from counters, by kind (good, scrap)")
        self._anomalies = meter.create_counter("fabrica_production_tag_anomalies",
                                               description="Counter jumps and unusable values flagged, not booked")
        self._active_gauge = meter.create_up_down_counter(
            "fabrica_production_consumer_active", description="1 while this process consumes tag events")
        #: fabrica_tag_events_lag{consumer="production"} (runtime/telemetry.py).
        self.lag = ConsumerLag(meter, "production", self.active)

    @property
    def unnamed_tenant(self) -> str:
        """The tenant of an event that names none: the one tenant consumed, or ``default`` (events from an
        ingest from before tenants)."""
        return tenancy.DEFAULT if self.tenant == tenancy.ALL else self.tenant

    def _one_tenant_only(self, details: ErrorDetails) -> bool:
        """True (and from now on consume that tenant's events) when ingest refused "*" because this service's
        identity belongs to one tenant (PERMISSION_DENIED, reason TENANT_MISMATCH: a token without an
        installation-wide tenant). Logged as an error: every other tenant's counts are not booked until
        production gets an installation-wide identity (its service certificate, or a token minted with
        --tenant '*')."""
        tenant = dict(details.metadata).get("tenant", "")
        if (details.code != grpc.StatusCode.PERMISSION_DENIED or details.reason != "TENANT_MISMATCH"
                or self.tenant != tenancy.ALL or not tenancy.is_code(tenant)):
            return False
        log.error("ingest refused to serve every tenant's tag events: this service's identity belongs to tenant "
                  "%r. Consuming that tenant's events only; other tenants' counts are not booked until production "
                  "has an installation-wide identity (its service certificate, or a token with tenant '*')",
                  tenant, extra={"ingest": self.ingest_addr, "tenant": tenant})
        self.tenant = tenant
        return True

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="production-tag-event-consumer")

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None

    def _warn_ingest(self, problem: str) -> None:
        """A warning when ingest becomes unreachable or the problem changes, then one a minute: an ingest that
        is down for an hour should not write a line per retry."""
        now = time.monotonic()
        if problem != self._last_problem or now - self._last_warning >= 60.0:
            log.warning("WatchTagEvents failed: %s; retrying with backoff", problem, extra={"ingest": self.ingest_addr})
            self._last_problem, self._last_warning = problem, now
        else:
            log.debug("WatchTagEvents failed again: %s", problem)

    async def _run(self) -> None:
        standing_by = False
        while True:
            conn: asyncpg.Connection | None = None
            try:
                conn = await asyncpg.connect(
                    self.dsn, timeout=10, command_timeout=60,
                    server_settings={"application_name": "fabrica-production-consumer",
                                     "search_path": '"production", public', "role": tenancy.DB_ROLE})
                if not await self.tag_events.try_lock(conn):
                    if not standing_by:
                        log.info("another replica consumes tag events; standing by")
                        standing_by = True
                    await conn.close()
                    conn = None
                    await asyncio.sleep(self.standby_interval)
                    continue
                standing_by = False
                self.active.set()
                self._active_gauge.add(1)
                log.info("consuming tag events", extra={"ingest": self.ingest_addr,
                                                        "cursor": await self.tag_events.cursor(conn)})
                await self._consume(conn)
            except asyncio.CancelledError:
                raise
            except (OSError, asyncio.TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                log.warning("tag-event consumer lost the database: %s", exc)
            except Exception:  # a bug must not kill the task for good: log it, back off, retry from the cursor
                log.exception("tag-event consumer failed; retrying from the stored cursor")
            finally:
                if self.active.is_set():
                    self.active.clear()
                    self._active_gauge.add(-1)
                if conn is not None:
                    try:
                        await asyncio.wait_for(conn.close(), timeout=2)  # also releases the lock
                    except Exception:  # a dead connection: drop it; the server ends the session anyway
                        conn.terminate()
            await self._backoff.wait()

    async def _consume(self, conn: asyncpg.Connection) -> None:
        """Stream and apply events while the lock's connection lives; reconnect to ingest with backoff."""
        while not conn.is_closed():
            tenant = self.tenant
            async with peer_channel(self.ingest_addr, self.settings, tenant=tenant) as channel:
                stub = ingest_service_pb2_grpc.IngestServiceStub(channel)
                while not conn.is_closed() and self.tenant == tenant:
                    cursor = await self.tag_events.cursor(conn)
                    call = stub.WatchTagEvents(ingest_service_pb2.WatchTagEventsRequest(after_cursor=cursor))
                    try:
                        async for response in call:
                            with booking_span(response.events) as span:
                                result = await self.tag_events.apply_tag_events(conn, response.events,
                                                                                unnamed=self.unnamed_tenant)
                                span.set_attributes({"fabrica.production.booked_good": result.booked_good,
                                                     "fabrica.production.booked_scrap": result.booked_scrap,
                                                     "fabrica.production.anomalies": result.anomalies})
                            if response.events:
                                self.lag.applied(response.events[-1].read_time.ToNanoseconds())
                            self.cursor = result.cursor
                            self._backoff.reset()
                            self._last_problem = ""
                            self._events.add(result.applied)
                            self._parts.add(result.booked_good, {"kind": "good"})
                            self._parts.add(result.booked_scrap, {"kind": "scrap"})
                            self._anomalies.add(result.anomalies)
                            if result.booked_good or result.booked_scrap or result.anomalies:
                                log.debug("tag events applied", extra={
                                    "cursor": result.cursor, "events": result.applied, "good": result.booked_good,
                                    "scrap": result.booked_scrap, "anomalies": result.anomalies})
                        log.info("WatchTagEvents ended; reconnecting")
                        self.lag.disconnected()
                    except grpc.aio.AioRpcError as exc:
                        details = error_details(exc)
                        if self._one_tenant_only(details):
                            continue
                        if exc.code() == grpc.StatusCode.OUT_OF_RANGE:
                            # Ingest no longer has the events after our cursor: they are lost to us. Carry on from
                            # the oldest it has (all newer than ours, as cursors only grow) and say so loudly.
                            log.error("ingest no longer retains the events after cursor %d; continuing from its "
                                      "oldest event. Counts in the gap are not booked.", cursor)
                            await self.tag_events.reset_cursor(conn)
                        else:
                            self._warn_ingest(str(details))
                        self.lag.disconnected()
                    finally:
                        call.cancel()
                    await self._backoff.wait()
