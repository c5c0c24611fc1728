"""Tells ingest the names and units of this collector's tags, so that every reading people see says what it
is ("press-1 / temperature, °C") and not only a tag id.

Why the collector pushes them (and ingest does not ask the config service): the collector already holds
the applied configuration, every tag with its id, name, unit, PLC and role; a push after each applied
change keeps ingest independent of the config service being up (ingest stores and serves readings while
config is down, as before), and it describes exactly the tags whose readings arrive, from the same
configuration that produced them. Why a separate unary RPC (IngestService.SyncTags) and not a field on
each ReadingBatch or on StreamReadings' open message: readings stay narrow (no strings per reading on the
COPY hot path), the sequence and exactly-once logic of the stream is untouched, and a sync that fails can
never hold back or fail a batch: the two only meet in the tables ingest answers from.

What is sent is the whole current set (every tag of every PLC assigned to the collector, enabled or not),
never a delta: ingest marks the collector's tags absent from the set as removed (they leave
GetLatestValues; their history stays). So a sync is idempotent, a lost one is repaired by the next, and a
restart simply sends the set once more (ingest then changes nothing).

:class:`TagSync` runs one task: after each applied configuration (:meth:`TagSync.update`, called by the
config watcher) it builds the set once the changes have settled (a burst of changes, a script updating
many PLCs, costs one pass over the tags and one call) and sends it unless ingest has it already; if
ingest is away it retries with the runtime's RetryPolicy until it gets through, each attempt with the
newest set. A set ingest refuses (INVALID_ARGUMENT) is logged and not resent until it changes. Every
`resync_interval` seconds the set goes again, changed or not: an ingest whose database was restored from
an older backup is repaired without a configuration change (the call costs ingest nothing otherwise).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable

import grpc
from fabrica.config.v1 import plc_pb2
from fabrica.ingest.v1 import ingest_service_pb2 as pb

from ..clients.errors import error_details
from ..clients.ingest import RETRYABLE
from ..clients.tags import sync_tags
from ..runtime.channels import PEER_CHANNEL_OPTIONS
from ..runtime.telemetry import client_interceptors
from ..runtime.retry import SERVICE_RETRY, RetryPolicy

log = logging.getLogger(__name__)

#: Seconds a SyncTags call may take (a collector of 30,000 tags sends ~2 MB).
SYNC_TIMEOUT = 30.0
#: Changes come in bursts: the set is built once they settle (as the config watcher's status report).
SETTLE_DELAY = 0.2
#: Seconds after which the set is sent again even if nothing changed (see above).
RESYNC_INTERVAL = 600.0


def tag_infos(plcs: Iterable[plc_pb2.Plc]) -> list[pb.TagInfo]:
    """Every tag of `plcs` that has an id, ordered by tag id, each id once (the first PLC naming it wins:
    the config service never gives two tags one id)."""
    out: dict[int, pb.TagInfo] = {}
    for plc in plcs:
        for tag in plc.tags:
            if tag.id and tag.id not in out:
                out[tag.id] = pb.TagInfo(tag_id=tag.id, plc_id=plc.id, name=tag.name, unit=tag.unit, role=tag.role)
    return [out[i] for i in sorted(out)]


class TagSync:
    def __init__(self, target: str, collector_id: str, *, retry: RetryPolicy = SERVICE_RETRY,
                 resync_interval: float = RESYNC_INTERVAL):
        self.target = target
        self.collector_id = collector_id
        self.retry = retry
        self.resync_interval = resync_interval
        #: The PLCs of the applied configuration (None: none applied yet), read when the set is built.
        self._plcs: Iterable[plc_pb2.Plc] | None = None
        #: The last set ingest took.
        self.synced: list[pb.TagInfo] | None = None
        self._refused: list[pb.TagInfo] | None = None
        #: Sets ingest took (one per applied configuration that changed the set, plus one per start).
        self.syncs = 0
        #: Ingest's answer to the last sync it took: how many tags it changed and marked removed.
        self.last_reply: pb.SyncTagsResponse | None = None
        #: Failed attempts, and the last failure ("" after a success).
        self.failures = 0
        self.last_error = ""
        self._wake = asyncio.Event()
        self._channel: grpc.aio.Channel | None = None
        self._task: asyncio.Task[None] | None = None

    def update(self, plcs: Iterable[plc_pb2.Plc]) -> None:
        """The applied configuration changed (or was loaded): send its tags unless ingest has them already.
        `plcs` is read later, once the changes settle (a live view such as the supervisor's definitions
        is what the caller passes)."""
        self._plcs = plcs
        self._wake.set()

    def start(self) -> None:
        self._channel = grpc.aio.insecure_channel(self.target, options=PEER_CHANNEL_OPTIONS, interceptors=client_interceptors())
        self._task = asyncio.create_task(self._run(self._channel), name="tag-sync")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._channel is not None:
            await self._channel.close(grace=None)
            self._channel = None

    async def _run(self, channel: grpc.aio.Channel) -> None:
        backoff = self.retry.backoff()
        while True:
            try:
                async with asyncio.timeout(self.resync_interval):
                    await self._wake.wait()
            except TimeoutError:
                self.synced = self._refused = None  # send it again
            await asyncio.sleep(SETTLE_DELAY)
            self._wake.clear()
            if self._plcs is None:
                continue
            infos = tag_infos(self._plcs)
            if infos == self.synced or infos == self._refused:
                continue
            try:
                reply = await sync_tags(channel, self.collector_id, infos, timeout=SYNC_TIMEOUT)
            except grpc.aio.AioRpcError as exc:
                self.failures += 1
                self.last_error = str(error_details(exc))
                if exc.code() not in RETRYABLE:  # resending the same set cannot help: wait for a new one
                    log.error("ingest refused the tag set: %s", self.last_error[:500],
                              extra={"collector_id": self.collector_id, "tags": len(infos)})
                    self._refused = infos
                    continue
                delay = backoff.next_delay()
                log.log(logging.INFO if backoff.failures == 1 else logging.DEBUG,
                        "tag sync failed (%s); retrying in %.1f s", self.last_error[:500], delay)
                with contextlib.suppress(TimeoutError):  # a newer set cuts the wait short
                    async with asyncio.timeout(delay):
                        await self._wake.wait()
                self._wake.set()
                continue
            except Exception as exc:  # a bug: never let it end the task
                log.exception("tag sync failed")
                self.failures += 1
                self.last_error = f"{type(exc).__name__}: {exc}"
                await asyncio.sleep(backoff.next_delay())
                self._wake.set()
                continue
            backoff.reset()
            self.synced = infos
            self.last_reply = reply
            self.syncs += 1
            self.last_error = ""
            log.info("tag set synced with ingest", extra={"collector_id": self.collector_id, "tags": len(infos),
                                                          "changed": reply.changed, "removed": reply.removed})
