"""Writers of several layers' references lock the layers' rows in layer-id order, whatever
order their profile, windows or buffers list the layers in.  Two profiles listing the same
layers in opposite orders, uploaded at once to PostgreSQL, each locked a row the other then
waited for: PostgreSQL aborted one (DeadlockDetected, answered 503).  (SQLite writers take the
file's one write lock; nothing to order.)"""

from __future__ import annotations

import dataclasses
import threading
from typing import Any

import sqlalchemy as sa

import bnwatch
from bnwatch.schema import Profile
from bnwatch.store.migrate import engine_for
from bnwatch.store.repository import Repository
from tests.store.helpers import batches, small_cnn

WAIT_SECONDS = 3.0
"""How long each upload, holding its first layer lock, waits for the other to take one."""


def recorded(seed: int) -> Profile:
    return bnwatch.profile(
        small_cnn(), batches(4, seed=seed), name="cnn", version="1", reservoir_size=8
    )


def reversed_layers(profile: Profile) -> Profile:
    return dataclasses.replace(profile, layers=dict(reversed(list(profile.layers.items()))))


def test_profiles_listing_layers_in_opposite_orders_do_not_deadlock(
    migrated_postgres_url: str,
) -> None:
    engine = engine_for(migrated_postgres_url)
    try:
        Repository(engine).write_profile(recorded(seed=0))  # the layers exist
        uploads = {"forward": recorded(seed=1), "backward": reversed_layers(recorded(seed=2))}
        assert list(uploads["forward"].layers) == list(reversed(list(uploads["backward"].layers)))
        locked = {name: threading.Event() for name in uploads}
        mine = threading.local()

        def after_execute(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
            # each upload, once it holds its first layer row, lets the other take one: in
            # opposite orders each would then hold a row the other needs next
            name = getattr(mine, "name", None)
            if name and "FOR NO KEY UPDATE" in statement and not locked[name].is_set():
                locked[name].set()
                (other,) = set(uploads) - {name}
                locked[other].wait(WAIT_SECONDS)

        sa.event.listen(engine, "after_cursor_execute", after_execute)
        errors: dict[str, BaseException] = {}

        def upload(name: str) -> None:
            mine.name = name
            try:
                Repository(engine).write_profile(uploads[name])
            except BaseException as err:  # asserted below
                errors[name] = err

        threads = [threading.Thread(target=upload, args=(name,)) for name in uploads]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not any(t.is_alive() for t in threads)
        assert errors == {}
        # both stored; the one that committed last is served, whole
        served = Repository(engine).load_profile("cnn", "1")
        assert served is not None
        assert set(served.layers) == set(uploads["forward"].layers)
    finally:
        engine.dispose()
