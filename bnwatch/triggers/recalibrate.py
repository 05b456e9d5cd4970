"""The in-process recalibration action (torch): :class:`RecalibrateAction`.

Kept apart from :mod:`bnwatch.triggers.core` so that the trigger core -- and with it a bnwatch
service's webhook triggers -- imports without torch.
"""

from __future__ import annotations

import threading

import torch
from torch import nn

from bnwatch.capture import Monitor
from bnwatch.errors import ConfigError
from bnwatch.recalibration import recalibrate
from bnwatch.recalibration.core import METHODS
from bnwatch.triggers.core import MIN_KEPT_INPUTS, Outcome, TriggerEvent


class RecalibrateAction:
    """Recalibrate in process on the monitor's kept inputs (``watch(..., keep_inputs=N)``).

    ``holdout`` of the kept inputs judge the result and are not used to estimate it; the
    live model receives the new statistics only when they are better on them.  A forward
    running at that instant may see some layers updated and others not: apply from a quiet
    moment if that matters.
    """

    def __init__(
        self,
        model: nn.Module,
        monitor: Monitor,
        *,
        method: str = "precise",
        prior_strength: float = 16.0,
        holdout: float = 0.25,
        batch_size: int = 64,
        min_samples: int = MIN_KEPT_INPUTS,
    ) -> None:
        if not 0 < holdout < 1:
            raise ConfigError("holdout", holdout, "a fraction in (0, 1)")
        self.model = model
        self.monitor = monitor
        self.method = method
        self.prior_strength = prior_strength
        self.holdout = holdout
        self.batch_size = batch_size
        self.min_samples = min_samples
        self._lock = threading.Lock()

    def __call__(self, event: TriggerEvent) -> Outcome:
        kept = self.monitor.kept_inputs()
        if kept is None or kept.samples < self.min_samples:
            count = 0 if kept is None else kept.samples
            # failed, not rejected: nothing was judged, and a later alert may try again
            return Outcome(
                "failed", {"error": f"only {count} kept inputs (need {self.min_samples})"}
            )
        # a recalibration requested by hand says its method; a triggered one uses ours
        method = event.method if event.requested and event.method in METHODS else self.method
        g = torch.Generator().manual_seed(event.recalibration_id)
        fit, judge = kept.split(self.holdout, g)
        data = {
            "source": "kept production inputs (watch(keep_inputs=))",
            **kept.describe(),
            "fit": fit.samples,
            "held_out": judge.samples,
        }
        if not judge.samples:
            error = "one kept call: nothing left to judge the recalibration on"
            return Outcome("failed", {"error": error, "data": data})
        with self._lock:
            # the watched model is measured and judged on a copy, and the result bound to it:
            # applied (and adopted by the monitor: intended, not a "mutation") only if better
            result = recalibrate(
                self.model,
                fit.batches(self.batch_size),
                num_samples=fit.samples,
                method=method,  # type: ignore[arg-type]
                prior_strength=self.prior_strength,
                held_out=judge.batches(self.batch_size),
                apply="if_better",
                progress=False,
                forward=kept.forward,
            )
        return Outcome(result.status, {**result.summary(), "data": data}, result)
