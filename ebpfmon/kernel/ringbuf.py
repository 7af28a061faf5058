"""The BPF ring buffer read straight from its shared memory.

bcc's consumer (libbpf's ring_buffer__poll) calls back into Python through a
ctypes trampoline for every record: at 10k events/s that machinery (the
callback, bcc's wrapper around it, ctypes.string_at) was a third of the
daemon's CPU. This reader maps the ring buffer as libbpf does and takes the
records with plain slices, in the same order and with the same guarantees.

The layout is the kernel's (kernel/bpf/ringbuf.c; libbpf's src/ringbuf.c reads
it the same way): page 0 holds the consumer position (ours to write), page 1
the producer position, then the data pages, mapped twice in a row so a record
that wraps around the end reads as one piece. Each record starts with an
8-byte header: its length, with a busy bit while the producer is still writing
it and a discard bit for a record given up; records are 8-byte aligned.

Ordering: the producer publishes a record by clearing its busy bit with a
release store; reading the header and then the data needs no fence on x86-64,
whose loads are not reordered with other loads. CPython has no acquire load
for other architectures, so there the probe set keeps bcc's consumer
(ebpfmon/kernel/probeset.py).
"""

from __future__ import annotations

import mmap
import select
from collections.abc import Callable

BUSY_BIT = 1 << 31
DISCARD_BIT = 1 << 30
HEADER_SIZE = 8
# Positions and lengths change under us (and ours is read by the kernel at any moment), so
# each is read or written as one native word, through memoryview casts: one load or store
# of the value and nothing else. (struct's standard sizes, "<Q", go byte by byte, and
# struct.pack_into zeroes its target before writing it, which let the kernel see a
# consumer position of 0: the ring looked full and records were lost at 50k/s.)
SIZE_MASK = DISCARD_BIT - 1  # a record's length without its busy and discard bits


class RingBufferReader:
    def __init__(self, map_fd: int, data_size: int, callback: Callable[[bytes], object]):
        if data_size <= 0 or data_size & (data_size - 1) or data_size % mmap.PAGESIZE:
            raise ValueError(f"ring buffer size {data_size} is not a power of two of whole pages")
        self.callback = callback
        self.mask = data_size - 1
        page = mmap.PAGESIZE
        self.consumer = mmap.mmap(map_fd, page, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self.consumer_position = memoryview(self.consumer).cast("Q")
        # producer page, then the data twice; offsets into it below are data offsets + page
        self.producer = mmap.mmap(map_fd, page + 2 * data_size, mmap.MAP_SHARED, mmap.PROT_READ, offset=page)
        self.producer_position = memoryview(self.producer)[:8].cast("Q")
        self.words = memoryview(self.producer).cast("I")  # a record's length: the word at its offset / 4
        self.data_start = page
        self.epoll = select.epoll()
        self.epoll.register(map_fd, select.EPOLLIN)

    def poll(self, timeout_ms: int) -> int:
        """Waits up to timeout_ms for a wakeup, then hands every record there is to the
        callback (woken or not: records submitted without a wakeup are taken too)."""
        self.epoll.poll(timeout_ms / 1000)
        return self.consume()

    def consume(self) -> int:
        """Every record there is now, in order; returns how many. Each record's space is
        given back as soon as it is copied out, before the callback runs (as libbpf does)."""
        consumer, producer, data = self.consumer_position, self.producer, self.data_start
        mask, callback, words, produced = self.mask, self.callback, self.words, self.producer_position
        position = consumer[0]
        taken = 0
        while True:
            end = produced[0]
            if position >= end:
                return taken
            while position < end:
                offset = data + (position & mask)
                length = words[offset >> 2]  # records are 8-byte aligned
                if length & BUSY_BIT:  # reserved, not yet submitted: the rest waits behind it
                    return taken
                size = length & SIZE_MASK
                start = offset + HEADER_SIZE
                record = None if length & DISCARD_BIT else producer[start:start + size]
                position += (size + HEADER_SIZE + 7) & ~7
                consumer[0] = position
                if record is not None:
                    callback(record)
                    taken += 1

    def close(self) -> None:
        self.epoll.close()
        for view in (self.consumer_position, self.producer_position, self.words):
            view.release()  # a map with views into it cannot close
        self.consumer.close()
        self.producer.close()
