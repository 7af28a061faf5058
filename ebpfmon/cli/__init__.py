"""The ebpfmon command line: thin commands over the library, combined here."""

from __future__ import annotations

import sys

import typer

from ebpfmon import __version__
from ebpfmon.cli import audit, config, doctor, exec_cmd, gpu, policy, quarantine, reload, rules, run, trace
from ebpfmon.cli.common import report_error
from ebpfmon.errors import EbpfmonError, RuleLoadError

app = typer.Typer(
    name="ebpfmon",
    help="Watch autonomous AI agents from the kernel: what they run, where they connect, "
         "which GPUs they open.",
    no_args_is_help=True,
    epilog="Examples, in the order a newcomer meets them:\n\n"
           "  sudo ebpfmon doctor                        # can this machine run it?\n\n"
           "  sudo ebpfmon trace all --all-cgroups --duration 10\n\n"
           "  sudo ebpfmon exec -- python3 agent.py      # run something as an agent\n\n"
           "  sudo ebpfmon run                           # the monitor, on built-in defaults\n\n"
           "  sudo ebpfmon quarantine list\n\n"
           "Each command has --help with its own examples.",
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
# one typer app per command file: a single command joins this app as it is, a group by its name
for single in (trace, exec_cmd, doctor, run, reload):
    app.add_typer(single.app)
app.add_typer(rules.app, name="rules")
app.add_typer(quarantine.app, name="quarantine")
app.add_typer(policy.app, name="policy")
app.add_typer(config.app, name="config")
app.add_typer(gpu.app, name="gpu")
app.add_typer(audit.app, name="audit")


def _version(value: bool) -> None:
    if value:
        print(f"ebpfmon {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="Print the version and exit."),
) -> None:
    """Watch autonomous AI agents from the kernel."""


def main() -> None:
    try:
        app()
    except RuleLoadError as e:
        report_error(e)
        sys.exit(1)
    except EbpfmonError as e:
        report_error(e)
        sys.exit(2)
