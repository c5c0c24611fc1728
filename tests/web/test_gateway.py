"""The gRPC-Web gateway keeps deploy/envoy/envoy.yaml's promises, derived from that file, so the two cannot
drift apart silently: the same routes (every method to the same upstream, the same methods refused), the
same deadlines (unary calls bounded by the route timeout and the client's grpc-timeout, streams unbounded),
the same CORS policy (origins, methods, request headers, exposed headers, max age).

Each promise is checked twice: against the gateway's route table, and by real calls through the real
gateway to the real services (config, ingest, production, a collector; Postgres) on loopback.
"""

from __future__ import annotations

import asyncio
import re
import time
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml
from fabrica.config.v1 import config_service_pb2 as config_pb
from fabrica.production.v1 import production_service_pb2 as prod_pb
from google.rpc import error_details_pb2

from fabrica_svc.grpcweb import cors
from fabrica_svc.grpcweb.routes import Kind, Route, load_routes

from .conftest import WebStack
from .grpcweb_client import Reply, call

ENVOY = Path(__file__).resolve().parents[2] / "deploy" / "envoy" / "envoy.yaml"
UNIMPLEMENTED, UNKNOWN, INTERNAL, UNAVAILABLE, INVALID_ARGUMENT, DEADLINE_EXCEEDED = 12, 2, 13, 14, 3, 4


# --- envoy.yaml, read ------------------------------------------------------------------------------------


@cache
def _virtual_host() -> dict[str, Any]:
    config = yaml.safe_load(ENVOY.read_text())
    (listener,) = config["static_resources"]["listeners"]
    (chain,) = listener["filter_chains"]
    (hcm,) = [f for f in chain["filters"] if f["name"] == "envoy.filters.network.http_connection_manager"]
    (host,) = [h for h in hcm["typed_config"]["route_config"]["virtual_hosts"] if "*" in h["domains"]]
    return host


def _envoy_routes() -> list[dict[str, Any]]:
    return _virtual_host()["routes"]


def _envoy_route(path: str) -> dict[str, Any] | None:
    """The route Envoy picks for `path`: the first that matches (envoy.yaml matches on paths alone)."""
    for route in _envoy_routes():
        match = route["match"]
        assert match.keys() <= {"path", "prefix"}, f"this test reads path and prefix matches only: {match}"
        if match.get("path") == path or ("prefix" in match and path.startswith(match["prefix"])):
            return route
    return None


def _seconds(value: str) -> float:
    found = re.fullmatch(r"(\d+(?:\.\d+)?)s", value)
    assert found, value
    return float(found.group(1))


def _envoy_cors() -> dict[str, Any]:
    return _virtual_host()["typed_per_filter_config"]["envoy.filters.http.cors"]


def _envoy_origins() -> list[str]:
    origins = []
    for matcher in _envoy_cors()["allow_origin_string_match"]:
        assert set(matcher) == {"exact"}, f"the gateway takes exact origins only: {matcher}"
        origins.append(matcher["exact"])
    return origins


def _split(value: str) -> list[str]:
    return [v.strip() for v in value.split(",")]


ROUTES = load_routes()


# --- the route table against envoy.yaml ------------------------------------------------------------------


@pytest.mark.parametrize("route", list(ROUTES.values()), ids=lambda r: r.path)
def test_each_method_is_routed_as_envoy_routes_it(route: Route) -> None:
    envoy = _envoy_route(route.path)
    if route.refused:
        assert envoy is None or "direct_response" in envoy, f"Envoy forwards {route.path}, the gateway refuses it"
        return
    assert envoy is not None and "route" in envoy, f"the gateway forwards {route.path}, Envoy has no route"
    action = envoy["route"]
    assert action["cluster"] == route.upstream
    timeout = _seconds(action.get("timeout", "15s"))
    if route.max_timeout is None:
        assert timeout == 0, f"{route.path}: the gateway leaves streams unbounded, Envoy bounds it at {timeout}s"
        assert "max_stream_duration" not in action
    else:
        assert timeout == route.max_timeout, f"{route.path}: Envoy {timeout}s, the gateway {route.max_timeout}s"
        cap = _seconds(action["max_stream_duration"]["grpc_timeout_header_max"])
        assert cap == route.max_timeout, f"{route.path}: Envoy caps grpc-timeout at {cap}s"


def test_every_envoy_route_serves_methods_the_gateway_knows() -> None:
    """No route in envoy.yaml for a method the protos do not have (a renamed method, a removed service)."""
    for envoy in _envoy_routes():
        match = envoy["match"]
        covered = [r for r in ROUTES.values()
                   if match.get("path") == r.path or r.path.startswith(match.get("prefix", "\0"))]
        assert covered, f"envoy.yaml routes {match}, which names no method of the protos"
        if "direct_response" in envoy:
            assert all(r.refused for r in covered), f"Envoy refuses {match}, the gateway forwards it"


def test_the_gateway_cors_policy_is_envoys() -> None:
    policy = _envoy_cors()
    assert _split(policy["allow_methods"]) == _split(cors.ALLOW_METHODS)
    assert _split(policy["allow_headers"]) == _split(cors.ALLOW_HEADERS)
    assert _split(policy["expose_headers"]) == _split(cors.EXPOSE_HEADERS)
    assert str(policy["max_age"]) == cors.MAX_AGE


# --- real calls through the gateway -----------------------------------------------------------------------


async def _call(stack: WebStack, path: str, request: Any = b"", **kwargs: Any) -> Reply:
    return await asyncio.to_thread(call, stack.url, path, request, **kwargs)


