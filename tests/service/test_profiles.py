"""POST /api/v1/profiles: stored exactly, idempotent, authenticated, all or nothing, and
validation errors that name the field."""

from __future__ import annotations

import base64
import copy
import dataclasses
import json
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from typing import Any

import numpy as np
import pytest
import sqlalchemy as sa
import torch
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy.engine import Engine

import bnwatch
from bnwatch.codec import encode_arrays
from bnwatch.schema import Profile
from bnwatch.sink import MemorySink
from bnwatch.store.models import Ref
from bnwatch.store.repository import Repository
from bnwatch.wire import WireProfile, profile_body, to_profile
from tests.service.helpers import AUTH, TOKEN, Monitor, b64, edited, row_counts
from tests.service.profile_helpers import (
    MODEL,
    VERSION,
    assert_stored_exactly,
    same_bits,
    tiny_data,
    tiny_model,
    tiny_profile,
)

ENDPOINT = "/api/v1/profiles"


@pytest.fixture(scope="module")
def profile() -> Profile:
    return tiny_profile()


def post(client: TestClient, body: Any, headers: dict[str, str] | None = None) -> Any:
    return client.post(ENDPOINT, json=body, headers=AUTH if headers is None else headers)


def error_of(response: Any) -> dict[str, Any]:
    body = response.json()
    assert set(body) == {"error"}, body
    error: dict[str, Any] = body["error"]
    assert isinstance(error["message"], str) and error["message"]
    return error


def empty(engine: Engine) -> bool:
    return not any(row_counts(engine).values())


# -- storing ---------------------------------------------------------------------------------
def test_an_upload_stores_the_profile_exactly(
    client: TestClient, engine: Engine, profile: Profile
) -> None:
    answer = post(client, json.loads(json.dumps(profile_body(profile))))  # through real JSON
    assert answer.status_code == 200, answer.text
    result = answer.json()
    assert set(result) == {"model", "version", "references"}
    assert (result["model"], result["version"]) == (MODEL, VERSION)
    assert_stored_exactly(engine, profile, result["references"])
    counts = row_counts(engine)
    assert (counts["models"], counts["layers"], counts["refs"]) == (1, 2, 2)

    # and it is what reports and the dashboard read back
    loaded = Repository(engine).load_profile(MODEL, VERSION)
    assert loaded is not None and list(loaded.layers) == list(profile.layers)
    for name, lp in profile.layers.items():
        back = loaded.layers[name]
        for a, b in zip(lp.stats.moments.as_arrays(), back.stats.moments.as_arrays(), strict=True):
            assert same_bits(a, b)
        assert same_bits(back.reservoir.rows, lp.reservoir.rows)
        assert back.stats.batch_sizes == lp.stats.batch_sizes


def test_sending_the_same_profile_again_stores_nothing(
    client: TestClient, engine: Engine, profile: Profile
) -> None:
    first = post(client, profile_body(profile))
    assert first.status_code == 200, first.text
    before = row_counts(engine)
    again = post(client, profile_body(profile))
    assert again.status_code == 200, again.text
    assert again.json() == first.json()
    # recorded again later: the same statistics are the same references
    later = dataclasses.replace(profile, created=profile.created + timedelta(hours=1))
    assert post(client, profile_body(later)).json() == first.json()
    assert row_counts(engine) == before

    # a profile of other data is a new reference of the same layers, and the newest one
    other = tiny_profile(seed=0, shift=0.5)
    answer = post(client, profile_body(other))
    assert answer.status_code == 200, answer.text
    references = answer.json()["references"]
    assert set(references.values()).isdisjoint(first.json()["references"].values())
    assert_stored_exactly(engine, other, references)
    assert row_counts(engine)["refs"] == before["refs"] + 2
    loaded = Repository(engine).load_profile(MODEL, VERSION)
    assert loaded is not None
    assert same_bits(loaded.layers["1"].reservoir.rows, other.layers["1"].reservoir.rows)


