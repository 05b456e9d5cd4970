"""How well, and with how few samples, does bnwatch detect corrupted inputs -- against BBSD and
Evidently, on the same samples?

Run ``python benchmarks/detection.py`` (about 10 minutes on one core); ``--smoke`` runs in
seconds, ``--json PATH`` keeps every number, ``--help`` lists the knobs.  Method and the
tables of a full run: ``docs/detection.md``.

What is measured
    A :class:`~bnwatch.demo.digits.DigitsCNN` (four BatchNorm layers) is trained in the run
    on half of scikit-learn's 1,797 digits with ±1-pixel shift augmentation
    (:func:`bnwatch.demo.digits.train`, 30 epochs: the recalibration benchmark's model), so
    its running statistics differ from clean data (the train/inference gap of DESIGN §3).
    The other half (899 digits) is held out.  Each *partition* splits the held-out digits at
    random into 449 *reference* images and a *test pool* of 450; all three detectors take
    their reference from the same reference images:

    * **bnwatch** -- ``bnwatch.profile`` of the reference images is the drift baseline of
      ``bnwatch.watch(model, reference=profile)``; each window is one forward pass of its
      images, then ``mon.flush()``; the window counts as detected when any layer's report
      says ``drifted`` (the model-level decision of :func:`bnwatch.drift.decide`: false-alarm
      rate ``alpha`` = 1e-3 per window across channels and layers).  The library's public
      path, default :class:`bnwatch.DriftConfig`.
    * **BBSD** (black-box shift detection, Lipton et al. 2018; the best detector in Rabanser
      et al. 2019, "Failing Loudly") -- per class, ``scipy.stats.ks_2samp`` of the window's
      softmax outputs against the reference images', Bonferroni over the 10 classes at 0.05.
      The softmax outputs come from the very forward pass bnwatch watched.
    * **Evidently** 0.7 ``DataDriftPreset`` on the 64 raw pixels (float columns, hence
      numerical): Evidently's default per-column test (K-S for more than 5 distinct values
      in reference + window, chi-square for 3-5, a two-proportion Z-test for at most 2:
      always-0 background pixels get the Z-test, whose p-value is 1 while the window keeps
      them 0) at its default 0.05, and its default dataset-drift rule (at least half the
      columns drifted).  ``Report.run`` takes 4-5 s a window (it renders widgets), so the
      decision is computed from the same rule with Evidently's own tests and checked against
      ``Report.run`` on a sample of windows in the run (``--evidently-checks``; the output
      says how many agreed).

    A window is ``n`` = 4, 8, 16, 32, 64, 128 or 256 distinct images of a test pool (a simple random
    sample, without replacement).  A corrupted window applies one of the 12 corruptions of
    ``benchmarks/recalibration.py`` at one of 5 severities to its images (the noise is drawn
    per window).  Severities 1-3 are the recalibration benchmark's (chosen there to cost about
    5, 20 and 40 points of accuracy); 4 and 5 continue each progression (:data:`STRONGER`).

    Clean windows (``--clean-windows`` per ``n``, default 400) measure the false-alarm rate,
    with a Clopper-Pearson 95 % interval.  Each has a partition of its own, so the windows
    are independent trials and reference and window are exchangeable under the null: the
    rate is not conditional on one lucky or unlucky test pool (with one fixed pool and
    windows drawn with replacement, BBSD's false alarms grew from 6 % at n = 16 to 14 % at
    n = 256: the pool's own difference from the reference, resampled).  Corrupted windows
    (``--windows`` per (corruption, severity, n) cell, default 50) cycle through
    ``--partitions`` (default 10) fixed partitions.
    Everything is seeded from ``--seed``: a run is reproducible.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import stats as scipy_stats
from torch import Tensor

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: ``benchmarks`` is not an installed package
    sys.path.insert(0, str(ROOT))

import bnwatch  # noqa: E402
from benchmarks import recalibration  # noqa: E402
from bnwatch.demo import digits  # noqa: E402

DETECTORS = ("bnwatch", "BBSD", "Evidently")
SIZES = (4, 8, 16, 32, 64, 128, 256)
SEVERITIES = (1, 2, 3, 4, 5)
DEFAULT_WINDOWS = 50
"""Corrupted windows per (corruption, severity, n) cell."""
DEFAULT_CLEAN_WINDOWS = 400
"""Clean windows per n: 1 % is resolvable (Clopper-Pearson upper bound 2.5 % at 4/400)."""
DEFAULT_EVIDENTLY_CHECKS = 12
DEFAULT_EPOCHS = 30
SPLIT = (0.5, 0.0)
"""Train share of the 1,797 digits (as in the recalibration benchmark); the other half is held
out and split at random into reference images and a test pool."""
DEFAULT_PARTITIONS = 10
"""Reference/test partitions the corrupted windows cycle through."""
BBSD_ALPHA = 0.05
TARGET_FALSE_ALARMS = 0.01
TARGET_DETECTION = 0.90
TARGET_N = 64
TARGET_SEVERITY = 3

STRONGER: dict[str, tuple[float, float]] = {
    "gaussian_noise": (0.36, 0.45),
    "shot_noise": (1.5, 1.0),
    "impulse_noise": (0.27, 0.37),
    "speckle_noise": (1.4, 2.0),
    "blur": (0.85, 1.0),
    "contrast": (0.5, 0.4),
    "brightness": (0.24, 0.3),
    "gamma": (7.0, 10.0),
    "rotate": (40.0, 50.0),
    "translate": (2.5, 3.0),
    "shear": (0.6, 0.75),
    "zoom": (0.7, 0.6),
}
"""Severities 4 and 5: each recalibration-benchmark progression (severities 1-3) continued."""

SMOKE_CORRUPTIONS = ("gaussian_noise", "contrast", "rotate")
SMOKE_SIZES = (16, 64)
SMOKE_SEVERITIES = (1, 3, 5)


@dataclass(frozen=True)
class Corruption:
    """A corruption of ``benchmarks/recalibration.py`` with five severities."""

    name: str
    family: str
    apply: recalibration.Corrupt
    severities: tuple[float, ...]


def corruptions() -> tuple[Corruption, ...]:
    """The recalibration benchmark's 12 corruptions, severities 1-3 as there, 4-5 from
    :data:`STRONGER`."""
    return tuple(
        Corruption(c.name, c.family, c.apply, (*c.severities, *STRONGER[c.name]))
        for c in recalibration.CORRUPTIONS
    )


# -- the detectors -------------------------------------------------------------------------------
def bbsd_ks(reference: np.ndarray, window: np.ndarray, alpha: float = BBSD_ALPHA) -> bool:
    """BBSD with univariate K-S tests: one two-sample K-S test per softmax output (class),
    Bonferroni over the classes (Rabanser et al. 2019).  ``ks_2samp`` along ``axis=0`` gives
    the same p-values as one call per class, three times faster."""
    p = np.asarray(scipy_stats.ks_2samp(reference, window, axis=0).pvalue)
    return bool(p.min() <= alpha / reference.shape[1])


def pixels(x: Tensor) -> np.ndarray:
    """Images ``[N, 1, 8, 8]`` as float64 rows of 64 pixels."""
    return x.reshape(x.shape[0], -1).double().numpy()


def pixel_frame(rows: np.ndarray) -> Any:
    """Pixel rows as a DataFrame with one float column per pixel (numerical for Evidently)."""
    import pandas as pd

    return pd.DataFrame(rows, columns=[f"px{i:02d}" for i in range(rows.shape[1])])


def distinct_per_column(a: np.ndarray) -> np.ndarray:
    """Number of distinct values in each column (``pandas.Series.nunique`` without NaN)."""
    s = np.sort(a, axis=0)
    return np.asarray(1 + (np.diff(s, axis=0) != 0).sum(axis=0))


class EvidentlyDrift:
    """Evidently's ``DataDriftPreset`` dataset-drift decision on numerical columns, fast.

    Evidently (``_get_default_stattest``) tests a numerical column of a reference of at most
    1,000 rows with K-S when reference and window together hold more than 5 distinct values,
    with chi-square for 3-5 and with a two-proportion Z-test for at most 2, each at its
    default threshold (0.05); the dataset drifts when at least ``drift_share`` (0.5) of the
    columns drift (``get_dataset_drift``).  Here the K-S columns are tested in one vectorized
    ``scipy.stats.ks_2samp`` call (Evidently: ``p <= 0.05``); the others go through
    Evidently's own registered tests.  :func:`evidently_report` is the reference this is
    checked against.
    """

    def __init__(self, reference: np.ndarray, drift_share: float = 0.5) -> None:
        from evidently.legacy.calculations.stattests import chi_stat_test, ks_stat_test, z_stat_test
        from evidently.legacy.core import ColumnType

        if reference.shape[0] > 1000:
            raise ValueError("Evidently uses other default tests above 1,000 reference rows")
        self.reference = reference
        self.frame = pixel_frame(reference)
        self.drift_share = drift_share
        self._ks_threshold = float(ks_stat_test.default_threshold)
        self._chi, self._z = chi_stat_test, z_stat_test
        self._numerical = ColumnType.Numerical

    def drifted_columns(self, window: np.ndarray) -> int:
        distinct = distinct_per_column(np.concatenate([self.reference, window]))
        ks = distinct > 5
        count = 0
        if ks.any():
            p = np.asarray(
                scipy_stats.ks_2samp(self.reference[:, ks], window[:, ks], axis=0).pvalue
            )
            count += int((p <= self._ks_threshold).sum())
        if not ks.all():
            current = pixel_frame(window)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                for j in np.flatnonzero(~ks):
                    test = self._chi if distinct[j] > 2 else self._z
                    name = self.frame.columns[j]
                    result = test(self.frame[name], current[name], self._numerical, None)
                    count += bool(result.drifted)
        return count

    def __call__(self, window: np.ndarray) -> bool:
        return bool(self.drifted_columns(window) / self.reference.shape[1] >= self.drift_share)


def evidently_report(reference: np.ndarray, window: np.ndarray) -> tuple[bool, int]:
    """The same decision through ``Report([DataDriftPreset()]).run`` (slow: it renders).

    Returns (dataset drift, drifted columns) from ``DriftedColumnsCount`` and the preset's
    default rule (share of drifted columns ``>= 0.5``).
    """
    from evidently import DataDefinition, Dataset, Report
    from evidently.presets import DataDriftPreset

    ref, cur = pixel_frame(reference), pixel_frame(window)
    definition = DataDefinition(numerical_columns=list(ref.columns))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        snapshot = Report([DataDriftPreset()]).run(
            current_data=Dataset.from_pandas(cur, data_definition=definition),
            reference_data=Dataset.from_pandas(ref, data_definition=definition),
        )
    for metric in snapshot.dict()["metrics"]:
        if metric["metric_name"].startswith("DriftedColumnsCount"):
            value = metric["value"]
            return float(value["share"]) >= 0.5, int(value["count"])
    raise RuntimeError("Evidently's report has no DriftedColumnsCount")


class Detectors:
    """The three detectors, all with their reference from the same reference images.

    bnwatch watches its own copy of the model (two monitors on one model would both measure
    every forward); BBSD's softmax outputs come from the very forward pass bnwatch watched.
    """

    def __init__(self, model: torch.nn.Module, reference: Tensor, batch_size: int = 64) -> None:
        self.model = copy.deepcopy(model).eval()
        with torch.inference_mode():  # before watching: the monitor must see windows only
            self.reference_softmax = torch.softmax(self.model(reference), dim=1).double().numpy()
        self.profile = bnwatch.profile(self.model, reference.split(batch_size), name="digits-cnn")
        self.monitor = bnwatch.watch(
            self.model,
            name="digits-cnn",
            reference=self.profile,
            window_seconds=None,
            overhead_budget=None,
        )
        self.reference_pixels = pixels(reference)
        self.evidently = EvidentlyDrift(self.reference_pixels)

    @torch.inference_mode()
    def run(self, x: Tensor) -> dict[str, bool]:
        """Every detector's decision on one window of images (one forward pass)."""
        probs = torch.softmax(self.model(x), dim=1).double().numpy()
        reports = self.monitor.flush()
        if any(r.n_samples != len(x) for r in reports.values()):
            raise RuntimeError("the monitor's window is not the window that was run")
        return {
            "bnwatch": any(r.drifted for r in reports.values()),
            "BBSD": bbsd_ks(self.reference_softmax, probs),
            "Evidently": self.evidently(pixels(x)),
        }

    def close(self) -> None:
        self.monitor.close()


