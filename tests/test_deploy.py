"""The scripts that set machines up are shellcheck-clean."""

import subprocess

from conftest import REPO


def test_setup_scripts_are_shellcheck_clean():
    out = subprocess.run(["shellcheck", "deploy/setup.sh", ".ci/run"], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout
