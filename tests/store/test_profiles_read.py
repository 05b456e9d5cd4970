"""Reading a stored reference profile back: only what a profile upload stored, and only the
layers of the newest upload, with its recording time."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from datetime import datetime, timezone

import pytest
import sqlalchemy as sa
import torch

import bnwatch
from bnwatch.errors import ProfileNotFoundError
from bnwatch.schema import Profile
from bnwatch.sink import MemorySink
from bnwatch.stats import Reservoir
from bnwatch.store.migrate import engine_for
from bnwatch.store.repository import ChannelMismatchError, Repository
from tests.store.helpers import batches, small_cnn

LAYERS = ["1", "4", "7"]  # small_cnn's BatchNorm layers


@pytest.fixture
def repo(db_url: str) -> Iterator[Repository]:
    engine = engine_for(db_url)
    yield Repository(engine)
    engine.dispose()


def recorded(seed: int = 0, shift: float = 0.0, version: str = "1", **kwargs: object) -> Profile:
    return bnwatch.profile(
        small_cnn(),
        batches(4, seed=seed, shift=shift),
        name="cnn",
        version=version,
        reservoir_size=8,
        **kwargs,  # type: ignore[arg-type]
    )


def same_layer(a: Profile, b: Profile, name: str) -> bool:
    x, y = a.layers[name], b.layers[name]
    return all(
        u.tobytes() == v.tobytes()
        for u, v in zip(x.stats.moments.as_arrays(), y.stats.moments.as_arrays(), strict=True)
    ) and (x.reservoir.rows.tobytes() == y.reservoir.rows.tobytes())


def judged_windows(reference: Profile, version: str = "1") -> list[bnwatch.schema.WindowRecord]:
    """Two windows of small_cnn judged against ``reference`` (not stored anywhere)."""
    net = small_cnn()
    sink = MemorySink()
    mon = bnwatch.watch(
        net,
        name="cnn",
        version=version,
        reference=reference,
        store=sink,
        window_seconds=None,
        overhead_budget=None,
    )
    with torch.inference_mode():
        for xs in (batches(2, seed=7), batches(2, seed=8)):
            for x in xs:
                net(x)
            assert all(r.baseline == "profile" for r in mon.flush().values())
    mon.close()
    return sink.windows


def test_a_profile_recorded_again_with_fewer_layers_is_served_alone(repo: Repository) -> None:
    # the newest reference of each layer was served on its own: after P2 (only layer '1'),
    # load_profile answered P2's '1' with P1's '4' and '7' -- a profile nobody recorded
    p1 = recorded()
    p2 = recorded(seed=1, shift=0.5, include="1")
    assert list(p2.layers) == ["1"]
    repo.write_profile(p1)
    repo.write_profile(p2)
    back = repo.load_profile("cnn", "1")
    assert back is not None
    assert list(back.layers) == ["1"]
    assert same_layer(p2, back, "1")
    assert back.created == p2.created
    # P1 uploaded again is the newest upload: all of its layers, none of P2's
    repo.write_profile(p1)
    back = repo.load_profile("cnn", "1")
    assert back is not None
    assert list(back.layers) == LAYERS
    assert all(same_layer(p1, back, name) for name in LAYERS)


def test_windows_judged_against_an_unstored_profile_are_no_stored_profile(
    repo: Repository,
) -> None:
    # such windows store the moments they were judged against as a reservoir-less `profile`
    # reference (their baseline); load_profile served it -- with no reservoir and no batch
    # counts -- instead of the stored profile, and for a version with none stored at all
    p1 = recorded()
    p2 = recorded(seed=1, shift=0.5)  # never stored
    repo.write_profile(p1)
    repo.write_windows(judged_windows(p2))
    back = repo.load_profile("cnn", "1")
    assert back is not None
    assert list(back.layers) == LAYERS
    assert all(same_layer(p1, back, name) for name in LAYERS)
    assert all(back.layers[n].stats.n_batches == p1.layers[n].stats.n_batches for n in LAYERS)

    repo.write_windows(judged_windows(p2, version="2"))
    assert repo.load_profile("cnn", "2") is None
    url = repo.engine.url.render_as_string(hide_password=False)
    with pytest.raises(ProfileNotFoundError):
        bnwatch.load_profile(url, "cnn", "2")

    # the windows still point at their baseline: a `profile` reference without a reservoir
    with repo.engine.connect() as conn:
        baselines = conn.execute(
            sa.text(
                "SELECT count(DISTINCT r.id) FROM windows w JOIN refs r ON r.id = w.baseline_ref_id"
                " WHERE r.kind = 'profile' AND r.reservoir IS NULL"
            )
        ).scalar_one()
    assert baselines == 2 * len(LAYERS)  # P2's moments, once per layer of each version


def test_a_profile_with_an_empty_reservoir_is_served(repo: Repository) -> None:
    p1 = recorded()
    empty = dataclasses.replace(
        p1,
        layers={
            n: dataclasses.replace(lp, reservoir=Reservoir(8, lp.channels))
            for n, lp in p1.layers.items()
        },
    )
    repo.write_profile(empty)
    back = repo.load_profile("cnn", "1")
    assert back is not None
    assert list(back.layers) == LAYERS
    assert all(back.layers[n].reservoir.rows.shape == (0, p1.layers[n].channels) for n in LAYERS)


def test_the_served_profile_is_dated_when_it_was_recorded(repo: Repository) -> None:
    # `created` was the upload's time (the reference row's), not the recording's
    recorded_at = datetime(2025, 6, 1, 12, 0, 0, 123456, tzinfo=timezone.utc)
    p1 = dataclasses.replace(recorded(), created=recorded_at)
    repo.write_profile(p1)
    back = repo.load_profile("cnn", "1")
    assert back is not None
    assert back.created == recorded_at


def test_a_profile_with_other_channel_counts_is_refused_naming_the_profile(
    repo: Repository,
) -> None:
    repo.write_profile(recorded())
    wider = bnwatch.profile(small_cnn(width=9), batches(2), name="cnn", version="1")
    with pytest.raises(ChannelMismatchError) as info:
        repo.write_profile(wider)
    assert "has 6 channels in the store but the profile has 9" in str(info.value)
    back = repo.load_profile("cnn", "1")
    assert back is not None and back.layers["1"].channels == 6


def test_layers_recorded_again_unchanged_are_served_with_the_changed_ones(
    repo: Repository,
) -> None:
    """A head fine-tuned, the rest unchanged: layers '1' and '4' of the new recording equal
    the stored ones bit for bit, kept the earlier upload's date, and only '7' was served."""
    p1 = recorded()
    repo.write_profile(p1)
    p2 = dataclasses.replace(
        p1,
        created=datetime(2031, 1, 1, tzinfo=timezone.utc),
        layers={**p1.layers, "7": recorded(seed=1, shift=0.5).layers["7"]},
    )
    repo.write_profile(p2)
    served = repo.load_profile("cnn", "1")
    assert served is not None
    assert list(served.layers) == LAYERS
    assert same_layer(served, p2, "7") and not same_layer(served, p1, "7")
    assert served.created == p2.created
