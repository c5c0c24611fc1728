"""A suspended tenant (``Tenant.active`` false, set by an installation-wide admin) is locked out of every
service, not just config: its users get PERMISSION_DENIED (reason TENANT_INACTIVE) from config, ingest,
production and alarm, and its collector's stream is refused with nothing of it stored (the collector keeps
its batches). Streams open at the suspension end at their next message: a collector's StreamReadings
before its next batch is stored, a WatchOrders before its next change is sent. Another tenant is not
touched, and the installation-wide admin may still look into it. Once reactivated, all of it works again. Ingest, production and alarm learn the state from config's ListTenants
(runtime/tenants.py): the test makes each directory poll once rather than wait for its interval."""

from __future__ import annotations

from pathlib import Path

import time

import grpc
import pytest
from fabrica.alarm.v1 import alarm_service_pb2 as alarm_pb
from fabrica.config.v1 import config_service_pb2 as config_pb
from fabrica.config.v1 import tenant_pb2
from fabrica.ingest.v1 import ingest_service_pb2 as ingest_pb
from fabrica.production.v1 import order_pb2
from fabrica.production.v1 import production_service_pb2 as prod_pb
from google.protobuf import field_mask_pb2

from grpc_helpers import error_info
from in_process import Servers

from .stack import ACME, TIMEOUT, Caller, TenantStack, next_batch, start_stack

pytestmark = pytest.mark.slow


def reads(stack: TenantStack, caller: Caller) -> dict[str, object]:
    """One read of each service, as `caller`."""
    md_ = caller.metadata
    return {
        "config ListPlcs": stack.stub("config").ListPlcs(config_pb.ListPlcsRequest(), metadata=md_, timeout=TIMEOUT),
        "ingest GetLatestValues": stack.stub("ingest").GetLatestValues(ingest_pb.GetLatestValuesRequest(
            tag_ids=stack.acme.ids.tags), metadata=md_, timeout=TIMEOUT),
        "production ListWorkCenters": stack.stub("production").ListWorkCenters(
            prod_pb.ListWorkCentersRequest(), metadata=md_, timeout=TIMEOUT),
        "alarm ListAlarmRules": stack.stub("alarm").ListAlarmRules(
            alarm_pb.ListAlarmRulesRequest(), metadata=md_, timeout=TIMEOUT),
    }


async def outcomes(stack: TenantStack, caller: Caller) -> dict[str, str]:
    """What each read of `reads` answers: "OK", or the code and reason."""
    out = {}
    for name, call in reads(stack, caller).items():
        try:
            await call
            out[name] = "OK"
        except grpc.aio.AioRpcError as err:
            out[name] = f"{err.code().name} {error_info(err).reason}"
    return out


async def set_active(stack: TenantStack, code: str, active: bool) -> None:
    await stack.stub("config").UpdateTenant(config_pb.UpdateTenantRequest(
        tenant=tenant_pb2.Tenant(code=code, active=active), update_mask=field_mask_pb2.FieldMask(paths=["active"])),
        metadata=stack.installer.metadata, timeout=TIMEOUT)
    for service in ("ingest", "production", "alarm"):  # what each would read at its next poll
        assert await stack.servers[service].app.tenant_directory.poll_once(), service


async def acme_newest(stack: TenantStack) -> int:
    """The newest read time (ns) of acme's readings in ingest, asked by the installation-wide admin in acme."""
    latest = await stack.stub("ingest").GetLatestValues(ingest_pb.GetLatestValuesRequest(
        tag_ids=stack.acme.ids.tags), metadata=Caller(stack.installer.token, ACME).metadata, timeout=TIMEOUT)
    assert len(latest.readings) == len(stack.acme.ids.tags)
    return max(r.read_time.ToNanoseconds() for r in latest.readings)


async def test_a_suspended_tenant_is_refused_by_every_service_and_served_again_once_reactivated(
        database_url: str, servers: Servers, tmp_path: Path) -> None:
    stack = await start_stack(servers, database_url, tmp_path)
    assert stack.setup_problems == []
    every = {name: "OK" for name in reads(stack, stack.acme.admin)}
    refused = {name: "PERMISSION_DENIED TENANT_INACTIVE" for name in every}
    assert await outcomes(stack, stack.acme.admin) == every

    # Streams acme opened before the suspension: its collector's (one batch stored) and a watch of its orders.
    collector = stack.stub("ingest").StreamReadings(metadata=stack.acme.collector.metadata, timeout=TIMEOUT)
    await collector.write(ingest_pb.StreamReadingsRequest(open=ingest_pb.StreamOpen(collector_id="cell-1")))
    stack.acme.sequence = (await collector.read()).resume.committed_sequence
    await collector.write(next_batch(stack.acme, time.time(), 1.5))
    assert (await collector.read()).ack.sequence == stack.acme.sequence
    watch = stack.stub("production").WatchOrders(prod_pb.WatchOrdersRequest(), metadata=stack.acme.admin.metadata,
                                                 timeout=TIMEOUT)
    assert (await watch.read()).snapshot
    before = await acme_newest(stack)

    await set_active(stack, ACME, False)
    assert await outcomes(stack, stack.acme.admin) == refused
    await collector.write(next_batch(stack.acme, time.time(), 2.5))
    with pytest.raises(grpc.aio.AioRpcError) as ended:
        await collector.read()
    assert (ended.value.code(), error_info(ended.value).reason) == (grpc.StatusCode.PERMISSION_DENIED, "TENANT_INACTIVE")
    stack.acme.sequence -= 1  # that batch was not stored: the collector sends it again later
    await stack.stub("production").CreateOrder(prod_pb.CreateOrderRequest(order=order_pb2.Order(
        number="PO-while-suspended", item_id=stack.acme.ids.item, work_center_id=stack.acme.ids.work_center,
        planned_quantity=5)), metadata=Caller(stack.installer.token, ACME).metadata, timeout=TIMEOUT)
    with pytest.raises(grpc.aio.AioRpcError) as ended:
        await watch.read()  # the order change is not sent to acme's watch: the watch ends instead
    assert (ended.value.code(), error_info(ended.value).reason) == (grpc.StatusCode.PERMISSION_DENIED, "TENANT_INACTIVE")
    problem = await stack.stream(stack.acme)
    assert problem is not None and problem.startswith("PERMISSION_DENIED"), problem
    assert await acme_newest(stack) == before  # nothing of the refused stream was stored
    assert await outcomes(stack, stack.globex.admin) == every  # the other tenant is not touched
    assert await outcomes(stack, Caller(stack.installer.token, ACME)) == every  # the installation's admin looks in

    await set_active(stack, ACME, True)
    assert await outcomes(stack, stack.acme.admin) == every
    assert await stack.stream(stack.acme) is None
    assert await acme_newest(stack) > before  # the new stream's readings are stored
