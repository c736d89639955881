"""Who is calling: the client's address, honouring X-Forwarded-For only from trusted
proxies (otherwise any client could pick its own rate-limit key)."""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

from aiohttp import web

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


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
    addr = peer[0] if peer else ""
    if not proxies or not _trusted(addr, proxies):
        return addr
    # Walk X-Forwarded-For from the right: the first address not ours is the client.
    xff = request.headers.get("X-Forwarded-For")
    if xff:
        for hop in reversed([h.strip() for h in xff.split(",") if h.strip()]):
            if not _trusted(hop, proxies):
                return hop
        return xff.split(",")[0].strip()
    real = request.headers.get("X-Real-IP")
    return real.strip() if real else addr
