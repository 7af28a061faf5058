"""The rule language: operators, fields, lists, macros, overrides, exceptions,
state, and errors that say file:line:col."""

from __future__ import annotations

import textwrap

import pytest

from ebpfmon.host.network import NetworkClassifier
from ebpfmon.rules.cases import make_event
from ebpfmon.rules.engine import Engine
from ebpfmon.rules.fields import ALL_KINDS, Context
from ebpfmon.errors import RuleLoadError
from ebpfmon.rules.loader import load_rules

RULE = """
- rule: r
  desc: a rule under test
  condition: {condition}
  output: "fired %proc.name"
  priority: WARNING
"""


def ruleset_from(tmp_path, text: str, name: str = "rules.yaml", extra: list | None = None):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return load_rules([path, *(extra or [])])


def fires(tmp_path, condition: str, event: dict, prelude: str = "") -> bool:
    ruleset = ruleset_from(tmp_path, prelude + RULE.format(condition=condition))
    engine = Engine(ruleset, Context(networks=NetworkClassifier(["10.0.0.0/8"], use_routes=False)))
    return bool(engine.evaluate(make_event(event, 0)))


SSH = {"exec": {"argv": ["ssh", "-R", "8080:localhost:80", "host"], "ancestry": [
    {"comm": "python3", "exe": "/usr/bin/python3", "argv": ["python3", "agent.py"]},
    {"comm": "bash", "exe": "/usr/bin/bash", "argv": ["bash"]}]}}
CONNECT = {"connect": {"address": "10.1.2.3", "port": 3333}}


@pytest.mark.parametrize("condition,event,expected", [
    ("proc.name = ssh", SSH, True),
    ("proc.name == ssh", SSH, True),
    ("proc.name != ssh", SSH, False),
    ("proc.name in (scp, ssh)", SSH, True),
    ("proc.cmdline contains '-R 8080'", SSH, True),
    ("proc.cmdline icontains '-r 8080'", SSH, True),
    ("proc.exepath startswith /usr/bin/", SSH, True),
    ("proc.exepath endswith /ssh", SSH, True),
    ("proc.exepath glob '/usr/*/ss?'", SSH, True),
    ("proc.args regex '^-R [0-9]+:'", SSH, True),
    ("proc.exepath pmatch (/usr/bin)", SSH, True),
    ("proc.exepath pmatch (/usr/b)", SSH, False),  # a path prefix, not a string prefix
    ("exec.argv[1] = -R", SSH, True),
    ("exec.argv[9] exists", SSH, False),
    ("exec.argv = host", SSH, True),  # any argument
    ("exec.argv intersects (-L, -R)", SSH, True),  # some argument is one of them
    ("exec.argv intersects (-L, -D)", SSH, False),
    ("exec.argc > 3", SSH, True),
    ("exec.argc < 3", SSH, False),
    ("proc.pname = python3", SSH, True),
    ("proc.aname[2] = bash", SSH, True),
    ("proc.aname = bash", SSH, True),  # any ancestor, as in Falco
    ("proc.aname[0] = ssh", SSH, True),  # [0]: the process itself
    ("proc.acmdline[1] contains agent.py", SSH, True),
    ("not proc.name = ssh or evt.type = execve", SSH, True),
    ("(proc.name = ssh and user.uid = 1000) and not proc.pname = bash", SSH, True),
    ("evt.dir = < and evt.res = SUCCESS and evt.failed = false", SSH, True),
    ("fd.sip = 10.1.2.3", CONNECT, True),
    ("fd.sip = 10.0.0.0/8", CONNECT, True),  # CIDR membership
    ("fd.sip in (192.168.0.0/16, 10.1.0.0/16)", CONNECT, True),
    ("fd.sip != 10.0.0.0/8", CONNECT, False),
    ("fd.sport >= 3000 and fd.sport <= 4000", CONNECT, True),
    ("fd.is_internal = true", CONNECT, True),
    ("fd.name = 10.1.2.3:3333", CONNECT, True),
    ("fd.sport = 3333", SSH, False),  # no such field on an exec event: false
    ("fd.sport = 3333", {"udp_send": {"address": "192.0.2.9", "port": 3333}}, True),
    ("fd.sport = 3333", {"refused": {"op": "connect", "address": "192.0.2.9", "port": 3333}}, True),
    ("fd.sip exists", {"refused": {"op": "device", "device": "195:0"}}, False),  # no destination
    ("not fd.is_loopback = true", {"refused": {"op": "device", "device": "195:0"}}, True),
    ("not fd.sport = 3333", SSH, True),
])
def test_operators_and_fields(tmp_path, condition, event, expected):
    assert fires(tmp_path, condition, event) is expected


