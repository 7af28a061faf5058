"""The syslog sink against a real rsyslogd on loopback: RFC 5424 with the key fields as
structured data, octet-counted over TCP; every alert arrives intact, agent text escaped, and
alerts sent while the server is down arrive when it is back."""

from __future__ import annotations

import re

import pytest

from helpers import free_port
from servers.rsyslog import Rsyslog

from ebpfmon.alerts.incidents import Alerting
from ebpfmon.config import AlertSettings, SinkSettings
from ebpfmon.rules.cases import make_event
from ebpfmon.rules.engine import Verdict

RFC5424 = re.compile(r"^<(\d+)>1 (\S+) (\S+) ebpfmon (\d+) (trigger|resolve|audit_head) \[ebpfmon@32473 (.*?)\] (.*)$")


@pytest.fixture
def rsyslog(tmp_path):
    server = Rsyslog(tmp_path / "rsyslog", free_port()).start()
    yield server
    server.stop()


def sd_params(text: str) -> dict[str, str]:
    """SD-PARAMs of one element, unescaped as RFC 5424 says."""
    params = {}
    for name, value in re.findall(r'(\w+)="((?:[^"\\\\]|\\\\.)*)"', text):
        params[name] = re.sub(r"\\\\(.)", r"\\1", value)
    return params


def alerting(tmp_path, port: int) -> Alerting:
    settings = AlertSettings(sinks=(SinkSettings(type="syslog", address=f"127.0.0.1:{port}", facility="authpriv",
                                                 timeout=5),))
    return Alerting(settings, tmp_path / "state", node="gpu-node-7").start()


def tunnel(agent: str) -> Verdict:
    argv = ["ssh", "-R", '8022:localhost:22 "quoted" ]bracket\\back', "x\u202e\nforged"]
    event = make_event({"exec": {"argv": argv, "cgroup": agent}}, 0)
    output = 'Reverse SSH tunnel (cmdline=ssh -R 8022:localhost:22 "quoted" ]bracket\\back x\\u202e\\x0aforged)'
    return Verdict("Reverse SSH tunnel", "CRITICAL", output, ["T1572"], ["cut_network"], True, agent, event)


def test_alerts_arrive_as_rfc5424_with_structured_data(tmp_path, rsyslog):
    a = alerting(tmp_path, rsyslog.port)
    try:
        a.verdict(tunnel("/ebpfmon-agents/a1"))
        a.resolve_agent("/ebpfmon-agents/a1", "was a test")
        trigger, resolve = rsyslog.messages(2)
    finally:
        a.close()
    match = RFC5424.match(trigger)
    assert match, trigger
    pri, timestamp, host, _, msgid, data, msg = match.groups()
    assert int(pri) == 10 * 8 + 2  # authpriv, critical
    assert re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$", timestamp) and host == "gpu-node-7"
    params = sd_params(data)
    assert params["rule"] == "Reverse SSH tunnel" and params["agent"] == "/ebpfmon-agents/a1"
    assert params["actions"] == "cut_network" and params["incident"].startswith("ebpfmon-")
    assert '"quoted" ]bracket\\back' in msg  # intact
    assert "\u202e" not in trigger and "\\u202e" in msg and "\\x0aforged" in msg  # escaped: one line, no reversal
    assert RFC5424.match(resolve).group(5) == "resolve"
    assert sd_params(RFC5424.match(resolve).group(6))["incident"] == params["incident"]


def test_alerts_sent_while_the_server_is_down_arrive_when_it_is_back(tmp_path, rsyslog):
    a = alerting(tmp_path, rsyslog.port)
    try:
        a.verdict(tunnel("/ebpfmon-agents/before"))
        assert len(rsyslog.messages(1)) == 1
        rsyslog.stop()
        for n in range(3):
            a.verdict(tunnel(f"/ebpfmon-agents/during-{n}"))
        rsyslog.start()
        got = rsyslog.messages(4, timeout=60)
    finally:
        a.close()
    agents = [sd_params(RFC5424.match(m).group(6))["agent"] for m in got if RFC5424.match(m)]
    assert sorted(agents) == ["/ebpfmon-agents/before", "/ebpfmon-agents/during-0", "/ebpfmon-agents/during-1",
                              "/ebpfmon-agents/during-2"]  # none lost, none twice


def test_over_tls_verified_against_the_configured_ca(tmp_path):
    import socket
    import ssl
    import subprocess
    import threading

    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True)
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(cert, key)
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    received = []

    def serve():
        conn, _ = listener.accept()
        with server.wrap_socket(conn, server_side=True) as tls:
            data = b""
            while chunk := tls.recv(65536):
                data += chunk
                length, _, rest = data.partition(b" ")
                if length.isdigit() and len(rest) >= int(length):
                    received.append(rest[:int(length)].decode())
                    break

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    settings = AlertSettings(sinks=(SinkSettings(type="syslog", address=f"127.0.0.1:{port}", tls=True,
                                                 tls_ca_file=str(cert), timeout=5),))
    a = Alerting(settings, tmp_path / "state", node="gpu-node-7").start()
    try:
        a.verdict(tunnel("/ebpfmon-agents/tls"))
        thread.join(timeout=20)
    finally:
        a.close()
        listener.close()
    assert len(received) == 1 and RFC5424.match(received[0])
    assert sd_params(RFC5424.match(received[0]).group(6))["agent"] == "/ebpfmon-agents/tls"


def test_the_audit_chain_head_goes_to_syslog_and_not_to_the_pager(tmp_path, rsyslog):
    from servers.pagerduty import FakePagerDuty

    pagerduty = FakePagerDuty()
    settings = AlertSettings(sinks=(SinkSettings(type="syslog", address=f"127.0.0.1:{rsyslog.port}", timeout=5),
                                    SinkSettings(type="pagerduty", url=pagerduty.url, routing_key="k")))
    a = Alerting(settings, tmp_path / "state", node="gpu-node-7").start()
    try:
        a.chain_head("0123456789abcdef0123456789abcdef", 77, "/var/lib/ebpfmon/audit/events.jsonl")
        a.verdict(tunnel("/ebpfmon-agents/after-head"))  # behind it in the same queue
        got = rsyslog.messages(2)
        assert len(pagerduty.wait(1)) == 1  # the pager got the alert only
    finally:
        a.close()
        pagerduty.close()
    head = RFC5424.match(got[0])
    assert head and head.group(5) == "audit_head"
    assert sd_params(head.group(6)) == {"hash": "0123456789abcdef0123456789abcdef", "records": "77",
                                        "file": "/var/lib/ebpfmon/audit/events.jsonl"}
    assert "Reverse SSH tunnel" in pagerduty.accepted[0]["payload"]["summary"]
