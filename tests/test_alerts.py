"""The alert engine: persistence before opening, hysteresis, dedup, no_data, configuration."""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from bnwatch.alerts import AlertConfig, AlertEngine, Rule, evaluate_all
from bnwatch.errors import ConfigError
from bnwatch.schema import WindowRecord
from bnwatch.store.migrate import engine_for
from bnwatch.store.repository import Repository
from tests.store.helpers import record_windows

T0 = datetime(2026, 6, 1, 12, 0, tzinfo=timezone.utc)


@pytest.fixture
def db_url(migrated_db_url: str) -> str:
    """Each kind of database at the current schema (every test here opens it migrated)."""
    return migrated_db_url


@pytest.fixture
def repo(db_url: str) -> Iterator[Repository]:
    engine = engine_for(db_url)
    yield Repository(engine)
    engine.dispose()


@pytest.fixture(scope="module")
def template() -> WindowRecord:
    return record_windows(1, warmup_samples=10**6)[0]


def window(
    template: WindowRecord, i: int, *, drifted: bool = False, nonfinite: int = 0, layer: str = "4"
) -> WindowRecord:
    """The i-th one-minute window; ``layer`` drifted (or showed NaNs) when asked."""
    reports = {}
    for name, r in template.reports.items():
        if name == layer:
            moments = r.stats.moments
            if nonfinite:
                nf = moments.nonfinite.copy()
                nf[0] = nonfinite
                moments = dataclasses.replace(moments, nonfinite=nf)
            r = dataclasses.replace(
                r, drifted=drifted, stats=dataclasses.replace(r.stats, moments=moments)
            )
        reports[name] = r
    start = T0 + timedelta(minutes=i)
    return dataclasses.replace(
        template, uid=f"w{i:04d}", start=start, end=start + timedelta(minutes=1), reports=reports
    )


def feed(repo: Repository, engine: AlertEngine, records: list[WindowRecord]) -> list[list[str]]:
    """Store windows one at a time, evaluating after each; the actions each evaluation took."""
    actions = []
    for r in records:
        repo.write_windows([r])
        changes = engine.evaluate(repo, r.model, r.version, now=r.end)
        actions.append([f"{c.action}:{c.kind}:{c.layer}" for c in changes])
    return actions


def test_opens_after_k_windows_and_resolves_with_hysteresis(
    repo: Repository, template: WindowRecord
) -> None:
    engine = AlertEngine(AlertConfig(drift=Rule(open_after=3, resolve_after=2)))
    pattern = [False, True, True, False, True, True, True, True, False, True, False, False, False]
    actions = feed(repo, engine, [window(template, i, drifted=d) for i, d in enumerate(pattern)])
    # two drifted windows are not enough; three in a row open it (window 6)
    assert [i for i, a in enumerate(actions) if "opened:drift:4" in a] == [6]
    # one clear window does not resolve it (window 8); two in a row do (window 11)
    assert [i for i, a in enumerate(actions) if "resolved:drift:4" in a] == [11]
    (alert,) = [a for a in repo.alerts() if a.kind == "drift"]
    assert alert.state == "resolved"
    assert alert.layer == "4"
    assert alert.opened_at == T0 + timedelta(minutes=7)
    assert alert.resolved_at == T0 + timedelta(minutes=12)
    assert alert.values["windows"] >= 2  # flagged windows among the recent ones
    assert "p_value" in alert.values


def test_evaluation_is_idempotent_and_alerts_are_deduplicated(
    repo: Repository, template: WindowRecord
) -> None:
    engine = AlertEngine(AlertConfig(drift=Rule(open_after=1, resolve_after=1)))
    repo.write_windows([window(template, i, drifted=True) for i in range(3)])
    for _ in range(3):
        engine.evaluate(repo, "cnn", "1", now=T0)
    other = AlertEngine(AlertConfig(drift=Rule(open_after=1, resolve_after=1)))
    other.evaluate(repo, "cnn", "1", now=T0)  # a second evaluator (another worker)
    open_drift = [a for a in repo.alerts(state="open") if a.kind == "drift"]
    assert len(open_drift) == 1


def test_turning_a_rule_off_resolves_its_open_alerts(
    repo: Repository, template: WindowRecord
) -> None:
    on = AlertEngine(AlertConfig(drift=Rule(open_after=1, resolve_after=1)))
    assert feed(repo, on, [window(template, 0, drifted=True)]) == [["opened:drift:4"]]
    off = AlertEngine(AlertConfig(drift=Rule(enabled=False)))
    # the very next evaluation closes it (was: open for good, whatever the windows said)
    assert feed(repo, off, [window(template, 1, drifted=True)]) == [["resolved:drift:4"]]
    assert feed(repo, off, [window(template, 2, drifted=True)]) == [[]]
    (alert,) = [a for a in repo.alerts() if a.kind == "drift"]
    assert alert.state == "resolved"
    assert alert.resolved_at == T0 + timedelta(minutes=2)
    assert alert.values["resolved_because"] == "rule disabled"
    assert "p_value" in alert.values  # what it opened with is kept


