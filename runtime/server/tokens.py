"""Bearer JWT verification against an identity provider's JWKS (PyJWT; nothing home-made).

The JWKS comes from a file or a URL (https, or http on loopback only), is cached and refreshed every
``refresh_s``; a token whose ``kid`` is unknown triggers one early refetch (at most every
``min_refetch_s``) so key rotation at the provider is picked up without hammering it.
Only the configured asymmetric algorithms are accepted: never ``none``, never HS* (a public key
can't be abused as an HMAC secret), and the key's type must fit the token's algorithm.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from jwt import PyJWK, PyJWKSet

from toolcell.access_settings import JwtSettings
from toolcell.errors import ConfigError, Unauthenticated
from toolcell.quoting import quote

log = logging.getLogger("toolcell.auth")

ALLOWED_ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA")
_KTY_FOR_ALG = {"RS": "RSA", "PS": "RSA", "ES": "EC", "Ed": "OKP"}
MAX_JWKS_BYTES = 1 << 20


@dataclass(frozen=True)
class TokenIdentity:
    subject: str
    issuer: str
    scopes: frozenset[str]
    groups: frozenset[str]


def check_jwks_url(url: str) -> None:
    """https anywhere; plain http only to a loopback address (a test IdP, a local sidecar)."""
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme == "https":
        return
    if parsed.scheme == "http":
        host = parsed.hostname or ""
        try:
            if host == "localhost" or ipaddress.ip_address(host).is_loopback:
                return
        except ValueError:
            pass
        raise ConfigError("plain http is allowed for loopback only; use https", key="auth.jwt.jwks")
    raise ConfigError(f"unsupported JWKS URL scheme {parsed.scheme!r}", key="auth.jwt.jwks")


def is_url(source: str) -> bool:
    return source.startswith(("http://", "https://"))


class JwksCache:
    def __init__(self, source: str, *, refresh_s: float, min_refetch_s: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if is_url(source):
            check_jwks_url(source)
        self.source = source
        self.refresh_s = refresh_s
        self.min_refetch_s = min_refetch_s
        self.clock = clock
        self.keys: dict[str, PyJWK] = {}
        self.raw: dict[str, dict[str, Any]] = {}
        self.fetched_at: float | None = None
        self.fetches = 0
        self._lock = asyncio.Lock()

    def _read(self) -> str:
        if is_url(self.source):
            req = urllib.request.Request(self.source, headers={"Accept": "application/json"})  # noqa: S310
            with urllib.request.urlopen(req, timeout=5) as resp:  # noqa: S310 # nosec B310 - scheme checked
                return str(resp.read(MAX_JWKS_BYTES + 1).decode())
        return Path(self.source).read_text()

    async def _refresh(self) -> None:
        """Fetch and parse the JWKS (caller holds the lock); on failure keep the keys we have."""
        self.fetches += 1
        try:
            text = await asyncio.to_thread(self._read)
            if len(text) > MAX_JWKS_BYTES:
                raise ValueError("JWKS too large")
            keyset = PyJWKSet.from_json(text)
        except Exception as exc:
            log.warning("cannot load JWKS from %s: %s", self.source, exc)
            if not self.keys:
                raise Unauthenticated("cannot verify bearer tokens now: the identity provider's keys are "
                                      "unavailable") from exc
            return
        finally:
            self.fetched_at = self.clock()
        self.keys = {k.key_id or "": k for k in keyset.keys}
        self.raw = {str(k.get("kid", "")): k for k in keyset_dict(text)}

    async def key_for(self, kid: str) -> tuple[PyJWK, dict[str, Any]]:
        async with self._lock:  # concurrent callers wait for one fetch instead of racing it
            now = self.clock()
            stale = self.fetched_at is None or now - self.fetched_at >= self.refresh_s
            may_refetch = self.fetched_at is not None and now - self.fetched_at >= self.min_refetch_s
            if stale or (kid not in self.keys and may_refetch):
                await self._refresh()
        if kid not in self.keys:
            raise Unauthenticated("token is signed with an unknown key (kid)" if kid else
                                  "token has no key id (kid)")
        return self.keys[kid], self.raw.get(kid, {})


def keyset_dict(text: str) -> list[dict[str, Any]]:
    import json

    doc = json.loads(text)
    keys = doc.get("keys", []) if isinstance(doc, dict) else []
    return [k for k in keys if isinstance(k, dict)]


def _claim_set(value: Any) -> frozenset[str]:
    if isinstance(value, str):
        return frozenset(value.split())
    if isinstance(value, list):
        return frozenset(str(v) for v in value)
    return frozenset()


class JwtVerifier:
    def __init__(self, settings: JwtSettings, clock: Callable[[], float] = time.monotonic) -> None:
        bad = [a for a in settings.algorithms if a not in ALLOWED_ALGORITHMS]
        if bad:
            raise ConfigError(f"algorithm(s) {bad} not allowed; use {list(ALLOWED_ALGORITHMS)}",
                              key="auth.jwt.algorithms")
        self.settings = settings
        self.jwks = JwksCache(settings.jwks, refresh_s=settings.refresh_s, min_refetch_s=settings.min_refetch_s,
                              clock=clock)

    async def verify(self, token: str) -> TokenIdentity:
        s = self.settings
        try:
            header = jwt.get_unverified_header(token)
        except jwt.InvalidTokenError as exc:
            raise Unauthenticated("bearer token is not a well-formed JWT") from exc
        alg = header.get("alg")
        if alg not in s.algorithms:
            raise Unauthenticated(f"token algorithm {quote(str(alg), 16)} is not accepted "
                                  f"(accepted: {', '.join(s.algorithms)})")
        key, raw = await self.jwks.key_for(str(header.get("kid", "")))
        if raw.get("alg") not in (None, alg) or raw.get("kty") != _KTY_FOR_ALG.get(str(alg)[:2]):
            raise Unauthenticated("token algorithm does not match its signing key")
        try:
            claims = jwt.decode(token, key.key, algorithms=[alg], audience=s.audience, issuer=s.issuer,
                                leeway=s.leeway_s, options={"require": ["exp", "iss", "aud", "sub"]})
        except jwt.ExpiredSignatureError as exc:
            raise Unauthenticated("token has expired") from exc
        except jwt.ImmatureSignatureError as exc:
            raise Unauthenticated("token is not valid yet (nbf/iat)") from exc
        except jwt.InvalidAudienceError as exc:
            raise Unauthenticated("token is not meant for this service (audience)") from exc
        except jwt.InvalidIssuerError as exc:
            raise Unauthenticated("token issuer is not trusted") from exc
        except jwt.MissingRequiredClaimError as exc:
            raise Unauthenticated(f"token lacks the required {exc.claim!r} claim") from exc
        except jwt.InvalidSignatureError as exc:
            raise Unauthenticated("token signature is invalid") from exc
        except jwt.InvalidTokenError as exc:
            raise Unauthenticated("bearer token is invalid") from exc
        return TokenIdentity(subject=str(claims["sub"]), issuer=str(claims["iss"]),
                             scopes=_claim_set(claims.get("scope", claims.get("scp"))),
                             groups=_claim_set(claims.get("groups")))
