"""Writing files whole: readers see the old file or the new one, never a partial one."""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
from collections.abc import Iterator
from pathlib import Path

__all__ = ["atomic_path"]

_FLAGS = (
    os.O_WRONLY
    | os.O_CREAT
    | os.O_EXCL
    | getattr(os, "O_NOFOLLOW", 0)
    | getattr(os, "O_CLOEXEC", 0)
    | getattr(os, "O_BINARY", 0)
)
_ATTEMPTS = 100
"""Temporary names tried before giving up (``tempfile.mkstemp`` tries as many)."""


@contextlib.contextmanager
def atomic_path(path: Path, mode: int | None = None) -> Iterator[Path]:
    """A temporary path in ``path``'s directory to write to; when the block ends without an
    error it is renamed over ``path``, otherwise it is removed and ``path`` left as it was (a
    write that failed midway -- a full disk, Ctrl-C -- leaves no truncated file behind).

    The file keeps the permissions ``path`` had; a new one gets ``mode`` if given, else what
    any new file gets (``0o666`` less the process's umask).  The temporary file is created
    with them (the kernel applies the umask), so it is never readable by more than the file
    it becomes (and is writable by its owner while the block runs).  The umask is never
    read: ``os.umask`` reads it only by setting it, for the whole process, so a file another
    thread created meanwhile would get the wrong one, and a value read once (at import) goes
    stale when the program sets another.  The owner is the writing process's (a rename
    makes a new file).
    """
    try:
        existing: int | None = stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        existing = None
    wanted = existing if existing is not None else mode  # None: as the umask says
    fd, tmp = _create(path, 0o666 if wanted is None else (wanted & 0o777) | 0o600)
    os.close(fd)
    try:
        yield tmp
        if wanted is not None:
            os.chmod(tmp, wanted)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _create(path: Path, mode: int) -> tuple[int, Path]:
    """A new file ``.<name>.<random>.tmp`` beside ``path``, created with ``mode`` (less the
    umask), and an open descriptor of it."""
    for _ in range(_ATTEMPTS):
        tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
        try:
            return os.open(tmp, _FLAGS, mode), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name beside {path} after {_ATTEMPTS} tries")
