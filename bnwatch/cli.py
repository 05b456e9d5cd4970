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
import math
import os
import pickle
import sys
from collections.abc import Callable, Mapping, Sequence
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bnwatch import __version__
from bnwatch.errors import BnwatchError, first_line

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
        help="train a small CNN on scikit-learn digits, watch it drift, recalibrate it",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Train a small BatchNorm CNN on scikit-learn's digits (with +-1 pixel shifts),\n"
            "record a reference profile on validation data, and watch it in production the way\n"
            "bnwatch.watch(store=..., alerts=..., recalibrate=True, metrics_port=...) does:\n"
            "\n"
            "  1. clean traffic, batch sizes 1-64: no drift, but a train/inference gap;\n"
            "  2. drifted traffic (contrast reduced): the drift alert opens and recalibrates\n"
            "     the model on the inputs it kept; accuracy before/after is printed;\n"
            "  3. a layer left in train() with batches of 2: small-batch-mismatch,\n"
            "     batch-stat-mode and mutated-running-stats alerts open;\n"
            "  4. recalibrating the trained model on clean data closes the gap.\n"
            "\n"
            "Prints a row per window, the alerts and the recalibration as they happen, a\n"
            "summary, and the command that opens the dashboard on the result; the monitor's\n"
            "Prometheus endpoint is up (and scraped once) while it runs.  About 6 s on two idle\n"
            "cores, 20-35 s on busy ones (--quick: a few s less).  Writes model.pt, profile.npz,\n"
            "reports.json and bnwatch.db to --out, replacing the previous run's.  Needs\n"
            "scikit-learn (pip install 'bnwatch[demo]')."
        ),
    )
    parser.add_argument(
        "--out",
        type=_directory,
        default=Path(DEFAULT_DEMO_DIR),
        metavar="DIR",
        help="directory for model.pt, profile.npz, reports.json and bnwatch.db; existing "
        f"files are replaced (default: ./{DEFAULT_DEMO_DIR})",
    )
    parser.add_argument(
        "--store",
        metavar="URL",
        help="store the windows in this database (SQLAlchemy URL; a new model version per "
        "run) or send them to this bnwatch service (http://host:port, token from "
        "$BNWATCH_API_TOKEN; it evaluates the alerts) instead of DIR/bnwatch.db",
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

    run_demo(args.out, seed=args.seed, quick=args.quick, store=args.store)
    return 0


# --------------------------------------------------------------------------------------
# bnwatch db
# --------------------------------------------------------------------------------------
DATABASE_ENV = "BNWATCH_DATABASE_URL"
DEFAULT_DATABASE_URL = "sqlite:///bnwatch.db"
ALERTS_CONFIG_ENV = "BNWATCH_ALERTS_CONFIG"  # bnwatch.service.app's (not imported for --help)
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


MAX_DURATION = timedelta(days=100 * 365)  # longer ones reach before year 1: not a duration


def duration(text: str) -> timedelta:
    """argparse ``type`` for durations: ``45s``, ``30m``, ``1h``, ``1d``, ``2w``."""
    value, unit = text[:-1], text[-1:].lower()
    try:
        number = float(value)
    except ValueError:
        number = -1.0
    if unit not in _UNITS or not number > 0:
        raise argparse.ArgumentTypeError(
            f"expected a duration > 0 like 45s, 30m, 1h, 1d or 2w, got {text!r}"
        )
    seconds = number * _UNITS[unit]
    if not seconds <= MAX_DURATION.total_seconds():  # also inf and nan
        raise argparse.ArgumentTypeError(
            f"expected a duration of at most {MAX_DURATION.days // 365} years, got {text!r}"
        )
    return timedelta(seconds=seconds)


def _default_database_url() -> str:
    """``$BNWATCH_DATABASE_URL``, or :data:`DEFAULT_DATABASE_URL` when it is unset or empty --
    as the service and the dashboard read it (an empty one is not a URL to refuse as --db)."""
    return os.environ.get(DATABASE_ENV, "").strip() or DEFAULT_DATABASE_URL


def _add_db_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--db",
        default=_default_database_url(),
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
        help="delete windows older than this, and the monitor sources that have none left "
        "(default: keep everything)",
    )
    _add_db_option(comp)
    comp.set_defaults(handler=_run_db_compact)


def _run_db_upgrade(args: argparse.Namespace) -> int:
    from bnwatch.store.engine import create_engine, redacted
    from bnwatch.store.migrate import check_known_revision, current_revision, upgrade

    engine = create_engine(args.db, argument="--db")  # a new database is created: intended
    # a revision a newer bnwatch wrote: Alembic would only say it "can't locate" it
    check_known_revision(engine, current_revision(engine))
    upgrade(engine, args.revision)
    print(f"{redacted(engine.url)}: schema at revision {current_revision(engine)}")
    return 0


def _run_db_downgrade(args: argparse.Namespace) -> int:
    from bnwatch.store.engine import redacted
    from bnwatch.store.migrate import (
        check_known_revision,
        current_revision,
        downgrade,
        existing_engine,
    )

    engine = existing_engine(args.db, argument="--db")  # a mistyped path is not created
    current = current_revision(engine)
    if current is None:  # Alembic would say "Relative revision -1 didn't produce 1 migrations"
        print(f"{redacted(engine.url)}: no bnwatch schema, nothing to downgrade")
        return 0
    check_known_revision(engine, current)
    downgrade(engine, args.revision)
    print(f"{redacted(engine.url)}: schema at revision {current_revision(engine) or 'none'}")
    return 0


