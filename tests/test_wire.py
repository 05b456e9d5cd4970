"""The wire format: exact round trips, recomputed metrics, errors that name the field."""

from __future__ import annotations

import base64
import copy
import dataclasses
import json
import struct
import tracemalloc
from typing import Any

import numpy as np
import pytest
from pydantic import ValidationError

from bnwatch.codec import MAGIC, encode_arrays
from bnwatch.drift import DriftConfig, config_from_account
from bnwatch.stats import DEFAULT_RESERVOIR as RESERVOIR
from bnwatch.store.repository import moments_equal
from bnwatch.wire import WindowBatch, batch_of, decode_blob, to_record
from tests.store.helpers import record_windows

CONFIG = DriftConfig(warmup_samples=16, min_samples=4)


@pytest.fixture(scope="module")
def records() -> list[Any]:
    return record_windows(3)


def test_round_trip_recomputes_the_same_reports(records: list[Any]) -> None:
    body = json.loads(json.dumps(batch_of(records)))  # through real JSON
    batch = WindowBatch.model_validate(body)
    for wire, original in zip(batch.windows, records, strict=True):
        back = to_record(wire, CONFIG)
        assert (back.uid, back.model, back.version, back.source) == (
            original.uid,
            original.model,
            original.version,
            original.source,
        )
        assert back.start == original.start
        assert back.end == original.end
        assert back.monitor == pytest.approx(dict(original.monitor))
        for name, r in original.reports.items():
            b = back.reports[name]
            assert moments_equal(b.stats.moments, r.stats.moments)
            assert b.stats.batch_sizes == r.stats.batch_sizes
            assert (b.gap, b.drifted, b.baseline) == (r.gap, r.drifted, r.baseline)
            assert b.gap_p_value == pytest.approx(r.gap_p_value, rel=1e-9, nan_ok=True)
            assert b.p_value == pytest.approx(r.p_value, rel=1e-9, nan_ok=True)
            np.testing.assert_array_equal(b.ref_mean, r.ref_mean)


def broken(records: list[Any], change: Any) -> dict[str, Any]:
    body = copy.deepcopy(batch_of(records[:1]))
    change(body)
    return body


def blob(arrays: np.ndarray) -> str:
    return base64.b64encode(encode_arrays(arrays)).decode()


@pytest.mark.parametrize(
    ("change", "field", "message"),
    [
        (lambda b: b.update(schema_version=2), "schema_version", "Input should be 1"),
        (
            lambda b: b["windows"][0]["layers"][0].update(channels=7),
            "windows.0.layers.0",
            "expected 13 arrays of 7 channels",
        ),
        (
            lambda b: b["windows"][0]["layers"][0].update(n_batches=-1),
            "n_batches",
            "greater than or equal to 0",
        ),
        (
            lambda b: b["windows"][0]["layers"][0].update(moments=blob(np.full((13, 6), np.nan))),
            "windows.0.layers.0",
            "NaN or infinite values are not allowed",
        ),
        (
            lambda b: b["windows"][0]["layers"][0].update(moments=blob(-np.ones((13, 6)))),
            "windows.0.layers.0",
            "count must not be negative",
        ),
        (lambda b: b["windows"][0]["layers"][0].update(moments="not base64!"), "moments", "base64"),
        (  # a baseline is held to the checks of moments: a negative count made its variance
            # negative and the recomputed p-value NaN, stored as a reference
            lambda b: b["windows"][0]["layers"][0].update(
                baseline={"kind": "warmup", "moments": blob(-np.ones((13, 6)))}
            ),
            "windows.0.layers.0",
            "baseline.moments: count must not be negative",
        ),
        (lambda b: b["windows"][0].update(uid="a b"), "uid", "letters, digits"),
        (
            lambda b: b["windows"][0].update(end="2020-01-01T00:00:00+00:00"),
            "windows.0",
            "end must not be before start",
        ),
        (lambda b: b["windows"][0].update(start="2020-01-01T00:00:00"), "start", "timezone"),
        (lambda b: b["windows"][0].update(unknown=1), "unknown", "Extra inputs"),
    ],
)
def test_bad_input_names_the_field(
    records: list[Any], change: Any, field: str, message: str
) -> None:
    with pytest.raises(ValidationError) as info:
        WindowBatch.model_validate(broken(records, change))
    text = str(info.value)
    assert field in text.replace("\n", " ").replace("  ", " ") or field in json.dumps(
        info.value.errors(include_url=False, include_input=False), default=str
    )
    assert message in text


def test_the_monitors_metrics_are_kept_unless_recomputed(records: list[Any]) -> None:
    batch = WindowBatch.model_validate(json.loads(json.dumps(batch_of(records))))
    strict = DriftConfig(
        alpha=0.5,
        channel_fdr=0.5,
        min_shift=1e-9,
        min_log_ratio=1e-9,
        warmup_samples=16,
        min_samples=4,
    )
    for wire, original in zip(batch.windows, records, strict=True):
        kept = to_record(wire, strict)
        again = to_record(wire, strict, recompute=True)
        for name, r in original.reports.items():
            assert kept.reports[name].metrics() == pytest.approx(r.metrics(), nan_ok=True)
            assert moments_equal(kept.reports[name].stats.moments, r.stats.moments)
        # with a lax configuration the recomputed judgement differs from the monitor's
        assert any(
            again.reports[n].gap != original.reports[n].gap
            or again.reports[n].frac_gap != original.reports[n].frac_gap
            for n in original.reports
        )


