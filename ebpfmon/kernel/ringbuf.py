"""The BPF ring buffer read straight from its shared memory.

bcc's consumer (libbpf's ring_buffer__poll) calls back into Python through a
ctypes trampoline for every record, and that machinery (the callback, bcc's
wrapper around it, ctypes.string_at) costs more than the record's own work.
This reader maps the ring buffer as libbpf does; its loop over the records is
C (ebpfmon/kernel/_ringbuf.c, libbpf's own loop with a Python callback), in
the same order and with the same guarantees. What each step saved is in
bench/README.md.

The layout is the kernel's (kernel/bpf/ringbuf.c; libbpf's src/ringbuf.c reads
it the same way): page 0 holds the consumer position (ours to write), page 1
the producer position, then the data pages, mapped twice in a row so a record
that wraps around the end reads as one piece. Each record starts with an
8-byte header: its length, with a busy bit while the producer is still writing
it and a discard bit for a record given up; records are 8-byte aligned.
"""

from __future__ import annotations

import mmap
import select
import struct
from collections.abc import Callable

from ebpfmon.kernel._ringbuf import Consumer

HEADER_SIZE = 8  # a record's length and flags, before its bytes
POSITION = struct.Struct("=Q")  # the consumer's and the producer's positions, at the start of their pages


class RingBufferReader:
    def __init__(self, map_fd: int, data_size: int, callback: Callable[[bytes], object]):
        if data_size <= 0 or data_size & (data_size - 1) or data_size % mmap.PAGESIZE:
            raise ValueError(f"ring buffer size {data_size} is not a power of two of whole pages")
        page = mmap.PAGESIZE
        self.consumer = mmap.mmap(map_fd, page, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        # producer page, then the data twice
        self.producer = mmap.mmap(map_fd, page + 2 * data_size, mmap.MAP_SHARED, mmap.PROT_READ, offset=page)
        self.records = Consumer(self.consumer, self.producer, page, data_size, callback)
        self.epoll = select.epoll()
        self.epoll.register(map_fd, select.EPOLLIN)

    def poll(self, timeout_ms: int) -> int:
        """Waits up to timeout_ms for a wakeup, then hands every record there is to the
        callback (woken or not: records submitted without a wakeup are taken too)."""
        self.epoll.poll(timeout_ms / 1000)
        return self.records.consume()

    def behind(self) -> bool:
        """Whether records are there that the last consume did not take: a record reserved and
        not yet submitted stops it (on another CPU, mid-write), and the rest wait behind it.
        Submitted within the wakeup window, such a record wakes no one."""
        return POSITION.unpack_from(self.producer)[0] != POSITION.unpack_from(self.consumer)[0]

    def consume(self) -> int:
        """Every record there is now, in order; returns how many. Each record's space is
        given back as soon as it is copied out, before the callback runs (as libbpf does)."""
        return self.records.consume()

    def close(self) -> None:
        self.epoll.close()
        self.records.close()  # a map with views into it cannot close
        self.consumer.close()
        self.producer.close()