def _run_db_current(args: argparse.Namespace) -> int:
    from bnwatch.store.engine import redacted
    from bnwatch.store.migrate import (
        check_known_revision,
        current_revision,
        existing_engine,
        head_revision,
    )

    engine = existing_engine(args.db, argument="--db")  # a mistyped path is not created
    current = current_revision(engine)
    check_known_revision(engine, current)  # not "behind": this bnwatch is
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
# bnwatch alerts
# --------------------------------------------------------------------------------------
def _add_alerts(subparsers: Subparsers) -> None:
    parser = subparsers.add_parser(
        "alerts",
        help="list alerts (and evaluate the rules now)",
        description="List the alerts in the database.  With --evaluate, first run the alert "
        "rules over the stored windows (and the no-data check), as the service does "
        "periodically.",
    )
    _add_db_option(parser)
    parser.add_argument("--model", help="only this model")
    parser.add_argument("--version", help="only this model version")
    parser.add_argument(
        "--state", choices=["open", "resolved", "all"], default="open", help="default: open"
    )
    parser.add_argument("--evaluate", action="store_true", help="evaluate the rules first")
    parser.add_argument(
        "--config",
        metavar="TOML",
        default=os.environ.get(ALERTS_CONFIG_ENV, "").strip() or None,
        help="alert thresholds: the [alerts] table of a TOML file (default: "
        f"${ALERTS_CONFIG_ENV}, as `bnwatch serve` reads it, so that both judge alike)",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.set_defaults(handler=_run_alerts)


def _check_model_stored(repo: Any, model: str | None, version: str | None) -> None:
    """Refuse a --model/--version that names no stored model version, listing those stored."""
    stored = [(m.name, m.version) for m in repo.models()]
    if any((model in (None, n)) and (version in (None, v)) for n, v in stored):
        return
    named = f"{model or '*'}@{version}" if version is not None else str(model)
    listed = ", ".join(f"{n}@{v}" for n, v in stored) or "(none: the store is empty)"
    raise _CommandLineError(f"no model {named} in the store; models: {listed}")


def _run_alerts(args: argparse.Namespace) -> int:
    import json

    from bnwatch.alerts import AlertConfig, AlertEngine, evaluate_all
    from bnwatch.store.migrate import engine_for
    from bnwatch.store.repository import Repository

    config = AlertConfig.from_toml(args.config) if args.config else AlertConfig()
    engine = engine_for(args.db, create=False, argument="--db")
    try:
        repo = Repository(engine)
        if args.evaluate:
            changes = evaluate_all(repo, AlertEngine(config))
            print(
                f"evaluated: {sum(c.action == 'opened' for c in changes)} opened, "
                f"{sum(c.action == 'resolved' for c in changes)} resolved"
            )
        state = None if args.state == "all" else args.state
        alerts = repo.alerts(model=args.model, version=args.version, state=state)
        if not alerts and (args.model is not None or args.version is not None):
            _check_model_stored(repo, args.model, args.version)  # a typo is not "no alerts"
    finally:
        engine.dispose()
    if args.json:
        print(
            json.dumps(
                [
                    {
                        "id": a.id,
                        "model": a.model,
                        "version": a.version,
                        "layer": a.layer,
                        "kind": a.kind,
                        "state": a.state,
                        "opened_at": a.opened_at.isoformat(),
                        "resolved_at": a.resolved_at.isoformat() if a.resolved_at else None,
                        "values": a.values,
                    }
                    for a in alerts
                ],
                indent=2,
                default=str,
            )
        )
        return 0
    if not alerts:
        print(f"no {'' if state is None else state + ' '}alerts")
        return 0
    # columns as wide as their longest entry: a cut version is one --version does not accept
    # (and two versions cut alike print the same)
    wheres = [f"{a.model}@{a.version}" for a in alerts]
    layers = [a.layer or "-" for a in alerts]
    w = max(len("model@version"), *map(len, wheres))
    lw = max(len("layer"), *map(len, layers))
    print(f"{'id':>5}  {'state':<9} {'kind':<22} {'model@version':<{w}} {'layer':<{lw}} opened")
    for a, where, layer in zip(alerts, wheres, layers, strict=True):
        print(
            f"{a.id:>5}  {a.state:<9} {a.kind:<22} {where:<{w}} {layer:<{lw}} "
            f"{a.opened_at:%Y-%m-%d %H:%M}"
        )
    return 0


# --------------------------------------------------------------------------------------
# bnwatch recalibrate
# --------------------------------------------------------------------------------------
def _load_object(spec: str, argument: str) -> object:
    """``pkg.module:attribute`` (or ``pkg.module:Class.attribute``) -> the object, a clear
    error otherwise.  Modules are looked up from the current directory first, as ``python -m``
    would: the ``bnwatch`` console script does not put it on ``sys.path`` by itself."""
    import importlib

    from bnwatch.errors import ConfigError

    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(argument, spec, "pkg.module:name")
    if module_name.endswith(".py") or "/" in module_name or os.sep in module_name:
        dotted = module_name.removesuffix(".py").strip("./").replace("/", ".")
        raise ConfigError(
            argument,
            spec,
            f"a module name, not a file path: e.g. {dotted}:{attr} (modules are imported from "
            "the current directory first)",
        )
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except Exception as err:  # not found, or the user's module failed while importing
        raise ConfigError(
            argument,
            spec,
            f"an importable module, absolute and from the current directory or the installed "
            f"packages ({type(err).__name__}: {err})",
        ) from err
    value: object = module
    for part in attr.split("."):
        try:
            value = getattr(value, part)
        except AttributeError as err:
            raise ConfigError(argument, spec, f"a name defined in {module_name}") from err
    return value


def _add_model_options(parser: argparse.ArgumentParser, *, data_help: str) -> None:
    """``--model``, ``--checkpoint``, ``--data``, ``--input-key`` and ``--forward``: a model and
    its data from the user's code (``bnwatch recalibrate``, ``bnwatch profile``)."""
    parser.add_argument(
        "--model",
        required=True,
        metavar="PKG.MODULE:FACTORY",
        help="a callable returning the nn.Module",
    )
    parser.add_argument("--checkpoint", metavar="PATH", help="a state_dict to load (torch.save)")
    parser.add_argument("--data", required=True, metavar="PKG.MODULE:LOADER", help=data_help)
    parser.add_argument("--input-key", help="the input's key when batches are dicts")
    parser.add_argument(
        "--forward",
        metavar="PKG.MODULE:FUNCTION",
        help="for a model that does not take one tensor: a function (model, batch) -> output "
        "that runs it on a batch as --data yields it (e.g. model(**batch)); batches are then "
        "used whole (default: model(input), the batch's tensor or its first element)",
    )


def _load_code(args: argparse.Namespace) -> tuple[Callable[[], Any], Any, Any]:
    """``--model``'s factory, ``--data``'s object and ``--forward``'s function (or ``None``),
    loaded and checked before anything runs: a wrong name is found now."""
    from bnwatch.errors import ConfigError

    factory = _load_object(args.model, "--model")
    if not callable(factory):
        raise ConfigError("--model", args.model, "a callable returning an nn.Module")
    data = _load_object(args.data, "--data")
    if not callable(data):
        _iterable(data, "--data", args.data)  # not iterable: a wrong name, found before the run
    forward = _load_object(args.forward, "--forward") if args.forward else None
    if forward is not None and not callable(forward):
        raise ConfigError("--forward", args.forward, "a function (model, batch) -> output")
    return factory, data, forward


def _build_model(factory: Callable[[], Any], args: argparse.Namespace) -> Any:
    """The factory's model, with ``--checkpoint``'s weights, in eval mode."""
    import torch

    from bnwatch.errors import ConfigError

    model = _call_user_code(factory, "--model", args.model)
    if not isinstance(model, torch.nn.Module):
        raise ConfigError("--model", args.model, "a factory returning a torch.nn.Module")
    if args.checkpoint:
        # a command-line mistake, not the run's failure: a pending recalibration stays pending
        try:
            state = torch.load(args.checkpoint, map_location="cpu", weights_only=True)
        except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as err:
            raise _CommandLineError(
                f"--checkpoint {args.checkpoint}: not a state_dict torch.load can read "
                f"({first_line(err)}); save one with torch.save(model.state_dict(), PATH)"
            ) from err
        if not isinstance(state, Mapping):
            raise _CommandLineError(
                f"--checkpoint {args.checkpoint}: holds a {type(state).__name__}, not a "
                "state_dict; save one with torch.save(model.state_dict(), PATH)"
            )
        try:
            model.load_state_dict(state)
        except (RuntimeError, TypeError, KeyError) as err:
            text = " ".join(str(err).split())
            raise _CommandLineError(
                f"--checkpoint {args.checkpoint} does not fit --model {args.model}: "
                f"{text[:600]}{'...' if len(text) > 600 else ''}"
            ) from err
    return model.eval()


def _add_recalibrate(subparsers: Subparsers) -> None:
    parser = subparsers.add_parser(
        "recalibrate",
        help="re-estimate a model's BatchNorm statistics on data",
        description="Load a model (factory + checkpoint), re-estimate its BatchNorm running "
        "statistics on data, and write the new buffers to --out as a file that "
        "model.load_state_dict(torch.load(OUT), strict=False) accepts.  With --held-out the "
        "result is judged (and not written if it does not improve: exit code 1).  With "
        "--recalibration ID the run finishes that pending recalibration (a webhook trigger's "
        "recalibration_id, or one requested from the dashboard) in the database (--db) or "
        "through a bnwatch service (--service): applied (with the new buffers and where they "
        "were written), rejected, or failed (when the run raises; the error is printed and "
        "the exit code is 1); an unknown id, or a recalibration that is no longer pending, "
        "is refused before the run.  PKG.MODULE names are imported from the current directory "
        "first, then from the installed packages.",
    )
    _add_model_options(parser, data_help="an iterable of batches, or a callable returning one")
    parser.add_argument(
        "--held-out",
        metavar="PKG.MODULE:LOADER",
        help="held-out batches to judge on ((inputs, labels) give accuracy)",
    )
    parser.add_argument(
        "--label-key",
        help="the labels' key when --held-out batches are dicts (for the accuracy)",
    )
    parser.add_argument(
        "--out",
        required=True,
        type=Path,
        metavar="PATH",
        help="where to write the new BatchNorm buffers",
    )
    parser.add_argument(
        "--method",
        choices=RECALIBRATION_METHODS,
        default="precise",
        help="precise: population statistics of the data (a few hundred samples or more); mix: "
        "blended with the current statistics, for few samples (default precise)",
    )
    parser.add_argument(
        "--num-samples",
        type=_recalibration_samples,
        default=8192,
        metavar="N",
        help=f"use at most N samples of --data, N >= {RECALIBRATION_MIN_SAMPLES} (fewer give "
        "noise, not statistics; default 8192)",
    )
    parser.add_argument(
        "--prior-strength",
        type=_non_negative_float,
        default=16.0,
        metavar="N",
        help="prior strength of --method mix, in samples (default 16)",
    )
    parser.add_argument("--layers", nargs="+", metavar="GLOB", help="only these layers")
    report = parser.add_argument_group(
        "reporting back",
        "finish a pending recalibration with this run's outcome (its references and lineage "
        "are stored with it)",
    )
    report.add_argument(
        "--recalibration",
        type=_positive_int,
        metavar="ID",
        help="the id of the pending recalibration this run carries out",
    )
    where = report.add_mutually_exclusive_group()
    where.add_argument(
        "--db",
        metavar="URL",
        help="with --recalibration: the database that records it (SQLAlchemy URL; default: "
        f"${DATABASE_ENV} or {DEFAULT_DATABASE_URL})",
    )
    where.add_argument(
        "--service",
        metavar="URL",
        help="with --recalibration: report through this bnwatch service instead (http://host:port)",
    )
    report.add_argument(
        "--token",
        help="with --service: the service's API token (default: $BNWATCH_API_TOKEN)",
    )
    parser.set_defaults(handler=_run_recalibrate)


def _positive_int(text: str) -> int:
    value = _non_negative_int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def _recalibration_samples(text: str) -> int:
    """``recalibrate --num-samples``: refused below the samples a recalibration needs now,
    not after the run (which would fail, and report a pending recalibration failed)."""
    value = _non_negative_int(text)
    if value < RECALIBRATION_MIN_SAMPLES:
        raise argparse.ArgumentTypeError(
            f"expected at least {RECALIBRATION_MIN_SAMPLES} samples, got {value}"
        )
    return value


class _CommandLineError(BnwatchError):
    """A mistake in the command line found only once the model is built: not the run's
    failure (a pending recalibration stays pending, to be run again with the fix)."""


def _check_out_dir(out: str | Path) -> None:
    """``--out`` must name a file in a directory that exists -- not a directory, which the
    write would fail on only after the run (and, with ``--recalibration``, after reporting a
    command-line mistake as the run's failure): checked before a long run."""
    from bnwatch.errors import ConfigError

    if Path(out).is_dir():
        raise ConfigError("--out", str(out), "a file name, not an existing directory")
    directory = Path(out).resolve().parent
    if not directory.is_dir():
        raise ConfigError(
            "--out", str(out), f"a file in an existing directory ({directory} is not)"
        )


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 <= value < math.inf:
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text!r}")
    return value


def _call_user_code(function: Callable[[], Any], argument: str, spec: str) -> Any:
    """``function()`` -- the user's ``--model`` factory or ``--data``/``--held-out`` loader --
    with what it raises as one line naming the flag: a setup mistake (weights missing on this
    host, say), not the run's failure, so a pending recalibration stays pending."""
    try:
        return function()
    except Exception as err:
        raise _CommandLineError(
            f"{argument} {spec} raised {type(err).__name__}: {first_line(err)}"
        ) from err


def _iterable(obj: object, argument: str, spec: str) -> Any:
    """A loaded ``--data``/``--held-out`` object: the iterable itself, or what calling it
    returns -- a class of iterable loaders is called (the class object itself has
    ``__iter__`` as an attribute, but iterating it is not what was meant)."""
    from collections.abc import Iterable

    from bnwatch.errors import ConfigError

    value = obj
    if not isinstance(obj, Iterable) and callable(obj):
        value = _call_user_code(obj, argument, spec)
    if not isinstance(value, Iterable):
        raise ConfigError(
            argument,
            spec,
            f"an iterable of batches, or a callable returning one (got {type(value).__name__})",
        )
    return value


def _report_target(args: argparse.Namespace) -> str | None:
    """Where the run reports to (``None`` without ``--recalibration``), checked before the
    run: a bad URL fails now, not after the recalibration."""
    from bnwatch.errors import ConfigError

    if args.recalibration is None:
        for flag in ("db", "service", "token"):
            if getattr(args, flag) is not None:
                value = "<hidden>" if flag == "token" else getattr(args, flag)
                raise ConfigError(
                    f"--{flag}", value, f"--recalibration ID as well (--{flag} is for reporting)"
                )
        return None
    if args.token is not None and args.service is None:
        raise ConfigError("--token", "<hidden>", "--service URL as well (a database needs none)")
    if args.service is not None:
        from bnwatch.client import outcome_endpoint

        outcome_endpoint(args.service, args.recalibration)
        return str(args.service)
    from bnwatch.store.engine import parse_url

    url: str = args.db or _default_database_url()
    parse_url(url, argument="--db")
    return url


