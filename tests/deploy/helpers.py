"""Shared helpers of the deployment tests: paths, YAML, and the tools they need."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import pytest
import yaml  # type: ignore[import-untyped]  # PyYAML (pinned in constraints.txt)

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
PROMETHEUS = ROOT / "deploy" / "prometheus"
GRAFANA = ROOT / "deploy" / "grafana"


def tool(name: str, package: str) -> str:
    """The path of command ``name``; skips without it -- except in CI (``CI=true``), which fails."""
    path = shutil.which(name)
    if path is None:
        message = f"{name} is not installed (apt-get install {package}; `make test` does as root)"
        if os.environ.get("CI"):
            pytest.fail(message + "; CI requires it")
        pytest.skip(message)
    return path


def load_yaml(path: Path) -> Any:
    """A YAML file, parsed (merge keys and anchors resolved)."""
    return yaml.safe_load(path.read_text())


def compose_config(*, env: dict[str, str] | None = None, env_file: Path | None = None) -> str:
    """``docker-compose config`` of the repository's compose file, as text.

    Runs Debian's parser in a clean environment (only ``env`` added) and with ``env_file``
    instead of a developer's ``.env`` (an empty file by default), so the result is the file's
    defaults.  Fails the test with the parser's message if it rejects the file or warns.
    """
    exe = tool("docker-compose", "docker-compose")
    with tempfile.TemporaryDirectory() as home:
        empty = Path(home) / "empty.env"
        empty.write_text("")
        environ = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": home, **(env or {})}
        result = subprocess.run(
            [exe, "--env-file", str(env_file or empty), "-f", str(COMPOSE_FILE), "config"],
            cwd=ROOT,
            env=environ,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
    assert result.returncode == 0, result.stderr
    assert "WARN" not in result.stderr, result.stderr
    return result.stdout
