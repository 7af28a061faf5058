"""The node's events to the fleet, end to end: the daemon on the real kernel exports the exec
events of the agents its NATS sink asks for to a real nats-server with JetStream on loopback;
with the server down, then the daemon stopped and started again, then the server back:
every event once."""

from __future__ import annotations

import collections

from helpers import DaemonProcess, free_port, make_agent_cgroup, scrape, value, wait_for
from servers.nats import NatsServer

MARKED = "for i in 1 2 3; do /bin/true {name}-$i; done"


def marks(stored) -> collections.Counter:
    return collections.Counter(p["argv"][1] for s, _, p in stored
                               if s.endswith(".event.exec") and p["argv"][:1] == ["/bin/true"])


def test_exec_events_of_the_chosen_agents_reach_nats_across_a_server_outage_and_a_daemon_restart(
        bpf, hierarchy, own_root, tmp_path):
    server = NatsServer(tmp_path / "nats", free_port()).start()
    port = free_port()
    state = tmp_path / "state"
    state.mkdir()
    (state / "config.yaml").write_text(f"""
metrics: {{listen: "127.0.0.1:{port}"}}
alerts:
  sinks:
    - {{type: nats, url: "{server.url}", timeout: 3, events: [exec], event_agents: ["{own_root}/chosen-*"]}}
""")
    chosen = make_agent_cgroup(hierarchy, own_root, prefix="chosen")
    other = make_agent_cgroup(hierarchy, own_root, prefix="other")
    daemon = DaemonProcess(own_root, str(state))
    try:
        for agent, name in ((chosen, "up"), (other, "elsewhere")):
            assert agent.run(["/bin/sh", "-c", MARKED.format(name=name)]).returncode == 0
        assert marks(server.stored(count=4, timeout=30)) == {"up-1": 1, "up-2": 1, "up-3": 1}
        server.stop()
        assert chosen.run(["/bin/sh", "-c", MARKED.format(name="down")]).returncode == 0
        audit = state / "audit" / "events.jsonl"
        wait_for(lambda: b"down-3" in audit.read_bytes(), "down-3 in the audit log (not yet exported)")
        assert daemon.stop() == 0
        daemon = DaemonProcess(own_root, str(state))
        assert chosen.run(["/bin/sh", "-c", MARKED.format(name="restarted")]).returncode == 0
        wait_for(lambda: value(scrape(port), "ebpfmon_event_export_failures_total", sink="nats") >= 1,
                 "the restarted daemon's exporter finding the server down")
        server.start()
        stored = server.stored(count=12, timeout=60)
        # the restarted daemon's exporter: what waited in the log and what came since, after failing rounds
        def counted():
            m = scrape(port)
            return m if value(m, "ebpfmon_events_exported_total", sink="nats") >= 8 else None
        metrics = wait_for(counted, "the exporter's count")
    finally:
        daemon.stop()
        server.stop()
    assert value(metrics, "ebpfmon_events_exported_total", sink="nats") == 8  # down (sh and 3), restarted (same)
    assert value(metrics, "ebpfmon_event_export_gaps_total", sink="nats") == 0
    assert value(metrics, "ebpfmon_event_export_behind_bytes", sink="nats") == 0
    assert marks(stored) == {f"{name}-{i}": 1 for name in ("up", "down", "restarted") for i in (1, 2, 3)}
    sh = [p for s, _, p in stored if s.endswith(".event.exec") and p["argv"][:1] == ["/bin/sh"]]
    assert {p["cgroup"] for p in sh} == {chosen.name} and all(p["node"] for p in sh)
