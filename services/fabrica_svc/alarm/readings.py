"""The readings source of the evaluation: ingest's WatchCommittedReadings (the committed-readings feed), from a
cursor, as `ReadingsMessage`s.

Each message of the feed becomes one ReadingsMessage with the feed's cursor: the evaluation commits that
cursor with what the message produced, and resumes after it. A message without batches (the filters left
them out, or retention moved on) still moves the cursor.

The feed's readings carry no tag name or unit (collectors leave them empty); the message templates want
them, so the first time a tag appears its name and unit are asked of ingest (GetLatestValues, which
answers them from what the collector reported with SyncTags) and remembered. A tag ingest does not describe
is named "tag <id>" in messages and asked about again every 5 s (its collector may not have reported its tags
yet); a failure to ask is logged and asked again a minute later. Names only
decorate messages: transitions never depend on them.

Tenants: the evaluation reads the feed installation-wide (the channel names the tenant ``*``: app.py), so
each batch names its tenant (CommittedBatch.tenant), and every reading becomes a sample of that tenant. A
batch that names none comes from an ingest from before tenants: its readings are the tenant ``default``'s.
Tag names are asked of ingest in the tag's tenant (the ``x-fabrica-tenant`` header of the call) and
remembered per (tenant, tag).

Retention: if ingest no longer keeps the batches after our cursor (OUT_OF_RANGE, reason
CURSOR_OUT_OF_RANGE), those readings are lost to the evaluation. It says so loudly and carries on from the
oldest batch ingest keeps (the `purged_through` cursor it names), as production's consumer does.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator

import grpc
from fabrica.ingest.v1 import ingest_service_pb2, ingest_service_pb2_grpc

from ..clients.errors import error_details
from ..runtime import tenancy
from .convert import sample_of
from .evaluation import ReadingSource, ReadingsMessage

log = logging.getLogger(__name__)

NAME_TIMEOUT = 5.0
NAME_RETRY_SECONDS = 60.0
#: A tag ingest has no name for yet is asked about again after this many seconds.
UNNAMED_RETRY = 5.0
#: GetLatestValues takes at most this many tag ids a call.
NAME_BATCH = 5000


class _Names:
    def __init__(self, stub: ingest_service_pb2_grpc.IngestServiceStub):
        self.stub = stub
        #: (name, unit) by (tenant, tag id).
        self.known: dict[tuple[str, int], tuple[str, str]] = {}
        #: When a tag ingest could not name yet was last asked about (its collector may not have synced yet).
        self.asked: dict[tuple[str, int], float] = {}
        self.failed_at = -NAME_RETRY_SECONDS

    async def fill(self, tags: set[tuple[str, int]]) -> None:
        now = time.monotonic()
        missing = sorted(t for t in tags if t not in self.known and now - self.asked.get(t, -1e9) >= UNNAMED_RETRY)
        if not missing or now - self.failed_at < NAME_RETRY_SECONDS:
            return
        of_tenant: dict[str, list[int]] = {}
        for tenant, tag_id in missing:
            of_tenant.setdefault(tenant, []).append(tag_id)
        try:
            for tenant, tag_ids in of_tenant.items():
                for i in range(0, len(tag_ids), NAME_BATCH):
                    chunk = tag_ids[i:i + NAME_BATCH]
                    answer = await self.stub.GetLatestValues(
                        ingest_service_pb2.GetLatestValuesRequest(tag_ids=chunk), timeout=NAME_TIMEOUT,
                        metadata=((tenancy.HEADER, tenant),))
                    for r in answer.readings:
                        if r.tag_name:
                            self.known[(tenant, r.tag_id)] = (r.tag_name, r.unit)
                            self.asked.pop((tenant, r.tag_id), None)
                    for t in chunk:
                        if (tenant, t) not in self.known:
                            self.asked[(tenant, t)] = now
        except grpc.aio.AioRpcError as exc:
            log.warning("cannot ask ingest for tag names: %s", error_details(exc))
            self.failed_at = now


def ingest_readings(channel: grpc.aio.Channel) -> ReadingSource:
    stub = ingest_service_pb2_grpc.IngestServiceStub(channel)
    names = _Names(stub)

    async def source(after_cursor: int) -> AsyncIterator[ReadingsMessage]:
        call = stub.WatchCommittedReadings(ingest_service_pb2.WatchCommittedReadingsRequest(after_cursor=after_cursor))
        try:
            known = names.known
            async for response in call:
                batches = [(b.tenant or tenancy.DEFAULT, b.batch.readings) for b in response.batches]
                await names.fill({(tenant, r.tag_id) for tenant, readings in batches for r in readings})
                yield ReadingsMessage(response.cursor, [sample_of(r, known.get((tenant, r.tag_id)), tenant)
                                                        for tenant, readings in batches for r in readings])
        except grpc.aio.AioRpcError as exc:
            metadata = dict(error_details(exc).metadata)
            if exc.code() == grpc.StatusCode.OUT_OF_RANGE and metadata.get("purged_through", "").isdigit():
                oldest = int(metadata["purged_through"])
                log.error("ingest no longer keeps the readings after cursor %d; continuing from %d. Readings in "
                          "between are not evaluated.", after_cursor, oldest)
                yield ReadingsMessage(oldest, [])
                return
            raise
        finally:
            call.cancel()

    return source
