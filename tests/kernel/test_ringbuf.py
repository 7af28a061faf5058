"""The ring buffer readers: records straight from shared memory (ebpfmon/kernel/ringbuf.py)
and bcc's consumer deliver the same records, in order, across many wraps of a small ring."""

from __future__ import annotations

import subprocess
import sys
import threading

import pytest

from helpers import line_of, make_agent_cgroup, wait_for
from ebpfmon.stream.decode import Decoder
from ebpfmon.kernel import abi
from ebpfmon.kernel.probeset import ProbeSet

BATCH = 100  # connect records of 96 bytes: 9.6 KB, less than the 16 KB ring, so none is lost
BATCHES = 6  # 57.6 KB through a 16 KB ring: it wraps three times
FIRST_PORT = 21000

# connects to closed loopback ports, one batch each time a line comes in on stdin
CONNECTOR = f"""
import socket, sys
port = {FIRST_PORT}
for line in sys.stdin:
    for _ in range({BATCH}):
        s = socket.socket()
        s.connect_ex(("127.0.0.1", port))
        s.close()
        port += 1
    print("done", flush=True)
"""


@pytest.mark.parametrize("reader", ["mmap", "bcc"])
def test_records_arrive_whole_and_in_order_across_wraps(reader, agent_cgroup):
    decoder = Decoder()
    ports = []

    def take(record: bytes) -> None:
        event = decoder.decode(record)
        if getattr(event, "kind", None) == "connect" and event.cgroup_id == agent_cgroup.id:
            ports.append(event.port)

    probes = ProbeSet({"connect"}, ringbuf_pages=4, ring_reader=reader).load()
    try:
        probes.add_scope(agent_cgroup.id)
        probes.open_ring_buffer(take)
        proc = agent_cgroup.popen([sys.executable, "-c", CONNECTOR], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True)
        try:
            for batch in range(1, BATCHES + 1):
                proc.stdin.write("go\n")
                proc.stdin.flush()
                assert line_of(proc.stdout) == "done\n"
                for _ in range(100):
                    if len(ports) >= batch * BATCH:
                        break
                    probes.poll(50)
        finally:
            proc.stdin.close()
            proc.wait(timeout=30)
        lost = probes.counters()[abi.EventKind.CONNECT][abi.Counter.LOST]
    finally:
        probes.close()
    assert lost == 0
    assert ports == list(range(FIRST_PORT, FIRST_PORT + BATCH * BATCHES))


FLOOD_BATCH = 5_000  # records of 96 bytes: 480 KB, under half the 1 MiB ring
FLOOD_BATCHES = 20  # 100k records: the ring wraps about ten times
FLOODER = f"""
import socket, sys
for line in sys.stdin:
    for _ in range({FLOOD_BATCH}):
        s = socket.socket()
        s.connect_ex(("127.0.0.1", 9))
        s.close()
    print("done", flush=True)
"""


@pytest.mark.parametrize("reader", ["mmap", "bcc"])
def test_a_reader_that_keeps_up_loses_nothing(reader, hierarchy, own_root):
    # 100k records through a 1 MiB ring, a batch at a time, each one taken before the next is
    # written (so however slow the reader, the ring is never near full): the kernel must never
    # see a wrong consumer position (struct.pack_into zeroing it before the store lost ~1
    # record in 2,500 once the ring had wrapped). A root of its own: the session's monitor,
    # which judges everything under the test root, would compete with this reader for the GIL.
    agent_cgroup = make_agent_cgroup(hierarchy, own_root)
    seen = [0]
    probes = ProbeSet({"connect"}, ringbuf_pages=256, ring_reader=reader).load()
    stop = threading.Event()

    def read() -> None:
        while not stop.is_set():
            probes.poll(5)

    try:
        probes.add_scope(agent_cgroup.id)
        probes.open_ring_buffer(lambda record: seen.__setitem__(0, seen[0] + (record[0] == abi.EventKind.CONNECT)))
        thread = threading.Thread(target=read)
        thread.start()
        flooder = agent_cgroup.popen([sys.executable, "-c", FLOODER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True)
        try:
            for batch in range(1, FLOOD_BATCHES + 1):
                flooder.stdin.write("go\n")
                flooder.stdin.flush()
                assert line_of(flooder.stdout, f"batch {batch} written") == "done\n"
                wait_for(lambda: seen[0] >= batch * FLOOD_BATCH, f"batch {batch} taken", 60)
        finally:
            flooder.stdin.close()
            flooder.wait(timeout=30)
            stop.set()
            thread.join(timeout=10)
        lost = probes.counters()[abi.EventKind.CONNECT][abi.Counter.LOST]
    finally:
        probes.close()
    assert (seen[0], lost) == (FLOOD_BATCH * FLOOD_BATCHES, 0)


def test_the_reader_knows_when_records_wait_behind_it(agent_cgroup):
    """The positions behind() compares: records written and not taken are behind the reader;
    once taken, none (a record still being written, which stops a consume, is the case this is
    for: it may be submitted without a wakeup)."""
    probes = ProbeSet({"connect"}, ringbuf_pages=4, ring_reader="mmap").load()
    try:
        probes.add_scope(agent_cgroup.id)
        probes.open_ring_buffer(lambda record: None)
        connect = "import socket; socket.socket().connect_ex(('127.0.0.1', 9))"
        assert agent_cgroup.run([sys.executable, "-c", connect]).returncode == 0
        assert probes._reader.behind()  # written, not yet taken
        assert probes.poll(0) is False  # all taken: none left behind
    finally:
        probes.close()
