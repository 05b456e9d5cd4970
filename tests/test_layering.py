"""The core must import without torch; import-linter (in `make lint`) checks the layers."""

from __future__ import annotations

import subprocess
import sys

import pytest

CORE = [
    "bnwatch",
    "bnwatch.stats",
    "bnwatch.drift",
    "bnwatch.schema",
    "bnwatch.sink",
    "bnwatch.errors",
]


@pytest.mark.parametrize("module", CORE)
def test_core_imports_without_torch(module: str) -> None:
    code = (
        "import sys\n"
        "sys.modules['torch'] = None  # any 'import torch' now raises ImportError\n"
        f"import {module}\n"
        "assert 'torch' not in {k for k, v in sys.modules.items() if v is not None}\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr


def test_top_level_api_is_lazy() -> None:
    import bnwatch

    assert callable(bnwatch.watch)
    assert callable(bnwatch.profile)
    assert bnwatch.Monitor.__name__ == "Monitor"
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        bnwatch.nope  # type: ignore[attr-defined]  # noqa: B018


def test_every_subpackage_is_packaged() -> None:
    """pyproject lists packages explicitly (migrations/ is mapped in): none may be missing."""
    from pathlib import Path

    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

    root = Path(__file__).resolve().parents[1]
    listed = set(
        tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    )
    found = {
        ".".join(p.parent.relative_to(root).parts) for p in (root / "bnwatch").rglob("__init__.py")
    }
    assert found <= listed, f"add to [tool.setuptools] packages: {sorted(found - listed)}"
