"""The service imports, builds its app and serves a request without torch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

CODE = """
import sys
sys.modules["torch"] = None  # any "import torch" now raises ImportError
import bnwatch.service
from bnwatch.service import Settings, create_app
from bnwatch.service.app import app_from_env
from fastapi.testclient import TestClient

app = create_app(Settings(database_url="sqlite:///" + sys.argv[1], api_token="t"))
with TestClient(app) as client:
    assert client.get("/healthz").status_code == 200
    assert client.get("/metrics").status_code == 200
    assert client.get("/openapi.json").status_code == 200
loaded = {name for name, module in sys.modules.items() if module is not None}
assert not any(name == "torch" or name.startswith("torch.") for name in loaded), "torch"
assert "bnwatch.capture" not in loaded
"""


def test_the_service_runs_without_torch(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-c", CODE, str(tmp_path / "db.sqlite")],
        capture_output=True,
        text=True,
        check=False,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr


def test_the_cli_help_of_serve_does_not_import_the_service() -> None:
    code = (
        "import sys\n"
        "from bnwatch.cli import build_parser\n"
        "build_parser().parse_args(['serve', '--db', 'sqlite:///x.db'])\n"
        "assert 'bnwatch.service' not in sys.modules\n"
        "assert 'fastapi' not in sys.modules\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False, cwd=ROOT
    )
    assert result.returncode == 0, result.stderr
