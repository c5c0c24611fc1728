"""The tenancy core (issue 15): which tenant a token, a certificate and a request header name
(runtime/auth.py, runtime/tls.py, runtime/principal.py), `fabrica token --tenant`, FABRICA_TENANT, and
peer_channel's x-fabrica-tenant header. Table-driven; the header test talks to a real gRPC server."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import grpc
import jwt
import pytest

from fabrica_svc.runtime import auth, tenancy
from fabrica_svc.runtime import principal as principals
from fabrica_svc.runtime.channels import peer_channel
from fabrica_svc.runtime.errors import InvalidArgument, PermissionDenied, Unauthenticated
from fabrica_svc.runtime.principal import Principal, tenant_of_request
from fabrica_svc.runtime.settings import SettingsError, load_settings
from fabrica_svc.runtime.tls import principal_from_uris

REPO = Path(__file__).resolve().parents[2]


# --- tokens ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("claims", "tenant"), [
    ({"sub": "ana", "roles": ["engineer"]}, "default"),  # no claim: the tenant every installation has
    ({"sub": "ana", "roles": ["engineer"], "tenant": "acme"}, "acme"),
    ({"sub": "root", "roles": ["admin"], "tenant": "*"}, "*"),
    ({"sub": "service-alarm", "roles": ["viewer"], "tenant": "*"}, "*"),  # a service's read-only identity
    ({"sub": "c", "roles": ["collector"], "collector_id": "cell-1", "tenant": "globex"}, "globex"),
])
def test_a_token_names_its_tenant(claims: dict, tenant: str) -> None:
    p = auth.principal_from_claims(claims)
    assert p.tenant == tenant
    assert p.installation_wide == (tenant == "*")


@pytest.mark.parametrize(("claims", "message"), [
    ({"sub": "ana", "roles": ["viewer"], "tenant": "Acme"}, "not a tenant code"),
    ({"sub": "ana", "roles": ["viewer"], "tenant": ""}, "not a tenant code"),
    ({"sub": "ana", "roles": ["viewer"], "tenant": 7}, "not a tenant code"),
    ({"sub": "ana", "roles": ["viewer"], "tenant": "acme corp"}, "not a tenant code"),
    ({"sub": "ana", "roles": ["viewer"], "tenant": "a" * 64}, "not a tenant code"),
    # "*" only for an admin (or a viewer-only service identity), never for a collector (even an admin one).
    ({"sub": "ana", "roles": ["engineer"], "tenant": "*"}, "only an admin"),
    ({"sub": "c", "roles": ["admin", "collector"], "collector_id": "c", "tenant": "*"}, "only an admin"),
])
def test_a_bad_tenant_claim_is_unauthenticated(claims: dict, message: str) -> None:
    with pytest.raises(Unauthenticated, match=message) as err:
        auth.principal_from_claims(claims)
    assert err.value.reason == "TOKEN_INVALID"


def test_mint_token_writes_the_claim_and_refuses_what_a_verifier_would(tmp_path: Path) -> None:
    key = auth.ensure_local_key(tmp_path)
    verifier = auth.TokenVerifier.from_public_key_pem(key.public_key_file.read_bytes(), issuer="fabrica",
                                                      audience="fabrica")
    acme = auth.mint_token(key, subject="ana", roles=["engineer"], ttl_seconds=60, tenant="acme")
    assert verifier.claims(acme)["tenant"] == "acme"
    assert "tenant" not in verifier.claims(auth.mint_token(key, subject="ana", roles=["viewer"], ttl_seconds=60))
    with pytest.raises(ValueError, match="not a tenant code"):
        auth.mint_token(key, subject="ana", roles=["viewer"], ttl_seconds=60, tenant="ACME")
    with pytest.raises(ValueError, match="only an admin"):
        auth.mint_token(key, subject="ana", roles=["operator"], ttl_seconds=60, tenant="*")


# --- certificates ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("uris", "expected"), [
    (["urn:fabrica:collector:cell-1"], ("collector:cell-1", "default")),
    (["urn:fabrica:collector:cell-1", "urn:fabrica:tenant:acme"], ("collector:cell-1", "acme")),
    (["urn:fabrica:tenant:acme", "urn:fabrica:collector:cell-1", "localhost"], ("collector:cell-1", "acme")),
    # A service acts across tenants; a tenant URI does not narrow it.
    (["urn:fabrica:service:production"], ("service:production", "*")),
    # A collector certificate naming no single valid tenant is no identity at all (fails closed).
    (["urn:fabrica:collector:cell-1", "urn:fabrica:tenant:Acme"], None),
    (["urn:fabrica:collector:cell-1", "urn:fabrica:tenant:acme", "urn:fabrica:tenant:globex"], None),
    (["urn:fabrica:tenant:acme"], None),
])
def test_a_certificate_names_its_tenant(uris: list[str], expected: tuple[str, str] | None) -> None:
    p = principal_from_uris(uris)
    assert (p.subject, p.tenant) == expected if expected else p is None


def test_the_ca_writes_the_tenant_uri_a_collector_certificate_is_read_with() -> None:
    from cryptography import x509

    from fabrica_svc.runtime.certs import CertificateAuthority

    issued = CertificateAuthority.create("test").issue_collector("cell-1", tenant="acme")
    cert = x509.load_pem_x509_certificate(issued.cert_pem)
    uris = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
        x509.UniformResourceIdentifier)
    assert principal_from_uris(uris).tenant == "acme"


# --- the header -----------------------------------------------------------------------------------------

ANA = Principal("user:ana", frozenset({"engineer"}), tenant="acme")
ROOT = Principal("user:root", frozenset({"admin"}), tenant="*")
SERVICE = Principal("service:production", frozenset({"viewer"}), via="certificate", tenant="*")


@pytest.mark.parametrize(("caller", "header", "tenant"), [
    (ANA, None, "acme"),
    (ANA, "acme", "acme"),  # naming its own tenant is fine
    (ROOT, None, "default"),  # an installation-wide user without the header: the default tenant
    (ROOT, "globex", "globex"),
    (ROOT, "*", "*"),
    (SERVICE, None, "*"),  # a service without the header: across tenants
    (SERVICE, "acme", "acme"),
    (principals.INSECURE, None, "default"),
    (principals.INSECURE, "acme", "acme"),
])
def test_the_tenant_of_a_request(caller: Principal, header: str | None, tenant: str) -> None:
    assert tenant_of_request(caller, header) == tenant


@pytest.mark.parametrize("header", ["globex", "*"])
def test_a_tenant_caller_naming_another_tenant_is_permission_denied(header: str) -> None:
    with pytest.raises(PermissionDenied) as err:
        tenant_of_request(ANA, header)
    assert err.value.reason == "TENANT_MISMATCH"
    assert dict(err.value.metadata) == {"tenant": "acme"}
    assert "globex" not in str(err.value)  # it says nothing about the tenant named


@pytest.mark.parametrize("header", ["", "Acme", "acme corp", "-acme", "a" * 64, "**"])
@pytest.mark.parametrize("caller", [ANA, ROOT])
def test_a_header_that_is_not_a_tenant_code_is_invalid_argument(header: str, caller: Principal) -> None:
    with pytest.raises(InvalidArgument) as err:
        tenant_of_request(caller, header)
    assert [v.field for v in err.value.violations] == [tenancy.HEADER]


def test_the_header_is_read_from_metadata_case_insensitively() -> None:
    assert tenancy.requested([("X-Fabrica-Tenant", b"acme")]) == "acme"
    assert tenancy.requested([("authorization", "Bearer x")]) is None
    assert tenancy.requested(None) is None


# --- the CLI and settings -------------------------------------------------------------------------------


def _fabrica_token(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fabrica_svc.cli", "token", "--data-dir", str(tmp_path), *args],
                          capture_output=True, text=True, timeout=60, cwd=REPO, check=False)


def test_fabrica_token_tenant_prints_a_token_of_that_tenant(tmp_path: Path) -> None:
    done = _fabrica_token(tmp_path, "--tenant", "acme", "--role", "engineer", "--user", "ana")
    assert done.returncode == 0, done.stderr
    token = done.stdout.strip().splitlines()[-1]
    assert jwt.decode(token, options={"verify_signature": False})["tenant"] == "acme"
    assert "of tenant acme" in done.stderr
    wide = _fabrica_token(tmp_path, "--tenant", "*", "--role", "admin", "--user", "root")
    assert wide.returncode == 0, wide.stderr
    assert jwt.decode(wide.stdout.strip().splitlines()[-1], options={"verify_signature": False})["tenant"] == "*"
    assert "every tenant" in wide.stderr


@pytest.mark.parametrize(("args", "message"), [
    (("--tenant", "Acme Corp", "--role", "viewer", "--user", "ana"), "not a tenant code"),
    (("--tenant", "*", "--role", "engineer", "--user", "ana"), "only an admin"),
])
def test_fabrica_token_with_a_bad_tenant_says_why_and_prints_no_token(tmp_path: Path, args: tuple[str, ...],
                                                                       message: str) -> None:
    done = _fabrica_token(tmp_path, *args)
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr.startswith("fabrica token: ") and message in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize(("value", "tenant"), [("", ""), ("acme", "acme"), (" globex ", "globex"), ("*", "*")])
def test_fabrica_tenant_setting(value: str, tenant: str) -> None:
    assert load_settings("collector", {"FABRICA_INSECURE": "1", "FABRICA_TENANT": value}).tenant == tenant


@pytest.mark.parametrize("value", ["Acme", "acme corp", "-x", "a" * 64])
def test_a_bad_fabrica_tenant_names_the_setting(value: str) -> None:
    with pytest.raises(SettingsError, match="FABRICA_TENANT="):
        load_settings("collector", {"FABRICA_INSECURE": "1", "FABRICA_TENANT": value})


# --- peer_channel -----------------------------------------------------------------------------------------


@pytest.fixture
async def echo() -> tuple[str, list[dict[str, str]]]:  # noqa: ANN201 - yields
    """A gRPC server whose unary and server-streaming methods record the metadata of each call."""
    seen: list[dict[str, str]] = []

    async def unary(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        seen.append(dict(context.invocation_metadata()))
        return request

    async def stream(request: bytes, context: grpc.aio.ServicerContext):  # noqa: ANN202
        seen.append(dict(context.invocation_metadata()))
        yield request

    server = grpc.aio.server()
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("test.Echo", {
        "Unary": grpc.unary_unary_rpc_method_handler(unary),
        "Stream": grpc.unary_stream_rpc_method_handler(stream),
    })])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield f"127.0.0.1:{port}", seen
    await server.stop(0)


async def _calls(channel: grpc.aio.Channel) -> None:
    assert await channel.unary_unary("/test.Echo/Unary")(b"x", timeout=10) == b"x"
    assert [m async for m in channel.unary_stream("/test.Echo/Stream")(b"y", timeout=10)] == [b"y"]


async def test_peer_channel_names_the_tenant_it_is_given_or_the_settings_one(echo) -> None:  # noqa: ANN001
    address, seen = echo
    async with peer_channel(address, None, tenant="*") as channel:
        await _calls(channel)
    assert [m.get(tenancy.HEADER) for m in seen] == ["*", "*"]
    seen.clear()
    settings = load_settings("collector", {"FABRICA_INSECURE": "1", "FABRICA_TENANT": "acme"})
    async with peer_channel(address, settings) as channel:
        await _calls(channel)
    assert [m.get(tenancy.HEADER) for m in seen] == ["acme", "acme"]
    seen.clear()
    async with peer_channel(address, settings, tenant="globex") as channel:  # the argument wins
        await _calls(channel)
    assert [m.get(tenancy.HEADER) for m in seen] == ["globex", "globex"]
    seen.clear()
    async with peer_channel(address, load_settings("collector", {"FABRICA_INSECURE": "1"})) as channel:
        await _calls(channel)
    assert [tenancy.HEADER in m for m in seen] == [False, False]  # nobody named one: no header
