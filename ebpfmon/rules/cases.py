"""Rule tests as data: events written in shorthand, and the rules they must (not) fire.

A case file is a YAML list:

    - case: ssh -R joined to its value
      events:
        - exec: {argv: [ssh, -R8080:localhost:80, host]}
      fires: [Reverse SSH tunnel]          # these fire on these events, and no other rule
      silent: [SSH tun device tunnel]      # none of these may fire (say what a case is about)
    - case: a pool port outside is refused
      events:
        - connect: {address: 203.0.113.9, port: 3333}
      fires:                               # an entry may also say what the verdict carries
        - {rule: Connection to a mining pool port, priority: WARNING, actions: [deny_connect]}
    - case: git over ssh
      events:
        - exec: {argv: [ssh, git@github.com, "git-upload-pack 'org/repo.git'"]}
      fires: []                            # empty: nothing at all may fire

Event shorthand: one key, the kind (exec, connect, udp_send, unix_connect, gpu_open), mapping
to the kind's fields (see ebpfmon/events.py) plus pid, ppid, comm, exe, uid,
cgroup, ancestry (list of {comm, exe, argv}), and at (seconds from the start
of the case). Sensible defaults fill the rest: one agent process in
/ebpfmon-agents/agent-1, events a millisecond apart.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from ebpfmon import events as ev
from ebpfmon.host.network import DEFAULT_INTERNAL_NETWORKS, NetworkClassifier
from ebpfmon.rules.engine import Engine, Verdict
from ebpfmon.rules.fields import Context
from ebpfmon.rules.ruleset import RuleSet

START_NS = 1_767_225_600 * 1_000_000_000  # 2026-01-01
PROC_KEYS = {"pid", "ppid", "comm", "exe", "uid", "gid", "tid"}
CASE_KEYS = {"case", "events", "fires", "silent", "config", "note"}
COMMON_KEYS = PROC_KEYS | {"cgroup", "ancestry", "at", "argv_of_process"}


@dataclass
class Case:
    name: str
    events: list[ev.Event]
    fires: list[str] | None  # None: not checked
    silent: list[str] = field(default_factory=list)
    source: str = ""
    config: dict[str, Any] = field(default_factory=dict)  # gpu_entitled, internal_networks
    # rule -> what its verdict must carry ("priority", "actions"), for the fires entries that say
    expected: dict[str, dict[str, Any]] = field(default_factory=dict)

    def context(self) -> Context:
        # routes of the machine running the tests must not change the verdicts
        networks = NetworkClassifier(self.config.get("internal_networks", DEFAULT_INTERNAL_NETWORKS),
                                     use_routes=False)
        return Context(gpu_entitled=tuple(self.config.get("gpu_entitled", ("*",))), networks=networks)

    def check(self, ruleset: RuleSet) -> tuple[list[Verdict], list[str]]:
        """Replays the events through a fresh engine; the verdicts and what went against expectations."""
        engine = Engine(ruleset, self.context())
        verdicts = [v for e in self.events for v in engine.evaluate(e)]
        fired = {v.rule for v in verdicts}
        failures = []
        for name in list(self.fires or []) + self.silent:
            if ruleset.get(name) is None:
                failures.append(f"names rule {name!r}, which is not loaded")
        if self.fires is not None:
            missing = [r for r in self.fires if r not in fired]
            if missing:
                failures.append(f"expected to fire {missing}, fired {sorted(fired)}")
            others = sorted(fired - set(self.fires))
            if others:
                failures.append(f"expected no rule to fire, fired {others}" if not self.fires else
                                f"fired {others} too (fires lists every rule that fires)")
        for name, want in self.expected.items():
            verdict = next((v for v in verdicts if v.rule == name), None)
            if verdict is None:
                continue  # missing: said above
            if "priority" in want and verdict.priority != str(want["priority"]).upper():
                failures.append(f"{name!r} fired at {verdict.priority}, expected {want['priority']}")
            if "actions" in want and list(verdict.actions) != list(want["actions"]):
                failures.append(f"{name!r} asked for {verdict.actions}, expected {want['actions']}")
        loud = [r for r in self.silent if r in fired]
        if loud:
            failures.append(f"expected silence from {loud}")
        return verdicts, failures


def make_event(spec: dict[str, Any], index: int) -> ev.Event:
    if not isinstance(spec, dict) or len(spec) != 1:
        raise ValueError(f"an event is one kind mapping to its fields, e.g. {{exec: {{argv: [ls]}}}}; got {spec!r}")
    kind, values = next(iter(spec.items()))
    cls = ev.EVENT_TYPES.get(kind)
    if cls is None or kind in ("fork", "exit"):
        raise ValueError(f"unknown event kind {kind!r}; use exec, connect, udp_send, unix_connect, gpu_open, refused, "
                         "device or dns")
    values = dict(values or {})
    argv = values.get("argv") if kind == "exec" else values.pop("argv_of_process", None)
    exe = values.pop("exe", None)
    if exe is None and argv:
        exe = argv[0] if argv[0].startswith("/") else f"/usr/bin/{argv[0]}"
    if kind == "exec":
        values.setdefault("filename", exe or "/usr/bin/true")
    comm = values.pop("comm", os.path.basename(exe or "agent")[:15])
    proc = ev.Process(pid=values.pop("pid", 1000), tid=values.pop("tid", values.get("pid", 1000)),
                      ppid=values.pop("ppid", 999), uid=values.pop("uid", 1000), gid=values.pop("gid", 1000),
                      comm=comm, exe=exe, argv=argv)
    ancestry = [ev.Ancestor(pid=998 - i, comm=a.get("comm"), exe=a.get("exe"), argv=a.get("argv"))
                for i, a in enumerate(values.pop("ancestry", None) or [{"comm": "bash", "exe": "/usr/bin/bash",
                                                                         "argv": ["bash"]}])]
    ancestry[0].pid = proc.ppid
    at = values.pop("at", index * 0.001)
    cgroup = values.pop("cgroup", "/ebpfmon-agents/agent-1")
    if kind in ("refused", "dns"):
        values.setdefault("agent", cgroup)
    if kind in ("connect", "udp_send"):
        address = values.get("address", "192.0.2.1")
        values.setdefault("family", "inet6" if ":" in address else "inet")
        values.setdefault("protocol", "udp" if kind == "udp_send" else "tcp")
        values.setdefault("sock_type", "dgram" if kind == "udp_send" else "stream")
    if kind == "gpu_open":
        values.setdefault("access", "rw")
    if isinstance(values.get("container"), dict):  # {id, name, image, labels}: as the runtime answered
        values["container"] = ev.Container(**{"id": "c0ffee" * 10 + "c0ff", "runtime": "podman", "known": True,
                                              **values["container"]})
    known = {f.name for f in fields(cls)} - {"kind"}  # the mapping's key says it
    unknown = set(values) - known
    if unknown:
        raise ValueError(f"unknown field(s) {sorted(unknown)} for a {kind} event; known: "
                         f"{sorted(known - {'proc', 'ancestry', 'cgroup_id', 'time_ns', 'cgroup'} | COMMON_KEYS)}")
    return cls(time_ns=START_NS + int(at * 1e9), cgroup_id=4242, cgroup=cgroup, proc=proc, ancestry=ancestry,
               **values)


def load_cases(path: Path) -> list[Case]:
    data = yaml.safe_load(Path(path).read_text()) or []
    cases = []
    for i, raw in enumerate(data):
        name = raw.get("case", f"case {i + 1}")
        where = f"{path}: case {name!r}"
        unknown = set(raw) - CASE_KEYS
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {sorted(unknown)}; known: {sorted(CASE_KEYS)}")
        try:
            events = [make_event(spec, n) for n, spec in enumerate(raw.get("events", []))]
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
        if not events:
            raise ValueError(f"{where}: no events")
        fires, expected = expectations(raw.get("fires"), where)
        cases.append(Case(name, events, fires, list(raw.get("silent", [])), where, dict(raw.get("config", {})),
                          expected))
    return cases


def expectations(fires: Any, where: str) -> tuple[list[str] | None, dict[str, dict[str, Any]]]:
    """A case's fires list: its rule names, and what the entries that are mappings expect."""
    if fires is None:
        return None, {}
    names, expected = [], {}
    for entry in fires:
        if isinstance(entry, dict):
            unknown = set(entry) - {"rule", "priority", "actions"}
            if unknown or "rule" not in entry:
                raise ValueError(f"{where}: a fires entry is a rule's name or {{rule: NAME, priority: P, actions: "
                                 f"[...]}}; got {entry!r}")
            names.append(entry["rule"])
            expected[entry["rule"]] = {k: entry[k] for k in ("priority", "actions") if k in entry}
        else:
            names.append(entry)
    return names, expected