def _check_pending(args: argparse.Namespace, target: str) -> None:
    """Refuse, before the run, to carry out a recalibration the store does not have or that is
    no longer ``pending`` (its report would be refused after minutes of work)."""
    from bnwatch.errors import RecalibrationNotFoundError, RecalibrationStateError

    rid = args.recalibration
    if args.service is not None:
        from bnwatch.client import ServiceError, fetch_recalibration

        try:
            status = str(fetch_recalibration(target, rid)["status"])
        except ServiceError as err:
            if err.status == 404:
                raise RecalibrationNotFoundError(rid) from err
            raise
    else:
        from bnwatch.store.migrate import engine_for
        from bnwatch.store.repository import Repository

        engine = engine_for(target, create=False)
        try:
            status = Repository(engine).recalibration(rid).status
        finally:
            engine.dispose()
    if status != "pending":
        raise RecalibrationStateError(rid, status)


def _run_recalibrate(args: argparse.Namespace) -> int:
    import json

    from bnwatch.capture.discovery import discover
    from bnwatch.errors import ConfigError, NoBatchNormError
    from bnwatch.recalibration import FrozenLayersError, recalibrate

    target = _report_target(args)
    if target is not None:
        _check_pending(args, target)
    factory, data, forward = _load_code(args)
    held_out = _load_object(args.held_out, "--held-out") if args.held_out else None
    if held_out is not None and not callable(held_out):
        _iterable(held_out, "--held-out", args.held_out)
    _check_out_dir(args.out)  # found now, not after the run
    data_lineage = {  # which data, for the stored lineage (samples: in the result's summary)
        "source": args.data,
        "held_out": args.held_out,
        "checkpoint": str(Path(args.checkpoint).resolve()) if args.checkpoint else None,
    }
    # from here on the run is the recalibration's: a failure is reported as such (a wrong
    # --model/--data name above, or --layers that match no layer, are not: fix it and run
    # again with the same --recalibration)
    try:
        model = _build_model(factory, args)
        if args.layers is not None:
            try:
                discover(model, include=args.layers)
            except NoBatchNormError as err:
                if err.include is None:  # the model has none at all: the message says why
                    raise _CommandLineError(str(err)) from err
                names = [layer.name for layer in discover(model)]
                shown = ", ".join(names[:10]) + (f" ... ({len(names)})" if len(names) > 10 else "")
                raise _CommandLineError(
                    f"--layers {' '.join(args.layers)}: no BatchNorm layer of "
                    f"{type(model).__name__} matches (fnmatch globs on qualified module names; "
                    f"its BatchNorm layers: {shown})"
                ) from err
            except ConfigError as err:
                raise _CommandLineError(str(err)) from err
        result = recalibrate(
            model,
            _iterable(data, "--data", args.data),
            num_samples=args.num_samples,
            method=args.method,
            prior_strength=args.prior_strength,
            layers=args.layers,
            input_key=args.input_key,
            forward=forward,
            label_key=args.label_key,
            held_out=_iterable(held_out, "--held-out", args.held_out)
            if held_out is not None
            else None,
            apply="if_better",
        )
        if result.status != "rejected":
            result.save(args.out)
    except _CommandLineError:
        raise
    except FrozenLayersError as err:  # found before any data is read: --layers or --model
        which = "--layers matches" if args.layers is not None else "--model has"
        frozen = ", ".join(err.frozen[:5]) + (", ..." if len(err.frozen) > 5 else "")
        raise _CommandLineError(
            f"{which} only frozen BatchNorm layers ({frozen}), which are watched but never "
            "recalibrated"
        ) from err
    except Exception as err:
        if target is not None:  # report the failure, then fail with the run's error
            error = f"{type(err).__name__}: {err}"
            _report(args, target, None, {"error": error, "data": data_lineage})
        raise
    summary = result.summary()
    print(json.dumps(summary, indent=2, default=str))
    if result.status == "rejected":
        if target is not None:
            _report(args, target, result, {"data": data_lineage})
        print(
            f"{PROG} recalibrate: rejected (held-out data did not improve); nothing written",
            file=sys.stderr,
        )
        return 1
    print(f"wrote {len(result.updates)} layers' running_mean/running_var to {args.out}")
    if target is not None and not _report(
        args, target, result, {"out": str(Path(args.out).resolve()), "data": data_lineage}
    ):
        return 1
    return 0


