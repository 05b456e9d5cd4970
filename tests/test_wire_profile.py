"""The wire form of a reference profile: an exact round trip, and errors that name the field."""

from __future__ import annotations

import copy
import dataclasses
import json
from typing import Any

import numpy as np
import pytest
from pydantic import ValidationError

from bnwatch.schema import Profile
from bnwatch.wire import WireProfile, profile_body, to_profile
from tests.service.profile_helpers import same_bits, tiny_profile


@pytest.fixture(scope="module")
def profile() -> Profile:
    return tiny_profile()


def round_trip(profile: Profile) -> Profile:
    body = json.loads(json.dumps(profile_body(profile), allow_nan=False))  # through real JSON
    return to_profile(WireProfile.model_validate(body))


def test_the_round_trip_is_exact(profile: Profile) -> None:
    back = round_trip(profile)
    assert (back.name, back.version, back.created) == (
        profile.name,
        profile.version,
        profile.created,
    )
    assert list(back.layers) == list(profile.layers)  # the order is the layers' depth
    for name, lp in profile.layers.items():
        b = back.layers[name]
        assert (b.layer, b.kind, b.eps, b.channels) == (lp.layer, lp.kind, lp.eps, lp.channels)
        for sent, got in zip(
            lp.stats.moments.as_arrays(), b.stats.moments.as_arrays(), strict=True
        ):
            assert same_bits(sent, got)
        assert dict(b.stats.batch_sizes) == dict(lp.stats.batch_sizes)
        for field in ("n_batches", "batches_seen", "samples_seen", "batch_stat_batches"):
            assert getattr(b.stats, field) == getattr(lp.stats, field)
        assert same_bits(b.reservoir.rows, lp.reservoir.rows)
        assert (b.reservoir.seen, b.reservoir.capacity) == (
            lp.reservoir.seen,
            lp.reservoir.capacity,
        )
        assert lp.running_mean is not None and lp.running_var is not None
        assert b.running_mean is not None and b.running_var is not None
        assert same_bits(b.running_mean, lp.running_mean)
        assert same_bits(b.running_var, lp.running_var)


def test_extreme_float64_values_survive(profile: Profile) -> None:
    """Bit for bit: subnormals, -0.0, huge and tiny magnitudes."""
    name, lp = next(iter(profile.layers.items()))
    c = lp.channels
    odd = np.array([5e-324, -0.0, 1.7976931348623157e308, 1e-300, np.nextafter(1.0, 2.0)])
    mean = np.resize(odd, c)
    moments = dataclasses.replace(lp.stats.moments, mean=mean, smean=mean[::-1].copy())
    layer = dataclasses.replace(lp, stats=dataclasses.replace(lp.stats, moments=moments))
    back = round_trip(dataclasses.replace(profile, layers={name: layer}))
    got = back.layers[name].stats.moments
    assert same_bits(got.mean, mean) and same_bits(got.smean, mean[::-1].copy())


def test_layers_without_running_statistics(profile: Profile) -> None:
    name, lp = next(iter(profile.layers.items()))
    none = dataclasses.replace(lp, running_mean=None, running_var=None)
    nan = dataclasses.replace(lp, running_var=np.full(lp.channels, np.nan))
    for layer in (none, nan):  # non-finite running statistics are not sent, like a window's
        body = profile_body(dataclasses.replace(profile, layers={name: layer}))
        assert body["layers"][0]["running"] is None
        back = round_trip(dataclasses.replace(profile, layers={name: layer}))
        assert back.layers[name].running_mean is None and back.layers[name].running_var is None


def test_an_empty_reservoir_survives(profile: Profile) -> None:
    from bnwatch.stats import Reservoir

    name, lp = next(iter(profile.layers.items()))
    layer = dataclasses.replace(lp, reservoir=Reservoir(512, lp.channels))
    back = round_trip(dataclasses.replace(profile, layers={name: layer}))
    r = back.layers[name].reservoir
    assert r.rows.shape == (0, lp.channels) and r.seen == 0 and r.capacity == 512


def _errors(body: dict[str, Any]) -> list[tuple[str, str]]:
    with pytest.raises(ValidationError) as err:
        WireProfile.model_validate(body)
    return [(".".join(str(p) for p in e["loc"]), e["msg"]) for e in err.value.errors()]


def test_validation_errors_name_the_field(profile: Profile) -> None:
    body = profile_body(profile)
    wrong = copy.deepcopy(body)
    wrong["layers"][1]["channels"] = 9
    [(loc, msg)] = _errors(wrong)
    assert loc == "layers.1" and "moments: expected 13 arrays of 9 channels" in msg
    wrong = copy.deepcopy(body)
    wrong["layers"][0]["reservoir"]["seen"] = 3
    [(loc, msg)] = _errors(wrong)
    assert loc == "layers.0" and "reservoir.rows: expected at most 3 rows" in msg
    wrong = copy.deepcopy(body)
    wrong["created"] = "2025-06-01T12:00:00"
    assert [loc for loc, _ in _errors(wrong)] == ["created"]
