"""The wire format: windows sent by remote monitors to ``POST /api/v1/windows``.

A :class:`WindowBatch` (JSON, ``schema_version`` 1) carries closed windows.  Each layer sends
its exact sufficient statistics and the references it was compared with -- per-channel arrays
as base64 of :mod:`bnwatch.codec` blobs, never as JSON number lists -- and the metrics its
monitor computed.  The receiver keeps those metrics, or recomputes every metric and decision
from the statistics (:func:`to_record` with ``recompute``, the service's
``BNWATCH_RECOMPUTE=1``; always for a window whose layers came without metrics), so that a
store can hold one judgement whoever sent the windows.  Validation errors name the field to
fix.

A layer may also carry its window's reservoir of per-sample channel means (``reservoir``: a
float32 blob of ``k <= min(capacity, seen)`` rows, with ``seen`` and ``capacity``); payloads
without it stay valid.

A :class:`WireProfile` (``schema_version`` 1) is the body of ``POST /api/v1/profiles``: a
reference profile (:func:`bnwatch.profile`) in the same conventions -- per layer its exact
sufficient statistics, batch counters, reservoir and (optionally) the running statistics it was
recorded with.  :func:`profile_body` and :func:`to_profile` convert; the float64 statistics
and the float32 reservoir rows survive the round trip bit for bit.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Annotated, Any, Literal

import numpy as np
from numpy.typing import NDArray
from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    field_validator,
    model_validator,
)

from bnwatch.codec import blob_shape, decode_arrays, encode_arrays, encode_moments
from bnwatch.drift import (
    DriftConfig,
    Reference,
    assess_layer,
    config_account,
    decide,
    report_from_metrics,
)
from bnwatch.schema import (
    MAX_NAME_LENGTH,
    NAME_RULE,
    SCHEMA_VERSION,
    TEXT_RULE,
    LayerProfile,
    LayerReport,
    Profile,
    WindowRecord,
    name_problem,
    text_problem,
)
from bnwatch.stats import MOMENT_FIELDS, ChannelMoments, LayerStats, Reservoir

MAX_CHANNELS = 1 << 20
MAX_LAYERS = 4096
MAX_WINDOWS = 1000
MAX_COUNT = 2**31 - 1
"""Most samples and batches of one window (the store's count columns hold 64 bits since
migration 0007; more than this in one window is a broken sender, not traffic)."""
TIME_MIN = datetime(1970, 1, 2, tzinfo=timezone.utc)
"""Earliest start of a window (inclusive).  Monitors stamp windows with the clock of the
host; a time before this is a broken clock or sender: times near year 1 made bucket
arithmetic (hourly reads, ``bnwatch db compact``) step before year 1, and a day clear of the
epoch keeps every bucket index positive, where SQLite's truncation and PostgreSQL's floor
agree and the whole range is one bucket (a window ending on the epoch itself fell in
another)."""
TIME_MAX = datetime(2100, 1, 1, tzinfo=timezone.utc)
"""End of the time a window may end in (exclusive): a broken clock past it.  Bucket
boundaries are computed from float seconds, which hold microseconds exactly up to 2**32 s
(year 2106): a window a microsecond past an hour, later than that, landed in the hour
before."""
MAX_RESERVOIR = 1 << 16
"""Largest reservoir capacity (rows per layer and window) the wire accepts."""
MAX_SEEN = 2**62  # the store's reservoir_seen column is 64-bit
_COUNT_FIELDS = ("count", "n", "nonfinite")
_NONNEGATIVE_FIELDS = ("count", "m2", "n", "sm2", "sm4", "vmean", "vm2", "nonfinite")


def _is_name(value: str) -> str:
    problem = name_problem(value)
    if problem is not None:
        raise ValueError(problem)
    return value


def _is_text(value: str) -> str:
    problem = text_problem(value, MAX_NAME_LENGTH)
    if problem is not None:
        raise ValueError(problem)
    return value


Name = Annotated[str, AfterValidator(_is_name), Field(description=NAME_RULE)]
"""A model name or version (:func:`bnwatch.schema.name_problem`): readable through the
service's path routes, storable."""
Source = Annotated[str, AfterValidator(_is_text), Field(description=TEXT_RULE)]
"""A monitor's source (``host:pid``): storable; it is a query parameter, never a path."""


def _b64(blob: bytes) -> str:
    return base64.b64encode(blob).decode("ascii")


