"""One daemon per state directory and per agent root: a second one would contain every agent
twice and write the same records, spool and audit log. The lock is an flock, so a daemon that
died (kill -9 included) leaves nothing that blocks the next one; its pid in the file is only
for the message."""

from __future__ import annotations

import fcntl
import logging
import os
from pathlib import Path
from typing import IO

from ebpfmon.errors import EbpfmonError

log = logging.getLogger(__name__)

LOCK_NAME = "daemon.lock"
RUN_DIR = Path("/run/ebpfmon")


def hold(path: Path, what: str) -> IO[str]:
    """The lock at path, held until the returned file is closed; EbpfmonError naming the
    running daemon's pid when another holds it."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    f = open(path, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        pid = f.read().strip() or "?"
        f.close()
        raise EbpfmonError(f"another ebpfmon daemon (pid {pid}) runs on {what}; this one would contain and "
                           "record everything twice.",
                           "Stop it first (systemctl stop ebpfmon), or give this one its own --state-dir "
                           "and agent root.") from None
    f.seek(0)
    before = f.read().strip()
    if before and before != str(os.getpid()):
        log.info("took over %s: its daemon (pid %s) is gone", path, before)
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()}\n")
    f.flush()
    return f


def hold_instance(state_dir: str, agent_root_id: int, run_dir: Path = RUN_DIR) -> list[IO[str]]:
    """The state directory's lock and the agent root's (its pinned maps and programs). Where
    run_dir cannot be written (a sandbox without it), the state directory's lock alone."""
    locks = [hold(Path(state_dir) / LOCK_NAME, f"the state directory {state_dir}")]
    try:
        locks.append(hold(run_dir / f"agent-root-{agent_root_id}.lock", "the same agent root"))
    except EbpfmonError:
        locks[0].close()
        raise
    except OSError as e:
        log.warning("no lock on the agent root (%s: %s): only this state directory is guarded against a second "
                    "daemon", run_dir, e.strerror)
    return locks
