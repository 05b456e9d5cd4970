"""The report benchmark's smoke run: both settings test every channel alike (the benchmark
stops otherwise), the three shifted channels drift, and fewer plots mean a smaller page.
Timings are never asserted."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # ``benchmarks`` is not an installed package
    sys.path.insert(0, str(ROOT))

from benchmarks import reports  # noqa: E402


def test_smoke_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "reports.json"
    results = reports.main(["--smoke", "--quiet", "--json", str(out)])
    printed = capsys.readouterr().out
    assert json.loads(out.read_text()) == json.loads(json.dumps(results))
    rows = results["rows"]
    assert [(r["channels"], r["plots"]) for r in rows] == [(8, 4), (8, "all"), (24, 4), (24, "all")]
    assert [r["plotted"] for r in rows] == [4, 8, 4, 24]
    for r in rows:
        assert r["drifted"] == [0, 1, 2]
        assert r["seconds"] > 0 and r["json_bytes"] > 0
    for ratio in results["ratios"]:
        assert ratio["html_bytes"] > 1.0
    assert "ratios, plots=all / plots=4" in printed
