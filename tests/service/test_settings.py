"""Settings: from the environment, validated, the token never shown."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from bnwatch.cli import main
from bnwatch.errors import ConfigError
from bnwatch.service.app import alert_hook_from_env
from bnwatch.service.settings import DEFAULT_MAX_BODY_BYTES, DEFAULT_MAX_PROFILE_BYTES, Settings
from bnwatch.triggers import TriggerPolicy, sign, verify_signature


def test_from_env() -> None:
    settings = Settings.from_env(
        {
            "BNWATCH_DATABASE_URL": "postgresql://db/bnwatch",
            "BNWATCH_API_TOKEN": " s3cret-token ",
            "BNWATCH_MAX_BODY_BYTES": "1024",
            "BNWATCH_MAX_PROFILE_BYTES": "4096",
            "BNWATCH_INGEST_THREADS": "2",
        }
    )
    assert settings.database_url == "postgresql://db/bnwatch"
    assert settings.api_token == "s3cret-token"
    assert (settings.max_body_bytes, settings.ingest_threads) == (1024, 2)
    assert settings.max_profile_bytes == 4096
    assert "s3cret" not in repr(settings)


def test_defaults_and_empty_variables() -> None:
    settings = Settings.from_env({"BNWATCH_API_TOKEN": ""})
    assert settings.api_token is None
    assert settings.database_url == "sqlite:///bnwatch.db"
    assert settings.max_body_bytes == DEFAULT_MAX_BODY_BYTES == 64 * 1024 * 1024
    assert settings.max_profile_bytes == DEFAULT_MAX_PROFILE_BYTES == 256 * 1024 * 1024
    assert Settings.from_env({}, database_url="sqlite:///x.db").database_url == "sqlite:///x.db"


@pytest.mark.parametrize(
    ("environ", "argument"),
    [
        ({"BNWATCH_MAX_BODY_BYTES": "64MB"}, "BNWATCH_MAX_BODY_BYTES"),
        ({"BNWATCH_MAX_BODY_BYTES": "0"}, "BNWATCH_MAX_BODY_BYTES"),
        ({"BNWATCH_MAX_PROFILE_BYTES": "256MiB"}, "BNWATCH_MAX_PROFILE_BYTES"),
        ({"BNWATCH_MAX_PROFILE_BYTES": "0"}, "BNWATCH_MAX_PROFILE_BYTES"),
        ({"BNWATCH_INGEST_THREADS": "-1"}, "BNWATCH_INGEST_THREADS"),
        ({"BNWATCH_INGEST_THREADS": "four"}, "BNWATCH_INGEST_THREADS"),
        ({"BNWATCH_API_TOKEN": "two words"}, "BNWATCH_API_TOKEN"),
        ({"BNWATCH_API_TOKEN": '"quoted-token"'}, "BNWATCH_API_TOKEN"),
    ],
)
def test_invalid_settings_name_the_variable(environ: dict[str, str], argument: str) -> None:
    """Every error of a value read from the environment names the variable to fix (the
    checks of the values themselves used to name the attribute: max_body_bytes=0)."""
    with pytest.raises(ConfigError) as info:
        Settings.from_env(environ)
    assert info.value.argument == argument
    assert str(info.value).startswith(f"{argument}=")
    token = environ.get("BNWATCH_API_TOKEN")
    if token:
        assert token not in str(info.value)
    else:
        assert info.value.value == environ[argument]


def test_invalid_overrides_name_the_attribute() -> None:
    """A keyword override is code, not the environment: its error names the attribute."""
    with pytest.raises(ConfigError) as info:
        Settings.from_env({"BNWATCH_MAX_BODY_BYTES": "10"}, max_body_bytes=0)
    assert info.value.argument == "max_body_bytes"


def test_alert_configuration(tmp_path: Path) -> None:
    assert callable(alert_hook_from_env({}))
    config = tmp_path / "alerts.toml"
    config.write_text("[alerts]\nno_data_seconds = 60\n")
    assert callable(alert_hook_from_env({"BNWATCH_ALERTS_CONFIG": str(config)}))
    config.write_text("[alerts]\nnope = 1\n")
    with pytest.raises(ConfigError, match=r"alerts\.nope"):
        alert_hook_from_env({"BNWATCH_ALERTS_CONFIG": str(config)})


def test_serve_refuses_a_bad_alert_configuration(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("BNWATCH_ALERTS_CONFIG", str(tmp_path / "missing.toml"))
    assert main(["serve", "--db", f"sqlite:///{tmp_path / 'db.sqlite'}"]) == 1
    assert "alerts config" in capsys.readouterr().err


# -- recalibration triggers --------------------------------------------------------------------
WEBHOOK = {"BNWATCH_WEBHOOK_URL": "https://recalibrator.internal:8443/hook?x=1"}
SECRET = {"BNWATCH_WEBHOOK_SECRET": "hmac-s3cret-value"}


def test_triggers_are_off_by_default_with_the_policy_defaults() -> None:
    settings = Settings.from_env({"BNWATCH_WEBHOOK_URL": " ", "BNWATCH_WEBHOOK_SECRET": ""})
    assert not settings.triggers_enabled
    assert (settings.webhook_url, settings.webhook_secret) == (None, None)
    assert settings.triggers == TriggerPolicy(
        kinds=("drift",), persist_seconds=0.0, cooldown_seconds=3600.0, daily_cap=3
    )


def test_trigger_settings_from_env() -> None:
    settings = Settings.from_env(
        {
            **WEBHOOK,
            **SECRET,
            "BNWATCH_TRIGGER_KINDS": " drift, no_data ,",
            "BNWATCH_TRIGGER_PERSIST_SECONDS": "300",
            "BNWATCH_TRIGGER_COOLDOWN_SECONDS": "1.5",
            "BNWATCH_TRIGGER_DAILY_CAP": "7",
        }
    )
    assert settings.triggers_enabled
    assert settings.webhook_url == WEBHOOK["BNWATCH_WEBHOOK_URL"]
    assert settings.webhook_secret == SECRET["BNWATCH_WEBHOOK_SECRET"]
    assert settings.triggers == TriggerPolicy(("drift", "no_data"), 300.0, 1.5, 7)
    assert "s3cret" not in repr(settings)
    assert "s3cret" not in str(settings)


def test_the_webhook_secret_signs_exactly_as_set() -> None:
    """A secret read into the variable from a file (a Kubernetes secret) ends in a newline; a
    receiver reading the same variable verifies with it, so the service must sign with it too
    (stripped, every webhook failed its check: HTTP 401, the recalibration failed)."""
    raw = "hmac-s3cret-value\n"
    settings = Settings.from_env({**WEBHOOK, "BNWATCH_WEBHOOK_SECRET": raw})
    assert settings.webhook_secret == raw
    body = b'{"recalibration_id": 1}'
    header = sign(body, settings.webhook_secret, int(time.time()))
    assert verify_signature(body, header, raw)
    blank = Settings.from_env({"BNWATCH_WEBHOOK_SECRET": " \n"})
    assert blank.webhook_secret is None  # blank is unset, whatever the whitespace


@pytest.mark.parametrize(
    ("environ", "variable", "allowed"),
    [
        (WEBHOOK, "BNWATCH_WEBHOOK_SECRET is unset", "since BNWATCH_WEBHOOK_URL is set"),
        (SECRET, "BNWATCH_WEBHOOK_URL is unset", "since BNWATCH_WEBHOOK_SECRET is set"),
        ({"BNWATCH_WEBHOOK_URL": "ftp://host/x", **SECRET}, "BNWATCH_WEBHOOK_URL", "http://"),
        ({"BNWATCH_WEBHOOK_URL": "https:///hook", **SECRET}, "BNWATCH_WEBHOOK_URL", "host"),
        ({"BNWATCH_WEBHOOK_URL": "http://h:99999/", **SECRET}, "BNWATCH_WEBHOOK_URL", "host"),
        ({"BNWATCH_TRIGGER_KINDS": "drift,weather"}, "BNWATCH_TRIGGER_KINDS", "no_data"),
        ({"BNWATCH_TRIGGER_KINDS": " , "}, "BNWATCH_TRIGGER_KINDS", "comma-separated"),
        ({"BNWATCH_TRIGGER_PERSIST_SECONDS": "5m"}, "BNWATCH_TRIGGER_PERSIST_SECONDS", ">= 0"),
        ({"BNWATCH_TRIGGER_PERSIST_SECONDS": "-1"}, "BNWATCH_TRIGGER_PERSIST_SECONDS", ">= 0"),
        ({"BNWATCH_TRIGGER_COOLDOWN_SECONDS": "nan"}, "BNWATCH_TRIGGER_COOLDOWN_SECONDS", "finite"),
        ({"BNWATCH_TRIGGER_COOLDOWN_SECONDS": "inf"}, "BNWATCH_TRIGGER_COOLDOWN_SECONDS", "finite"),
        ({"BNWATCH_TRIGGER_DAILY_CAP": "0"}, "BNWATCH_TRIGGER_DAILY_CAP", ">= 1"),
        ({"BNWATCH_TRIGGER_DAILY_CAP": "2.5"}, "BNWATCH_TRIGGER_DAILY_CAP", "whole number"),
    ],
)
def test_invalid_trigger_settings_name_the_variable(
    environ: dict[str, str], variable: str, allowed: str
) -> None:
    with pytest.raises(ConfigError) as info:
        Settings.from_env(environ)
    assert info.value.argument == variable.split()[0]
    assert str(info.value).startswith(variable)  # "... is unset", not "...=None is invalid"
    assert allowed in info.value.allowed
    assert "s3cret" not in str(info.value)


def test_trigger_settings_in_code_are_checked() -> None:
    with pytest.raises(ConfigError, match="webhook_secret"):
        Settings(webhook_url="http://127.0.0.1:9/hook")
    with pytest.raises(ConfigError, match="webhook_url"):
        Settings(webhook_secret="s3cret")
    with pytest.raises(ConfigError, match="webhook_url") as info:
        Settings(webhook_url="recalibrator:80", webhook_secret="s3cret")
    assert "s3cret" not in str(info.value)
    with pytest.raises(ConfigError, match="triggers"):
        Settings(triggers={"kinds": ["drift"]})  # type: ignore[arg-type]
    settings = Settings(webhook_url="http://127.0.0.1:9/hook", webhook_secret="s3cret")
    assert settings.triggers_enabled and "s3cret" not in repr(settings)


def test_the_docstring_lists_every_variable() -> None:
    from bnwatch.service import settings as module

    names = {v for k, v in vars(module).items() if k.endswith("_ENV") and isinstance(v, str)}
    assert len(names) >= 12
    assert module.__doc__ is not None
    missing = [name for name in names if f"``{name}``" not in module.__doc__]
    assert not missing, f"add to the table of bnwatch/service/settings.py: {missing}"