# --------------------------------------------------------------------------------------
# bnwatch profile
# --------------------------------------------------------------------------------------
def _add_profile(subparsers: Subparsers) -> None:
    parser = subparsers.add_parser(
        "profile",
        help="record a model version's reference profile from validation data",
        description="Load a model (factory + checkpoint), run it over validation data with "
        "every BatchNorm layer measured, and store the result as the reference profile of "
        "--name@--version: in a database (--store; default $BNWATCH_DATABASE_URL or "
        "sqlite:///bnwatch.db), through a bnwatch service (--store http://host:port, token "
        "from --token or $BNWATCH_API_TOKEN), and/or as a file (--out PATH.npz, read by "
        "bnwatch.Profile.load).  Reports and the dashboard judge drift against a stored "
        "profile, and monitors do with bnwatch.watch(..., "
        "reference=bnwatch.load_profile(URL, NAME, VERSION)).  Storing the same profile "
        "again stores nothing.  The store is checked before the pass (the database opened, the "
        "service's /healthz); if storing fails after it, the profile is kept in --out or a "
        "temporary file, whose path is printed.  PKG.MODULE names are imported from the "
        "current directory first, then from the installed packages.",
    )
    _add_model_options(parser, data_help="validation batches, or a callable returning them")
    parser.add_argument("--name", required=True, help="the model's name, as monitors report it")
    parser.add_argument("--version", required=True, help="the model version")
    parser.add_argument(
        "--store",
        default=_default_database_url(),
        metavar="URL",
        help="a SQLAlchemy database URL or a bnwatch service's http(s):// URL (default: "
        f"${DATABASE_ENV} or {DEFAULT_DATABASE_URL})",
    )
    parser.add_argument("--no-store", action="store_true", help="store nothing: only write --out")
    parser.add_argument("--token", help="the service's API token (default $BNWATCH_API_TOKEN)")
    parser.add_argument("--out", type=Path, metavar="PATH", help="also write the profile here")
    parser.add_argument(
        "--num-samples",
        type=_positive_int,
        metavar="N",
        help="use at most N samples of --data (default: all)",
    )
    parser.add_argument("--include", nargs="+", metavar="GLOB", help="only these layers")
    parser.add_argument("--exclude", nargs="+", metavar="GLOB", help="not these layers")
    parser.add_argument(
        "--reservoir-size",
        type=_positive_int,
        default=512,
        metavar="N",
        help="per-sample channel means kept per layer, for reports (default 512)",
    )
    parser.set_defaults(handler=_run_profile)


def _keep_unstored(result: Any) -> Path | None:
    """Save a profile that could not be stored (and has no ``--out``) to a temporary file: its
    path, or ``None`` if that fails too."""
    import tempfile

    try:
        fd, name = tempfile.mkstemp(prefix="bnwatch-profile-", suffix=".npz")
        os.close(fd)
        return Path(result.save(name))
    except Exception:  # the store's error is the one to report
        return None


