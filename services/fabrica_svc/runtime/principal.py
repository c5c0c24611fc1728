"""Who is calling: the one identity every service's code asks about.

The transport (a verified client certificate) and the bearer token (a verified JWT) each yield a
`Principal`; the server's interceptor sets it for the duration of the RPC and domain code reads it with
`current()`. Nothing else in a service decides who the caller is.

Tokens are JWTs with these claims (the embedded signer, `fabrica token`, and any OIDC provider in
deployment produce them alike): ``sub`` (the user or collector), ``roles`` (a list of role names below),
``iss``/``aud`` (checked against settings), ``exp``, for a collector's token ``collector_id``, and
``tenant`` (a tenant code, or ``*`` for an installation-wide admin; ``default`` when absent: see
runtime/tenancy.py). A collector's certificate names its collector id in a URI SAN
``urn:fabrica:collector:<id>`` and its tenant in ``urn:fabrica:tenant:<code>`` (``default`` when absent); a
service's certificate names the service in ``urn:fabrica:service:<name>`` and acts across tenants.
"""

from __future__ import annotations

import contextvars
from dataclasses import dataclass, field

from . import tenancy
from .errors import FieldViolation, InvalidArgument, PermissionDenied, Unauthenticated

#: The roles, weakest first. A role includes the ones before it in this order, except `collector`, which
#: is a machine role of its own (a collector streams and watches as itself and reads nothing else).
VIEWER = "viewer"
OPERATOR = "operator"
ENGINEER = "engineer"
ADMIN = "admin"
COLLECTOR = "collector"
USER_ROLES: tuple[str, ...] = (VIEWER, OPERATOR, ENGINEER, ADMIN)
ROLES: tuple[str, ...] = (*USER_ROLES, COLLECTOR)


@dataclass(frozen=True)
class Principal:
    """A proven caller. `subject` is e.g. ``user:ana``, ``collector:demo`` or ``service:production``;
    `via` says how it was proven: ``token``, ``certificate`` or ``insecure`` (authentication turned off
    by FABRICA_INSECURE=1, development only)."""

    subject: str
    roles: frozenset[str] = field(default_factory=frozenset)
    collector_id: str | None = None
    via: str = "token"
    #: The tenant it belongs to, or ``*`` (installation-wide: it names the tenant per request).
    tenant: str = tenancy.DEFAULT

    @property
    def installation_wide(self) -> bool:
        return self.tenant == tenancy.ALL

    def has_role(self, role: str) -> bool:
        """True when this principal may act with `role`: an exact grant, or a stronger user role."""
        if role in self.roles:
            return True
        if role not in USER_ROLES:
            return False
        needed = USER_ROLES.index(role)
        return any(r in USER_ROLES and USER_ROLES.index(r) >= needed for r in self.roles)


#: The principal of the development mode, when authentication is off: may do everything, as any collector.
INSECURE = Principal(subject="insecure", roles=frozenset(USER_ROLES), collector_id=None, via="insecure",
                     tenant=tenancy.ALL)

_current: contextvars.ContextVar[Principal | None] = contextvars.ContextVar("fabrica_principal", default=None)


def current() -> Principal | None:
    """The principal of the RPC being served, or None outside one."""
    return _current.get()


def set_current(principal: Principal | None) -> contextvars.Token[Principal | None]:
    """Set the principal for the running task (the interceptor does this); reset with `reset`."""
    return _current.set(principal)


def reset(token: contextvars.Token[Principal | None]) -> None:
    _current.reset(token)


def actor() -> str:
    """The subject to record in audit entries and logs: the current principal's, or ``system``."""
    p = current()
    return p.subject if p else "system"


def require_collector(collector_id: str) -> None:
    """Refuse (PERMISSION_DENIED) unless the caller proved it is collector `collector_id`; a caller that
    proved nothing at all (no principal: no client certificate, no token) is UNAUTHENTICATED. The
    development principal (authentication off) passes."""
    p = current()
    if p is None:
        raise Unauthenticated(f"acting as collector {collector_id!r} needs the collector's client certificate "
                              "(on the service's peer port) or its token", reason="UNAUTHENTICATED",
                              metadata={"collector_id": collector_id})
    if p.via == "insecure":
        return
    if p.collector_id != collector_id:
        shown = p.collector_id or p.subject
        raise PermissionDenied(
            f"{shown} may not act as collector {collector_id!r}: a collector streams and watches only as itself",
            reason="COLLECTOR_IDENTITY_MISMATCH",
            metadata={"collector_id": collector_id, "caller": p.subject},
        )


def tenant_of_request(p: Principal, header: str | None) -> str:
    """The tenant an RPC of `p` works for (the rules are in runtime/tenancy.py): `p`'s own, or for an
    installation-wide caller the one its ``x-fabrica-tenant`` header names (``default`` for a user without
    the header, across tenants for a service without it)."""
    if header is not None and header != tenancy.ALL and not tenancy.is_code(header):
        raise InvalidArgument(FieldViolation(tenancy.HEADER, f"the {tenancy.HEADER} header is not a tenant code "
                                             "(lower-case letters, digits and dashes, starting with a letter) or *"))
    if not p.installation_wide:
        if header is not None and header != p.tenant:
            raise PermissionDenied(f"{p.subject} belongs to tenant {p.tenant!r} and acts in it only",
                                   reason="TENANT_MISMATCH", metadata={"tenant": p.tenant})
        return p.tenant
    if header is not None:
        return header
    return tenancy.ALL if p.subject.startswith("service:") else tenancy.DEFAULT


def require_authenticated() -> Principal:
    p = current()
    if p is None:
        raise Unauthenticated("this call needs a bearer token or a client certificate", reason="UNAUTHENTICATED")
    return p
