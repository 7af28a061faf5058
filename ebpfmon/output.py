"""Output: events as table lines or JSON lines.

Agent-controlled text (argv, paths, comm) is escaped in the table so an agent
cannot move the cursor, clear the screen or forge extra lines.
"""

from __future__ import annotations

import datetime as dt
import shlex

from ebpfmon import events as ev

COLUMNS = ("TIME", "CGROUP", "PID", "PPID", "COMM", "WHAT")
WIDTHS = (12, 24, 7, 7, 16)


# characters that change how the text around them reads without being seen: bidi overrides,
# embeddings and isolates (a command line shown reversed), line and paragraph separators (a
# fake new line in a log), zero-width marks
INVISIBLE = frozenset([0x061C, 0x200B, 0x200C, 0x200D, 0x200E, 0x200F, 0x2028, 0x2029, 0x202A, 0x202B, 0x202C,
                       0x202D, 0x202E, 0x2060, 0x2066, 0x2067, 0x2068, 0x2069, 0xFEFF])


def safe(value: str) -> str:
    """Printable form of agent text: control characters and undecodable bytes as \\xNN,
    invisible formatting characters as \\uNNNN."""
    out = []
    for ch in value:
        code = ord(ch)
        if 0xDC80 <= code <= 0xDCFF:  # a byte that was not UTF-8 (surrogateescape)
            out.append(f"\\x{code - 0xDC00:02x}")
        elif code < 0x20 or code == 0x7F or 0x80 <= code < 0xA0:
            out.append(f"\\x{code:02x}")
        elif code in INVISIBLE:
            out.append(f"\\u{code:04x}")
        else:
            out.append(ch)
    return "".join(out)


def quote_argv(argv: list[str]) -> str:
    return " ".join(shlex.quote(safe(a)) for a in argv)


def result(event: ev.Event) -> str:
    return event.error or "ok"


def transport(event: ev.ConnectEvent) -> str:
    """'tcp ' or 'udp ' when known (the daemon's cgroup hooks tell), else nothing."""
    known = event.protocol or event.sock_type
    return f"{known} " if known else ""


def endpoint(event: ev.ConnectEvent) -> str:
    host = f"[{event.address}]" if ":" in event.address else event.address
    return f"{host}:{event.port}"


def describe(event: ev.Event) -> str:
    """The WHAT column: what the process did, and how it went."""
    if isinstance(event, ev.ExecEvent):
        what = f"{event.syscall} {safe(event.filename)}  {quote_argv(event.argv)}"
        if event.argv_truncated:
            what += " [argv truncated]"
        if event.argv_source != "kernel":
            what += " [argv from /proc]" if event.argv_source == "proc" else " [argv unreadable]"
        if event.found_at_start:
            return f"{what}  (running at start)"
        return f"{what}  = {result(event)}"
    if isinstance(event, ev.UdpSendEvent):
        what = f"send {transport(event)}{endpoint(event)} {event.length}B"
        if event.dns_query:
            what += f" dns={safe(event.dns_query)}"
        return f"{what}  = {result(event)}"
    if isinstance(event, ev.ConnectEvent):
        outcome = "(cgroup hook, result unknown)" if event.source == "cgroup_hook" else f"= {result(event)}"
        return f"connect {transport(event)}{endpoint(event)}  {outcome}"
    if isinstance(event, ev.UnixConnectEvent):
        given = f" (given {safe(event.path)})" if event.resolved and event.resolved != event.path else ""
        return f"connect unix {safe(event.resolved or event.path)}{given}  = {result(event)}"
    if isinstance(event, ev.GpuOpenEvent):
        device = f" ({event.device} {event.vendor or 'unknown vendor'})" if event.device else ""
        return f"open {safe(event.path)}{device} {event.access}  = {result(event)}"
    if isinstance(event, ev.RefusedEvent):
        what = (f"device {event.device} ({event.vendor or 'unknown vendor'}) {event.access}" if event.op == "device"
                else f"{event.op} {event.protocol or '?'} {endpoint(event)}")
        verdict = "would refuse (dry run)" if event.dry_run else "REFUSED"
        return f"{verdict} {what}: {event.reason}"
    if isinstance(event, ev.GpuHeldEvent):
        return (f"holds {safe(event.path)} ({event.device} {event.node}, {event.vendor or 'unknown vendor'}) "
                f"on fd {event.fd} beyond its grant")
    if isinstance(event, ev.DeviceEvent):
        return f"device {event.device} ({event.vendor or 'unknown vendor'}) {event.access} (cgroup hook)"
    if isinstance(event, ev.DnsEvent):
        answers = f" -> {', '.join(event.answers)} ttl {event.ttl}s" if event.answers else ""
        return (f"dns {event.protocol} {safe(event.dns_query)} {event.qtype} via {event.server}: "
                f"{event.verdict.upper() if event.verdict == 'refused' else event.verdict} {event.rcode}{answers}")
    if isinstance(event, ev.ForkEvent):
        return f"fork -> {event.child_pid}"
    return event.kind


def _clip(value: str, width: int) -> str:
    # keep the end of long cgroup paths: the agent's own name is last
    return value if len(value) <= width else "…" + value[-(width - 1):]


def header() -> str:
    return " ".join(c.ljust(w) for c, w in zip(COLUMNS, WIDTHS)) + " " + COLUMNS[-1]


_second_text: tuple[int, str] = (-1, "")


def clock(time_ns: int) -> str:
    """HH:MM:SS.mmm in local time; strftime once per second, not per event."""
    global _second_text
    second, ns = divmod(time_ns, 1_000_000_000)
    if _second_text[0] != second:
        _second_text = (second, dt.datetime.fromtimestamp(second).strftime("%H:%M:%S"))
    return f"{_second_text[1]}.{ns // 1_000_000:03d}"


def table_line(event: ev.Event) -> str:
    when = clock(event.time_ns)
    cells = (when, _clip(event.cgroup or f"id:{event.cgroup_id}", WIDTHS[1]), str(event.proc.pid),
             str(event.proc.ppid or "?"), safe(event.proc.comm))
    return " ".join(c.ljust(w) for c, w in zip(cells, WIDTHS)) + " " + describe(event)


def json_line(event: ev.Event) -> str:
    return event.to_json()


def alert_line(verdict) -> str:
    """A verdict for the console: when, how bad, which rule, what happened, what it asks for."""
    actions = f"  [actions: {', '.join(verdict.actions)}]" if verdict.actions else ""
    container = verdict.event.container
    where = f"  [{safe(container.describe())}]" if container else ""
    return f"{clock(verdict.time_ns)} {verdict.priority:<8} {verdict.rule}: {verdict.output}{where}{actions}"
