"""Alerts: rules, a persistent state machine, and the checks that drive it.

An alert is about one (model, version, layer, kind) -- ``no_data`` about a whole model
version.  It **opens** only after its condition held in the last ``open_after`` windows of
one source (replica) of the layer, and **resolves** only after no source that still reports
keeps it: each shows the condition in none of its last ``resolve_after`` windows
(hysteresis: a flapping condition does not flap the alert).  Each evaluation replays, in
``end`` order, the windows stored since the last one (a spool delivered late, a backfill), so
an episode in the middle of a batch opens its alert as it would have live.  The alerts of a
version that went silent while another version of the model reports resolve, its
``no_data`` alert included, and it opens no ``no_data`` alert any more (the version was
replaced).  At most one alert per key is open at a time, so repeated evaluation is
idempotent; while open, the alert's ``values`` follow the newest window that still shows the
condition.  State lives in the database (``alerts`` table), computed from the stored windows,
so evaluators can restart, and several can run (service workers, replicas' writers) without
duplicating alerts.

Kinds and their per-window conditions:

``drift``                   the layer drifted from its baseline (``LayerReport.drifted``)
``small_batch_mismatch``    batch-statistics normalization with noisy small batches
``batch_stat_mode``         the layer normalized with batch statistics at inference
``running_stats_mutated``   the stored running statistics changed while watched
``nonfinite_activations``   at least ``nonfinite_min`` NaN/inf values reached the layer
``no_data``                 a model version that reported went silent for ``no_data_seconds``
                            (and no other version of the model reported since)

Thresholds come from :class:`AlertConfig` defaults, overridable by a TOML file
(:meth:`AlertConfig.from_toml`) and by arguments (:meth:`AlertConfig.with_overrides`); every
value is validated with an error that names the offending key.
"""

from __future__ import annotations

import bisect
import logging
import math
import sys
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from bnwatch.errors import ConfigError
from bnwatch.schema import ALERT_KINDS, WindowRecord, as_utc, utcnow
from bnwatch.store.engine import lock_for_writing
from bnwatch.store.models import Alert, Layer, Model, Window
from bnwatch.store.repository import Repository

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

logger = logging.getLogger("bnwatch")

LAYER_KINDS = ALERT_KINDS[:-1]
_CONDITION_COLUMN = {
    "drift": "drifted",
    "small_batch_mismatch": "small_batch_mismatch",
    "batch_stat_mode": "batch_stat_mode",
    "running_stats_mutated": "running_stats_mutated",
}
_VALUE_COLUMNS = (
    "p_value",
    "frac_drifted",
    "drift_d_rms",
    "drift_log_r_rms",
    "d_rms",
    "log_r_rms",
    "batch_noise_d",
    "batch_noise_log_r",
    "nonfinite",
    "n_samples",
)


@dataclass(frozen=True)
class Rule:
    """When an alert kind opens and resolves (in consecutive windows of a layer)."""

    enabled: bool = True
    open_after: int = 3
    resolve_after: int = 3


