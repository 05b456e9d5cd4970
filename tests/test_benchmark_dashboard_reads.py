"""The dashboard reads benchmark (``benchmarks/dashboard_reads.py``) runs end to end: both
paths of each read agree (the run stops otherwise) and every number is there.  Timings and
memory are never asserted (shared machines are noisy)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # ``benchmarks`` is not an installed package
    sys.path.insert(0, str(ROOT))

from benchmarks import dashboard_reads  # noqa: E402
from tests.conftest import postgres_admin_url  # noqa: E402


def test_smoke_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "reads.json"
    results = dashboard_reads.main(
        ["--smoke", "--postgres-url", postgres_admin_url(), "--json", str(out)]
    )
    assert json.loads(out.read_text())["repeats"] == 1
    layer = results["layer"]
    assert set(layer["paths"]) == set(dashboard_reads.PATHS)
    for path in layer["paths"].values():
        assert path["seconds"] > 0 and path["traced_bytes"] > 0 and path["buckets"] > 1
    overview = results["overview"]
    assert set(overview["reads_seconds"]) == {"per version", "grouped"}
    assert overview["page_seconds"] > 0
    table = capsys.readouterr().out
    assert "in memory" in table and "streamed" in table and "grouped" in table
