"""Writing files whole: readers see the old file or the new one, never a partial one."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

__all__ = ["atomic_path"]


@contextlib.contextmanager
def atomic_path(path: Path, mode: int = 0o644) -> Iterator[Path]:
    """A temporary path in ``path``'s directory to write to; when the block ends without an
    error it gets ``mode`` (``mkstemp`` makes it 0o600) and is renamed over ``path``,
    otherwise it is removed and ``path`` left as it was (a write that failed midway -- a full
    disk, Ctrl-C -- leaves no truncated file behind)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
