"""Alert rows for tests that need open (or resolved) alerts to refer to (no torch)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any

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