def test_an_earlier_profile_uploaded_again_is_the_one_served(
    client: TestClient, engine: Engine
) -> None:
    """P1, then P2, then P1 again: the third upload found P1's references by digest and left
    them at their old versions, so P2 -- the highest version -- was served by GET .../profile
    and bnwatch.load_profile.  The re-uploaded references become the newest again, with no
    row added."""
    p1, p2 = tiny_profile(seed=0, reservoir_size=64), tiny_profile(seed=1, reservoir_size=64)
    first = post(client, profile_body(p1)).json()["references"]
    post(client, profile_body(p2))
    before = row_counts(engine)
    again = post(client, profile_body(p1))
    assert again.status_code == 200, again.text
    assert again.json()["references"] == first
    assert row_counts(engine) == before
    assert_stored_exactly(engine, p1, first)

    answer = client.get(f"/api/v1/models/{MODEL}/versions/{VERSION}/profile")
    assert answer.status_code == 200, answer.text
    served = to_profile(WireProfile.model_validate(answer.json()))
    loaded = Repository(engine).load_profile(MODEL, VERSION)
    assert loaded is not None
    for got in (served, loaded):
        for name, lp in p1.layers.items():
            assert same_bits(got.layers[name].stats.moments.mean, lp.stats.moments.mean)
            assert same_bits(got.layers[name].reservoir.rows, lp.reservoir.rows)
    with engine.connect() as conn:
        versions = conn.execute(
            sa.select(Ref.id, Ref.version).where(Ref.kind == "profile").order_by(Ref.id)
        ).all()
    # per layer: P1 was version 1, P2 version 2; P1 uploaded again is version 3
    assert [v for _, v in versions] == [3, 3, 2, 2]
    assert post(client, profile_body(p1)).json()["references"] == first  # the newest already
    with engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.max(Ref.version))).scalar_one() == 3


def judged_windows(reference: Profile, version: str) -> list[Any]:
    """Two windows of the tiny model judged against ``reference`` (which is not stored)."""
    net = tiny_model().eval()
    sink = MemorySink()
    mon = bnwatch.watch(
        net,
        name=MODEL,
        version=version,
        reference=reference,
        store=sink,
        window_seconds=None,
        overhead_budget=None,
    )
    with torch.inference_mode():
        for seed in (5, 6):
            for x in tiny_data(2, seed=seed):
                net(x)
            assert all(r.baseline == "profile" for r in mon.flush().values())
    mon.close()
    return sink.windows


def test_get_serves_the_newest_upload_alone_dated_when_recorded(
    client: TestClient, engine: Engine
) -> None:
    """GET .../profile served the newest `profile` reference of each layer on its own: after
    a profile re-recorded with fewer layers, the new layer with the old others; after windows
    judged against a profile never stored, their reservoir-less baseline (and 200, not 404,
    for a version with no profile stored); and the upload's time as `created`."""
    recorded_at = datetime(2025, 6, 1, 12, 0, 0, 123456, tzinfo=timezone.utc)
    p1 = dataclasses.replace(tiny_profile(), created=recorded_at)
    p2 = bnwatch.profile(
        tiny_model(seed=1), tiny_data(seed=1), name=MODEL, version=VERSION, include="1"
    )
    assert list(p2.layers) == ["1"]
    for p in (p1, p2):
        assert post(client, profile_body(p)).status_code == 200
    unstored = tiny_profile(seed=2, shift=0.5)
    Repository(engine).write_windows(
        judged_windows(unstored, VERSION) + judged_windows(unstored, "2")
    )

    answer = client.get(f"/api/v1/models/{MODEL}/versions/{VERSION}/profile")
    assert answer.status_code == 200, answer.text
    served = to_profile(WireProfile.model_validate(answer.json()))
    assert list(served.layers) == ["1"]
    assert same_bits(served.layers["1"].stats.moments.mean, p2.layers["1"].stats.moments.mean)
    assert same_bits(served.layers["1"].reservoir.rows, p2.layers["1"].reservoir.rows)
    assert served.created == p2.created

    assert post(client, profile_body(p1)).status_code == 200  # the newest upload again
    served = to_profile(
        WireProfile.model_validate(
            client.get(f"/api/v1/models/{MODEL}/versions/{VERSION}/profile").json()
        )
    )
    assert list(served.layers) == list(p1.layers)
    for name, lp in p1.layers.items():
        assert same_bits(served.layers[name].reservoir.rows, lp.reservoir.rows)
    assert served.created == recorded_at

    answer = client.get(f"/api/v1/models/{MODEL}/versions/2/profile")
    assert answer.status_code == 404, answer.text
    assert "no reference profile" in error_of(answer)["message"]


