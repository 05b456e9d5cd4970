"""`bnwatch recalibrate --recalibration ID`: the run finishes a pending recalibration in the
database (--db) or through a service (--service): applied with its buffers, or failed."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
import torch

import bnwatch
from bnwatch.cli import main
from bnwatch.store.migrate import engine_for
from bnwatch.store.repository import Repository
from tests.recalibration.test_recalibrate import data, net
from tests.service.helpers import TOKEN, serve

FIX = "tests.recalibration.cli_fixture"
LAYERS = ["1", "5", "8"]  # the BatchNorm layers of net()


@pytest.fixture
def db_url(migrated_db_url: str) -> str:
    """Each kind of database at the current schema (every test here opens it migrated)."""
    return migrated_db_url


@pytest.fixture
def repo(db_url: str) -> Iterator[Repository]:
    """A store that knows net@1's layers (from a profile)."""
    bnwatch.profile(net(), data(2), name="net", version="1", store=db_url)
    engine = engine_for(db_url, create=False)
    yield Repository(engine)
    engine.dispose()


def argv(out: Path, *extra: str, data_spec: str = f"{FIX}:loader") -> list[str]:
    return [
        "recalibrate",
        "--model",
        f"{FIX}:factory",
        "--data",
        data_spec,
        "--held-out",
        f"{FIX}:held_out",
        "--out",
        str(out),
        "--num-samples",
        "64",
        *extra,
    ]


def the(repo: Repository, rid: int) -> Any:
    (rec,) = [r for r in repo.recalibrations() if r.id == rid]
    return rec


def recalibrated_refs(repo: Repository) -> dict[int, str]:
    with repo.engine.connect() as conn:
        rows = conn.execute(
            sa.text(
                "SELECT refs.id, layers.name FROM refs JOIN layers ON layers.id = refs.layer_id "
                "WHERE refs.kind = 'recalibrated'"
            )
        ).all()
    return {int(i): str(n) for i, n in rows}


def lineages(repo: Repository) -> dict[int, str]:
    """The ``data`` of every ``recalibrated`` reference's lineage (as sorted JSON)."""
    with repo.engine.connect() as conn:
        rows = conn.execute(
            sa.text("SELECT id, lineage FROM refs WHERE kind = 'recalibrated'")
        ).all()
    return {
        int(i): json.dumps((v if isinstance(v, dict) else json.loads(v))["data"], sort_keys=True)
        for i, v in rows
    }


