"""`bnwatch recalibrate` and `bnwatch alerts` from the command line."""

from __future__ import annotations

import dataclasses
import json
import sys
import uuid
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch

import bnwatch
from bnwatch.cli import RECALIBRATION_METHODS, main
from bnwatch.recalibration import METHODS
from bnwatch.store.migrate import engine_for
from bnwatch.store.repository import Repository
from tests.recalibration.test_recalibrate import net
from tests.store.helpers import record_windows

FIX = "tests.recalibration.cli_fixture"


def test_recalibrate_writes_loadable_buffers(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    checkpoint = tmp_path / "model.pt"
    torch.save(net().state_dict(), checkpoint)
    out = tmp_path / "bn.pt"
    code = main(
        [
            "recalibrate",
            "--model",
            f"{FIX}:factory",
            "--checkpoint",
            str(checkpoint),
            "--data",
            f"{FIX}:loader",
            "--held-out",
            f"{FIX}:held_out",
            "--out",
            str(out),
            "--num-samples",
            "64",
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    summary = json.loads(printed[: printed.rindex("}") + 1])
    assert summary["status"] == "applied"
    assert summary["improved"] is True
    model = net()
    _missing, unexpected = model.load_state_dict(torch.load(out), strict=False)
    assert not unexpected
    assert {k for k in torch.load(out)} == {
        f"{n}.{b}" for n in ("1", "5", "8") for b in ("running_mean", "running_var")
    }


def test_recalibrate_runs_a_model_through_forward(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--forward: batches of dicts, the same buffers as the tensors themselves give."""
    common = ["recalibrate", "--model", f"{FIX}:factory", "--num-samples", "64"]
    by_forward, plain = tmp_path / "forward.pt", tmp_path / "plain.pt"
    argv = ["--data", f"{FIX}:dict_loader", "--forward", f"{FIX}:by_image"]
    assert main([*common, *argv, "--out", str(by_forward)]) == 0
    assert main([*common, "--data", f"{FIX}:loader", "--out", str(plain)]) == 0
    got, want = torch.load(by_forward), torch.load(plain)
    assert sorted(got) == sorted(want)
    for key, value in want.items():
        torch.testing.assert_close(got[key], value, rtol=1e-6, atol=1e-7)
    capsys.readouterr()
    # held-out dicts: the accuracy from --label-key, as (inputs, labels) tuples give it
    judged = []
    for held in (["--held-out", f"{FIX}:held_out"], ["--held-out", f"{FIX}:dict_held_out"]):
        extra = ["--label-key", "label"] if "dict" in held[1] else []
        if extra:
            held += ["--forward", f"{FIX}:by_image", "--data", f"{FIX}:dict_loader"]
        else:
            held += ["--data", f"{FIX}:loader"]
        assert main([*common, *held, *extra, "--out", str(tmp_path / "judged.pt")]) == 0
        printed = capsys.readouterr().out
        judged.append(json.loads(printed[: printed.rindex("}") + 1]))
    assert judged[0]["accuracy_after"] is not None
    for key in ("accuracy_before", "accuracy_after"):
        assert judged[1][key] == pytest.approx(judged[0][key])
    assert main([*common, *argv[:2], "--out", str(tmp_path / "x.pt")]) == 1
    said = capsys.readouterr().err  # without --forward: which tensor? said in flags
    assert "--input-key is needed: expected the key of the model input among" in said
    assert main([*common, *argv[:3], f"{FIX}:not_iterable", "--out", str(plain)]) == 1
    assert "--forward" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "nope.module:factory"], "--model='nope.module:factory' is invalid"),
        (["--model", f"{FIX}"], "pkg.module:name"),
        (["--data", f"{FIX}:wrong"], "recalibration data"),
        (["--model", ".relative:factory"], "relative import"),
        (["--data", f"{FIX}:not_iterable"], "an iterable of batches"),
        (["--out", "/nonexistent/dir/bn.pt"], "a file in an existing directory"),
        (["--data", f"{FIX}:nan_loader"], "layer '1' received fewer than 2 finite values"),
        (["--out", "."], "--out='.' is invalid: expected a file name, not an existing directory"),
        (["--data", f"{FIX}:string_loader"], "--data='str' is invalid: expected batches of"),
    ],
)
def test_recalibrate_errors_are_clear(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    base = {"--model": f"{FIX}:factory", "--data": f"{FIX}:loader"}
    for flag, value in zip(args[::2], args[1::2], strict=True):
        base[flag] = value
    base.setdefault("--out", str(tmp_path / "x.pt"))
    argv = ["recalibrate"]
    for flag, value in base.items():
        argv += [flag, value]
    assert main(argv) == 1
    assert message in capsys.readouterr().err
    assert not Path(base["--out"]).is_file()


def test_a_failed_write_of_out_is_one_line_and_keeps_the_previous_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "bn.pt"
    argv = ["recalibrate", "--model", f"{FIX}:factory", "--data", f"{FIX}:loader"]
    assert main([*argv, "--out", str(out)]) == 0
    good = out.read_bytes()

    def failing(obj: object, f: str) -> None:
        Path(f).write_bytes(b"PK")
        raise RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed")

    monkeypatch.setattr(torch, "save", failing)
    capsys.readouterr()
    assert main([*argv, "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert err == (
        f"bnwatch recalibrate: error: could not write {out}: PytorchStreamWriter failed "
        "writing file data/0: file write failed\n"
    )
    assert out.read_bytes() == good and [p.name for p in tmp_path.iterdir()] == ["bn.pt"]


def test_a_data_class_is_called_for_its_iterable(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--data naming a class of iterable loaders: instantiated, not iterated as the class."""
    data = ["--model", f"{FIX}:factory", "--data", f"{FIX}:LoaderClass"]
    assert main(["recalibrate", *data, "--out", str(tmp_path / "bn.pt")]) == 0
    assert '"samples": 64' in capsys.readouterr().out
    out = tmp_path / "p.npz"
    profile = ["profile", "--name", "m", "--version", "1", "--no-store", "--out", str(out)]
    assert main([*profile, *data]) == 0
    assert bnwatch.Profile.load(out).layers["1"].stats.samples_seen == 64


def test_alerts_lists_and_evaluates(db_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    import dataclasses
    from datetime import timedelta

    from bnwatch.store.migrate import engine_for
    from bnwatch.store.repository import Repository
    from tests.store.helpers import record_windows

    hours_ago = timedelta(hours=2)
    records = [
        dataclasses.replace(r, start=r.start - hours_ago, end=r.end - hours_ago)
        for r in record_windows(2)
    ]
    engine = engine_for(db_url)
    Repository(engine).write_windows(records)
    engine.dispose()
    assert main(["alerts", "--db", db_url]) == 0
    assert "no open alerts" in capsys.readouterr().out
    assert main(["alerts", "--db", db_url, "--evaluate", "--state", "all"]) == 0
    out = capsys.readouterr().out
    assert "evaluated:" in out
    assert "no_data" in out  # the windows closed two hours ago
    assert main(["alerts", "--db", db_url, "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert {a["kind"] for a in listed} >= {"no_data"}
    # a typo in --model or --version is not "no alerts"
    (stored,) = {f"{r.model}@{r.version}" for r in records}
    model, version = stored.split("@")
    for typo in (["--model", model + "x"], ["--model", model, "--version", version + "x"]):
        assert main(["alerts", "--db", db_url, *typo]) == 1
        assert f"in the store; models: {stored}" in capsys.readouterr().err
    assert main(["alerts", "--db", db_url, "--model", model, "--state", "resolved"]) == 0
    assert "no resolved alerts" in capsys.readouterr().out


def test_the_alerts_table_shows_versions_whole(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Two versions that share their first 28 characters (bnwatch demo's seed-0-<time>) are
    two rows with the version --version accepts, not one cut name twice.  (Both went silent
    at the same time -- a version silent since before the other's last window was replaced,
    and opens no ``no_data`` alert.)"""
    url = f"sqlite:///{tmp_path / 'bnwatch.db'}"
    versions = ["seed-0-20260601T120000.123456Z", "seed-0-20260601T120000.654321Z"]
    hours_ago = timedelta(hours=2)
    engine = engine_for(url)
    first = [
        dataclasses.replace(r, start=r.start - hours_ago, end=r.end - hours_ago)
        for r in record_windows(2, name="digits-cnn", version=versions[0])
    ]
    for version in versions:
        records = [dataclasses.replace(r, version=version, uid=uuid.uuid4().hex) for r in first]
        Repository(engine).write_windows(records)
    engine.dispose()
    assert main(["alerts", "--db", url, "--evaluate"]) == 0
    lines = capsys.readouterr().out.splitlines()[1:]
    header, rows = lines[0], lines[1:]
    shown = {row.split()[3] for row in rows}
    assert shown == {f"digits-cnn@{v}" for v in versions}
    start = header.index("model@version")
    assert all(row[start:].startswith(row.split()[3] + " ") for row in rows)  # aligned
    assert all(row[header.index("layer") - 1] == " " for row in rows)


@pytest.mark.parametrize(
    "command",
    [
        ["alerts"],
        ["report", "--model", "cnn", "--version", "1", "--layer", "4", "--out", "r.html"],
    ],
)
def test_reading_a_database_file_that_does_not_exist_creates_none(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: list[str]
) -> None:
    typo = tmp_path / "bnwatchh.db"
    assert main([*command, "--db", f"sqlite:///{typo}"]) == 1
    assert f"there is no database file '{typo}' yet" in capsys.readouterr().err
    assert not typo.exists()  # was: an empty 4 KB file at the mistyped path


def test_alerts_reads_the_services_config_variable(
    db_url: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # a cron `bnwatch alerts --evaluate` and `bnwatch serve` must judge with the same rules:
    # the service's config turned batch_stat_mode off, the cron job re-opened it
    from bnwatch.cli import ALERTS_CONFIG_ENV
    from bnwatch.service.app import ALERTS_CONFIG_ENV as SERVICE_ENV

    assert ALERTS_CONFIG_ENV == SERVICE_ENV
    config = tmp_path / "alerts.toml"
    config.write_text("[alerts]\nno_data_seconds = 60000\n", encoding="utf-8")
    hours_ago = timedelta(hours=2)
    engine = engine_for(db_url)
    Repository(engine).write_windows(
        [
            dataclasses.replace(r, start=r.start - hours_ago, end=r.end - hours_ago)
            for r in record_windows(2)
        ]
    )
    engine.dispose()
    monkeypatch.setenv(ALERTS_CONFIG_ENV, str(config))
    assert main(["alerts", "--db", db_url, "--evaluate", "--state", "all"]) == 0
    assert "no_data" not in capsys.readouterr().out  # silent 2 h < 60,000 s: no alert
    monkeypatch.delenv(ALERTS_CONFIG_ENV)
    assert main(["alerts", "--db", db_url, "--evaluate", "--state", "all"]) == 0
    assert "no_data" in capsys.readouterr().out  # the default 600 s


def test_the_cli_offers_every_method() -> None:
    assert RECALIBRATION_METHODS == METHODS  # a copy, so that --help does not import torch


def test_num_samples_below_the_floor_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The floor is the one the run would enforce (a copy: --help does not import torch)."""
    import inspect

    from bnwatch.cli import RECALIBRATION_MIN_SAMPLES
    from bnwatch.recalibration import recalibrate
    from bnwatch.recalibration.core import MIN_SAMPLES

    assert RECALIBRATION_MIN_SAMPLES == MIN_SAMPLES
    assert inspect.signature(recalibrate).parameters["min_samples"].default == MIN_SAMPLES
    argv = ["recalibrate", "--model", f"{FIX}:factory", "--data", f"{FIX}:loader"]
    for n in ("1", str(MIN_SAMPLES - 1)):
        with pytest.raises(SystemExit) as exited:
            main([*argv, "--out", str(tmp_path / "bn.pt"), "--num-samples", n])
        assert exited.value.code == 2
        err = capsys.readouterr().err
        assert f"argument --num-samples: expected at least {MIN_SAMPLES} samples, got {n}" in err
    with pytest.raises(SystemExit):
        main(["recalibrate", "--help"])
    assert f"N >= {MIN_SAMPLES}" in " ".join(capsys.readouterr().out.split())
    out = tmp_path / "bn.pt"
    assert main([*argv, "--out", str(out), "--num-samples", str(MIN_SAMPLES)]) == 0
    # too little data is the data's fault: no advice about an option the command lacks
    short = ["recalibrate", "--model", f"{FIX}:factory", "--data", f"{FIX}:short_loader"]
    assert main([*short, "--out", str(tmp_path / "short.pt")]) == 1
    err = capsys.readouterr().err
    assert err == (
        f"bnwatch recalibrate: error: recalibration saw 8 samples but needs at least "
        f"{MIN_SAMPLES}: pass more data with --data\n"
    )


def test_models_are_found_from_the_current_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """As ``python -m`` would: the ``bnwatch`` console script does not put the current
    directory on ``sys.path``; a module that fails while importing says how."""
    here = tmp_path / "mypkg_cli_here"
    here.mkdir()
    (here / "__init__.py").write_text("")
    (here / "models.py").write_text("from tests.recalibration.cli_fixture import factory, loader\n")
    (here / "broken.py").write_text("raise RuntimeError('no weights on this host')\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    out = tmp_path / "bn.pt"
    argv = ["recalibrate", "--data", "mypkg_cli_here.models:loader", "--out", str(out)]
    try:
        assert main([*argv, "--model", "mypkg_cli_here.models:factory"]) == 0
        assert out.exists()
        assert main([*argv, "--model", f"{FIX}:Models.factory"]) == 0  # a dotted name
        assert main([*argv, "--model", "mypkg_cli_here.broken:factory"]) == 1
        err = capsys.readouterr().err
        assert "RuntimeError: no weights on this host" in err
    finally:
        for name in [m for m in sys.modules if m.startswith("mypkg_cli_here")]:
            del sys.modules[name]


def test_profile_stores_the_reference_and_writes_the_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`bnwatch profile` stores what bnwatch.profile computes, also through --forward."""
    import bnwatch
    from bnwatch.schema import Profile
    from tests.recalibration.cli_fixture import loader

    url = f"sqlite:///{tmp_path / 'bnwatch.db'}"
    out = tmp_path / "profile.npz"
    common = ["profile", "--model", f"{FIX}:factory", "--name", "cnn", "--version", "1"]
    assert main([*common, "--data", f"{FIX}:loader", "--store", url, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "3 layers, 64 samples" in printed and f"wrote {out}" in printed
    want = bnwatch.profile(net(), loader(), name="cnn", version="1")
    engine = engine_for(url, create=False)
    try:
        stored = Repository(engine).load_profile("cnn", "1")
    finally:
        engine.dispose()
    assert stored is not None
    for got in (stored, Profile.load(out)):
        assert set(got.layers) == set(want.layers) == {"1", "5", "8"}
        for name, layer in want.layers.items():
            assert got.layers[name].stats.samples_seen == 64
            np.testing.assert_allclose(
                got.layers[name].stats.moments.mean, layer.stats.moments.mean, rtol=1e-12
            )
    assert not list(tmp_path.glob("*.partial"))
    # batches of dicts through --forward: the same statistics, written only to --out
    keyed = tmp_path / "keyed.npz"
    argv = ["--data", f"{FIX}:dict_loader", "--forward", f"{FIX}:by_image", "--no-store"]
    assert main([*common, *argv, "--out", str(keyed), "--num-samples", "32"]) == 0
    got = Profile.load(keyed)
    assert got.layers["1"].stats.samples_seen == 32
    np.testing.assert_allclose(
        got.layers["1"].stats.moments.mean,
        bnwatch.profile(net(), loader()[:4]).layers["1"].stats.moments.mean,
        rtol=1e-12,
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--no-store"], "--out PATH too"),
        (["--data", f"{FIX}:not_iterable"], "an iterable of batches"),
        (["--data", f"{FIX}:wrong"], "profile data"),
        (["--out", "/nonexistent/dir/p.npz"], "a file in an existing directory"),
        (["--token", "t"], "--token='<hidden>' is invalid: expected --store http(s)://"),
        (["--store", "mysql://x/y"], "--store='mysql://x/y' is invalid"),
        (["--data", f"{FIX}:string_loader"], "--data='str' is invalid: expected batches of"),
        (["--include", "nothing*"], "no BatchNorm layer matches"),
        (["--data", f"{FIX}:nan_loader"], "layer '1' received fewer than 2 finite values"),
        (["--out", "."], "--out='.' is invalid: expected a file name, not an existing directory"),
        (["--data", f"{FIX}:raising_loader"], f"--data {FIX}:raising_loader raised FileNotFound"),
        (["--model", f"{FIX}:raising_factory"], "raising_factory raised ValueError: no weights"),
    ],
)
def test_profile_errors_are_clear_and_store_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    url = f"sqlite:///{tmp_path / 'bnwatch.db'}"
    argv = ["profile", "--model", f"{FIX}:factory", "--name", "cnn", "--version", "1"]
    if "--data" not in args:
        argv += ["--data", f"{FIX}:loader"]
    assert main([*argv, "--store", url, *args]) == 1
    assert message in capsys.readouterr().err
    assert not (tmp_path / "bnwatch.db").exists() or _no_profile(url)


def _no_profile(url: str) -> bool:
    engine = engine_for(url, create=False)
    try:
        return Repository(engine).load_profile("cnn", "1") is None
    finally:
        engine.dispose()


def test_profile_refuses_a_service_without_a_token_before_the_pass(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The service refuses uploads without a token: found only after the profiling pass, the
    pass was lost."""
    monkeypatch.delenv("BNWATCH_API_TOKEN", raising=False)
    monkeypatch.setattr("tests.recalibration.cli_fixture.loader", _must_not_be_read)
    out = tmp_path / "profile.npz"
    argv = ["profile", "--model", f"{FIX}:factory", "--name", "cnn", "--version", "1"]
    code = main(
        [*argv, "--data", f"{FIX}:loader", "--store", "http://127.0.0.1:1", "--out", str(out)]
    )
    assert code == 1
    err = capsys.readouterr().err
    assert "--token" in err and "BNWATCH_API_TOKEN" in err
    assert not out.exists()


def _must_not_be_read() -> list[object]:
    raise AssertionError("the data was read before the store was checked")


@pytest.mark.parametrize("out", [True, False])
def test_profile_keeps_the_pass_when_storing_fails(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    out: bool,
) -> None:
    """--out was written only after storing, so a service that refused the token lost the
    whole pass, file included; without --out the pass was lost anyway."""
    from bnwatch.schema import Profile
    from tests.client.server import FakeService

    monkeypatch.setenv("TMPDIR", str(tmp_path))  # tempfile's folder, if it was not used yet
    monkeypatch.setattr("tempfile.tempdir", None)
    path = tmp_path / "profile.npz"
    argv = ["profile", "--model", f"{FIX}:factory", "--name", "cnn", "--version", "1"]
    argv += ["--data", f"{FIX}:loader", *(["--out", str(path)] if out else [])]
    with FakeService(token="right") as service:  # healthy; refuses the upload
        assert main([*argv, "--store", service.url, "--token", "wrong"]) == 1
    err = capsys.readouterr().err
    assert "the profile of cnn@1 was not stored" in err
    kept = path if out else next(tmp_path.glob("bnwatch-profile-*.npz"))
    assert f"the profile is in {kept} (storing it failed)" in err
    assert set(Profile.load(kept).layers) == {"1", "5", "8"}


def test_profile_checks_the_store_before_the_pass(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only the URL's syntax was checked: a store that could not be used was found after the
    profiling pass (minutes, on a real validation set), which was then lost."""
    monkeypatch.setattr("tests.recalibration.cli_fixture.loader", _must_not_be_read)
    argv = ["profile", "--model", f"{FIX}:factory", "--name", "cnn", "--version", "1"]
    argv += ["--data", f"{FIX}:loader"]
    not_a_database = tmp_path / "bnwatch.db"
    not_a_database.write_text("not a database\n")
    assert main([*argv, "--store", f"sqlite:///{not_a_database}"]) == 1
    assert "file is not a database" in capsys.readouterr().err
    assert not_a_database.read_text() == "not a database\n"
    store = ["--store", "http://127.0.0.1:1", "--token", "t0ken"]  # nothing listens there
    assert main([*argv, *store]) == 1
    err = capsys.readouterr().err
    assert "the profile would not be stored: cannot reach http://127.0.0.1:1/healthz" in err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--name", "d/x"], "--name='d/x' is invalid"),
        (["--version", "a\tb"], "--version='a\\tb' is invalid"),
    ],
)
def test_profile_errors_name_the_flags(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    argv = ["profile", "--model", f"{FIX}:factory", "--data", f"{FIX}:loader", "--no-store"]
    argv += ["--out", str(tmp_path / "p.npz"), "--name", "cnn", "--version", "1"]
    assert main([*argv, *args]) == 1
    assert message in capsys.readouterr().err