def decode_blob(text: str, rows: int, channels: int, what: str) -> NDArray[np.float64]:
    """Decode a base64 codec blob of ``rows`` finite float64 arrays of ``channels`` values.

    The shape and dtype are checked from the blob's header before anything is decoded: a
    header claiming ``[13, 2**31]`` in a few hundred bytes (constant rows cost one value each)
    would otherwise have the array allocated first -- a MemoryError, an HTTP 500 that a sender
    retries forever, instead of a 422 naming the field.
    """
    try:
        raw = base64.b64decode(text, validate=True)
        dtype, found_rows, found_cols = blob_shape(raw)
    except (binascii.Error, ValueError) as err:
        raise ValueError(f"{what}: not a base64 bnwatch array blob ({err})") from None
    if (found_rows, found_cols) != (rows, channels):
        raise ValueError(
            f"{what}: expected {rows} arrays of {channels} channels, "
            f"got [{found_rows}, {found_cols}]"
        )
    if dtype != "<f8":
        raise ValueError(f"{what}: expected float64 arrays (dtype '<f8'), got {dtype!r}")
    try:
        arrays = decode_arrays(raw)
    except ValueError as err:
        raise ValueError(f"{what}: not a base64 bnwatch array blob ({err})") from None
    if not np.isfinite(arrays).all():
        raise ValueError(f"{what}: NaN or infinite values are not allowed")
    return arrays


def decode_reservoir_rows(text: str, channels: int, limit: int) -> NDArray[np.float32]:
    """Decode a base64 float32 codec blob of at most ``limit`` rows of ``channels`` values
    (the shape is checked from the header before anything is allocated)."""
    what = "reservoir.rows"
    try:  # binascii.Error, CodecError and b64decode's error on non-ASCII text: ValueErrors
        raw = base64.b64decode(text, validate=True)
        dtype, rows, cols = blob_shape(raw)
    except ValueError as err:
        raise ValueError(f"{what}: not a base64 bnwatch array blob ({err})") from None
    if cols != channels or rows > limit:
        raise ValueError(
            f"{what}: expected at most {limit} rows (min(capacity, seen)) of {channels} "
            f"channels, got [{rows}, {cols}]"
        )
    if dtype != "<f4":
        raise ValueError(f"{what}: expected float32 rows (dtype '<f4'), got {dtype!r}")
    try:
        return decode_arrays(raw)
    except ValueError as err:
        raise ValueError(f"{what}: not a base64 bnwatch array blob ({err})") from None


def decode_moment_blob(text: str, channels: int, what: str = "moments") -> NDArray[np.float64]:
    """Decode and check a ``moments`` blob (or another field of moments, ``what``: a
    baseline's): the 13 :data:`MOMENT_FIELDS` arrays of ``channels`` values, counts whole and
    non-negative (``ValueError`` naming the field)."""
    moments = decode_blob(text, len(MOMENT_FIELDS), channels, what)
    for name in _NONNEGATIVE_FIELDS:
        if (moments[MOMENT_FIELDS.index(name)] < 0).any():
            raise ValueError(f"{what}: {name} must not be negative")
    for name in _COUNT_FIELDS:
        values = moments[MOMENT_FIELDS.index(name)]
        if not np.array_equal(values, np.round(values)):
            raise ValueError(f"{what}: {name} must hold whole numbers")
    if (moments[MOMENT_FIELDS.index("n")] > MAX_COUNT).any():
        raise ValueError(f"{what}: n must not exceed {MAX_COUNT}")
    return moments


def decode_running_blob(text: str, channels: int) -> NDArray[np.float64]:
    """Decode and check a ``running`` blob: ``running_mean`` and ``running_var``."""
    running = decode_blob(text, 2, channels, "running")
    if (running[1] < 0).any():
        raise ValueError("running: running_var must not be negative")
    return running


def _is_uid(value: str) -> str:
    if not (1 <= len(value) <= 32) or not all(c.isalnum() or c in "-_" for c in value):
        raise ValueError("1 to 32 letters, digits, '-' or '_'")
    return value


def measured_samples_problem(sizes: Mapping[int, int]) -> str | None:
    """What is wrong with a batch-size histogram whose batches hold more samples, in all
    (``sum(size * count)``), than one window may (:data:`MAX_COUNT`, the bound of
    ``samples_seen``), or ``None``.

    Each size and count fits the bound on its own, but their products did not: a window of
    2**31-1 batches of 2**31-1 samples overflowed the store's 64-bit running total of measured
    samples (``layer_totals.measured_samples``) -- on PostgreSQL every later window of the
    layer failed with it, on SQLite the total silently became a float.  The sum is not
    compared with ``samples_seen`` itself: a batch counted as seen just as one window closes
    may be measured in it and seen in the next, so a real window can exceed it by a batch.
    """
    total = sum(size * count for size, count in sizes.items())  # Python ints: exact
    if total > MAX_COUNT:
        return (
            f"the measured batches hold {total} samples (sum of size x count), more than the "
            f"{MAX_COUNT} one window may hold"
        )
    return None


