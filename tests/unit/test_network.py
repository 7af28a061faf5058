"""Internal destinations: configured networks, non-default routes, and the networks of the node's
own addresses even when the default route reaches them."""

import ipaddress

from ebpfmon.host import network
from ebpfmon.host.network import NetworkClassifier


def test_the_neighbours_of_a_slash_32_address_are_internal(monkeypatch):
    routes = [ipaddress.ip_network("192.0.2.0/28")]
    own = {"203.0.113.77", "127.0.0.1", "2001:db8:5::9"}
    monkeypatch.setattr(network, "read_routes", lambda: (routes, own))
    monkeypatch.setattr(NetworkClassifier, "_routes_changed", lambda self: False)
    classifier = NetworkClassifier([], use_routes=True)
    assert classifier.is_internal("203.0.113.5")  # the /24 of the node's own /32 address
    assert classifier.is_internal("2001:db8:5::1234")  # its /64
    assert classifier.is_internal("192.0.2.9")  # a route other than the default one
    assert not classifier.is_internal("198.51.100.7")  # the default route's
    assert not classifier.is_internal("192.0.2.99")
    assert classifier.is_local("203.0.113.77") and not classifier.is_local("203.0.113.5")
    assert not NetworkClassifier([], use_routes=False).is_internal("203.0.113.5")