def test_an_applied_run_is_reported_with_its_buffers_and_output(
    db_url: str, repo: Repository, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rid = repo.start_recalibration("net", "1", method="dashboard")
    out = tmp_path / "bn.pt"
    assert main(argv(out, "--recalibration", str(rid), "--db", db_url)) == 0
    captured = capsys.readouterr()
    summary = json.loads(captured.out[: captured.out.rindex("}") + 1])
    assert summary["status"] == "applied" and out.exists()
    assert f"recalibration {rid} of net@1 reported applied" in captured.err
    rec = the(repo, rid)
    assert rec.status == "applied" and rec.finished_at is not None
    assert rec.outcome["out"] == str(out.resolve())
    assert rec.outcome["samples"] == summary["samples"] and rec.outcome["improved"] is True
    assert sorted(rec.outcome["references"]) == LAYERS
    assert recalibrated_refs(repo) == {v: k for k, v in rec.outcome["references"].items()}
    data = {"source": f"{FIX}:loader", "held_out": f"{FIX}:held_out", "checkpoint": None}
    assert rec.outcome["data"] == data  # which data, in the outcome and every lineage
    assert set(lineages(repo).values()) == {json.dumps(data, sort_keys=True)}

    # running it again for the same recalibration is refused before the run: nothing is
    # recalibrated, written or reported
    out.unlink()
    assert main(argv(out, "--recalibration", str(rid), "--db", db_url)) == 1
    err = capsys.readouterr().err
    assert f"recalibration {rid} is already applied" in err
    assert not out.exists() and the(repo, rid) == rec


@pytest.mark.parametrize("where", ["db", "service"])
def test_an_unknown_or_finished_recalibration_is_refused_before_the_run(
    db_url: str,
    repo: Repository,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    where: str,
) -> None:
    failed = repo.start_recalibration("net", "1", method="dashboard")
    repo.finish_recalibration(failed, status="failed", outcome={"error": "no data"})
    out = tmp_path / "bn.pt"
    monkeypatch.setenv("BNWATCH_API_TOKEN", TOKEN)
    with contextlib.ExitStack() as stack:
        target = db_url
        if where == "service":
            target = stack.enter_context(serve(db_url, tmp_path / "serve.log")).url
        for rid, message in [
            (failed, f"recalibration {failed} is already failed"),
            (9999, "no recalibration 9999 in the store"),
        ]:
            assert main(argv(out, "--recalibration", str(rid), f"--{where}", target)) == 1
            assert message in capsys.readouterr().err
            assert not out.exists()
    assert the(repo, failed).outcome == {"error": "no data", "references": {}}


def test_a_failing_run_is_reported_failed_and_exits_with_its_error(
    db_url: str, repo: Repository, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rid = repo.start_recalibration("net", "1", method="dashboard")
    out = tmp_path / "bn.pt"
    code = main(argv(out, "--recalibration", str(rid), "--db", db_url, data_spec=f"{FIX}:wrong"))
    assert code == 1
    err = capsys.readouterr().err
    assert "recalibrate: error:" in err and "recalibration data" in err  # the run's error
    assert f"recalibration {rid} of net@1 reported failed" in err
    rec = the(repo, rid)
    assert rec.status == "failed" and "recalibration data" in rec.outcome["error"]
    assert not out.exists() and recalibrated_refs(repo) == {}


@pytest.mark.parametrize(
    ("typo", "code", "message"),
    [
        (["--model", f"{FIX}:nope"], 1, "--model="),
        (["--model", "mymodel.py:build"], 1, "not a file path: e.g. mymodel:build"),
        (
            ["--layers", "nothing*"],
            1,
            "--layers nothing*: no BatchNorm layer of Sequential matches",
        ),
        (
            ["--model", f"{FIX}:frozen_factory", "--layers", "1"],
            1,
            "--layers matches only frozen BatchNorm layers (1)",
        ),
        (["--prior-strength", "-1"], 2, "expected a finite number >= 0, got '-1'"),
        (["--prior-strength", "nan"], 2, "expected a finite number >= 0, got 'nan'"),
        (["--num-samples", "10"], 2, "argument --num-samples: expected at least 16 samples"),
        (["--out", "."], 1, "--out='.' is invalid: expected a file name, not an existing dir"),
        (
            ["--model", f"{FIX}:raising_factory"],
            1,
            f"error: --model {FIX}:raising_factory raised ValueError: no weights on this host\n",
        ),
        (
            ["--data", f"{FIX}:raising_loader"],
            1,
            f"--data {FIX}:raising_loader raised FileNotFoundError: /data/val is not mounted",
        ),
        (
            ["--held-out", f"{FIX}:raising_loader"],
            1,
            f"--held-out {FIX}:raising_loader raised FileNotFoundError",
        ),
    ],
)
def test_a_command_line_mistake_is_not_a_failed_recalibration(
    db_url: str,
    repo: Repository,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    typo: list[str],
    code: int,
    message: str,
) -> None:
    """A typo is fixed and run again with the same --recalibration: it stays pending."""
    rid = repo.start_recalibration("net", "1", method="dashboard")
    args = argv(tmp_path / "bn.pt", "--recalibration", str(rid), "--db", db_url)
    for flag, value in zip(typo[::2], typo[1::2], strict=True):
        if flag in args:
            args[args.index(flag) + 1] = value
        else:
            args += [flag, value]
    if code == 2:  # argparse's usage error
        with pytest.raises(SystemExit) as exited:
            main(args)
        assert exited.value.code == 2
    else:
        assert main(args) == 1
    assert message in capsys.readouterr().err
    assert the(repo, rid).status == "pending"
    assert main(argv(tmp_path / "bn.pt", "--recalibration", str(rid), "--db", db_url)) == 0
    assert the(repo, rid).status == "applied"


def _checkpoints(tmp_path: Path) -> dict[str, Path]:
    """Files a user may give --checkpoint by mistake."""
    other = tmp_path / "other.pt"
    torch.save(torch.nn.Linear(3, 2).state_dict(), other)  # another architecture's
    whole = tmp_path / "whole.pt"
    torch.save(net(), whole)  # the pickled model, not its state_dict
    text = tmp_path / "notes.txt"
    text.write_text("not a checkpoint\n")
    listed = tmp_path / "list.pt"
    torch.save([1, 2], listed)
    return {"other": other, "whole": whole, "text": text, "list": listed}


@pytest.mark.parametrize(
    ("which", "message"),
    [
        ("other", "does not fit --model"),
        ("whole", "not a state_dict torch.load can read"),
        ("text", "not a state_dict torch.load can read"),
        ("list", "holds a list, not a state_dict"),
    ],
)
def test_a_checkpoint_that_does_not_fit_is_a_command_line_mistake(
    db_url: str,
    repo: Repository,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    which: str,
    message: str,
) -> None:
    """One line naming --checkpoint, no traceback -- and the recalibration stays pending, to
    be run again with the right file (it was reported failed, and then refused for good)."""
    rid = repo.start_recalibration("net", "1", method="dashboard")
    bad = _checkpoints(tmp_path)[which]
    args = argv(tmp_path / "bn.pt", "--recalibration", str(rid), "--db", db_url)
    assert main([*args, "--checkpoint", str(bad)]) == 1
    err = capsys.readouterr().err
    assert message in err and f"--checkpoint {bad}" in err and "Traceback" not in err
    assert the(repo, rid).status == "pending"
    good = tmp_path / "net.pt"
    torch.save(net().state_dict(), good)
    assert main([*args, "--checkpoint", str(good)]) == 0
    assert the(repo, rid).status == "applied"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--db", "sqlite:///x.db"], "--recalibration ID as well"),
        (["--service", "http://bnwatch:8000"], "--recalibration ID as well"),
        (["--recalibration", "1", "--token", "t"], "--service URL as well"),
        (
            ["--recalibration", "1", "--service", "ftp://bnwatch"],
            "--service='ftp://bnwatch' is invalid: expected an http:// or https:// URL",
        ),
        (["--recalibration", "1", "--db", "mysql://x/y"], "SQLite or PostgreSQL"),
    ],
)
def test_reporting_options_are_checked_before_the_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], message: str
) -> None:
    out = tmp_path / "bn.pt"
    assert main(argv(out, *extra)) == 1
    assert message in capsys.readouterr().err
    assert not out.exists()  # nothing ran


def test_a_run_is_reported_through_a_service(
    db_url: str,
    repo: Repository,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rid = repo.start_recalibration("net", "1", method="WebhookAction")
    out = tmp_path / "bn.pt"
    monkeypatch.setenv("BNWATCH_API_TOKEN", TOKEN)  # the default of --token
    with serve(db_url, tmp_path / "serve.log") as server:
        assert main(argv(out, "--recalibration", str(rid), "--service", server.url)) == 0
    assert f"reported applied to {server.url}" in capsys.readouterr().err
    rec = the(repo, rid)
    assert rec.status == "applied" and rec.outcome["out"] == str(out.resolve())
    assert sorted(rec.outcome["references"]) == LAYERS


def test_help_describes_the_reporting_options(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["recalibrate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for option in ("--recalibration ID", "--db URL", "--service URL", "--token TOKEN"):
        assert option in text
    assert "$BNWATCH_DATABASE_URL" in text and "$BNWATCH_API_TOKEN" in text
