"""The gateway in front of services that verify tokens: it forwards each caller's `authorization` and never
lends a call a token of its own, even when its environment names one."""

from __future__ import annotations

import asyncio

import grpc
from fabrica.config.v1 import config_service_pb2 as config_pb

from fabrica_svc.grpcweb.app import Gateway

from .conftest import WebStack, gateway_settings
from .grpcweb_client import call

PATH = "/fabrica.config.v1.ConfigService/ListDeviceProfiles"


async def test_the_callers_token_is_forwarded_and_the_gateways_own_never_sent(
        authed_web_stack: tuple[WebStack, str]) -> None:
    web_stack, token = authed_web_stack
    request = config_pb.ListDeviceProfilesRequest()
    ok = await asyncio.to_thread(call, web_stack.url, PATH, request, headers={"authorization": f"Bearer {token}"})
    assert ok.status == 0 and ok.messages, (ok.status, ok.message)
    anonymous = await asyncio.to_thread(call, web_stack.url, PATH, request)
    assert anonymous.status == grpc.StatusCode.UNAUTHENTICATED.value[0], (anonymous.status, anonymous.message)

    # A gateway whose settings carry a (valid) token: a call without one is still refused.
    settings = gateway_settings({name: s.address for name, s in web_stack.servers.items()})
    lending = Gateway(settings.with_overrides(base=settings.base.with_overrides(token=token)))
    await lending.start()
    try:
        refused = await asyncio.to_thread(call, lending.url, PATH, request)
        assert refused.status == grpc.StatusCode.UNAUTHENTICATED.value[0], (refused.status, refused.message)
    finally:
        await lending.stop(grace=0.5)
