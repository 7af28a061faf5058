"""A real nats-server with JetStream for tests, on loopback, its store in a directory the test
made (so a restart keeps the stream), and a client that reads what the stream holds."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time
from pathlib import Path

from servers.listening import wait_listening

NATS_SERVER = shutil.which("nats-server") or "/usr/sbin/nats-server"


class NatsServer:
    def __init__(self, directory: Path, port: int):
        self.directory, self.port = directory, port
        self.url = f"nats://127.0.0.1:{port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> "NatsServer":
        self.proc = subprocess.Popen([NATS_SERVER, "-js", "-a", "127.0.0.1", "-p", str(self.port),
                                      "-sd", str(self.directory)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_listening(self.proc, self.port, "nats-server")
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)

    def stored(self, stream: str = "EBPFMON", count: int = 0, timeout: float = 20.0) -> list[tuple[str, dict, dict]]:
        """(subject, headers, payload) of every message in the stream (one for each JSON line of a
        message: an event export's message holds several), once count are there."""
        import json

        import nats

        async def read():
            client = await nats.connect(self.url)
            try:
                js = client.jetstream()
                info = await js.stream_info(stream)
                out = []
                for seq in range(info.state.first_seq, info.state.last_seq + 1):
                    msg = await js.get_msg(stream, seq)
                    out.extend((msg.subject, dict(msg.headers or {}), json.loads(line))
                               for line in msg.data.splitlines())
                return out
            finally:
                await client.close()

        deadline = time.monotonic() + timeout
        while True:
            try:
                got = asyncio.run(read())
            except Exception:  # the stream is not there yet
                got = []
            if len(got) >= count or time.monotonic() > deadline:
                return got
            time.sleep(0.1)