def test_lists_nest_and_bare_words_are_literals(tmp_path):
    prelude = """
- list: inner_tools
  items: [ssh]
- list: outer_tools
  items: [inner_tools, "autossh"]
"""
    assert fires(tmp_path, "proc.name in (outer_tools)", SSH, prelude)
    assert fires(tmp_path, "proc.name in (outer_tools, plink)", SSH, prelude)


def test_rules_see_only_events_of_their_kinds(tmp_path):
    ruleset = ruleset_from(tmp_path, RULE.format(condition="fd.sport = 22 or evt.type = execve")
                           + RULE.replace("rule: r", "rule: n").format(condition="not proc.name = x"))
    assert ruleset.get("r").kinds == {"connect", "udp_send", "refused", "exec"}
    assert ruleset.get("n").kinds == ALL_KINDS
    assert [r.name for r in ruleset.by_kind["gpu_open"]] == ["n"]


def problems(tmp_path, text: str) -> list[str]:
    with pytest.raises(RuleLoadError) as info:
        ruleset_from(tmp_path, text)
    return [str(p) for p in info.value.problems]


def test_errors_name_file_line_and_column(tmp_path):
    found = problems(tmp_path, """\
        - macro: m
          condition: proc.name = x and fd.sport = abc
        - rule: r
          desc: d
          condition: >
            proc.name = ssh
            and proc.nmae = ssh
          output: o
          priority: WARNING
        - rule: s
          desc: d
          condition: proc.name bogus ssh
          output: o
          priority: WARNING
        - rule: t
          desc: d
          condition: proc.name in (missing_list) and undefined_macro
          output: o
          priority: WARNING
        - rule: u
          desc: d
          condition: proc.args regex '(unclosed'
          output: "%proc.nope"
          priority: LOUD
          tags: [T1]
        """)
    f = tmp_path / "rules.yaml"
    assert f"{f}:2:43: in macro 'm': fd.sport is a number; 'abc' is not" in found
    assert f"{f}:7:9: unknown field 'proc.nmae' (did you mean proc.name?)" in found
    assert any(p.startswith(f"{f}:12:") and "'bogus'" in p for p in found)
    assert f"{f}:17:28: undefined list 'missing_list' (quote it to mean the literal string)" in found
    assert any(p.startswith(f"{f}:22:") and "does not compile" in p for p in found)
    assert any(p.startswith(f"{f}:23:") and "unknown field 'proc.nope'" in p for p in found)
    assert any(p.startswith(f"{f}:24:") and "priority 'LOUD'" in p for p in found)


def test_undefined_macro_and_yaml_errors(tmp_path):
    found = problems(tmp_path, RULE.format(condition="spawned and proc.name = x"))
    assert any("undefined macro 'spawned'" in p for p in found)
    found = problems(tmp_path, "- rule: r\n  desc: [unclosed\n")
    assert found[0].startswith(f"{tmp_path / 'rules.yaml'}:") and "YAML syntax" in found[0]
    found = problems(tmp_path, "- rule: r\n  desc: d\n  condition: proc.name = x\n  output: o\n"
                               "  priority: INFO\n  priorty: x\n")
    assert any(":6:3: unknown key 'priorty'" in p for p in found)


def test_macro_cycles_are_errors(tmp_path):
    found = problems(tmp_path, "- macro: a\n  condition: b\n- macro: b\n  condition: a\n")
    assert any("refers to itself" in p for p in found)