def test_the_documented_example_is_accepted(client: TestClient, engine: Engine) -> None:
    spec = client.get("/openapi.json").json()
    content = spec["paths"][ENDPOINT]["post"]["requestBody"]["content"]["application/json"]
    assert content["schema"] == {"$ref": "#/components/schemas/WireProfile"}
    assert "WireProfile" in spec["components"]["schemas"]
    example = content["examples"]["one layer"]["value"]
    answer = post(client, example)
    assert answer.status_code == 200, answer.text
    assert list(answer.json()["references"]) == ["bn1"]
    assert row_counts(engine)["refs"] == 1


# -- refusals --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer wrong-token"}, {"Authorization": f"Basic {TOKEN}"}],
    ids=["missing", "wrong", "not bearer"],
)
def test_a_missing_or_wrong_token_is_401_and_writes_nothing(
    client: TestClient, engine: Engine, profile: Profile, headers: dict[str, str]
) -> None:
    answer = post(client, profile_body(profile), headers=headers)
    assert answer.status_code == 401, answer.text
    assert answer.headers["www-authenticate"].startswith("Bearer")
    assert "BNWATCH_API_TOKEN" in error_of(answer)["message"]
    assert empty(engine)


def test_without_a_configured_token_uploads_are_refused(
    make_app: Callable[..., FastAPI], engine: Engine, profile: Profile
) -> None:
    with TestClient(make_app(api_token=None)) as client:
        answer = post(client, profile_body(profile))
    assert answer.status_code == 503
    assert "BNWATCH_API_TOKEN" in error_of(answer)["message"]
    assert empty(engine)


def test_a_channel_count_change_is_409_naming_layer_and_counts(
    client: TestClient, engine: Engine, profile: Profile
) -> None:
    assert post(client, profile_body(profile)).status_code == 200
    before = row_counts(engine)
    # the first layer is unchanged (and its new statistics would be a new reference), the
    # second has 7 channels instead of 5: the whole profile is refused
    changed = tiny_profile((4, 7), seed=1)
    answer = post(client, profile_body(changed))
    assert answer.status_code == 409, answer.text
    error = error_of(answer)
    assert error["field"] == "layers.1.channels"
    assert "'4'" in error["message"]  # the layer's name
    assert "5 channels in the store" in error["message"]
    assert "the profile has 7" in error["message"]
    assert "nothing was stored" in error["message"]
    assert row_counts(engine) == before


def test_a_profile_clashing_with_stored_windows_is_409(
    client: TestClient, engine: Engine, profile: Profile
) -> None:
    # windows and profiles share the layers of a model version: "1" has 3 channels now
    windows = Monitor(model=MODEL, version=VERSION, layers=[("1", 3)]).body(1)
    assert client.post("/api/v1/windows", json=windows, headers=AUTH).status_code == 200
    before = row_counts(engine)
    answer = post(client, profile_body(profile))
    assert answer.status_code == 409, answer.text
    assert error_of(answer)["field"] == "layers.0.channels"
    assert row_counts(engine) == before


def _layer(body: dict[str, Any], **changes: Any) -> dict[str, Any]:
    out = copy.deepcopy(body)
    out["layers"][0].update(changes)
    return out


def _reservoir_rows(rows: int, channels: int) -> str:
    return base64.b64encode(encode_arrays(np.zeros((rows, channels)), dtype="<f4")).decode()


