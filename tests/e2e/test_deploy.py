"""The scripts that set machines up are shellcheck-clean."""

import os
import subprocess

from helpers import REPO


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


def test_make_install_and_uninstall(tmp_path):
    dirs = {"PREFIX": tmp_path / "opt", "UNIT_DIR": tmp_path / "units", "CONFIG_DIR": tmp_path / "etc"}
    args = [f"{k}={v}" for k, v in dirs.items()]
    out = subprocess.run(["make", "-s", "install", *args], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    # the host's own service is not touched: a unit outside systemd's directory is not enabled
    assert f"unit written to {dirs['UNIT_DIR']}, not systemd's: not enabled" in out.stdout
    ebpfmon = dirs["PREFIX"] / "venv/bin/ebpfmon"
    listed = subprocess.run([str(ebpfmon), "rules", "list"], cwd="/", capture_output=True, text=True)
    assert listed.returncode == 0 and "Reverse SSH tunnel" in listed.stdout  # a copy, not the checkout
    assert str(dirs["PREFIX"] / "venv/share/ebpfmon/rules") in listed.stdout
    unit = dirs["UNIT_DIR"] / "ebpfmon.service"
    assert f"ExecStart={ebpfmon} run --config {dirs['CONFIG_DIR']}/config.yaml" in unit.read_text()
    verify = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True)
    assert verify.returncode == 0, verify.stderr
    prolog = dirs["CONFIG_DIR"] / "slurm/prolog.sh"  # the Slurm hooks call the installed ebpfmon
    assert f"${{EBPFMON:-{ebpfmon}}}" in prolog.read_text() and os.access(prolog, os.X_OK)
    unslurmed = subprocess.run([str(prolog)], capture_output=True, text=True, env={"PATH": os.environ["PATH"]})
    assert unslurmed.returncode != 0 and "SLURM_JOB_ID is unset" in unslurmed.stderr
    config = dirs["CONFIG_DIR"] / "config.yaml"
    config.write_text("agent_root: /mine\n")  # an operator's edit survives a second install
    assert subprocess.run(["make", "-s", "install", *args], cwd=REPO, capture_output=True).returncode == 0
    assert config.read_text() == "agent_root: /mine\n"
    out = subprocess.run(["make", "-s", "uninstall", *args], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0
    assert not unit.exists() and not (dirs["PREFIX"] / "venv").exists()
    assert config.exists()  # configuration (and state) are kept
