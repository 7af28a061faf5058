"""Which destination addresses are internal to this node's networks.

An address is internal when it lies in a configured network (by default the
private, shared, link-local and unique-local ranges), is a loopback address,
or is reached through a route of this node other than the default route
(read with pyroute2 from the kernel's main and local tables), or lies in the
network of one of the node's own addresses even when that is reached through the
default route (cloud VMs hold /32 addresses: their neighbours' /24, /64 for IPv6,
is the node's network all the same). Rules then ask
fd.is_internal instead of carrying a CIDR list per node, and fd.is_local for
the node's own addresses (the local table's local routes) and loopback. Results are cached;
routes are read again every refresh_seconds.
"""

from __future__ import annotations

import ipaddress
import logging
import select
import socket
import time
from collections.abc import Iterable

log = logging.getLogger(__name__)

DEFAULT_INTERNAL_NETWORKS = (
    "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16",  # RFC 1918
    "100.64.0.0/10",  # RFC 6598 shared address space (carrier-grade NAT, many clouds' internal ranges)
    "169.254.0.0/16",  # link-local, cloud metadata services
    "fc00::/7", "fe80::/10",  # unique-local and link-local IPv6
)

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_networks(cidrs: Iterable[str]) -> list[IPNetwork]:
    return [ipaddress.ip_network(c, strict=False) for c in cidrs]


RTN_LOCAL = 2  # a route of type local: an address of this node
NEIGHBOURHOOD = {4: 24, 6: 64}  # the network around an address that has no wider route of its own


def own_networks(own: Iterable[str]) -> list[IPNetwork]:
    """The networks of the node's own addresses (loopback left out)."""
    networks = []
    for address in own:
        ip = ipaddress.ip_address(address)
        if not ip.is_loopback:
            networks.append(ipaddress.ip_network(f"{ip}/{NEIGHBOURHOOD[ip.version]}", strict=False))
    return networks


def read_routes() -> tuple[list[IPNetwork], set[str]]:
    """Destinations of this node's non-default routes (main and local tables), and the
    node's own addresses (the local table's routes of type local)."""
    from pyroute2 import IPRoute

    networks: list[IPNetwork] = []
    own: set[str] = set()
    with IPRoute() as ipr:
        for family in (socket.AF_INET, socket.AF_INET6):
            for route in ipr.get_routes(family=family):
                if route.get("table") not in (254, 255) or route["dst_len"] == 0:
                    continue
                dst = route.get("dst")
                if dst:
                    networks.append(ipaddress.ip_network(f"{dst}/{route['dst_len']}", strict=False))
                    if route["type"] == RTN_LOCAL and route["dst_len"] == (32 if family == socket.AF_INET else 128):
                        own.add(str(ipaddress.ip_address(dst)))
    return networks, own


class NetworkClassifier:
    def __init__(self, internal_networks: Iterable[str] = DEFAULT_INTERNAL_NETWORKS, use_routes: bool = True,
                 refresh_seconds: float = 30.0, watch_interval: float = 0.05, cache_size: int = 65536):
        self.configured = parse_networks(internal_networks)
        self.use_routes = use_routes
        self.refresh_seconds = refresh_seconds
        self.watch_interval = watch_interval
        self._watch = None
        self._watch_failed = False
        self._next_look = float("-inf")  # when is_internal next looks at the routes
        self.cache_size = cache_size
        self._routes: list[IPNetwork] = []
        self._own: set[str] = set()  # this node's addresses
        self._routes_read = float("-inf")
        self._cache: dict[str, bool] = {}

    def _look_at_routes(self, now: float) -> None:
        """Reads the routes again when they changed or are refresh_seconds old."""
        if not self.use_routes:
            return
        if self._routes_changed():
            self._routes_read = float("-inf")
        if now - self._routes_read < self.refresh_seconds:
            return
        self._routes_read = now
        try:
            routes, own = read_routes()
        except Exception as e:  # netlink refused (no CAP_NET_ADMIN needed, but be safe)
            log.warning("cannot read routes (%s); internal = configured networks only", e)
            routes, own = [], set()
        self._routes, self._own = routes + own_networks(own), own
        self._cache.clear()

    def _routes_changed(self) -> bool:
        """True when netlink announced a route change since the last look."""
        if self._watch_failed:
            return False
        try:
            if self._watch is None:
                from pyroute2 import IPRoute
                from pyroute2.netlink.rtnl import RTMGRP_IPV4_ROUTE, RTMGRP_IPV6_ROUTE

                self._watch = IPRoute()
                self._watch.bind(groups=RTMGRP_IPV4_ROUTE | RTMGRP_IPV6_ROUTE)
            changed = False
            while select.select([self._watch], [], [], 0)[0]:
                self._watch.get()
                changed = True
            return changed
        except Exception as e:
            log.warning("cannot watch route changes (%s); routes are read every %ss", e, self.refresh_seconds)
            self._watch_failed = True
            return False

    def _refresh(self) -> None:
        now = time.monotonic()
        if now >= self._next_look:  # one comparison otherwise: this runs for every connect an agent makes
            self._next_look = now + self.watch_interval
            self._look_at_routes(now)

    def is_internal(self, address: str) -> bool:
        self._refresh()
        known = self._cache.get(address)
        if known is not None:
            return known
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        internal = ip.is_loopback or any(ip in n for n in self.configured) or any(ip in n for n in self._routes)
        if len(self._cache) >= self.cache_size:
            self._cache.clear()
        self._cache[address] = internal
        return internal

    def is_local(self, address: str) -> bool:
        """Loopback, or an address of this node: a service there runs outside the agents."""
        if address.startswith("127.") or address == "::1":
            return True
        self._refresh()
        return address in self._own
