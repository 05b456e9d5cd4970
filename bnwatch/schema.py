"""Record types that cross module boundaries: layer reports, windows, reference profiles.

Everything here is plain data (numpy arrays, numbers, strings) so that the store, the
service, the dashboard and the exporters can read it without torch.  Changing what a record
means bumps :data:`SCHEMA_VERSION`.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import unicodedata
import uuid
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from bnwatch.errors import ConfigError, ProfileFileError, ShapeError
from bnwatch.stats import F64, MOMENT_FIELDS, ChannelMoments, LayerStats, Reservoir

SCHEMA_VERSION = 1
"""Version of the record and wire formats defined here."""

BATCH_NOISE_SIZES: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256)
"""Batch sizes for which every report predicts the batch-statistics noise (DESIGN §3)."""

ALERT_KINDS: tuple[str, ...] = (
    "drift",
    "small_batch_mismatch",
    "batch_stat_mode",
    "running_stats_mutated",
    "nonfinite_activations",
    "no_data",
)
"""Every alert kind bnwatch raises (``bnwatch.alerts``), exported by ``bnwatch.export`` and
matched by ``deploy/prometheus/alerts.yml``."""

REPORTED_STATUSES: tuple[str, ...] = ("applied", "rejected", "failed")
"""How a recorded recalibration ends (what a report of its outcome may say)."""
RECALIBRATION_STATUSES: tuple[str, ...] = ("pending", *REPORTED_STATUSES, "notified")
"""Every status of a recorded recalibration: ``pending`` until it ends; ``notified`` for a
trigger whose action only told someone (a callback that returned nothing), which recalibrated
nothing."""

LAYER_METRICS: tuple[str, ...] = (
    "kl_mean",
    "d_rms",
    "log_r_rms",
    "gap_p_value",
    "frac_gap",
    "gap",
    "drift_kl_mean",
    "drift_d_rms",
    "drift_log_r_rms",
    "p_value",
    "frac_drifted",
    "drifted",
    "batch_stat_mode",
    "running_stats_mutated",
    "small_batch_mismatch",
    "batch_noise_d",
    "batch_noise_log_r",
)
"""The layer-level metrics of a report (:meth:`LayerReport.metrics`): stored as columns,
sent on the wire, exported to Prometheus."""
FLAG_METRICS = frozenset(
    {"gap", "drifted", "batch_stat_mode", "running_stats_mutated", "small_batch_mismatch"}
)
"""The boolean ones among :data:`LAYER_METRICS`."""

BATCH_SIZE_BUCKETS: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256)
"""Upper bounds of the batch-size histogram (store totals, Prometheus); +Inf follows."""

MAX_NAME_LENGTH = 200
"""Longest model name, version and source (the store's columns are VARCHAR(200): PostgreSQL
refuses longer ones)."""
MAX_LAYER_NAME_LENGTH = 500
"""Longest layer name, a module path (the store's column is VARCHAR(500))."""
NAME_RULE = (
    f"1 to {MAX_NAME_LENGTH} characters, without '/' or control characters, and not '.' or "
    "'..' (a model name and version are path segments of the service's URLs)"
)
"""What a model name or version may be (:func:`name_problem`), for error messages."""
TEXT_RULE = f"1 to {MAX_NAME_LENGTH} characters, without control characters"
"""What a source may be (:func:`text_problem`), for error messages."""


def text_problem(value: str, max_length: int = MAX_NAME_LENGTH) -> str | None:
    """Why ``value`` cannot be stored as a name of at most ``max_length`` characters, or
    ``None``.

    Refused: the empty string, more than ``max_length`` characters (PostgreSQL refuses them in
    a VARCHAR, so a monitor would fail at every write), NUL (PostgreSQL refuses it in text),
    other control characters (a trailing newline read from a file would make a second model
    that looks like the first in every listing) and unpaired surrogates (not UTF-8).
    """
    if not value:
        return "must not be empty"
    if len(value) > max_length:
        return f"must be at most {max_length} characters (the store's limit), not {len(value)}"
    problem = storable_problem(value)
    if problem is not None:
        return problem
    control = next((c for c in value if unicodedata.category(c) == "Cc"), None)
    if control is not None:
        return f"control characters are not allowed (found U+{ord(control):04X})"
    return None


def storable_problem(value: str) -> str | None:
    """Why the store cannot hold ``value`` as text at all, or ``None``: NUL (PostgreSQL refuses
    it) or an unpaired surrogate (not UTF-8)."""
    if "\x00" in value:
        return "NUL characters are not allowed (the store cannot hold them)"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return "not valid Unicode text (unpaired surrogate)"
    return None


def storable_text(value: str, max_length: int = MAX_NAME_LENGTH) -> str:
    """``value`` made storable in ``max_length`` characters (:func:`text_problem`), for a name
    bnwatch makes up itself (the host name in a default source): ``value`` itself when it is
    storable, as every ordinary host name is; otherwise each character the store refuses
    (a control character, an unpaired surrogate of a name that is not UTF-8) becomes ``?``,
    and the whole is cut to its first ``max_length - 11`` characters, ``~`` and 10 hex digits
    of a digest of ``value`` -- still recognisable, still distinct from another such name.
    ``max_length`` must be at least 12."""
    if text_problem(value, max_length) is None or not value:
        return value
    digest = hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest()[:10]
    clean = "".join(
        "?" if unicodedata.category(c) in ("Cc", "Cs") else c for c in value[: max_length - 11]
    )
    return f"{clean}~{digest}"


def name_problem(value: str) -> str | None:
    """Why ``value`` cannot be a model name or version, or ``None``.

    The one rule for both, used by :func:`bnwatch.watch` and :func:`bnwatch.profile`
    (:class:`~bnwatch.errors.ConfigError`) and by the wire format (422 at ingest): besides
    :func:`text_problem`, a name is one path segment of the service's read API
    (``/api/v1/models/{model}/versions/{version}/...``), and a name stored there must be
    readable through it.  ``/`` cannot be: the router matches the decoded path, so ``%2F``
    is a segment boundary; ``.`` and ``..`` cannot be: URL clients (browsers, httpx) resolve
    them as relative segments before sending.  Every other character is sent percent-encoded
    and comes back intact.
    """
    problem = text_problem(value, MAX_NAME_LENGTH)
    if problem is not None:
        return problem
    if "/" in value:
        return (
            "'/' is not allowed: a name is one path segment of the service's URLs "
            "(/api/v1/models/{model}/versions/{version}/...), where even an encoded '/' "
            "splits it; use another separator, e.g. 'org--resnet50'"
        )
    if value in (".", ".."):
        return f"{value!r} is not allowed: URL clients resolve it as a relative path segment"
    return None


def check_name(argument: str, value: Any) -> str:
    """``value`` if it is a valid model name or version (:func:`name_problem`), else a
    :class:`~bnwatch.errors.ConfigError` naming ``argument``, what is allowed and what is
    wrong -- raised before a monitor starts, not at each of its writes."""
    return _checked(argument, value, NAME_RULE, name_problem)


def check_text(argument: str, value: Any) -> str:
    """``value`` if the store can hold it as a source (:func:`text_problem`), else a
    :class:`~bnwatch.errors.ConfigError` naming ``argument``."""
    return _checked(argument, value, TEXT_RULE, text_problem)


def _checked(argument: str, value: Any, rule: str, problem_of: Callable[[str], str | None]) -> str:
    if not isinstance(value, str):
        raise ConfigError(argument, value, f"a string of {rule}")
    problem = problem_of(value)
    if problem is not None:
        raise ConfigError(argument, value, f"{rule}; {problem}")
    return value


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def utcnow() -> datetime:
    """The current time, timezone-aware in UTC (every timestamp bnwatch records is)."""
    return datetime.now(timezone.utc)


def as_utc(value: datetime) -> datetime:
    """A stored or given time, aware and in UTC: a naive one is UTC already (SQLite returns
    naive datetimes; every time bnwatch writes is UTC), an aware one is converted (PostgreSQL
    answers in the session's ``TimeZone``, whatever it is)."""
    if value.tzinfo is None:
        return value.replace(tzinfo=timezone.utc)
    return value.astimezone(timezone.utc)


@dataclass(frozen=True)
class BatchNoise:
    """Predicted RMS of Batch Renorm's ``d`` and ``log r`` if the layer normalized a batch of
    ``batch_size`` samples with that batch's statistics (see :func:`bnwatch.drift.batch_noise`)."""

    batch_size: int
    rms_d: float
    rms_log_r: float


_SHARED_ARRAYS = frozenset({"ref_mean", "ref_var"})
"""LayerReport arrays that are the monitor's references, shared by its windows."""


@dataclass(frozen=True, eq=False)
class LayerReport:
    """What one window says about one BatchNorm layer.

    Per-channel arrays (``[C]``) ``d``, ``log_r``, ``kl``, ``w2``, ``z`` compare the window with
    the layer's running statistics as they were when the monitor attached; the ``drift_*``
    arrays compare it with the drift baseline (a reference profile, or the warm-up windows).

    Layer-level decisions (DESIGN §3):
        gap: the train/inference gap -- the window differs from the running statistics
            significantly (false-alarm rate ``alpha`` across layers) *and* by more than the
            effect-size tolerance.  Persistent on models trained with augmentation.
        drifted: the same rule against the baseline: production *changed*.
        small_batch_mismatch: the layer normalizes with batch statistics at inference and the
            batches it sees are small enough for that noise to exceed the tolerance.
    """

    layer: str
    kind: str
    channels: int
    stats: LayerStats
    # where the layer sits and what was compared with
    depth: int
    eps: float
    baseline_moments: ChannelMoments | None
    # what was seen
    mean: F64
    var: F64
    between_var: F64
    within_var: F64
    # against the running statistics (the train/inference gap)
    ref_mean: F64
    ref_var: F64
    d: F64
    log_r: F64
    kl: F64
    w2: F64
    z: F64
    kl_mean: float
    d_rms: float
    log_r_rms: float
    gap_p_value: float
    frac_gap: float
    gap: bool
    # against the drift baseline
    baseline: str
    drift_d: F64
    drift_log_r: F64
    drift_z: F64
    drift_kl_mean: float
    drift_d_rms: float
    drift_log_r_rms: float
    p_value: float
    frac_drifted: float
    drifted: bool
    # small-batch mismatch
    batch_stat_mode: bool
    running_stats_mutated: bool
    batch_noise: tuple[BatchNoise, ...]
    observed_batch_noise: BatchNoise | None
    small_batch_mismatch: bool

    @property
    def n_samples(self) -> int:
        return self.stats.moments.n_samples

    @property
    def n_batches(self) -> int:
        return self.stats.n_batches

    @property
    def nonfinite(self) -> int:
        """Non-finite input values seen (counted and excluded from every statistic)."""
        return int(self.stats.moments.nonfinite.sum())

    @property
    def batch_sizes(self) -> Mapping[int, int]:
        return self.stats.batch_sizes

    @property
    def reservoir(self) -> Reservoir | None:
        """The window's uniform sample of per-sample channel means (``stats.reservoir``;
        ``None`` when the monitor kept none)."""
        return self.stats.reservoir

    @property
    def nbytes(self) -> int:
        """Bytes of the arrays this report alone holds: its statistics and per-channel results.
        The references it was compared with (``ref_mean``, ``ref_var``, ``baseline_moments``)
        are shared by every window of the monitor and not counted."""
        own = (
            value.nbytes
            for name, value in vars(self).items()
            if isinstance(value, np.ndarray) and name not in _SHARED_ARRAYS
        )
        return self.stats.nbytes + sum(int(n) for n in own)

    def metrics(self) -> dict[str, float | bool | None]:
        """The :data:`LAYER_METRICS` of this report (undefined values as ``None``)."""
        noise = self.observed_batch_noise
        out: dict[str, float | bool | None] = {
            "batch_noise_d": _finite(noise.rms_d) if noise else None,
            "batch_noise_log_r": _finite(noise.rms_log_r) if noise else None,
        }
        for name in LAYER_METRICS[:-2]:
            value = getattr(self, name)
            out[name] = bool(value) if name in FLAG_METRICS else _finite(float(value))
        return out

    def summary(self) -> dict[str, Any]:
        """Layer-level fields only (no per-channel arrays), JSON-serializable."""
        noise = self.observed_batch_noise
        return {
            "layer": self.layer,
            "kind": self.kind,
            "channels": self.channels,
            "n_samples": self.n_samples,
            "n_batches": self.n_batches,
            "nonfinite": self.nonfinite,
            "kl_mean": self.kl_mean,
            "d_rms": self.d_rms,
            "log_r_rms": self.log_r_rms,
            "gap_p_value": self.gap_p_value,
            "frac_gap": self.frac_gap,
            "gap": self.gap,
            "baseline": self.baseline,
            "drift_kl_mean": self.drift_kl_mean,
            "drift_d_rms": self.drift_d_rms,
            "drift_log_r_rms": self.drift_log_r_rms,
            "p_value": self.p_value,
            "frac_drifted": self.frac_drifted,
            "drifted": self.drifted,
            "batch_stat_mode": self.batch_stat_mode,
            "running_stats_mutated": self.running_stats_mutated,
            "small_batch_mismatch": self.small_batch_mismatch,
            "observed_batch_noise_d": None if noise is None else noise.rms_d,
            "observed_batch_noise_log_r": None if noise is None else noise.rms_log_r,
            "batch_sizes": {str(k): v for k, v in self.batch_sizes.items()},
        }


@dataclass(frozen=True, eq=False)
class WindowRecord:
    """A closed window of one monitor: every watched layer's statistics and report (with the
    layer's reservoir of per-sample channel means in ``reports[layer].stats.reservoir``)."""

    model: str
    version: str
    source: str
    start: datetime
    end: datetime
    reports: Mapping[str, LayerReport]
    schema_version: int = SCHEMA_VERSION
    uid: str = field(default_factory=lambda: uuid.uuid4().hex)
    """Unique id of the window: storing it twice (a retried delivery) stores it once."""
    monitor: Mapping[str, float] = field(default_factory=dict)
    """The sending monitor's account of itself when the window closed: ``overhead_ratio``,
    ``windows_dropped``, ``hook_errors``, ``forwards``, ``forwards_measured``, and the
    ``DriftConfig`` thresholds that decided the window's flags as ``drift_<field>``
    (:func:`bnwatch.drift.config_account`; a service that recomputes the flags names its own)."""

    @property
    def nbytes(self) -> int:
        """Bytes of the arrays this window alone holds (:attr:`LayerReport.nbytes` summed): what
        queues and in-memory histories bound besides the number of windows.  A ResNet-50 window
        holds about 5.5 MB."""
        return sum(report.nbytes for report in self.reports.values())


@dataclass(frozen=True, eq=False)
class LayerProfile:
    """Reference moments of one layer recorded from validation data by ``bnwatch.profile``."""

    layer: str
    kind: str
    eps: float
    stats: LayerStats
    reservoir: Reservoir
    running_mean: F64 | None
    running_var: F64 | None

    @property
    def channels(self) -> int:
        return self.stats.moments.channels


@dataclass(frozen=True, eq=False)
class Profile:
    """A reference profile: per-layer moments and reservoirs of per-sample channel means.

    Save with :meth:`save` and read back with :meth:`load` (a plain ``.npz``; no pickle).
    """

    name: str
    version: str
    created: datetime
    layers: Mapping[str, LayerProfile] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION

    def save(self, path: str | Path) -> Path:
        """Write the profile to ``path`` (``.npz``) and return the path written."""
        arrays: dict[str, NDArray[Any]] = {}
        meta: dict[str, Any] = {
            "schema_version": self.schema_version,
            "name": self.name,
            "version": self.version,
            "created": self.created.isoformat(),
            "layers": [],
        }
        for i, (name, lp) in enumerate(self.layers.items()):
            st = lp.stats
            meta["layers"].append(
                {
                    "layer": name,
                    "kind": lp.kind,
                    "eps": lp.eps,
                    "batch_sizes": {str(k): v for k, v in st.batch_sizes.items()},
                    "n_batches": st.n_batches,
                    "batches_seen": st.batches_seen,
                    "samples_seen": st.samples_seen,
                    "batch_stat_batches": st.batch_stat_batches,
                    "reservoir_capacity": lp.reservoir.capacity,
                    "reservoir_seen": lp.reservoir.seen,
                    "has_running": lp.running_mean is not None and lp.running_var is not None,
                }
            )
            arrays[f"moments_{i}"] = np.stack(st.moments.as_arrays())
            arrays[f"reservoir_{i}"] = lp.reservoir.rows
            if lp.running_mean is not None and lp.running_var is not None:
                arrays[f"running_{i}"] = np.stack([lp.running_mean, lp.running_var])
        arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
        out = Path(path)
        buffer = io.BytesIO()
        np.savez_compressed(buffer, **arrays)  # type: ignore[arg-type]
        out.write_bytes(buffer.getvalue())
        return out

    @classmethod
    def load(cls, path: str | Path) -> Profile:
        """Read a profile written by :meth:`save`.

        Raises:
            FileNotFoundError: there is no such file.
            ProfileFileError: the file is not a profile :meth:`save` wrote (another kind of
                file, a truncated or edited one): names the file and what is wrong.
        """
        where = Path(path)
        try:
            with np.load(where, allow_pickle=False) as data:
                return cls._from_npz(data, where)
        except (FileNotFoundError, ProfileFileError):
            raise
        except ShapeError as err:
            raise ProfileFileError(where, str(err)) from err
        except (
            OSError,
            EOFError,
            zipfile.BadZipFile,
            ValueError,
            TypeError,
            KeyError,
            AttributeError,
            IndexError,
        ) as err:  # a .npy, a JSON file, a truncated archive, missing or mistyped entries
            raise ProfileFileError(
                where, f"not a profile that Profile.save wrote ({type(err).__name__}: {err})"
            ) from err

    @classmethod
    def _from_npz(cls, data: Any, path: Path) -> Profile:
        meta = json.loads(bytes(data["meta"]).decode())
        if not isinstance(meta, dict) or not isinstance(meta.get("layers"), list):
            raise ProfileFileError(path, "its meta entry is not a profile's description")
        if meta.get("schema_version") != SCHEMA_VERSION:
            raise ShapeError(
                f"profile {path} schema_version", SCHEMA_VERSION, meta.get("schema_version")
            )
        layers: dict[str, LayerProfile] = {}
        for i, lm in enumerate(meta["layers"]):
            name = lm["layer"]
            moments = data[f"moments_{i}"]
            if moments.ndim != 2 or moments.shape[0] != len(MOMENT_FIELDS):
                raise ShapeError(f"layer {name} moments", "[13, C]", moments.shape)
            if moments.dtype.kind != "f":
                raise ShapeError(f"layer {name} moments", "float arrays", moments.dtype)
            channels = moments.shape[1]
            sizes = {int(k): int(v) for k, v in lm["batch_sizes"].items()}
            if sum(sizes.values()) != int(lm["n_batches"]):
                raise ProfileFileError(
                    path,
                    f"layer {name}: batch_sizes count {sum(sizes.values())} batches, "
                    f"n_batches says {lm['n_batches']}",
                )
            stats = LayerStats(
                moments=ChannelMoments.from_arrays(list(moments.astype(np.float64))),
                batch_sizes=sizes,
                n_batches=int(lm["n_batches"]),
                batches_seen=int(lm["batches_seen"]),
                samples_seen=int(lm["samples_seen"]),
                batch_stat_batches=int(lm["batch_stat_batches"]),
            )
            rows = data[f"reservoir_{i}"]
            if rows.ndim != 2 or rows.shape[1] != channels:
                raise ShapeError(f"layer {name} reservoir", f"[k, {channels}]", rows.shape)
            running = data[f"running_{i}"] if lm["has_running"] else None
            if running is not None and running.shape != (2, channels):
                raise ShapeError(f"layer {name} running statistics", (2, channels), running.shape)
            layers[name] = LayerProfile(
                layer=name,
                kind=lm["kind"],
                eps=float(lm["eps"]),
                stats=stats,
                reservoir=Reservoir.from_rows(
                    rows, int(lm["reservoir_seen"]), int(lm["reservoir_capacity"])
                ),
                running_mean=None if running is None else running[0].astype(np.float64),
                running_var=None if running is None else running[1].astype(np.float64),
            )
        return cls(
            name=meta["name"],
            version=meta["version"],
            created=datetime.fromisoformat(meta["created"]),
            layers=layers,
        )
