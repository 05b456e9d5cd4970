"""Rows for tests (no torch): alerts to refer to, and recalibrated buffers to report."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any

import numpy as np
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from bnwatch.schema import utcnow
from bnwatch.store.models import Alert


def add_alerts(
    engine: Engine,
    ids: Iterable[int],
    *,
    state: str = "open",
    opened_at: datetime | None = None,
    values: Mapping[str, Any] | None = None,
    model_id: int = 1,
) -> None:
    """Model-level ``drift`` alerts with these ids on model ``model_id``."""
    opened = opened_at or utcnow()
    with Session(engine) as session, session.begin():
        for alert_id in ids:
            session.add(
                Alert(
                    id=alert_id,
                    model_id=model_id,
                    layer_id=None,
                    kind="drift",
                    state=state,
                    opened_at=opened,
                    last_seen_at=opened,
                    values=dict(values or {}),
                )
            )


def random_buffers(
    channels: Mapping[str, int], seed: int = 0
) -> dict[str, tuple[np.ndarray, np.ndarray, float]]:
    """New ``(running_mean, running_var, eps)`` per layer of ``channels`` (layer -> count)."""
    rng = np.random.default_rng(seed)
    return {
        name: (rng.normal(size=c), rng.gamma(2.0, 0.5, size=c), 1e-5)
        for name, c in channels.items()
    }
