"""TLS on every port, mutual TLS on the peer port, and the identity a client certificate proves.

Real servers (config in process over a real Postgres) with certificates of a real CA (runtime/certs.py), and
real clients: one with no certificate, one with a certificate of another CA, a plaintext one."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from fabrica.config.v1 import config_service_pb2 as cpb
from fabrica.config.v1 import config_service_pb2_grpc as cpb_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from fabrica_svc.runtime import principal
from fabrica_svc.runtime.settings import SettingsError, load_settings
from fabrica_svc.runtime.tls import principal_from_uris
from grpc_helpers import error_info
from in_process import Servers, settings_for, start_server
from tls_support import Pki


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki(tmp_path / "pki")


# --- settings ------------------------------------------------------------------------------------------------


def test_tls_is_required_unless_plaintext_is_asked_for() -> None:
    with pytest.raises(SettingsError, match=r"^FABRICA_TLS_CERT is not set: .*FABRICA_INSECURE=1"):
        load_settings("config", {})
    plain = load_settings("config", {"FABRICA_INSECURE": "1"})
    assert plain.tls is None and plain.insecure
    with pytest.raises(SettingsError, match="FABRICA_INSECURE='yes' is not one of 0, 1"):
        load_settings("config", {"FABRICA_INSECURE": "yes"})
    with pytest.raises(SettingsError, match="^FABRICA_PEER_PORT=0 needs FABRICA_TLS_CERT"):
        load_settings("config", {"FABRICA_INSECURE": "1", "FABRICA_PEER_PORT": "0"})


def test_each_tls_file_that_cannot_be_used_is_named(pki: Pki, tmp_path: Path) -> None:
    env = pki.env("config")
    assert load_settings("config", env).tls is not None
    other = pki.env("ingest")
    cases = {
        "FABRICA_TLS_CERT": (str(tmp_path / "missing.pem"), "no such file"),
        "FABRICA_TLS_KEY": (str(tmp_path), "cannot be read"),  # a folder: unreadable as a file, even for root
        "FABRICA_TLS_CA": (env["FABRICA_TLS_KEY"], "not a PEM certificate bundle"),
    }
    for setting, (value, why) in cases.items():
        with pytest.raises(SettingsError) as err:
            load_settings("config", {**env, setting: value})
        assert str(err.value).startswith(f"{setting}={value}: {why}"), err.value
    with pytest.raises(SettingsError, match="^FABRICA_TLS_KEY=.*: is not the key of FABRICA_TLS_CERT"):
        load_settings("config", {**env, "FABRICA_TLS_KEY": other["FABRICA_TLS_KEY"]})
    with pytest.raises(SettingsError, match="^FABRICA_TLS_KEY is not set"):
        load_settings("config", {**env, "FABRICA_TLS_KEY": ""})
    # Certificates but also FABRICA_INSECURE=1: TLS all the same (plaintext is only for no certificates).
    assert load_settings("config", {**env, "FABRICA_INSECURE": "1"}).tls is not None


def test_fabrica_serve_with_a_missing_certificate_stops_with_one_line_naming_the_setting(pki: Pki,
                                                                                         tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FABRICA_")}
    missing = tmp_path / "nope" / "config.pem"
    env.update({**pki.env("config"), "FABRICA_TLS_CERT": str(missing), "FABRICA_METRICS_PORT": "-1"})
    done = subprocess.run([sys.executable, "-m", "fabrica_svc.cli", "serve", "config", "--port", "0"],
                          env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr.splitlines() == [f"fabrica: FABRICA_TLS_CERT={missing}: no such file"]


async def test_plaintext_is_logged_as_a_warning(database_url: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="fabrica_svc.runtime.server")
    host = await start_server("config", settings_for("config", {"FABRICA_INSECURE": "1"}, database_url=database_url))
    try:
        warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert any(m.startswith("plaintext gRPC on the port of config (FABRICA_INSECURE=1") for m in warned), warned
    finally:
        await host.stop(grace=0)


# --- the ports -----------------------------------------------------------------------------------------------


@pytest.fixture
async def config(database_url: str, servers: Servers, pki: Pki):  # noqa: ANN201 - ServiceHost
    host = await start_server("config", settings_for(
        "config", {**pki.env("config"), "FABRICA_PEER_PORT": "0", "FABRICA_HEALTH_PORT": "0"},
        database_url=database_url))
    yield host
    await host.stop(grace=0)


async def _health(channel: grpc.aio.Channel) -> int:
    reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    return reply.status


async def test_the_grpc_port_serves_tls_to_a_client_without_a_certificate(config, pki: Pki) -> None:
    assert config.peer_port and config.peer_port != config.port
    async with pki.channel(config.address, client_cert=False) as channel:
        assert await _health(channel) == health_pb2.HealthCheckResponse.SERVING


async def test_the_test_harness_talks_tls_to_a_tls_server(database_url: str, servers: Servers, pki: Pki) -> None:
    server = await servers.start("config", settings_for("config", pki.env("config"), database_url=database_url))
    assert server.settings.tls is not None and not server.settings.insecure
    assert await _health(server.channel) == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.parametrize("port", ["port", "peer_port"])
async def test_a_plaintext_client_to_a_tls_port_fails(config, port: str) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{getattr(config, port)}") as channel:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await _health(channel)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_the_peer_port_refuses_a_client_without_a_certificate_or_with_one_of_another_ca(
        config, pki: Pki, tmp_path: Path) -> None:
    stranger = Pki(tmp_path / "stranger", "another CA")
    # The other CA's certificate names the same collector: its name proves nothing without our CA's signature.
    forged = grpc.ssl_channel_credentials(pki.ca.cert_pem, stranger.issued(collector="cell-1").key_pem,
                                          stranger.issued(collector="cell-1").cert_pem)
    for credentials in (pki.credentials(client_cert=False), forged):
        async with grpc.aio.secure_channel(config.peer_address, credentials) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await cpb_grpc.ConfigServiceStub(channel).ReportCollectorStatus(
                    cpb.ReportCollectorStatusRequest(collector_id="cell-1"), timeout=10)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    # A server certificate of another CA is refused by our clients too.
    async with grpc.aio.secure_channel(config.peer_address, stranger.credentials(collector="cell-1")) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await _health(channel)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    async with pki.channel(config.peer_address, collector="cell-1") as channel:
        assert await _health(channel) == health_pb2.HealthCheckResponse.SERVING


async def test_the_health_port_answers_health_in_plaintext_and_nothing_else(config) -> None:
    """For kubelet's native gRPC probes, which speak no TLS."""
    assert config.health_port not in (None, config.port, config.peer_port)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{config.health_port}") as channel:
        assert await _health(channel) == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await cpb_grpc.ConfigServiceStub(channel).ListPlcs(cpb.ListPlcsRequest(), timeout=10)
        assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED


# --- who the certificate says -----------------------------------------------------------------------------------


def test_the_uri_san_names_the_principal() -> None:
    demo = principal_from_uris(["urn:fabrica:collector:demo"])
    assert demo == principal.Principal("collector:demo", frozenset({"collector"}), "demo", "certificate")
    # A service's certificate is installation-wide (runtime/tenancy.py): it names the tenant per request.
    assert principal_from_uris(["urn:fabrica:service:production"]) == principal.Principal(
        "service:production", frozenset({"viewer"}), None, "certificate", tenant="*")
    # A collector's certificate names its tenant (default without one); a malformed or second tenant: nobody.
    assert principal_from_uris(["urn:fabrica:collector:c", "urn:fabrica:tenant:acme"]).tenant == "acme"
    assert demo.tenant == "default"
    for uris in (["urn:fabrica:collector:c", "urn:fabrica:tenant:*"], ["urn:fabrica:collector:c", "urn:fabrica:tenant:"],
                 ["urn:fabrica:collector:c", "urn:fabrica:tenant:a", "urn:fabrica:tenant:b"]):
        assert principal_from_uris(uris) is None
    # Both (never issued so): the collector's, the narrower identity.
    assert principal_from_uris(["urn:fabrica:service:x", "urn:fabrica:collector:c"]).collector_id == "c"
    for uris in ([], ["urn:fabrica:collector:"], ["urn:other:collector:demo"], ["https://example.com"]):
        assert principal_from_uris(uris) is None


async def test_a_collector_watches_and_reports_only_as_itself(config, pki: Pki) -> None:
    async with pki.channel(config.peer_address, collector="cell-1") as channel:
        stub = cpb_grpc.ConfigServiceStub(channel)
        own = await stub.ReportCollectorStatus(cpb.ReportCollectorStatusRequest(collector_id="cell-1"))
        assert own.current_revision == 0
        watch = stub.WatchPlcs(cpb.WatchPlcsRequest(collector_id="cell-1"))
        first = await watch.read()
        assert first.HasField("snapshot")
        watch.cancel()
        for call in (stub.ReportCollectorStatus(cpb.ReportCollectorStatusRequest(collector_id="cell-2")),
                     stub.WatchPlcs(cpb.WatchPlcsRequest(collector_id="cell-2")).read()):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await call
            assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
            info = error_info(err.value)
            assert info.reason == "COLLECTOR_IDENTITY_MISMATCH"
            assert dict(info.metadata) == {"collector_id": "cell-2", "caller": "collector:cell-1"}
    # A service's certificate is no collector's.
    async with pki.channel(config.peer_address, "production") as channel:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await cpb_grpc.ConfigServiceStub(channel).ReportCollectorStatus(
                cpb.ReportCollectorStatusRequest(collector_id="cell-1"))
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    # Nothing of the refused calls was recorded: cell-2 never reported.
    async with pki.channel(config.peer_address, "production") as channel:
        listed = await cpb_grpc.ConfigServiceStub(channel).ListCollectors(cpb.ListCollectorsRequest())
    assert [c.id for c in listed.collectors] == ["cell-1"]
