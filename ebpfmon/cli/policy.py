"""ebpfmon policy: the egress profiles, as the kernel enforces them."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Annotated

import typer

from ebpfmon.cli.common import ConfigOption, effective_config
from ebpfmon.config import load_config
from ebpfmon.policy.profiles import Policy, Profile, compiled

app = typer.Typer(help="Egress profiles: what each agent may reach, enforced in the kernel.", no_args_is_help=True,
                  epilog="Examples:\n\n  ebpfmon policy list\n\n"
                         "  ebpfmon policy check --agent /ebpfmon-agents/web-1 198.51.100.7:443\n\n"
                         "  ebpfmon policy validate /etc/ebpfmon/config.yaml")


def _policy(config_file: Path | None) -> Policy:
    config, _ = effective_config(config_file)
    return compiled(config.egress)


def _show(profile: Profile, default: bool) -> None:
    globs = ", ".join(profile.agents) or "-"
    print(f"{profile.name}  mode: {profile.mode}  agents: {globs}{'  (default profile)' if default else ''}")
    for allow in profile.allows:
        print(f"    allow {allow}")
    if not profile.allows:
        print("    allows nothing")


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
def show(agent: Annotated[str, typer.Argument(help="An agent's cgroup, such as /ebpfmon-agents/web-1.")],
         config_file: ConfigOption = None) -> None:
    """Show the profile that applies to an agent (the first whose globs match, else the default)."""
    policy = _policy(config_file)
    profile = policy.profile_for(agent)
    if profile is None:
        print(f"{agent}: no profile applies (no policy)")
        return
    print(f"{agent}: ", end="")
    _show(profile, profile is policy.default)


def _destination(text: str) -> tuple[str, int]:
    """'198.51.100.7:443', '[2001:db8::1]:443', or an address alone (port 0: any)."""
    host, port = text, "0"
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = rest.lstrip(":") or "0"
    elif text.count(":") == 1:
        host, _, port = text.partition(":")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise typer.BadParameter(f"{text!r}: give an address and a port, such as 198.51.100.7:443 or "
                                 "[2001:db8::1]:443 (DNS names come with the DNS proxy)") from None
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise typer.BadParameter(f"{text!r}: the port must be a number from 1 to 65535")
    return host, int(port)


@app.command("check", epilog="Examples:\n\n"
             "  ebpfmon policy check --agent /ebpfmon-agents/web-1 198.51.100.7:443\n\n"
             "  ebpfmon policy check --agent /ebpfmon-agents/web-1 --udp 192.0.2.53:53\n\n"
             "Exit status 0 when the destination is allowed, 1 when it is refused.")
def check(
    destination: Annotated[str, typer.Argument(metavar="DEST[:PORT]", help="The address, and its port.")],
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
    allow = profile.decide(host, port, "udp" if udp else "tcp")
    if allow is not None:
        print(f"allow: {shown} for {agent}: profile {profile.name}, {allow}")
        return
    verdict = "refuse" if profile.mode == "enforce" else "allow (audit: reported as would-refuse)"
    print(f"{verdict}: {shown} for {agent}: profile {profile.name} ({profile.mode}) has no entry that allows it")
    if profile.mode == "enforce":
        raise typer.Exit(1)


@app.command("validate", epilog="Example:\n\n  ebpfmon policy validate /etc/ebpfmon/config.yaml\n\n"
             "Exit status 0 when the profiles are valid; errors name the file, line and key.")
def validate(file: Annotated[Path, typer.Argument(help="The configuration file holding the egress section.")]) -> None:
    """Check the egress profiles of a configuration file."""
    policy = compiled(load_config(file).egress)
    prefixes = sum(len(p.prefixes) for p in policy.profiles)
    default = policy.default.name if policy.default else "none"
    print(f"ok: {file}: {len(policy.profiles)} profile(s), {prefixes} prefix(es), default profile: {default}")
