"""One message size limit for every server and channel (runtime/channels.py), and what the contract keeps
inside it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from fabrica.common.v1 import reading_pb2
from fabrica.config.v1 import config_service_pb2 as cpb
from fabrica.config.v1 import config_service_pb2_grpc as cpb_grpc
from fabrica.config.v1 import plc_pb2
from fabrica.ingest.v1 import ingest_service_pb2 as ipb
from fabrica.ingest.v1 import ingest_service_pb2_grpc as ipb_grpc
from fabrica.ingest.v1 import tag_event_pb2

from fabrica_svc.ingest.servicer import EVENTS_PAGE
from fabrica_svc.runtime.channels import MAX_MESSAGE_BYTES, MESSAGE_LIMITS, PEER_CHANNEL_OPTIONS
from fabrica_svc.runtime.server import ServiceHost
from fabrica_svc.runtime.timefmt import MAX_TIMESTAMP_SECONDS

from .test_runtime import ProbeApp, probe_host

Code = grpc.StatusCode
#: Room for the framing around the one big field of a test message.
SLACK = 1024


class BigPlcProbe(cpb_grpc.ConfigServiceServicer):
    """GetPlc answers with a PLC whose display name has as many bytes as the request's id says."""

    async def GetPlc(self, request: cpb.GetPlcRequest, context: grpc.aio.ServicerContext) -> cpb.GetPlcResponse:
        return cpb.GetPlcResponse(plc=plc_pb2.Plc(id="big", display_name="x" * int(request.id)))


class LimitsApp(ProbeApp):
    def __init__(self) -> None:
        super().__init__()
        self.config = BigPlcProbe()  # type: ignore[assignment]


@pytest.fixture
async def host(tmp_path: Path) -> AsyncIterator[ServiceHost]:
    async for started in probe_host(LimitsApp(), tmp_path):
        yield started


def test_peer_channels_take_the_one_limit_for_send_and_receive() -> None:
    options = dict(PEER_CHANNEL_OPTIONS)
    assert dict(MESSAGE_LIMITS) == {"grpc.max_send_message_length": MAX_MESSAGE_BYTES,
                                    "grpc.max_receive_message_length": MAX_MESSAGE_BYTES}
    for key, value in MESSAGE_LIMITS:
        assert options[key] == value


async def test_a_response_just_under_the_limit_reaches_a_peer_channel_and_a_larger_one_is_resource_exhausted(
        host: ServiceHost) -> None:
    async with grpc.aio.insecure_channel(host.address, options=PEER_CHANNEL_OPTIONS) as channel:
        stub = cpb_grpc.ConfigServiceStub(channel)
        size = MAX_MESSAGE_BYTES - SLACK
        got = await stub.GetPlc(cpb.GetPlcRequest(id=str(size)))
        assert len(got.plc.display_name) == size
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.GetPlc(cpb.GetPlcRequest(id=str(MAX_MESSAGE_BYTES + 1)))
        assert caught.value.code() == Code.RESOURCE_EXHAUSTED
    # A channel with gRPC's default 4 MiB receive limit could not take what the server sends: the limit
    # has to be the same on both ends.
    async with grpc.aio.insecure_channel(host.address) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await cpb_grpc.ConfigServiceStub(channel).GetPlc(cpb.GetPlcRequest(id=str(8 * 1024 * 1024)))
        assert caught.value.code() == Code.RESOURCE_EXHAUSTED


def _batch_of(total_bytes: int) -> ipb.StreamReadingsRequest:
    """A valid batch of about `total_bytes`, in string readings of the contract's 64 KiB maximum."""
    request = ipb.StreamReadingsRequest()
    batch = request.batch
    batch.collector_id, batch.sequence = "cell-1", 1
    chunk = 64 * 1024
    value = "v" * chunk
    for i in range(total_bytes // (chunk + 64)):
        r = batch.readings.add(tag_id=i + 1, plc_id="press-1", quality=reading_pb2.QUALITY_GOOD)
        r.read_time.seconds = 1_700_000_000
        r.value.string_value = value
    return request


async def test_a_client_message_just_under_the_limit_reaches_the_server(host: ServiceHost) -> None:
    request = _batch_of(MAX_MESSAGE_BYTES - SLACK)
    assert MAX_MESSAGE_BYTES - 128 * 1024 < request.ByteSize() < MAX_MESSAGE_BYTES
    async with grpc.aio.insecure_channel(host.address, options=PEER_CHANNEL_OPTIONS) as channel:
        call = ipb_grpc.IngestServiceStub(channel).StreamReadings()
        await call.write(request)
        response = await call.read()
        assert response.ack.sequence == 1
        await call.done_writing()
        assert await call.read() == grpc.aio.EOF
    received = host.app.ingest.received  # type: ignore[attr-defined]
    assert len(received) == 1 and received[0].ByteSize() == request.ByteSize()


def test_the_largest_watch_tag_events_message_the_contract_allows_fits_in_the_limit() -> None:
    """WatchTagEvents sends EVENTS_PAGE events a message; each event's value is bounded by the contract
    (64 KiB, reading.proto), so the largest message it can send is bounded too, and must fit."""
    event = tag_event_pb2.TagEvent(cursor=2**63 - 1, tag_id=2**64 - 1, plc_id="p" * 63,
                                   role=reading_pb2.TAG_ROLE_PRODUCTION_COUNTER, quality=reading_pb2.QUALITY_GOOD)
    event.value.string_value = "\U0010ffff" * (65536 // 4)  # 64 KiB of UTF-8, the rule's maximum
    event.read_time.seconds, event.read_time.nanos = MAX_TIMESTAMP_SECONDS, 999_999_999
    largest = ipb.WatchTagEventsResponse(events=[event] * EVENTS_PAGE)
    assert largest.ByteSize() <= MAX_MESSAGE_BYTES
