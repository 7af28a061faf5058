"""A real rsyslogd for tests: TCP on loopback (imtcp, which takes RFC 6587 octet-counted
frames), every message written raw, one per line, to a file; no other input (not /dev/log)."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

from servers.listening import wait_listening

RSYSLOGD = shutil.which("rsyslogd") or "/usr/sbin/rsyslogd"


class Rsyslog:
    def __init__(self, directory: Path, port: int):
        self.directory, self.port = directory, port
        directory.mkdir(parents=True, exist_ok=True)
        self.out = directory / "messages"
        self.conf = directory / "rsyslog.conf"
        self.conf.write_text(f"""
global(workDirectory="{directory}")
module(load="imtcp")
input(type="imtcp" address="127.0.0.1" port="{port}")
template(name="raw" type="string" string="%rawmsg%\\n")
*.* action(type="omfile" file="{self.out}" template="raw")
""")
        self.proc: subprocess.Popen | None = None

    def start(self) -> "Rsyslog":
        self.proc = subprocess.Popen([RSYSLOGD, "-n", "-f", str(self.conf), "-i", str(self.directory / "pid")],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        wait_listening(self.proc, self.port, "rsyslogd")
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)

    def messages(self, count: int, timeout: float = 20.0) -> list[str]:
        """The messages received, once count of them are in (or the time is up)."""
        deadline = time.monotonic() + timeout
        while True:
            lines = self.out.read_text(errors="replace").splitlines() if self.out.exists() else []
            if len(lines) >= count or time.monotonic() > deadline:
                return lines
            time.sleep(0.05)