async def test_every_routed_method_reaches_its_service_and_refused_ones_are_unimplemented(
        web_stack: WebStack) -> None:
    """Every method, called with an empty request: a forwarded one is answered by its service (a status of the
    service's own: OK, or the validator's INVALID_ARGUMENT, NOT_FOUND, ...), a refused one UNIMPLEMENTED with
    the reason; never the transport's UNAVAILABLE or an UNKNOWN."""
    for route in ROUTES.values():
        kwargs: dict[str, Any] = {}
        if route.kind is Kind.SERVER_STREAM:
            kwargs = {"headers": {"grpc-timeout": "2S"}, "max_messages": 1}
        reply = await _call(web_stack, route.path, b"", **kwargs)
        assert reply.http_status == 200, (route.path, reply.http_status, reply.body)
        if route.refused:
            assert reply.status == UNIMPLEMENTED, (route.path, reply.status, reply.message)
            assert route.method in reply.message and "gRPC-Web" in reply.message
            continue
        if route.kind is Kind.SERVER_STREAM and reply.messages:
            continue  # the stream answered; it stays open (reading stopped after one message)
        assert reply.status is not None, route.path
        assert reply.status not in (UNIMPLEMENTED, UNAVAILABLE, UNKNOWN, INTERNAL), \
            (route.path, reply.status, reply.message)


async def test_a_path_no_route_names_is_404_as_at_envoy(web_stack: WebStack) -> None:
    reply = await _call(web_stack, "/fabrica.config.v1.ConfigService/NoSuchMethod", b"")
    assert reply.http_status == 404  # what Envoy answers for no route; a gRPC-Web client reads UNIMPLEMENTED


async def test_the_service_error_details_reach_the_browser_unchanged(web_stack: WebStack) -> None:
    """grpc-status-details-bin is the service's google.rpc.Status, byte for byte: what the service itself
    sends over gRPC."""
    request = config_pb.GetPlcRequest(id="not valid!")
    reply = await _call(web_stack, "/fabrica.config.v1.ConfigService/GetPlc", request)
    assert reply.status == INVALID_ARGUMENT
    status = reply.status_details()
    assert status is not None and status.code == INVALID_ARGUMENT
    bad = error_details_pb2.BadRequest()
    assert any(d.Unpack(bad) for d in status.details if d.Is(bad.DESCRIPTOR))
    assert [v.field for v in bad.field_violations] == ["id"]

    stub = web_stack.servers["config"].stub
    with pytest.raises(Exception) as direct:
        await stub.GetPlc(request)
    trailing = dict(direct.value.trailing_metadata())  # type: ignore[attr-defined]
    assert reply.details_bin == trailing["grpc-status-details-bin"]


async def test_a_stream_carries_messages_and_the_clients_deadline_ends_it(web_stack: WebStack) -> None:
    """WatchOrders: the first message (the current orders) arrives; the client's grpc-timeout is the stream's
    deadline (Envoy's stream routes have none of their own)."""
    started = time.monotonic()
    reply = await _call(web_stack, "/fabrica.production.v1.ProductionService/WatchOrders",
                        prod_pb.WatchOrdersRequest(), headers={"grpc-timeout": "1500m"})
    elapsed = time.monotonic() - started
    assert reply.messages, "no first message"
    prod_pb.WatchOrdersResponse.FromString(reply.messages[0])
    assert reply.status == DEADLINE_EXCEEDED, (reply.status, reply.message)
    assert elapsed >= 1.4, "the stream ended before the client's deadline"


@pytest.mark.parametrize("origin", _envoy_origins())
async def test_an_allowed_origin_gets_envoys_cors_answers(web_stack: WebStack, origin: str) -> None:
    path = "/fabrica.config.v1.ConfigService/ListDeviceProfiles"
    policy = _envoy_cors()
    preflight = await _call(web_stack, path, None, method="OPTIONS", content_type="", headers={
        "origin": origin, "access-control-request-method": "POST",
        "access-control-request-headers": "content-type,x-grpc-web,x-user-agent,grpc-timeout,authorization,"
                                          "x-fabrica-tenant"})
    assert preflight.http_status in (200, 204)
    # An installation-wide admin names the tenant per call from the browser (issue 15).
    assert "x-fabrica-tenant" in _split(preflight.headers["access-control-allow-headers"])
    assert preflight.headers["access-control-allow-origin"] == origin
    assert _split(preflight.headers["access-control-allow-methods"]) == _split(policy["allow_methods"])
    assert _split(preflight.headers["access-control-allow-headers"]) == _split(policy["allow_headers"])
    assert preflight.headers["access-control-max-age"] == str(policy["max_age"])

    reply = await _call(web_stack, path, config_pb.ListDeviceProfilesRequest(), headers={"origin": origin})
    assert reply.status == 0 and reply.messages
    assert reply.headers["access-control-allow-origin"] == origin
    assert _split(reply.headers["access-control-expose-headers"]) == _split(policy["expose_headers"])


async def test_another_origin_gets_no_cors_answer(web_stack: WebStack) -> None:
    path = "/fabrica.config.v1.ConfigService/ListDeviceProfiles"
    origin = "https://evil.example.org"
    assert origin not in _envoy_origins()
    preflight = await _call(web_stack, path, None, method="OPTIONS", content_type="", headers={
        "origin": origin, "access-control-request-method": "POST"})
    assert "access-control-allow-origin" not in preflight.headers
    assert preflight.http_status >= 400
    reply = await _call(web_stack, path, config_pb.ListDeviceProfilesRequest(), headers={"origin": origin})
    assert "access-control-allow-origin" not in reply.headers
