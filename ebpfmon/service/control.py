"""The daemon's control socket: `ebpfmon quarantine ...` and `ebpfmon reload` talk to it here.

A Unix stream socket in the state directory (itself 0700), 0600, root only
(checked again with SO_PEERCRED). One JSON request per connection, one JSON
answer: {"cmd": "list"} | {"cmd": "release", "agent": ..., "reason": ...} |
{"cmd": "cut", "agent": ..., "reason": ...} | {"cmd": "reload"} | {"cmd": "names"} (the addresses
agents' DNS names allow now) | {"cmd": "resume", "rule": ...} | {"cmd": "suspended"} (the breaker's) |
{"cmd": "gpu"} (grants and holders) | {"cmd": "gpu_grant", "agent": ..., "gpus": [...]} |
{"cmd": "gpu_revoke", "agent": ..., "gpus": [...] or null for all}.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import socketserver
import struct
import threading
from dataclasses import asdict
from pathlib import Path

from ebpfmon.containment.actions import Containment, wall_of
from ebpfmon.errors import ContainmentRefused
from ebpfmon.host.users import user_name

log = logging.getLogger(__name__)

SOCKET_NAME = "control.sock"


def socket_path(state_dir: str | Path) -> Path:
    return Path(state_dir) / SOCKET_NAME


def peer_uid(sock: socket.socket) -> int:
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", creds)[1]


def handle(containment: Containment, request: dict, by: str, reload=None) -> dict:
    """One request against the containment; the answer to send back."""
    cmd = request.get("cmd")
    try:
        if cmd == "reload" and reload is not None:
            ok, message = reload()
            return {"ok": ok, "message": message} if ok else {"ok": False, "error": message}
        if cmd == "list":
            return {"ok": True, "records": [asdict(r) for r in containment.store.records]}
        if cmd == "resume":
            rule = request.get("rule") or ""
            if not containment.breaker.resume(rule):
                suspended = ", ".join(repr(r) for r in containment.breaker.active()) or "none"
                return {"ok": False, "error": f"rule {rule!r} is not suspended (suspended: {suspended})"}
            return {"ok": True, "message": f"rule {rule!r} contains again"}
        if cmd == "suspended":
            return {"ok": True, "rules": {rule: {"since_ns": wall_of(s.since_ns), "until_ns": wall_of(s.until_ns),
                                                 "agents": s.agents}
                                          for rule, s in containment.breaker.active().items()}}
        if cmd == "names":
            return {"ok": True, "names": containment.enforcer.name_grant_list()}
        if cmd == "gpu":
            if request.get("scan"):
                containment.gpus.holders.scan(containment.agent_paths())
            return {"ok": True, "gpus": [asdict(g) for g in sorted(containment.gpus.devices.gpus.values(),
                                                                  key=lambda g: g.index)],
                    "grants": containment.gpus.listing(),
                    "holders": [holder_dict(h) for h in containment.gpus.holders.current()]}
        if cmd in ("gpu_grant", "gpu_revoke"):
            agent, names = request.get("agent") or "", request.get("gpus")
            if cmd == "gpu_grant":
                selection = containment.gpus.grant(agent, [str(n) for n in names or []], by)
            else:
                selection = containment.gpus.revoke(agent, None if names is None else [str(n) for n in names], by)
            agent = containment.gpus.agent_path(agent)
            beyond = containment.gpus.beyond_grants([agent])
            return {"ok": True, "agent": agent, "gpus": selection.describe(),
                    "quarantined": containment.store.active_for(agent) is not None,
                    "held_beyond": [holder_dict(h) for h in beyond]}
        if cmd in ("release", "cut"):
            agent, reason = request.get("agent") or "", request.get("reason") or ""
            if cmd == "cut" and not reason:
                return {"ok": False, "error": "a manual cut needs a reason"}
            record = (containment.release(agent, by, reason) if cmd == "release"
                      else containment.cut(agent, by, reason))
            return {"ok": True, "record": asdict(record)}
    except ContainmentRefused as e:
        return {"ok": False, "error": e.message}
    return {"ok": False, "error": f"unknown command {cmd!r}; known: list, release, cut, reload, names, "
                             f"resume, suspended, gpu, gpu_grant, gpu_revoke"}


def holder_dict(holder) -> dict:
    return {"agent": holder.agent, "pid": holder.pid, "comm": holder.comm, "fd": holder.fd, "path": holder.path,
            "device": holder.node.number, "node": holder.node.describe(), "access": holder.access}


class ControlServer:
    def __init__(self, containment: Containment, state_dir: str | Path, reload=None):
        self.path = socket_path(state_dir)
        containment_ = containment

        class Handler(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                uid = peer_uid(self.request)
                if uid != 0:
                    answer = {"ok": False, "error": "root only"}
                else:
                    try:
                        request = json.loads(self.rfile.readline())
                        answer = handle(containment_, request, f"{user_name(uid)} (control socket)", reload)
                    except ValueError as e:
                        answer = {"ok": False, "error": f"not a JSON request: {e}"}
                self.wfile.write(json.dumps(answer).encode() + b"\n")

        Path(self.path).parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        if self.path.exists():
            self.path.unlink()  # left by a daemon that died
        old_umask = os.umask(0o177)
        try:
            self.server = socketserver.ThreadingUnixStreamServer(str(self.path), Handler)
        finally:
            os.umask(old_umask)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, name="control", daemon=True)

    def start(self) -> "ControlServer":
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass


def request(state_dir: str | Path, message: dict, timeout: float = 10.0) -> dict | None:
    """Asks the running daemon; None when no daemon listens."""
    path = socket_path(state_dir)
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(str(path))
            sock.sendall(json.dumps(message).encode() + b"\n")
            with sock.makefile("rb") as f:
                return json.loads(f.readline())
    except (FileNotFoundError, ConnectionRefusedError):
        return None
