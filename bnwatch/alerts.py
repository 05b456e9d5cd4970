"""Alerts: rules, a persistent state machine, and the checks that drive it.

An alert is about one (model, version, layer, kind) -- ``no_data`` about a whole model
version.  It **opens** only after its condition held in the last ``open_after`` windows of the
layer, and **resolves** only after the condition was absent from the last ``resolve_after``
windows (hysteresis: a flapping condition does not flap the alert).  At most one alert per
key is open at a time, so repeated evaluation is idempotent; while open, the alert's
``values`` follow the newest window that still shows the condition.  State lives in the
database (``alerts`` table), computed from the stored windows, so evaluators can restart, and
several can run (service workers, replicas' writers) without duplicating alerts.

Kinds and their per-window conditions:

``drift``                   the layer drifted from its baseline (``LayerReport.drifted``)
``small_batch_mismatch``    batch-statistics normalization with noisy small batches
``batch_stat_mode``         the layer normalized with batch statistics at inference
``running_stats_mutated``   the stored running statistics changed while watched
``nonfinite_activations``   at least ``nonfinite_min`` NaN/inf values reached the layer
``no_data``                 a model version that reported went silent for ``no_data_seconds``

Thresholds come from :class:`AlertConfig` defaults, overridable by a TOML file
(:meth:`AlertConfig.from_toml`) and by arguments (:meth:`AlertConfig.with_overrides`); every
value is validated with an error that names the offending key.
"""

from __future__ import annotations

import logging
import math
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from datetime import datetime
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


class AlertEngine:
    """Evaluates the alert rules against a store and persists the alerts' state."""

    def __init__(self, config: AlertConfig | None = None) -> None:
        self.config = config or AlertConfig()

    # -- entry points ----------------------------------------------------------------------
    def on_stored(
        self, repository: Repository, records: Sequence[WindowRecord]
    ) -> list[AlertChange]:
        """Evaluate the model versions that just received windows (a writer's hook)."""
        changes: list[AlertChange] = []
        for model, version in sorted({(r.model, r.version) for r in records}):
            changes.extend(self.evaluate(repository, model, version))
        return changes

    def evaluate(
        self,
        repository: Repository,
        model: str,
        version: str,
        *,
        now: datetime | None = None,
    ) -> list[AlertChange]:
        """Open, update and resolve the layer alerts of one model version (one transaction)."""
        now = as_utc(now) if now is not None else utcnow()
        with Session(repository.engine) as session, session.begin():
            m = session.execute(
                sa.select(Model).where(Model.name == model, Model.version == version)
            ).scalar_one_or_none()
            if m is None:
                return []
            _serialize(session, m.id)
            history = self._history(session, m.id)
            open_alerts = self._open(session, m.id)
            changes: list[AlertChange] = []
            for (layer_id, layer_name), windows in history.items():
                for kind in LAYER_KINDS:
                    rule: Rule = getattr(self.config, kind)
                    if not rule.enabled:
                        # a rule turned off no longer holds its alerts open
                        current = open_alerts.get((layer_id, kind))
                        if current is not None:
                            changes.append(
                                self._resolve(current, m, layer_name, now, because="rule disabled")
                            )
                        continue
                    flags = [self._condition(kind, w) for w in windows]  # newest first
                    current = open_alerts.get((layer_id, kind))
                    change = self._step(
                        session, m, layer_id, layer_name, kind, rule, flags, windows, current, now
                    )
                    if change is not None:
                        changes.append(change)
            self._no_data(session, m, open_alerts, now, changes)
        self._log(changes)
        return changes

    def check_silence(
        self, repository: Repository, *, now: datetime | None = None
    ) -> list[AlertChange]:
        """Open or resolve ``no_data`` alerts of every model version (run periodically)."""
        now = as_utc(now) if now is not None else utcnow()
        changes: list[AlertChange] = []
        with Session(repository.engine) as session, session.begin():
            for m in session.execute(sa.select(Model).order_by(Model.id)).scalars():
                _serialize(session, m.id)
                self._no_data(session, m, self._open(session, m.id), now, changes)
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
        flags: list[bool],
        windows: Sequence[Mapping[str, Any]],
        current: Alert | None,
        now: datetime,
    ) -> AlertChange | None:
        if current is None:
            if len(flags) >= rule.open_after and all(flags[: rule.open_after]):
                values = self._values(windows[0], rule.open_after)
                alert = self._insert(session, model.id, layer_id, kind, values, now)
                if alert is not None:
                    return AlertChange(
                        "opened", alert.id, kind, model.name, model.version, layer_name, values
                    )
            return None
        if len(flags) >= rule.resolve_after and not any(flags[: rule.resolve_after]):
            return self._resolve(current, model, layer_name, now)
        if flags and flags[0]:
            current.last_seen_at = now
            current.values = self._values(windows[0], sum(flags))
        return None

    def _no_data(
        self,
        session: Session,
        model: Model,
        open_alerts: Mapping[tuple[int | None, str], Alert],
        now: datetime,
        changes: list[AlertChange],
    ) -> None:
        last = session.execute(
            sa.select(sa.func.max(Window.end)).where(Window.model_id == model.id)
        ).scalar_one_or_none()
        if last is None:
            return
        silent = (now - as_utc(last)).total_seconds()
        current = open_alerts.get((None, "no_data"))
        values = {"last_window_end": as_utc(last).isoformat(), "silent_seconds": silent}
        if current is None and silent > self.config.no_data_seconds:
            alert = self._insert(session, model.id, None, "no_data", values, now)
            if alert is not None:
                changes.append(
                    AlertChange(
                        "opened", alert.id, "no_data", model.name, model.version, None, values
                    )
                )
        elif current is not None and silent <= self.config.no_data_seconds:
            changes.append(self._resolve(current, model, None, now))

    @staticmethod
    def _resolve(
        alert: Alert, model: Model, layer_name: str | None, now: datetime, because: str = ""
    ) -> AlertChange:
        alert.state = "resolved"
        alert.resolved_at = now
        if because:
            alert.values = {**(alert.values or {}), "resolved_because": because}
        return AlertChange(
            "resolved", alert.id, alert.kind, model.name, model.version, layer_name, alert.values
        )

    # -- storage -----------------------------------------------------------------------------
    def _history(
        self, session: Session, model_id: int
    ) -> dict[tuple[int, str], list[dict[str, Any]]]:
        """The newest ``config.history`` windows of every layer, newest first."""
        columns = [
            Window.layer_id,
            Window.end,
            *(getattr(Window, c) for c in _CONDITION_COLUMN.values()),
        ]
        extra = [getattr(Window, c) for c in _VALUE_COLUMNS if c not in _CONDITION_COLUMN.values()]
        rank = (
            sa.func.row_number()
            .over(partition_by=Window.layer_id, order_by=(Window.end.desc(), Window.id.desc()))
            .label("rank")
        )
        ranked = sa.select(*columns, *extra, rank).where(Window.model_id == model_id).subquery()
        rows = session.execute(
            sa.select(ranked, Layer.name)
            .join(Layer, Layer.id == ranked.c.layer_id)
            .where(ranked.c.rank <= self.config.history)
            .order_by(Layer.depth, Layer.id, ranked.c.rank)
        ).mappings()
        out: dict[tuple[int, str], list[dict[str, Any]]] = {}
        for row in rows:
            out.setdefault((row["layer_id"], row["name"]), []).append(dict(row))
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
