"""Tokens and roles on real servers (runtime/auth.py, the interceptor's role check).

Generated from the descriptors, so a new RPC cannot be forgotten: every RPC declares a role; without
credentials every RPC but health and reflection is UNAUTHENTICATED (TOKEN_MISSING); with a viewer token every
RPC that needs more than viewer is PERMISSION_DENIED (ROLE_REQUIRED, metadata role=...), and every viewer RPC
is let through (whatever the handler then says about the empty request).
"""

from __future__ import annotations

import http.server
import json
import os
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519
from fabrica.common.v1 import auth_pb2
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from fabrica_svc.runtime import auth
from fabrica_svc.runtime.reflection import descriptor_set_path
from fabrica_svc.runtime.settings import SettingsError
from grpc_helpers import error_info
from in_process import Server, Servers, settings_for
from procs import free_port
from tls_support import Pki

SERVICES = {
    "config": "fabrica.config.v1.ConfigService",
    "ingest": "fabrica.ingest.v1.IngestService",
    "production": "fabrica.production.v1.ProductionService",
    "collector": "fabrica.collector.v1.CollectorService",
}


def _fabrica_methods() -> list[tuple[str, descriptor_pb2.MethodDescriptorProto, str]]:
    """(service full name, method, input type) of every RPC in every Fabrica proto file (the descriptor set
    gen/ holds, so a new service file is walked too)."""
    files = descriptor_pb2.FileDescriptorSet.FromString(descriptor_set_path().read_bytes())
    out = []
    for f in files.file:
        for service in f.service:
            for method in service.method:
                out.append((f"{f.package}.{service.name}", method, method.input_type.lstrip(".")))
    return out


METHODS = _fabrica_methods()


def test_every_rpc_declares_a_role() -> None:
    assert len(METHODS) > 60  # all four services are walked
    missing = [f"{svc}/{m.name}" for svc, m, _ in METHODS
               if m.options.Extensions[auth_pb2.required_role] == auth_pb2.ROLE_UNSPECIFIED]
    assert missing == []
    assert {svc for svc, _, _ in METHODS} >= set(SERVICES.values())


def test_roles_as_declared() -> None:
    assert auth.required_role("/fabrica.config.v1.ConfigService/CreatePlc") == "engineer"
    assert auth.required_role("/fabrica.config.v1.ConfigService/WatchPlcs") == "collector"
    assert auth.required_role("/fabrica.ingest.v1.IngestService/StreamReadings") == "collector"
    assert auth.required_role("/fabrica.ingest.v1.IngestService/ResetCollectorSequence") == "admin"
    assert auth.required_role("/fabrica.production.v1.ProductionService/StartOrder") == "operator"
    assert auth.required_role("/fabrica.production.v1.ProductionService/CreateItem") == "engineer"
    assert auth.required_role("/fabrica.production.v1.ProductionService/ListOrders") == "viewer"
    assert auth.required_role("/fabrica.collector.v1.CollectorService/ProbePlc") == "engineer"
    assert auth.required_role("/nope.Service/Method") is None
    assert auth.is_open("/grpc.health.v1.Health/Check")
    assert not auth.is_open("/fabrica.config.v1.ConfigService/GetPlc")


# --- servers with authentication on -------------------------------------------------------------------


@pytest.fixture
def key(tmp_path: Path) -> auth.LocalKey:
    return auth.ensure_local_key(tmp_path / "data")


def token(key: auth.LocalKey, *roles: str, ttl: float = 600, user: str = "ana", **kw: Any) -> str:
    return auth.mint_token(key, subject=user, roles=roles, ttl_seconds=ttl, **kw)


