"""atomic_path: a file written whole keeps the permissions it had, or gets the umask's."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from bnwatch.files import atomic_path

pytestmark = pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def umask() -> Iterator[None]:
    """The test's umask changes, restored after it."""
    before = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(before)


def write(path: Path, text: str) -> int:
    """Write ``text`` through :func:`atomic_path`; returns the temporary file's mode."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
        during = mode_of(tmp)
    return during


@pytest.mark.usefixtures("umask")
@pytest.mark.parametrize(
    ("mask", "expected"), [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)], ids=oct
)
def test_a_new_file_gets_the_umasks_permissions(tmp_path: Path, mask: int, expected: int) -> None:
    """Every file was chmod 0644: a report written under umask 077 was readable by all."""
    os.umask(mask)
    out = tmp_path / "report.json"
    assert write(out, "{}") == expected
    assert mode_of(out) == expected
    assert out.read_text() == "{}"
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]


@pytest.mark.usefixtures("umask")
@pytest.mark.parametrize("existing", [0o600, 0o640, 0o664, 0o444], ids=oct)
def test_an_existing_file_keeps_its_permissions(tmp_path: Path, existing: int) -> None:
    """A 0600 file written again was widened to 0644; and the new content is never readable
    by more than the old one was, not even while it is written."""
    out = tmp_path / "secret.json"
    out.write_text("old")
    out.chmod(existing)
    during = write(out, "new")
    assert mode_of(out) == existing
    assert out.read_text() == "new"
    assert during & ~(existing | 0o600) == 0


@pytest.mark.usefixtures("umask")
def test_a_given_mode_is_a_new_files(tmp_path: Path) -> None:
    os.umask(0o077)
    out = tmp_path / "shared.bin"
    with atomic_path(out, mode=0o644) as tmp:
        tmp.write_bytes(b"x")
    assert mode_of(out) == 0o644
    out.chmod(0o600)
    with atomic_path(out, mode=0o644) as tmp:
        tmp.write_bytes(b"y")
    assert mode_of(out) == 0o600  # an existing file keeps its own


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    out = tmp_path / "report.html"
    out.write_text("old")

    def fail() -> None:
        with atomic_path(out) as tmp:
            tmp.write_text("half")
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        fail()
    assert out.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["report.html"]
