"""What a program file is, whatever it is called.

A copy of ssh named `updater`, a symlink to socat, socat run from a memfd:
the name says nothing, the file does. The installed programs the packs name
(list programs_identified_by_content) are found in the system's bin
directories; an agent's executable is the same program when it is the same
file (device and inode: hard and symbolic links) or has the same content
(size first, then a digest, each file hashed once and cached by device,
inode, size and mtime). Lookups never raise: an unreadable file is unknown.
"""

from __future__ import annotations

import glob
import hashlib
import os
import stat
from collections import OrderedDict

BIN_DIRS = ("/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin")
# the dynamic loader runs any program named in its arguments (`ld-linux-x86-64.so.2 /usr/bin/ssh`)
LOADER_GLOBS = ("/lib*/ld-linux*.so*", "/lib/*-linux-gnu*/ld-linux*.so*", "/usr/lib*/ld-linux*.so*",
                "/usr/lib/*-linux-gnu*/ld-linux*.so*", "/lib/ld-musl-*.so*")
LOADER = "ld.so"
# glibc ld.so's options that take a value (ld.so --help)
LOADER_OPTIONS_WITH_VALUE = {"--library-path", "--inhibit-rpath", "--audit", "--preload", "--argv0",
                             "--glibc-hwcaps-prefix", "--glibc-hwcaps-mask"}
MAX_CACHED = 4096
NOTHING: tuple[str, ...] = ()

FileKey = tuple[int, int, int, int]  # device, inode, size, mtime


def _key(st: os.stat_result) -> FileKey:
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


class ProgramIdentifier:
    def __init__(self, bin_dirs: tuple[str, ...] = BIN_DIRS, loader_globs: tuple[str, ...] = LOADER_GLOBS):
        self.bin_dirs = bin_dirs
        self.loader_globs = loader_globs
        self._by_inode: dict[tuple[int, int], set[str]] = {}  # installed file -> its names
        self._by_size: dict[int, list[tuple[str, set[str]]]] = {}  # size -> (path, names)
        self._digests: OrderedDict[FileKey, bytes | None] = OrderedDict()
        self._answers: OrderedDict[FileKey, tuple[str, ...]] = OrderedDict()
        self.look_for(())

    def look_for(self, names) -> int:
        """Finds the installed programs with these names (and the dynamic loader); returns how
        many files. Called at start and on every rule reload."""
        files: dict[tuple[int, int], tuple[str, os.stat_result, set[str]]] = {}

        def add(path: str, name: str) -> None:
            try:
                st = os.stat(path)
            except OSError:
                return
            if stat.S_ISREG(st.st_mode):
                files.setdefault((st.st_dev, st.st_ino), (os.path.realpath(path), st, set()))[2].add(name)

        for name in set(names):
            if "/" not in name:
                for directory in self.bin_dirs:
                    add(os.path.join(directory, name), name)
        for pattern in self.loader_globs:
            for path in glob.glob(pattern):
                add(path, LOADER)
        self._by_inode = {inode: found[2] for inode, found in files.items()}
        self._by_size = {}
        for path, st, found in files.values():
            self._by_size.setdefault(st.st_size, []).append((path, found))
        self._answers.clear()
        return len(files)

    def identify(self, path: str) -> tuple[str, ...]:
        """The names of the installed programs this file is (sorted), or () for none. path may
        be /proc/PID/exe, which reaches a deleted file or a memfd too."""
        try:
            st = os.stat(path)
        except OSError:
            return NOTHING
        names = self._by_inode.get((st.st_dev, st.st_ino))
        if names is not None:
            return tuple(sorted(names))
        candidates = self._by_size.get(st.st_size)
        if not candidates:
            return NOTHING
        key = _key(st)
        answer = self._answers.get(key)
        if answer is None:
            digest = self._digest(path, key)
            found: set[str] = set()
            for installed, names in candidates:
                if digest is not None and digest == self._digest_of(installed):
                    found |= names
            answer = tuple(sorted(found))
            _put(self._answers, key, answer)
        return answer

    def _digest_of(self, path: str) -> bytes | None:
        try:
            return self._digest(path, _key(os.stat(path)))
        except OSError:
            return None

    def _digest(self, path: str, key: FileKey) -> bytes | None:
        if key in self._digests:
            return self._digests[key]
        try:
            with open(path, "rb") as f:
                digest = hashlib.file_digest(f, "sha256").digest()
        except OSError:
            digest = None
        _put(self._digests, key, digest)
        return digest


def _put(cache: OrderedDict, key, value) -> None:
    cache[key] = value
    if len(cache) > MAX_CACHED:
        cache.popitem(last=False)


def loaded_program(argv: list[str]) -> tuple[str, list[str]] | None:
    """For the dynamic loader's command line (`ld.so [OPTIONS] PROGRAM ARGS`): the program's
    path as given and the argv the program sees (--argv0 sets its argv[0]); None when the
    loader runs no program (--list, --help, no arguments)."""
    argv0 = None
    i = 1
    while i < len(argv):
        arg = argv[i]
        name, eq, value = arg.partition("=")
        if name in LOADER_OPTIONS_WITH_VALUE:
            if not eq:
                i += 1
                value = argv[i] if i < len(argv) else ""
            if name == "--argv0":
                argv0 = value
            i += 1
        elif arg in ("--list", "--verify", "--help", "--version", "--list-tunables", "--list-diagnostics"):
            return None
        elif arg.startswith("--"):
            i += 1
        else:
            return arg, [argv0 if argv0 is not None else arg, *argv[i + 1:]]
    return None
