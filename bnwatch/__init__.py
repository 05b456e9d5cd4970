"""bnwatch: watch the BatchNorm layers of PyTorch models in production.

``import bnwatch`` is cheap and does not import torch; ``bnwatch.watch``,
``bnwatch.profile`` and ``bnwatch.report_recalibration`` load the capture machinery on first
use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from bnwatch.drift import DriftConfig
from bnwatch.errors import (
    BnwatchError,
    ConfigError,
    NoBatchNormError,
    ReferenceMismatchError,
    ShapeError,
)
from bnwatch.schema import SCHEMA_VERSION, LayerReport, Profile, WindowRecord
from bnwatch.stats import ChannelMoments, LayerStats

__version__ = "0.1.0.dev0"

if TYPE_CHECKING:
    from bnwatch.alerts import AlertConfig
    from bnwatch.api import load_profile, profile, report_recalibration, watch
    from bnwatch.capture import Monitor
    from bnwatch.recalibration import recalibrate

_LAZY = {
    "watch": "bnwatch.api",
    "profile": "bnwatch.api",
    "load_profile": "bnwatch.api",
    "report_recalibration": "bnwatch.api",
    "recalibrate": "bnwatch.recalibration",
    "Monitor": "bnwatch.capture",
    "AlertConfig": "bnwatch.alerts",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'bnwatch' has no attribute {name!r}")


__all__ = [
    "SCHEMA_VERSION",
    "AlertConfig",
    "BnwatchError",
    "ChannelMoments",
    "ConfigError",
    "DriftConfig",
    "LayerReport",
    "LayerStats",
    "Monitor",
    "NoBatchNormError",
    "Profile",
    "ReferenceMismatchError",
    "ShapeError",
    "WindowRecord",
    "__version__",
    "load_profile",
    "profile",
    "recalibrate",
    "report_recalibration",
    "watch",
]
