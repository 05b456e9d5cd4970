"""Ingest: a :class:`~bnwatch.wire.WindowBatch` body in, one transaction of stored windows out.

:meth:`Ingestor.ingest` is synchronous and CPU-bound (JSON parsing and validation in
pydantic, base64 and numpy decoding, :func:`bnwatch.wire.to_record`, the database write):
the route runs it in a worker thread, never on the event loop.

Order of work, so that a rejected request writes nothing:

1. parse and validate the whole body (422 naming the first bad field, all listed in
   ``details``), among it the bounds the store needs: window times in
   [:data:`~bnwatch.wire.TIME_MIN`, :data:`~bnwatch.wire.TIME_MAX`), batch sizes whose
   batches hold at most :data:`~bnwatch.wire.MAX_COUNT` samples in all;
2. check what the store cannot hold although the wire format allows it -- NUL characters,
   counts beyond the store's 32-bit count columns -- (422);
3. build every window's record (:func:`~bnwatch.wire.to_record`): the metrics its monitor
   computed, or -- for windows without them, or all windows with ``Settings.recompute`` --
   recomputed with the service's :class:`~bnwatch.drift.DriftConfig`; timestamps in UTC;
4. one :meth:`Repository.write_windows` call: one transaction, all or nothing
   (:class:`~bnwatch.store.repository.ChannelMismatchError` -> 409 naming the layer);
5. the ``on_stored`` hook (alert evaluation), whose failures are logged, never returned.

Profiles (``POST /api/v1/profiles``, :func:`ingest_profile`) follow the same order: validate
the whole :class:`~bnwatch.wire.WireProfile` (422), check what the store cannot hold (422),
then one :meth:`Repository.write_profile` transaction (409 on a channel mismatch, nothing
written).  References are deduplicated by digest, so a profile sent twice is stored once.

Recalibration outcomes (``POST /api/v1/recalibrations/{id}/outcome``, :func:`ingest_outcome`)
too: validate the whole :class:`~bnwatch.wire.WireRecalibrationOutcome` (422), then one
:meth:`Repository.finish_recalibration` transaction that checks every layer's buffers against
the stored layers (422 naming the layer) and finishes the recalibration only if it is still
``pending`` (404 for an unknown id, 409 naming its status otherwise), all or nothing.

**Counting stored windows.**  ``write_windows`` returns the layer rows it inserted, and the
store stores a window all or nothing: a window whose uid is already stored is skipped as a
whole, and a concurrent delivery of the same window either wins every one of its layer rows
or none (the other transaction's rows conflict on ``(layer_id, uid)`` and are skipped).  So
``stored`` is exact: repeats of a uid within one request are duplicates up front; when every
window of the request has the same number of layers ``L`` (one monitor, one model: the usual
case) ``stored = inserted / L``; for a request mixing layer counts the uids already stored
are read first, and ``stored`` is what is left -- exact unless another request stored some of
the same windows in between, in which case the count is apportioned (and logged).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Callable, Sequence
from datetime import timezone

import numpy as np
import sqlalchemy as sa
from pydantic import ValidationError

from bnwatch.drift import DriftConfig
from bnwatch.errors import (
    RecalibrationBuffersError,
    RecalibrationNotFoundError,
    RecalibrationStateError,
)
from bnwatch.schema import LayerReport, WindowRecord, storable_problem
from bnwatch.service.errors import ApiError, validation_error
from bnwatch.stats import ChannelMoments
from bnwatch.store.models import Layer, Model, Window
from bnwatch.store.repository import (
    ChannelMismatchError,
    RecalibrationInfo,
    Repository,
    UnstorableWindowError,
    moments_equal,
)
from bnwatch.wire import (
    IngestResult,
    ProfileResult,
    WindowBatch,
    WireProfile,
    WireRecalibrationOutcome,
    WireWindow,
    to_profile,
    to_record,
)

logger = logging.getLogger("bnwatch.service")

OnStored = Callable[[Repository, list[WindowRecord]], object]
"""Called with the repository and the request's windows after they were stored (alerts)."""

STORE_COUNT_MAX = 2**31 - 1
"""Largest per-window count the store's ``windows`` columns hold (32-bit integers)."""
MONITOR_COUNT_MAX = 2**62
"""Largest ``windows_dropped`` / ``hook_errors`` a monitor may report (64-bit columns)."""
_MONITOR_COUNTS = ("windows_dropped", "hook_errors")
_LAYER_COUNTS = ("n_batches", "batches_seen", "samples_seen", "batch_stat_batches")


