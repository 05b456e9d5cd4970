"""Several replicas (processes) writing one database lose nothing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from bnwatch.store.migrate import engine_for
from bnwatch.store.repository import Repository

ROOT = Path(__file__).resolve().parents[2]


def run_replicas(url: str, replicas: int, windows: int) -> int:
    engine_for(url).dispose()  # create the schema once, as `bnwatch db upgrade` would
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "tests.store.replica", url, f"replica-{i}", str(windows)],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(replicas)
    ]
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, out + err
    engine = engine_for(url)
    try:
        return Repository(engine).window_count()
    finally:
        engine.dispose()


def test_four_processes_into_postgres(postgres_url: str) -> None:
    assert run_replicas(postgres_url, replicas=4, windows=200) == 800


def test_two_processes_into_one_sqlite_file(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    assert run_replicas(url, replicas=2, windows=200) == 400


@pytest.mark.parametrize("replicas", [3])
def test_concurrent_first_writes_create_shared_rows_once(postgres_url: str, replicas: int) -> None:
    """Replicas racing to create the same model and layer rows end with one of each."""
    import sqlalchemy as sa

    assert run_replicas(postgres_url, replicas=replicas, windows=20) == 60
    engine = engine_for(postgres_url)
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM models")).scalar_one() == 1
        assert conn.execute(sa.text("SELECT count(*) FROM layers")).scalar_one() == 1
        assert conn.execute(sa.text("SELECT count(*) FROM refs")).scalar_one() == 1
    engine.dispose()
