"""Errors a user can act on.

Every error bnwatch raises for bad input is a :class:`ValueError` subclass that carries the
offending data as attributes, so callers can both read the message and handle it in code.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterable, Mapping
from typing import Any


class BnwatchError(Exception):
    """Base class of all bnwatch errors."""


class ConfigError(BnwatchError, ValueError):
    """An argument or configuration value is invalid.

    Attributes:
        argument: the argument's name, as the caller spelled it.
        value: the rejected value.
        allowed: a human description of what is accepted.
    """

    def __init__(self, argument: str, value: Any, allowed: str) -> None:
        self.argument = argument
        self.value = value
        self.allowed = allowed
        if value is UNSET:
            super().__init__(f"{argument} is unset: expected {allowed}")
        else:
            super().__init__(f"{argument}={value!r} is invalid: expected {allowed}")


class _Unset:
    def __repr__(self) -> str:
        return "UNSET"


UNSET: Any = _Unset()
"""The ``value`` of a :class:`ConfigError` for a setting that is missing (an environment
variable not set), so the message says "unset" instead of showing ``None``."""


class NoBatchNormError(BnwatchError, ValueError):
    """The model has no BatchNorm layer to watch (or the filters excluded all of them)."""

    def __init__(
        self,
        model_type: str,
        include: Iterable[str] | None,
        exclude: Iterable[str] | None,
        others: Mapping[str, int] | None = None,
        per_sample: Mapping[str, int] | None = None,
    ):
        self.model_type = model_type
        self.include = list(include) if include is not None else None
        self.exclude = list(exclude) if exclude is not None else None
        self.others = dict(others or {})  # kinds with running statistics: count
        self.per_sample = dict(per_sample or {})  # kinds that store no statistics: count
        if self.include is None and self.exclude is None:
            hint = (
                "bnwatch watches torch.nn BatchNorm1d/2d/3d, SyncBatchNorm and frozen "
                "BatchNorm (FrozenBatchNorm2d) layers; this model has none"
            )
            if self.others:
                hint += (
                    " -- its layers with running statistics are of other kinds, which are not "
                    f"watched: {_counted(self.others)}"
                )
            elif self.per_sample:
                hint += (
                    f" -- it normalizes with {_counted(self.per_sample)}, which compute their "
                    "statistics from each input and store none: there is nothing to compare "
                    "production with"
                )
            else:
                hint += (
                    " (a model whose BatchNorm was folded into its convolutions, by "
                    "fuse_modules, quantization or an export, has none left: watch the "
                    "unfused model)"
                )
        else:
            hint = (
                f"no BatchNorm layer matches include={self.include} exclude={self.exclude}; "
                "patterns are fnmatch globs on qualified module names such as 'layer1.*.bn2'"
            )
        super().__init__(f"{model_type}: nothing to watch: {hint}")


def _counted(kinds: Mapping[str, int]) -> str:
    """``{"LayerNorm": 2}`` as ``"2 LayerNorm"``, kinds in name order."""
    return ", ".join(f"{n} {kind}" for kind, n in sorted(kinds.items()))


class ReferenceMismatchError(BnwatchError, ValueError):
    """A reference profile does not fit the watched model (layers or channel counts differ)."""

    def __init__(self, layer: str, expected: int | None, found: int | None) -> None:
        self.layer = layer
        self.expected = expected
        self.found = found
        if found is None:
            detail = "is missing from the reference profile"
        elif expected is None:
            detail = "is in the reference profile but not among the watched layers"
        else:
            detail = f"has {expected} channels in the model but {found} in the reference profile"
        super().__init__(
            f"layer {layer!r} {detail}; record the profile from the same model architecture "
            "with bnwatch.profile(model, loader)"
        )


class ShapeError(BnwatchError, ValueError):
    """Arrays handed to bnwatch have shapes that do not fit together."""

    def __init__(self, what: str, expected: Any, found: Any) -> None:
        self.what = what
        self.expected = expected
        self.found = found
        super().__init__(f"{what}: expected shape {expected}, found {found}")


class ProfileNotFoundError(BnwatchError, LookupError):
    """No reference profile is stored for a model version.

    Attributes:
        model, version: the model version asked for.
    """

    def __init__(self, model: str, version: str, where: str) -> None:
        self.model = model
        self.version = version
        super().__init__(
            f"no reference profile of {model}@{version} in {where}: record one from validation "
            "data with bnwatch profile (or bnwatch.profile(..., store=...)) first"
        )


class ProfileFileError(BnwatchError, ValueError):
    """A file given as a reference profile is not one :meth:`bnwatch.Profile.save` wrote (or
    it was truncated or edited): says which file and what is wrong with it.

    Attributes:
        path: the file.
    """

    def __init__(self, path: Any, problem: str) -> None:
        self.path = path
        super().__init__(f"profile file {path}: {problem}")


class NonFiniteDataError(BnwatchError, ValueError):
    """A layer received fewer than 2 finite values in some channel: its inputs there were
    NaN or infinite, which the statistics exclude, leaving no mean or variance to estimate
    (a count of 0 would give mean 0 and variance 0: a profile, or running statistics, that
    look measured but are not).

    Attributes:
        layer: the layer's qualified name.
        channels: the channels with fewer than 2 finite values.
        finite: the fewest finite values any channel received.
    """

    def __init__(self, what: str, layer: str, channels: list[int], finite: int) -> None:
        self.layer = layer
        self.channels = channels
        self.finite = finite
        listed = ", ".join(map(str, channels[:8])) + (", ..." if len(channels) > 8 else "")
        super().__init__(
            f"{what}: layer {layer!r} received fewer than 2 finite values in "
            f"{len(channels)} channel{'s' if len(channels) > 1 else ''} ({listed}; the fewest: "
            f"{finite}): its inputs were NaN or infinite there, so there are no statistics to "
            "estimate; pass data on which the model computes finite values"
        )


class RecalibrationNotFoundError(BnwatchError, LookupError):
    """No recalibration with this id is stored.

    Attributes:
        recalibration_id: the id that was asked for.
    """

    def __init__(self, recalibration_id: int) -> None:
        self.recalibration_id = recalibration_id
        super().__init__(
            f"no recalibration {recalibration_id} in the store: use the id of the trigger's "
            "event (recalibration_id) or of a requested recalibration (GET /api/v1/recalibrations "
            "lists them)"
        )


class RecalibrationStateError(BnwatchError, ValueError):
    """A recalibration cannot be finished because it is no longer ``pending``.

    Attributes:
        recalibration_id: the recalibration.
        status: its current status (``applied``, ``rejected`` or ``failed``).
    """

    def __init__(self, recalibration_id: int, status: str) -> None:
        self.recalibration_id = recalibration_id
        self.status = status
        super().__init__(
            f"recalibration {recalibration_id} is already {status}: only a pending "
            "recalibration can be finished, once (request a new recalibration to report "
            "another run)"
        )


class RecalibrationBuffersError(BnwatchError, ValueError):
    """Recalibrated buffers do not fit the model version they were reported for.

    Attributes:
        layer: the layer whose buffers are refused.
        field: ``running_mean``, ``running_var``, ``eps`` or ``None`` (the layer itself).
        expected: what the store holds (e.g. the stored channel count), if that is the point.
        found: what was reported.
    """

    def __init__(
        self,
        layer: str,
        message: str,
        *,
        field: str | None = None,
        expected: Any = None,
        found: Any = None,
    ) -> None:
        self.layer = layer
        self.field = field
        self.expected = expected
        self.found = found
        super().__init__(message)


def first_line(err: BaseException, limit: int = 300) -> str:
    """The first line of an error's message (at most ``limit`` characters), or its type's
    name when it has none: what a one-line report of it shows."""
    text = str(err).strip()
    return text.splitlines()[0][:limit] if text else type(err).__name__


def python_number(value: Any) -> str:
    """What to add to a refusal of a number that is not a Python one (a numpy scalar, whose
    type would follow it into JSON and the store): how to pass it."""
    if isinstance(value, (bool, int, float)):
        return ""
    if isinstance(value, numbers.Integral):
        return " (a Python int: pass int(value))"
    if isinstance(value, numbers.Real):
        return " (a Python float: pass float(value))"
    return ""


def check_positive_int(argument: str, value: Any, *, minimum: int = 1) -> int:
    """Return ``value`` if it is an ``int`` ≥ ``minimum``, else raise :class:`ConfigError`."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(argument, value, f"an integer >= {minimum}{python_number(value)}")
    return value


def check_probability(argument: str, value: Any, *, open_low: bool = True) -> float:
    """Return ``value`` as float if it lies in (0, 1) (or [0, 1) with ``open_low=False``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(argument, value, f"a number between 0 and 1{python_number(value)}")
    low_ok = value > 0 if open_low else value >= 0
    if not (low_ok and value < 1):
        bound = "(0, 1)" if open_low else "[0, 1)"
        raise ConfigError(argument, value, f"a number in {bound}")
    return float(value)


def check_nonnegative(argument: str, value: Any) -> float:
    """Return ``value`` as float if it is a finite number ≥ 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise ConfigError(argument, value, f"a finite number >= 0{python_number(value)}")
    if value == float("inf"):
        raise ConfigError(argument, value, "a finite number >= 0")
    return float(value)