def _run_profile(args: argparse.Namespace) -> int:
    from bnwatch.api import check_profile_store, is_service_url, profile, store_profile
    from bnwatch.errors import ConfigError
    from bnwatch.store.engine import redacted

    if args.no_store and args.out is None:
        raise ConfigError("--no-store", True, "--out PATH too: the profile must go somewhere")
    if args.no_store and args.token is not None:
        raise ConfigError("--token", "<hidden>", "no --token with --no-store")
    if args.token is not None and not args.no_store and not is_service_url(args.store):
        raise ConfigError(
            "--token", "<hidden>", "--store http(s)://... too (a database needs none)"
        )
    factory, data, forward = _load_code(args)
    if args.out is not None:
        _check_out_dir(args.out)
    store = None if args.no_store else args.store
    check_profile_store(store, args.token)  # before the pass, which storing after it needs
    result = profile(
        _build_model(factory, args),
        _iterable(data, "--data", args.data),
        name=args.name,
        version=args.version,
        include=args.include,
        exclude=args.exclude,
        reservoir_size=args.reservoir_size,
        num_samples=args.num_samples,
        input_key=args.input_key,
        forward=forward,
    )
    if args.out is not None:  # first: a store that fails then does not lose the pass
        partial = args.out.with_name(f".{args.out.name}.partial")
        try:
            result.save(partial)
            os.replace(partial, args.out)  # a file that is there is whole
        finally:
            partial.unlink(missing_ok=True)
    if store is not None:
        try:
            store_profile(result, store, token=args.token)
        except Exception:
            kept = args.out if args.out is not None else _keep_unstored(result)
            if kept is not None:  # the pass is not lost: Profile.load reads it back
                print(f"the profile is in {kept} (storing it failed):", file=sys.stderr)
            raise
    samples = max((lp.stats.samples_seen for lp in result.layers.values()), default=0)
    print(
        f"profile of {result.name}@{result.version}: {len(result.layers)} layers, {samples} samples"
    )
    for name, lp in result.layers.items():
        print(f"  {name:<40} {lp.kind:<20} {lp.stats.moments.channels:>6} channels")
    if store is not None:
        where = store if is_service_url(store) else redacted(store)
        print(f"stored as the reference of {result.name}@{result.version} in {where}")
    if args.out is not None:
        print(f"wrote {args.out}")
    return 0


def _report(
    args: argparse.Namespace, store: str, result: Any, outcome: dict[str, Any] | None
) -> bool:
    """Finish recalibration ``args.recalibration`` with the run's outcome (``result=None``:
    the run failed, ``outcome["error"]`` says how); whether it was reported (why not is
    printed)."""
    from bnwatch.api import report_recalibration
    from bnwatch.store.engine import redacted

    rid = args.recalibration
    where = store if args.service is not None else redacted(store)
    try:
        if result is None:
            info = report_recalibration(
                store, rid, status="failed", outcome=outcome, token=args.token
            )
        else:
            info = report_recalibration(store, rid, result, outcome=outcome, token=args.token)
    except BnwatchError as err:
        print(
            f"{PROG} recalibrate: error: recalibration {rid} was not reported to {where}: {err}",
            file=sys.stderr,
        )
        return False
    print(
        f"{PROG} recalibrate: recalibration {rid} of {info.model}@{info.version} reported "
        f"{info.status} to {where}",
        file=sys.stderr,
    )
    return True


# --------------------------------------------------------------------------------------
# bnwatch serve
# --------------------------------------------------------------------------------------
def _port(text: str) -> int:
    """argparse ``type`` for TCP ports."""
    value = _non_negative_int(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"expected a port from 0 to 65535, got {value}")
    return value


def _add_serve(subparsers: Subparsers) -> None:
    def workers(text: str) -> int:
        value = _non_negative_int(text)
        if value < 1:
            raise argparse.ArgumentTypeError(f"expected at least 1 worker, got {value}")
        return value

    parser = subparsers.add_parser(
        "serve",
        help="run the HTTP service: ingest from remote monitors, reads, /metrics, /healthz",
        description="Run bnwatch's HTTP service (FastAPI on uvicorn): POST /api/v1/windows "
        "for remote monitors and POST /api/v1/profiles for bnwatch.profile(..., "
        "store='http://...'), both with the bearer token from $BNWATCH_API_TOKEN (without "
        "it ingest answers 503), read endpoints under /api/v1, GET /metrics for Prometheus "
        "and GET /healthz.  "
        "An empty database gets the current schema; a database at an older schema is refused "
        "(run `bnwatch db upgrade`).  Alerts are evaluated after every stored batch "
        "(thresholds from $BNWATCH_ALERTS_CONFIG, a TOML file, if set).  The API is "
        "described at /docs.",
    )
    _add_db_option(parser)
    parser.add_argument(
        "--host", default="127.0.0.1", help="interface to listen on (default: 127.0.0.1)"
    )
    parser.add_argument("--port", type=_port, default=8000, help="TCP port (default: 8000)")
    parser.add_argument(
        "--workers",
        type=workers,
        default=1,
        metavar="N",
        help="worker processes (default: 1); ingest is CPU-bound, so up to one per core",
    )
    parser.add_argument(
        "--log-level",
        choices=["critical", "error", "warning", "info", "debug"],
        default="info",
        help="uvicorn's and bnwatch's log level (default: info)",
    )
    parser.set_defaults(handler=_run_serve)


