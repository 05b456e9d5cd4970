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
import os
import sys
from collections.abc import Callable, Sequence
from datetime import timedelta
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
# bnwatch db
# --------------------------------------------------------------------------------------
DATABASE_ENV = "BNWATCH_DATABASE_URL"
DEFAULT_DATABASE_URL = "sqlite:///bnwatch.db"
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def duration(text: str) -> timedelta:
    """argparse ``type`` for durations: ``45s``, ``30m``, ``1h``, ``1d``, ``2w``."""
    value, unit = text[:-1], text[-1:].lower()
    try:
        number = float(value)
    except ValueError:
        number = -1.0
    if unit not in _UNITS or not number > 0:
        raise argparse.ArgumentTypeError(
            f"expected a duration like 45s, 30m, 1h, 1d or 2w, got {text!r}"
        )
    return timedelta(seconds=number * _UNITS[unit])


def _add_db_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--db",
        default=os.environ.get(DATABASE_ENV, DEFAULT_DATABASE_URL),
        metavar="URL",
        help=f"SQLAlchemy database URL (default: ${DATABASE_ENV} or {DEFAULT_DATABASE_URL})",
    )


def _add_db(subparsers: Subparsers) -> None:
    parser = subparsers.add_parser(
        "db",
        help="create, migrate and compact the database",
        description="Manage bnwatch's database: schema migrations (Alembic), rollups and "
        "retention.",
    )
    actions = parser.add_subparsers(title="actions", dest="action", metavar="ACTION", required=True)
    up = actions.add_parser("upgrade", help="migrate the schema to the newest revision")
    up.add_argument("--revision", default="head", help="target revision (default: head)")
    _add_db_option(up)
    up.set_defaults(handler=_run_db_upgrade)
    down = actions.add_parser("downgrade", help="migrate the schema back")
    down.add_argument(
        "--revision", default="-1", help="target revision (default: -1, one step back)"
    )
    _add_db_option(down)
    down.set_defaults(handler=_run_db_downgrade)
    cur = actions.add_parser("current", help="print the database's schema revision")
    _add_db_option(cur)
    cur.set_defaults(handler=_run_db_current)
    comp = actions.add_parser(
        "compact",
        help="merge old windows into coarser ones (exactly) and delete very old ones",
        description="Merge windows that ended more than --older-than ago into windows of "
        "--resolution, exactly (the sufficient statistics merge without loss), and delete "
        "windows older than --drop-older-than.  Safe to interrupt and to re-run.",
    )
    comp.add_argument(
        "--older-than",
        type=duration,
        default=timedelta(days=1),
        metavar="AGE",
        help="compact windows older than this (default: 1d)",
    )
    comp.add_argument(
        "--resolution",
        type=duration,
        default=timedelta(hours=1),
        metavar="SPAN",
        help="length of the merged windows (default: 1h)",
    )
    comp.add_argument(
        "--drop-older-than",
        type=duration,
        default=None,
        metavar="AGE",
        help="delete windows older than this (default: keep everything)",
    )
    _add_db_option(comp)
    comp.set_defaults(handler=_run_db_compact)


def _run_db_upgrade(args: argparse.Namespace) -> int:
    from bnwatch.store.engine import create_engine, redacted
    from bnwatch.store.migrate import current_revision, upgrade

    engine = create_engine(args.db, argument="--db")
    upgrade(engine, args.revision)
    print(f"{redacted(engine.url)}: schema at revision {current_revision(engine)}")
    return 0


def _run_db_downgrade(args: argparse.Namespace) -> int:
    from bnwatch.store.engine import create_engine, redacted
    from bnwatch.store.migrate import current_revision, downgrade

    engine = create_engine(args.db, argument="--db")
    downgrade(engine, args.revision)
    print(f"{redacted(engine.url)}: schema at revision {current_revision(engine) or 'none'}")
    return 0


def _run_db_current(args: argparse.Namespace) -> int:
    from bnwatch.store.engine import create_engine, redacted
    from bnwatch.store.migrate import current_revision, head_revision

    engine = create_engine(args.db, argument="--db")
    current = current_revision(engine)
    head = head_revision()
    state = "up to date" if current == head else f"behind: run `bnwatch db upgrade` (head {head})"
    print(f"{redacted(engine.url)}: revision {current or 'none'} ({state})")
    return 0


def _run_db_compact(args: argparse.Namespace) -> int:
    from bnwatch.store.migrate import engine_for
    from bnwatch.store.rollup import compact

    engine = engine_for(args.db, create=False, argument="--db")
    result = compact(
        engine,
        older_than=args.older_than,
        resolution=args.resolution,
        drop_older_than=args.drop_older_than,
    )
    print(
        f"compacted {result.windows_merged} windows into {result.windows_created}; "
        f"dropped {result.windows_dropped}"
    )
    return 0


# --------------------------------------------------------------------------------------
# The parser
# --------------------------------------------------------------------------------------
SUBCOMMANDS: tuple[Callable[[Subparsers], None], ...] = (_add_demo, _add_db)
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
    except Exception as err:
        if type(err).__module__.split(".")[0] in ("sqlalchemy", "alembic", "psycopg"):
            first = str(err).strip().splitlines()[0] if str(err).strip() else repr(err)
            print(f"{PROG} {args.command}: database error: {first}", file=sys.stderr)
            return 1
        raise
    except KeyboardInterrupt:
        print(f"{PROG} {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
