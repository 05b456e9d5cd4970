"""One rank of the distributed recalibration tests (gloo, CPU); every scenario runs in the
same process group, one after the other, and what each rank ended with is saved to ``out``.

* ``shards``: rank r gets batches r, r+W, ... of the test data;
* ``uneven``: rank 0 gets every batch, the others none;
* ``judged``: shards as above, and a held-out shard per rank that, judged alone, would make
  the ranks disagree (``apply="if_better"``);
* ``failed``: the last rank's data has the wrong shape;
* ``too_few``: 12 samples in all, fewer than ``min_samples=16``;
* ``bad_argument``: the last rank passes ``data=None`` (refused before any pass);
* ``held_out_some``: only the first rank passes held-out data.

The scenarios whose failure left a rank waiting come last: a rank that waits in a collective
its peer skipped would match the peer's next one.
"""

from __future__ import annotations

import sys
import time
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from bnwatch.recalibration import recalibrate
from tests.recalibration.test_recalibrate import buffers, data, held_out_shards, net


def _error(err: Exception) -> dict[str, Any]:
    return {"type": type(err).__name__, "message": str(err), "rank": getattr(err, "rank", None)}


def main(init: str, rank: int, world: int, out: str) -> None:
    dist.init_process_group(
        "gloo", init_method=init, rank=rank, world_size=world, timeout=timedelta(seconds=60)
    )
    results: dict[str, Any] = {}
    try:
        mine = data(12)[rank::world]

        model = net()
        results["shards"] = recalibrate(model, mine, apply=True).state_dict()

        model = net()
        everything = data(12) if rank == 0 else []
        results["uneven"] = recalibrate(model, everything, apply=True).state_dict()

        model = net()
        shard = held_out_shards()[rank]
        judged = recalibrate(model, data(12, shift=3.0)[rank::world], held_out=shard)
        results["judged"] = {
            "status": judged.status,
            "kl_before": judged.kl_before,
            "kl_after": judged.kl_after,
            "accuracy_before": judged.accuracy_before,
            "accuracy_after": judged.accuracy_after,
            "buffers": buffers(model),
        }

        model = net()
        before = buffers(model)
        bad = [torch.randn(8, 4, 5, 5)] if rank == world - 1 else mine
        try:
            recalibrate(model, bad, apply=True)
        except Exception as err:
            results["failed"] = _error(err)
        results["failed_untouched"] = all(
            torch.equal(v, before[k]) for k, v in buffers(model).items()
        )

        try:
            recalibrate(net(), data(1, size=6, seed=rank))
        except Exception as err:
            results["too_few"] = _error(err) | {"seen": getattr(err, "seen", None)}

        def interrupted() -> Any:  # Ctrl-C in the last rank's data loader
            yield from mine[:1]
            raise KeyboardInterrupt

        model = net()
        try:
            recalibrate(model, interrupted() if rank == world - 1 else mine, apply=True)
        except KeyboardInterrupt:
            results["interrupted"] = {"type": "KeyboardInterrupt", "rank": rank}
        except Exception as err:
            results["interrupted"] = _error(err)
        results["interrupted_untouched"] = all(
            torch.equal(v, before[k]) for k, v in buffers(model).items()
        )

        for name, args in (
            ("bad_argument", {"data": None if rank == world - 1 else mine}),
            ("held_out_some", {"data": mine, "held_out": held_out_shards()[0] if rank else None}),
        ):
            start = time.monotonic()
            try:
                recalibrate(net(), **args)  # type: ignore[arg-type]
            except Exception as err:
                results[name] = _error(err) | {"seconds": time.monotonic() - start}
        torch.save(results, out)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
