"""The service imports, builds its app and serves a request without torch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

CODE = """
import sys
sys.modules["torch"] = None  # any "import torch" now raises ImportError
import bnwatch.service
from bnwatch.service import Settings, create_app
from bnwatch.service.app import app_from_env
from fastapi.testclient import TestClient

settings = Settings(
    database_url="sqlite:///" + sys.argv[1],
    api_token="t",
    webhook_url="http://127.0.0.1:9/hook",  # triggers on: the webhook worker starts and stops
    webhook_secret="s3cret",
)
app = create_app(settings)
assert app.state.bnwatch.triggers is not None
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


TRIGGER_CORE = """
import sys
sys.modules["torch"] = None  # any "import torch" now raises ImportError
import bnwatch.triggers
from bnwatch.triggers import (
    AlertPipeline, CallbackAction, Outcome, Trigger, TriggerEvent, TriggerPolicy, WebhookAction,
    sign, verify_signature,
)
from bnwatch.triggers.core import Action

trigger = Trigger(WebhookAction("http://127.0.0.1:9/hook", "s3cret"), TriggerPolicy())
assert verify_signature(b"{}", sign(b"{}", "s3cret", int(__import__("time").time())), "s3cret")
notified = CallbackAction(lambda event: None)(TriggerEvent(1, "m", "1", 1, "drift", None, {}))
assert isinstance(notified, Outcome) and notified.status == "notified"  # a notification
loaded = {name for name, module in sys.modules.items() if module is not None}
assert not any(name == "torch" or name.startswith("torch.") for name in loaded), "torch"
assert not loaded & {"bnwatch.capture", "bnwatch.recalibration", "bnwatch.triggers.recalibrate"}
try:
    bnwatch.triggers.RecalibrateAction  # the torch action loads on demand, so it needs torch
except ImportError:
    pass
else:
    raise AssertionError("RecalibrateAction imported without torch")
"""


def test_the_trigger_core_imports_without_torch() -> None:
    result = subprocess.run(
        [sys.executable, "-c", TRIGGER_CORE], capture_output=True, text=True, check=False, cwd=ROOT
    )
    assert result.returncode == 0, result.stderr


def test_the_torch_action_is_reexported_lazily() -> None:
    import bnwatch.triggers
    from bnwatch.triggers import RecalibrateAction, hook_free_copy
    from bnwatch.triggers.recalibrate import RecalibrateAction as Defined

    assert RecalibrateAction is Defined
    assert callable(hook_free_copy)
    assert set(bnwatch.triggers.__all__) >= {"RecalibrateAction", "WebhookAction", "Trigger"}
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        bnwatch.triggers.Nope  # type: ignore[attr-defined]  # noqa: B018


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
