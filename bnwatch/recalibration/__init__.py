"""Recalibration: re-estimate BatchNorm statistics, judge, apply, roll back.

The package is ``recalibration`` (not ``recalibrate``, as DESIGN §1 sketches it): a subpackage
named like the public function ``bnwatch.recalibrate`` would replace it as an attribute of
``bnwatch`` once imported.
"""

from bnwatch.recalibration.core import (
    METHODS,
    FrozenLayersError,
    NotEnoughDataError,
    recalibrate,
)
from bnwatch.recalibration.distributed import RankFailedError
from bnwatch.recalibration.result import LayerJudgement, LayerUpdate, RecalibrationResult

__all__ = [
    "METHODS",
    "FrozenLayersError",
    "LayerJudgement",
    "LayerUpdate",
    "NotEnoughDataError",
    "RankFailedError",
    "RecalibrationResult",
    "recalibrate",
]
