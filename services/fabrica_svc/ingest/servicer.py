"""The IngestService gRPC methods: proto ⇄ domain, no SQL (that is in store.py).

Validation: the shared interceptor has already checked every request against the protovalidate rules in
the protos, except StreamReadings' messages: that method validates its own (``@validates_own_requests``),
because converting a ReadingBatch reads every field of every reading anyway. Its batches are checked in the
conversion loop (convert.batch_from_proto, which gives protovalidate's verdicts, differential-tested), its
other messages (open) with protovalidate here (:func:`_checked`), each before anything else looks at it,
as the interceptor did. What is checked here besides is what those rules cannot express: the stream's protocol (open first, one collector, increasing sequences, each new
batch exactly one above the last: the sequence rule, see domain.plan_group; the epoch) and values Postgres
cannot hold (see convert.py).

Tenants: every query runs on the pool, scoped to the RPC's tenant by row-level security (store.py,
"Tenants"), so nothing here filters by tenant. What belongs to one tenant (a collector's stream, its tags,
its sequence) needs one: an installation-wide caller naming none (``*``) is INVALID_ARGUMENT. A stream's
batches are stamped with its tenant and pass its readings/s quota (quota.py) before they are queued.

Names and units: SyncTags stores what each collector says of its tags (store.sync_tags, in its own table
and transaction, apart from the write path); the readings GetLatestValues, QueryReadings and
ExportReadings return carry them (tag_name, unit), and GetLatestValues leaves out removed tags.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import AsyncIterator
from typing import Any

import grpc

from fabrica.ingest.v1 import ingest_service_pb2 as pb
from fabrica.ingest.v1 import ingest_service_pb2_grpc as pb_grpc
from fabrica.ingest.v1 import query_pb2

from ..runtime import audit, principal, tenancy
from ..runtime.errors import FailedPrecondition, FieldViolation, InvalidArgument, NotFound, OutOfRange
from ..runtime.interceptors import invalid_stream_message, validates_own_requests
from ..runtime.notify import Listener
from ..runtime.pages import decode_page_token, encode_page_token
from ..runtime.timefmt import to_datetime
from ..runtime.validation import violations_of
from ..runtime.watch import Page, watch
from .config import IngestConfig
from .convert import (
    FeedFilter,
    ReceivedRequest,
    batch_from_proto,
    bucket_from_row,
    check_filter,
    check_tag_ids,
    check_timestamp,
    readings_from_rows,
    tag_event_from_row,
    parse_stream_request,
    tag_infos_from_proto,
)
from .domain import (
    DEFAULT_PAGE_SIZE,
    EXPORT_CHUNK_ROWS,
    MAX_BIGINT,
    MAX_RESPONSE_BYTES,
    BatchOutcome,
    PageCursor,
    WriteBatch,
    check_bucket_count,
    datetime_to_micros,
    epoch_fenced,
    sequence_gap,
    filter_fingerprint,
    micros_to_datetime,
)
from .quota import TenantQuotas
from .store import IngestStore
from ..runtime.tenants import TenantDirectory
from .tracing import duplicate_span
from .writer import BatchWriter, StreamSession

#: Events per WatchTagEvents message (and per catch-up query).
EVENTS_PAGE = 500
#: Committed batches per WatchCommittedReadings message at most (fewer when their payload passes
#: MAX_RESPONSE_BYTES; a batch is at most one received message, so one alone always fits).
FEED_PAGE = 200
_END = object()

log = logging.getLogger(__name__)


def add_to_server(servicer: IngestServicer, server: grpc.aio.Server) -> None:
    """Register `servicer` as ``add_IngestServiceServicer_to_server`` does, with one difference:
    StreamReadings' request deserializer is :func:`convert.parse_stream_request`, which keeps each
    batch's received bytes beside the parsed message (for the committed-readings feed, so that ingest never
    encodes a batch again). The other methods' handlers are the generated ones, taken from the generated
    function itself (so a method added to the proto is registered here too)."""

    class _Capture:
        def add_generic_rpc_handlers(self, handlers: object) -> None:
            pass

        def add_registered_method_handlers(self, service: str, handlers: dict[str, grpc.RpcMethodHandler]) -> None:
            self.service, self.handlers = service, dict(handlers)

    capture = _Capture()
    pb_grpc.add_IngestServiceServicer_to_server(servicer, capture)
    generated = capture.handlers["StreamReadings"]
    capture.handlers["StreamReadings"] = grpc.stream_stream_rpc_method_handler(
        servicer.StreamReadings, request_deserializer=parse_stream_request,
        response_serializer=generated.response_serializer,
    )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(capture.service, capture.handlers),))
    server.add_registered_method_handlers(capture.service, capture.handlers)


def _received(item: ReceivedRequest | pb.StreamReadingsRequest) -> tuple[pb.StreamReadingsRequest, bytes | None]:
    """A stream message and its batch's received bytes (None: not known, as when the servicer is registered
    with the generated deserializer)."""
    if isinstance(item, ReceivedRequest):
        return item.message, item.batch_bytes
    return item, None


def _checked(request: pb.StreamReadingsRequest, index: int) -> WriteBatch | None:
    """Message `index` of a StreamReadings stream, validated as the interceptor would (the method opts out
    of its check): a batch is checked while it is converted (its rows are returned), anything else by
    protovalidate. InvalidArgument with the interceptor's message if it breaks a rule."""
    if request.WhichOneof("kind") == "batch":
        try:
            return batch_from_proto(request.batch)
        except InvalidArgument as exc:
            raise invalid_stream_message(index, exc.violations) from None
    found = violations_of(request)
    if found:
        raise invalid_stream_message(index, found)
    return None