@pytest.fixture
async def stack(database_url: str, servers: Servers, key: auth.LocalKey,
                tmp_path: Path) -> dict[str, Server]:
    """All four services, authentication on (not insecure: TLS, and the local public key verifies), on one
    database. The test channels talk TLS to the gRPC ports, which ask for no client certificate: only tokens
    tell who is calling there."""
    pki = Pki(tmp_path / "pki")

    def env(name: str) -> dict[str, str]:
        return {**pki.env(name), "FABRICA_JWT_PUBLIC_KEY_FILE": str(key.public_key_file), "FABRICA_INSECURE": "0"}

    unreachable = f"127.0.0.1:{free_port()}"
    out = {}
    for name in ("config", "ingest", "production"):
        out[name] = await servers.start(name, settings_for(name, env(name), database_url=database_url))
    out["collector"] = await servers.start("collector", settings_for(
        "collector", env("collector"), collector_id="auth-test", data_dir=tmp_path / "collector",
        config_addr=unreachable, ingest_addr=unreachable))
    return out


def _call(channel: grpc.aio.Channel, service: str, method: descriptor_pb2.MethodDescriptorProto,
          metadata: tuple[tuple[str, str], ...], timeout: float) -> Any:
    request_type = message_factory.GetMessageClass(
        descriptor_pool.Default().FindMessageTypeByName(method.input_type.lstrip(".")))
    path = f"/{service}/{method.name}"
    kw = {"request_serializer": request_type.SerializeToString, "response_deserializer": lambda b: b}
    if method.client_streaming and method.server_streaming:
        return channel.stream_stream(path, **kw)(iter([request_type()]), metadata=metadata, timeout=timeout)
    if method.client_streaming:
        return channel.stream_unary(path, **kw)(iter([request_type()]), metadata=metadata, timeout=timeout)
    if method.server_streaming:
        return channel.unary_stream(path, **kw)(request_type(), metadata=metadata, timeout=timeout)
    return channel.unary_unary(path, **kw)(request_type(), metadata=metadata, timeout=timeout)


async def _each_rpc(stack: dict[str, Server], metadata: tuple[tuple[str, str], ...], timeout: float = 5.0
                    ) -> AsyncIterator[tuple[str, str, grpc.aio.AioRpcError | None, grpc.StatusCode]]:
    for name, server in stack.items():
        service = SERVICES[name]
        for svc, method, _ in METHODS:
            if svc != service:
                continue
            call = _call(server.channel, service, method, metadata, timeout)
            error: grpc.aio.AioRpcError | None = None
            try:
                if method.server_streaming:
                    async for _ in call:
                        break
                    call.cancel()
                else:
                    await call
                code = grpc.StatusCode.OK
            except grpc.aio.AioRpcError as exc:
                error, code = exc, exc.code()
            yield method.name, auth.required_role(f"/{service}/{method.name}") or "", error, code


async def test_without_credentials_every_rpc_is_unauthenticated(stack: dict[str, Server]) -> None:
    seen = 0
    async for name, _, error, code in _each_rpc(stack, ()):
        assert code == grpc.StatusCode.UNAUTHENTICATED, name
        assert error is not None and error_info(error).reason == "TOKEN_MISSING", name
        seen += 1
    assert seen == len([m for s, m, _ in METHODS if s in SERVICES.values()])


async def test_health_and_reflection_stay_open(stack: dict[str, Server]) -> None:
    for server in stack.values():
        reply = await health_pb2_grpc.HealthStub(server.channel).Check(health_pb2.HealthCheckRequest())
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        stub = reflection_pb2_grpc.ServerReflectionStub(server.channel)
        async for answer in stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])):
            names = {s.name for s in answer.list_services_response.service}
            assert SERVICES[server.app.name] in names
            break


async def test_with_a_viewer_token_every_write_is_permission_denied(stack: dict[str, Server],
                                                                    key: auth.LocalKey) -> None:
    bearer = (("authorization", f"Bearer {token(key, 'viewer')}"),)
    denied = allowed = 0
    async for name, role, error, code in _each_rpc(stack, bearer, timeout=2.0):
        if role == "viewer":
            assert code not in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED), name
            allowed += 1
        else:
            assert code == grpc.StatusCode.PERMISSION_DENIED, name
            assert error is not None
            info = error_info(error)
            assert (info.reason, info.metadata["role"]) == ("ROLE_REQUIRED", role), name
            denied += 1
    assert denied > 30 and allowed > 20


