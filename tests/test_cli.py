"""The ``bnwatch`` command line: parser, exit codes, messages, and staying light (no torch)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

import bnwatch
from bnwatch.cli import build_parser, main
from bnwatch.errors import ConfigError


def exit_code(argv: list[str]) -> int | str | None:
    """The code of the ``SystemExit`` that ``main(argv)`` raises (argparse's way out)."""
    with pytest.raises(SystemExit) as info:
        main(argv)
    return info.value.code


def test_help_lists_demo_and_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    assert exit_code(["--help"]) == 0
    out = capsys.readouterr().out
    assert "usage: bnwatch" in out
    assert "demo" in out


def test_demo_help_lists_its_options(capsys: pytest.CaptureFixture[str]) -> None:
    assert exit_code(["demo", "--help"]) == 0
    out = capsys.readouterr().out
    for option in ("--out", "--seed", "--quick"):
        assert option in out


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert exit_code(["--version"]) == 0
    assert capsys.readouterr().out == f"bnwatch {bnwatch.__version__}\n"


def test_unknown_subcommand_exits_2_with_message(capsys: pytest.CaptureFixture[str]) -> None:
    assert exit_code(["frobnicate"]) == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'frobnicate'" in err
    assert "demo" in err  # the message lists what exists


def test_missing_subcommand_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert exit_code([]) == 2
    assert "required: COMMAND" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["demo", "--seed", "-1"], "argument --seed: expected an integer >= 0, got -1"),
        (["demo", "--seed", "one"], "argument --seed: expected an integer >= 0, got 'one'"),
        (["demo", "--frobnicate"], "unrecognized arguments: --frobnicate"),
    ],
)
def test_bad_demo_arguments_exit_2(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert exit_code(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: bnwatch")
    assert message in err


def test_demo_out_must_not_be_a_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    existing = tmp_path / "results.txt"
    existing.write_text("keep me")
    assert exit_code(["demo", "--out", str(existing)]) == 2
    assert "is a file, not a directory" in capsys.readouterr().err
    assert existing.read_text() == "keep me"


def test_demo_arguments_reach_run_demo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import bnwatch.demo

    calls: list[tuple[Any, dict[str, Any]]] = []
    monkeypatch.setattr(bnwatch.demo, "run_demo", lambda *a, **kw: calls.append((a, kw)))
    assert main(["demo", "--out", str(tmp_path / "d"), "--seed", "7", "--quick"]) == 0
    assert calls == [((tmp_path / "d",), {"seed": 7, "quick": True, "store": None})]


def test_demo_defaults() -> None:
    args = build_parser().parse_args(["demo"])
    assert (args.out, args.seed, args.quick) == (Path("bnwatch-demo"), 0, False)


def test_command_errors_exit_1_without_traceback(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import bnwatch.demo

    def fail(*args: Any, **kwargs: Any) -> None:
        raise ConfigError("seed", 3, "something else")

    monkeypatch.setattr(bnwatch.demo, "run_demo", fail)
    assert main(["demo"]) == 1
    err = capsys.readouterr().err
    assert err == "bnwatch demo: error: seed=3 is invalid: expected something else\n"


def run_python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_help_does_not_import_torch_or_sklearn() -> None:
    result = run_python(
        """
        import sys
        import bnwatch.cli
        try:
            bnwatch.cli.main(["--help"])
        except SystemExit as exit:
            assert exit.code == 0, exit.code
        heavy = sorted(m for m in sys.modules if m.split(".")[0] in {"torch", "sklearn"})
        assert not heavy, heavy[:5]
        assert "torch" not in sys.modules
        """
    )
    assert result.returncode == 0, result.stderr
    assert "demo" in result.stdout


def test_runs_as_a_module() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "bnwatch.cli", "--version"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"bnwatch {bnwatch.__version__}"


@pytest.mark.parametrize("empty", ["", "  "])
def test_an_empty_database_variable_is_unset(
    empty: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``BNWATCH_DATABASE_URL=`` means the default database, as the service reads it -- not a
    ``--db=''`` the user never passed."""
    from bnwatch.cli import DEFAULT_DATABASE_URL

    monkeypatch.setenv("BNWATCH_DATABASE_URL", empty)
    monkeypatch.chdir(tmp_path)
    parser = build_parser()
    for argv in (["db", "current"], ["alerts"], ["serve"], ["dashboard"]):
        assert parser.parse_args(argv).db == DEFAULT_DATABASE_URL, argv
    report = ["report", "--model", "m", "--version", "1", "--layer", "l", "--out", "r.html"]
    assert parser.parse_args(report).db == DEFAULT_DATABASE_URL
    profile = ["profile", "--model", "m:f", "--data", "m:d", "--name", "m", "--version", "1"]
    assert parser.parse_args(profile).store == DEFAULT_DATABASE_URL
    assert main(["db", "upgrade"]) == 0
    assert main(["alerts"]) == 0
    assert capsys.readouterr().out.endswith("no open alerts\n")
    assert (tmp_path / "bnwatch.db").is_file()
