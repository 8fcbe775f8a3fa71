"""`os.posix_spawn` without the GIL: the C library's posix_spawn called through ctypes.

CPython's `os.posix_spawn` holds the GIL for the whole call, and glibc's posix_spawn returns only
once the child has exec'd (vfork semantics): on a busy host that is the time the child waits for a
core, then loads its program, and meanwhile no other thread of the engine runs, its event loop
(the pass) included. A ctypes call releases the GIL, so a spawn in a launcher or pool thread
stalls nothing else. Same arguments and errors as `os.posix_spawn` for what the executors use
(file actions DUP2, OPEN, CLOSE; setsid); where the C library lacks it, `os.posix_spawn` itself.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Mapping, Sequence

# glibc's spawn.h: POSIX_SPAWN_SETSID (2.26+). The opaque structures are 80 (file actions) and
# 336 (attributes) bytes on x86_64 glibc; the buffers are sized well over that on any platform.
_SETSID = 0x80
_OPAQUE_BYTES = 1024


def _libc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        for name in (
            "posix_spawn",
            "posix_spawn_file_actions_init",
            "posix_spawn_file_actions_adddup2",
            "posix_spawn_file_actions_addopen",
            "posix_spawn_file_actions_addclose",
            "posix_spawn_file_actions_destroy",
            "posix_spawnattr_init",
            "posix_spawnattr_setflags",
            "posix_spawnattr_destroy",
        ):
            getattr(libc, name)
    except (OSError, AttributeError):
        return None
    if os.confstr("CS_GNU_LIBC_VERSION") is None:
        return None  # the flag value and structure sizes above are glibc's
    libc.posix_spawn_file_actions_addopen.argtypes = [
        ctypes.c_void_p,
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_int,
        ctypes.c_uint,
    ]
    libc.posix_spawn_file_actions_adddup2.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int]
    libc.posix_spawn_file_actions_addclose.argtypes = [ctypes.c_void_p, ctypes.c_int]
    libc.posix_spawnattr_setflags.argtypes = [ctypes.c_void_p, ctypes.c_short]
    return libc


_LIBC = _libc()


def posix_spawn(
    path: str,
    argv: Sequence[str],
    env: Mapping[str, str],
    *,
    file_actions: Sequence[tuple[object, ...]] = (),
    setsid: bool = False,
) -> int:
    """Spawn `path` with `argv` and exactly `env`; returns the child's PID. Raises OSError as
    `os.posix_spawn` does (an exec that fails included)."""
    libc = _LIBC
    if libc is None:
        return os.posix_spawn(path, list(argv), dict(env), file_actions=list(file_actions), setsid=setsid)
    actions = ctypes.create_string_buffer(_OPAQUE_BYTES)
    attributes = ctypes.create_string_buffer(_OPAQUE_BYTES)
    _check(libc.posix_spawn_file_actions_init(actions), path)
    try:
        _check(libc.posix_spawnattr_init(attributes), path)
        try:
            if setsid:
                _check(libc.posix_spawnattr_setflags(attributes, _SETSID), path)
            kept: list[bytes] = []  # paths of OPEN actions, alive until the spawn
            for action in file_actions:
                _add(libc, actions, action, path, kept)
            arguments = (ctypes.c_char_p * (len(argv) + 1))(*map(os.fsencode, argv), None)
            encoded = [os.fsencode(name) + b"=" + os.fsencode(value) for name, value in env.items()]
            environment = (ctypes.c_char_p * (len(encoded) + 1))(*encoded, None)
            pid = ctypes.c_int(0)
            # The GIL is released for the call (ctypes does so for every foreign call).
            program = os.fsencode(path)
            code = libc.posix_spawn(ctypes.byref(pid), program, actions, attributes, arguments, environment)
            _check(code, path)
            return pid.value
        finally:
            libc.posix_spawnattr_destroy(attributes)
    finally:
        libc.posix_spawn_file_actions_destroy(actions)


def _add(
    libc: ctypes.CDLL,
    actions: ctypes.Array[ctypes.c_char],
    action: tuple[object, ...],
    path: str,
    kept: list[bytes],
) -> None:
    kind, *args = action
    if kind == os.POSIX_SPAWN_DUP2:
        fd, new_fd = args
        _check(libc.posix_spawn_file_actions_adddup2(actions, fd, new_fd), path)
    elif kind == os.POSIX_SPAWN_OPEN:
        fd, file, flags, mode = args
        kept.append(os.fsencode(str(file)))
        _check(libc.posix_spawn_file_actions_addopen(actions, fd, kept[-1], flags, mode), path)
    elif kind == os.POSIX_SPAWN_CLOSE:
        (fd,) = args
        _check(libc.posix_spawn_file_actions_addclose(actions, fd), path)
    else:
        raise ValueError(f"unsupported file action {action!r}")


def _check(code: int, path: str) -> None:
    """posix_spawn and its helpers return the error number (0: done); they do not set errno."""
    if code:
        raise OSError(code, os.strerror(code), path)