async def test_roles_grant_what_they_declare(stack: dict[str, Server], key: auth.LocalKey) -> None:
    from fabrica.config.v1 import config_service_pb2 as cpb
    from fabrica.config.v1 import config_service_pb2_grpc as cgrpc

    config = cgrpc.ConfigServiceStub(stack["config"].channel)
    from fabrica.config.v1 import plc_pb2
    from google.protobuf import duration_pb2

    plc = plc_pb2.Plc(id="press-1", collector_id="c1", enabled=True,
                      modbus_tcp=plc_pb2.ModbusTcpConnection(host="127.0.0.1", unit_id=1),
                      poll_groups=[plc_pb2.PollGroup(name="default", poll_interval=duration_pb2.Duration(seconds=1))])
    for bearer in (token(key, "operator"), token(key, "collector", collector_id="c1")):
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await config.CreatePlc(cpb.CreatePlcRequest(plc=plc), metadata=(("authorization", f"Bearer {bearer}"),))
        assert exc.value.code() == grpc.StatusCode.PERMISSION_DENIED
    # Engineer (and admin, which includes it) may; a collector's token reads nothing.
    made = await config.CreatePlc(cpb.CreatePlcRequest(plc=plc),
                                  metadata=(("authorization", f"Bearer {token(key, 'engineer')}"),))
    assert made.plc.id == "press-1"
    got = await config.GetPlc(cpb.GetPlcRequest(id="press-1"),
                              metadata=(("authorization", f"Bearer {token(key, 'admin')}"),))
    assert got.plc.id == "press-1"
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await config.ListPlcs(cpb.ListPlcsRequest(),
                              metadata=(("authorization", f"Bearer {token(key, 'collector', collector_id='c1')}"),))
    assert exc.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_bad_tokens_are_unauthenticated_with_their_reason(stack: dict[str, Server], key: auth.LocalKey,
                                                                tmp_path: Path) -> None:
    from fabrica.config.v1 import config_service_pb2 as cpb
    from fabrica.config.v1 import config_service_pb2_grpc as cgrpc

    config = cgrpc.ConfigServiceStub(stack["config"].channel)
    other = auth.ensure_local_key(tmp_path / "other")  # a key the service does not trust
    cases = {
        "TOKEN_EXPIRED": token(key, "viewer", ttl=-3600),
        "TOKEN_INVALID": token(other, "viewer"),
    }
    cases_plain = {"TOKEN_INVALID": "Basic dXNlcjpwdw=="}
    wrong_aud = token(key, "viewer", audience="someone-else")
    # Signed with a key of another kind (RSA, where the service's key is Ed25519): refused, not INTERNAL.
    from cryptography.hazmat.primitives.asymmetric import rsa
    rsa_signed = jwt.encode({"sub": "mallory", "roles": ["admin"], "iss": "fabrica", "aud": "fabrica", "exp": 2**40},
                            rsa.generate_private_key(public_exponent=65537, key_size=2048), algorithm="RS256")
    for reason, bad in [*cases.items(), ("TOKEN_INVALID", wrong_aud), ("TOKEN_INVALID", "not.a.jwt"),
                        ("TOKEN_INVALID", rsa_signed)]:
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await config.ListPlcs(cpb.ListPlcsRequest(), metadata=(("authorization", f"Bearer {bad}"),))
        assert exc.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert error_info(exc.value).reason == reason
        assert bad not in exc.value.details()  # the token is never echoed
    for reason, header in cases_plain.items():
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await config.ListPlcs(cpb.ListPlcsRequest(), metadata=(("authorization", header),))
        assert error_info(exc.value).reason == reason


# --- verifiers and settings ------------------------------------------------------------------------------


