"""The service stores the reservoirs remote monitors send, as sent or recomputed."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy.engine import Engine

from bnwatch.store.repository import Repository
from bnwatch.wire import batch_of
from tests.service.helpers import AUTH, ENDPOINT
from tests.store.helpers import record_windows


@pytest.mark.parametrize("recompute", [False, True])
def test_reservoirs_sent_are_stored(
    make_app: Callable[..., FastAPI], engine: Engine, recompute: bool
) -> None:
    records = record_windows(2)
    body = batch_of(records)
    del body["windows"][1]["layers"][0]["reservoir"]  # a layer may come without one
    with TestClient(make_app(recompute=recompute), raise_server_exceptions=False) as client:
        answer = client.post(ENDPOINT, json=body, headers=AUTH)
    assert answer.status_code == 200, answer.text
    stored = Repository(engine).windows("cnn", "1", with_stats=True)
    assert len(stored) == 6
    for w in stored:
        index = 0 if w.end == records[0].end else 1
        assert w.stats is not None
        if index == 1 and w.layer == "1":
            assert w.stats.reservoir is None
            continue
        sent = records[index].reports[w.layer].stats.reservoir
        assert sent is not None and w.stats.reservoir is not None
        np.testing.assert_array_equal(w.stats.reservoir.rows, sent.rows)
        assert (w.stats.reservoir.seen, w.stats.reservoir.capacity) == (sent.seen, sent.capacity)
