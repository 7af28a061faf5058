"""ebpfmon doctor: is this machine ready to run the monitor?"""

from __future__ import annotations

import typer

from ebpfmon.doctor import run_checks

EPILOG = """\
Example:\n\n
  sudo ebpfmon doctor\n\n
Exit status 0 when everything required is there, 1 when something is missing.
Rows marked n/a are optional features ebpfmon does not depend on.
"""

app = typer.Typer()


@app.command("doctor", epilog=EPILOG)
def doctor() -> None:
    """Check what the monitor needs: privileges, bcc, headers, tracefs, cgroup v2, probes, hooks."""
    checks = run_checks()
    width = max(len(c.name) for c in checks)
    print(f"{'CHECK'.ljust(width)}  STATUS  DETAIL")
    for c in checks:
        print(f"{c.name.ljust(width)}  {c.status.ljust(6)}  {c.detail}")
        if not c.ok and c.fix:
            print(f"{''.ljust(width)}  {''.ljust(6)}  fix: {c.fix}")
    failed = [c.name for c in checks if c.required and not c.ok]
    if failed:
        print(f"\n{len(failed)} required check(s) failed: {', '.join(failed)}")
        raise typer.Exit(1)
    print("\nready: every required check passed")