class _JwksHandler(http.server.BaseHTTPRequestHandler):
    body = b""
    hits = 0

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        type(self).hits += 1
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def jwks_server(key: auth.LocalKey) -> Iterator[str]:
    """A real HTTP server on loopback serving the local key's JWKS, as an OIDC provider would."""
    handler = type("Handler", (_JwksHandler,), {"body": key.jwks_file.read_bytes(), "hits": 0})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/.well-known/jwks.json"
        assert handler.hits == 1  # fetched once, then cached
    finally:
        httpd.shutdown()
        httpd.server_close()


async def test_jwks_url_and_file_verify_tokens(key: auth.LocalKey, jwks_server: str) -> None:
    for env in ({"FABRICA_JWKS_URL": jwks_server}, {"FABRICA_JWKS_FILE": str(key.jwks_file)}):
        verifier = auth.verifier_for(settings_for("config", env))
        assert verifier is not None
        for _ in range(3):
            p = await verifier.verify(token(key, "operator", user="ana"))
            assert (p.subject, p.roles, p.via) == ("user:ana", frozenset({"operator"}), "token")
        p = await verifier.verify(token(key, "collector", collector_id="demo"))
        assert (p.subject, p.collector_id) == ("collector:demo", "demo")
        nameless = jwt.encode({"sub": "c", "roles": ["collector"], "iss": "fabrica", "aud": "fabrica", "exp": 2**40},
                              key.private_key(), algorithm="EdDSA", headers={"kid": key.key_id})
        with pytest.raises(auth.Unauthenticated, match="collector_id"):  # a collector's token names its collector
            await verifier.verify(nameless)
        forged = jwt.encode({"sub": "ana", "roles": ["admin"], "iss": "fabrica", "aud": "fabrica", "exp": 2**40},
                            ed25519.Ed25519PrivateKey.generate(), algorithm="EdDSA", headers={"kid": key.key_id})
        with pytest.raises(auth.Unauthenticated) as err:
            await verifier.verify(forged)
        assert err.value.reason == "TOKEN_INVALID"


async def test_an_unreachable_jwks_is_unavailable_not_unauthenticated(key: auth.LocalKey) -> None:
    verifier = auth.verifier_for(settings_for("config", {"FABRICA_JWKS_URL": f"http://127.0.0.1:{free_port()}/jwks"}))
    assert verifier is not None
    with pytest.raises(auth.Unavailable):
        await verifier.verify(token(key, "viewer"))


def test_settings_name_what_is_missing(tmp_path: Path) -> None:
    tls_only = {k: v for k, v in Pki(tmp_path / "pki").env("config").items() if k.startswith("FABRICA_TLS_")}
    with pytest.raises(SettingsError, match="FABRICA_JWT_PUBLIC_KEY_FILE is not set"):
        auth.authenticator_for(settings_for("config", {**tls_only, "FABRICA_INSECURE": "0"}))
    assert auth.authenticator_for(settings_for("config")) is None  # insecure and no verifier: off
    with pytest.raises(SettingsError, match="FABRICA_JWT_PUBLIC_KEY_FILE=.*cannot read"):
        auth.authenticator_for(settings_for("config", {"FABRICA_JWT_PUBLIC_KEY_FILE": str(tmp_path / "none.pem")}))
    (tmp_path / "junk.pem").write_text("junk")
    with pytest.raises(SettingsError, match="FABRICA_JWT_PUBLIC_KEY_FILE=.*not a PEM public key"):
        auth.authenticator_for(settings_for("config", {"FABRICA_JWT_PUBLIC_KEY_FILE": str(tmp_path / "junk.pem")}))
    (tmp_path / "bad.json").write_text(json.dumps({"keys": "no"}))
    with pytest.raises(SettingsError, match="FABRICA_JWKS_FILE="):
        auth.authenticator_for(settings_for("config", {"FABRICA_JWKS_FILE": str(tmp_path / "bad.json")}))
    with pytest.raises(SettingsError, match="FABRICA_INSECURE="):
        settings_for("config", {"FABRICA_INSECURE": "maybe"})