# -- sampling ------------------------------------------------------------------------------------
def generator(seed: int, *labels: object) -> torch.Generator:
    return torch.Generator().manual_seed(recalibration._seed_for(seed, *labels))


def partition(held_out: Tensor, g: torch.Generator) -> tuple[Tensor, Tensor]:
    """A random split of the held-out images into reference images and a test pool."""
    order = torch.randperm(len(held_out), generator=g)
    k = len(held_out) // 2
    return held_out[order[:k]], held_out[order[k:]]


def draw(pool: Tensor, n: int, g: torch.Generator) -> Tensor:
    """``n`` distinct images of ``pool`` (a simple random sample, without replacement)."""
    return pool[torch.randperm(len(pool), generator=g)[:n]]


def clopper_pearson(k: int, n: int) -> tuple[float, float]:
    ci = scipy_stats.binomtest(k, n).proportion_ci(0.95, method="exact")
    return float(ci.low), float(ci.high)


# -- tables --------------------------------------------------------------------------------------
def _pct(value: float | None, width: int = 7) -> str:
    return ("-" if value is None else f"{100 * value:.1f}%").rjust(width)


def mean_rate(cells: Sequence[dict[str, Any]], detector: str) -> float | None:
    rates = [c["rates"][detector] for c in cells]
    return float(np.mean(rates)) if rates else None


