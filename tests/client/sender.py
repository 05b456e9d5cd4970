"""A sending process for restart tests: ``python -m tests.client.sender URL SPOOL_DIR N``.

Writes N one-layer windows (built from numpy, no torch) to an :class:`HttpSink`, closes it
after at most 2 seconds and prints the uids and the sink's stats as JSON.
"""

from __future__ import annotations

import dataclasses
import json
import sys

import numpy as np

from bnwatch.client import HttpSink
from tests.store.replica import window


def main(argv: list[str]) -> int:
    url, spool_dir, n = argv[0], argv[1], int(argv[2])
    rng = np.random.default_rng(0)
    records = [window(rng, "sender", i) for i in range(n)]
    sink = HttpSink(url, spool_dir=spool_dir, batch_size=4, retry_initial=0.05, retry_max=0.2)
    for record in records:
        sink.write(record)
    sink.close(timeout=2.0)
    stats = dataclasses.asdict(sink.stats())
    print(json.dumps({"uids": [r.uid for r in records], "stats": stats}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