@dataclass(frozen=True)
class AlertConfig:
    """Alert thresholds.  Defaults favour few, meaningful alerts."""

    drift: Rule = field(default_factory=lambda: Rule(open_after=3, resolve_after=3))
    small_batch_mismatch: Rule = field(default_factory=lambda: Rule(open_after=2, resolve_after=3))
    batch_stat_mode: Rule = field(default_factory=lambda: Rule(open_after=1, resolve_after=2))
    running_stats_mutated: Rule = field(default_factory=lambda: Rule(open_after=1, resolve_after=2))
    nonfinite_activations: Rule = field(default_factory=lambda: Rule(open_after=1, resolve_after=3))
    nonfinite_min: int = 1
    no_data_seconds: float = 600.0

    def __post_init__(self) -> None:
        for kind in LAYER_KINDS:
            rule = getattr(self, kind)
            if not isinstance(rule, Rule):
                raise ConfigError(
                    f"alerts.{kind}", rule, "a table with enabled/open_after/resolve_after"
                )
            if not isinstance(rule.enabled, bool):
                raise ConfigError(f"alerts.{kind}.enabled", rule.enabled, "true or false")
            for name in ("open_after", "resolve_after"):
                value = getattr(rule, name)
                if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 1000:
                    raise ConfigError(f"alerts.{kind}.{name}", value, "an integer from 1 to 1000")
        if (
            isinstance(self.nonfinite_min, bool)
            or not isinstance(self.nonfinite_min, int)
            or self.nonfinite_min < 1
        ):
            raise ConfigError("alerts.nonfinite_min", self.nonfinite_min, "an integer >= 1")
        seconds = self.no_data_seconds
        if (
            isinstance(seconds, bool)
            or not isinstance(seconds, (int, float))
            or not (0 < seconds < math.inf)
        ):
            raise ConfigError("alerts.no_data_seconds", seconds, "a number of seconds > 0")

    @property
    def history(self) -> int:
        """How many recent windows per layer the rules look at."""
        rules: list[Rule] = [getattr(self, k) for k in LAYER_KINDS]
        return max(max(r.open_after, r.resolve_after) for r in rules)

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> AlertConfig:
        """From a mapping like the ``[alerts]`` table of a TOML file."""
        if not isinstance(data, Mapping):
            raise ConfigError("alerts", data, "a table")
        known = {f.name for f in fields(cls)}
        values: dict[str, Any] = {}
        for key, value in data.items():
            if key not in known:
                raise ConfigError(f"alerts.{key}", value, f"one of {sorted(known)}")
            if key in LAYER_KINDS:
                if not isinstance(value, Mapping):
                    raise ConfigError(f"alerts.{key}", value, "a table")
                rule_keys = {f.name for f in fields(Rule)}
                for sub in value:
                    if sub not in rule_keys:
                        raise ConfigError(
                            f"alerts.{key}.{sub}", value[sub], f"one of {sorted(rule_keys)}"
                        )
                values[key] = replace(getattr(cls(), key), **value)
            else:
                values[key] = value
        return cls(**values)

    @classmethod
    def from_toml(cls, path: str | Path) -> AlertConfig:
        """Read the ``[alerts]`` table of a TOML file (other tables are ignored)."""
        try:
            document = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except UnicodeDecodeError as err:
            raise ConfigError("alerts config", str(path), f"UTF-8 TOML ({err})") from err
        except OSError as err:
            raise ConfigError("alerts config", str(path), f"a readable TOML file ({err})") from err
        except tomllib.TOMLDecodeError as err:
            raise ConfigError("alerts config", str(path), f"valid TOML ({err})") from err
        return cls.from_mapping(document.get("alerts", {}))

    def with_overrides(self, **overrides: Any) -> AlertConfig:
        """A copy with top-level values or ``<kind>_<field>`` rule values replaced, e.g.
        ``with_overrides(no_data_seconds=60, drift_open_after=5)``."""
        top: dict[str, Any] = {}
        rules: dict[str, dict[str, Any]] = {}
        for key, value in overrides.items():
            kind = next((k for k in LAYER_KINDS if key.startswith(k + "_")), None)
            if kind is not None and key[len(kind) + 1 :] in {f.name for f in fields(Rule)}:
                rules.setdefault(kind, {})[key[len(kind) + 1 :]] = value
            elif key in {f.name for f in fields(AlertConfig)} and key not in LAYER_KINDS:
                top[key] = value
            else:
                raise ConfigError(key, value, "an AlertConfig field or <kind>_<rule field>")
        for kind, changes in rules.items():
            top[kind] = replace(getattr(self, kind), **changes)
        return replace(self, **top)


@dataclass(frozen=True)
class AlertChange:
    """An alert that opened or resolved during an evaluation."""

    action: str  # "opened" | "resolved"
    alert_id: int
    kind: str
    model: str
    version: str
    layer: str | None
    values: Mapping[str, Any]


_LOCK_SPACE = 0x626E77  # "bnw": the advisory-lock keys of alert evaluation


