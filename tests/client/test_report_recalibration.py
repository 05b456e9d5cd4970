"""``bnwatch.report_recalibration``: the way back of a recalibration, to a database or through a
real ``bnwatch serve`` -- results and explicit statuses, refusals that say what to fix."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from torch import nn

import bnwatch
from bnwatch.client import (
    ServiceError,
    fetch_recalibration,
    outcome_endpoint,
    send_recalibration_outcome,
)
from bnwatch.errors import (
    ConfigError,
    RecalibrationBuffersError,
    RecalibrationNotFoundError,
    RecalibrationStateError,
)
from bnwatch.recalibration import RecalibrationResult
from bnwatch.store.migrate import engine_for
from bnwatch.store.repository import RecalibrationInfo, Repository
from tests.service.helpers import TOKEN, free_port, serve
from tests.store.helpers import batches, recalibrated_references, record_windows, small_cnn


@pytest.fixture
def db_url(migrated_db_url: str) -> str:
    """Each kind of database at the current schema (every test here opens it migrated)."""
    return migrated_db_url


@pytest.fixture
def repo(db_url: str) -> Iterator[Repository]:
    """The windows of small_cnn as cnn@1 (layers "1", "4", "7")."""
    engine = engine_for(db_url)
    repository = Repository(engine)
    repository.write_windows(record_windows(1))
    yield repository
    engine.dispose()


def applied_result(model: nn.Module | None = None) -> RecalibrationResult:
    return bnwatch.recalibrate(
        model or small_cnn(), batches(8, seed=3, shift=1.5), num_samples=32, progress=False
    )


def rejected_result() -> RecalibrationResult:
    """Statistics of shifted data, judged on clean data the model's statistics already fit."""
    model = small_cnn()
    clean = batches(8, seed=4)
    bnwatch.recalibrate(model, clean, apply=True, progress=False)
    result = bnwatch.recalibrate(
        model, batches(8, seed=5, shift=3.0), held_out=clean[:4], progress=False
    )
    assert result.status == "rejected"
    return result


def assert_references_hold(
    repo: Repository, info: RecalibrationInfo, result: RecalibrationResult
) -> None:
    """The stored outcome's references are the result's new statistics, with lineage."""
    assert info.outcome is not None
    lineages, _ = recalibrated_references(repo.engine, info.outcome["references"], result)
    for lineage in lineages.values():
        assert lineage["recalibration_id"] == info.id
        assert lineage["samples"] == result.samples


# -- a database URL ----------------------------------------------------------------------------
def test_an_applied_result_is_reported_to_a_database(db_url: str, repo: Repository) -> None:
    rid = repo.start_recalibration("cnn", "1", method="WebhookAction")
    result = applied_result()
    info = bnwatch.report_recalibration(db_url, rid, result, outcome={"host": "gpu-3"})
    assert isinstance(info, RecalibrationInfo)
    assert (info.id, info.status, info.model, info.version) == (rid, "applied", "cnn", "1")
    assert info.outcome is not None
    assert info.outcome["host"] == "gpu-3"  # added to the summary
    assert info.outcome["samples"] == result.samples and info.outcome["method"] == "precise"
    assert_references_hold(repo, info, result)
    assert [r for r in repo.recalibrations() if r.id == rid] == [info]

    # once: a second report is refused, naming the status
    with pytest.raises(RecalibrationStateError, match=f"recalibration {rid} is already applied"):
        bnwatch.report_recalibration(db_url, rid, status="failed", outcome={"error": "late"})


def test_rejected_results_and_explicit_statuses(db_url: str, repo: Repository) -> None:
    rejected = repo.start_recalibration("cnn", "1", method="WebhookAction")
    info = bnwatch.report_recalibration(db_url, rejected, rejected_result())
    assert info.status == "rejected" and info.outcome is not None
    assert info.outcome["improved"] is False and info.outcome["references"] == {}

    failed = repo.start_recalibration("cnn", "1", method="WebhookAction")
    info = bnwatch.report_recalibration(
        db_url, failed, status="failed", outcome={"error": "RuntimeError: no GPU"}
    )
    assert info.status == "failed"
    assert info.outcome == {"error": "RuntimeError: no GPU", "references": {}}


def test_a_result_that_was_neither_applied_nor_judged_is_refused(
    db_url: str, repo: Repository
) -> None:
    rid = repo.start_recalibration("cnn", "1", method="WebhookAction")
    pending = bnwatch.recalibrate(small_cnn(), batches(4, seed=3), apply=False, progress=False)
    with pytest.raises(ConfigError, match=r"result\.apply\(\)") as err:
        bnwatch.report_recalibration(db_url, rid, pending)
    assert err.value.argument == "result" and "not judged" in str(err.value)
    pending.apply()
    pending.rollback()
    with pytest.raises(ConfigError, match="rolled-back"):
        bnwatch.report_recalibration(db_url, rid, pending)
    (rec,) = repo.recalibrations()
    assert rec.status == "pending"  # nothing was reported


