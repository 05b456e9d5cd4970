"""One rank of the distributed recalibration test (gloo, CPU): rank r gets batches r, r+W, ..."""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist

from bnwatch.recalibration import recalibrate
from tests.recalibration.test_recalibrate import data, net


def main(init: str, rank: int, world: int, out: str) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        model = net()
        mine = data(12)[rank::world]
        result = recalibrate(model, mine, apply=True)
        torch.save(result.state_dict(), out)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