def _serialize(session: Session, model_id: int) -> None:
    """One evaluator per model version at a time (service workers, replicas' writers), from
    before it reads the open alerts until it commits: on PostgreSQL a transaction-scoped
    advisory lock; on SQLite the file's write lock, taken up front (``BEGIN IMMEDIATE``) --
    pysqlite begins a transaction only at the first write, so two evaluators could otherwise
    both read "no alert open" and both open one."""
    conn = session.connection()
    if conn.dialect.name == "postgresql":
        conn.execute(
            sa.text("SELECT pg_advisory_xact_lock(:space, :key)"),
            {"space": _LOCK_SPACE, "key": model_id},
        )
    else:
        lock_for_writing(conn)


def _json(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, datetime):
        return as_utc(value).isoformat()
    return value


_REPLAY_LIMIT = 1000  # windows per layer an engine replays at its first evaluation of a version


def _parse_end(value: Any) -> datetime | None:
    """A window end recorded in an alert's ``values`` (ISO text), or ``None``."""
    if not isinstance(value, str):
        return None
    try:
        return as_utc(datetime.fromisoformat(value))
    except ValueError:
        return None


class AlertEngine:
    """Evaluates the alert rules against a store and persists the alerts' state."""

    def __init__(self, config: AlertConfig | None = None) -> None:
        self.config = config or AlertConfig()
        # model id -> the highest window id this engine judged: the next evaluation replays
        # only the windows stored since (a cache; the alerts' own marks make a replay of a
        # judged window a no-op, so a restart or another worker costs time, not alerts)
        self._marks: dict[int, int] = {}
        self._marks_lock = threading.Lock()

    # -- entry points ----------------------------------------------------------------------
    def on_stored(
        self, repository: Repository, records: Sequence[WindowRecord]
    ) -> list[AlertChange]:
        """Evaluate the model versions that just received windows (a writer's hook).

        The stored windows are replayed by their ids too: a concurrent writer may commit
        windows with ids below those another evaluation already judged."""
        uids: dict[tuple[str, str], set[str]] = {}
        for r in records:
            uids.setdefault((r.model, r.version), set()).add(r.uid)
        changes: list[AlertChange] = []
        for (model, version), batch in sorted(uids.items()):
            changes.extend(self.evaluate(repository, model, version, uids=batch))
        return changes

    def evaluate(
        self,
        repository: Repository,
        model: str,
        version: str,
        *,
        now: datetime | None = None,
        uids: Iterable[str] = (),
    ) -> list[AlertChange]:
        """Open, update and resolve the layer alerts of one model version (one transaction).

        Replays, in ``end`` order, the windows stored since this engine's last evaluation of
        the version (at its first: the newest ``_REPLAY_LIMIT`` per layer) and the windows
        ``uids``; a window an alert was already judged on (its ``window_end`` or
        ``resolved_window_end``) is skipped for that alert."""
        now = as_utc(now) if now is not None else utcnow()
        with Session(repository.engine) as session, session.begin():
            m = session.execute(
                sa.select(Model).where(Model.name == model, Model.version == version)
            ).scalar_one_or_none()
            if m is None:
                return []
            model_id = m.id
            _serialize(session, model_id)
            open_alerts = self._open(session, model_id)
            judged = self._judged(session, model_id)
            with self._marks_lock:
                mark = self._marks.get(m.id)
            new, top = self._new_windows(session, m.id, mark, set(uids))
            layers = {
                row.id: (row.depth, row.name)
                for row in session.execute(
                    sa.select(Layer.id, Layer.depth, Layer.name).where(Layer.model_id == m.id)
                )
            }
            changes: list[AlertChange] = []
            for (layer_id, kind), current in list(open_alerts.items()):
                rule = getattr(self.config, kind) if kind in LAYER_KINDS else None
                if layer_id is not None and rule is not None and not rule.enabled:
                    # a rule turned off no longer holds its alerts open
                    name = layers.get(layer_id, (0, None))[1]
                    changes.append(self._resolve(current, m, name, now, because="rule disabled"))
                    del open_alerts[(layer_id, kind)]
            context = self._context(session, m.id, new)
            for layer_id in sorted(context, key=lambda i: (layers[i][0], i)):
                sources = context[layer_id]
                where = {
                    w["id"]: (src, i) for src, seq in sources.items() for i, w in enumerate(seq)
                }
                replay = sorted(
                    (where[i] for i in new[layer_id] if i in where),
                    key=lambda si: (sources[si[0]][si[1]]["end"], sources[si[0]][si[1]]["id"]),
                )
                for source, index in replay:
                    for kind in LAYER_KINDS:
                        rule = getattr(self.config, kind)
                        if not rule.enabled:
                            continue
                        change = self._step(
                            session,
                            m,
                            layer_id,
                            layers[layer_id][1],
                            kind,
                            rule,
                            sources,
                            source,
                            index,
                            open_alerts,
                            judged,
                            now,
                        )
                        if change is not None:
                            changes.append(change)
            self._no_data(session, m, open_alerts, now, changes)
        if top is not None:
            with self._marks_lock:
                self._marks[model_id] = max(self._marks.get(model_id, top), top)
        self._log(changes)
        return changes

    def check_silence(
        self, repository: Repository, *, now: datetime | None = None
    ) -> list[AlertChange]:
        """Open or resolve ``no_data`` alerts of every model version, and resolve the layer
        alerts of versions another version replaced (run periodically)."""
        now = as_utc(now) if now is not None else utcnow()
        changes: list[AlertChange] = []
        with Session(repository.engine) as session, session.begin():
            last_by_model = dict(
                session.execute(
                    sa.select(Window.model_id, sa.func.max(Window.end)).group_by(Window.model_id)
                ).all()
            )
            models = list(session.execute(sa.select(Model).order_by(Model.id)).scalars())
            newest: dict[str, datetime] = {}
            for m in models:
                if m.id in last_by_model:
                    end = as_utc(last_by_model[m.id])
                    newest[m.name] = max(newest.get(m.name, end), end)
            for m in models:
                _serialize(session, m.id)
                open_alerts = self._open(session, m.id)
                last = last_by_model.get(m.id)
                replaced = last is not None and self._replaced(as_utc(last), newest[m.name], now)
                self._no_data(session, m, open_alerts, now, changes, replaced=replaced)
                if last is not None and replaced:
                    self._retire(session, m, as_utc(last), open_alerts, now, changes)
        self._log(changes)
        return changes

    # -- the state machine -------------------------------------------------------------------
    def _condition(self, kind: str, window: Mapping[str, Any]) -> bool:
        if kind == "nonfinite_activations":
            return int(window["nonfinite"] or 0) >= self.config.nonfinite_min
        return bool(window[_CONDITION_COLUMN[kind]])

    def _step(
        self,
        session: Session,
        model: Model,
        layer_id: int,
        layer_name: str,
        kind: str,
        rule: Rule,
        sources: Mapping[str, Sequence[Mapping[str, Any]]],
        source: str,
        index: int,
        open_alerts: dict[tuple[int | None, str], Alert],
        judged: dict[tuple[int, str], datetime],
        now: datetime,
    ) -> AlertChange | None:
        """Judge the ``index``-th window of ``source`` for one alert.

        Persistence is counted per source: replicas' windows interleave, so one drifted
        replica among clean ones never had K windows in a row of the *layer*, and two drifted
        replicas had them in half the time."""
        key = (layer_id, kind)
        seq = sources[source]
        window = seq[index]
        end = as_utc(window["end"])
        seen = judged.get(key)
        if seen is not None and end < seen:
            # judged already (a re-delivery, another worker, a restart); the window at the
            # mark itself is judged again, harmlessly: it opened, updated or resolved the
            # alert, and judging it again against that state changes nothing
            return None
        flagged = self._condition(kind, window)
        recent = sum(
            self._condition(kind, w)
            for w in seq[max(0, index - self.config.history + 1) : index + 1]
        )
        current = open_alerts.get(key)
        if current is None:
            k = rule.open_after
            if index + 1 >= k and all(
                self._condition(kind, w) for w in seq[index - k + 1 : index + 1]
            ):
                values = self._values(window, k)
                alert = self._insert(session, model.id, layer_id, kind, values, now)
                judged[key] = end
                if alert is not None:
                    open_alerts[key] = alert
                    return AlertChange(
                        "opened", alert.id, kind, model.name, model.version, layer_name, values
                    )
            return None
        if flagged:
            current.last_seen_at = now
            current.values = self._values(window, recent)
            judged[key] = end
            return None
        if self._kept(kind, rule, sources, end):
            return None
        judged[key] = end
        del open_alerts[key]
        return self._resolve(current, model, layer_name, now, window_end=end)

    def _kept(
        self,
        kind: str,
        rule: Rule,
        sources: Mapping[str, Sequence[Mapping[str, Any]]],
        end: datetime,
    ) -> bool:
        """Whether some source still keeps the alert at ``end``: it reported within
        ``no_data_seconds`` before ``end`` and showed the condition in one of its last
        ``resolve_after`` windows (or has fewer: not yet evidence that it cleared).  A source
        silent that long keeps nothing -- a replica that died drifted cannot hold the alert
        open against the clean ones that replaced it."""
        horizon = end - timedelta(seconds=self.config.no_data_seconds)
        for seq in sources.values():
            ends = [as_utc(w["end"]) for w in seq]
            last = bisect.bisect_right(ends, end) - 1
            if last < 0 or ends[last] < horizon:
                continue
            if last + 1 < rule.resolve_after:
                return True
            if any(self._condition(kind, w) for w in seq[last - rule.resolve_after + 1 : last + 1]):
                return True
        return False

    def _no_data(
        self,
        session: Session,
        model: Model,
        open_alerts: Mapping[tuple[int | None, str], Alert],
        now: datetime,
        changes: list[AlertChange],
        *,
        replaced: bool | None = None,
    ) -> None:
        """Open ``no_data`` for a version silent for more than ``no_data_seconds``, resolve it
        when it reports again -- or, once another version ``replaced`` it (``None``: look it
        up if it matters), resolve it for good (a retired version is not expected to report)
        and open none."""
        last = session.execute(
            sa.select(sa.func.max(Window.end)).where(Window.model_id == model.id)
        ).scalar_one_or_none()
        if last is None:
            return
        silent = (now - as_utc(last)).total_seconds()
        current = open_alerts.get((None, "no_data"))
        values = {"last_window_end": as_utc(last).isoformat(), "silent_seconds": silent}
        if replaced is None and silent > self.config.no_data_seconds:
            # a backfill of a silent version: rare, so the other versions are read only then
            newest_of_name = session.execute(
                sa.select(sa.func.max(Window.end))
                .join(Model, Model.id == Window.model_id)
                .where(Model.name == model.name)
            ).scalar_one()
            replaced = self._replaced(as_utc(last), as_utc(newest_of_name), now)
        if replaced:
            if current is not None:
                changes.append(self._resolve(current, model, None, now, because="version replaced"))
        elif current is None and silent > self.config.no_data_seconds:
            alert = self._insert(session, model.id, None, "no_data", values, now)
            if alert is not None:
                changes.append(
                    AlertChange(
                        "opened", alert.id, "no_data", model.name, model.version, None, values
                    )
                )
        elif current is not None and silent <= self.config.no_data_seconds:
            changes.append(self._resolve(current, model, None, now))

    def _replaced(self, last: datetime, newest_of_name: datetime, now: datetime) -> bool:
        """Whether a version whose last window ended at ``last`` was replaced: silent for more
        than ``no_data_seconds`` while another version of the model reported after it."""
        return (now - last).total_seconds() > self.config.no_data_seconds and newest_of_name > last

    def _retire(
        self,
        session: Session,
        model: Model,
        last: datetime,
        open_alerts: Mapping[tuple[int | None, str], Alert],
        now: datetime,
        changes: list[AlertChange],
    ) -> None:
        """Resolve the layer alerts of a replaced version (:meth:`_replaced`): no window can
        resolve them any more, and triggers would act on them for good.  A version silent
        alone (an outage) keeps its alerts: its ``no_data`` alert says why nothing changes,
        and they resolve by data when it is back."""
        for (layer_id, kind), alert in open_alerts.items():
            if layer_id is None or kind not in LAYER_KINDS:
                continue
            layer = session.get(Layer, layer_id)
            changes.append(
                self._resolve(
                    alert,
                    model,
                    layer.name if layer is not None else None,
                    now,
                    because="version replaced",
                    window_end=last,
                )
            )

    @staticmethod
    def _resolve(
        alert: Alert,
        model: Model,
        layer_name: str | None,
        now: datetime,
        because: str = "",
        window_end: datetime | None = None,
    ) -> AlertChange:
        alert.state = "resolved"
        alert.resolved_at = now
        extra: dict[str, Any] = {}
        if because:
            extra["resolved_because"] = because
        if window_end is not None:
            # the replay's mark: windows up to here were judged for this alert
            extra["resolved_window_end"] = as_utc(window_end).isoformat()
        if extra:
            alert.values = {**(alert.values or {}), **extra}
        return AlertChange(
            "resolved", alert.id, alert.kind, model.name, model.version, layer_name, alert.values
        )

    # -- storage -----------------------------------------------------------------------------
    def _new_windows(
        self, session: Session, model_id: int, mark: int | None, uids: set[str]
    ) -> tuple[dict[int, set[int]], int | None]:
        """The ids of the windows to replay, by layer, and the highest window id seen.

        Windows stored after ``mark`` (without one: the newest ``_REPLAY_LIMIT`` by id per
        layer) and those of ``uids``.  Rolled-up windows are summaries of judged ones, not
        news."""
        raw = sa.and_(Window.model_id == model_id, Window.resolution_seconds == 0)
        if mark is None:
            rank = (
                sa.func.row_number()
                .over(partition_by=Window.layer_id, order_by=Window.id.desc())
                .label("rank")
            )
            ranked = sa.select(Window.id, Window.layer_id, rank).where(raw).subquery()
            query = sa.select(ranked.c.id, ranked.c.layer_id).where(ranked.c.rank <= _REPLAY_LIMIT)
        else:
            query = sa.select(Window.id, Window.layer_id).where(raw, Window.id > mark)
        rows = list(session.execute(query).all())
        listed = sorted(uids)
        for start in range(0, len(listed), 500):
            rows.extend(
                session.execute(
                    sa.select(Window.id, Window.layer_id).where(
                        raw, Window.uid.in_(listed[start : start + 500])
                    )
                ).all()
            )
        new: dict[int, set[int]] = {}
        for window_id, layer_id in rows:
            new.setdefault(layer_id, set()).add(window_id)
        top = max((window_id for window_id, _ in rows), default=None)
        return new, top if mark is None or top is None else max(top, mark)

    def _context(
        self, session: Session, model_id: int, new: Mapping[int, set[int]]
    ) -> dict[int, dict[str, list[dict[str, Any]]]]:
        """The windows the replay judges ``new`` by, per layer and source, oldest first:
        those that ended from ``no_data_seconds`` before the oldest new window on (the
        sources that may keep an alert then), and the ``config.history`` before those of
        every source."""
        if not new:
            return {}
        ids = sorted({i for ids in new.values() for i in ids})
        oldest = None
        for start in range(0, len(ids), 500):
            found = session.execute(
                sa.select(sa.func.min(Window.end)).where(Window.id.in_(ids[start : start + 500]))
            ).scalar_one_or_none()
            if found is not None:
                oldest = as_utc(found) if oldest is None else min(oldest, as_utc(found))
        if oldest is None:
            return {}
        bound = oldest - timedelta(seconds=self.config.no_data_seconds)
        columns = [
            Window.id,
            Window.layer_id,
            Window.source,
            Window.end,
            *(getattr(Window, c) for c in _CONDITION_COLUMN.values()),
            *(getattr(Window, c) for c in _VALUE_COLUMNS if c not in _CONDITION_COLUMN.values()),
        ]
        layer_ids = sorted(new)
        recent = sa.select(*columns).where(
            Window.model_id == model_id, Window.layer_id.in_(layer_ids), Window.end >= bound
        )
        rank = (
            sa.func.row_number()
            .over(
                partition_by=(Window.layer_id, Window.source),
                order_by=(Window.end.desc(), Window.id.desc()),
            )
            .label("rank")
        )
        earlier = (
            sa.select(*columns, rank)
            .where(Window.model_id == model_id, Window.layer_id.in_(layer_ids), Window.end < bound)
            .subquery()
        )
        before = sa.select(*(earlier.c[c.key] for c in columns)).where(
            earlier.c.rank <= self.config.history
        )
        out: dict[int, dict[str, list[dict[str, Any]]]] = {}
        for row in session.execute(sa.union_all(recent, before)).mappings():
            out.setdefault(row["layer_id"], {}).setdefault(row["source"], []).append(dict(row))
        for sources in out.values():
            for seq in sources.values():
                seq.sort(key=lambda w: (as_utc(w["end"]), w["id"]))
        return out

    @staticmethod
    def _judged(session: Session, model_id: int) -> dict[tuple[int, str], datetime]:
        """Per (layer, kind), the newest window end its newest alert was judged on (opened,
        updated, resolved by): the replay skips windows up to it.

        One lookup per layer of the version and kind, each a descent of the index
        ``ix_alerts_newest`` (model, layer, kind, id): grouping the version's alerts read
        every alert it ever had, on every stored batch (a year of them: 300,000 rows)."""
        newest = sa.union_all(
            *(
                sa.select(
                    sa.select(sa.func.max(Alert.id))
                    .where(
                        Alert.model_id == model_id,
                        Alert.layer_id == Layer.id,
                        Alert.kind == kind,  # a parameter: the plan knows the kind
                    )
                    .correlate(Layer)
                    .scalar_subquery()
                ).where(Layer.model_id == model_id)
                for kind in LAYER_KINDS
            )
        )
        out: dict[tuple[int, str], datetime] = {}
        for alert in session.execute(sa.select(Alert).where(Alert.id.in_(newest))).scalars():
            values = alert.values or {}
            ends = [
                e
                for e in (
                    _parse_end(values.get("window_end")),
                    _parse_end(values.get("resolved_window_end")),
                )
                if e is not None
            ]
            if ends and alert.layer_id is not None:
                out[(alert.layer_id, alert.kind)] = max(ends)
        return out

    @staticmethod
    def _open(session: Session, model_id: int) -> dict[tuple[int | None, str], Alert]:
        alerts = session.execute(
            sa.select(Alert).where(Alert.model_id == model_id, Alert.state == "open")
        ).scalars()
        return {(a.layer_id, a.kind): a for a in alerts}

    @staticmethod
    def _insert(
        session: Session,
        model_id: int,
        layer_id: int | None,
        kind: str,
        values: Mapping[str, Any],
        now: datetime,
    ) -> Alert | None:
        alert = Alert(
            model_id=model_id,
            layer_id=layer_id,
            kind=kind,
            state="open",
            opened_at=now,
            last_seen_at=now,
            values=dict(values),
        )
        try:
            with session.begin_nested():  # another evaluator may have opened it meanwhile
                session.add(alert)
        except IntegrityError:
            return None
        return alert

    @staticmethod
    def _values(window: Mapping[str, Any], windows: int) -> dict[str, Any]:
        values = {c: _json(window.get(c)) for c in _VALUE_COLUMNS if c in window}
        values["window_end"] = _json(window["end"])
        values["windows"] = windows
        if "source" in window:
            values["source"] = window["source"]  # the replica that shows the condition
        return values

    @staticmethod
    def _log(changes: Iterable[AlertChange]) -> None:
        for c in changes:
            where = f"{c.model}@{c.version}" + (f" layer {c.layer}" if c.layer else "")
            if c.action == "opened":
                logger.warning("bnwatch alert opened: %s on %s %s", c.kind, where, dict(c.values))
            else:
                logger.info("bnwatch alert resolved: %s on %s", c.kind, where)


def evaluate_all(
    repository: Repository, engine: AlertEngine, *, now: datetime | None = None
) -> list[AlertChange]:
    """Evaluate every stored model version and the silence check (CLI, periodic tasks)."""
    changes: list[AlertChange] = []
    for m in repository.models():
        changes.extend(engine.evaluate(repository, m.name, m.version, now=now))
    changes.extend(engine.check_silence(repository, now=now))
    return changes
