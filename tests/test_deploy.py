"""The scripts that set machines up are shellcheck-clean."""

import subprocess

from conftest import REPO


def test_setup_scripts_are_shellcheck_clean():
    out = subprocess.run(["shellcheck", "deploy/setup.sh", ".ci/run"], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout


def test_vagrantfile_validates():
    out = subprocess.run(["vagrant", "validate", "--ignore-provider"], cwd=REPO / "vagrant", capture_output=True,
                         text=True, env={"HOME": "/tmp", "PATH": "/usr/bin:/bin", "VAGRANT_CHECKPOINT_DISABLE": "1"})
    assert out.returncode == 0, out.stdout + out.stderr
    assert "validated successfully" in out.stdout


def test_vagrant_provisioning_is_make_install():
    # the VM is set up by the same steps as a host, not by a script of its own
    assert "make -C /ebpfmon install" in (REPO / "vagrant/Vagrantfile").read_text()
