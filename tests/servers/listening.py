"""Waiting for a test server process to listen on its loopback port."""

from __future__ import annotations

import socket
import subprocess
import time


def wait_listening(proc: subprocess.Popen, port: int, name: str, timeout: float = 15.0) -> None:
    """Returns once 127.0.0.1:port takes connections; RuntimeError when the process exits first
    or the time is up."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            if proc.poll() is not None:
                output = proc.stdout.read().decode(errors="replace") if proc.stdout else ""
                raise RuntimeError(f"{name} exited: {output}")
            time.sleep(0.05)
    raise RuntimeError(f"{name} did not listen on 127.0.0.1:{port}")
