"""systemd's notify protocol (sd_notify(3)): a datagram to $NOTIFY_SOCKET.

READY=1 once probes and enforcement are attached, WATCHDOG=1 from the event
loop, STOPPING=1 on the way out. Without $NOTIFY_SOCKET (not under systemd)
every call does nothing.
"""

from __future__ import annotations

import os
import socket


def notify(state: str) -> bool:
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):  # abstract namespace
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.sendto(state.encode(), address)
    return True


def watchdog_interval() -> float | None:
    """Seconds between WATCHDOG=1 pings (half what systemd allows), or None."""
    usec = os.environ.get("WATCHDOG_USEC")
    if not usec or os.environ.get("WATCHDOG_PID", str(os.getpid())) != str(os.getpid()):
        return None
    return int(usec) / 2e6
