"""Installed from a wheel, away from the checkout, ebpfmon finds its probes and rules."""

import subprocess
import sys

from helpers import REPO


def test_wheel_carries_probes_and_rules(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path / "dist"),
                    str(REPO)], check=True, capture_output=True)
    wheel = next((tmp_path / "dist").glob("ebpfmon-*.whl"))
    venv = tmp_path / "venv"
    subprocess.run(["/usr/bin/python3", "-m", "venv", "--system-site-packages", str(venv)], check=True)
    subprocess.run([str(venv / "bin/pip"), "install", "-q", "--disable-pip-version-check", str(wheel)], check=True,
                   capture_output=True)
    out = subprocess.run([str(venv / "bin/ebpfmon"), "rules", "list"], cwd="/", capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "Reverse SSH tunnel" in out.stdout and str(venv / "share/ebpfmon/rules") in out.stdout
    out = subprocess.run([str(venv / "bin/ebpfmon"), "trace", "--print-c"], cwd="/", capture_output=True, text=True)
    assert out.returncode == 0 and "sys_enter_execve" in out.stdout
    out = subprocess.run([str(venv / "bin/python"), "-c", "import ebpfmon.stream._decode as d; print(d.__file__)"], cwd="/",
                         capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.startswith(str(venv)), out.stderr  # the decoder's C, built
    out = subprocess.run([str(venv / "bin/ebpfmon"), "--version"], capture_output=True, text=True)
    assert out.stdout.startswith("ebpfmon ")