def parse_batch(body: bytes | bytearray) -> WindowBatch:
    """The validated batch of a request body (422 naming the field otherwise)."""
    try:
        return WindowBatch.model_validate_json(body)
    except ValidationError as err:
        raise validation_error(err.errors(include_url=False)) from None


def _invalid(field: str, message: str) -> ApiError:
    return ApiError(422, f"{field}: {message}", field=field)


def _check_text(field: str, value: str) -> None:
    problem = storable_problem(value)
    if problem is not None:
        raise _invalid(field, problem)


def check_storable(window: WireWindow, index: int) -> None:
    """Reject what the wire format admits but the store cannot hold (422 naming the field)."""
    # model, version and source were checked by the wire format, and start and end too
    # (bnwatch.wire.time_problem: they convert to UTC, and bucket arithmetic handles them)
    where = f"windows.{index}"
    for name in _MONITOR_COUNTS:
        value = window.monitor.get(name)
        if value is not None and not (0 <= value <= MONITOR_COUNT_MAX and value == int(value)):
            raise _invalid(
                f"{where}.monitor.{name}", f"must be a whole number from 0 to {MONITOR_COUNT_MAX}"
            )
    for j, layer in enumerate(window.layers):
        at = f"{where}.layers.{j}"
        _check_text(f"{at}.layer", layer.layer)
        _check_text(f"{at}.kind", layer.kind)
        for name in _LAYER_COUNTS:
            if getattr(layer, name) > STORE_COUNT_MAX:
                raise _invalid(f"{at}.{name}", f"must be at most {STORE_COUNT_MAX}")
        if any(size > STORE_COUNT_MAX for size in layer.batch_sizes):
            raise _invalid(f"{at}.batch_sizes", f"batch sizes must be at most {STORE_COUNT_MAX}")


def _check_record(record: WindowRecord, index: int) -> None:
    """Per-layer counts derived from the moments must fit the store's columns too."""
    for j, report in enumerate(record.reports.values()):
        try:
            fits = report.n_samples <= STORE_COUNT_MAX and report.nonfinite <= STORE_COUNT_MAX
        except (OverflowError, ValueError):  # an infinite sum of huge counts
            fits = False
        if not fits:
            raise _invalid(
                f"windows.{index}.layers.{j}.moments",
                f"sample and non-finite counts must be at most {STORE_COUNT_MAX}",
            )