def select(
    cells: Sequence[dict[str, Any]],
    *,
    n: int | None = None,
    severity: int | None = None,
    min_severity: int | None = None,
    corruption: str | None = None,
) -> list[dict[str, Any]]:
    return [
        c
        for c in cells
        if (n is None or c["n"] == n)
        and (severity is None or c["severity"] == severity)
        and (min_severity is None or c["severity"] >= min_severity)
        and (corruption is None or c["corruption"] == corruption)
    ]


def smallest_n(
    cells: Sequence[dict[str, Any]], detector: str, sizes: Sequence[int], **where: Any
) -> int | None:
    """The smallest window size whose mean detection rate over the selected cells is at least
    :data:`TARGET_DETECTION`."""
    for n in sizes:
        rate = mean_rate(select(cells, n=n, **where), detector)
        if rate is not None and rate >= TARGET_DETECTION:
            return n
    return None


def format_false_alarms(clean: Sequence[dict[str, Any]]) -> str:
    head = f"{'n':>5} {'windows':>8} |" + "".join(f"{d:>26}" for d in DETECTORS)
    lines = [head, "-" * len(head)]
    for row in clean:
        line = f"{row['n']:>5} {row['windows']:>8} |"
        for d in DETECTORS:
            lo, hi = row["ci95"][d]
            cell = f"{_pct(row['rates'][d], 6)} [{100 * lo:.1f}, {100 * hi:.1f}]"
            line += cell.rjust(26)
        lines.append(line)
    return "\n".join(lines)


