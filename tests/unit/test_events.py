"""Events: the JSON form round-trips exactly, bytes included; bad input is refused clearly."""

import json

import pytest

from ebpfmon import events as ev


def sample_events():
    proc = ev.Process(pid=10, tid=11, ppid=1, uid=0, gid=0, comm="ag\udcffent", exe="/usr/bin/python3")
    ancestry = [ev.Ancestor(pid=1, comm="init", exe="/sbin/init", argv=["/sbin/init"]), ev.Ancestor(pid=7)]
    common = dict(time_ns=1_700_000_000_123_456_789, cgroup_id=42, cgroup="/ebpfmon-agents/a", proc=proc,
                  ancestry=ancestry)
    return [
        ev.ExecEvent(**common, filename="/bin/ssh", argv=["ssh", "-R", "caf\udce9"], retval=0,
                     argv_truncated=True),
        ev.ConnectEvent(**common, family="inet6", address="::1", port=3333, sock_type="stream",
                        protocol="tcp", retval=-111, fd=3),
        ev.UdpSendEvent(**common, address="192.0.2.1", port=53, sock_type="dgram", protocol="udp",
                        retval=30, length=30, dns_query="pool.example.com"),
        ev.GpuOpenEvent(**common, path="/dev/nvidia0", flags=2, access="rw", retval=-6, device="195:0",
                        vendor="nvidia"),
        ev.ForkEvent(**common, child_pid=12),
        ev.ExitEvent(**common),
    ]


@pytest.mark.parametrize("event", sample_events(), ids=lambda e: e.kind)
def test_json_round_trip(event):
    line = event.to_json()
    assert "\n" not in line
    back = ev.from_json(line)
    assert back == event
    assert type(back) is type(event)


def test_non_utf8_bytes_survive_json():
    event = sample_events()[0]
    back = ev.from_json(event.to_json())
    assert ev.raw_bytes(back.argv[2]) == b"caf\xe9"
    assert ev.raw_bytes(back.proc.comm) == b"ag\xffent"
    # the JSON text itself is plain ASCII
    assert event.to_json().isascii()


def test_non_ascii_text_is_escaped_not_written_raw():
    # a right-to-left override in an agent's argv must not reach a responder's terminal as is
    event = sample_events()[0]
    event.argv = ["sh", "-c", "echo \u202egnp.exe", "caf\u00e9"]
    line = event.to_json()
    assert line.isascii() and "\\u202e" in line
    assert ev.from_json(line) == event


def test_error_names():
    assert ev.error_name(0) is None
    assert ev.error_name(-2) == "ENOENT"
    assert ev.error_name(-115) == "EINPROGRESS"
    assert ev.error_name(-9999) == "E9999"


def test_unknown_kind_and_fields_are_refused():
    data = json.loads(sample_events()[0].to_json())
    with pytest.raises(ValueError, match="unknown event kind 'nope'"):
        ev.from_dict({**data, "kind": "nope"})
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['bogus'\] for a exec event"):
        ev.from_dict({**data, "bogus": 1})


def test_kind_groups_cover_every_agent_event():
    assert set(ev.KIND_GROUPS["all"]) == {"exec", "connect", "udp_send", "unix_connect", "gpu_open", "device", "refused",
                                          "dns"}
