"""``bnwatch.load_profile``: the reference profile stored for a model version -- in a database
or through a running ``bnwatch serve`` -- comes back exactly as it was recorded, and a monitor
given it judges drift against it from its first window."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import bnwatch
from bnwatch.errors import ConfigError, ProfileNotFoundError
from bnwatch.schema import Profile
from bnwatch.store.engine import SchemaError
from bnwatch.store.migrate import engine_for
from tests.service.helpers import TOKEN, serve
from tests.service.profile_helpers import MODEL, VERSION, same_bits, tiny_data, tiny_model


def assert_same(got: Profile, want: Profile) -> None:
    assert (got.name, got.version) == (want.name, want.version)
    assert list(got.layers) == list(want.layers)
    for name, lp in want.layers.items():
        other = got.layers[name]
        assert other.kind == lp.kind and other.eps == lp.eps
        pairs = zip(other.stats.moments.as_arrays(), lp.stats.moments.as_arrays(), strict=True)
        assert all(same_bits(a, b) for a, b in pairs)
        assert same_bits(other.reservoir.rows, lp.reservoir.rows)
        assert other.stats.samples_seen == lp.stats.samples_seen
        assert other.stats.batch_sizes == lp.stats.batch_sizes
        assert other.running_mean is None  # the store keeps no running statistics of a profile


def watched_drift(reference: Profile, shift: float) -> tuple[str, bool]:
    """A monitor given ``reference``: its first window's baseline and drift flag."""
    model = tiny_model()
    with bnwatch.watch(
        model, name=MODEL, version=VERSION, reference=reference, overhead_budget=None
    ) as mon:
        with torch.no_grad():
            for x in tiny_data(4, seed=9, shift=shift):
                model(x)
        report = mon.flush()["1"]
    return report.baseline, report.drifted


def test_a_profile_stored_in_a_database_comes_back_exactly(db_url: str, tmp_path: Path) -> None:
    with pytest.raises(SchemaError, match="no database file"):  # a mistyped path creates none
        bnwatch.load_profile(f"sqlite:///{tmp_path / 'missing.db'}", MODEL, VERSION)
    assert not (tmp_path / "missing.db").exists()
    engine_for(db_url).dispose()  # the schema, as bnwatch db upgrade makes it
    with pytest.raises(ProfileNotFoundError, match=f"no reference profile of {MODEL}@{VERSION}"):
        bnwatch.load_profile(db_url, MODEL, VERSION)  # the schema, but no profile yet
    recorded = bnwatch.profile(
        tiny_model(), tiny_data(), name=MODEL, version=VERSION, store=db_url, reservoir_size=16
    )
    assert_same(bnwatch.load_profile(db_url, MODEL, VERSION), recorded)
    with pytest.raises(ProfileNotFoundError) as missing:
        bnwatch.load_profile(db_url, MODEL, "2")
    assert (missing.value.model, missing.value.version) == (MODEL, "2")
    loaded = bnwatch.load_profile(db_url, MODEL, VERSION)
    assert watched_drift(loaded, shift=0.0) == ("profile", False)
    assert watched_drift(loaded, shift=2.0) == ("profile", True)
    # recorded again on other data: the newest is the one read back
    newer = bnwatch.profile(
        tiny_model(),
        tiny_data(seed=5, shift=2.0),
        name=MODEL,
        version=VERSION,
        store=db_url,
        reservoir_size=16,
    )
    assert_same(bnwatch.load_profile(db_url, MODEL, VERSION), newer)


def test_a_profile_stored_through_a_service_comes_back_exactly(db_url: str, tmp_path: Path) -> None:
    with serve(db_url, tmp_path / "serve.log") as server:
        with pytest.raises(ProfileNotFoundError, match="bnwatch profile"):
            bnwatch.load_profile(server.url, MODEL, VERSION)
        recorded = bnwatch.profile(
            tiny_model(),
            tiny_data(),
            name=MODEL,
            version=VERSION,
            store=server.url,
            token=TOKEN,
            reservoir_size=16,
        )
        # reads need no token; a name that needs quoting in a URL path
        assert_same(bnwatch.load_profile(server.url, MODEL, VERSION), recorded)
        odd = bnwatch.profile(
            tiny_model(),
            tiny_data(),
            name="team model?x%41",
            version="2025 06#1",
            store=server.url,
            token=TOKEN,
        )
        assert_same(bnwatch.load_profile(server.url + "/", "team model?x%41", "2025 06#1"), odd)
        # a model version with windows but no profile: 404, said as such
        with bnwatch.watch(
            tiny_model(), name=MODEL, version="3", store=server.url, token=TOKEN
        ) as mon:
            tiny_model()(tiny_data(1)[0])
            mon.flush()
        with pytest.raises(ProfileNotFoundError, match=f"{MODEL}@3"):
            bnwatch.load_profile(server.url, MODEL, "3")


def test_bad_arguments_name_the_argument() -> None:
    with pytest.raises(ConfigError, match="store"):
        bnwatch.load_profile("", MODEL, VERSION)
    with pytest.raises(ConfigError, match="version"):
        bnwatch.load_profile("sqlite:///x.db", MODEL, "")
