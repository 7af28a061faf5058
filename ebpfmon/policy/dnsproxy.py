"""The DNS proxy that agents with an egress profile ask, whatever server they name.

probes/enforce.bpf.c sends their connects and datagrams to port 53 here, on loopback, and makes
the replies look as if the server they asked had sent them. A name the agent's profile allows is
asked of the upstream servers, and the addresses in the answer are allowed to the profile in the
kernel (for the answer's TTL, at least egress.dns_ttl_floor) BEFORE the agent has the answer: its
connect straight after never races the policy. A name the profile does not allow gets REFUSED (or
NXDOMAIN) and the upstream never hears of it; in audit mode it is answered and reported. Every
question is an event (dns), so answers reach the audit log and the rules.

When the daemon is not running, nothing listens on the proxy's port and the agents' DNS fails
(closed): the kernel still redirects it.
"""

from __future__ import annotations

import ipaddress
import logging
import selectors
import socket
import struct
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import dns.exception
import dns.flags
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import dns.resolver

from ebpfmon import events as ev
from ebpfmon.policy.profiles import Profile, parse_upstream

if TYPE_CHECKING:
    from ebpfmon.config import EgressSettings
    from ebpfmon.kernel.enforcer import Enforcer

log = logging.getLogger(__name__)

UPSTREAM_TIMEOUT = 2.0  # seconds per upstream server asked
TCP_IDLE = 10.0  # seconds a TCP client may keep a connection without asking
WORKERS = 8  # questions answered at once (each waits on an upstream)
BIND_TRIES = 20  # ports tried for one that is free on both loopbacks
IPPROTO = {"udp": socket.IPPROTO_UDP, "tcp": socket.IPPROTO_TCP}
ADDRESS_TYPES = (dns.rdatatype.A, dns.rdatatype.AAAA)


def host_resolvers() -> list[tuple[str, int]]:
    try:
        return [(server, 53) for server in dns.resolver.Resolver().nameservers]
    except dns.exception.DNSException:
        return []


