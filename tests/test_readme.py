"""The README's Python examples run as written (on a small BatchNorm CNN and random data
standing in for the reader's model and loaders)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import bnwatch
from bnwatch.demo.digits import DigitsCNN

README = Path(__file__).resolve().parents[1] / "README.md"


def python_block(section: str, index: int = 0) -> str:
    """The ``index``-th ```python block under the README's ``## section`` heading."""
    text = README.read_text(encoding="utf-8")
    body = text.split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", body, flags=re.DOTALL)
    return str(blocks[index])


def reader_namespace() -> dict[str, object]:
    """What the examples assume the reader has: a model, validation and production data."""
    torch.manual_seed(0)
    return {
        "model": DigitsCNN().eval(),
        "val_loader": [torch.randn(16, 1, 8, 8) for _ in range(8)],
        "production_batches": [torch.randn(4, 1, 8, 8) + 0.5 for _ in range(20)],
    }


def test_in_your_code(capsys: pytest.CaptureFixture[str]) -> None:
    namespace = reader_namespace()
    exec(compile(python_block("In your code"), "README: In your code", "exec"), namespace)
    printed = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in printed] == ["bn1", "bn2", "bn3", "head_bn"]
    reports = namespace["reports"]
    assert isinstance(reports, dict) and len(reports) == 4
    for r in reports.values():  # the default budget measures some of the 80 samples
        assert 0 < r.n_samples <= r.stats.samples_seen == 80


def test_storing_windows(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # the example's sqlite:///bnwatch.db
    namespace = reader_namespace() | {"bnwatch": bnwatch}  # imported by the first example
    code = python_block("Storing windows")
    exec(compile(code, "README: Storing windows", "exec"), namespace)
    model, mon = namespace["model"], namespace["mon"]
    for batch in namespace["production_batches"]:  # type: ignore[attr-defined]
        model(batch)  # type: ignore[operator]
    mon.close()  # type: ignore[attr-defined]
    # the example's reads, again, now that a window is stored
    repo = namespace["repo"]
    latest = repo.latest_windows("resnet50", "2025-06-01")  # type: ignore[attr-defined]
    assert [w.layer for w in latest] == ["bn1", "bn2", "bn3", "head_bn"]
    merged = repo.windows("resnet50", "2025-06-01", resolution=3600)  # type: ignore[attr-defined]
    assert len(merged) == 4 and all(w.merged_from == 1 for w in merged)
    assert (tmp_path / "bnwatch.db").exists()


def test_recalibration(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    namespace = reader_namespace() | {"bnwatch": bnwatch}
    shifted = [torch.randn(64, 1, 8, 8) * 2 + 1 for _ in range(4)]
    namespace["recent_batches"] = shifted
    namespace["labelled_batches"] = [(x, torch.randint(0, 10, (64,))) for x in shifted[:2]]
    model = namespace["model"]
    before = {k: v.clone() for k, v in model.state_dict().items()}  # type: ignore[attr-defined]
    *run, undo = python_block("Recalibration").strip().splitlines()
    assert undo.startswith("result.rollback()")
    exec(compile("\n".join(run), "README: Recalibration", "exec"), namespace)
    result = namespace["result"]
    assert result.status == "applied"  # type: ignore[attr-defined]  # held-out drift improved
    assert result.accuracy_before is not None  # type: ignore[attr-defined]  # labels given
    changed = model.state_dict()  # type: ignore[attr-defined]
    assert not torch.equal(before["bn1.running_mean"], changed["bn1.running_mean"])
    exec(compile(undo, "README: Recalibration", "exec"), namespace)
    after = model.state_dict()  # type: ignore[attr-defined]
    assert all(torch.equal(before[k], after[k]) for k in before)
