"""Network grants: which destinations a tool may reach, and the addresses that enforce it. Pure.

A profile's ``network`` is a tuple of ``EgressGrant``; empty (the default, or ``network: none``) means
the sandbox has no network interface but loopback. A granted invocation gets (the Docker backend's
``runtime/backends/docker_egress.py`` builds it):

    its own network   internal (no route out), no address on the host side (``inhibit_ipv4``: the host
                      is not a peer either), a /29 of ``egress.subnet_pool``: .2 proxy, .3 sandbox
    an egress proxy   a hardened sidecar on that network and on the upstream network, running
                      ``runtime/data/egress_proxy.py``, which enforces exactly this invocation's grants
    the sandbox       on the internal network only, ``HTTP(S)_PROXY`` pointing at the proxy by address

Two invocations never share a network or a proxy, so they never share an allowlist.
"""

from __future__ import annotations

import ipaddress
import json
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from toolcell.data.egress_proxy import is_ip_literal, normalize_host

PROXY_PORT: Final = 3128


class GrantError(ValueError):
    """A grant is malformed; the message says why (the caller adds the config key)."""


@dataclass(frozen=True)
class EgressGrant:
    """One destination: an exact host or ``*.suffix`` (subdomains at any depth, not the suffix itself).

    ``allow_private`` is unsafe: the name may then resolve to private (RFC 1918/ULA/CGNAT) addresses,
    i.e. services on your own network. Loopback and link-local (cloud metadata) are refused regardless.
    """

    host: str
    ports: tuple[int, ...] = (443,)
    allow_private: bool = False

    def to_json(self) -> dict[str, Any]:
        return {"host": self.host, "ports": list(self.ports), "allow_private": self.allow_private}


def parse_grant(raw: str | Mapping[str, Any]) -> EgressGrant:
    """``"api.example.com"``, ``"*.example.com"`` or ``{host, ports?, allow_private?}``."""
    if isinstance(raw, str):
        raw = {"host": raw}
    host = str(raw.get("host", ""))
    wildcard = host.startswith("*.")
    name = host[2:] if wildcard else host
    if is_ip_literal(name):
        raise GrantError(f"{host!r}: grant host names, not IP addresses")
    normalized = normalize_host(name)
    if normalized is None or "*" in name:
        raise GrantError(f"{host!r} is not a host name or a '*.suffix' wildcard")
    if wildcard and "." not in normalized:
        raise GrantError(f"{host!r}: a wildcard needs a suffix of at least two labels (e.g. '*.example.com')")
    ports = tuple(int(p) for p in raw.get("ports", (443,)))
    if not ports or any(not 0 < p < 65536 for p in ports):
        raise GrantError(f"{host!r}: ports must be 1-65535")
    return EgressGrant(host=("*." if wildcard else "") + normalized, ports=tuple(sorted(set(ports))),
                       allow_private=bool(raw.get("allow_private", False)))


@dataclass(frozen=True)
class EgressSettings:
    """Supervisor-wide egress settings (``egress:`` in the config)."""

    # Upstream network of the proxies; "" = ``toolcell-egress-<instance>``, created on demand.
    network: str = ""
    # Image the proxy runs in: anything with python3 (3.9+) and a uid 10001.
    image: str = "toolcell/python:bookworm"
    # Where each invocation's /29 internal network is carved from (no host route is added for it).
    subnet_pool: str = "10.213.0.0/16"
    proxy_memory_bytes: int = 64 * 1024 * 1024
    # How long the proxy may take to come up before the invocation fails.
    ready_timeout_s: float = 15.0

    def upstream_network(self, owner: str) -> str:
        return self.network or f"toolcell-egress-{owner}"


@dataclass(frozen=True)
class EgressLayout:
    """Addresses of one invocation's internal network."""

    network: str
    subnet: str
    proxy_ip: str
    sandbox_ip: str
    proxy_url: str = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "proxy_url", f"http://{self.proxy_ip}:{PROXY_PORT}")

    @classmethod
    def for_subnet(cls, network: str, subnet: str) -> EgressLayout:
        hosts = ipaddress.ip_network(subnet).network_address
        return cls(network=network, subnet=subnet, proxy_ip=str(hosts + 2), sandbox_ip=str(hosts + 3))


def candidate_subnets(pool: str, count: int = 8) -> tuple[str, ...]:
    """``count`` random /29s of ``pool`` (unguessable too: a tool can't predict a neighbour's range)."""
    network = ipaddress.ip_network(pool)
    if network.version != 4 or network.prefixlen > 29:
        raise GrantError(f"subnet pool {pool!r} must be an IPv4 network of /29 or larger")
    slots = 2 ** (29 - network.prefixlen)
    base = int(network.network_address)
    chosen = {secrets.randbelow(slots) for _ in range(count)}
    return tuple(f"{ipaddress.IPv4Address(base + 8 * slot)}/29" for slot in chosen)


def proxy_policy_json(grants: Sequence[EgressGrant], layout: EgressLayout) -> str:
    return json.dumps({"listen": layout.proxy_ip, "port": PROXY_PORT, "grants": [g.to_json() for g in grants]},
                      separators=(",", ":"))


def proxy_env(layout: EgressLayout) -> dict[str, str]:
    """What a granted sandbox gets: both spellings, as tools differ in which they read."""
    url = layout.proxy_url
    return {"HTTP_PROXY": url, "HTTPS_PROXY": url, "http_proxy": url, "https_proxy": url,
            "ALL_PROXY": url, "NO_PROXY": "", "no_proxy": ""}