def test_the_local_key_is_made_once_and_kept(tmp_path: Path) -> None:
    first = auth.ensure_local_key(tmp_path)
    assert (first.private_key_file.stat().st_mode & 0o777) == 0o600
    again = auth.ensure_local_key(tmp_path)
    assert again == first and again.private_key_file.read_bytes() == first.private_key_file.read_bytes()


# --- the audit trail ---------------------------------------------------------------------------------------


_OPENED: list[grpc.aio.Channel] = []


@pytest.fixture(autouse=True)
async def _close_channels() -> AsyncIterator[None]:
    """Closes the channels `_as` and `peer_channel_with` opened in a test."""
    yield
    while _OPENED:
        await _OPENED.pop().close()


def _as(key: auth.LocalKey, server: Server, role: str, user: str) -> grpc.aio.Channel:
    """A channel to `server` that sends `user`'s token (with `role`) on every call: runtime/channels.py's
    peer_channel, as the services' own channels do."""
    return peer_channel_with(server, token(key, role, user=user))


async def test_audit_entries_name_the_user_of_a_plc_edit_an_order_start_and_a_booking(
        stack: dict[str, Server], key: auth.LocalKey) -> None:
    from fabrica.common.v1 import audit_pb2
    from fabrica.config.v1 import config_service_pb2 as cpb
    from fabrica.config.v1 import config_service_pb2_grpc as cgrpc
    from fabrica.config.v1 import plc_pb2
    from fabrica.production.v1 import master_data_pb2 as md
    from fabrica.production.v1 import order_pb2
    from fabrica.production.v1 import production_service_pb2 as ppb
    from fabrica.production.v1 import production_service_pb2_grpc as pgrpc
    from google.protobuf import duration_pb2

    eng = _as(key, stack["config"], "engineer", "erin")
    config = cgrpc.ConfigServiceStub(eng)
    plc = plc_pb2.Plc(id="press-9", collector_id="c1", enabled=True,
                      modbus_tcp=plc_pb2.ModbusTcpConnection(host="127.0.0.1", unit_id=1),
                      poll_groups=[plc_pb2.PollGroup(name="default", poll_interval=duration_pb2.Duration(seconds=1))])
    made = (await config.CreatePlc(cpb.CreatePlcRequest(plc=plc), metadata=(("x-request-id", "req-create-1"),))).plc
    await config.UpdatePlc(cpb.UpdatePlcRequest(plc=plc_pb2.Plc(id="press-9", display_name="Press 9", etag=made.etag),
                                                update_mask={"paths": ["display_name"]}),
                           metadata=(("x-request-id", "req-update-1"),))
    # A refused edit (stale etag) leaves no entry: the entry is written in the change's transaction.
    with pytest.raises(grpc.aio.AioRpcError) as stale:
        await config.UpdatePlc(cpb.UpdatePlcRequest(plc=plc_pb2.Plc(id="press-9", display_name="X", etag=made.etag),
                                                    update_mask={"paths": ["display_name"]}))
    assert stale.value.code() == grpc.StatusCode.ABORTED

    viewer = cgrpc.ConfigServiceStub(_as(key, stack["config"], "viewer", "vic"))
    listed = await viewer.ListAuditEntries(cpb.ListAuditEntriesRequest(
        filter=audit_pb2.AuditFilter(resource="plcs/press-9")))
    got = [(e.actor, e.via, e.action, e.resource, e.request_id) for e in listed.entries]
    assert got == [("user:erin", "token", "UpdatePlc", "plcs/press-9", "req-update-1"),
                   ("user:erin", "token", "CreatePlc", "plcs/press-9", "req-create-1")]
    assert "display_name" in listed.entries[0].details
    assert listed.entries[0].time.seconds > 0

    # Production: an engineer sets up master data, an operator starts an order and books by hand.
    engineer = pgrpc.ProductionServiceStub(_as(key, stack["production"], "engineer", "erin"))
    await engineer.CreateSector(ppb.CreateSectorRequest(sector=md.Sector(id="pressing", display_name="Pressing")))
    await engineer.CreateWorkCenter(ppb.CreateWorkCenterRequest(work_center=md.WorkCenter(
        id="wc-1", display_name="Press 1", sector_id="pressing")))
    await engineer.CreateItem(ppb.CreateItemRequest(item=md.Item(
        id="BRK-100", display_name="Bracket", ideal_cycle_time=duration_pb2.Duration(seconds=2))))
    operator = pgrpc.ProductionServiceStub(_as(key, stack["production"], "operator", "ana"))
    order = (await operator.CreateOrder(ppb.CreateOrderRequest(order=order_pb2.Order(
        number="PO-1", item_id="BRK-100", work_center_id="wc-1", planned_quantity=100)))).order
    await operator.StartOrder(ppb.StartOrderRequest(id=order.id), metadata=(("x-request-id", "start-po-1"),))
    booked = (await operator.CreateBooking(ppb.CreateBookingRequest(booking=order_pb2.Booking(
        order_id=order.id, good_quantity=7, scrap_quantity=1)))).booking
    with pytest.raises(grpc.aio.AioRpcError):  # already running: refused, and not audited
        await operator.StartOrder(ppb.StartOrderRequest(id=order.id))

    reader = pgrpc.ProductionServiceStub(_as(key, stack["production"], "viewer", "vic"))
    ana = (await reader.ListAuditEntries(ppb.ListAuditEntriesRequest(
        filter=audit_pb2.AuditFilter(actor="user:ana")))).entries
    assert [(e.action, e.resource) for e in ana] == [
        ("CreateBooking", f"orders/{order.id}/bookings/{booked.id}"),
        ("StartOrder", f"orders/{order.id}"),
        ("CreateOrder", f"orders/{order.id}"),
    ]
    assert ana[1].request_id == "start-po-1" and "PLANNED -> IN_PROGRESS" in ana[1].details
    assert "good +7, scrap +1" in ana[0].details
    assert all(e.request_id for e in ana)  # made up where the caller sent none

    # Filters and paging: everything under orders/, one entry a page, newest first, nothing twice.
    seen, page_token = [], ""
    while True:
        page = await reader.ListAuditEntries(ppb.ListAuditEntriesRequest(
            filter=audit_pb2.AuditFilter(resource="orders/"), page_size=1, page_token=page_token))
        seen += [e.id for e in page.entries]
        page_token = page.next_page_token
        if not page_token:
            break
    assert seen == [e.id for e in ana]
    erin = (await reader.ListAuditEntries(ppb.ListAuditEntriesRequest(
        filter=audit_pb2.AuditFilter(actor="user:erin", action="CreateSector")))).entries
    assert [(e.resource, e.details) for e in erin] == [("sectors/pressing", "sector created")]
    with pytest.raises(grpc.aio.AioRpcError) as bad:
        await reader.ListAuditEntries(ppb.ListAuditEntriesRequest(page_token="nonsense"))
    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    # A stop entered by hand and ended by hand (EndDowntime): both name the operator; a refused end (it has
    # ended already) leaves no entry.
    from datetime import UTC, datetime, timedelta

    from google.protobuf import timestamp_pb2

    began = timestamp_pb2.Timestamp()
    began.FromDatetime(datetime.now(UTC) - timedelta(minutes=5))
    stop = (await operator.CreateDowntime(ppb.CreateDowntimeRequest(downtime=order_pb2.Downtime(
        work_center_id="wc-1", start_time=began, note="coil change")))).downtime
    await operator.EndDowntime(ppb.EndDowntimeRequest(id=stop.id), metadata=(("x-request-id", "end-stop-1"),))
    with pytest.raises(grpc.aio.AioRpcError) as again:
        await operator.EndDowntime(ppb.EndDowntimeRequest(id=stop.id))
    assert again.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    stops = (await reader.ListAuditEntries(ppb.ListAuditEntriesRequest(
        filter=audit_pb2.AuditFilter(resource=f"downtimes/{stop.id}")))).entries
    assert [(e.actor, e.action, e.request_id) for e in stops][:1] == [("user:ana", "EndDowntime", "end-stop-1")]
    assert [(e.actor, e.action) for e in stops] == [("user:ana", "EndDowntime"), ("user:ana", "CreateDowntime")]
    assert "ended at" in stops[0].details


