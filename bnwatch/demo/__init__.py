"""bnwatch's demo: a small BatchNorm CNN on scikit-learn digits, watched through clean,
corrupted and misconfigured production traffic (``bnwatch demo``; needs scikit-learn).

Importing this package imports torch; the CLI imports it only when ``demo`` runs.
"""

from __future__ import annotations

from bnwatch.demo.run import DemoResult, PhaseResult, run_demo

__all__ = ["DemoResult", "PhaseResult", "run_demo"]
