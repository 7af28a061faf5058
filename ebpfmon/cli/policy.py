"""ebpfmon policy: the egress profiles, as the kernel enforces them."""

from __future__ import annotations

import ipaddress
import re
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from ebpfmon.cli.common import ConfigOption, effective_config, time_arg
from ebpfmon.config import load_config
from ebpfmon.errors import EbpfmonError
from ebpfmon.alerts.audit import audit_files, read_events
from ebpfmon.policy.learn import learn, profile_yaml
from ebpfmon.policy.profiles import MODES, PROTOCOLS, Policy, Profile, compiled
from ebpfmon.service import control

app = typer.Typer(help="Egress profiles: what each agent may reach, enforced in the kernel.", no_args_is_help=True,
                  epilog="Examples:\n\n  ebpfmon policy list\n\n"
                         "  ebpfmon policy check --agent /ebpfmon-agents/web-1 198.51.100.7:443\n\n"
                         "  ebpfmon policy validate /etc/ebpfmon/config.yaml")


def _policy(config_file: Path | None) -> Policy:
    config, _ = effective_config(config_file)
    return compiled(config.egress)


def _show(profile: Profile, default: bool, granted: list | None = None) -> None:
    """The profile; with granted (the daemon's answer), the addresses its names allow now."""
    globs = ", ".join(profile.agents) or "-"
    print(f"{profile.name}  mode: {profile.mode}  agents: {globs}{'  (default profile)' if default else ''}")
    for allow in profile.allows:
        print(f"    allow {allow}")
    for name in profile.names:
        print(f"    allow {name}")
    if not profile.allows and not profile.names:
        print("    allows nothing")
    if granted is None:
        return
    mine = [(address, name, left) for who, address, name, left in granted if who == profile.name]
    if not mine and profile.names:
        print("    no address allowed through names now (none resolved, or all expired)")
    for address, name, left in mine:
        print(f"    allowed now {address} (resolved from {name}, {left:.0f}s left)")


def _granted(config_file: Path | None) -> list | None:
    """What the running daemon's DNS proxy allows now; None (and a note) without a daemon."""
    config, _ = effective_config(config_file)
    answer = control.request(config.state_dir, {"cmd": "names"})
    if answer is None or not answer.get("ok"):
        print("(no daemon running: no address is allowed through names)")
        return None
    return answer["names"]


@app.command("list", epilog="Example:\n\n  ebpfmon policy list --config /etc/ebpfmon/config.yaml")
def list_profiles(config_file: ConfigOption = None) -> None:
    """Show every profile: its mode, the agents it applies to, what it allows."""
    policy = _policy(config_file)
    if not policy.profiles:
        print("no egress profiles: agents may reach anything the deny lists allow")
        return
    for profile in policy.profiles:
        _show(profile, profile is policy.default)


@app.command("show", epilog="Example:\n\n  ebpfmon policy show /ebpfmon-agents/web-1")
def show(agent: Annotated[Optional[str], typer.Argument(help="An agent's cgroup, such as /ebpfmon-agents/web-1; "
                                                         "none: every profile, as list does.")] = None,
         config_file: ConfigOption = None) -> None:
    """Show the profile that applies to an agent (the first whose globs match, else the default),
    and the addresses its DNS names allow now (asked of the running daemon)."""
    if agent is None:
        list_profiles(config_file)
        return
    policy = _policy(config_file)
    profile = policy.profile_for(agent)
    if profile is None:
        print(f"{agent}: no profile applies (no policy)")
        return
    granted = _granted(config_file) if profile.names else None
    print(f"{agent}: ", end="")
    _show(profile, profile is policy.default, granted)


def _destination(text: str) -> tuple[str, int]:
    """'198.51.100.7:443', '[2001:db8::1]:443', 'mirror.example:443', or an address or name alone
    (port 0: any)."""
    host, port = text, "0"
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = rest.lstrip(":") or "0"
    elif text.count(":") == 1:
        host, _, port = text.partition(":")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if not re.fullmatch(r"[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*\.?", host):
            raise typer.BadParameter(f"{text!r}: give an address or a DNS name and a port, such as "
                                     "198.51.100.7:443, [2001:db8::1]:443 or mirror.example:443") from None
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise typer.BadParameter(f"{text!r}: the port must be a number from 1 to 65535")
    return host, int(port)


@app.command("check", epilog="Examples:\n\n"
             "  ebpfmon policy check --agent /ebpfmon-agents/web-1 198.51.100.7:443\n\n"
             "  ebpfmon policy check --agent /ebpfmon-agents/web-1 --udp 192.0.2.53:53\n\n"
             "  ebpfmon policy check --agent /ebpfmon-agents/web-1 deb.mirror.example:443\n\n"
             "Exit status 0 when the destination is allowed, 1 when it is refused.")
