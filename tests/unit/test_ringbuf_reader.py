"""The ring buffer reader's loop (ebpfmon/kernel/_ringbuf.c) on a ring laid out in memory as the
kernel lays it out: the kernel tests (tests/kernel/test_ringbuf.py) run it on real ring buffers."""

import struct

import pytest

from ebpfmon.kernel._ringbuf import Consumer
from ebpfmon.kernel.ringbuf import HEADER_SIZE

PAGE, SIZE = 4096, 4096
BUSY, DISCARD = 1 << 31, 1 << 30


def ring_with(records: list[tuple[bytes, int]], start: int = 0) -> tuple[bytearray, bytearray]:
    """(consumer page, producer page + data twice) holding records (bytes, header bits) from start."""
    ring = bytearray(PAGE + 2 * SIZE)
    position = start
    for data, bits in records:
        for copy in (0, SIZE):  # the data pages are mapped twice in a row
            offset = PAGE + copy + (position & (SIZE - 1))
            struct.pack_into("I", ring, offset, len(data) | bits)
            ring[offset + HEADER_SIZE:offset + HEADER_SIZE + len(data)] = data
        position += (len(data) + HEADER_SIZE + 7) & ~7
    struct.pack_into("Q", ring, 0, position)
    consumer = bytearray(8)
    struct.pack_into("Q", consumer, 0, start)
    return consumer, ring


def test_records_come_in_order_and_their_space_is_given_back():
    consumer, ring = ring_with([(b"one", 0), (b"dropped", DISCARD), (b"three!!!!", 0)])
    seen = []
    assert Consumer(consumer, bytes(ring), PAGE, SIZE, seen.append).consume() == 2
    assert seen == [b"one", b"three!!!!"]
    assert struct.unpack("Q", consumer)[0] == struct.unpack_from("Q", ring)[0]


def test_a_record_still_being_written_holds_back_the_ones_behind_it():
    consumer, ring = ring_with([(b"a", 0), (b"b", BUSY), (b"c", 0)])
    seen = []
    assert Consumer(consumer, bytes(ring), PAGE, SIZE, seen.append).consume() == 1
    assert seen == [b"a"] and struct.unpack("Q", consumer)[0] == 16


def test_a_record_across_the_end_of_the_ring_reads_whole():
    big = bytes(range(256)) * 4
    consumer, ring = ring_with([(big, 0), (b"after", 0)], start=SIZE - 512)
    seen = []
    assert Consumer(consumer, bytes(ring), PAGE, SIZE, seen.append).consume() == 2
    assert seen == [big, b"after"]


def test_an_error_in_the_callback_stops_the_loop_past_its_record():
    consumer, ring = ring_with([(b"bad", 0), (b"next", 0)])

    def fail(record):
        raise RuntimeError(record)

    records = Consumer(consumer, bytes(ring), PAGE, SIZE, fail)
    with pytest.raises(RuntimeError, match="bad"):
        records.consume()
    assert struct.unpack("Q", consumer)[0] == 16  # the next consume() starts at "next"


def test_wrong_sizes_are_refused_and_a_closed_reader_says_so():
    consumer, ring = ring_with([])
    with pytest.raises(ValueError, match="not a power of two"):
        Consumer(consumer, bytes(ring), PAGE, 3000, print)
    with pytest.raises(ValueError, match="too short"):
        Consumer(consumer, bytes(ring[:PAGE + SIZE]), PAGE, SIZE, print)
    records = Consumer(consumer, bytes(ring), PAGE, SIZE, print)
    records.close()
    with pytest.raises(ValueError, match="closed"):
        records.consume()
