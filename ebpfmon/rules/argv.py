"""Reading command lines the way the programs themselves do.

A reverse tunnel can be spelled many ways: `ssh -R 8080:h:80 host`,
`ssh -fNR8080:h:80 host`, `ssh host -R ...`, `ssh -o RemoteForward=... host`,
`ssh -oremoteforward ...`. Matching strings misses some and flags `ssh host
ls -R /tmp`. So ssh-family command lines are parsed with each client's own
option letters and getopt rules, and the rules ask what the parse found.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field

# option letters that take an argument, per client (from their man pages)
SSH_WITH_ARG = set("BbcDEeFIiJLlmOoPpQRSWw")
CLIENTS = {
    "ssh": SSH_WITH_ARG,
    "autossh": SSH_WITH_ARG | {"M"},  # autossh passes the rest to ssh
    "dbclient": set("bcEiIJKlLmpRsWy") - set("y"),  # dropbear's client
    "plink": set("DLlPRiw"),  # PuTTY's command-line client (-pw is handled as a long option)
}
REMOTE_FORWARD_KEYS = ("remoteforward",)
TUN_KEYS = ("tunnel", "tunneldevice")


@dataclass
class SshCommand:
    client: str
    options: list[tuple[str, str | None]] = field(default_factory=list)  # ("R", "8080:h:80"), ("o", "...")
    host: str | None = None

    def config_keys(self) -> list[str]:
        """Lower-cased keys of -o options (RemoteForward, Tunnel...)."""
        keys = []
        for opt, value in self.options:
            if opt == "o" and value:
                keys.append(value.replace("=", " ").split()[0].lower() if value.strip() else "")
        return keys

    @property
    def remote_forward(self) -> bool:
        return any(o == "R" for o, _ in self.options) or any(k in REMOTE_FORWARD_KEYS for k in self.config_keys())

    @property
    def local_forward(self) -> bool:
        return any(o in ("L", "D") for o, _ in self.options) or any(
            k in ("localforward", "dynamicforward") for k in self.config_keys())

    @property
    def tun(self) -> bool:
        if self.client == "plink":
            return False
        return any(o == "w" for o, _ in self.options) or any(k in TUN_KEYS for k in self.config_keys())


def ssh_client_name(argv, exe: str | None, exe_is: tuple[str, ...] = ()) -> str | None:
    """The ssh-family client this is: by what the file is (exe_is, host/programs.py), else by
    the program's name or argv[0]."""
    for candidate in (*exe_is, exe, argv[0] if argv else None):
        if candidate:
            name = os.path.basename(candidate)
            if name in CLIENTS:
                return name
    return None


@functools.lru_cache(maxsize=4096)
def parse_ssh(argv: tuple[str, ...], exe: str | None = None, exe_is: tuple[str, ...] = ()) -> SshCommand | None:
    """The options and host of an ssh-family command line; None for other programs.

    Like OpenSSH: options may come before and right after the host; the first
    word after the host that is not an option starts the remote command.
    Cached: agents run the same command lines again and again. Do not modify
    the result.
    """
    client = ssh_client_name(argv, exe, exe_is)
    if client is None:
        return None
    with_arg = CLIENTS[client]
    cmd = SshCommand(client)
    args = argv[1:]
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--":
            if cmd.host is None and i + 1 < len(args):
                cmd.host = args[i + 1]
            break
        if client == "plink" and arg in ("-pw", "-pwfile", "-hostkey", "-sercfg", "-proxycmd", "-sshlog",
                                         "-sshrawlog", "-i", "-m"):
            i += 2
            continue
        if arg.startswith("-") and len(arg) > 1:
            j = 1
            while j < len(arg):
                letter = arg[j]
                if letter in with_arg:
                    value = arg[j + 1:]
                    if not value:
                        i += 1
                        value = args[i] if i < len(args) else None
                    cmd.options.append((letter, value))
                    break
                cmd.options.append((letter, None))
                j += 1
            i += 1
            continue
        if cmd.host is None:
            cmd.host = arg
            i += 1
            continue
        break  # the remote command
    return cmd
