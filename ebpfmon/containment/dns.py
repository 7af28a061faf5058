"""What a name the agent looked up resolves to, asked of the server the agent asked.

deny_connect on a DNS lookup refuses connects to the addresses the agent was
told, not to its resolver. DNS answers are not captured in the kernel (that
would mean tracing every recv on the host), so the daemon asks the same
question of the same server itself: a pool behind several addresses or a
round-robin may answer it differently, and the agent may connect first; the
rule that saw the lookup can cut the agent at once for that reason.
"""

from __future__ import annotations

import dns.exception
import dns.resolver

TIMEOUT = 2.0  # seconds for both questions (A and AAAA)


def addresses(name: str, server: str, port: int = 53, timeout: float = TIMEOUT) -> list[str]:
    """The IPv4 and IPv6 addresses server gives for name; [] when it gives none or no answer."""
    resolver = dns.resolver.Resolver(configure=False)
    resolver.nameservers = [server]
    resolver.port = port
    resolver.lifetime = timeout
    found = []
    for rdtype in ("A", "AAAA"):
        try:
            answer = resolver.resolve(name, rdtype, search=False, raise_on_no_answer=False)
        except dns.exception.DNSException:
            continue
        if answer.rrset is not None:
            found += [record.address for record in answer.rrset]
    return found