def test_nonfinite_and_mode_alerts(repo: Repository, template: WindowRecord) -> None:
    engine = AlertEngine()
    actions = feed(repo, engine, [window(template, 0, nonfinite=5, layer="7")])
    assert "opened:nonfinite_activations:7" in actions[0]
    assert not any("batch_stat_mode" in a for a in actions[0])


def test_no_data_opens_and_resolves(repo: Repository, template: WindowRecord) -> None:
    engine = AlertEngine(AlertConfig(no_data_seconds=300))
    repo.write_windows([window(template, 0)])
    assert engine.check_silence(repo, now=T0 + timedelta(minutes=3)) == []
    (opened,) = engine.check_silence(repo, now=T0 + timedelta(minutes=7))
    assert (opened.action, opened.kind, opened.layer) == ("opened", "no_data", None)
    assert engine.check_silence(repo, now=T0 + timedelta(minutes=8)) == []  # still open, once
    repo.write_windows([window(template, 9)])
    changes = evaluate_all(repo, engine, now=T0 + timedelta(minutes=10))
    assert [(c.action, c.kind) for c in changes] == [("resolved", "no_data")]


def test_concurrent_evaluators_open_one_no_data_alert(
    db_url: str, repo: Repository, template: WindowRecord, monkeypatch: pytest.MonkeyPatch
) -> None:
    # two workers' periodic checks at once: both would read "none open" and both insert (the
    # open-alert index cannot tell two NULL layers apart), and one alert would stay open for
    # good.  Each evaluator waits, after reading, for the other to read too (at most 2 s):
    # serialized, the second cannot read before the first commits, and the wait times out.
    repo.write_windows([window(template, 0)])
    barrier = threading.Barrier(2, timeout=2)
    read = AlertEngine._open

    def read_then_wait(session: Any, model_id: int) -> Any:
        out = read(session, model_id)
        with contextlib.suppress(threading.BrokenBarrierError):
            barrier.wait()
        return out

    monkeypatch.setattr(AlertEngine, "_open", staticmethod(read_then_wait))

    def check() -> None:
        engine = engine_for(db_url)
        try:
            AlertEngine().check_silence(Repository(engine), now=T0 + timedelta(hours=2))
        finally:
            engine.dispose()

    threads = [threading.Thread(target=check) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len([a for a in repo.alerts(state="open") if a.kind == "no_data"]) == 1


def test_config_from_toml_and_overrides(tmp_path: Path) -> None:
    path = tmp_path / "bnwatch.toml"
    path.write_text(
        "[alerts]\nno_data_seconds = 120\n[alerts.drift]\nopen_after = 5\n[other]\nx = 1\n"
    )
    config = AlertConfig.from_toml(path)
    assert config.no_data_seconds == 120
    assert config.drift == Rule(open_after=5, resolve_after=3)
    assert config.with_overrides(drift_resolve_after=7, nonfinite_min=3).drift.resolve_after == 7
    assert config.history == 5


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("[alerts]\nno_data_seconds = -1\n", "alerts.no_data_seconds"),
        ("[alerts.drift]\nopen_after = 0\n", "alerts.drift.open_after"),
        ("[alerts.drift]\nopen_afterr = 2\n", "alerts.drift.open_afterr"),
        ("[alerts]\nfoo = 1\n", "alerts.foo"),
        ("[alerts.drift]\nenabled = 'yes'\n", "alerts.drift.enabled"),
        ("[alerts\n", "alerts config"),
    ],
)
def test_bad_config_names_the_key(tmp_path: Path, text: str, key: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        AlertConfig.from_toml(path)
    assert info.value.argument == key


def test_a_config_that_is_not_utf8_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "alerts.toml"
    path.write_bytes("# r\xe9glages\n[alerts]\nno_data_seconds = 60\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="UTF-8 TOML"):
        AlertConfig.from_toml(path)
    path.write_text("# réglages\n[alerts]\nno_data_seconds = 60\n", encoding="utf-8")
    assert AlertConfig.from_toml(path).no_data_seconds == 60


def test_overrides_reject_unknown_names() -> None:
    with pytest.raises(ConfigError, match="drift_sometimes"):
        AlertConfig().with_overrides(drift_sometimes=1)


def test_a_watched_model_left_in_train_mode_raises_alerts_in_the_store(db_url: str) -> None:
    import torch

    import bnwatch
    from tests.store.helpers import batches, small_cnn

    net = small_cnn()
    net.get_submodule("4").train()  # the second BatchNorm2d left in train() by mistake
    mon = bnwatch.watch(
        net, name="cnn", version="1", store=db_url, window_seconds=None, overhead_budget=None
    )
    with torch.no_grad():
        for x in batches(6, batch=2):
            net(x)
            mon.flush()
    mon.close()
    engine = engine_for(db_url)
    kinds = {(a.kind, a.layer) for a in Repository(engine).alerts(state="open")}
    engine.dispose()
    assert ("batch_stat_mode", "4") in kinds
    assert ("running_stats_mutated", "4") in kinds
    assert not any(layer == "1" for _, layer in kinds)


def replica(
    template: WindowRecord, source: str, minute: int, *, drifted: bool, second: int = 0
) -> WindowRecord:
    """Window ``minute`` of one replica (``source``), ``second`` s after the minute."""
    w = window(template, minute, drifted=drifted)
    end = w.end + timedelta(seconds=second)
    return dataclasses.replace(
        w,
        uid=f"{source[-1]}{minute:04d}",
        source=source,
        start=end - timedelta(minutes=1),
        end=end,
    )


def test_one_drifted_replica_opens_the_alert_among_clean_ones(
    repo: Repository, template: WindowRecord
) -> None:
    # replica a drifted, b clean, their windows interleaved: persistence is counted per
    # source (was: per layer, so a's drifted windows were never 3 in a row -- no alert)
    engine = AlertEngine()
    records = []
    for i in range(8):
        records.append(replica(template, "r:a", i, drifted=i < 5))
        records.append(replica(template, "r:b", i, drifted=False, second=2))
    actions = feed(repo, engine, records)
    assert [i for i, a in enumerate(actions) if "opened:drift:4" in a] == [4]  # a's 3rd
    # a clean for 3 windows (5, 6, 7) and b clean: no source keeps it
    assert [i for i, a in enumerate(actions) if "resolved:drift:4" in a] == [14]
    (alert,) = [a for a in repo.alerts() if a.kind == "drift"]
    assert alert.values["source"] == "r:a"


def test_two_drifted_replicas_need_open_after_windows_each(
    repo: Repository, template: WindowRecord
) -> None:
    # both drifted: three windows of the layer came in 1.5 periods (was: opened at the 3rd)
    engine = AlertEngine()
    records = []
    for i in range(3):
        records.append(replica(template, "r:a", i, drifted=True))
        records.append(replica(template, "r:b", i, drifted=True, second=2))
    actions = feed(repo, engine, records)
    assert [i for i, a in enumerate(actions) if "opened:drift:4" in a] == [4]  # a's 3rd


def test_a_replica_that_went_silent_drifted_does_not_hold_the_alert_open(
    repo: Repository, template: WindowRecord
) -> None:
    engine = AlertEngine(AlertConfig(no_data_seconds=300))
    records = [replica(template, "r:a", i, drifted=True) for i in range(3)]
    records += [replica(template, "r:b", i, drifted=False, second=2) for i in range(3, 12)]
    actions = feed(repo, engine, records)
    assert "opened:drift:4" in actions[2]
    # a's last window ended at 12:03, more than 300 s before b's window ending at 12:08:02
    # (b clean in its last 3 windows by then): a keeps it no longer (was: open for good)
    resolved = [i for i, a in enumerate(actions) if "resolved:drift:4" in a]
    assert [records[i].end for i in resolved] == [T0 + timedelta(minutes=8, seconds=2)]


def test_a_late_batch_replays_its_windows_in_order(
    repo: Repository, template: WindowRecord
) -> None:
    # a spool delivered after an outage: minutes 5-14 drifted, stored and evaluated as one
    # batch (was: only the newest 3 windows judged -- no alert for the episode)
    engine = AlertEngine()
    batch = [window(template, i, drifted=5 <= i < 15) for i in range(20)]
    repo.write_windows(batch)
    changes = engine.on_stored(repo, batch)
    drift = [(c.action, c.values["window_end"]) for c in changes if c.kind == "drift"]
    assert drift == [
        ("opened", (T0 + timedelta(minutes=8)).isoformat()),  # minute 7's window: the 3rd
        ("resolved", (T0 + timedelta(minutes=15)).isoformat()),  # the last drifted window's
    ]
    (alert,) = [a for a in repo.alerts() if a.kind == "drift"]
    assert alert.values["resolved_window_end"] == (T0 + timedelta(minutes=18)).isoformat()
    # judged windows are not judged again: a re-delivery, a fresh engine (a restart, the CLI)
    assert engine.on_stored(repo, batch) == []
    assert [c for c in evaluate_all(repo, AlertEngine(), now=T0) if c.kind == "drift"] == []
    assert len([a for a in repo.alerts() if a.kind == "drift"]) == 1


def test_evaluate_all_replays_a_backfill(repo: Repository, template: WindowRecord) -> None:
    # `bnwatch alerts --evaluate` after a backfill: a fresh engine replays what was stored
    repo.write_windows([window(template, i, drifted=2 <= i < 6) for i in range(12)])
    changes = evaluate_all(repo, AlertEngine(), now=T0 + timedelta(minutes=12))
    assert [(c.action, c.kind) for c in changes if c.kind == "drift"] == [
        ("opened", "drift"),
        ("resolved", "drift"),
    ]


def test_a_replaced_version_resolves_its_layer_alerts(
    repo: Repository, template: WindowRecord
) -> None:
    from bnwatch.triggers import CallbackAction, Trigger, TriggerPolicy

    engine = AlertEngine(AlertConfig(no_data_seconds=300))
    feed(repo, engine, [window(template, i, drifted=True) for i in range(3)])
    v2 = [
        dataclasses.replace(window(template, i), uid=f"v{i:04d}", version="2") for i in range(3, 12)
    ]
    feed(repo, engine, v2)
    sent: list[str] = []
    trigger = Trigger(
        CallbackAction(lambda e: sent.append(e.version)), TriggerPolicy(cooldown_seconds=60)
    )
    # cnn@1 silent for more than 300 s while cnn@2 reports: replaced
    changes = engine.check_silence(repo, now=T0 + timedelta(minutes=12))
    assert ("resolved", "drift", "1") in {(c.action, c.kind, c.version) for c in changes}
    (alert,) = [a for a in repo.alerts(version="1") if a.kind == "drift"]
    assert alert.state == "resolved"
    assert alert.values["resolved_because"] == "version replaced"
    trigger.check_open(repo, now=T0 + timedelta(minutes=12))
    assert sent == []  # nothing acts on the retired version's alerts any more


def test_a_silent_version_alone_keeps_its_layer_alerts(
    repo: Repository, template: WindowRecord
) -> None:
    # an outage, not a replacement: the no_data alert opens, the drift alert stays
    engine = AlertEngine(AlertConfig(no_data_seconds=300))
    feed(repo, engine, [window(template, i, drifted=True) for i in range(3)])
    engine.check_silence(repo, now=T0 + timedelta(hours=1))
    assert {a.kind for a in repo.alerts(state="open")} >= {"drift", "no_data"}


def test_a_replaced_version_resolves_its_no_data_alert_and_opens_none(
    repo: Repository, template: WindowRecord
) -> None:
    """A retired version's ``no_data`` alert stayed open for good, and one that had none
    opened it once replaced: a model name showed one open ``no_data`` per past version."""
    engine = AlertEngine(AlertConfig(no_data_seconds=300))
    feed(repo, engine, [window(template, i) for i in range(3)])
    # cnn@1 goes silent alone first (an outage): no_data opens
    engine.check_silence(repo, now=T0 + timedelta(minutes=12))
    assert [(a.kind, a.version) for a in repo.alerts(state="open")] == [("no_data", "1")]
    # then cnn@2 reports (a deployment replaced cnn@1)
    v2 = [
        dataclasses.replace(window(template, i), uid=f"v{i:04d}", version="2")
        for i in range(20, 24)
    ]
    feed(repo, engine, v2)
    changes = engine.check_silence(repo, now=T0 + timedelta(minutes=25))
    assert ("resolved", "no_data", "1") in {(c.action, c.kind, c.version) for c in changes}
    (alert,) = repo.alerts(version="1")
    assert alert.state == "resolved" and alert.values["resolved_because"] == "version replaced"
    # checked again and again, the retired version opens nothing; cnn@2 going silent does
    engine.check_silence(repo, now=T0 + timedelta(hours=2))
    engine.check_silence(repo, now=T0 + timedelta(hours=3))
    assert [(a.kind, a.version) for a in repo.alerts(state="open")] == [("no_data", "2")]


def test_a_late_batch_of_a_replaced_version_opens_no_no_data_alert(
    repo: Repository, template: WindowRecord
) -> None:
    engine = AlertEngine(AlertConfig(no_data_seconds=300))
    v2 = [
        dataclasses.replace(window(template, i), uid=f"v{i:04d}", version="2")
        for i in range(20, 24)
    ]
    feed(repo, engine, v2)
    # cnn@1's spool delivered an hour later: its windows are old, cnn@2 reported after them
    late = [window(template, i) for i in range(3)]
    repo.write_windows(late)
    engine.evaluate(repo, "cnn", "1", now=T0 + timedelta(hours=1))
    assert repo.alerts(version="1") == []