def time_problem(name: str, value: datetime) -> str | None:
    """What is wrong with a window's ``start`` or ``end`` (``name``) -- outside
    [:data:`TIME_MIN`, :data:`TIME_MAX`) -- or ``None``; a naive time is UTC (as the store
    reads it)."""
    try:
        utc = value.astimezone(timezone.utc) if value.tzinfo is not None else value
        inside = TIME_MIN <= utc.replace(tzinfo=timezone.utc) < TIME_MAX
    except OverflowError:  # an offset that takes it past year 9999 or before year 1
        inside = False
    if inside:
        return None
    return (
        f"{name} must be from {TIME_MIN.isoformat()} to before {TIME_MAX.isoformat()}: "
        f"{value.isoformat()} is out of range"
    )


def _check_batch_counts(n_batches: int, batch_stat_batches: int, sizes: dict[int, int]) -> None:
    """A layer's batch counts agree: its batch-size histogram counts every batch once, and
    its batches hold no more samples than a window may (:func:`measured_samples_problem`)."""
    if batch_stat_batches > n_batches:
        raise ValueError("batch_stat_batches must not exceed n_batches")
    if sum(sizes.values()) != n_batches:
        raise ValueError("batch_sizes must count exactly n_batches batches")
    problem = measured_samples_problem(sizes)
    if problem is not None:
        raise ValueError(f"batch_sizes: {problem}")