class ReferenceInterner:
    """Hands out one array object per distinct reference of a layer.

    A monitor sends the same running statistics and baseline in every window; decoded, each
    window has its own copies.  The repository remembers reference ids by array identity
    (to skip encoding and hashing them again), so copies that are equal are replaced by the
    first object seen: the repository then recognizes them, and remembers one object per
    distinct reference instead of one per window (which would grow without bound).
    """

    MAX_LAYERS = 100_000
    """Layers remembered; beyond that the memory is cleared (and refills)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._running: dict[tuple[str, str, str], tuple[np.ndarray, np.ndarray]] = {}
        self._baseline: dict[tuple[str, str, str], ChannelMoments] = {}

    def intern(self, record: WindowRecord) -> WindowRecord:
        """``record`` with its references replaced by the equal objects seen before."""
        reports: dict[str, LayerReport] = {}
        changed = False
        with self._lock:
            if len(self._running) > self.MAX_LAYERS or len(self._baseline) > self.MAX_LAYERS:
                self._running.clear()
                self._baseline.clear()
            for name, report in record.reports.items():
                interned = self._report((record.model, record.version, name), report)
                changed = changed or interned is not report
                reports[name] = interned
        return dataclasses.replace(record, reports=reports) if changed else record

    def _report(self, key: tuple[str, str, str], report: LayerReport) -> LayerReport:
        changes: dict[str, object] = {}
        running = self._running.get(key)
        if (
            running is not None
            and np.array_equal(running[0], report.ref_mean)
            and np.array_equal(running[1], report.ref_var)
        ):
            changes["ref_mean"], changes["ref_var"] = running
        elif np.isfinite(report.ref_mean).all():
            self._running[key] = (report.ref_mean, report.ref_var)
        base = report.baseline_moments
        if base is not None:
            known = self._baseline.get(key)
            if known is not None and moments_equal(known, base):
                changes["baseline_moments"] = known
            else:
                self._baseline[key] = base
        return dataclasses.replace(report, **changes) if changes else report  # type: ignore[arg-type]


class Ingestor:
    """Turns request bodies into stored windows (thread-safe: one per app)."""

    def __init__(
        self,
        repository: Repository,
        drift: DriftConfig,
        on_stored: OnStored | None = None,
        *,
        recompute: bool = False,
    ) -> None:
        self.repository = repository
        self.drift = drift
        self.recompute = recompute
        self.on_stored = on_stored
        self.interner = ReferenceInterner()

    def ingest(self, body: bytes | bytearray) -> IngestResult:
        """Validate, assess and store the windows of one request body (one transaction)."""
        batch = parse_batch(body)
        received = len(batch.windows)
        unique: list[tuple[int, WireWindow]] = []
        seen: set[str] = set()
        for index, window in enumerate(batch.windows):
            check_storable(window, index)
            if window.uid not in seen:  # a repeat within the request is a duplicate
                seen.add(window.uid)
                unique.append((index, window))
        records = [self._record(index, window) for index, window in unique]
        layer_counts = [len(r.reports) for r in records]
        already: set[str] | None = None
        if len(set(layer_counts)) > 1:
            already = self._stored_uids(records)
        try:
            inserted = self.repository.write_windows(records)
        except ChannelMismatchError as err:
            raise self._mismatch(err, unique) from None
        except UnstorableWindowError as err:  # the wire's checks come first: a backstop
            raise self._unstorable(err, unique) from None
        stored = self._stored(records, layer_counts, inserted, already)
        logger.debug(
            "bnwatch service: %d window(s) received, %d stored (%d layer rows)",
            received,
            stored,
            inserted,
        )
        if stored and self.on_stored is not None:
            try:
                self.on_stored(self.repository, records)
            except Exception:  # alert evaluation must never fail an ingest that was stored
                logger.exception("bnwatch service: the after-store hook failed")
        return IngestResult(received=received, stored=stored, duplicates=received - stored)

    def _record(self, index: int, window: WireWindow) -> WindowRecord:
        try:
            # extreme (valid) statistics overflow to inf/NaN metrics, stored as NULL: no warnings
            with np.errstate(over="ignore", invalid="ignore", divide="ignore", under="ignore"):
                record = to_record(window, self.drift, recompute=self.recompute)
            record = dataclasses.replace(
                record,
                start=record.start.astimezone(timezone.utc),
                end=record.end.astimezone(timezone.utc),
            )
        except (ValueError, ArithmeticError) as err:
            # deterministic for this input: a 4xx, or a sender would retry it forever
            logger.warning(
                "bnwatch service: window %s cannot be assessed", window.uid, exc_info=True
            )
            raise _invalid(f"windows.{index}", f"the window cannot be assessed: {err}") from None
        _check_record(record, index)
        return self.interner.intern(record)

    @staticmethod
    def _mismatch(err: ChannelMismatchError, unique: Sequence[tuple[int, WireWindow]]) -> ApiError:
        position = getattr(err, "index", None)
        field = None
        if isinstance(position, int) and 0 <= position < len(unique):
            index, window = unique[position]
            layer = next((j for j, w in enumerate(window.layers) if w.layer == err.layer), None)
            field = f"windows.{index}" + (f".layers.{layer}.channels" if layer is not None else "")
        return ApiError(409, f"{err}; nothing was stored", field=field)

    @staticmethod
    def _unstorable(
        err: UnstorableWindowError, unique: Sequence[tuple[int, WireWindow]]
    ) -> ApiError:
        field = None
        if 0 <= err.index < len(unique):
            index, window = unique[err.index]
            field = f"windows.{index}"
            if err.field.startswith("layers."):  # layers.<name>.batch_sizes
                name = err.field[len("layers.") : -len(".batch_sizes")]
                j = next((j for j, w in enumerate(window.layers) if w.layer == name), None)
                field += f".layers.{j}.batch_sizes" if j is not None else ""
            else:
                field += f".{err.field}"
        return ApiError(422, f"{err}; nothing was stored", field=field)

    def _stored_uids(self, records: Sequence[WindowRecord]) -> set[str]:
        """Uids of ``records`` already stored for their model version (read before writing)."""
        groups: dict[tuple[str, str], list[str]] = {}
        for r in records:
            groups.setdefault((r.model, r.version), []).append(r.uid)
        out: set[str] = set()
        with self.repository.engine.connect() as conn:
            for (model, version), uids in groups.items():
                out.update(
                    conn.execute(
                        sa.select(Window.uid)
                        .join(Layer, Layer.id == Window.layer_id)
                        .join(Model, Model.id == Layer.model_id)
                        .where(Model.name == model, Model.version == version, Window.uid.in_(uids))
                        .distinct()
                    ).scalars()
                )
        return out

    @staticmethod
    def _stored(
        records: Sequence[WindowRecord],
        layer_counts: Sequence[int],
        inserted: int,
        already: set[str] | None,
    ) -> int:
        """Windows this request stored, from the layer rows inserted (see the module doc)."""
        if inserted <= 0:
            return 0
        if inserted >= sum(layer_counts):
            return len(records)
        if already is None:  # every window has the same number of layers
            return inserted // layer_counts[0]
        fresh = [n for r, n in zip(records, layer_counts, strict=True) if r.uid not in already]
        if inserted == sum(fresh):
            return len(fresh)
        logger.warning(
            "bnwatch service: windows of this request were stored concurrently by another "
            "request; the stored/duplicates split is apportioned"
        )
        return min(len(fresh), max(1, round(inserted * len(fresh) / max(sum(fresh), 1))))


# ------------------------------------------------------------------------------------------
# Profiles
# ------------------------------------------------------------------------------------------
def parse_profile(body: bytes | bytearray) -> WireProfile:
    """The validated profile of a request body (422 naming the field otherwise)."""
    try:
        return WireProfile.model_validate_json(body)
    except ValidationError as err:
        raise validation_error(err.errors(include_url=False)) from None


def ingest_profile(repository: Repository, body: bytes | bytearray) -> ProfileResult:
    """Validate and store the reference profile of one request body (one transaction).

    Raises:
        ApiError: 422 for an invalid body (the field is named), 409 when a layer's channel
            count differs from the layer stored under that name (nothing is written).
    """
    wire = parse_profile(body)  # model and version were checked by the wire format
    for j, layer in enumerate(wire.layers):
        _check_text(f"layers.{j}.layer", layer.layer)
        _check_text(f"layers.{j}.kind", layer.kind)
    try:
        references = repository.write_profile(to_profile(wire))
    except ChannelMismatchError as err:
        index = next((j for j, w in enumerate(wire.layers) if w.layer == err.layer), None)
        raise ApiError(
            409,
            f"layer {err.layer!r} of {err.model}@{err.version} has {err.stored} channels in "
            f"the store but the profile has {err.found}; a changed architecture needs a new "
            "model version; nothing was stored",
            field=None if index is None else f"layers.{index}.channels",
        ) from None
    logger.debug(
        "bnwatch service: profile of %s@%s: %d layer reference(s)",
        wire.model,
        wire.version,
        len(references),
    )
    return ProfileResult(model=wire.model, version=wire.version, references=references)


# ------------------------------------------------------------------------------------------
# Recalibration outcomes
# ------------------------------------------------------------------------------------------
def parse_outcome(body: bytes | bytearray) -> WireRecalibrationOutcome:
    """The validated report of a request body (422 naming the field otherwise)."""
    try:
        return WireRecalibrationOutcome.model_validate_json(body)
    except ValidationError as err:
        raise validation_error(err.errors(include_url=False)) from None


def ingest_outcome(
    repository: Repository, recalibration_id: int, body: bytes | bytearray
) -> RecalibrationInfo:
    """Validate a report and finish the pending recalibration with it (one transaction).

    Raises:
        ApiError: 422 for an invalid body or buffers that do not fit the stored layers (the
            field -- ``buffers.<layer>...`` -- is named), 404 for an unknown recalibration,
            409 when it is no longer pending (its status is named); nothing is written.
    """
    wire = parse_outcome(body)
    buffers = None
    if wire.buffers:
        buffers = {name: (*b.arrays(), b.eps) for name, b in wire.buffers.items()}
    try:
        info = repository.finish_recalibration(
            recalibration_id,
            status=wire.status,
            outcome=wire.outcome,
            buffers=buffers,
            unknown_layers="error",
        )
    except RecalibrationNotFoundError as err:
        raise ApiError(404, str(err)) from None
    except RecalibrationStateError as err:
        raise ApiError(409, str(err), field="status") from None
    except RecalibrationBuffersError as err:
        field = f"buffers.{err.layer}" + (f".{err.field}" if err.field else "")
        raise ApiError(422, f"{field}: {err}", field=field) from None
    logger.info(
        "bnwatch service: recalibration %d of %s@%s reported %s (%d layer(s) stored)",
        info.id,
        info.model,
        info.version,
        info.status,
        len((info.outcome or {}).get("references", {})),
    )
    return info
