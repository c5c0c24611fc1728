"""The gateway as an HTTP server: the built UI on the same origin as the RPCs, only gRPC-Web on RPC paths, and
its settings (a bad value stops it with one line naming the variable)."""

from __future__ import annotations

import asyncio
import http.client
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from fabrica_svc.grpcweb.app import Gateway, load_gateway_settings
from fabrica_svc.runtime.settings import SettingsError

from .conftest import gateway_settings
from .grpcweb_client import call


def _get(url: str, path: str, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        conn.request(method, path)
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


@pytest.fixture
async def ui_gateway(tmp_path: Path) -> AsyncIterator[Gateway]:
    dist = tmp_path / "dist"
    (dist / "assets").mkdir(parents=True)
    (dist / "index.html").write_text("<!doctype html><title>Fabrica</title>")
    (dist / "assets" / "index-abc123.js").write_text("console.log('ui')")
    (dist / "favicon.svg").write_text("<svg/>")
    (tmp_path / "secret.txt").write_text("outside the UI")
    gw = Gateway(gateway_settings({"config": "127.0.0.1:1"}, web_dist=dist))
    await gw.start()
    try:
        yield gw
    finally:
        await gw.stop(grace=0.5)


async def test_the_ui_is_served_with_its_routes_and_cache_rules(ui_gateway: Gateway) -> None:
    status, headers, body = await asyncio.to_thread(_get, ui_gateway.url, "/")
    assert status == 200 and b"<title>Fabrica</title>" in body
    assert headers["content-type"].startswith("text/html") and headers["cache-control"] == "no-cache"
    status, _, body = await asyncio.to_thread(_get, ui_gateway.url, "/orders")  # a UI route, not a file
    assert status == 200 and b"<title>Fabrica</title>" in body
    status, headers, body = await asyncio.to_thread(_get, ui_gateway.url, "/assets/index-abc123.js")
    assert status == 200 and body == b"console.log('ui')"
    assert headers["content-type"].startswith("text/javascript")
    assert "immutable" in headers["cache-control"]
    status, headers, _ = await asyncio.to_thread(_get, ui_gateway.url, "/favicon.svg")
    assert status == 200 and headers["content-type"].startswith("image/svg+xml")
    status, headers, body = await asyncio.to_thread(_get, ui_gateway.url, "/favicon.svg", "HEAD")
    assert status == 200 and body == b""


async def test_nothing_outside_the_ui_folder_is_served(ui_gateway: Gateway) -> None:
    for path in ("/../secret.txt", "/%2e%2e/secret.txt", "/assets/../../secret.txt", "/missing.js"):
        status, _, body = await asyncio.to_thread(_get, ui_gateway.url, path)
        assert status == 404 and b"outside the UI" not in body, path


async def test_rpc_paths_take_grpc_web_only(ui_gateway: Gateway) -> None:
    path = "/fabrica.config.v1.ConfigService/ListPlcs"
    for content_type in ("application/grpc", "application/proto", "application/json",
                         "application/grpc-web+json", "application/grpc-web-text"):
        reply = await asyncio.to_thread(call, ui_gateway.url, path, b"", content_type=content_type)
        assert reply.http_status == 415, content_type
    status, _, _ = await asyncio.to_thread(_get, ui_gateway.url, path)  # a GET of an RPC is never the UI
    assert status == 415


async def test_without_a_built_ui_the_root_says_how_to_build_it() -> None:
    gw = Gateway(gateway_settings({"config": "127.0.0.1:1"}))
    await gw.start()
    try:
        status, _, body = await asyncio.to_thread(_get, gw.url, "/")
    finally:
        await gw.stop(grace=0.5)
    assert status == 404 and b"npm run build" in body


#: Development mode (plaintext channels to the services), as the in-process services of these tests.
DEV = {"FABRICA_INSECURE": "1"}


def test_settings_from_the_environment(tmp_path: Path) -> None:
    (tmp_path / "index.html").write_text("x")
    settings = load_gateway_settings({
        "FABRICA_INSECURE": "1", "FABRICA_PORT": "9000", "FABRICA_CONFIG_ADDR": "config:1", "FABRICA_PRODUCTION_ADDR": "prod.svc:50053",
        "FABRICA_ALARM_ADDR": "alarm.svc:50055",
        "FABRICA_GRPC_WEB_CORS_ORIGINS": "https://ui.example.com, http://localhost:5173/",
        "FABRICA_WEB_DIST": str(tmp_path)})
    assert settings.base.port == 9000
    assert settings.upstreams == {"config": "config:1", "ingest": "127.0.0.1:50052",
                                  "production": "prod.svc:50053", "collector": "127.0.0.1:50054",
                                  "alarm": "alarm.svc:50055"}
    assert settings.cors_origins == ("https://ui.example.com", "http://localhost:5173")
    assert settings.web_dist == tmp_path
    assert load_gateway_settings({**DEV, "FABRICA_WEB_DIST": "-"}).web_dist is None
    assert load_gateway_settings(DEV).base.port == 8080


def test_without_development_mode_the_gateway_needs_tls_files() -> None:
    """Its channels to the services are TLS (runtime/channels.peer_channel) unless FABRICA_INSECURE=1."""
    with pytest.raises(SettingsError, match="FABRICA_TLS_CERT"):
        load_gateway_settings({})


@pytest.mark.parametrize(("variable", "value"), [
    ("FABRICA_GRPC_WEB_CORS_ORIGINS", "*"),
    ("FABRICA_GRPC_WEB_CORS_ORIGINS", "https://ui.example.com/app"),
    ("FABRICA_COLLECTOR_ADDR", "no-port"),
    ("FABRICA_WEB_DIST", "/nonexistent/dist"),
    ("FABRICA_PORT", "http"),
    ("FABRICA_GRPC_WEB_MAX_MESSAGE", "-1"),
])
def test_a_bad_setting_is_refused_naming_the_variable(variable: str, value: str) -> None:
    with pytest.raises(SettingsError, match=variable):
        load_gateway_settings({**DEV, variable: value})


async def test_a_taken_port_is_one_clear_error() -> None:
    first = Gateway(gateway_settings({}))
    await first.start()
    try:
        second = Gateway(gateway_settings({}, base=first.settings.base.with_overrides(port=first.port)))
        with pytest.raises(OSError, match="gRPC-Web gateway cannot listen"):
            await second.start()
    finally:
        await first.stop(grace=0.5)
