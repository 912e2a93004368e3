"""Worker discovery: `--workers host:port,...` entries, each name expanded to every address it
resolves to (a Kubernetes headless Service gives one per worker pod). Never opens a channel."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from collections.abc import Awaitable, Callable

log = logging.getLogger(__name__)

# (host, port) -> the IP addresses (as text) the host resolves to
Resolver = Callable[[str, int], Awaitable[list[str]]]


def parse_entries(spec: str) -> list[tuple[str, int]]:
    """'a:1,[::1]:2, b:3' -> [('a', 1), ('::1', 2), ('b', 3)]; ValueError names a bad entry."""
    entries = []
    for raw in spec.split(","):
        entry = raw.strip()
        if not entry:
            continue
        host, _, port = entry.rpartition(":")
        host = host.removeprefix("[").removesuffix("]")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"--workers entry {entry!r} is not host:port "
                             "(IPv6 as [addr]:port)")
        entries.append((host, int(port)))
    return entries


def format_address(host: str, port: int) -> str:
    """The gRPC target for host and port; IPv6 literals in brackets."""
    try:
        if ipaddress.ip_address(host).version == 6:
            return f"[{host}]:{port}"
    except ValueError:
        pass  # a name, not a literal
    return f"{host}:{port}"


async def resolve_host(host: str, port: int) -> list[str]:
    """The addresses `host` resolves to, IPv4 only when it has any: 'localhost' gives both
    127.0.0.1 and ::1, which are one worker, not two. An IP literal resolves to itself."""
    try:
        ipaddress.ip_address(host)
        return [host]
    except ValueError:
        pass
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    v4 = [info[4][0] for info in infos if info[0] == socket.AF_INET]
    v6 = [info[4][0] for info in infos if info[0] == socket.AF_INET6]
    return sorted(set(v4 or v6))


async def expand(entries: list[tuple[str, int]], resolver: Resolver,
                 previous: dict[str, str] | None = None) -> dict[str, str]:
    """-> {worker address: the --workers entry it came from}. An entry that fails to resolve
    (or resolves to nothing) keeps the addresses it had before, so a DNS hiccup never empties
    the pool; at start it has none and is retried at the next re-resolution."""
    previous = previous or {}
    results = await asyncio.gather(*(resolver(host, port) for host, port in entries),
                                   return_exceptions=True)
    addresses: dict[str, str] = {}
    for (host, port), result in zip(entries, results, strict=True):
        entry = format_address(host, port)
        if isinstance(result, BaseException) or not result:
            kept = {a: e for a, e in previous.items() if e == entry}
            log.warning("--workers %s: resolves to no address (%s); keeping %d known", entry,
                        result or "empty answer", len(kept))
            addresses.update(kept)
            continue
        for ip in result:
            addresses[format_address(ip, port)] = entry
    return addresses