def _run_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from bnwatch.service.app import LOG_LEVEL_ENV, alert_hook_from_env
    from bnwatch.service.settings import TOKEN_ENV, Settings
    from bnwatch.store.engine import redacted
    from bnwatch.store.migrate import engine_for

    settings = Settings.from_env(database_url=args.db)  # a bad token or limit fails here
    alert_hook_from_env()  # and a bad alert configuration
    engine = engine_for(args.db, argument="--db")  # creates or checks the schema, once
    engine.dispose()
    # the workers build their settings from the environment
    os.environ[DATABASE_ENV] = args.db
    os.environ[LOG_LEVEL_ENV] = args.log_level
    if settings.api_token is None:
        print(
            f"{PROG} serve: warning: {TOKEN_ENV} is not set: POST /api/v1/windows answers 503 "
            "until the service is restarted with a token",
            file=sys.stderr,
        )
    print(
        f"{PROG} serve: store {redacted(args.db)}, http://{args.host}:{args.port} "
        f"({args.workers} worker{'s' if args.workers > 1 else ''})",
        file=sys.stderr,
    )
    uvicorn.run(
        "bnwatch.service.app:app_from_env",
        factory=True,
        host=args.host,
        port=args.port,
        workers=args.workers,
        log_level=args.log_level,
    )
    return 0


# --------------------------------------------------------------------------------------
# bnwatch report
# --------------------------------------------------------------------------------------
def timestamp(text: str) -> Any:
    """argparse ``type`` for times: ISO-8601 (``2026-06-01``, ``2026-06-01T12:00``,
    ``...Z``, ``...+02:00``); without an offset the time is UTC."""
    from datetime import datetime, timezone

    value = text.strip()
    if value.endswith(("Z", "z")):
        value = value[:-1] + "+00:00"
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected an ISO-8601 time like 2026-06-01 or 2026-06-01T12:00:00Z, got {text!r}"
        ) from None
    if parsed.tzinfo is None:
        return parsed.replace(tzinfo=timezone.utc)
    try:
        return parsed.astimezone(timezone.utc)
    except OverflowError:  # an offset that takes it past year 9999 or before year 1
        raise argparse.ArgumentTypeError(
            f"{text!r} is out of the years a time can hold in UTC (1 to 9999)"
        ) from None


LISTED_CHANNELS = 20
"""``bnwatch report`` names at most this many drifted channels (the report has them all)."""
REPORT_PLOTS = 64
"""``bnwatch report --plots`` default: :data:`bnwatch.reports.PLOTS` (not imported here: pandas)."""
RECALIBRATION_MIN_SAMPLES = 16
"""``bnwatch recalibrate --num-samples`` floor: :data:`bnwatch.recalibration.core.MIN_SAMPLES`,
the default ``min_samples`` the command runs with (not imported here: torch)."""
RECALIBRATION_METHODS = ("precise", "mix")
"""``bnwatch recalibrate --method`` choices: :data:`bnwatch.recalibration.METHODS` (not imported
here: torch)."""


def _add_report(subparsers: Subparsers) -> None:
    parser = subparsers.add_parser(
        "report",
        help="write an Evidently data-drift report of one layer (HTML or JSON)",
        description="Compare one BatchNorm layer's per-sample channel means in production "
        "(the reservoirs of the windows whose end lies in [--from, --to)) with its reference "
        "(the reference profile's reservoir; without a profile, the warm-up windows') using "
        "Evidently's data-drift test: a two-sample Kolmogorov-Smirnov test per channel at "
        "alpha / channels (Bonferroni), so that at most alpha of reports flag a channel when "
        "nothing drifted.  Writes --out as HTML or JSON (by its suffix).",
    )
    _add_db_option(parser)
    parser.add_argument("--model", required=True, help="the model's name")
    parser.add_argument("--version", required=True, help="the model version")
    parser.add_argument("--layer", required=True, help="the layer's qualified name")
    parser.add_argument(
        "--from",
        dest="start",
        type=timestamp,
        default=None,
        metavar="TIME",
        help="first window end to include, ISO-8601, UTC unless an offset is given "
        "(default: the first window)",
    )
    parser.add_argument(
        "--to",
        dest="end",
        type=timestamp,
        default=None,
        metavar="TIME",
        help="window ends before this time (default: the last window)",
    )
    parser.add_argument(
        "--alpha",
        type=_alpha,
        default=0.05,
        help="chance of flagging any channel when none drifted (default: 0.05)",
    )
    parser.add_argument(
        "--plots",
        type=_plots,
        default=REPORT_PLOTS,
        metavar="N",
        help="Evidently plots the N channels with the smallest p-values; every channel is "
        f"tested and in the table (default: {REPORT_PLOTS}; 'all'; 0: the table only)",
    )
    parser.add_argument(
        "--out", required=True, type=Path, metavar="PATH", help="report.html or report.json"
    )
    parser.set_defaults(handler=_run_report)


