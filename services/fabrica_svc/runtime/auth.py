"""Bearer tokens: who the caller of an RPC is, and whether its role allows the method.

A token is a JWT (claims in runtime/principal.py) verified with PyJWT against one of: a PEM public key
(FABRICA_JWT_PUBLIC_KEY_FILE, what `fabrica run` uses with its local key), a JWKS served by an OIDC
provider (FABRICA_JWKS_URL, fetched in a worker thread and cached) or a JWKS in a file
(FABRICA_JWKS_FILE). ``iss`` and ``aud`` must be FABRICA_JWT_ISSUER / FABRICA_JWT_AUDIENCE, ``exp`` must
be in the future.

:func:`authenticator_for` builds the :class:`Authenticator` of a service from its settings; the server's one
interceptor (runtime/interceptors.py) calls its :meth:`Authenticator.identify` for every RPC but health and
reflection, then checks the role the method declares in the protos (``(fabrica.common.v1.required_role)``,
:func:`required_role`). Authentication is on whenever a verifier is configured; without one a service
starts only with FABRICA_INSECURE=1, and then everyone is the development principal
:data:`principal.INSECURE`.

The embedded default keeps an Ed25519 signing key in ``<data dir>/auth/`` (:func:`ensure_local_key`) and mints
tokens with :func:`mint_token` (`fabrica token`, and `fabrica run` for its own services).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from fabrica.common.v1 import auth_pb2
from google.protobuf import descriptor_pool

from . import principal as principals
from . import tenancy
from .errors import PermissionDenied, Unauthenticated, Unavailable
from .principal import Principal
from .settings import Settings, SettingsError

log = logging.getLogger(__name__)

#: Signature algorithms accepted in tokens (never ``none``, never HMAC: the key is public).
ALGORITHMS = ["EdDSA", "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512"]

#: Services every caller may use without credentials: health (Kubernetes probes) and reflection (grpcurl).
OPEN_SERVICES = frozenset({
    "grpc.health.v1.Health",
    "grpc.reflection.v1alpha.ServerReflection",
    "grpc.reflection.v1.ServerReflection",
})

#: The role name (runtime/principal.py) of each proto Role value.
ROLE_OF_ENUM: dict[int, str] = {
    auth_pb2.ROLE_VIEWER: principals.VIEWER,
    auth_pb2.ROLE_OPERATOR: principals.OPERATOR,
    auth_pb2.ROLE_ENGINEER: principals.ENGINEER,
    auth_pb2.ROLE_ADMIN: principals.ADMIN,
    auth_pb2.ROLE_COLLECTOR: principals.COLLECTOR,
}

#: Clock skew tolerated on ``exp`` (and ``nbf``/``iat``), in seconds.
LEEWAY_SECONDS = 30
#: Verified tokens kept (a signature check costs about 0.2 ms; a collector or a UI sends the same token
#: with every call): at most this many, each for at most CACHE_SECONDS and never past its expiry, so a
#: key taken out of a JWKS stops being accepted within that time.
CACHE_SIZE = 1024
CACHE_SECONDS = 60.0


def is_open(method_path: str) -> bool:
    """True for a method of health or reflection (``/grpc.health.v1.Health/Check``)."""
    return method_path.lstrip("/").split("/", 1)[0] in OPEN_SERVICES


_ROLE_CACHE: dict[str, str | None] = {}


def required_role(method_path: str, pool: descriptor_pool.DescriptorPool | None = None) -> str | None:
    """The role (``viewer``, ... ``collector``) the method at `method_path` (``/pkg.Service/Method``) declares
    with ``(fabrica.common.v1.required_role)``; None when it declares none or is not a known method."""
    cached = _ROLE_CACHE.get(method_path)
    if cached is not None or method_path in _ROLE_CACHE:
        return cached
    service, _, method = method_path.lstrip("/").partition("/")
    try:
        descriptor = (pool or descriptor_pool.Default()).FindMethodByName(f"{service}.{method}")
    except KeyError:
        role = None
    else:
        role = ROLE_OF_ENUM.get(descriptor.GetOptions().Extensions[auth_pb2.required_role])
    _ROLE_CACHE[method_path] = role
    return role


def authorize(method_path: str, caller: Principal) -> None:
    """Refuse (PERMISSION_DENIED, reason ROLE_REQUIRED, metadata ``role``) unless `caller` has the role the
    method declares; a method without a declared role is refused to everyone authenticated."""
    role = required_role(method_path)
    if role is None:
        raise PermissionDenied(f"{method_path} declares no required role; nobody may call it",
                               reason="ROLE_REQUIRED", metadata={"role": "", "method": method_path})
    if not caller.has_role(role):
        raise PermissionDenied(
            f"{caller.subject} may not call {method_path}: it needs the {role} role",
            reason="ROLE_REQUIRED", metadata={"role": role, "method": method_path, "caller": caller.subject})


# --- verification -------------------------------------------------------------------------------------


def _unauthenticated(message: str, reason: str) -> Unauthenticated:
    return Unauthenticated(message, reason=reason)


class TokenVerifier:
    """Verifies JWTs against a fixed key set (a PEM key or a JWKS file) or a JWKS URL."""

    def __init__(self, *, issuer: str, audience: str, keys: dict[str | None, Any] | None = None,
                 jwks_client: jwt.PyJWKClient | None = None, source: str = ""):
        self.issuer, self.audience = issuer, audience
        self._keys = keys or {}
        self._jwks_client = jwks_client
        self.source = source
        #: token -> (principal, monotonic time until which it may be reused without verifying again)
        self._verified: dict[str, tuple[Principal, float]] = {}

    @classmethod
    def from_public_key_pem(cls, pem: bytes, *, issuer: str, audience: str, source: str = "") -> TokenVerifier:
        key = serialization.load_pem_public_key(pem)
        return cls(issuer=issuer, audience=audience, keys={None: key}, source=source)

    @classmethod
    def from_jwks(cls, jwks: str, *, issuer: str, audience: str, source: str = "") -> TokenVerifier:
        keys: dict[str | None, Any] = {k.key_id: k for k in jwt.PyJWKSet.from_json(jwks).keys}
        return cls(issuer=issuer, audience=audience, keys=keys, source=source)

    @classmethod
    def from_jwks_url(cls, url: str, *, issuer: str, audience: str) -> TokenVerifier:
        client = jwt.PyJWKClient(url, cache_jwk_set=True, lifespan=300, timeout=10)
        return cls(issuer=issuer, audience=audience, jwks_client=client, source=url)

    def _key_for(self, token: str) -> Any:
        if self._jwks_client is not None:
            try:
                return self._jwks_client.get_signing_key_from_jwt(token)
            except jwt.PyJWKClientConnectionError as exc:
                raise Unavailable(f"cannot fetch the JWKS to verify the token: {exc}",
                                  reason="JWKS_UNAVAILABLE") from None
            except (jwt.PyJWKClientError, jwt.DecodeError) as exc:
                raise _unauthenticated(f"the token's signing key is not known: {exc}", "TOKEN_INVALID") from None
        try:
            kid = jwt.get_unverified_header(token).get("kid")
        except jwt.DecodeError as exc:
            raise _unauthenticated(f"the bearer token is not a JWT: {exc}", "TOKEN_INVALID") from None
        if None in self._keys and len(self._keys) == 1:
            return self._keys[None]
        key = self._keys.get(kid)
        if key is None:
            raise _unauthenticated("the token's signing key (kid) is not in the configured key set", "TOKEN_INVALID")
        return key

    def claims(self, token: str) -> dict[str, Any]:
        """The verified claims of `token`; UNAUTHENTICATED (TOKEN_EXPIRED or TOKEN_INVALID) otherwise. Blocks
        (a JWKS fetch) only with a JWKS URL: :meth:`verify` runs that in a thread."""
        key = self._key_for(token)
        try:
            return jwt.decode(token, key, algorithms=_algorithms_for(key), audience=self.audience,
                              issuer=self.issuer, leeway=LEEWAY_SECONDS,
                              options={"require": ["exp", "sub", "iss", "aud"]})
        except jwt.ExpiredSignatureError:
            raise _unauthenticated("the bearer token has expired", "TOKEN_EXPIRED") from None
        except jwt.InvalidTokenError as exc:
            raise _unauthenticated(f"the bearer token is not valid: {exc}", "TOKEN_INVALID") from None
        except (jwt.PyJWTError, TypeError, ValueError) as exc:  # e.g. a signature of a kind the key cannot check
            raise _unauthenticated(f"the bearer token is not valid: {type(exc).__name__}", "TOKEN_INVALID") from None

    async def verify(self, token: str) -> Principal:
        """The principal `token` names; UNAUTHENTICATED unless it verifies (see :meth:`claims`)."""
        now = time.monotonic()
        cached = self._verified.get(token)
        if cached is not None and now < cached[1]:
            return cached[0]
        claims = (await asyncio.to_thread(self.claims, token) if self._jwks_client is not None
                  else self.claims(token))
        found = principal_from_claims(claims)
        remaining = float(claims["exp"]) - time.time()  # exp is required: claims() checked it is there
        if len(self._verified) >= CACHE_SIZE:
            self._verified.clear()
        self._verified[token] = (found, now + max(0.0, min(CACHE_SECONDS, remaining)))
        return found


def _algorithms_for(key: Any) -> list[str]:
    """The signature algorithms a key can check: a token must use one of them (no algorithm confusion)."""
    if isinstance(key, jwt.PyJWK):
        return [key.algorithm_name] if key.algorithm_name in ALGORITHMS else ALGORITHMS
    if isinstance(key, (ed25519.Ed25519PublicKey, ed448.Ed448PublicKey)):
        return ["EdDSA"]
    if isinstance(key, rsa.RSAPublicKey):
        return [a for a in ALGORITHMS if a[:2] in ("RS", "PS")]
    if isinstance(key, ec.EllipticCurvePublicKey):
        return [a for a in ALGORITHMS if a.startswith("ES")]
    return ALGORITHMS


def _may_be_installation_wide(roles: frozenset[str], collector_id: str | None) -> bool:
    """An installation-wide token (tenant ``*``) is an admin's, or a read-only service identity's (exactly the
    viewer role: production and alarm read every tenant's events with one); never a collector's."""
    return not collector_id and (principals.ADMIN in roles or roles == {principals.VIEWER})


def principal_from_claims(claims: dict[str, Any]) -> Principal:
    """The principal a verified token names: ``collector:<collector_id>`` for a collector's token, else
    ``user:<sub>``; roles not known to Fabrica are ignored."""
    sub = claims.get("sub")
    raw_roles = claims.get("roles", [])
    if isinstance(raw_roles, str):
        raw_roles = raw_roles.split()
    if not isinstance(sub, str) or not sub or not isinstance(raw_roles, list):
        raise _unauthenticated("the bearer token has no usable sub or roles claim", "TOKEN_INVALID")
    roles = frozenset(r for r in raw_roles if isinstance(r, str) and r in principals.ROLES)
    collector_id = claims.get("collector_id")
    if collector_id is not None and (not isinstance(collector_id, str) or not collector_id):
        raise _unauthenticated("the bearer token's collector_id claim is not a collector id", "TOKEN_INVALID")
    if principals.COLLECTOR in roles and not collector_id:
        raise _unauthenticated("a token with the collector role must name its collector (collector_id claim)",
                               "TOKEN_INVALID")
    tenant = claims.get("tenant", tenancy.DEFAULT)
    if not isinstance(tenant, str) or not (tenant == tenancy.ALL or tenancy.is_code(tenant)):
        raise _unauthenticated("the bearer token's tenant claim is not a tenant code or *", "TOKEN_INVALID")
    if tenant == tenancy.ALL and not _may_be_installation_wide(roles, collector_id):
        raise _unauthenticated("only an admin's token (or a viewer-only one, a service's) may be installation-wide "
                               "(tenant *)", "TOKEN_INVALID")
    if collector_id:
        return Principal(subject=f"collector:{collector_id}", roles=roles, collector_id=collector_id, via="token",
                         tenant=tenant)
    return Principal(subject=f"user:{sub}", roles=roles, via="token", tenant=tenant)


def bearer_token(metadata: Iterable[tuple[str, Any]]) -> str | None:
    """The token of the ``authorization: Bearer <token>`` metadata, "" for an authorization header that is
    not a bearer token, None without one."""
    for key, value in metadata:
        if key.lower() == "authorization":
            text = value.decode() if isinstance(value, bytes) else str(value)
            scheme, _, token = text.strip().partition(" ")
            return token.strip() if scheme.lower() == "bearer" else ""
    return None


#: What proves a caller besides a token, e.g. runtime/tls.py's principal_from_peer (a client certificate).
PeerIdentifier = Callable[[grpc.aio.ServicerContext], Principal | None]


class Authenticator:
    """Who the caller of an RPC is: a bearer token first, then `peer_identifier` (a client certificate)."""

    def __init__(self, verifier: TokenVerifier | None, peer_identifier: PeerIdentifier | None = None):
        self.verifier = verifier
        self.peer_identifier = peer_identifier

    async def identify(self, context: grpc.aio.ServicerContext) -> Principal:
        """The caller's principal; UNAUTHENTICATED (TOKEN_MISSING, TOKEN_INVALID, TOKEN_EXPIRED) if none."""
        token = bearer_token(context.invocation_metadata() or ())
        if token is not None:
            if not token:
                raise _unauthenticated("the authorization metadata must be 'Bearer <token>'", "TOKEN_INVALID")
            if self.verifier is None:
                raise _unauthenticated("this service verifies no bearer tokens", "TOKEN_INVALID")
            return await self.verifier.verify(token)
        if self.peer_identifier is not None:
            found = self.peer_identifier(context)
            if found is not None:
                return found
        raise _unauthenticated("this call needs 'authorization: Bearer <token>' metadata (`fabrica token` mints "
                               "one) or a client certificate", "TOKEN_MISSING")


def _read(path: Path, variable: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise SettingsError(f"{variable}={path}: cannot read it: {exc.strerror or exc}") from None


def verifier_for(settings: Settings) -> TokenVerifier | None:
    """The token verifier the settings configure, or None. SettingsError (naming the variable) for a key or
    JWKS file that is missing, unreadable or not a key."""
    iss, aud = settings.jwt_issuer, settings.jwt_audience
    if settings.jwt_public_key_file is not None:
        path = settings.jwt_public_key_file
        try:
            return TokenVerifier.from_public_key_pem(_read(path, "FABRICA_JWT_PUBLIC_KEY_FILE"), issuer=iss,
                                                     audience=aud, source=str(path))
        except (ValueError, TypeError) as exc:
            raise SettingsError(f"FABRICA_JWT_PUBLIC_KEY_FILE={path} is not a PEM public key: {exc}") from None
    if settings.jwks_file is not None:
        path = settings.jwks_file
        try:
            return TokenVerifier.from_jwks(_read(path, "FABRICA_JWKS_FILE").decode(), issuer=iss, audience=aud,
                                           source=str(path))
        except (ValueError, jwt.PyJWKError, jwt.PyJWKSetError) as exc:
            raise SettingsError(f"FABRICA_JWKS_FILE={path} is not a JWKS: {exc}") from None
    if settings.jwks_url:
        if not settings.jwks_url.startswith(("https://", "http://")):
            raise SettingsError(f"FABRICA_JWKS_URL={settings.jwks_url!r} is not an http(s) URL")
        return TokenVerifier.from_jwks_url(settings.jwks_url, issuer=iss, audience=aud)
    return None


def authenticator_for(settings: Settings, peer_identifier: PeerIdentifier | None = None) -> Authenticator | None:
    """The authenticator of a service, or None when authentication is off (FABRICA_INSECURE=1 and no
    verifier). Without a verifier and without FABRICA_INSECURE=1: SettingsError naming the setting."""
    verifier = verifier_for(settings)
    if verifier is None and not settings.insecure:
        raise SettingsError("FABRICA_JWT_PUBLIC_KEY_FILE is not set: a service needs a token verifier "
                            "(FABRICA_JWT_PUBLIC_KEY_FILE, FABRICA_JWKS_URL or FABRICA_JWKS_FILE), or "
                            "FABRICA_INSECURE=1 for development without authentication")
    if verifier is None:
        log.warning("authentication is OFF (FABRICA_INSECURE=1 and no token verifier): anyone can call anything",
                    extra={"service": settings.service})
        return None
    log.info("bearer tokens verified", extra={"service": settings.service, "keys": verifier.source,
                                              "issuer": verifier.issuer, "audience": verifier.audience})
    return Authenticator(verifier, peer_identifier)


# --- the local signing key and tokens (the embedded default) -----------------------------------------


@dataclass(frozen=True)
class LocalKey:
    """The signing key `fabrica run` keeps in ``<data dir>/auth/``: the private key (0600), its public key
    (what every service verifies with) and the same as a JWKS (for Envoy's jwt_authn)."""

    private_key_file: Path
    public_key_file: Path
    jwks_file: Path
    key_id: str

    def private_key(self) -> ed25519.Ed25519PrivateKey:
        key = serialization.load_pem_private_key(self.private_key_file.read_bytes(), password=None)
        if not isinstance(key, ed25519.Ed25519PrivateKey):
            raise SettingsError(f"{self.private_key_file} is not an Ed25519 private key")
        return key


def local_key_paths(data_dir: Path) -> LocalKey:
    folder = data_dir / "auth"
    private = folder / "signing_key.pem"
    kid = ""
    jwks = folder / "jwks.json"
    try:
        kid = json.loads(jwks.read_text())["keys"][0].get("kid", "")
    except (OSError, ValueError, LookupError, TypeError):
        pass
    return LocalKey(private, folder / "public_key.pem", jwks, kid)


def ensure_local_key(data_dir: Path) -> LocalKey:
    """The local signing key of `data_dir`, created at first use (an Ed25519 key), reused afterwards."""
    found = local_key_paths(data_dir)
    if found.private_key_file.exists() and found.public_key_file.exists() and found.key_id:
        return found
    folder = found.private_key_file.parent
    folder.mkdir(parents=True, exist_ok=True)
    os.chmod(folder, 0o700)
    if found.private_key_file.exists():
        key = found.private_key()
    else:
        key = ed25519.Ed25519PrivateKey.generate()
        pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
        scratch = folder / f".signing_key.{os.getpid()}"
        fd = os.open(scratch, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(pem)
        os.replace(scratch, found.private_key_file)
    public = key.public_key()
    found.public_key_file.write_bytes(public.public_bytes(serialization.Encoding.PEM,
                                                          serialization.PublicFormat.SubjectPublicKeyInfo))
    jwk = json.loads(jwt.algorithms.OKPAlgorithm.to_jwk(public))
    kid = uuid.uuid5(uuid.NAMESPACE_URL, jwk["x"]).hex[:16]
    found.jwks_file.write_text(json.dumps({"keys": [{**jwk, "kid": kid, "alg": "EdDSA", "use": "sig"}]}, indent=2))
    return local_key_paths(data_dir)


def mint_token(key: LocalKey, *, subject: str, roles: Iterable[str], ttl_seconds: float,
               issuer: str = "fabrica", audience: str = "fabrica", collector_id: str | None = None,
               tenant: str | None = None) -> str:
    """A token signed by the local key for `subject` with `roles`, valid for `ttl_seconds`, of `tenant` (a
    code; ``*`` for an installation-wide admin; no claim, that is ``default``, when None)."""
    roles = set(roles)
    unknown = sorted(roles - set(principals.ROLES))
    if unknown:
        raise ValueError(f"unknown role(s) {', '.join(unknown)}; one of {', '.join(principals.ROLES)}")
    if principals.COLLECTOR in roles and not collector_id:
        raise ValueError("a collector's token names its collector: give its collector id (fabrica token --collector-id)")
    now = int(time.time())
    claims: dict[str, Any] = {"sub": subject, "roles": sorted(set(roles)), "iss": issuer, "aud": audience,
                              "iat": now, "exp": now + int(ttl_seconds), "jti": uuid.uuid4().hex}
    if collector_id:
        claims["collector_id"] = collector_id
    if tenant is not None:
        if not (tenant == tenancy.ALL or tenancy.is_code(tenant)):
            raise ValueError(f"{tenant!r} is not a tenant code (lower-case letters, digits and dashes, starting "
                             "with a letter) or * (installation-wide)")
        if tenant == tenancy.ALL and not _may_be_installation_wide(frozenset(roles), collector_id):
            raise ValueError("only an admin's token (or a viewer-only one, a service's) may be installation-wide "
                             "(--tenant '*')")
        claims["tenant"] = tenant
    return jwt.encode(claims, key.private_key(), algorithm="EdDSA", headers={"kid": key.key_id})


__all__ = [
    "Authenticator", "LocalKey", "TokenVerifier", "authenticator_for", "authorize", "bearer_token",
    "ensure_local_key", "is_open", "mint_token", "principal_from_claims", "required_role", "verifier_for",
]