CASES: list[tuple[str, Callable[[dict[str, Any]], dict[str, Any]], str | None, str]] = [
    ("schema version", lambda b: edited(b, "schema_version", 2), "schema_version", "version 1"),
    ("no model", lambda b: {k: v for k, v in b.items() if k != "model"}, "model", "required"),
    ("NUL in model", lambda b: edited(b, "model", "a\x00b"), "model", "NUL"),
    ("naive created", lambda b: edited(b, "created", "2025-06-01T12:00:00"), "created", "zone"),
    ("no layers", lambda b: edited(b, "layers", []), "layers", "at least 1"),
    (
        "duplicate layers",
        lambda b: edited(b, "layers", [b["layers"][0], b["layers"][0]]),
        "layers",
        "unique",
    ),
    (
        "moments of other channels",
        lambda b: _layer(b, channels=3),
        "layers.0.moments",
        "expected 13 arrays of 3 channels",
    ),
    (
        "moments not base64",
        lambda b: _layer(b, moments="not base64!"),
        "layers.0.moments",
        "base64",
    ),
    (
        "NaN in moments",
        lambda b: _layer(b, moments=b64(np.full((13, 4), np.nan))),
        "layers.0.moments",
        "NaN",
    ),
    (
        "negative running_var",
        lambda b: _layer(b, running=b64([[0.0] * 4, [1.0, 1.0, -1.0, 1.0]])),
        "layers.0.running",
        "running_var",
    ),
    ("zero eps", lambda b: _layer(b, eps=0.0), "layers.0.eps", "greater than 0"),
    (
        "negative n_batches",
        lambda b: _layer(b, n_batches=-1),
        "layers.0.n_batches",
        "greater than or equal to 0",
    ),
    (
        "batch sizes that do not add up",
        lambda b: _layer(b, batch_sizes={"8": 2}),
        "layers.0.batch_sizes",
        "n_batches",
    ),
    (
        "a reservoir of more rows than it saw",
        lambda b: _layer(
            b, reservoir={"rows": _reservoir_rows(30, 4), "seen": 24, "capacity": 512}
        ),
        "layers.0.reservoir.rows",
        "at most 24 rows",
    ),
    ("no reservoir", lambda b: _layer(b, reservoir=None), "layers.0.reservoir", "an object"),
    ("an unknown field", lambda b: _layer(b, depth=0), "layers.0.depth", "not permitted"),
]


@pytest.mark.parametrize(
    ("change", "field", "words"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_an_invalid_profile_is_422_naming_the_field(
    client: TestClient,
    engine: Engine,
    profile: Profile,
    change: Callable[[dict[str, Any]], dict[str, Any]],
    field: str,
    words: str,
) -> None:
    body = change(json.loads(json.dumps(profile_body(profile))))
    answer = post(client, body)
    assert answer.status_code == 422, answer.text
    error = error_of(answer)
    assert error["field"] == field, error
    assert words.lower() in error["message"].lower(), error
    assert empty(engine)


def test_malformed_json_is_422(client: TestClient, engine: Engine) -> None:
    answer = client.post(ENDPOINT, content=b'{"schema_version": 1, "layers": [', headers=AUTH)
    assert answer.status_code == 422
    assert "not valid JSON" in error_of(answer)["message"]
    assert empty(engine)


def test_a_body_over_the_profile_limit_is_413_with_advice(
    make_app: Callable[..., FastAPI], engine: Engine, profile: Profile
) -> None:
    body = json.dumps(profile_body(profile)).encode()
    with TestClient(make_app(max_profile_bytes=len(body) - 1)) as client:
        answer = client.post(
            ENDPOINT, content=body, headers={**AUTH, "Content-Type": "application/json"}
        )
    assert answer.status_code == 413
    message = error_of(answer)["message"]
    assert "BNWATCH_MAX_PROFILE_BYTES" in message and "reservoir_size" in message
    assert empty(engine)


def test_profiles_have_their_own_limit_above_the_windows_one(
    make_app: Callable[..., FastAPI], engine: Engine, profile: Profile
) -> None:
    # a profile's reservoirs make it larger than a batch of windows (ResNet-50: ~72 MB at the
    # default reservoir_size=512, over the 64 MiB windows limit): the windows limit is not
    # the one that applies
    body = json.dumps(profile_body(profile)).encode()
    app = make_app(max_body_bytes=len(body) // 2, max_profile_bytes=len(body))
    with TestClient(app) as client:
        answer = client.post(
            ENDPOINT, content=body, headers={**AUTH, "Content-Type": "application/json"}
        )
    assert answer.status_code == 200, answer.text
    assert set(answer.json()["references"]) == set(profile.layers)
    assert not empty(engine)


def test_a_body_that_is_not_json_is_415(client: TestClient, profile: Profile) -> None:
    body = json.dumps(profile_body(profile)).encode()
    answer = client.post(ENDPOINT, content=body, headers={**AUTH, "Content-Type": "text/plain"})
    assert answer.status_code == 415