def _alpha(text: str) -> float:
    """``--alpha``: a probability in (0, 1), refused before the database is opened."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"expected a number between 0 and 1, got {text!r}")
    return value


def _plots(text: str) -> int | None:
    """``--plots``: a count >= 0, or ``all``."""
    if text.strip().lower() == "all":
        return None
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(
            f"expected a number of channels >= 0 or 'all', got {text!r}"
        )
    return value


def _run_report(args: argparse.Namespace) -> int:
    from bnwatch.errors import ConfigError
    from bnwatch.reports import channel_list, drift_report, report_format
    from bnwatch.store.migrate import engine_for
    from bnwatch.store.repository import Repository

    _check_out_dir(args.out)  # a directory, a missing one or a bad suffix fails before any work
    report_format(args.out)
    if args.start is not None and args.end is not None and args.end <= args.start:
        raise ConfigError("--to", args.end.isoformat(), f"a time after --from ({args.start})")
    engine = engine_for(args.db, create=False, argument="--db")
    try:
        report = drift_report(
            Repository(engine),
            model=args.model,
            version=args.version,
            layer=args.layer,
            start=args.start,
            end=args.end,
            alpha=args.alpha,
            plots=args.plots,
        )
    finally:
        engine.dispose()
    path = report.save(args.out)
    drifted = channel_list(report.drifted_channels, limit=LISTED_CHANNELS)
    untested = len(report.untested_channels)
    also = f", {untested} untested" if untested else ""
    print(
        f"{report.layer} of {report.model}@{report.version}: "
        f"{len(report.drifted_channels)} of {report.channels} channels drifted ({drifted}){also}; "
        f"K-S per channel at alpha/C = {report.threshold:.3g}; {report.current_rows} production "
        f"rows from {report.current_windows} windows against {report.reference_rows} "
        f"{report.reference_kind} rows"
    )
    if untested:
        names = channel_list(report.untested_channels, limit=LISTED_CHANNELS)
        print(
            f"{untested} of {report.channels} channels untested ({names}): no finite value on "
            "both sides (production and reference), so not drifted and not plotted"
        )
    plotted = len(report.plotted_channels)
    tested = report.channels - untested
    if plotted == 0 and tested == 0:
        print("no channel is plotted: no channel has finite values on both sides")
    elif plotted == 0:
        print("no channel is plotted (--plots 0); every channel is in the report's table")
    elif plotted < tested:
        print(
            f"Evidently plots the {plotted} channel{'s' if plotted > 1 else ''} with the "
            "smallest p-values (--plots); every channel is in the report's table"
        )
    print(f"wrote {path}")
    return 0


# --------------------------------------------------------------------------------------
# The parser
# --------------------------------------------------------------------------------------
# --------------------------------------------------------------------------------------
# bnwatch dashboard
# --------------------------------------------------------------------------------------
def _add_dashboard(subparsers: Subparsers) -> None:
    parser = subparsers.add_parser(
        "dashboard",
        help="open the Streamlit dashboard on a database",
        description="Serve bnwatch's Streamlit dashboard for the database: an overview of "
        "every model version, a layer x time drift heatmap and depth profile per model, "
        "channels of one layer, batch sizes and batch-statistics noise, alerts and "
        "recalibrations (acknowledge, request), and Evidently drift reports.  It only reads "
        "the database (acknowledging an alert and requesting a recalibration are the two "
        "writes); an empty or missing database shows how to fill it.",
    )
    _add_db_option(parser)
    parser.add_argument(
        "--host", default="127.0.0.1", help="interface to listen on (default: 127.0.0.1)"
    )
    parser.add_argument("--port", type=_port, default=8501, help="TCP port (default: 8501)")
    parser.add_argument(
        "--browser",
        action="store_true",
        help="open a web browser on the dashboard (default: print its address only)",
    )
    parser.set_defaults(handler=_run_dashboard)


def dashboard_script() -> Path:
    """The dashboard's entry script: inside the installed package (``bnwatch/_dashboard``),
    or in the source tree's ``dashboard/`` for an editable install."""
    package = Path(__file__).resolve().parent
    for candidate in (package / "_dashboard" / "app.py", package.parent / "dashboard" / "app.py"):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError("bnwatch's dashboard is not installed (no _dashboard/app.py)")


def _run_dashboard(args: argparse.Namespace) -> int:
    from bnwatch.store.engine import parse_url, redacted

    parse_url(args.db, argument="--db")  # a bad URL fails here, with what to fix
    script = dashboard_script()
    command = [
        sys.executable,
        "-m",
        "streamlit",
        "run",
        str(script),
        "--server.address",
        args.host,
        "--server.port",
        str(args.port),
        "--server.headless",
        "false" if args.browser else "true",
        "--browser.gatherUsageStats",
        "false",
        "--theme.base",
        "light",
        "--client.toolbarMode",
        "viewer",
    ]
    env = dict(os.environ, **{DATABASE_ENV: args.db})
    print(
        f"{PROG} dashboard: http://{args.host}:{args.port} showing {redacted(args.db)}",
        file=sys.stderr,
        flush=True,
    )
    os.execve(sys.executable, command, env)  # streamlit takes over this process


SUBCOMMANDS: tuple[Callable[[Subparsers], None], ...] = (
    _add_demo,
    _add_db,
    _add_alerts,
    _add_report,
    _add_recalibrate,
    _add_profile,
    _add_serve,
    _add_dashboard,
)
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


_FLAGS = {
    name: "--" + name.replace("_", "-")
    for name in (
        "input_key",
        "num_samples",
        "prior_strength",
        "reservoir_size",
        "layers",
        "data",
        "held_out",
        "label_key",
        "token",
        "store",
        "alpha",
    )
} | {"path": "--out"}
"""Python arguments that the commands pass on from flags of (nearly) the same name: an error
about one names the flag."""
_COMMAND_FLAGS = {
    "recalibrate": {"store": "--service"},
    "profile": {"name": "--name", "version": "--version"},
}
"""Where a command passes an argument on from a flag of another name."""


def _in_flags(err: BaseException, command: str | None = None) -> str:
    """The message of ``err``, naming the command-line flag instead of the Python argument it
    was passed on as (``input_key=None is invalid`` -> ``--input-key is needed``...)."""
    from bnwatch.errors import ConfigError

    core = sys.modules.get("bnwatch.recalibration.core")  # loaded if it raised this
    if core is not None and isinstance(err, core.NotEnoughDataError):  # no --min-samples
        return (
            f"recalibration saw {err.seen} samples but needs at least {err.needed}: pass more "
            "data with --data"
        )
    flags = _FLAGS | _COMMAND_FLAGS.get(command or "", {})
    if isinstance(err, ConfigError) and err.argument in flags:
        flag = flags[err.argument]
        if err.value is None:
            return f"{flag} is needed: expected {err.allowed}"
        return str(ConfigError(flag, err.value, err.allowed))
    return str(err)


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
        print(f"{PROG} {args.command}: error: {_in_flags(err, args.command)}", file=sys.stderr)
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
