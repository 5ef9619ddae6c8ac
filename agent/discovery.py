"""Finding the controller on the LAN with zeroconf (DESIGN §5: first contact only).

The controller advertises ``_pfleet._tcp.local.`` (``PFLEET_ZEROCONF=true``) with TXT
properties ``path`` (the API root, ``/api/v1/``), ``tls`` (``0``/``1``) and
``version``.  An agent started without a controller URL browses for it, IPv4 only,
for a bounded time, and dials the first usable answer.  Nothing is kept running
afterwards: the agent stops multicasting once it has a URL, and a restart browses
again.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from dataclasses import dataclass
from typing import Any

from zeroconf import InterfaceChoice, InterfacesType, IPVersion, ServiceStateChange
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

log = logging.getLogger("pfleet.agent.discovery")

SERVICE_TYPE = "_pfleet._tcp.local."
INFO_TIMEOUT = 3.0  # seconds one service's SRV/TXT/A lookup may take


@dataclass(frozen=True)
class DiscoveredController:
    url: str  # ws(s)://ADDRESS:PORT/api/v1/fleet/connect
    name: str  # the zeroconf instance name
    address: str
    port: int
    tls: bool
    version: str = ""


def controller_from_info(info: Any) -> DiscoveredController | None:
    """The controller a resolved ``ServiceInfo`` describes; None when it is not usable
    (no IPv4 address or no port)."""
    addresses = info.parsed_addresses(IPVersion.V4Only)
    if not addresses or not info.port:
        return None
    props = {_text(k): _text(v) for k, v in (info.properties or {}).items()}
    tls = props.get("tls", "0") == "1"
    path = props.get("path") or "/api/v1/"
    path = "/" + path.strip("/") + "/" if path.strip("/") else "/"
    address = _pick_address(addresses)
    url = f"{'wss' if tls else 'ws'}://{address}:{info.port}{path}fleet/connect"
    return DiscoveredController(url=url, name=info.name, address=address, port=info.port,
                                tls=tls, version=props.get("version", ""))


async def discover_controller(
    timeout: float,  # noqa: ASYNC109 - the browse itself is what is bounded
    interfaces: InterfacesType = InterfaceChoice.All,
    require_tls: bool = False,
) -> DiscoveredController | None:
    """Browse for ``_pfleet._tcp.local.`` for at most ``timeout`` seconds; the first
    usable controller, or None when none answered in time.

    ``require_tls`` (the agent has a CA file) skips answers advertising ``tls=0``: the
    agent sends its token on connect, and anyone on the LAN can advertise, so a
    configured CA must not be bypassed by a plain ``ws://`` answer."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    names: asyncio.Queue[str] = asyncio.Queue()

    def on_change(zeroconf: Any, service_type: str, name: str,
                  state_change: ServiceStateChange) -> None:
        if state_change in (ServiceStateChange.Added, ServiceStateChange.Updated):
            loop.call_soon_threadsafe(names.put_nowait, name)

    aiozc = AsyncZeroconf(interfaces=interfaces, ip_version=IPVersion.V4Only)
    browser: AsyncServiceBrowser | None = None
    try:
        browser = AsyncServiceBrowser(aiozc.zeroconf, SERVICE_TYPE, handlers=[on_change])
        while (remaining := deadline - loop.time()) > 0:
            try:
                name = await asyncio.wait_for(names.get(), remaining)
            except TimeoutError:
                break
            info = AsyncServiceInfo(SERVICE_TYPE, name)
            wait = max(0.1, min(INFO_TIMEOUT, deadline - loop.time()))
            if not await info.async_request(aiozc.zeroconf, wait * 1000):
                log.info("zeroconf: no answer resolving name=%s", name)
                continue
            found = controller_from_info(info)
            if found is None:
                log.info("zeroconf: unusable record name=%s (no IPv4 address or port)", name)
                continue
            if require_tls and not found.tls:
                log.warning("zeroconf: ignoring %s at %s: it does not offer TLS and a CA "
                            "file is configured", name, found.address)
                continue
            return found
        return None
    finally:
        if browser is not None:
            await browser.async_cancel()
        await aiozc.async_close()


def _pick_address(addresses: list[str]) -> str:
    """Prefer a routable address over loopback and link-local ones."""
    for address in addresses:
        ip = ipaddress.IPv4Address(address)
        if not (ip.is_loopback or ip.is_link_local or ip.is_unspecified):
            return address
    return addresses[0]


def _text(value: bytes | str | None) -> str:
    if value is None:
        return ""
    return value.decode(errors="replace") if isinstance(value, bytes) else value
