"""Decoding records built with the ctypes mirror: every kind, and malformed input."""

import ctypes
import errno

import pytest

from ebpfmon.stream.decode import CgroupChange, Decoder, dns_query_name
from ebpfmon.errors import DecodeError
from ebpfmon.kernel import abi


def header(kind, size, flags=0):
    return abi.EventHeader(kind=kind, flags=flags, size=size, time_ns=5_000_000_000, cgroup_id=77, pid=100,
                           tid=101, ppid=99, uid=1000, gid=1000, comm=b"agent")


def exec_record(args: list[bytes], flags=0) -> bytes:
    packed = b"".join(a + b"\0" for a in args)
    e = abi.ExecEvent(retval=-errno.EACCES, argc=len(args), args_size=len(packed), syscall=1,
                      filename=b"/usr/bin/ssh")
    size = abi.ExecEvent.args.offset + len(packed)
    e.hdr = header(abi.EventKind.EXEC, size, flags)
    raw = bytes(e)[:abi.ExecEvent.args.offset] + packed
    return raw


def test_exec_record_whose_argv_the_probe_could_not_read():
    event = Decoder().decode(exec_record([], abi.EVENT_F_ARGV_UNREADABLE))
    assert event.argv == [] and event.argv_truncated is True and event.argv_source == "none"


def test_exec_record():
    d = Decoder()
    event = d.decode(exec_record([b"ssh", b"-R", b"", b"\xff"], abi.EVENT_F_ARG_TRUNCATED))
    assert event.kind == "exec"
    assert event.argv == ["ssh", "-R", "", "\udcff"]  # empty arguments are kept
    assert event.argv_truncated is True
    assert event.argv_source == "kernel"
    assert event.retval == -errno.EACCES and event.error == "EACCES"
    assert event.syscall == "execveat"
    assert (event.proc.pid, event.proc.tid, event.proc.ppid, event.proc.uid) == (100, 101, 99, 1000)
    assert event.proc.comm == "agent"
    assert event.cgroup_id == 77
    assert event.time_ns == 5_000_000_000 + d.clock_offset


def sockaddr_record(kind, family, addr: bytes, port, payload=b"", sock_type=1):
    e = abi.SockaddrEvent(retval=0, fd=3, family=family, dport=port, sock_type=sock_type, length=len(payload),
                          payload_len=len(payload))
    ctypes.memmove(e.addr, addr, len(addr))
    ctypes.memmove(e.payload, payload, len(payload))
    size = abi.SockaddrEvent.payload.offset + len(payload)
    e.hdr = header(kind, size)
    return bytes(e)[:size]


def test_connect_records():
    d = Decoder()
    v4 = d.decode(sockaddr_record(abi.EventKind.CONNECT, 2, bytes([192, 0, 2, 7]), 3333))
    assert (v4.family, v4.address, v4.port, v4.sock_type, v4.protocol) == ("inet", "192.0.2.7", 3333,
                                                                           "stream", "tcp")
    mapped = bytes(10) + b"\xff\xff" + bytes([198, 51, 100, 1])
    v6 = d.decode(sockaddr_record(abi.EventKind.CONNECT, 10, mapped, 443, sock_type=0))
    assert (v6.family, v6.address, v6.sock_type, v6.protocol) == ("inet6", "198.51.100.1", None, None)


def test_unix_connect_records_carry_the_path_as_given():
    d = Decoder()
    named = d.decode(sockaddr_record(abi.EventKind.UNIX_CONNECT, 1, b"", 0, b"/var/run/docker.sock\0"))
    assert (named.kind, named.path, named.resolved, named.fd) == ("unix_connect", "/var/run/docker.sock", "", 3)
    abstract = d.decode(sockaddr_record(abi.EventKind.UNIX_CONNECT, 1, b"", 0, b"\0containerd-shim\0\0"))
    assert abstract.path == "@containerd-shim"
    odd = d.decode(sockaddr_record(abi.EventKind.UNIX_CONNECT, 1, b"", 0, b"run/\xffsock"))  # not NUL-ended
    assert odd.path == "run/\udcffsock"


def test_udp_dns_record():
    query = bytes(12) + b"\x04pool\x07example\x03com\x00\x00\x01\x00\x01"
    event = Decoder().decode(sockaddr_record(abi.EventKind.UDP_SEND, 2, bytes([127, 0, 0, 1]), 53, query, 2))
    assert event.kind == "udp_send"
    assert event.dns_query == "pool.example.com"
    assert event.length == len(query)


