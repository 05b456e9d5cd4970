"""Settings: from the environment, validated, the token never shown."""

from __future__ import annotations

from pathlib import Path

import pytest

from bnwatch.cli import main
from bnwatch.errors import ConfigError
from bnwatch.service.app import alert_hook_from_env
from bnwatch.service.settings import DEFAULT_MAX_BODY_BYTES, DEFAULT_MAX_PROFILE_BYTES, Settings


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
        ({"BNWATCH_MAX_BODY_BYTES": "0"}, "max_body_bytes"),
        ({"BNWATCH_MAX_PROFILE_BYTES": "256MiB"}, "BNWATCH_MAX_PROFILE_BYTES"),
        ({"BNWATCH_MAX_PROFILE_BYTES": "0"}, "max_profile_bytes"),
        ({"BNWATCH_INGEST_THREADS": "-1"}, "ingest_threads"),
        ({"BNWATCH_API_TOKEN": "two words"}, "api_token"),
        ({"BNWATCH_API_TOKEN": '"quoted-token"'}, "api_token"),
    ],
)
def test_invalid_settings_name_the_variable(environ: dict[str, str], argument: str) -> None:
    with pytest.raises(ConfigError) as info:
        Settings.from_env(environ)
    assert info.value.argument == argument
    token = environ.get("BNWATCH_API_TOKEN")
    if token:
        assert token not in str(info.value)


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
