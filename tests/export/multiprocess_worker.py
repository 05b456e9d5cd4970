"""Processes of the multi-process exporter test (run with PROMETHEUS_MULTIPROC_DIR set).

``python -m tests.export.multiprocess_worker write RECORDS.pkl`` -- export pickled windows from
a process of its own, then exit (prints its pid).
``python -m tests.export.multiprocess_worker serve RECORDS_A.pkl RECORDS_B.pkl`` -- run one
writer per file, one after the other, serve the aggregate, scrape it, mark the second writer
dead, scrape again; prints JSON ``{"pids", "before", "after", "sibling_serve"}``.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import urllib.request
from pathlib import Path

from prometheus_client.multiprocess import mark_process_dead

from bnwatch.export.monitor import MonitorExporter
from bnwatch.sink import MemorySink


def write(path: str) -> None:
    records = pickle.loads(Path(path).read_bytes())
    sink = MemorySink()
    exporter = MonitorExporter(sink)
    for record in records:
        exporter.write(record)
    exporter.close()
    assert len(sink.windows) == len(records)
    assert "torch" not in sys.modules, "exporting must not import torch"
    print(os.getpid())


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        body: bytes = response.read()
    return body.decode()


def serve(paths: list[str]) -> None:
    pids = []
    for path in paths:
        out = subprocess.run(
            [sys.executable, "-m", "tests.export.multiprocess_worker", "write", path],
            capture_output=True,
            text=True,
            check=True,
            timeout=120,
        )
        pids.append(int(out.stdout.strip()))
    exporter = MonitorExporter()
    server = exporter.serve(0)
    assert server is not None
    port = server.server_port
    before = scrape(port)
    sibling = MonitorExporter().serve(port)  # another worker finds the port taken
    mark_process_dead(pids[-1])
    after = scrape(port)
    exporter.close()
    print(json.dumps({"pids": pids, "before": before, "after": after, "sibling_serve": sibling}))


if __name__ == "__main__":
    if sys.argv[1] == "write":
        write(sys.argv[2])
    else:
        serve(sys.argv[2:])
