"""bnwatch's demo: a small BatchNorm CNN on scikit-learn digits, watched through clean,
drifted and misconfigured production traffic, with alerts, a triggered recalibration and the
train/inference gap closed by recalibrating on clean data (``bnwatch demo``; needs
scikit-learn).

Importing this package imports torch; the CLI imports it only when ``demo`` runs.
"""

from __future__ import annotations

from bnwatch.demo.run import (
    AlertEvent,
    CleanRecalibration,
    DemoResult,
    DemoStoreError,
    PhaseResult,
    RecalibrationEvent,
    WindowResult,
    run_demo,
)

__all__ = [
    "AlertEvent",
    "CleanRecalibration",
    "DemoResult",
    "DemoStoreError",
    "PhaseResult",
    "RecalibrationEvent",
    "WindowResult",
    "run_demo",
]