class DnsProxy:
    def __init__(self, enforcer: Enforcer, settings: EgressSettings, on_event: Callable[[ev.DnsEvent], None]):
        self.enforcer = enforcer
        self.on_event = on_event
        self.configure(settings)
        self.port = 0
        self.questions = 0
        self.unknown_clients = 0  # questions from a socket the kernel did not send here
        self._sockets: list[socket.socket] = []
        self._selector = selectors.DefaultSelector()
        self._pool = ThreadPoolExecutor(WORKERS, thread_name_prefix="ebpfmon-dns")
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def configure(self, settings: EgressSettings) -> None:
        """The settings of a reload: upstream servers, TTL floor, the answer to names refused."""
        self.upstreams = [parse_upstream(s) for s in settings.dns_upstream] or host_resolvers()
        self.ttl_floor = settings.dns_ttl_floor
        self.refusal = dns.rcode.NXDOMAIN if settings.dns_refuse_with == "nxdomain" else dns.rcode.REFUSED
        self.wanted_port = settings.dns_proxy_port

    # ---- start and stop ----

    def start(self) -> DnsProxy:
        """Listens on 127.0.0.1 and ::1 (UDP and TCP, one port), then tells the kernel the port."""
        for attempt in range(BIND_TRIES):
            try:
                self._sockets = self._bind(self.wanted_port)
                break
            except OSError as e:
                for sock in self._sockets:
                    sock.close()
                if self.wanted_port or attempt == BIND_TRIES - 1:
                    raise OSError(e.errno, f"the DNS proxy cannot listen on port {self.wanted_port or 'any'} "
                                           f"of loopback: {e.strerror}") from e
        self.port = self._sockets[0].getsockname()[1]
        for sock in self._sockets:
            sock.setblocking(False)
            self._selector.register(sock, selectors.EVENT_READ)
        self._thread = threading.Thread(target=self._serve, name="ebpfmon-dns-proxy", daemon=True)
        self._thread.start()
        self.enforcer.set_dns_proxy(self.port)
        log.info("DNS proxy on port %d of loopback, asking %s", self.port,
                 ", ".join(f"{h}:{p}" for h, p in self.upstreams) or "nobody (no resolvers)")
        return self

    def _bind(self, port: int) -> list[socket.socket]:
        """UDP and TCP on 127.0.0.1 and (where the host has IPv6) ::1, on one port: the kernel
        rewrites an agent's destination to one port whatever the family."""
        opened: list[socket.socket] = []
        self._sockets = opened
        for family, host in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
            for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
                try:
                    sock = socket.socket(family, kind)
                except OSError:
                    if family == socket.AF_INET6:
                        continue  # no IPv6 here: IPv6 DNS has nowhere to go, and fails
                    raise
                opened.append(sock)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                if kind == socket.SOCK_STREAM:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind((host, port))
                if kind == socket.SOCK_STREAM:
                    sock.listen(128)
                port = sock.getsockname()[1]
        return opened

    def close(self) -> None:
        """Stops answering. The kernel keeps sending the agents' DNS here: it fails until a
        daemon answers again."""
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=2)
        self._pool.shutdown(wait=False, cancel_futures=True)
        for sock in self._sockets:
            sock.close()
        self._selector.close()

    def _serve(self) -> None:
        while not self._stop.is_set():
            for key, _ in self._selector.select(timeout=0.2):
                sock = key.fileobj
                try:
                    if sock.type == socket.SOCK_DGRAM:
                        data, peer = sock.recvfrom(65535)
                        self._pool.submit(self._datagram, sock, data, peer)
                    else:
                        conn, peer = sock.accept()
                        self._pool.submit(self._stream, conn, peer)
                except BlockingIOError:
                    continue
                except OSError as e:
                    if not self._stop.is_set():
                        log.warning("DNS proxy: %s", e)

    # ---- one question ----

    def _datagram(self, sock: socket.socket, data: bytes, peer) -> None:
        reply = self._safely(data, peer, "udp", sock.family)
        if reply is not None:
            try:
                sock.sendto(reply, peer)
            except OSError as e:
                log.debug("DNS proxy: reply to %s lost: %s", peer, e)

    def _stream(self, conn: socket.socket, peer) -> None:
        with conn:
            conn.settimeout(TCP_IDLE)
            try:
                while True:
                    length = _read_exactly(conn, 2)
                    if length is None:
                        return
                    data = _read_exactly(conn, struct.unpack("!H", length)[0])
                    if data is None:
                        return
                    reply = self._safely(data, peer, "tcp", conn.family)
                    if reply is None:
                        return
                    conn.sendall(struct.pack("!H", len(reply)) + reply)
            except OSError:
                return

    def _safely(self, data: bytes, peer, protocol: str, family: int) -> bytes | None:
        try:
            return self.answer(data, peer[1], protocol, family, peer[0])
        except Exception:  # an agent's bytes must never stop the proxy
            log.exception("DNS proxy: question from port %s failed", peer[1])
            return None

    def answer(self, data: bytes, port: int, protocol: str, family: int, peer_address: str) -> bytes | None:
        """The reply to one question from the agent socket at port; None: no reply."""
        self.questions += 1
        try:
            query = dns.message.from_wire(data)
        except dns.exception.DNSException:
            return None  # not DNS: the agent hears nothing, as from a server that drops it
        client = self._client(port, protocol, family, peer_address)
        if client is None or len(query.question) != 1:
            self.unknown_clients += client is None
            return _reply(query, dns.rcode.REFUSED if client is None else dns.rcode.FORMERR)
        question = query.question[0]
        name = question.name.to_text(omit_final_dot=True).lower()
        profile = self.enforcer.egress_profile_of(client.agent_id)
        event = self._event(client, name, dns.rdatatype.to_text(question.rdtype), protocol, profile)
        allowed = profile is None or profile.name_entry(name) is not None
        if not allowed and profile.mode == "enforce":
            event.verdict, event.rcode = "refused", dns.rcode.to_text(self.refusal)
            self.on_event(event)
            return _reply(query, self.refusal)
        response = self._ask_upstream(query, protocol)
        if response is None:
            event.verdict, event.rcode = "failed", "SERVFAIL"
            self.on_event(event)
            return _reply(query, dns.rcode.SERVFAIL)
        addresses, ttl = _addresses(response)
        if allowed and profile is not None and addresses:
            expires = time.monotonic_ns() + max(ttl, self.ttl_floor) * 1_000_000_000
            self.enforcer.grant_name(profile, name, addresses, expires)
        event.verdict = "answered" if allowed else "would-refuse"
        event.rcode = dns.rcode.to_text(response.rcode())
        event.answers, event.ttl = [str(a) for a in addresses], ttl if addresses else None
        self.on_event(event)
        return response.to_wire(max_size=65535 if protocol == "tcp" else max(512, query.payload))

    def _client(self, port: int, protocol: str, family: int, peer_address: str):
        """Who asked: the agent socket the kernel sent here, by the source port it sends from."""
        if not ipaddress.ip_address(peer_address.split("%")[0]).is_loopback and \
                not peer_address.startswith("::ffff:127."):
            return None
        clients = self.enforcer.bpf[b"dns_clients"]
        key = clients.Key(ip_version=4 if family == socket.AF_INET else 6, protocol=IPPROTO[protocol], port=port)
        return clients.get(key)

    def _event(self, client, name: str, qtype: str, protocol: str, profile: Profile | None) -> ev.DnsEvent:
        server = ipaddress.ip_address(bytes(client.addr)[:4 if client.family == socket.AF_INET else 16])
        if server.version == 6 and server.ipv4_mapped:
            server = server.ipv4_mapped
        shown = f"[{server}]:{client.port}" if server.version == 6 else f"{server}:{client.port}"
        proc = ev.Process(client.pid, client.tid, 0, client.uid, client.gid, ev.text(client.comm))
        return ev.DnsEvent(time_ns=time.time_ns(), cgroup_id=client.cgroup_id, cgroup=None, proc=proc,
                           dns_query=name, qtype=qtype, server=shown, protocol=protocol, agent_id=client.agent_id,
                           profile=profile.name if profile else None)

    def _ask_upstream(self, query: dns.message.Message, protocol: str) -> dns.message.Message | None:
        for host, port in self.upstreams:
            try:
                if protocol == "udp":
                    response = dns.query.udp(query, host, port=port, timeout=UPSTREAM_TIMEOUT, ignore_trailing=True)
                    if not response.flags & dns.flags.TC:
                        return response
                return dns.query.tcp(query, host, port=port, timeout=UPSTREAM_TIMEOUT)
            except (dns.exception.DNSException, OSError) as e:
                log.debug("DNS proxy: %s:%d did not answer: %s", host, port, e)
        return None


def _reply(query: dns.message.Message, rcode: int) -> bytes:
    response = dns.message.make_response(query)
    response.set_rcode(rcode)
    return response.to_wire()


def _addresses(response: dns.message.Message) -> tuple[list, int]:
    """The A and AAAA addresses of the answer (CNAMEs followed by the server), and the shortest
    TTL on the way to them."""
    addresses, ttls = [], []
    for rrset in response.answer:
        ttls.append(rrset.ttl)
        if rrset.rdtype in ADDRESS_TYPES:
            addresses += [ipaddress.ip_address(record.address) for record in rrset]
    return addresses, min(ttls) if ttls else 0


def _read_exactly(conn: socket.socket, size: int) -> bytes | None:
    data = b""
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        if not chunk:
            return None
        data += chunk
    return data