def test_overrides_from_a_later_file(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text(RULE.format(condition="proc.name = ssh") + "\n- list: tools\n  items: [a]\n")
    local = tmp_path / "local.yaml"
    local.write_text(textwrap.dedent("""\
        - rule: r
          condition: and not exec.argv = host
          priority: CRITICAL
          override:
            condition: append
            priority: replace
        - list: tools
          items: [b]
          override:
            items: append
        """))
    ruleset = load_rules([base, local])
    rule = ruleset.get("r")
    assert rule.priority == "CRITICAL"
    assert ruleset.lists["tools"] == ["a", "b"]
    assert not Engine(ruleset).evaluate(make_event(SSH, 0))  # the appended clause holds

    disable = tmp_path / "off.yaml"
    disable.write_text("- rule: r\n  enabled: false\n  override:\n    enabled: replace\n")
    ruleset = load_rules([base, disable])
    assert ruleset.by_kind.get("exec", []) == []


def test_override_mistakes_are_errors(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text(RULE.format(condition="proc.name = ssh"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("- rule: nothere\n  condition: x\n  override:\n    condition: append\n"
                   "- rule: r\n  priority: ERROR\n  override:\n    priority: append\n")
    with pytest.raises(RuleLoadError) as info:
        load_rules([base, bad])
    text = str(info.value)
    assert "overrides nothing" in text and "can be replaced, not appended" in text


def test_exceptions_leave_listed_cases_alone(tmp_path):
    ruleset = ruleset_from(tmp_path, RULE.format(condition="evt.type = connect") + """\
  exceptions:
    - name: known
      fields: [fd.sip, fd.sport]
      comps: [=, in]
      values:
        - [10.1.2.3, [3333, 4444]]
""")
    engine = Engine(ruleset)
    assert not engine.evaluate(make_event(CONNECT, 0))
    assert engine.evaluate(make_event({"connect": {"address": "10.1.2.4", "port": 3333}}, 0))


def test_window_state_is_bounded(tmp_path):
    ruleset = ruleset_from(tmp_path, RULE.format(condition="evt.type = connect") + """\
  window:
    by: proc.pid
    distinct: fd.sport
    count: 3
    within: 5s
    max_keys: 100
""")
    engine = Engine(ruleset)
    # a hostile agent with 10,000 processes: state never holds more than max_keys
    for pid in range(10_000):
        engine.evaluate(make_event({"connect": {"pid": pid, "port": 1}}, 0))
    assert engine.state_size() == {"r": 100}
    assert engine.windows["r"].keys.evicted == 9_900
    # three distinct ports from one process fire, once, and the key resets
    verdicts = [v for port in (1, 2, 3, 4) for v in engine.evaluate(
        make_event({"connect": {"pid": 1, "port": port}}, port))]
    assert [v.count for v in verdicts] == [3]


def test_window_expires_old_events(tmp_path):
    ruleset = ruleset_from(tmp_path, RULE.format(condition="evt.type = connect") + """\
  window: {by: proc.pid, count: 2, within: 1s}
""")
    engine = Engine(ruleset)
    first = make_event({"connect": {"at": 0}}, 0)
    late = make_event({"connect": {"at": 5}}, 0)
    assert not engine.evaluate(first) and not engine.evaluate(late)
    assert engine.evaluate(make_event({"connect": {"at": 5.5}}, 0))


def test_sequence_and_window_specs_are_checked(tmp_path):
    found = problems(tmp_path, RULE.format(condition="evt.type = connect")
                     + "  window: {by: proc.nope, count: 0, within: soon}\n")
    assert any("window of rule 'r'" in p for p in found)
    found = problems(tmp_path, "- rule: q\n  desc: d\n  output: o\n  priority: INFO\n"
                               "  sequence: {by: proc.pid, within: 5s, steps: [evt.type = connect]}\n")
    assert any("at least two steps" in p for p in found)


def test_output_escapes_agent_text(tmp_path):
    ruleset = ruleset_from(tmp_path, RULE.format(condition="evt.type = execve"))
    verdict = Engine(ruleset).evaluate(make_event({"exec": {"argv": ["evil\nFAKE"], "comm": "x"}}, 0))[0]
    assert verdict.output == "fired evil\\x0aFAKE"


@pytest.mark.parametrize("kind,values", [
    ("connect", {"address": "127.0.0.1", "port": 9, "retval": -111, "protocol": "tcp"}),
    ("connect", {"address": "2001:db8::1", "port": 443, "retval": 0, "family": "inet6"}),
    ("udp_send", {"address": "10.1.2.3", "port": 53, "retval": 40}),
    ("refused", {"address": "192.0.2.1", "port": 22, "family": "inet"}),
    ("refused", {"device": "195:0", "access": "rw"}),
])
def test_fields_compiled_in_place_read_what_their_extractor_reads(tmp_path, kind, values):
    """Fields written as expressions (fields._inline) are evaluated inside the compiled judge:
    for each, a rule on the value its extractor gives fires, and one on another value does not."""
    from ebpfmon.rules.fields import FIELDS

    event = make_event({kind: values}, 0)
    context = Context(networks=NetworkClassifier(["10.0.0.0/8"], use_routes=False))
    inline = [f for f in FIELDS.values() if getattr(f.extractor_for(kind), "inline", None) and kind in f.kinds]
    # a refused event's destination may be missing: its socket fields are called, not inlined
    assert ({"evt.res", "fd.is_internal"} if kind != "refused" else {"evt.res"}) <= {f.name for f in inline}
    for field in inline:
        value = field.extractor_for(kind)(event, context)
        if value is None:
            assert not fires(tmp_path, f"{field.name} exists", {kind: values}), field.name
            continue
        text = str(value).lower() if isinstance(value, bool) else f'"{value}"'
        assert fires(tmp_path, f"{field.name} = {text}", {kind: values}), field.name
        other = str(not value).lower() if isinstance(value, bool) else '"no-such-value"'
        assert not fires(tmp_path, f"{field.name} = {other}", {kind: values}), field.name


def test_append_adds_to_a_list_and_a_rules_condition(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text(textwrap.dedent("""
        - list: tools
          items: [nc]
        - rule: r
          desc: d
          condition: evt.type = execve and (proc.name in (tools))
          output: "fired %proc.name"
          priority: WARNING
    """))
    ruleset = load_rules([base, local_file(tmp_path, """
        - list: tools
          items: [socat]
          append: true
        - rule: r
          condition: or proc.name = chisel
          append: true
    """)])
    engine = Engine(ruleset)
    named = {name: bool(engine.evaluate(make_event({"exec": {"argv": [name]}}, 0))) for name in
             ("nc", "socat", "chisel", "ssh")}
    assert named == {"nc": True, "socat": True, "chisel": True, "ssh": False}


def local_file(tmp_path, text: str):
    path = tmp_path / "local.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def test_a_rule_that_says_enforce_false_alerts_without_asking_for_its_actions_to_run(tmp_path):
    ruleset = ruleset_from(tmp_path, RULE.format(condition="proc.name = ssh") + "  actions: [cut_network]\n"
                           "  enforce: false\n")
    [verdict] = Engine(ruleset).evaluate(make_event(SSH, 0))
    assert verdict.actions == ["cut_network"] and verdict.enforce is False
    [verdict] = Engine(ruleset_from(tmp_path, RULE.format(condition="proc.name = ssh") + "  actions: [cut_network]\n")
                       ).evaluate(make_event(SSH, 0))
    assert verdict.enforce is True  # the default


def test_a_sequence_keeps_at_most_max_keys_and_forgets_the_oldest(tmp_path):
    ruleset = ruleset_from(tmp_path, """
        - rule: s
          desc: a GPU open, then a connect, by one process
          output: "fired %proc.pid"
          priority: WARNING
          sequence:
            by: proc.pid
            within: 1h
            max_keys: 2
            steps: [evt.kind = gpu_open, evt.type = connect]
    """)
    engine = Engine(ruleset)
    gpu = {"path": "/dev/nvidia0", "device": "195:0", "vendor": "nvidia"}
    for n, pid in enumerate((1, 2, 3)):  # three processes start the sequence: the first is forgotten
        assert engine.evaluate(make_event({"gpu_open": {**gpu, "pid": pid}}, n)) == []
    fired = {pid: bool(engine.evaluate(make_event({"connect": {"address": "192.0.2.1", "port": 443, "pid": pid}},
                                                  10 + pid)))
             for pid in (1, 2, 3)}
    assert fired == {1: False, 2: True, 3: True}


DNS_ANSWER = {"dns": {"dns_query": "pool.example.org", "qtype": "A", "answers": ["192.0.2.8"], "verdict": "answered"}}
UDP = {"udp_send": {"address": "10.1.2.3", "port": 53, "length": 40, "fd": 7}}
UNIX = {"unix_connect": {"path": "@/tmp/.X11-unix/X0", "resolved": "/tmp/.X11-unix/X0"}}
GPU = {"gpu_open": {"path": "/dev/nvidia0", "device": "195:0", "vendor": "nvidia", "access": "r"}}
HOOKED = {"connect": {"address": "2001:db8::7", "port": 443, "source": "cgroup_hook", "retval": -1, "fd": 9}}


# the fields no shipped rule reads: each read once as true and once as false
@pytest.mark.parametrize("condition,event,expected", [
    ("dns.answers = 192.0.2.8", DNS_ANSWER, True),
    ("dns.answers = 192.0.2.9", DNS_ANSWER, False),
    ("evt.rawres = -1", HOOKED, True),
    ("evt.rawres = 0", HOOKED, False),
    ("evt.source = cgroup_hook", HOOKED, True),
    ("evt.source = syscall", HOOKED, False),
    ("exec.argv_source = kernel", SSH, True),
    ("exec.argv_source = proc", SSH, False),
    ("exec.filename = /usr/bin/ssh", SSH, True),
    ("exec.filename = /bin/ssh", SSH, False),
    ("fd.l4proto = udp", UDP, True),
    ("fd.l4proto = tcp", UDP, False),
    ("fd.num = 7", UDP, True),
    ("fd.num = 8", UDP, False),
    ("fd.rip = 10.1.2.3", UDP, True),
    ("fd.rip = 10.1.2.4", UDP, False),
    ("fd.rport = 53", UDP, True),
    ("fd.rport = 54", UDP, False),
    ("fd.type = ipv6", HOOKED, True),
    ("fd.type = ipv4", HOOKED, False),
    ("fd.typechar = 6", HOOKED, True),
    ("fd.typechar = 4", UDP, True),
    ("gpu.access = r", GPU, True),
    ("gpu.access = rw", GPU, False),
    ("group.gid = 1000", SSH, True),
    ("group.gid = 0", SSH, False),
    ("proc.aexepath[2] = /usr/bin/bash", SSH, True),
    ("proc.aexepath = /usr/bin/zsh", SSH, False),
    ("proc.apid[1] = 999", SSH, True),
    ("proc.apid = 1", SSH, False),
    ("proc.loader exists", SSH, False),
    ("not proc.loader exists", SSH, True),
    ("proc.pcmdline = 'python3 agent.py'", SSH, True),
    ("proc.pcmdline = bash", SSH, False),
    ("proc.pexepath = /usr/bin/python3", SSH, True),
    ("proc.pexepath = /usr/bin/bash", SSH, False),
    ("ssh.local_forward = true", {"exec": {"argv": ["ssh", "-L", "8080:db:5432", "host"]}}, True),
    ("ssh.local_forward = true", SSH, False),
    ("thread.tid = 1000", SSH, True),
    ("thread.tid = 1001", SSH, False),
    ("udp.length = 40", UDP, True),
    ("udp.length > 40", UDP, False),
    ("unix.path_given = '@/tmp/.X11-unix/X0'", UNIX, True),
    ("unix.path_given = /tmp/.X11-unix/X0", UNIX, False),
])
def test_fields_no_pack_reads(tmp_path, condition, event, expected):
    assert fires(tmp_path, condition, event) is expected