class IngestServicer(pb_grpc.IngestServiceServicer):
    def __init__(self, config: IngestConfig, store: IngestStore, writer: BatchWriter, hub: Listener,
                 feed_hub: Listener | None = None, *, quotas: TenantQuotas | None = None):
        self.config = config
        self.store = store
        self.writer = writer
        self.hub = hub
        #: The Listener on the committed-readings feed's channel (store.FEED_CHANNEL).
        self.feed_hub = feed_hub if feed_hub is not None else hub
        #: The tenants' readings/s quotas (quota.py); None: no quotas.
        self.quotas = quotas if quotas is not None else TenantQuotas(TenantDirectory(config_addr=""))

    # --- write path -----------------------------------------------------------------------------------

    @validates_own_requests  # each message in _checked: a batch as it is converted
    async def StreamReadings(
        self, request_iterator: AsyncIterator[ReceivedRequest | pb.StreamReadingsRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[pb.StreamReadingsResponse]:
        requests = aiter(request_iterator)
        try:
            first, _ = _received(await anext(requests))
        except StopAsyncIteration:
            return
        _checked(first, 0)
        if first.WhichOneof("kind") != "open":
            raise InvalidArgument(FieldViolation("open", "the first message of the stream must be open"))
        opening = first.open
        collector_id = opening.collector_id
        principal.require_collector(collector_id)  # before anything reads or creates its sequence row
        # The stream is its collector's tenant's: its sequence row, its batches (stamped below), its quota.
        tenant = tenancy.require_one("a collector's stream and its batches")
        if opening.new_epoch and opening.epoch:
            raise InvalidArgument(FieldViolation("open.epoch", "must be 0 with new_epoch: ingest gives the epoch"))
        state = await self.store.open_stream(collector_id, opening.epoch, opening.new_epoch)
        if not opening.new_epoch and opening.epoch < state.epoch:
            fenced = epoch_fenced(collector_id, opening.epoch, state.epoch)
            log.warning("stream refused: %s", fenced.message, extra={"reason": fenced.reason, **fenced.metadata})
            raise fenced
        committed = state.committed
        yield pb.StreamReadingsResponse(
            resume=pb.StreamResume(collector_id=collector_id, committed_sequence=committed, epoch=state.epoch)
        )
        session = self.writer.open_session(collector_id, committed, state.epoch, tenant)
        # In stream order: (sequence, future) per batch, then _END or the exception that ends the stream.
        # The writer may also put an exception here (the database is lost) while the stream is idle.
        pending: asyncio.Queue[Any] = asyncio.Queue()
        session.interrupt = pending.put_nowait
        # Batches read but not yet acknowledged: a client that does not read its acks stops being read.
        window = asyncio.Semaphore(self.config.stream_max_in_flight)
        reader = asyncio.create_task(self._read_batches(requests, session, pending, window))
        try:
            while True:
                item = await pending.get()
                if item is _END:
                    return
                if isinstance(item, BaseException):
                    raise item
                sequence, future = item
                # shield: a cancelled call must not cancel the writer's future (the batch may commit).
                outcome: BatchOutcome = await asyncio.shield(future)
                yield pb.StreamReadingsResponse(
                    ack=pb.BatchAck(sequence=sequence, duplicate=outcome.duplicate, written=outcome.written)
                )
                window.release()
        finally:
            session.interrupt = None
            self.writer.close_session(session)
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader

    async def _read_batches(self, requests: AsyncIterator[ReceivedRequest | pb.StreamReadingsRequest],
                            session: StreamSession,
                            pending: asyncio.Queue[Any], window: asyncio.Semaphore) -> None:
        loop = asyncio.get_running_loop()
        last = 0
        index = 0  # of the message in the stream (the open message was 0)
        try:
            while True:
                await window.acquire()
                try:
                    request, received_bytes = _received(await anext(requests))
                except StopAsyncIteration:
                    break
                index += 1
                converted = _checked(request, index)  # before anything else looks at it, as the interceptor did
                if converted is None:
                    raise InvalidArgument(FieldViolation("open", "only the first message of the stream may be open"))
                batch = request.batch
                principal.require_collector(batch.collector_id)
                if batch.collector_id != session.collector_id:
                    raise InvalidArgument(FieldViolation(
                        "batch.collector_id", f"must be the collector the stream was opened for ({session.collector_id})"
                    ))
                sequence = batch.sequence
                if sequence <= last:
                    raise InvalidArgument(FieldViolation(
                        "batch.sequence", f"must increase along the stream: {sequence} follows {last}"
                    ))
                if sequence > session.resumed_at:
                    # The sequence rule on what this stream has seen: the committed sequence it resumed
                    # at, then each batch it queued. The write transaction checks it again under the lock.
                    expected = max(last, session.resumed_at) + 1
                    if sequence != expected:
                        gap = sequence_gap(session.collector_id, sequence, expected, session.resumed_at)
                        log.warning("batch refused: %s", gap.message, extra={"reason": gap.reason, **gap.metadata})
                        raise gap
                last = sequence
                if sequence <= session.resumed_at:
                    future: asyncio.Future[BatchOutcome] = loop.create_future()
                    future.set_result(BatchOutcome(duplicate=True, written=0))
                    duplicate_span(batch, session.resumed_at)
                else:
                    converted.epoch = session.epoch
                    if self.config.feed:  # the batch as received, for the committed-readings feed
                        converted.payload = (received_bytes if received_bytes is not None
                                             else batch.SerializeToString())
                    if batch.HasField("trace_context"):
                        converted.traceparent = batch.trace_context.traceparent
                        converted.tracestate = batch.trace_context.tracestate
                    converted.tenant = session.tenant
                    # The tenant's readings/s quota: this stream waits its turn here (backpressure: the next
                    # batch is not read meanwhile) or the batch is refused with RESOURCE_EXHAUSTED (quota.py).
                    await self.quotas.admit(session.tenant, converted.size, sequence=sequence)
                    future = await self.writer.submit(session, converted)
                pending.put_nowait((sequence, future))
            pending.put_nowait(_END)
        except Exception as exc:  # ends the stream after the acks of the batches before it
            pending.put_nowait(exc)

    # --- admin ---------------------------------------------------------------------------------------

    async def ResetCollectorSequence(
        self, request: pb.ResetCollectorSequenceRequest, context: grpc.aio.ServicerContext
    ) -> pb.ResetCollectorSequenceResponse:
        tenancy.require_one("a collector's sequence and epoch")
        epoch = request.epoch if request.HasField("epoch") else None
        result = await self.store.reset_sequence(request.collector_id, request.committed_sequence, epoch)
        if result is None:
            raise NotFound(f"collector {request.collector_id} has no sequence in ingest (it never opened a stream "
                           "with an epoch nor stored a batch)", metadata={"collector_id": request.collector_id})
        before, after = result
        log.warning("collector %s's sequence reset: committed %d -> %d, epoch %d -> %d", request.collector_id,
                    before.committed, after.committed, before.epoch, after.epoch,
                    extra={"collector_id": request.collector_id, "previous_committed_sequence": before.committed,
                           "committed_sequence": after.committed, "previous_epoch": before.epoch,
                           "epoch": after.epoch})
        return pb.ResetCollectorSequenceResponse(
            collector_id=request.collector_id, previous_committed_sequence=before.committed,
            previous_epoch=before.epoch, committed_sequence=after.committed, epoch=after.epoch,
        )

    # --- tag events -----------------------------------------------------------------------------------

    async def WatchTagEvents(
        self, request: pb.WatchTagEventsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.WatchTagEventsResponse]:
        found: list[FieldViolation] = []
        check_tag_ids(request.tag_ids, "tag_ids", found)
        if found:
            raise InvalidArgument(found)
        read = functools.partial(self._events_page, list(request.tag_ids) or None, list(request.plc_ids) or None)
        async with contextlib.aclosing(watch(self.hub, read, request.after_cursor)) as out:
            async for response in out:
                yield response

    async def _events_page(self, tag_ids: list[int] | None, plc_ids: list[str] | None,
                           after: int) -> Page[pb.WatchTagEventsResponse, int]:
        """The events after cursor `after` (up to EVENTS_PAGE), in one message. OUT_OF_RANGE if retention
        has removed events after `after`."""
        page = await self.store.events_page(after, tag_ids, plc_ids, EVENTS_PAGE)
        if 0 < after < page.purged_through:
            raise OutOfRange(
                f"after_cursor {after} is older than the retained events (events up to {page.purged_through}"
                " were removed by retention); resume from 0 for the oldest retained event",
                reason="CURSOR_OUT_OF_RANGE", metadata={"purged_through": str(page.purged_through)},
            )
        if not page.rows:  # nothing after `after` up to `high` (see below)
            return Page([], max(after, page.high))
        response = pb.WatchTagEventsResponse(events=[tag_event_from_row(r) for r in page.rows])
        after = page.rows[-1]["cursor"]
        if len(page.rows) == EVENTS_PAGE:
            return Page([response], after, more=True)
        # A short page: every event up to `high` was visible to that query, nothing below it can still appear.
        return Page([response], max(after, page.high))

    # --- the committed-readings feed ---------------------------------------------------------------------

    async def WatchCommittedReadings(
        self, request: pb.WatchCommittedReadingsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.WatchCommittedReadingsResponse]:
        found: list[FieldViolation] = []
        check_tag_ids(request.tag_ids, "tag_ids", found)
        if found:
            raise InvalidArgument(found)
        if not self.config.feed:
            raise FailedPrecondition("this ingest keeps no committed-readings feed (FABRICA_INGEST_FEED=off)",
                                     reason="FEED_DISABLED")
        after = request.after_cursor
        if after == 0 and request.start_at_end:
            # Where "now" is, at once: a consumer stores it and resumes from it, even if nothing commits.
            after = await self.store.feed_head()
            yield pb.WatchCommittedReadingsResponse(cursor=after, head_cursor=after)
        read = functools.partial(self._feed_page, FeedFilter.of(request.plc_ids, request.tag_ids))
        async with contextlib.aclosing(watch(self.feed_hub, read, after)) as out:
            async for response in out:
                yield response

    async def _feed_page(self, where: FeedFilter, after: int) -> Page[pb.WatchCommittedReadingsResponse, int]:
        """The committed batches after cursor `after` (up to FEED_PAGE, about MAX_RESPONSE_BYTES), narrowed
        by `where`, in one message. A page whose batches the filter left out entirely gives a message with
        no batches that moves the cursor (so a consumer can store it), once per read, and only when it
        moves. OUT_OF_RANGE if retention removed batches after `after`."""
        page = await self.store.feed_page(after, where.plc_ids, FEED_PAGE, MAX_RESPONSE_BYTES)
        if 0 < after < page.purged_through:
            raise OutOfRange(
                f"after_cursor {after} is older than the retained committed batches (batches up to "
                f"{page.purged_through} were removed by retention); resume from 0 for the oldest retained batch",
                reason="CURSOR_OUT_OF_RANGE", metadata={"purged_through": str(page.purged_through)},
            )
        if page.complete:  # every matching batch up to `high`: nothing at or below it can still appear
            cursor = max(after, page.high)
        else:  # cut by the row or byte limit: read again at once after the last one
            cursor = page.rows[-1]["cursor"]
        batches = [b for b in map(where.committed_batch, page.rows) if b is not None]
        if not batches and cursor == after:
            return Page([], after)
        response = pb.WatchCommittedReadingsResponse(batches=batches, cursor=cursor, head_cursor=page.high)
        return Page([response], cursor, more=not page.complete)

    # --- read path ------------------------------------------------------------------------------------

    async def _filter_tags(self, f: query_pb2.ReadingFilter) -> list[int]:
        check_filter(f)
        return await self.store.resolve_tags(f.tag_ids, f.plc_id)

    async def _page(
        self, f: query_pb2.ReadingFilter, tag_ids: list[int], cursor: PageCursor | None, limit: int
    ) -> tuple[list[Any], PageCursor | None]:
        """One page of readings and the cursor after it (None when there is nothing after it)."""
        rows = await self.store.readings_page(
            tag_ids, to_datetime(f.start_time), to_datetime(f.end_time), cursor,
            micros_to_datetime(cursor.read_us) if cursor else None,
            [int(q) for q in f.qualities] or None, limit + 1,
        )
        more = len(rows) > limit
        rows = rows[:limit]
        readings, used = readings_from_rows(rows, MAX_RESPONSE_BYTES)
        if not (more or used < len(rows)) or not readings:
            return readings, None
        last = rows[used - 1]
        block, offset = last["row_id"]
        return readings, PageCursor(datetime_to_micros(last["read_time"]), last["tag_id"], block, offset)

    async def QueryReadings(self, request: pb.QueryReadingsRequest, context: grpc.aio.ServicerContext) -> pb.QueryReadingsResponse:
        f = request.filter
        fingerprint = filter_fingerprint(f.SerializeToString(deterministic=True))
        cursor = None
        if request.page_token:
            cursor = PageCursor.from_position(decode_page_token(request.page_token, fingerprint))
        tag_ids = await self._filter_tags(f)
        if not tag_ids:
            return pb.QueryReadingsResponse()
        readings, after = await self._page(f, tag_ids, cursor, request.page_size or DEFAULT_PAGE_SIZE)
        return pb.QueryReadingsResponse(
            readings=readings, next_page_token=encode_page_token(fingerprint, after.position()) if after else ""
        )

    async def ExportReadings(
        self, request: pb.ExportReadingsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ExportReadingsResponse]:
        f = request.filter
        tag_ids = await self._filter_tags(f)
        if not tag_ids:
            return
        chunks = self.store.export(tag_ids, to_datetime(f.start_time), to_datetime(f.end_time),
                                   [int(q) for q in f.qualities] or None, EXPORT_CHUNK_ROWS)
        async with contextlib.aclosing(chunks):  # a cancelled call gives its connection back at once
            async for rows in chunks:
                while rows:  # a chunk of large values goes out in several messages
                    readings, used = readings_from_rows(rows, MAX_RESPONSE_BYTES)
                    yield pb.ExportReadingsResponse(readings=readings)
                    rows = rows[used:]

    async def AggregateReadings(
        self, request: pb.AggregateReadingsRequest, context: grpc.aio.ServicerContext
    ) -> pb.AggregateReadingsResponse:
        f = request.filter
        tag_ids = await self._filter_tags(f)
        start, end = to_datetime(f.start_time), to_datetime(f.end_time)
        check_bucket_count((end - start).total_seconds(), request.bucket_seconds, len(tag_ids))
        if not tag_ids:
            return pb.AggregateReadingsResponse()
        rows = await self.store.aggregate(
            tag_ids, start, end, request.bucket_seconds, [int(q) for q in f.qualities] or None
        )
        return pb.AggregateReadingsResponse(buckets=[bucket_from_row(r) for r in rows])

    async def GetLatestValues(
        self, request: pb.GetLatestValuesRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetLatestValuesResponse:
        found: list[FieldViolation] = []
        if not request.tag_ids and not request.plc_id:
            found.append(FieldViolation("tag_ids", "name tag_ids or a plc_id"))
        check_tag_ids(request.tag_ids, "tag_ids", found)
        if found:
            raise InvalidArgument(found)
        rows = await self.store.latest(list(request.tag_ids), request.plc_id)
        readings, _ = readings_from_rows(rows, 2**62)
        return pb.GetLatestValuesResponse(readings=readings)

    async def ListAuditEntries(self, request: pb.ListAuditEntriesRequest,
                               context: grpc.aio.ServicerContext) -> pb.ListAuditEntriesResponse:
        return await audit.list_response(self.store.pool, request, pb.ListAuditEntriesResponse)

    async def WatchLatestValues(
        self, request: pb.WatchLatestValuesRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.WatchLatestValuesResponse]:
        """A snapshot of the latest values, then each tag whose latest reading changed, every
        latest_watch_interval (the query GetLatestValues makes; one per interval per stream)."""
        found: list[FieldViolation] = []
        if not request.tag_ids and not request.plc_id:
            found.append(FieldViolation("tag_ids", "name tag_ids or a plc_id"))
        check_tag_ids(request.tag_ids, "tag_ids", found)
        if found:
            raise InvalidArgument(found)
        seen: dict[int, bytes] = {}
        snapshot = True
        while True:
            rows = await self.store.latest(list(request.tag_ids), request.plc_id)
            readings, _ = readings_from_rows(rows, 2**62)
            changed = []
            for r in readings:
                wire = r.SerializeToString(deterministic=True)
                if seen.get(r.tag_id) != wire:
                    seen[r.tag_id] = wire
                    changed.append(r)
            if snapshot or changed:
                yield pb.WatchLatestValuesResponse(readings=changed, snapshot=snapshot)
                snapshot = False
            await asyncio.sleep(self.config.latest_watch_interval)

    async def SyncTags(self, request: pb.SyncTagsRequest, context: grpc.aio.ServicerContext) -> pb.SyncTagsResponse:
        """The collector's current tags replace what ingest knew of its tags (see store.sync_tags)."""
        principal.require_collector(request.collector_id)
        tenancy.require_one("a collector's tags")
        changed, removed = await self.store.sync_tags(request.collector_id, tag_infos_from_proto(request))
        return pb.SyncTagsResponse(changed=changed, removed=removed)

    async def SummarizeReadings(
        self, request: pb.SummarizeReadingsRequest, context: grpc.aio.ServicerContext
    ) -> pb.SummarizeReadingsResponse:
        found: list[FieldViolation] = []
        if request.tag_id > MAX_BIGINT:
            found.append(FieldViolation("tag_id", "must be below 2^63"))
        check_timestamp(request.start_time, "start_time", found)
        check_timestamp(request.end_time, "end_time", found)
        if not found and (request.end_time.seconds, request.end_time.nanos) <= (
            request.start_time.seconds, request.start_time.nanos
        ):
            found.append(FieldViolation("end_time", "must be after start_time"))
        lsl = request.lower_spec_limit if request.HasField("lower_spec_limit") else None
        usl = request.upper_spec_limit if request.HasField("upper_spec_limit") else None
        if lsl is not None and usl is not None and usl <= lsl:
            found.append(FieldViolation("upper_spec_limit", "must be above lower_spec_limit"))
        if found:
            raise InvalidArgument(found)
        row = await self.store.summarize(
            request.tag_id, to_datetime(request.start_time), to_datetime(request.end_time), lsl, usl
        )
        summary = query_pb2.ReadingSummary(
            count=row["n"], mean=row["mean"], stddev=row["sd"], min=row["min"], max=row["max"]
        )
        for name, key in (("cp", "cp"), ("cpk", "cpk"), ("slope_per_hour", "slope"), ("intercept", "intercept")):
            if row[key] is not None:
                setattr(summary, name, row[key])
        return pb.SummarizeReadingsResponse(summary=summary)

