"""One daemon per state directory and agent root: the locks, and a sandbox without /run."""

import os

import pytest

from ebpfmon.errors import EbpfmonError
from ebpfmon.service.instance import LOCK_NAME, hold_instance


def test_a_second_holder_is_refused_naming_the_first(tmp_path):
    first = hold_instance(str(tmp_path / "state"), 42, run_dir=tmp_path / "run")
    try:
        with pytest.raises(EbpfmonError, match=f"another ebpfmon daemon .pid {os.getpid()}. runs on the state"):
            hold_instance(str(tmp_path / "state"), 42, run_dir=tmp_path / "run")
        with pytest.raises(EbpfmonError, match="runs on the same agent root"):  # another state dir, same root
            hold_instance(str(tmp_path / "other"), 42, run_dir=tmp_path / "run")
    finally:
        for lock in first:
            lock.close()
    again = hold_instance(str(tmp_path / "state"), 42, run_dir=tmp_path / "run")  # released: taken
    assert (tmp_path / "state" / LOCK_NAME).read_text().strip() == str(os.getpid())
    for lock in again:
        lock.close()


def test_without_a_writable_run_directory_the_state_lock_alone(tmp_path):
    blocked = tmp_path / "file"
    blocked.write_text("")  # run_dir below a file: it cannot be made
    locks = hold_instance(str(tmp_path / "state"), 42, run_dir=blocked / "run")
    try:
        assert len(locks) == 1
        with pytest.raises(EbpfmonError):
            hold_instance(str(tmp_path / "state"), 42, run_dir=blocked / "run")
    finally:
        for lock in locks:
            lock.close()
