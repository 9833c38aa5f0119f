"""Who is calling: the principal of one RPC, from the transport and the caller's bearer token.

- Unix socket: uid/gid/pid from SO_PEERCRED (``peer.PeerForwarder`` maps ``context.peer()`` to them).
- mTLS: the client certificate's common name and subject alternative names, as verified by gRPC
  against the configured client CA (``auth_context``: ``x509_common_name``,
  ``x509_subject_alternative_name``).
- ``authorization: Bearer <JWT>`` metadata, verified by ``tokens.JwtVerifier``.

Where JWTs are configured, a presented token must be valid even if none is required (fail closed); the identities the
listener requires (``auth.require``) must all be present. Failures raise ``Unauthenticated`` with a
reason that helps the caller and reveals nothing about keys, rules or other callers.
"""

from __future__ import annotations

from collections.abc import Mapping

import grpc

from toolcell.errors import Unauthenticated
from toolcell.policy.access import AccessPolicy, PeerCred, Principal
from toolcell.server.tokens import JwtVerifier

_REQUIREMENT_HELP = {
    "peer": "a connection over the supervisor's Unix socket",
    "cert": "a client certificate (mTLS)",
    "token": "a bearer token (metadata 'authorization: Bearer <JWT>')",  # nosec B105 - help text
}


def _cert_names(context: grpc.aio.ServicerContext) -> tuple[str, ...]:
    auth = context.auth_context() or {}
    if auth.get("transport_security_type") != [b"ssl"]:
        return ()
    names: list[str] = []
    for key in ("x509_common_name", "x509_subject_alternative_name"):
        for value in auth.get(key, []):
            name = value.decode(errors="replace")
            if name not in names:
                names.append(name)
    return tuple(names)


def _bearer(context: grpc.aio.ServicerContext) -> str | None:
    for key, value in context.invocation_metadata() or ():
        if key == "authorization" and isinstance(value, str):
            scheme, _, token = value.partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                raise Unauthenticated("authorization metadata must be 'Bearer <JWT>'")
            return token.strip()
    return None


def peer_key(context: grpc.aio.ServicerContext, peers: Mapping[str, PeerCred]) -> str:
    """Who is knocking, before any credential is checked: the bucket refusals are counted in.

    The uid on the Unix socket (SO_PEERCRED), the certificate's first name on mTLS, else the remote
    address without its port (a new connection per request earns a caller nothing).
    """
    cred = peers.get(context.peer())
    if cred is not None:
        return f"uid:{cred.uid}"
    names = _cert_names(context)
    if names:
        return "cert:" + names[0][:128]
    kind, _, address = str(context.peer()).partition(":")
    if kind in ("ipv4", "ipv6"):
        return "ip:" + address.rsplit(":", 1)[0].strip("[]")
    return (kind or "peer")[:16] + ":" + address[:128]


class Authenticator:
    def __init__(self, policy: AccessPolicy, verifier: JwtVerifier | None, peers: Mapping[str, PeerCred]) -> None:
        self.policy = policy
        self.verifier = verifier
        self.peers = peers

    def peer_key(self, context: grpc.aio.ServicerContext) -> str:
        return peer_key(context, self.peers)

    async def principal(self, context: grpc.aio.ServicerContext) -> Principal:
        peer = self.peers.get(context.peer())
        cert_names = _cert_names(context)
        # Without auth.jwt an authorization header is no credential here: it is ignored (and, like all
        # caller metadata, never passed on to a tool).
        token = _bearer(context) if self.verifier is not None else None
        subject = issuer = None
        scopes: frozenset[str] = frozenset()
        groups: frozenset[str] = frozenset()
        if token is not None and self.verifier is not None:
            ident = await self.verifier.verify(token)
            subject, issuer, scopes, groups = ident.subject, ident.issuer, ident.scopes, ident.groups
        principal = Principal(peer=peer, cert_names=cert_names, subject=subject, issuer=issuer,
                              scopes=scopes, groups=groups)
        missing = self.policy.missing(principal)
        if missing:
            raise Unauthenticated("this listener requires " + " and ".join(_REQUIREMENT_HELP[m] for m in missing))
        return principal
