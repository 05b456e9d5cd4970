"""The ``bnwatch`` command line.

Each subcommand is one ``_add_<name>(subparsers)`` function that defines its arguments and
sets ``handler`` -- a function ``(args) -> exit code`` -- and one entry in
:data:`SUBCOMMANDS`.  Handlers import what they need (torch, scikit-learn, ...) when they
run, so ``bnwatch --help`` and ``import bnwatch.cli`` stay light.

Exit codes: 0 success, 1 the command failed (the message says why), 2 bad usage (argparse's
convention), 130 interrupted.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from bnwatch import __version__
from bnwatch.errors import BnwatchError

if TYPE_CHECKING:
    Subparsers = argparse._SubParsersAction[argparse.ArgumentParser]

Handler = Callable[[argparse.Namespace], int]

PROG = "bnwatch"
DEFAULT_DEMO_DIR = "bnwatch-demo"


def _non_negative_int(text: str) -> int:
    """argparse ``type`` for seeds: a clear message instead of a traceback."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value}")
    return value


def _directory(text: str) -> Path:
    """argparse ``type`` for output directories: may be missing (it is created), not a file."""
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is a file, not a directory")
    return path


# --------------------------------------------------------------------------------------
# bnwatch demo
# --------------------------------------------------------------------------------------
def _add_demo(subparsers: Subparsers) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="train a small CNN on scikit-learn digits and watch it drift",
        description=(
            "Train a small BatchNorm CNN on scikit-learn's digits, record a reference profile "
            "on validation data, then watch it through clean, corrupted (noise, contrast, "
            "blur) and misconfigured (a layer left in train() with batches of 2) production "
            "traffic, printing one table per phase.  Needs scikit-learn "
            "(pip install 'bnwatch[demo]')."
        ),
    )
    parser.add_argument(
        "--out",
        type=_directory,
        default=Path(DEFAULT_DEMO_DIR),
        metavar="DIR",
        help="directory for model.pt, profile.npz and reports.json; existing files are "
        f"replaced (default: ./{DEFAULT_DEMO_DIR})",
    )
    parser.add_argument(
        "--seed",
        type=_non_negative_int,
        default=0,
        metavar="N",
        help="seed of the data split, weights, augmentation and corruptions (default: 0)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="train for fewer epochs (a faster, slightly less accurate run)",
    )
    parser.set_defaults(handler=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    from bnwatch.demo import run_demo  # imports torch: only when the demo runs

    run_demo(args.out, seed=args.seed, quick=args.quick)
    return 0


# --------------------------------------------------------------------------------------
# The parser
# --------------------------------------------------------------------------------------
SUBCOMMANDS: tuple[Callable[[Subparsers], None], ...] = (_add_demo,)
"""Functions that each add one subcommand, in the order ``--help`` lists them."""


def build_parser() -> argparse.ArgumentParser:
    """The ``bnwatch`` argument parser with every subcommand of :data:`SUBCOMMANDS`."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=(
            "Watch the BatchNorm layers of PyTorch models in production: train/inference "
            "drift, small-batch mismatch, recalibration."
        ),
        epilog=f"Run '{PROG} COMMAND --help' for a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(
        title="commands", dest="command", metavar="COMMAND", required=True
    )
    for add in SUBCOMMANDS:
        add(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``bnwatch`` with ``argv`` (default ``sys.argv[1:]``); returns the exit code.

    Usage errors, ``--help`` and ``--version`` raise ``SystemExit`` as argparse does (code 2
    for errors, 0 otherwise).  Errors of the command itself -- bnwatch errors and ``OSError``
    such as an unwritable directory -- are printed as ``bnwatch COMMAND: error: ...`` without a
    traceback and give exit code 1.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Handler = args.handler
    try:
        return handler(args)
    except (BnwatchError, OSError) as err:
        print(f"{PROG} {args.command}: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG} {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
