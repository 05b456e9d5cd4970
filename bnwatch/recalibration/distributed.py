"""Recalibration across the ranks of ``torch.distributed``: the same outcome on every rank.

Each rank measures its own shard of the data.  The ranks then exchange *what happened* --
the mergeable moments and counts each measured, or the error that stopped it -- in one
``all_gather_object`` per phase, and every rank merges the parts in rank order.  So every
rank ends with bitwise identical statistics, the same held-out judgement (and so the same
``apply="if_better"`` decision), or the same error:

* a rank whose arguments were refused (its ``data`` None) or whose data raised (the wrong
  shape, a bad item) raises its own error, and every other rank raises
  :class:`RankFailedError` naming it -- instead of waiting in a collective for a rank that
  will never arrive;
* a rank with an empty shard, or one that never reached some layer, contributes nothing
  for it; only a layer that no rank saw is an error.

``all_gather_object`` puts its buffers where the process group needs them (the current CUDA
device under NCCL: call ``torch.cuda.set_device(local_rank)`` first, as for any NCCL
collective), so this works with gloo and NCCL alike.  Without an initialized process group
everything here is a single-rank no-op.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar, cast

import torch

from bnwatch.errors import BnwatchError

T = TypeVar("T")


class RankFailedError(BnwatchError, RuntimeError):
    """Another rank of the process group failed, so this one stops too.

    Attributes:
        rank: the first rank that failed.
        error: its error, as ``"TypeName: message"``.
    """

    def __init__(self, rank: int, error: str) -> None:
        self.rank = rank
        self.error = error
        super().__init__(
            f"recalibration failed on rank {rank} ({error}); every rank stops, nothing changed"
        )


@dataclass(frozen=True)
class _Outcome(Generic[T]):
    """What one rank sends: its value, or its error."""

    value: T | None
    error: str | None


def active() -> bool:
    """Whether a ``torch.distributed`` process group is initialized."""
    return bool(torch.distributed.is_available() and torch.distributed.is_initialized())


def exchange(compute: Callable[[], T]) -> list[T]:
    """Run ``compute`` on this rank and return every rank's result, in rank order.

    Every rank joins the exchange even when its own ``compute`` raised, so no rank is left
    waiting: the failed rank re-raises its error, the others raise :class:`RankFailedError`.
    Not distributed, this is ``[compute()]``.
    """
    if not active():
        return [compute()]
    try:
        mine: _Outcome[T] = _Outcome(compute(), None)
        failure: BaseException | None = None
    except BaseException as err:  # a KeyboardInterrupt too: the other ranks must hear of it
        mine = _Outcome(None, f"{type(err).__name__}: {err}")
        failure = err
    parts: list[_Outcome[T] | None] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(parts, mine)
    if failure is not None:
        raise failure
    values: list[T] = []
    for r, part in enumerate(parts):
        if part is None or part.error is not None:
            raise RankFailedError(r, "no answer" if part is None else str(part.error))
        values.append(cast(T, part.value))
    return values