def check(
    destination: Annotated[str, typer.Argument(metavar="DEST[:PORT]", help="The address or DNS name, and its port.")],
    agent: Annotated[str, typer.Option("--agent", metavar="CGROUP", help="The agent's cgroup.")] = ...,
    udp: Annotated[bool, typer.Option("--udp", help="A datagram, not a TCP connect.")] = False,
    config_file: ConfigOption = None,
) -> None:
    """Judge a destination for an agent as the kernel would, and name the entry that decided."""
    policy = _policy(config_file)
    host, port = _destination(destination)
    profile = policy.profile_for(agent)
    shown = f"{host}:{port}/{'udp' if udp else 'tcp'}"
    if profile is None or profile.mode == "off":
        print(f"allow: {shown} for {agent}: " + ("no profile applies" if profile is None
                                                 else f"profile {profile.name} is off"))
        return
    allow = _decide(profile, host, port, "udp" if udp else "tcp")
    if allow is not None:
        resolved = " (its addresses, once the agent resolved it through the DNS proxy)" if profile.names and \
            allow in profile.names else ""
        print(f"allow: {shown} for {agent}: profile {profile.name}, {allow}{resolved}")
        return
    verdict = "refuse" if profile.mode == "enforce" else "allow (audit: reported as would-refuse)"
    print(f"{verdict}: {shown} for {agent}: profile {profile.name} ({profile.mode}) has no entry that allows it")
    if profile.mode == "enforce":
        raise typer.Exit(1)


def _decide(profile: Profile, host: str, port: int, proto: str):
    """The entry allowing the destination; for a name, the name entry whose ports cover it (the
    addresses it resolves to are allowed when the agent resolves it through the DNS proxy)."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        number = PROTOCOLS[proto]
        return next((n for n in profile.names if n.matches(host) and any(r.covers(port, number) for r in n.ranges)),
                    None)
    return profile.decide(host, port, proto)


@app.command("validate", epilog="Example:\n\n  ebpfmon policy validate /etc/ebpfmon/config.yaml\n\n"
             "Exit status 0 when the profiles are valid; errors name the file, line and key.")
def validate(file: Annotated[Path, typer.Argument(help="The configuration file holding the egress section.")]) -> None:
    """Check the egress profiles of a configuration file."""
    policy = compiled(load_config(file).egress)
    prefixes = sum(len(p.prefixes) for p in policy.profiles)
    names = sum(len(p.names) for p in policy.profiles)
    default = policy.default.name if policy.default else "none"
    print(f"ok: {file}: {len(policy.profiles)} profile(s), {prefixes} prefix(es), {names} name(s), "
          f"default profile: {default}")


@app.command("learn", epilog="Examples:\n\n"
             "  ebpfmon policy learn --agent '/ebpfmon-agents/web-*' --since 1d > web.yaml\n\n"
             "  ebpfmon policy validate web.yaml; ebpfmon policy list --config web.yaml\n\n"
             "Run the agents under a profile in audit mode (or none) for a while, learn, review the\n"
             "file (every destination in it was reached, the wanted and the unwanted alike), then put\n"
             "its egress section into the configuration.")
def learn_profile(
    agent: Annotated[str, typer.Option("--agent", metavar="GLOB", help="The agents to learn from: a cgroup glob, "
                                       "which becomes the profile's agents.")] = ...,
    since: Annotated[Optional[str], typer.Option("--since", metavar="TIME", help="Only what happened after this: "
                                                 "a duration back from now (30m, 2h, 1d) or a time.")] = None,
    audit_dir: Annotated[Optional[Path], typer.Option("--audit-dir", metavar="DIR", help="Where the audit log is "
                                                      "(default: audit/ in the configuration's state_dir).")] = None,
    name: Annotated[str, typer.Option("--name", help="The profile's name.")] = "learned",
    mode: Annotated[str, typer.Option("--mode", help=f"The profile's mode: {', '.join(MODES)}.")] = "enforce",
    config_file: ConfigOption = None,
) -> None:
    """Write a profile (YAML, to stdout) of what the agents reached, from the audit log."""
    if mode not in MODES:
        raise typer.BadParameter(f"{mode!r} is not one of {', '.join(MODES)}")
    config, _ = effective_config(config_file)
    directory = audit_dir or Path(config.state_dir) / "audit"
    files = audit_files(directory)
    if not files:
        raise EbpfmonError(f"no audit log in {directory}.", "Give --audit-dir, or run the daemon with the audit "
                                                             "log on (audit.enabled) first.")
    bad: list[str] = []
    learned = learn(read_events(files, bad), agent, config.agents, time_arg(since))
    for problem in bad[:5]:
        print(f"ebpfmon: {problem}", file=sys.stderr)
    if not learned.events:
        raise EbpfmonError(f"no events of agents matching {agent} in {directory}"
                           + (f" since {since}" if since else "") + ".", "Check the glob against 'ebpfmon "
                           "quarantine list' or the audit log's cgroups.")
    print(profile_yaml(learned, name, mode), end="")
    print(f"ebpfmon: {len(learned.destinations)} destination(s) from {learned.events} events in {len(files)} "
          f"file(s)" + (f"; {len(bad)} bad line(s) skipped" if bad else ""), file=sys.stderr)