def test_cgroup_record():
    c = abi.CgroupEvent(id=555, level=2, path=b"/ebpfmon-agents/a1")
    c.hdr = header(abi.EventKind.CGROUP_MKDIR, ctypes.sizeof(c))
    change = Decoder().decode(bytes(c))
    assert change == CgroupChange(True, 555, "/ebpfmon-agents/a1")


@pytest.mark.parametrize("record,message", [
    (b"\x01\x00", "shorter than an event header"),
    (bytes(header(1, 9999)), "says it has 9999 bytes but has"),
    (bytes(header(42, ctypes.sizeof(abi.EventHeader))), "unknown event kind 42"),
    # connect records (decoded in C) whose sizes do not add up go to the Python checks
    (bytes(header(abi.EventKind.CONNECT, ctypes.sizeof(abi.EventHeader) + 8)) + bytes(8),
     "connect record of 72 bytes is shorter than its fixed part"),
    (bytes(header(abi.EventKind.UDP_SEND, 4096)) + bytes(abi.SockaddrEvent.payload.offset),
     "says it has 4096 bytes but has"),
])
def test_malformed_records(record, message):
    with pytest.raises(DecodeError, match=message):
        Decoder().decode(record)


@pytest.mark.parametrize("payload,name", [
    (bytes(12) + b"\x03abc\x00", "abc"),
    (bytes(12) + b"\x03ab", None),  # cut inside a label
    (bytes(12) + b"\x40" + b"a" * 64, None),  # label longer than 63
    (bytes(5), None),
    (bytes(12) + b"\x00", None),  # root only
])
def test_dns_query_name(payload, name):
    assert dns_query_name(payload) == name


def test_text_caches_stay_right_and_bounded():
    from ebpfmon.stream.decode import TEXT_CACHE_MAX

    d = Decoder()
    for i in range(TEXT_CACHE_MAX + 10):
        record = bytearray(sockaddr_record(abi.EventKind.CONNECT, 2, (i % 65536).to_bytes(4, "big"), 80))
        comm = f"c{i}".encode()
        record[abi.EventHeader.comm.offset:abi.EventHeader.comm.offset + len(comm) + 1] = comm + b"\0"
        event = d.decode(bytes(record))
        assert event.proc.comm == f"c{i}" and event.address == f"0.0.{i >> 8 & 255}.{i & 255}"
    assert len(d._comms) <= TEXT_CACHE_MAX and len(d._sockets) <= TEXT_CACHE_MAX
    again = d.decode(sockaddr_record(abi.EventKind.CONNECT, 2, bytes([192, 0, 2, 7]), 22, sock_type=2))
    assert (again.address, again.sock_type, again.protocol, again.proc.comm) == ("192.0.2.7", "dgram", "udp", "agent")


def fields_of(event) -> dict:
    data = {"kind": event.kind, **vars(event)}
    data["proc"] = vars(event.proc)
    return data


COMMON = {"time_ns": 5_000_000_000, "cgroup_id": 77, "cgroup": None, "ancestry": [], "container": None,
          "proc": {"pid": 100, "tid": 101, "ppid": 99, "uid": 1000, "gid": 1000, "comm": "agent", "exe": None,
                   "argv": None}}


