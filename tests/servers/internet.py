"""A small "internet" for tests and benchmarks: a network namespace behind a veth
pair, at documentation addresses (RFC 5737), and real servers inside it."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

HOST_ADDR = "198.51.100.1"  # this side of the veth
PEER_ADDR = "198.51.100.2"  # the host in the namespace: never a real machine
HOST_ADDR6 = "2001:db8:100::1"  # the same in IPv6 (RFC 3849)
PEER_ADDR6 = "2001:db8:100::2"
IFA_F_NODAD = 0x02  # usable at once: no duplicate address detection on a link of two


@dataclass
class NetnsHost:
    name: str
    address: str
    host_if: str
    peer_if: str = ""
    address6: str = PEER_ADDR6

    def add_address(self, address: str) -> None:
        """Another address of the host in the namespace (in 198.51.100.0/24 or 2001:db8:100::/64)."""
        from pyroute2 import NetNS

        with NetNS(self.name) as ns:
            ns.addr("add", index=ns.link_lookup(ifname=self.peer_if)[0], address=address,
                    prefixlen=64 if ":" in address else 24, flags=IFA_F_NODAD)

    def popen(self, argv, **kwargs) -> subprocess.Popen:
        return subprocess.Popen(["ip", "netns", "exec", self.name, *argv], **kwargs)


def remove_stale() -> None:
    """Namespaces an earlier run left behind (named after a process that is gone): they would
    hold 198.51.100.0/24 too."""
    from pyroute2 import netns

    for name in netns.listnetns():
        prefix, _, pid = name.rpartition("-")
        if prefix in ("ebpfmon-test", "ebpfmon-bench") and pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
            netns.remove(name)
    time.sleep(0.2)  # the kernel tears the veth down asynchronously


def create(name: str) -> NetnsHost:
    from pyroute2 import IPRoute, NetNS, netns

    remove_stale()
    tag = str(abs(hash(name)) % 100000)
    host_if, peer_if = f"ebt{tag}h", f"ebt{tag}n"
    netns.create(name)
    with IPRoute() as ip:
        ip.link("add", ifname=host_if, kind="veth", peer={"ifname": peer_if, "net_ns_fd": name})
        index = ip.link_lookup(ifname=host_if)[0]
        ip.addr("add", index=index, address=HOST_ADDR, prefixlen=24)
        ip.addr("add", index=index, address=HOST_ADDR6, prefixlen=64, flags=IFA_F_NODAD)
        ip.link("set", index=index, state="up")
    with NetNS(name) as ns:
        index = ns.link_lookup(ifname=peer_if)[0]
        ns.addr("add", index=index, address=PEER_ADDR, prefixlen=24)
        ns.addr("add", index=index, address=PEER_ADDR6, prefixlen=64, flags=IFA_F_NODAD)
        ns.link("set", index=index, state="up")
        ns.link("set", index=ns.link_lookup(ifname="lo")[0], state="up")
    return NetnsHost(name, PEER_ADDR, host_if, peer_if)


def remove(host: NetnsHost) -> None:
    from pyroute2 import IPRoute, netns

    with IPRoute() as ip:
        if ip.link_lookup(ifname=host.host_if):
            ip.link("del", ifname=host.host_if)
    netns.remove(host.name)


def wait_for_port(host: str, port: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection((host, port), timeout=0.5).close()
            return True
        except OSError:
            time.sleep(0.05)
    return False


@dataclass
class Loopback:
    """This machine's own loopback, for a server the node itself runs (its sshd, say)."""

    address: str = "127.0.0.1"

    def popen(self, argv, **kwargs) -> subprocess.Popen:
        return subprocess.Popen(argv, **kwargs)


def start_sshd(host: NetnsHost | Loopback, directory: Path, port: int = 22) -> tuple[subprocess.Popen, Path]:
    """A real OpenSSH server on host:port with a key for root; the server and the client key."""
    for key in ("host_key", "id"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(directory / key)], check=True)
    (directory / "authorized_keys").write_text((directory / "id.pub").read_text())
    (directory / "sshd_config").write_text(f"""
ListenAddress {host.address}
Port {port}
HostKey {directory}/host_key
PidFile {directory}/sshd.pid
AuthorizedKeysFile {directory}/authorized_keys
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
AllowTcpForwarding yes
PermitTunnel no
LogLevel ERROR
ClientAliveInterval 1
ClientAliveCountMax 3
""")
    os.makedirs("/run/sshd", exist_ok=True)  # privilege separation directory
    server = host.popen(["/usr/sbin/sshd", "-D", "-e", "-f", str(directory / "sshd_config")],
                        stderr=subprocess.PIPE)
    if not wait_for_port(host.address, port):
        server.kill()
        raise RuntimeError(f"sshd did not start: {server.communicate()[1]}")
    return server, directory / "id"
