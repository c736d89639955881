"""Who is calling: an API key → a configured client and tier; otherwise the client's IP.

- ``X-Forwarded-For``/``X-Real-IP`` are believed only from ``trusted_proxies``:
  otherwise any client could choose its own rate-limit key.
- Keys are kept only as SHA-256 digests (the config may hold the digest instead of
  the key) and looked up by the digest of what the client sent, then confirmed with
  a constant-time comparison; the plain key is never stored or logged.
- An unknown key with ``require_api_key: false`` is treated as no key: OpenAI
  clients always send some ``Authorization`` header, and they must keep working.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass

from aiohttp import web

from corral.config import Settings

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True, slots=True)
class Client:
    name: str            # the key's name, or the IP for anonymous clients
    ip: str
    tier: str
    key_name: str | None = None
    admin: bool = False
    key_matched: bool = False   # a configured key was presented (and is stripped upstream)


@dataclass(frozen=True, slots=True)
class _KeyEntry:
    name: str
    digest: bytes
    tier: str
    admin: bool


def hash_key(key: str) -> str:
    """The ``key_sha256`` form of a key (``corral keys hash``)."""
    return hashlib.sha256(key.encode()).hexdigest()


def parse_networks(cidrs: Sequence[str]) -> tuple[IPNetwork, ...]:
    return tuple(ipaddress.ip_network(c, strict=False) for c in cidrs)


def _trusted(addr: str, proxies: tuple[IPNetwork, ...]) -> bool:
    try:
        ip = ipaddress.ip_address(addr)
    except ValueError:
        return False
    return any(ip in net for net in proxies)


def client_ip(request: web.BaseRequest, proxies: tuple[IPNetwork, ...]) -> str:
    peer = request.transport.get_extra_info("peername") if request.transport else None
    addr = str(peer[0]) if peer else ""
    if not proxies or not _trusted(addr, proxies):
        return addr
    # Walk X-Forwarded-For from the right: the first address not ours is the client.
    xff = request.headers.get("X-Forwarded-For")
    if xff:
        hops = [h.strip() for h in xff.split(",") if h.strip()]
        for hop in reversed(hops):
            if not _trusted(hop, proxies):
                return hop
        return hops[0] if hops else addr
    real = request.headers.get("X-Real-IP")
    return real.strip() if real else addr


def presented_key(request: web.BaseRequest) -> str | None:
    """``Authorization: Bearer <key>`` or ``X-API-Key: <key>``; malformed → None."""
    auth = request.headers.get("Authorization")
    if auth:
        scheme, _, value = auth.strip().partition(" ")
        value = value.strip()
        if scheme.lower() == "bearer" and value and " " not in value:
            return value
    key = request.headers.get("X-API-Key")
    if key and key.strip():
        return key.strip()
    return None


class Identifier:
    def __init__(self, settings: Settings) -> None:
        self.proxies = parse_networks(settings.clients.trusted_proxies)
        self.default_tier = settings.clients.default_tier
        self.require_key = settings.clients.require_api_key
        self.use_keys = "api_key" in settings.clients.identify
        self._keys: dict[bytes, _KeyEntry] = {}
        for k in settings.keys:
            digest = (hashlib.sha256(k.key.encode()).digest() if k.key is not None
                      else bytes.fromhex(k.key_sha256 or ""))
            self._keys[digest] = _KeyEntry(k.name, digest, k.tier or self.default_tier,
                                           k.admin)

    def ip(self, request: web.BaseRequest) -> str:
        return client_ip(request, self.proxies)

    def identify(self, request: web.BaseRequest) -> Client | None:
        """The client, or None when a key is required and none valid was given."""
        ip = client_ip(request, self.proxies)
        if self.use_keys and self._keys:
            key = presented_key(request)
            if key is not None:
                digest = hashlib.sha256(key.encode()).digest()
                entry = self._keys.get(digest)
                if entry is not None and hmac.compare_digest(entry.digest, digest):
                    return Client(entry.name, ip, entry.tier, entry.name, entry.admin, True)
        if self.require_key:
            return None
        return Client(ip, ip, self.default_tier)
