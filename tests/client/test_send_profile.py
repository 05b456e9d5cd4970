"""``bnwatch.profile(..., store="http://...")``: the profile lands in a real ``bnwatch serve``'s
database, exactly; refusals raise a ServiceError with the service's status and message;
arguments are checked before any data is read."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import bnwatch
from bnwatch.client import ServiceError, profiles_endpoint, send_profile
from bnwatch.errors import ConfigError
from bnwatch.store.migrate import engine_for
from bnwatch.store.repository import Repository
from tests.service.helpers import TOKEN, free_port, row_counts, serve
from tests.service.profile_helpers import (
    MODEL,
    VERSION,
    assert_stored_exactly,
    same_bits,
    tiny_data,
    tiny_model,
    tiny_profile,
)


def test_a_profile_is_stored_in_a_running_service(
    db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with serve(db_url, tmp_path / "serve.log") as server:
        profile = bnwatch.profile(
            tiny_model(),
            tiny_data(),
            name=MODEL,
            version=VERSION,
            store=server.url,
            token=TOKEN,
            reservoir_size=16,
        )
        engine = engine_for(db_url, create=False)
        try:
            stored = Repository(engine).load_profile(MODEL, VERSION)
            assert stored is not None and list(stored.layers) == list(profile.layers)
            for name, lp in profile.layers.items():
                moments = zip(
                    lp.stats.moments.as_arrays(),
                    stored.layers[name].stats.moments.as_arrays(),
                    strict=True,
                )
                assert all(same_bits(a, b) for a, b in moments)
                assert same_bits(stored.layers[name].reservoir.rows, lp.reservoir.rows)
            counts = row_counts(engine)

            # again, the token from the environment: the same references, nothing new
            monkeypatch.setenv("BNWATCH_API_TOKEN", TOKEN)
            references = send_profile(server.url + "/", profile)
            assert_stored_exactly(engine, profile, references)
            assert row_counts(engine) == counts

            # a wrong token: the service's 401 and its message, nothing stored
            with pytest.raises(ServiceError) as refused:
                send_profile(server.url, tiny_profile(seed=3), token="wrong-token")
            assert refused.value.status == 401
            assert "invalid bearer token" in str(refused.value)
            assert "token=" in str(refused.value)

            # a changed architecture under the same version: 409 naming layer and counts
            with pytest.raises(ServiceError) as clash:
                send_profile(server.url, tiny_profile((4, 7), seed=1), token=TOKEN)
            assert clash.value.status == 409
            assert "layer '4'" in clash.value.detail
            assert "5 channels in the store" in clash.value.detail
            assert "the profile has 7" in clash.value.detail
            assert row_counts(engine) == counts
        finally:
            engine.dispose()


def test_an_unreachable_service_raises_service_error() -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    with pytest.raises(ServiceError) as err:
        send_profile(url, tiny_profile(), token=TOKEN, timeout=5.0)
    assert err.value.status is None
    assert "was not stored" in str(err.value) and url in str(err.value)


class _NeverRead:
    """Data that fails the test if anything iterates over it."""

    def __iter__(self) -> Iterator[torch.Tensor]:
        raise AssertionError("the data was read before the arguments were checked")


@pytest.mark.parametrize(
    ("store", "token", "argument"),
    [
        ("sqlite:///never.db", TOKEN, "token"),  # a token only with a service URL
        (None, TOKEN, "token"),
        ("http://", None, "store"),
        ("http://user:secret@bnwatch:8000", None, "store"),
    ],
)
def test_arguments_are_checked_before_profiling(
    store: str | None, token: str | None, argument: str
) -> None:
    with pytest.raises(ConfigError) as err:
        bnwatch.profile(tiny_model(), _NeverRead(), store=store, token=token)
    assert err.value.argument == argument
    assert "secret" not in str(err.value) and TOKEN not in str(err.value)


@pytest.mark.parametrize(
    ("url", "endpoint"),
    [
        ("http://bnwatch:8000", "http://bnwatch:8000/api/v1/profiles"),
        ("https://example.org/bnwatch/", "https://example.org/bnwatch/api/v1/profiles"),
        ("http://bnwatch:8000/api/v1/profiles", "http://bnwatch:8000/api/v1/profiles"),
    ],
)
def test_the_endpoint_of_a_service_url(url: str, endpoint: str) -> None:
    assert profiles_endpoint(url) == endpoint
