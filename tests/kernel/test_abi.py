"""The ctypes mirror (ebpfmon/kernel/abi.py) against probes/events.h.

Static asserts generated from the mirror are compiled by bcc's clang for the
BPF target, the compiler the probes use: any size, offset or constant that
differs fails to compile, and the message names it.
"""

import ctypes

from ebpfmon.kernel import abi
from ebpfmon.kernel.probeset import PROBES_DIR, import_bcc


def layout_asserts() -> str:
    lines = ['#include "events.h"']
    for cname, mirror in abi.STRUCTS.items():
        lines.append(f'_Static_assert(sizeof(struct {cname}) == {ctypes.sizeof(mirror)}, '
                     f'"sizeof(struct {cname}) != {ctypes.sizeof(mirror)} in abi.py");')
        for fname, _ in mirror._fields_:
            field = getattr(mirror, fname)
            lines.append(
                f'_Static_assert(__builtin_offsetof(struct {cname}, {fname}) == {field.offset}, '
                f'"offset of {cname}.{fname} != {field.offset} in abi.py");')
            lines.append(
                f'_Static_assert(sizeof(((struct {cname} *)0)->{fname}) == {field.size}, '
                f'"size of {cname}.{fname} != {field.size} in abi.py");')
    for name, value in abi.CONSTANTS.items():
        lines.append(f'_Static_assert({name} == {value}, "{name} != {value} in abi.py");')
    return "\n".join(lines)


def test_every_struct_and_constant_is_mirrored():
    # every struct in the header has a mirror, every enum member a constant
    header = (PROBES_DIR / "events.h").read_text()
    import re
    structs = set(re.findall(r"^struct (\w+) \{", header, re.M))
    assert structs == set(abi.STRUCTS)
    enum_members = set(re.findall(r"^\t([A-Z][A-Z_]+) = ", header, re.M))
    defines = set(re.findall(r"^#define ([A-Z_]+) ", header, re.M))
    assert enum_members | defines == set(abi.CONSTANTS)


def test_layout_matches_the_c_header(bpf):
    bcc = import_bcc()
    b = bcc.BPF(text=layout_asserts().encode(), cflags=[f"-I{PROBES_DIR}"])
    b.cleanup()


def test_a_wrong_mirror_fails_to_compile(bpf, monkeypatch, capfd):
    # the check can fail: give a struct the wrong size and it must not compile, and for that
    # reason (clang writes its errors to the process's stderr: captured at the descriptor)
    class Broken(ctypes.Structure):
        _fields_ = [("child_pid", ctypes.c_uint32)]

    monkeypatch.setattr(abi, "STRUCTS", {"fork_event": Broken})
    monkeypatch.setattr(abi, "CONSTANTS", {})
    bcc = import_bcc()
    try:
        bcc.BPF(text=layout_asserts().encode(), cflags=[f"-I{PROBES_DIR}"])
    except Exception as e:
        assert "compile" in str(e).lower()
    else:
        raise AssertionError("a wrong layout compiled")
    errors = capfd.readouterr().err
    assert "sizeof(struct fork_event) != 4 in abi.py" in errors, errors
    assert "offset of fork_event.child_pid != 0 in abi.py" in errors, errors  # after the header, not first