def test_windows_without_metrics_are_recomputed(records: list[Any]) -> None:
    body = batch_of(records[:1])
    for layer in body["windows"][0]["layers"]:
        del layer["metrics"]
    (wire,) = WindowBatch.model_validate(body).windows
    back = to_record(wire, CONFIG)
    for name, r in records[0].reports.items():
        assert back.reports[name].gap_p_value == pytest.approx(r.gap_p_value, rel=1e-9, nan_ok=True)


def test_the_account_names_the_thresholds_that_decided_the_flags(records: list[Any]) -> None:
    """Kept metrics keep the monitor's thresholds in its account; recomputed ones (on request,
    or for layers sent without metrics) name the service's, which decided what is stored."""
    service = DriftConfig(min_shift=5.0, alpha=1e-4)
    body = json.loads(json.dumps(batch_of(records[:1])))
    (wire,) = WindowBatch.model_validate(body).windows
    assert config_from_account(wire.monitor) == CONFIG  # the monitor sent its own
    assert config_from_account(to_record(wire, service).monitor) == CONFIG
    again = to_record(wire, service, recompute=True)
    assert config_from_account(again.monitor) == service
    assert again.monitor["overhead_ratio"] == wire.monitor["overhead_ratio"]  # the rest kept
    del body["windows"][0]["layers"][0]["metrics"]
    (partial,) = WindowBatch.model_validate(body).windows
    assert config_from_account(to_record(partial, service).monitor) == service


# -- reservoirs ------------------------------------------------------------------------------
def f32_blob(rows: np.ndarray) -> str:
    return base64.b64encode(encode_arrays(rows, dtype="<f4")).decode()


def test_reservoirs_round_trip_bit_for_bit_with_and_without_recomputing(
    records: list[Any],
) -> None:
    body = json.loads(json.dumps(batch_of(records)))
    layer = body["windows"][0]["layers"][0]
    assert set(layer["reservoir"]) == {"rows", "seen", "capacity"}
    batch = WindowBatch.model_validate(body)
    for wire, original in zip(batch.windows, records, strict=True):
        for back in (to_record(wire, CONFIG), to_record(wire, CONFIG, recompute=True)):
            for name, r in original.reports.items():
                sent, got = r.stats.reservoir, back.reports[name].stats.reservoir
                assert sent is not None and got is not None
                assert got.rows.dtype == np.float32
                np.testing.assert_array_equal(got.rows, sent.rows)
                assert (got.seen, got.capacity) == (sent.seen, sent.capacity)


def test_windows_without_reservoirs_stay_valid(records: list[Any]) -> None:
    """Payloads from before reservoirs (or from reservoir=0) carry no such key."""
    body = batch_of(records[:1])
    for layer in body["windows"][0]["layers"]:
        del layer["reservoir"]
    (wire,) = WindowBatch.model_validate(body).windows
    for recompute in (False, True):
        back = to_record(wire, CONFIG, recompute=recompute)
        assert all(r.stats.reservoir is None for r in back.reports.values())
    no_reservoir = dataclasses.replace(
        records[0],
        reports={
            name: dataclasses.replace(r, stats=dataclasses.replace(r.stats, reservoir=None))
            for name, r in records[0].reports.items()
        },
    )
    assert all(
        "reservoir" not in layer for layer in batch_of([no_reservoir])["windows"][0]["layers"]
    )


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"rows": "not base64!"}, "reservoir.rows: not a base64 bnwatch array blob"),
        ({"rows": "\u00e9t\u00e9"}, "reservoir.rows: not a base64 bnwatch array blob"),
        ({"rows": f32_blob(np.zeros((2, 7)))}, "got [2, 7]"),
        # the records' windows saw 16 samples with the default capacity
        ({"rows": f32_blob(np.zeros((40, 6)))}, f"expected at most {min(16, RESERVOIR)} rows"),
        ({"seen": 1}, "expected at most 1 rows"),
        ({"rows": blob(np.zeros((2, 6)))}, "expected float32 rows"),
        ({"capacity": 0}, "greater than or equal to 1"),
        ({"seen": -1}, "greater than or equal to 0"),
        ({"extra": 1}, "Extra inputs"),
    ],
)
def test_bad_reservoirs_name_the_field(
    records: list[Any], change: dict[str, Any], message: str
) -> None:
    body = broken(records, lambda b: b["windows"][0]["layers"][0]["reservoir"].update(change))
    with pytest.raises(ValidationError) as info:
        WindowBatch.model_validate(body)
    text = str(info.value)
    assert "windows.0.layers.0" in text
    assert message in text


def test_a_blob_header_is_checked_against_channels_before_decoding() -> None:
    """13 constant arrays claiming 2**20 + 1 channels fit in 130 bytes: the shape is refused
    from the header (naming the field and both shapes), never allocated (109 MB)."""
    claimed = 2**20 + 1
    blob = struct.pack("<4s4sII", MAGIC, b"<f8\0", 13, claimed) + (b"\x01" + b"\0" * 8) * 13
    tracemalloc.start()
    try:
        with pytest.raises(
            ValueError, match=rf"moments: expected 13 arrays of 6 channels, got \[13, {claimed}\]"
        ):
            decode_blob(base64.b64encode(blob).decode(), 13, 6, "moments")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20