def test_every_field_of_the_frequent_kinds_lands_in_its_place():
    """Their builders pass fields by position (decode.py): a value in the wrong place shows here."""
    d = Decoder()
    offset = d.clock_offset
    connect = bytearray(sockaddr_record(abi.EventKind.CONNECT, 2, bytes([192, 0, 2, 7]), 3333))
    e = abi.SockaddrEvent.from_buffer_copy(connect + bytes(ctypes.sizeof(abi.SockaddrEvent) - len(connect)))
    e.retval, e.fd, e.protocol, e.hdr.flags = -errno.ECONNREFUSED, 7, 6, abi.EVENT_F_FROM_HOOK
    udp = sockaddr_record(abi.EventKind.UDP_SEND, 10, bytes([32, 1, 13, 184] + [0] * 11 + [1]), 53,
                          bytes(12) + b"\x01a\x00", sock_type=2)
    gpu = abi.GpuOpenEvent(retval=5, dfd=-100, flags=2, syscall=2, path=b"/dev/nvidia0")
    gpu.hdr = header(abi.EventKind.GPU_OPEN, ctypes.sizeof(gpu), abi.EVENT_F_PATH_TRUNCATED)
    fork = abi.ForkEvent(child_pid=4242, parent_pid=100)
    fork.hdr = header(abi.EventKind.FORK, ctypes.sizeof(fork))
    exit_ = abi.ExitEvent()
    exit_.hdr = header(abi.EventKind.EXIT, ctypes.sizeof(exit_))
    expected = [
        (bytes(e)[:len(connect)], {"kind": "connect", "family": "inet", "address": "192.0.2.7", "port": 3333,
                                    "sock_type": "stream", "protocol": "tcp", "retval": -errno.ECONNREFUSED,
                                    "fd": 7, "source": "cgroup_hook"}),
        (udp, {"kind": "udp_send", "family": "inet6", "address": "2001:db8::1", "port": 53, "sock_type": "dgram",
               "protocol": "udp", "retval": 0, "fd": 3, "source": "syscall", "length": 15, "dns_query": "a"}),
        (exec_record([b"ssh", b"-R"], abi.EVENT_F_ARGV_TRUNCATED),
         {"kind": "exec", "filename": "/usr/bin/ssh", "argv": ["ssh", "-R"], "retval": -errno.EACCES,
          "argv_truncated": True, "syscall": "execveat", "argv_source": "kernel", "ssh_config": [], "exe_is": [], "loader": None,
          "found_at_start": False}),
        (bytes(gpu), {"kind": "gpu_open", "path": "/dev/nvidia0", "flags": 2, "access": "rw", "retval": 5,
                      "device": None, "vendor": None, "path_truncated": True, "syscall": "openat2"}),
        (bytes(fork), {"kind": "fork", "child_pid": 4242}),
        (bytes(exit_), {"kind": "exit"}),
    ]
    for record, fields in expected:
        want = {**COMMON, **fields, "time_ns": 5_000_000_000 + offset}
        assert fields_of(d.decode(record)) == want


def test_each_builder_takes_its_records_fields_in_their_order():
    """Builders get the fixed part's values by position: a parameter out of the record's order
    would take another field's value, silently."""
    import inspect

    from ebpfmon.stream.decode import BODIES

    d = Decoder()
    for kind, (_, names) in BODIES.items():
        build = d.kinds[kind.value][1]
        if build is None:  # decoded in C (test_every_field_of_the_frequent_kinds_lands_in_its_place)
            assert kind in (abi.EventKind.CONNECT, abi.EventKind.UDP_SEND), kind
            continue
        parameters = list(inspect.signature(build).parameters)
        assert parameters[:5] == ["time_ns", "cgroup_id", "proc", "hdr_flags", "record"], kind
        assert tuple(parameters[5:]) == names, kind


def test_the_c_decoder_reads_the_layout_the_python_mirror_knows():
    """ebpfmon/stream/_decode.c reads records through probes/events.h, abi.py through its mirror."""
    from ebpfmon.stream import _decode
    from ebpfmon.stream.decode import BODIES, HEADER_SIZE

    assert _decode.SOCKADDR_FIXED == abi.SockaddrEvent.payload.offset == \
        HEADER_SIZE + BODIES[abi.EventKind.CONNECT][0].size


def test_records_that_are_not_bytes_decode_the_same():
    record = sockaddr_record(abi.EventKind.CONNECT, 2, bytes([192, 0, 2, 7]), 443)
    d = Decoder()
    as_bytes, as_bytearray = d.decode(record), d.decode(bytearray(record))
    assert fields_of(as_bytes) == fields_of(as_bytearray) and as_bytes.address == "192.0.2.7"


def test_decoding_keeps_no_object_alive_past_its_event():
    """Reference counts in the C decoder: a million connects would show a leak of one object each."""
    import gc
    import sys
    import tracemalloc

    d = Decoder()
    records = [sockaddr_record(kind, 2, bytes([192, 0, 2, i % 4]), 53, bytes(12) + b"\x01a\x00", sock_type=2)
               for i in range(8) for kind in (abi.EventKind.CONNECT, abi.EventKind.UDP_SEND)]
    for record in records:  # fill the caches first
        d.decode(record)
    gc.collect()
    cached = list(d._sockets.values()) + list(d._comms.values())
    references = [sys.getrefcount(value) for value in cached]
    # only what this file's calls allocate: other threads of the session (a daemon that a
    # kernel test left running) allocate too, and would be counted
    here = [tracemalloc.Filter(True, __file__)]
    tracemalloc.start()
    try:
        before = tracemalloc.take_snapshot().filter_traces(here)
        for _ in range(2000):
            for record in records:
                d.decode(record)
        gc.collect()
        after = tracemalloc.take_snapshot().filter_traces(here)
        grown = sum(stat.size_diff for stat in after.compare_to(before, "filename"))
    finally:
        tracemalloc.stop()
    assert grown < 32 * 1024, f"{grown} bytes left after decoding {2000 * len(records)} records"
    assert [sys.getrefcount(value) for value in cached] == references  # the caches' text
