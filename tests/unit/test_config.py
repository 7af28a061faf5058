"""The configuration file: defaults, overrides, errors that name the key and line."""

import textwrap
from pathlib import Path

import pytest

from ebpfmon.config import Config, load_config
from ebpfmon.errors import ConfigError
from helpers import REPO, ebpfmon


def write(tmp_path, text):
    path = tmp_path / "config.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def test_empty_file_is_the_defaults(tmp_path):
    assert load_config(write(tmp_path, "")) == Config()


def test_overrides_and_nested_settings(tmp_path):
    config = load_config(write(tmp_path, """\
        agent_root: /agents
        gpu_entitled: ["/agents/train-*"]
        gpu_devices: {"/agents/train-a*": [0, 1]}
        enforce: {dry_run: true, breaker_agents: 2, breaker_seconds: 30}
        alerts:
          dedup_seconds: 5
          sinks:
            - type: pagerduty
              routing_key_file: /etc/ebpfmon/pd.key
              min_priority: critical
        metrics: {listen: "127.0.0.1:9999"}
        """))
    assert config.agent_root == "/agents" and config.enforce.dry_run and config.enforce.breaker_seconds == 30.0
    assert config.gpu_devices == (("/agents/train-a*", (0, 1)),)
    assert config.alerts.sinks[0].routing_key_file == "/etc/ebpfmon/pd.key"
    assert config.metrics.listen == "127.0.0.1:9999"


@pytest.mark.parametrize("text,message", [
    ("enforce:\n  dryrun: true\n", "config.yaml:2: enforce.dryrun: unknown key (known here: breaker_agents, breaker_fraction, "),
    ("enforce:\n  breaker_agents: five\n", "config.yaml:2: enforce.breaker_agents: expected a whole number, got 'five'"),
    ("agent_root: relative\n", "agent_root: must be an absolute cgroup path"),
    ("gpu_entitled: '*'\n", "gpu_entitled: expected a list of a string, got '*'"),
    ("alerts:\n  sinks:\n    - type: pager\n", "alerts.sinks[0].type: 'pager' is not one of console, jsonl"),
    ("alerts:\n  sinks:\n    - type: pagerduty\n", "alerts.sinks[0].routing_key: a pagerduty sink needs"),
    ("alerts:\n  sinks:\n    - {path: /x}\n", "alerts.sinks[0]: missing a required key"),
    ("metrics: {listen: nowhere}\n", "metrics.listen: expected host:port"),
    ("agent_root: [unclosed\n", "not valid YAML"),
])
def test_errors_name_the_key(tmp_path, text, message):
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text))
    assert message in str(info.value)


def test_check_and_show_commands(tmp_path):
    good = write(tmp_path, "alerts:\n  sinks:\n    - {type: slack, url: 'https://hooks.example.com/SECRET'}\n")
    out = ebpfmon("config", "check", str(good))
    assert out.returncode == 0 and "sinks: slack" in out.stdout
    out = ebpfmon("config", "show", "--config", str(good))
    assert out.returncode == 0 and "SECRET" not in out.stdout and "url: '***'" in out.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text("enforce: {dry_run: maybe}\n")
    out = ebpfmon("config", "check", str(bad))
    assert out.returncode == 2 and "enforce.dry_run: expected true or false, got 'maybe'" in out.stderr


def test_the_example_configuration_is_valid_and_documents_every_key():
    example = REPO / "deploy/config.example.yaml"
    load_config(example)
    text = example.read_text()
    missing = [path for path, name in every_key(Config) if f"{name}:" not in text]
    assert not missing, f"deploy/config.example.yaml does not show {missing}"


def every_key(cls, prefix: str = ""):
    """(dotted path, key) of every setting, nested ones too (a list of settings by its item's)."""
    import dataclasses
    import typing

    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        yield prefix + f.name, f.name
        kind = hints[f.name]
        inner = [a for a in typing.get_args(kind) if dataclasses.is_dataclass(a)]
        for nested in ([kind] if dataclasses.is_dataclass(kind) else []) + inner:
            yield from every_key(nested, f"{prefix}{f.name}.")


def test_command_line_options_override_the_file_and_keep_the_rest(tmp_path):
    from ebpfmon.cli.common import effective_config, with_rules

    path = tmp_path / "config.yaml"
    path.write_text("agent_root: /agents\nagent_level: 2\nstate_dir: /tmp/s\nenforce: {dry_run: true}\n"
                    "rules: {files: [/etc/mine.yaml]}\n")
    config, used = effective_config(path, agent_root="/other")
    assert used == path and config.agent_root == "/other" and config.agent_level == 2
    assert config.state_dir == "/tmp/s" and config.enforce.dry_run
    assert with_rules(config, [Path("/x.yaml")], no_defaults=True).rules.files == ("/etc/mine.yaml", "/x.yaml")
    with pytest.raises(ConfigError, match="agent_root: must be an absolute cgroup path"):
        effective_config(path, agent_root="/")


def test_syslog_sink_settings_are_checked(tmp_path):
    import pytest

    from ebpfmon.config import load_config
    from ebpfmon.errors import ConfigError

    good = tmp_path / "good.yaml"
    good.write_text("alerts: {sinks: [{type: syslog, address: '127.0.0.1:6514', tls: true, facility: local3}]}\n")
    [sink] = load_config(good).alerts.sinks
    assert (sink.address, sink.tls, sink.facility) == ("127.0.0.1:6514", True, "local3")
    for text, says in [("{type: syslog}", "needs HOST:PORT"), ("{type: syslog, address: 'h:x'}", "needs HOST:PORT"),
                       ("{type: syslog, address: 'h:514', facility: nope}", "'nope' is not one of kern"),
                       ("{type: pagerduty, routing_key: k, format: falco}", "format is for webhook and jsonl")]:
        bad = tmp_path / "bad.yaml"
        bad.write_text(f"alerts: {{sinks: [{text}]}}\n")
        with pytest.raises(ConfigError, match=says):
            load_config(bad)


def test_event_export_settings_are_checked(tmp_path):
    import pytest

    from ebpfmon.config import load_config
    from ebpfmon.errors import ConfigError

    good = tmp_path / "good.yaml"
    good.write_text("alerts: {sinks: [{type: nats, url: 'nats://127.0.0.1:4222', events: [exec, connect], "
                    "event_agents: ['/ebpfmon-agents/rl-*']}]}\n")
    [sink] = load_config(good).alerts.sinks
    assert (sink.events, sink.event_agents) == (("exec", "connect"), ("/ebpfmon-agents/rl-*",))
    nats = "type: nats, url: 'nats://h:4222'"
    for text, says in [(f"{{{nats}, events: [exec, execs]}}", r"alerts.sinks\[0\].events\[1\].*'execs' is not one of"),
                       ("{type: syslog, address: 'h:514', events: [exec]}", "events go to nats sinks"),
                       (f"{{{nats}, event_agents: ['/a/*']}}", "name the kinds in events too")]:
        bad = tmp_path / "bad.yaml"
        bad.write_text(f"alerts: {{sinks: [{text}]}}\n")
        with pytest.raises(ConfigError, match=says):
            load_config(bad)
    bad.write_text(f"audit: {{enabled: false}}\nalerts: {{sinks: [{{{nats}, events: [all]}}]}}\n")
    with pytest.raises(ConfigError, match="audit.enabled must be true"):
        load_config(bad)