async def test_peer_channels_send_their_token_in_every_call_shape(stack: dict[str, Server], key: auth.LocalKey,
                                                                  tmp_path: Path) -> None:
    """peer_channel (what the collector and production use) adds the token to unary, server-streaming and
    bidi calls; FABRICA_TOKEN_FILE is read again when it changes (a rotated token, no restart)."""
    from fabrica.config.v1 import config_service_pb2 as cpb
    from fabrica.config.v1 import config_service_pb2_grpc as cgrpc
    from fabrica.ingest.v1 import ingest_service_pb2 as ipb
    from fabrica.ingest.v1 import ingest_service_pb2_grpc as igrpc

    from fabrica_svc.runtime.channels import check_peer_token, peer_channel

    token_file = tmp_path / "token"
    token_file.write_text(token(key, "collector", user="c1", collector_id="c1") + "\n")
    settings = stack["config"].settings.with_overrides(token_file=token_file)
    async with peer_channel(stack["config"].address, settings) as channel:
        watch = cgrpc.ConfigServiceStub(channel).WatchPlcs(cpb.WatchPlcsRequest(collector_id="c1"), timeout=10)
        async for first in watch:  # server streaming: admitted, a snapshot arrives
            assert first.HasField("snapshot") or first.ListFields()
            break
        watch.cancel()
    async with peer_channel(stack["ingest"].address, settings) as channel:
        stream = igrpc.IngestServiceStub(channel).StreamReadings(
            iter([ipb.StreamReadingsRequest(open=ipb.StreamOpen(collector_id="c1"))]), timeout=10)
        async for reply in stream:  # bidi: admitted, the resume point arrives
            assert reply.HasField("resume")
            break
        stream.cancel()
        # The file is rotated to a viewer's token: the same channel now sends that one.
        token_file.write_text(token(key, "viewer", user="v"))
        os.utime(token_file, (1, 1))
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await igrpc.IngestServiceStub(channel).SyncTags(ipb.SyncTagsRequest(collector_id="c1"))
        assert exc.value.code() == grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(SettingsError, match="FABRICA_TOKEN_FILE="):
        check_peer_token(settings.with_overrides(token_file=tmp_path / "missing"))


