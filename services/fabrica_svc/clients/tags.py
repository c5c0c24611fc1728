"""``sync_tags``: the client side of ingest's SyncTags, for the collector (and tests).

Example::

    async with grpc.aio.insecure_channel(target, options=PEER_CHANNEL_OPTIONS) as channel:
        reply = await sync_tags(channel, "line-1", [TagInfo(tag_id=7, plc_id="press-1", name="temperature",
                                                            unit="°C")])
"""

from __future__ import annotations

from collections.abc import Iterable

import grpc

from fabrica.ingest.v1 import ingest_service_pb2 as pb
from fabrica.ingest.v1 import ingest_service_pb2_grpc as pb_grpc

TagInfo = pb.TagInfo


async def sync_tags(channel: grpc.aio.Channel, collector_id: str, tags: Iterable[pb.TagInfo], *,
                    timeout: float = 10.0) -> pb.SyncTagsResponse:
    """Make `tags` the tags ingest knows of `collector_id` (every other tag of it is marked removed).
    Idempotent; raises grpc.aio.AioRpcError (INVALID_ARGUMENT for a bad set, UNAVAILABLE and the like
    when ingest is away: the caller retries)."""
    request = pb.SyncTagsRequest(collector_id=collector_id, tags=list(tags))
    return await pb_grpc.IngestServiceStub(channel).SyncTags(request, timeout=timeout)
