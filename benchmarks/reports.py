"""How long does an Evidently drift report of a wide layer take, and how big is it?

Run ``python benchmarks/reports.py`` (about 2.5 minutes on a 2-core machine, 90 s of it the
2,048-channel report with every channel plotted); ``--smoke`` runs in seconds,
``--channels 64 512`` picks the widths, ``--json PATH`` keeps every number.

What is measured
    :func:`bnwatch.reports.drift_report` builds the report of one layer: every channel tested
    with Evidently's ``ks`` stattest, Evidently's ``Report`` (a ``ValueDrift`` per channel,
    with its distribution plots) on the ``plots`` channels with the smallest p-values, then
    the HTML page and the JSON.  This benchmark runs that work -- from the two reservoirs to
    the HTML and JSON text, i.e. all but the store reads -- for layers of 64, 512 and 2,048
    channels (the widths of ResNet-50's BatchNorm layers run from 64 to 2,048), once with
    bnwatch's default ``plots`` (:data:`bnwatch.reports.PLOTS`) and once plotting every
    channel (``plots=None``, what every report did before).  Reported: seconds, the HTML's and
    the JSON's size, and their ratios (all / default).

Methodology
    * Reservoirs as a profile and a day of windows give them: 512 reference rows and 640
      production rows of per-sample channel means (float32, as stored), standard normal, with
      channels 0-2 moved by one standard deviation (so three channels drift).
    * Both settings must give the very same per-channel table (p-values, drifted channels);
      the run stops otherwise.  Timings are one run each (the all-channels report is minutes
      at 2,048 channels); Evidently is imported before the first timing.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from bnwatch import reports
from bnwatch.reports import PLOTS, DriftReport
from bnwatch.stats import Reservoir
from bnwatch.store.repository import StoredReservoir

DEFAULT_CHANNELS = (64, 512, 2048)
SMOKE_CHANNELS = (8, 24)
SMOKE_PLOTS = 4
REFERENCE_ROWS = 512
CURRENT_ROWS = 640
SHIFTED = (0, 1, 2)


def build(ref: np.ndarray, cur: np.ndarray, plots: int | None) -> tuple[DriftReport, str, str]:
    """The report of one layer from its two reservoirs, as ``drift_report`` builds it once it
    has read them from the store."""
    channels = ref.shape[1]

    def stored(rows: np.ndarray, kind: str) -> StoredReservoir:
        reservoir = Reservoir.from_rows(rows, seen=len(rows), capacity=len(rows))
        return StoredReservoir("bench", "1", f"bn{channels}", kind, reservoir)

    report = reports._report(
        stored(ref, "profile"),
        stored(cur, "production"),
        start=None,
        end=None,
        alpha=0.05,
        plots=plots,
    )
    return report, report.html(), report.json()


def measure(channels: int, plots: int | None, seed: int) -> tuple[dict[str, Any], pd.DataFrame]:
    rng = np.random.default_rng(seed)
    ref = rng.standard_normal((REFERENCE_ROWS, channels))
    cur = rng.standard_normal((CURRENT_ROWS, channels))
    cur[:, list(SHIFTED)] += 1.0
    start = time.perf_counter()
    report, html, text = build(ref, cur, plots)
    seconds = time.perf_counter() - start
    return {
        "channels": channels,
        "plots": "all" if plots is None else plots,
        "plotted": len(report.plotted_channels),
        "seconds": seconds,
        "html_bytes": len(html.encode()),
        "json_bytes": len(text.encode()),
        "drifted": report.drifted_channels,
    }, report.table


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--channels", type=int, nargs="+", default=None, help="layer widths (default: 64 512 2048)"
    )
    parser.add_argument("--smoke", action="store_true", help="tiny layers, seconds")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="write every number here")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    widths = args.channels or (SMOKE_CHANNELS if args.smoke else DEFAULT_CHANNELS)
    default = SMOKE_PLOTS if args.smoke else PLOTS
    measure(4, None, args.seed)  # import Evidently and warm it up, untimed
    rows: list[dict[str, Any]] = []
    for channels in widths:
        ours, ours_table = measure(channels, default, args.seed)
        every, every_table = measure(channels, None, args.seed)
        pd.testing.assert_frame_equal(ours_table, every_table)  # same test, fewer plots
        rows += [ours, every]
        if not args.quiet:
            print(
                f"{channels} channels: {ours['seconds']:.1f} s vs {every['seconds']:.1f} s",
                file=sys.stderr,
                flush=True,
            )
    head = (
        f"{'channels':>8} {'plots':>6} {'plotted':>8} {'seconds':>8} {'HTML MB':>8} "
        f"{'JSON MB':>8} {'drifted':>8}"
    )
    print(
        f"Evidently drift report of one layer ({REFERENCE_ROWS} reference rows, "
        f"{CURRENT_ROWS} production rows), reservoirs to HTML and JSON text"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        print(
            f"{r['channels']:>8} {r['plots']!s:>6} {r['plotted']:>8} {r['seconds']:>8.1f} "
            f"{r['html_bytes'] / 1e6:>8.1f} {r['json_bytes'] / 1e6:>8.2f} {len(r['drifted']):>8}"
        )
    print()
    print(f"ratios, plots=all / plots={default} (same p-values and drifted channels)")
    ratios = []
    for ours, every in zip(rows[::2], rows[1::2], strict=True):
        ratio = {
            "channels": ours["channels"],
            "seconds": every["seconds"] / ours["seconds"],
            "html_bytes": every["html_bytes"] / ours["html_bytes"],
        }
        ratios.append(ratio)
        print(
            f"{ratio['channels']:>8} channels: {ratio['seconds']:5.1f}x the time, "
            f"{ratio['html_bytes']:5.1f}x the HTML"
        )
    results = {
        "meta": {"default_plots": default, "seed": args.seed},
        "rows": rows,
        "ratios": ratios,
    }
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