async def test_reflection_can_be_turned_off(database_url: str, servers: Servers) -> None:
    server = await servers.start("config", settings_for("config", {"FABRICA_REFLECTION": "0"},
                                                        database_url=database_url))
    stub = reflection_pb2_grpc.ServerReflectionStub(server.channel)
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        async for _ in stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])):
            pass
    assert exc.value.code() == grpc.StatusCode.UNIMPLEMENTED
    reply = await health_pb2_grpc.HealthStub(server.channel).Check(health_pb2.HealthCheckRequest())
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_a_service_without_a_verifier_stops_naming_the_setting(tmp_path: Path) -> None:
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[2]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FABRICA_", "DATABASE_URL"))}
    # TLS is configured (a service that is not in development mode needs it too); only the verifier is missing.
    env.update({k: v for k, v in Pki(tmp_path / "pki").env("config").items() if k.startswith("FABRICA_TLS_")})
    env.update(PYTHONPATH=f"{repo / 'gen'}:{repo / 'services'}", FABRICA_INSECURE="0",
               FABRICA_DATA_DIR=str(tmp_path), FABRICA_METRICS_PORT="-1")
    done = subprocess.run([sys.executable, "-m", "fabrica_svc.cli", "serve", "config", "--port", "0"],
                          env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    assert "FABRICA_JWT_PUBLIC_KEY_FILE is not set" in done.stderr
    assert not (tmp_path / "postgres").exists()  # it stopped before starting anything


def test_the_banner_dsn_hides_the_password() -> None:
    from fabrica_svc.stack import shown_dsn

    assert shown_dsn("postgresql://fab:s3cret@db.example:5432/fabrica") == "postgresql://fab:***@db.example:5432/fabrica"
    assert shown_dsn("postgresql://postgres@/postgres?host=/tmp/x") == "postgresql://postgres@/postgres?host=/tmp/x"


async def test_ingest_audits_tag_syncs_and_sequence_resets(stack: dict[str, Server], key: auth.LocalKey) -> None:
    from fabrica.common.v1 import audit_pb2
    from fabrica.ingest.v1 import ingest_service_pb2 as ipb
    from fabrica.ingest.v1 import ingest_service_pb2_grpc as igrpc

    collector = peer_channel_with(stack["ingest"], token(key, "collector", user="c1", collector_id="c1"))
    stub = igrpc.IngestServiceStub(collector)
    stream = stub.StreamReadings(iter([ipb.StreamReadingsRequest(open=ipb.StreamOpen(collector_id="c1", epoch=1))]))
    async for reply in stream:  # the stream's open makes the collector's sequence row
        assert reply.HasField("resume")
        break
    stream.cancel()
    tags = [ipb.TagInfo(tag_id=7, plc_id="press-1", name="temperature", unit="°C")]
    await stub.SyncTags(ipb.SyncTagsRequest(collector_id="c1", tags=tags))
    await stub.SyncTags(ipb.SyncTagsRequest(collector_id="c1", tags=tags))  # the same again: no change, no entry
    admin = igrpc.IngestServiceStub(peer_channel_with(stack["ingest"], token(key, "admin", user="root")))
    await admin.ResetCollectorSequence(ipb.ResetCollectorSequenceRequest(collector_id="c1", committed_sequence=0),
                                       metadata=(("x-request-id", "reset-c1"),))
    entries = (await admin.ListAuditEntries(ipb.ListAuditEntriesRequest(
        filter=audit_pb2.AuditFilter(resource="collectors/")))).entries
    assert [(e.actor, e.action, e.resource) for e in entries] == [
        ("user:root", "ResetCollectorSequence", "collectors/c1"),
        ("collector:c1", "SyncTags", "collectors/c1/tags"),
    ]
    assert entries[0].request_id == "reset-c1"


def peer_channel_with(server: Server, bearer: str) -> grpc.aio.Channel:
    from fabrica_svc.runtime.channels import peer_channel

    channel = peer_channel(server.address, server.settings.with_overrides(token=bearer))
    _OPENED.append(channel)
    return channel


async def test_tokens_are_never_logged_or_shown(stack: dict[str, Server], key: auth.LocalKey,
                                               caplog: pytest.LogCaptureFixture) -> None:
    from fabrica.config.v1 import config_service_pb2 as cpb
    from fabrica.config.v1 import config_service_pb2_grpc as cgrpc

    from fabrica_svc.runtime.channels import _TokenSource

    good, expired = token(key, "viewer"), token(key, "viewer", ttl=-3600)
    caplog.set_level("DEBUG")
    await cgrpc.ConfigServiceStub(peer_channel_with(stack["config"], good)).ListPlcs(cpb.ListPlcsRequest())
    with pytest.raises(grpc.aio.AioRpcError):
        await cgrpc.ConfigServiceStub(peer_channel_with(stack["config"], expired)).ListPlcs(cpb.ListPlcsRequest())
    logged = "\n".join(f"{r.getMessage()} {r.__dict__}" for r in caplog.records)
    assert good not in logged and expired not in logged
    settings = stack["config"].settings.with_overrides(token=good)
    assert good not in repr(settings) and good not in repr(_TokenSource(None, good))