class WireBaseline(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: Literal["profile", "warmup"]
    moments: str = Field(description="base64 bnwatch array blob: 13 arrays of `channels` values")


class WireReservoir(BaseModel):
    """A uniform sample of the window's per-sample channel means (``watch(reservoir=k)``)."""

    model_config = ConfigDict(extra="forbid")

    rows: str = Field(
        description="base64 bnwatch array blob, float32: at most min(capacity, seen) rows of "
        "`channels` per-sample channel means (NaN where a channel had no finite value)"
    )
    seen: Annotated[int, Field(ge=0, le=MAX_SEEN)] = Field(
        description="samples the reservoir was drawn from"
    )
    capacity: Annotated[int, Field(ge=1, le=MAX_RESERVOIR)] = Field(
        description="the most rows the reservoir keeps"
    )


Metric = Annotated[float, Field(allow_inf_nan=False)] | None


class WireMetrics(BaseModel):
    """Layer-level metrics as the sending monitor computed them (:data:`LAYER_METRICS`)."""

    model_config = ConfigDict(extra="forbid")

    kl_mean: Metric = None
    d_rms: Metric = None
    log_r_rms: Metric = None
    gap_p_value: Annotated[float, Field(ge=0, le=1)] | None = None
    frac_gap: Annotated[float, Field(ge=0, le=1)] | None = None
    gap: bool = False
    drift_kl_mean: Metric = None
    drift_d_rms: Metric = None
    drift_log_r_rms: Metric = None
    p_value: Annotated[float, Field(ge=0, le=1)] | None = None
    frac_drifted: Annotated[float, Field(ge=0, le=1)] | None = None
    drifted: bool = False
    batch_stat_mode: bool = False
    running_stats_mutated: bool = False
    small_batch_mismatch: bool = False
    batch_noise_d: Metric = None
    batch_noise_log_r: Metric = None


class WireLayer(BaseModel):
    """One layer of one window."""

    model_config = ConfigDict(extra="forbid")

    layer: Annotated[str, Field(min_length=1, max_length=500)]
    kind: Annotated[str, Field(min_length=1, max_length=100)]
    channels: Annotated[int, Field(ge=1, le=MAX_CHANNELS)]
    depth: Annotated[int, Field(ge=0, le=1_000_000)]
    eps: Annotated[float, Field(gt=0, lt=1, allow_inf_nan=False)]
    moments: str = Field(description="base64 bnwatch array blob: 13 arrays of `channels` values")
    running: str | None = Field(
        default=None, description="base64 bnwatch array blob: running_mean, running_var"
    )
    baseline: WireBaseline | None = None
    batch_sizes: dict[
        Annotated[int, Field(ge=1, le=MAX_COUNT)], Annotated[int, Field(ge=0, le=MAX_COUNT)]
    ]
    n_batches: Annotated[int, Field(ge=0, le=MAX_COUNT)]
    batches_seen: Annotated[int, Field(ge=0, le=MAX_COUNT)]
    samples_seen: Annotated[int, Field(ge=0, le=MAX_COUNT)]
    batch_stat_batches: Annotated[int, Field(ge=0, le=MAX_COUNT)]
    running_stats_mutated: bool = False
    reservoir: WireReservoir | None = Field(
        default=None,
        description="the window's sample of per-sample channel means, if the monitor kept one",
    )
    metrics: WireMetrics | None = Field(
        default=None,
        description="the monitor's layer-level metrics; stored as sent unless the service "
        "recomputes them (BNWATCH_RECOMPUTE=1) -- windows without them are always recomputed",
    )

    @field_validator("moments")
    @classmethod
    def _moments_decode(cls, value: str) -> str:
        base64.b64decode(value, validate=True)  # the shape is checked against channels below
        return value

    _decoded: dict[str, NDArray[Any]] = PrivateAttr(default_factory=dict)

    def arrays(self, what: str) -> NDArray[Any] | None:
        """The decoded ``moments``, ``running``, ``baseline`` (float64) or ``reservoir``
        (float32) arrays (decoded once, when the layer was validated)."""
        return self._decoded.get(what)

    @model_validator(mode="after")
    def _consistent(self) -> WireLayer:
        self._decoded["moments"] = decode_moment_blob(self.moments, self.channels)
        if self.running is not None:
            self._decoded["running"] = decode_running_blob(self.running, self.channels)
        if self.baseline is not None:
            self._decoded["baseline"] = decode_moment_blob(  # held to the same checks:
                self.baseline.moments,
                self.channels,
                "baseline.moments",  # a negative count
            )  # made the recomputed baseline variance negative, its p-value NaN
        if self.reservoir is not None:
            r = self.reservoir
            limit = min(r.capacity, r.seen)
            self._decoded["reservoir"] = decode_reservoir_rows(r.rows, self.channels, limit)
        _check_batch_counts(self.n_batches, self.batch_stat_batches, self.batch_sizes)
        return self


class WireWindow(BaseModel):
    """One closed window of one monitor."""

    model_config = ConfigDict(extra="forbid")

    uid: Annotated[str, AfterValidator(_is_uid)] = Field(
        description="unique id of the window: a re-delivered window is stored once"
    )
    model: Name
    version: Name
    source: Source
    start: AwareDatetime
    end: AwareDatetime
    monitor: dict[
        Annotated[str, Field(max_length=64)], Annotated[float, Field(allow_inf_nan=False)]
    ] = Field(default_factory=dict, max_length=32)
    layers: Annotated[list[WireLayer], Field(min_length=1, max_length=MAX_LAYERS)]

    @model_validator(mode="after")
    def _consistent(self) -> WireWindow:
        for name in ("start", "end"):
            problem = time_problem(name, getattr(self, name))
            if problem is not None:
                raise ValueError(problem)
        if self.end < self.start:
            raise ValueError("end must not be before start")
        names = [layer.layer for layer in self.layers]
        if len(set(names)) != len(names):
            raise ValueError("layers: layer names must be unique within a window")
        return self


class WindowBatch(BaseModel):
    """The body of ``POST /api/v1/windows``."""

    model_config = ConfigDict(extra="forbid")

    schema_version: Literal[1] = Field(description="the wire format version (1)")
    windows: Annotated[list[WireWindow], Field(min_length=1, max_length=MAX_WINDOWS)]


class IngestResult(BaseModel):
    """The answer to ``POST /api/v1/windows``."""

    received: int
    stored: int
    duplicates: int


class WireProfileLayer(BaseModel):
    """One layer of a reference profile."""

    model_config = ConfigDict(extra="forbid")

    layer: Annotated[str, Field(min_length=1, max_length=500)]
    kind: Annotated[str, Field(min_length=1, max_length=100)]
    channels: Annotated[int, Field(ge=1, le=MAX_CHANNELS)]
    eps: Annotated[float, Field(gt=0, lt=1, allow_inf_nan=False)]
    moments: str = Field(description="base64 bnwatch array blob: 13 arrays of `channels` values")
    running: str | None = Field(
        default=None,
        description="base64 bnwatch array blob: running_mean, running_var when the profile "
        "was recorded (null: the layer keeps no running statistics)",
    )
    batch_sizes: dict[
        Annotated[int, Field(ge=1, le=MAX_COUNT)], Annotated[int, Field(ge=0, le=MAX_COUNT)]
    ]
    n_batches: Annotated[int, Field(ge=0, le=MAX_COUNT)]
    batches_seen: Annotated[int, Field(ge=0, le=MAX_COUNT)]
    samples_seen: Annotated[int, Field(ge=0, le=MAX_COUNT)]
    batch_stat_batches: Annotated[int, Field(ge=0, le=MAX_COUNT)] = 0
    reservoir: WireReservoir = Field(
        description="the profile's uniform sample of per-sample channel means"
    )

    _decoded: dict[str, NDArray[Any]] = PrivateAttr(default_factory=dict)

    def arrays(self, what: str) -> NDArray[Any] | None:
        """The decoded ``moments``, ``running`` (float64) or ``reservoir`` (float32) arrays
        (decoded once, when the layer was validated -- or now, for a layer built without
        validation); ``running`` is ``None`` when the profile carries none."""
        if not self._decoded:
            self._decode()
        return self._decoded.get(what)

    def _decode(self) -> None:
        self._decoded["moments"] = decode_moment_blob(self.moments, self.channels)
        if self.running is not None:
            self._decoded["running"] = decode_running_blob(self.running, self.channels)
        r = self.reservoir
        self._decoded["reservoir"] = decode_reservoir_rows(
            r.rows, self.channels, min(r.capacity, r.seen)
        )

    @model_validator(mode="after")
    def _consistent(self) -> WireProfileLayer:
        self._decode()
        _check_batch_counts(self.n_batches, self.batch_stat_batches, self.batch_sizes)
        return self


class WireProfile(BaseModel):
    """The body of ``POST /api/v1/profiles``: a reference profile of one model version."""

    model_config = ConfigDict(extra="forbid")

    schema_version: Literal[1] = Field(description="the wire format version (1)")
    model: Name
    version: Name
    created: AwareDatetime = Field(description="when the profile was recorded")
    layers: Annotated[list[WireProfileLayer], Field(min_length=1, max_length=MAX_LAYERS)] = Field(
        description="the profiled layers in model order (a new layer's depth is its position)"
    )

    @model_validator(mode="after")
    def _consistent(self) -> WireProfile:
        names = [layer.layer for layer in self.layers]
        if len(set(names)) != len(names):
            raise ValueError("layers: layer names must be unique within a profile")
        return self


class ProfileResult(BaseModel):
    """The answer to ``POST /api/v1/profiles``: the stored reference of every layer.

    A profile already stored (same statistics and reservoir) keeps its references: sending it
    again answers the same ids and stores nothing.
    """

    model: str
    version: str
    references: dict[str, int] = Field(description="layer name -> reference id in the store")


# ------------------------------------------------------------------------------------------
# Recalibration outcomes
# ------------------------------------------------------------------------------------------
MAX_OUTCOME_BYTES = 64 * 1024
"""Largest ``outcome`` of a report, as compact JSON: a summary, not a log."""
_RESERVED_OUTCOME_KEYS = ("references", "skipped_layers")

LayerName = Annotated[str, Field(min_length=1, max_length=500, pattern=r"^[^\x00]+$")]


def decode_buffer(text: str, what: str) -> NDArray[np.float64]:
    """Decode a base64 codec blob of one finite float64 array of 1 to :data:`MAX_CHANNELS`
    values (the shape is checked from the header before anything is allocated)."""
    try:
        raw = base64.b64decode(text, validate=True)
        dtype, rows, cols = blob_shape(raw)
    except (binascii.Error, ValueError) as err:
        raise ValueError(f"{what}: not a base64 bnwatch array blob ({err})") from None
    if rows != 1 or not 1 <= cols <= MAX_CHANNELS:
        raise ValueError(
            f"{what}: expected one array of 1 to {MAX_CHANNELS} channels, got [{rows}, {cols}]"
        )
    if dtype != "<f8":
        raise ValueError(f"{what}: expected float64 values (dtype '<f8'), got {dtype!r}")
    try:
        values: NDArray[np.float64] = decode_arrays(raw)[0]
    except ValueError as err:
        raise ValueError(f"{what}: not a base64 bnwatch array blob ({err})") from None
    if not np.isfinite(values).all():
        raise ValueError(f"{what}: NaN or infinite values are not allowed")
    return values


class WireBuffers(BaseModel):
    """The new running statistics of one layer: what ``model.load_state_dict`` would load."""

    model_config = ConfigDict(extra="forbid")

    running_mean: str = Field(description="base64 bnwatch array blob: one array of C float64")
    running_var: str = Field(
        description="base64 bnwatch array blob: one array of C float64, none negative"
    )
    eps: Annotated[float, Field(gt=0, lt=1, allow_inf_nan=False)] = Field(
        description="the layer's eps"
    )

    _decoded: tuple[NDArray[np.float64], NDArray[np.float64]] | None = PrivateAttr(default=None)

    def arrays(self) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
        """``(running_mean, running_var)`` decoded (once, when the layer was validated)."""
        if self._decoded is None:
            self._decode()
        assert self._decoded is not None  # set by _decode
        return self._decoded

    def _decode(self) -> None:
        mean = decode_buffer(self.running_mean, "running_mean")
        var = decode_buffer(self.running_var, "running_var")
        if var.shape != mean.shape:
            raise ValueError(
                f"running_var: expected {mean.shape[0]} values like running_mean, "
                f"got {var.shape[0]}"
            )
        if (var < 0).any():
            raise ValueError("running_var: must not be negative")
        self._decoded = (mean, var)

    @model_validator(mode="after")
    def _consistent(self) -> WireBuffers:
        self._decode()
        return self


def _check_json_text(value: Any, path: str) -> None:
    """Reject text the store cannot hold in a JSON column (NUL, unpaired surrogates)."""
    if isinstance(value, dict):
        for key, item in value.items():
            _check_json_text(key, path)
            _check_json_text(item, f"{path}.{key}" if path else str(key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _check_json_text(item, f"{path}.{index}" if path else str(index))
    elif isinstance(value, str):
        where = f"{path}: " if path else ""
        if "\x00" in value:
            raise ValueError(f"{where}NUL characters are not allowed (the store cannot hold them)")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError(f"{where}not valid Unicode text (unpaired surrogate)") from None


class WireRecalibrationOutcome(BaseModel):
    """The body of ``POST /api/v1/recalibrations/{id}/outcome``: how a pending
    recalibration ended, what it found, and (when applied) the statistics now in use."""

    model_config = ConfigDict(extra="forbid")

    schema_version: Literal[1] = Field(default=1, description="the wire format version (1)")
    status: Literal["applied", "rejected", "failed"] = Field(
        description="applied: the new statistics are in use; rejected: judged and not used; "
        "failed: the recalibration could not run"
    )
    outcome: dict[str, Any] = Field(
        description=f"what happened, as a JSON object of at most {MAX_OUTCOME_BYTES} bytes "
        "(e.g. RecalibrationResult.summary(), or an error message); the keys "
        f"{' and '.join(_RESERVED_OUTCOME_KEYS)} are the store's"
    )
    buffers: Annotated[dict[LayerName, WireBuffers] | None, Field(max_length=MAX_LAYERS)] = Field(
        default=None,
        description="status applied only: layer -> its new running statistics, stored as "
        "references of kind 'recalibrated' (every layer must be a stored layer of the model "
        "version, with its channel count)",
    )

    @field_validator("outcome")
    @classmethod
    def _bounded(cls, value: dict[str, Any]) -> dict[str, Any]:
        size = len(json.dumps(value, separators=(",", ":")).encode())
        if size > MAX_OUTCOME_BYTES:
            raise ValueError(
                f"{size} bytes as JSON: at most {MAX_OUTCOME_BYTES} (send a summary, not a log)"
            )
        for key in _RESERVED_OUTCOME_KEYS:
            if key in value:
                raise ValueError(f"{key}: reserved: the store records it; use another key")
        _check_json_text(value, "")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> WireRecalibrationOutcome:
        if self.buffers and self.status != "applied":
            raise ValueError(
                f"buffers: only an applied recalibration has statistics to store (status is "
                f"{self.status!r}): leave them out"
            )
        return self


def json_ready(value: Any) -> Any:
    """``value`` with NaN/inf as ``None``, numpy scalars and arrays as Python numbers and
    lists, tuples as lists and keys as strings: what strict JSON can carry (a summary's
    undefined metrics are NaN)."""
    if isinstance(value, Mapping):
        return {str(k): json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    if isinstance(value, np.ndarray):
        return json_ready(value.tolist())
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(float(value)) else None
    return value


def outcome_body(
    status: str,
    outcome: Mapping[str, Any],
    buffers: Mapping[str, tuple[Any, Any, float]] | None = None,
) -> dict[str, Any]:
    """The :class:`WireRecalibrationOutcome` body (a JSON-ready dict) of a report: ``buffers``
    maps a layer to ``(running_mean, running_var, eps)`` (array-likes of C values each),
    sent as float64 blobs, bit for bit; ``outcome`` is made JSON-ready (:func:`json_ready`)."""
    body: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "status": status,
        "outcome": json_ready(outcome),
    }
    if buffers is not None:
        body["buffers"] = {
            name: {
                "running_mean": _b64(encode_arrays(np.asarray(mean, dtype=np.float64)[None, :])),
                "running_var": _b64(encode_arrays(np.asarray(var, dtype=np.float64)[None, :])),
                "eps": float(eps),
            }
            for name, (mean, var, eps) in buffers.items()
        }
    return body


# ------------------------------------------------------------------------------------------
# Conversions
# ------------------------------------------------------------------------------------------
def from_record(record: WindowRecord) -> dict[str, Any]:
    """The wire form (a JSON-ready dict) of a closed window."""
    layers = []
    for name, r in record.reports.items():
        st = r.stats
        running = None
        if np.isfinite(r.ref_mean).all() and np.isfinite(r.ref_var).all():
            running = _b64(encode_arrays(np.stack([r.ref_mean, r.ref_var])))
        baseline = None
        if r.baseline_moments is not None and r.baseline in ("profile", "warmup"):
            baseline = {"kind": r.baseline, "moments": _b64(encode_moments(r.baseline_moments))}
        layer: dict[str, Any] = {
            "layer": name,
            "kind": r.kind,
            "channels": r.channels,
            "depth": r.depth,
            "eps": r.eps,
            "moments": _b64(encode_moments(st.moments)),
            "running": running,
            "baseline": baseline,
            "batch_sizes": {str(k): v for k, v in st.batch_sizes.items()},
            "n_batches": st.n_batches,
            "batches_seen": st.batches_seen,
            "samples_seen": st.samples_seen,
            "batch_stat_batches": st.batch_stat_batches,
            "running_stats_mutated": r.running_stats_mutated,
            "metrics": r.metrics(),
        }
        if st.reservoir is not None:  # omitted (not null) without one, as before reservoirs
            layer["reservoir"] = {
                "rows": _b64(encode_arrays(st.reservoir.rows, dtype="<f4")),
                "seen": st.reservoir.seen,
                "capacity": st.reservoir.capacity,
            }
        layers.append(layer)
    return {
        "uid": record.uid,
        "model": record.model,
        "version": record.version,
        "source": record.source,
        "start": record.start.isoformat(),
        "end": record.end.isoformat(),
        "monitor": {k: float(v) for k, v in record.monitor.items() if math.isfinite(v)},
        "layers": layers,
    }


def batch_of(records: list[WindowRecord]) -> dict[str, Any]:
    """A :class:`WindowBatch` body for ``records``."""
    return {"schema_version": SCHEMA_VERSION, "windows": [from_record(r) for r in records]}


def _decoded(w: WireLayer, what: str, rows: int) -> NDArray[np.float64]:
    cached = w.arrays(what)
    if cached is not None:
        return cached
    text = w.moments if what == "moments" else w.running if what == "running" else None
    if text is None and w.baseline is not None:
        text = w.baseline.moments
    if text is None:
        raise ValueError(f"{what}: missing")
    return decode_blob(text, rows, w.channels, what)


def to_record(window: WireWindow, config: DriftConfig, *, recompute: bool = False) -> WindowRecord:
    """The :class:`WindowRecord` a validated wire window stands for.

    The metrics the monitor sent are kept (its ``DriftConfig`` decided them); with
    ``recompute``, or when a layer came without metrics, every metric and decision is
    recomputed with ``config`` -- and the record's account (``monitor``) names ``config``
    instead of the thresholds the monitor sent (:func:`~bnwatch.drift.config_account`): the
    store keeps the thresholds that decided the stored flags.
    """
    if not recompute and all(w.metrics is not None for w in window.layers):
        return _as_sent(window)
    reports: dict[str, LayerReport] = {}
    for w in window.layers:
        running, baseline, kind = _references(w)
        reports[w.layer] = assess_layer(
            w.layer,
            w.kind,
            _stats(w),
            eps=w.eps,
            running=running,
            baseline=baseline,
            baseline_kind=kind,
            null=baseline.moments if baseline is not None else None,
            depth=w.depth,
            running_stats_mutated=w.running_stats_mutated,
            config=config,
        )
    return WindowRecord(
        model=window.model,
        version=window.version,
        source=window.source,
        start=window.start,
        end=window.end,
        reports=decide(reports, config),
        uid=window.uid,
        monitor={**window.monitor, **config_account(config)},
    )


def _references(w: WireLayer) -> tuple[Reference | None, Reference | None, str]:
    running = None
    if w.running is not None:
        arrays = _decoded(w, "running", 2)
        running = Reference.running(arrays[0], arrays[1])
    baseline = None
    kind = "warming_up"
    if w.baseline is not None:
        base = _decoded(w, "baseline", len(MOMENT_FIELDS))
        baseline = Reference.from_moments(ChannelMoments.from_arrays(list(base)))
        kind = w.baseline.kind
    return running, baseline, kind


def _stats(w: WireLayer) -> LayerStats:
    reservoir = None
    if w.reservoir is not None:
        rows = w.arrays("reservoir")
        if rows is None:
            limit = min(w.reservoir.capacity, w.reservoir.seen)
            rows = decode_reservoir_rows(w.reservoir.rows, w.channels, limit)
        reservoir = Reservoir.from_rows(rows, w.reservoir.seen, w.reservoir.capacity)
    return LayerStats(
        moments=ChannelMoments.from_arrays(list(_decoded(w, "moments", len(MOMENT_FIELDS)))),
        batch_sizes=dict(sorted(w.batch_sizes.items())),
        n_batches=w.n_batches,
        batches_seen=w.batches_seen,
        samples_seen=w.samples_seen,
        batch_stat_batches=w.batch_stat_batches,
        reservoir=reservoir,
    )


def _as_sent(window: WireWindow) -> WindowRecord:
    reports: dict[str, LayerReport] = {}
    for w in window.layers:
        running, baseline, kind = _references(w)
        metrics = w.metrics.model_dump() if w.metrics is not None else {}
        reports[w.layer] = report_from_metrics(
            w.layer,
            w.kind,
            _stats(w),
            eps=w.eps,
            depth=w.depth,
            running=running,
            baseline=baseline,
            baseline_kind=kind,
            metrics=metrics,
        )
    return WindowRecord(
        model=window.model,
        version=window.version,
        source=window.source,
        start=window.start,
        end=window.end,
        reports=reports,
        uid=window.uid,
        monitor=dict(window.monitor),
    )


# ------------------------------------------------------------------------------------------
# Profiles
# ------------------------------------------------------------------------------------------
def _running_blob(lp: LayerProfile) -> str | None:
    rm, rv = lp.running_mean, lp.running_var
    if rm is None or rv is None or not (np.isfinite(rm).all() and np.isfinite(rv).all()):
        return None  # like a window's running statistics: sent only when finite
    return _b64(encode_arrays(np.stack([rm, rv])))


def profile_body(profile: Profile) -> dict[str, Any]:
    """The :class:`WireProfile` body (a JSON-ready dict) of a reference profile.

    Running statistics that are not finite are left out (``running: null``); everything else
    is carried exactly: the moments as float64 and the reservoir rows as float32, their
    dtypes in the profile.
    """
    layers = []
    for name, lp in profile.layers.items():
        st = lp.stats
        layers.append(
            {
                "layer": name,
                "kind": lp.kind,
                "channels": lp.channels,
                "eps": lp.eps,
                "moments": _b64(encode_moments(st.moments)),
                "running": _running_blob(lp),
                "batch_sizes": {str(k): v for k, v in st.batch_sizes.items()},
                "n_batches": st.n_batches,
                "batches_seen": st.batches_seen,
                "samples_seen": st.samples_seen,
                "batch_stat_batches": st.batch_stat_batches,
                "reservoir": {
                    "rows": _b64(encode_arrays(lp.reservoir.rows, dtype="<f4")),
                    "seen": lp.reservoir.seen,
                    "capacity": lp.reservoir.capacity,
                },
            }
        )
    return {
        "schema_version": SCHEMA_VERSION,
        "model": profile.name,
        "version": profile.version,
        "created": profile.created.isoformat(),
        "layers": layers,
    }


def to_profile(wire: WireProfile) -> Profile:
    """The :class:`~bnwatch.schema.Profile` a validated wire profile stands for."""
    layers: dict[str, LayerProfile] = {}
    for w in wire.layers:
        moments = w.arrays("moments")
        rows = w.arrays("reservoir")
        assert moments is not None and rows is not None  # always decoded
        running = w.arrays("running")
        layers[w.layer] = LayerProfile(
            layer=w.layer,
            kind=w.kind,
            eps=w.eps,
            stats=LayerStats(
                moments=ChannelMoments.from_arrays(list(moments)),
                batch_sizes=dict(sorted(w.batch_sizes.items())),
                n_batches=w.n_batches,
                batches_seen=w.batches_seen,
                samples_seen=w.samples_seen,
                batch_stat_batches=w.batch_stat_batches,
            ),
            reservoir=Reservoir.from_rows(rows, w.reservoir.seen, w.reservoir.capacity),
            running_mean=None if running is None else running[0],
            running_var=None if running is None else running[1],
        )
    return Profile(name=wire.model, version=wire.version, created=wire.created, layers=layers)