def format_by_size(
    cells: Sequence[dict[str, Any]], sizes: Sequence[int], severities: Sequence[int]
) -> str:
    head = f"{'detector':<10}{'sev':>4} |" + "".join(f"{'n=' + str(n):>8}" for n in sizes)
    lines = [head, "-" * len(head)]
    for d in DETECTORS:
        for s in severities:
            line = f"{d:<10}{s:>4} |"
            line += "".join(_pct(mean_rate(select(cells, n=n, severity=s), d), 8) for n in sizes)
            lines.append(line)
        line = f"{d:<10}{'>=3':>4} |"
        line += "".join(
            _pct(mean_rate(select(cells, n=n, min_severity=TARGET_SEVERITY), d), 8) for n in sizes
        )
        lines.append(line)
    return "\n".join(lines)


def format_per_corruption(
    cells: Sequence[dict[str, Any]], accuracy: dict[str, Any], n: int, severity: int
) -> str:
    head = f"{'corruption':<15}{'family':<12}{'param':>7}{'acc lost':>9} |" + "".join(
        f"{d:>10}" for d in DETECTORS
    )
    lines = [head, "-" * len(head)]
    for c in select(cells, n=n, severity=severity):
        acc = accuracy[c["corruption"]][str(c["severity"])]
        line = f"{c['corruption']:<15}{c['family']:<12}{c['param']:>7g}{_pct(acc['lost'], 9)} |"
        line += "".join(_pct(c["rates"][d], 10) for d in DETECTORS)
        lines.append(line)
    return "\n".join(lines)