def test_statistics_of_another_architecture_are_refused_naming_the_layer(
    db_url: str, repo: Repository
) -> None:
    rid = repo.start_recalibration("cnn", "1", method="WebhookAction")
    wider = applied_result(small_cnn(width=8))  # layer "1" has 8 channels, the store 6
    with pytest.raises(RecalibrationBuffersError, match="layer '1' has 6 channels") as err:
        bnwatch.report_recalibration(db_url, rid, wider)
    assert "its buffers have 8" in str(err.value)
    (rec,) = repo.recalibrations()
    assert rec.status == "pending"


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"status": None}, "status"),
        ({"status": "pending"}, "status"),
        ({"status": "applied", "token": TOKEN}, "token"),
        ({"status": "failed", "outcome": ["not", "a", "mapping"]}, "outcome"),
        ({"status": "failed", "recalibration_id": 0}, "recalibration_id"),
        ({"status": "failed", "store": "ftp://x"}, "store"),
    ],
)
def test_arguments_are_checked(
    db_url: str, repo: Repository, kwargs: dict[str, object], argument: str
) -> None:
    rid = repo.start_recalibration("cnn", "1", method="precise")
    call: dict[str, object] = {"store": db_url, "recalibration_id": rid, **kwargs}
    with pytest.raises(ConfigError) as err:
        bnwatch.report_recalibration(**call)  # type: ignore[arg-type]
    assert err.value.argument == argument
    assert TOKEN not in str(err.value)
    with pytest.raises(ConfigError, match="None when a result is given"):
        bnwatch.report_recalibration(db_url, rid, applied_result(), status="applied")
    (rec,) = repo.recalibrations()
    assert rec.status == "pending"


def test_an_unknown_recalibration_is_a_lookup_error(db_url: str, repo: Repository) -> None:
    with pytest.raises(RecalibrationNotFoundError, match="no recalibration 99"):
        bnwatch.report_recalibration(db_url, 99, status="failed", outcome={})


# -- a live service ----------------------------------------------------------------------------
def test_reports_through_a_running_service(
    db_url: str, repo: Repository, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    applied = repo.start_recalibration("cnn", "1", method="WebhookAction")
    failed = repo.start_recalibration("cnn", "1", method="WebhookAction")
    result = applied_result()
    with serve(db_url, tmp_path / "serve.log") as server:
        assert fetch_recalibration(server.url, applied)["status"] == "pending"  # no token
        with pytest.raises(ServiceError) as missing:
            fetch_recalibration(server.url, 4242)
        assert missing.value.status == 404 and "no recalibration 4242" in missing.value.detail
        info = bnwatch.report_recalibration(
            server.url, applied, result, outcome={"out": "/models/bn.pt"}, token=TOKEN
        )
        assert isinstance(info, RecalibrationInfo)
        assert (info.id, info.status, info.model, info.version) == (applied, "applied", "cnn", "1")
        assert info.finished_at is not None and info.finished_at.tzinfo is not None
        assert info.outcome is not None and info.outcome["out"] == "/models/bn.pt"
        assert_references_hold(repo, info, result)
        assert [r for r in repo.recalibrations() if r.id == applied] == [info]
        read = fetch_recalibration(server.url, applied)
        assert (read["status"], read["outcome"]) == ("applied", info.outcome)

        # a second report: 409 with the service's message
        with pytest.raises(ServiceError) as again:
            bnwatch.report_recalibration(server.url, applied, status="failed", token=TOKEN)
        assert again.value.status == 409
        assert f"recalibration {applied} is already applied" in str(again.value)

        # an unknown id: 404; a wrong token: 401 with the hint
        with pytest.raises(ServiceError) as unknown:
            bnwatch.report_recalibration(server.url, 4242, status="failed", token=TOKEN)
        assert unknown.value.status == 404 and "no recalibration 4242" in unknown.value.detail
        with pytest.raises(ServiceError) as refused:
            bnwatch.report_recalibration(server.url, failed, status="failed", token="wrong")
        assert refused.value.status == 401 and "token=" in str(refused.value)

        # statistics of another architecture: 422 naming the layer, nothing stored
        with pytest.raises(ServiceError) as clash:
            bnwatch.report_recalibration(
                server.url, failed, applied_result(small_cnn(width=8)), token=TOKEN
            )
        assert clash.value.status == 422
        assert "buffers.1.running_mean" in clash.value.detail
        assert "6 channels in the store but its buffers have 8" in clash.value.detail

        # the client function itself, token from the environment; NaN travels as null
        monkeypatch.setenv("BNWATCH_API_TOKEN", TOKEN)
        answer = send_recalibration_outcome(
            server.url + "/",
            failed,
            status="failed",
            outcome={"error": "NotEnoughDataError", "kl": float("nan"), "n": np.int64(3)},
        )
        assert answer["id"] == failed and answer["status"] == "failed"
        assert answer["outcome"] == {
            "error": "NotEnoughDataError",
            "kl": None,
            "n": 3,
            "references": {},
        }
    statuses = {r.id: r.status for r in repo.recalibrations()}
    assert statuses == {applied: "applied", failed: "failed"}


def test_an_unreachable_service_raises_service_error() -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    with pytest.raises(ServiceError) as err:
        send_recalibration_outcome(url, 1, status="failed", token=TOKEN, timeout=5.0)
    assert err.value.status is None
    assert "was not reported" in str(err.value) and url in str(err.value)


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"status": "pending"}, "status"),
        ({"status": "failed", "outcome": "oops"}, "outcome"),
        ({"status": "failed", "timeout": 0}, "timeout"),
        ({"status": "failed", "token": "two words"}, "token"),
    ],
)
def test_client_arguments_are_checked_before_sending(
    kwargs: dict[str, object], argument: str
) -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens: a request would fail otherwise
    with pytest.raises(ConfigError) as err:
        send_recalibration_outcome(url, 1, **kwargs)  # type: ignore[arg-type]
    assert err.value.argument == argument


def test_the_endpoint_of_a_service_url() -> None:
    assert outcome_endpoint("http://bnwatch:8000", 7) == (
        "http://bnwatch:8000/api/v1/recalibrations/7/outcome"
    )
    assert outcome_endpoint("https://example.org/bnwatch/", 7) == (
        "https://example.org/bnwatch/api/v1/recalibrations/7/outcome"
    )
    with pytest.raises(ConfigError, match="recalibration_id"):
        outcome_endpoint("http://bnwatch:8000", 0)