def format_smallest(smallest: dict[str, dict[str, int | None]], labels: Sequence[str]) -> str:
    head = f"{'detector':<10} |" + "".join(f"{label:>10}" for label in labels)
    lines = [head, "-" * len(head)]
    for d in DETECTORS:
        line = f"{d:<10} |" + "".join(
            f"{'-' if smallest[d][label] is None else smallest[d][label]:>10}" for label in labels
        )
        lines.append(line)
    return "\n".join(lines)


# -- command line --------------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Detection rate and false alarms of bnwatch's drift decision, BBSD (K-S on "
        "softmax outputs) and Evidently's DataDriftPreset on corrupted digits, on the same "
        "windows.",
        epilog="Methodology: see the module docstring of benchmarks/detection.py and "
        "docs/detection.md.",
    )
    p.add_argument("--seed", type=int, default=0, help="split, weights, windows, corruptions")
    p.add_argument("--epochs", type=int, default=None, help=f"default {DEFAULT_EPOCHS}")
    p.add_argument(
        "--windows",
        type=int,
        default=None,
        help=f"corrupted windows per (corruption, severity, n) cell (default {DEFAULT_WINDOWS})",
    )
    p.add_argument(
        "--clean-windows",
        type=int,
        default=None,
        help=f"clean windows per n, for the false-alarm rate (default {DEFAULT_CLEAN_WINDOWS})",
    )
    p.add_argument(
        "--sizes", type=int, nargs="+", default=None, help=f"window sizes (default {SIZES})"
    )
    p.add_argument(
        "--corruptions",
        nargs="+",
        default=None,
        choices=[c.name for c in recalibration.CORRUPTIONS],
        help="corruptions to run (default: all 12)",
    )
    p.add_argument(
        "--evidently-checks",
        type=int,
        default=None,
        help="windows on which the fast Evidently decision is compared with Report.run "
        f"(4-5 s each; default {DEFAULT_EVIDENTLY_CHECKS})",
    )
    p.add_argument(
        "--partitions",
        type=int,
        default=DEFAULT_PARTITIONS,
        help="reference/test partitions the corrupted windows cycle through "
        f"(default {DEFAULT_PARTITIONS})",
    )
    p.add_argument(
        "--threads", type=int, default=1, help="torch intra-op threads (default 1, see docs)"
    )
    p.add_argument(
        "--smoke",
        action="store_true",
        help="tiny run for tests: 3 epochs, 3 corruptions, severities 1/3/5, n 16 and 64, "
        "6 windows a cell, 40 clean windows per n, no Report.run check",
    )
    p.add_argument("--json", type=Path, default=None, metavar="PATH", help="write results here")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    args = p.parse_args(argv)
    args.severities = SEVERITIES
    if args.smoke:
        args.epochs = 3 if args.epochs is None else args.epochs
        args.windows = 6 if args.windows is None else args.windows
        args.clean_windows = 40 if args.clean_windows is None else args.clean_windows
        args.sizes = args.sizes or list(SMOKE_SIZES)
        args.corruptions = args.corruptions or list(SMOKE_CORRUPTIONS)
        args.evidently_checks = 0 if args.evidently_checks is None else args.evidently_checks
        args.severities = SMOKE_SEVERITIES
    args.epochs = DEFAULT_EPOCHS if args.epochs is None else args.epochs
    args.windows = DEFAULT_WINDOWS if args.windows is None else args.windows
    args.clean_windows = DEFAULT_CLEAN_WINDOWS if args.clean_windows is None else args.clean_windows
    args.sizes = sorted(set(args.sizes or SIZES))
    if args.evidently_checks is None:
        args.evidently_checks = DEFAULT_EVIDENTLY_CHECKS
    for flag, value, low in (
        ("--epochs", args.epochs, 1),
        ("--windows", args.windows, 1),
        ("--clean-windows", args.clean_windows, 1),
        ("--threads", args.threads, 1),
        ("--partitions", args.partitions, 1),
        ("--evidently-checks", args.evidently_checks, 0),
        ("--sizes", min(args.sizes), 2),
    ):
        if value < low:
            p.error(f"{flag} must be >= {low}, got {value}")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the benchmark, print the tables, optionally write JSON; returns the results."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    load_before = os.getloadavg()

    def progress(message: str) -> None:
        if not args.quiet:
            print(f"[{time.perf_counter() - started:6.1f}s] {message}", file=sys.stderr, flush=True)

    splits = digits.load_splits(args.seed, SPLIT)
    model = digits.make_model(args.seed)
    training = digits.train(
        model, splits.train_x, splits.train_y, epochs=args.epochs, seed=args.seed
    )
    held_x, held_y = splits.prod_x, splits.prod_y
    pool_size = len(held_x) - len(held_x) // 2
    if args.sizes[-1] > pool_size:
        raise SystemExit(f"--sizes: a window holds at most {pool_size} distinct test images")
    clean_accuracy = digits.accuracy(model, held_x, held_y)
    progress(
        f"trained {args.epochs} epochs in {training.seconds:.1f}s; clean held-out accuracy "
        f"{100 * clean_accuracy:.1f}%"
    )
    selected = [c for c in corruptions() if args.corruptions is None or c.name in args.corruptions]
    checks: list[tuple[str, np.ndarray, np.ndarray]] = []
    check_every = max(1, (len(selected) * len(args.severities) * len(args.sizes)) // 8)

    # clean windows: a fresh reference/test partition for every window
    clean_rows: list[dict[str, Any]] = []
    for n in args.sizes:
        hits = dict.fromkeys(DETECTORS, 0)
        for w in range(args.clean_windows):
            g = generator(args.seed, "clean", n, w)
            reference, pool = partition(held_x, g)
            detectors = Detectors(model, reference)
            try:
                x = draw(pool, n, g)
                for d, hit in detectors.run(x).items():
                    hits[d] += hit
            finally:
                detectors.close()
            if w == 0 and len(checks) < args.evidently_checks // 2:
                checks.append((f"clean n={n}", detectors.reference_pixels, pixels(x)))
        clean_rows.append(
            {
                "n": n,
                "windows": args.clean_windows,
                "alarms": hits,
                "rates": {d: hits[d] / args.clean_windows for d in DETECTORS},
                "ci95": {d: clopper_pearson(hits[d], args.clean_windows) for d in DETECTORS},
            }
        )
        rates = ", ".join(f"{d} {_pct(hits[d] / args.clean_windows, 0)}" for d in DETECTORS)
        progress(f"clean n={n}: false alarms {rates}")

    # corrupted windows: window w of every cell uses partition w mod --partitions
    partitions = [
        partition(held_x, generator(args.seed, "partition", r)) for r in range(args.partitions)
    ]
    accuracy: dict[str, dict[str, dict[str, float]]] = {}
    cells: list[dict[str, Any]] = []
    pool_detectors = [Detectors(model, reference) for reference, _ in partitions]
    try:
        for corruption in selected:
            accuracy[corruption.name] = {}
            for severity in args.severities:
                param = corruption.severities[severity - 1]
                g = generator(args.seed, corruption.name, severity, "accuracy")
                acc = digits.accuracy(model, corruption.apply(held_x, param, g), held_y)
                accuracy[corruption.name][str(severity)] = {
                    "param": param,
                    "accuracy": acc,
                    "lost": clean_accuracy - acc,
                }
                for n in args.sizes:
                    hits = dict.fromkeys(DETECTORS, 0)
                    for w in range(args.windows):
                        r = w % args.partitions
                        detectors = pool_detectors[r]
                        g = generator(args.seed, corruption.name, severity, n, w)
                        x = corruption.apply(draw(partitions[r][1], n, g), param, g)
                        for d, hit in detectors.run(x).items():
                            hits[d] += hit
                        if w == 0 and len(cells) % check_every == 0:
                            label = f"{corruption.name} sev {severity} n={n}"
                            checks.append((label, detectors.reference_pixels, pixels(x)))
                    cells.append(
                        {
                            "corruption": corruption.name,
                            "family": corruption.family,
                            "severity": severity,
                            "param": param,
                            "n": n,
                            "windows": args.windows,
                            "detected": hits,
                            "rates": {d: hits[d] / args.windows for d in DETECTORS},
                        }
                    )
                here = select(cells, corruption=corruption.name, severity=severity)
                rates = ", ".join(f"{d} {_pct(mean_rate(here, d), 0)}" for d in DETECTORS)
                progress(f"{corruption.name} severity {severity}: detected (mean over n) {rates}")
    finally:
        for detectors in pool_detectors:
            detectors.close()

    agreement: list[dict[str, Any]] = []
    for label, reference_pixels, window_pixels in checks[: args.evidently_checks]:
        fast = EvidentlyDrift(reference_pixels)
        report_drift, report_columns = evidently_report(reference_pixels, window_pixels)
        agreement.append(
            {
                "window": label,
                "fast_drifted_columns": fast.drifted_columns(window_pixels),
                "report_drifted_columns": report_columns,
                "fast_drift": fast(window_pixels),
                "report_drift": report_drift,
            }
        )
    agreed = sum(
        a["fast_drifted_columns"] == a["report_drifted_columns"]
        and a["fast_drift"] == a["report_drift"]
        for a in agreement
    )
    if agreement:
        progress(f"Evidently fast path = Report.run on {agreed}/{len(agreement)} windows")

    sizes = list(args.sizes)
    severity_labels = [f"sev {s}" for s in args.severities if s >= TARGET_SEVERITY] + ["sev >=3"]
    smallest: dict[str, dict[str, int | None]] = {}
    for d in DETECTORS:
        smallest[d] = {
            f"sev {s}": smallest_n(cells, d, sizes, severity=s)
            for s in args.severities
            if s >= TARGET_SEVERITY
        }
        smallest[d]["sev >=3"] = smallest_n(cells, d, sizes, min_severity=TARGET_SEVERITY)
    worst_false_alarm = {d: max(r["rates"][d] for r in clean_rows) for d in DETECTORS}
    at_target = {
        d: mean_rate(select(cells, n=TARGET_N, min_severity=TARGET_SEVERITY), d) for d in DETECTORS
    }
    # the issue's comparison is at severity 3 ("BBSD-KS reaches 90 % average detection at
    # severity 3 with 32 samples"); the pooled severities >= 3 are printed beside it
    fewer = f"sev {TARGET_SEVERITY}"
    ours = smallest["bnwatch"][fewer]
    baselines = [smallest[d][fewer] for d in DETECTORS[1:]]
    ours_pooled = smallest["bnwatch"]["sev >=3"]
    baselines_pooled = [smallest[d]["sev >=3"] for d in DETECTORS[1:]]
    targets = {
        "false_alarms_at_most_1pct": worst_false_alarm["bnwatch"] <= TARGET_FALSE_ALARMS,
        "detects_90pct_at_sev3_n64": at_target["bnwatch"] is not None
        and at_target["bnwatch"] >= TARGET_DETECTION,
        "fewer_samples_than_both_baselines": ours is not None
        and all(b is None or ours < b for b in baselines),
    }
    total = time.perf_counter() - started
    load_after = os.getloadavg()

    def verdict(ok: bool) -> str:
        return "ok" if ok else "MISS"

    print(
        f"DigitsCNN ({sum(p.numel() for p in model.parameters()):,} parameters, 4 BN layers), "
        f"seed {args.seed}; trained {args.epochs} epochs with ±1-pixel shifts on "
        f"{len(splits.train_y)} digits ({training.seconds:.1f}s)"
    )
    print(
        f"{len(held_y)} held-out digits (clean accuracy {100 * clean_accuracy:.1f}%), split at "
        f"random into {len(held_y) // 2} reference images (bnwatch profile, BBSD softmax, "
        f"Evidently pixels) and a test pool of {len(held_y) - len(held_y) // 2}"
    )
    print(
        f"windows: n distinct images of the test pool; {args.clean_windows} clean windows per n, "
        f"each with its own partition; {args.windows} windows per corrupted cell, cycling "
        f"through {args.partitions} partitions"
    )
    print(f"{len(selected)} corruptions x {len(args.severities)} severities x {len(sizes)} sizes")
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); bnwatch "
        f"{bnwatch.__version__} from {Path(bnwatch.__file__).parent}"
    )
    print()
    print("false alarms on clean windows (Clopper-Pearson 95% interval)")
    print(format_false_alarms(clean_rows))
    print()
    print("detection rate by window size and severity (mean over corruptions)")
    print(format_by_size(cells, sizes, args.severities))
    print()
    print("accuracy lost by severity (mean over corruptions, all held-out images)")
    print(
        "  "
        + "  ".join(
            f"sev {s}: {_pct(float(np.mean([a[str(s)]['lost'] for a in accuracy.values()])), 0)}"
            for s in args.severities
        )
    )
    if TARGET_N in sizes and TARGET_SEVERITY in args.severities:
        print()
        print(f"per corruption at n={TARGET_N}, severity {TARGET_SEVERITY}")
        print(format_per_corruption(cells, accuracy, TARGET_N, TARGET_SEVERITY))
    print()
    print(
        f"smallest n with mean detection >= {100 * TARGET_DETECTION:.0f}% "
        f"('-': none up to n={sizes[-1]})"
    )
    print(format_smallest(smallest, severity_labels))
    print()
    print("targets (bnwatch)")
    print(
        f"  false alarms <= {100 * TARGET_FALSE_ALARMS:.0f}% at every n: worst "
        f"{_pct(worst_false_alarm['bnwatch'], 0)}  {verdict(targets['false_alarms_at_most_1pct'])}"
    )
    print(
        f"  detection >= {100 * TARGET_DETECTION:.0f}% at severity >= {TARGET_SEVERITY}, "
        f"n={TARGET_N}: {_pct(at_target['bnwatch'], 0)}  "
        f"{verdict(targets['detects_90pct_at_sev3_n64'])}"
    )
    print(
        f"  {100 * TARGET_DETECTION:.0f}% at severity {TARGET_SEVERITY} with fewer samples than "
        f"both baselines: n={ours} vs BBSD {baselines[0]}, Evidently {baselines[1]}  "
        f"{verdict(targets['fewer_samples_than_both_baselines'])}"
    )
    print(
        f"  (severity >= {TARGET_SEVERITY} pooled: n={ours_pooled} vs BBSD "
        f"{baselines_pooled[0]}, Evidently {baselines_pooled[1]})"
    )
    if agreement:
        print(
            f"Evidently: the fast decision equals Report([DataDriftPreset()]).run on "
            f"{agreed}/{len(agreement)} checked windows (decision and drifted-column count)"
        )
    print(
        f"total runtime {total:.1f} s; 1-min load average {load_before[0]:.2f} before, "
        f"{load_after[0]:.2f} after, on {os.cpu_count()} CPUs"
    )

    results: dict[str, Any] = {
        "meta": {
            "model": "DigitsCNN (bnwatch.demo.digits), trained in the run",
            "seed": args.seed,
            "epochs": args.epochs,
            "train_images": len(splits.train_y),
            "held_out_images": len(held_y),
            "reference_images": len(held_y) // 2,
            "test_pool_images": len(held_y) - len(held_y) // 2,
            "partitions": args.partitions,
            "clean_accuracy": clean_accuracy,
            "train_seconds": training.seconds,
            "sizes": sizes,
            "severities": list(args.severities),
            "corruptions": [
                {"name": c.name, "family": c.family, "params": list(c.severities)} for c in selected
            ],
            "windows_per_cell": args.windows,
            "clean_windows_per_n": args.clean_windows,
            "detectors": list(DETECTORS),
            "bbsd_alpha": BBSD_ALPHA,
            "bnwatch_config": {
                k: getattr(bnwatch.DriftConfig(), k)
                for k in ("alpha", "channel_fdr", "min_shift", "min_log_ratio", "min_samples")
            },
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(),
            "bnwatch": bnwatch.__version__,
            "smoke": args.smoke,
            "total_seconds": total,
            "load_average_1m_before_after": [load_before[0], load_after[0]],
        },
        "clean": clean_rows,
        "cells": cells,
        "accuracy": accuracy,
        "smallest_n": smallest,
        "at_target": at_target,
        "targets": targets,
        "evidently_checks": agreement,
    }
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")
        print(f"results written to {args.json}")
    return results


if __name__ == "__main__":
    main()
