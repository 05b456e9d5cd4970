"""The HTTP sink against the stand-in service: delivery, retries, rejections, the spool."""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

import bnwatch
from bnwatch.client import ENDPOINT, HttpSink, _encode_window, _join, _spool_key
from bnwatch.errors import ConfigError
from bnwatch.schema import WindowRecord
from bnwatch.service.settings import Settings
from bnwatch.sink import Sink
from bnwatch.wire import batch_of
from tests.client.conftest import ROOT, free_port, python_module, wait_for
from tests.client.server import LOSE_ANSWER, TRICKLE, FakeService
from tests.store.helpers import batches, renamed, small_cnn

Windows = Callable[[int], list[WindowRecord]]
FAST: dict[str, Any] = {"retry_initial": 0.02, "retry_max": 0.1, "timeout": 5.0}


@pytest.fixture
def sinks() -> Iterator[list[HttpSink]]:
    """Sinks to close at the end of a test, whatever happens."""
    opened: list[HttpSink] = []
    yield opened
    for sink in opened:
        sink.close(timeout=1.0)


def spool_files(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.json"))


def body_size(record: WindowRecord) -> int:
    return len(_join([_encode_window(record)]).body)


# ------------------------------------------------------------------------------------------
# configuration
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "url", ["ftp://host/x", "localhost:8000", "", "http://", "http://h:99999", "http://h/?a=1", 42]
)
def test_an_unusable_url_is_a_config_error_naming_store(url: object, spool: Path) -> None:
    with pytest.raises(ConfigError, match="http:// or https://") as info:
        HttpSink(url, spool_dir=spool)  # type: ignore[arg-type]
    assert info.value.argument == "store"


def test_credentials_in_the_url_are_refused_and_not_echoed(spool: Path) -> None:
    with pytest.raises(ConfigError) as info:
        HttpSink("https://me:s3cret@bnwatch.example", spool_dir=spool)
    assert info.value.argument == "store"
    assert "s3cret" not in str(info.value)


@pytest.mark.parametrize(
    ("url", "endpoint"),
    [
        ("http://127.0.0.1:8000", "http://127.0.0.1:8000/api/v1/windows"),
        ("https://bnwatch.example/prefix/", "https://bnwatch.example/prefix/api/v1/windows"),
        ("http://h:1/api/v1/windows", "http://h:1/api/v1/windows"),
    ],
)
def test_the_endpoint_is_derived_from_the_service_url(
    url: str, endpoint: str, spool: Path, sinks: list[HttpSink]
) -> None:
    sink = HttpSink(url, spool_dir=spool)
    sinks.append(sink)
    assert sink.endpoint == endpoint


@pytest.mark.parametrize(
    ("argument", "value"),
    [
        ("queue_size", 0),
        ("batch_size", 0),
        ("spool_max_bytes", 0),
        ("timeout", 0),
        ("retry_initial", float("inf")),
        ("retry_max", 0.01),
        ("token", "two words"),
    ],
)
def test_bad_settings_name_the_argument(argument: str, value: object, spool: Path) -> None:
    with pytest.raises(ConfigError) as info:
        HttpSink("http://h:1", spool_dir=spool, **{argument: value})  # type: ignore[arg-type]
    assert info.value.argument == argument
    if argument == "token":
        assert "two words" not in str(info.value)


def test_imports_without_torch() -> None:
    code = (
        "import sys\n"
        "sys.modules['torch'] = None\n"
        "import bnwatch.client\n"
        "assert not {k for k, v in sys.modules.items() if v is not None and 'torch' in k}\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False, cwd=ROOT
    )
    assert result.returncode == 0, result.stderr


# ------------------------------------------------------------------------------------------
# delivery
# ------------------------------------------------------------------------------------------
def test_the_body_is_the_wire_batch(windows: Windows) -> None:
    records = windows(3)
    ours = json.loads(_join([_encode_window(r) for r in records]).body)
    assert ours == json.loads(json.dumps(batch_of(records)))


def test_delivers_every_window(
    service: FakeService, windows: Windows, spool: Path, sinks: list[HttpSink]
) -> None:
    records = windows(20)
    sink = HttpSink(service.url, spool_dir=spool, batch_size=8, **FAST)
    sinks.append(sink)
    assert isinstance(sink, Sink)
    for r in records:
        sink.write(r)
    assert sink.flush(timeout=30)
    stats = sink.stats()
    assert (stats.written, stats.duplicates, stats.dropped, stats.rejected) == (20, 0, 0, 0)
    assert (stats.spooled, stats.queued, stats.failures) == (0, 0, 0)
    assert sorted(service.stored) == sorted(r.uid for r in records)
    posts = service.posts()
    assert all(len(p.uids) <= 8 for p in posts)
    assert {p.authorization for p in posts} == {None}
    assert {p.content_encoding for p in posts} == {None}  # plain JSON
    assert spool_files(spool) == []


def test_a_redelivered_window_counts_as_duplicate(
    service: FakeService, windows: Windows, spool: Path, sinks: list[HttpSink]
) -> None:
    record = windows(1)[0]
    sink = HttpSink(service.url, spool_dir=spool, **FAST)
    sinks.append(sink)
    sink.write(record)
    assert sink.flush()
    sink.write(record)
    assert sink.flush()
    stats = sink.stats()
    assert (stats.written, stats.duplicates) == (1, 1)
    assert service.stored == [record.uid]


def test_close_delivers_what_is_queued(service: FakeService, windows: Windows, spool: Path) -> None:
    sink = HttpSink(service.url, spool_dir=spool, batch_size=5, **FAST)
    for r in windows(40):
        sink.write(r)
    sink.close(timeout=30)
    stats = sink.stats()
    assert (stats.written, stats.dropped, stats.spooled) == (40, 0, 0)
    assert len(service.stored) == 40


def test_watch_streams_windows_to_the_sink(
    service: FakeService, spool: Path, sinks: list[HttpSink]
) -> None:
    net = small_cnn()
    sink = HttpSink(service.url, spool_dir=spool, **FAST)
    mon = bnwatch.watch(net, store=sink, window_seconds=None, overhead_budget=None)
    with torch.inference_mode():
        for i, x in enumerate(batches(12)):
            net(x)
            if i % 3 == 2:
                mon.flush()
    mon.close(timeout=30)
    assert sink.stats().written == 4
    assert mon.stats().windows_dropped == 0
    assert len(service.stored) == 4


def test_the_token_comes_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, windows: Windows, spool: Path, sinks: list[HttpSink]
) -> None:
    monkeypatch.setenv("BNWATCH_API_TOKEN", "from-env")
    with FakeService(token="from-env") as service:
        sink = HttpSink(service.url, spool_dir=spool, **FAST)
        sinks.append(sink)
        sink.write(windows(1)[0])
        assert sink.flush()
        assert service.posts()[0].authorization == "Bearer from-env"
        assert "from-env" not in repr(sink)


@pytest.mark.parametrize("secret", ["from-env\n", "  from-env\r\n", "\tfrom-env "])
def test_a_token_read_from_a_file_is_stripped_as_the_service_strips_it(
    monkeypatch: pytest.MonkeyPatch,
    windows: Windows,
    spool: Path,
    sinks: list[HttpSink],
    secret: str,
) -> None:
    """A secret read from a file ends in a newline: the service strips
    $BNWATCH_API_TOKEN, the client refused the same value as "not printable"."""
    monkeypatch.setenv("BNWATCH_API_TOKEN", secret)
    assert Settings.from_env().api_token == "from-env"
    with FakeService(token="from-env") as service:
        from_env = HttpSink(service.url, spool_dir=spool, **FAST)
        sinks.append(from_env)
        given = HttpSink(service.url, token=secret, spool_dir=spool / "given", **FAST)
        sinks.append(given)
        for sink in (from_env, given):
            sink.write(windows(1)[0])
            assert sink.flush()
        assert [p.authorization for p in service.posts()] == ["Bearer from-env"] * 2


def test_a_blank_token_variable_counts_as_unset(
    monkeypatch: pytest.MonkeyPatch, spool: Path, sinks: list[HttpSink]
) -> None:
    monkeypatch.setenv("BNWATCH_API_TOKEN", " \n")
    sink = HttpSink("http://h:1", spool_dir=spool)  # as the service: no token, no error
    sinks.append(sink)


@pytest.mark.parametrize(
    ("given", "env", "argument"),
    [
        (None, "two words\n", "$BNWATCH_API_TOKEN"),
        (None, "bell\a", "$BNWATCH_API_TOKEN"),
        ("two words", "fine", "token"),
        (" \n", None, "token"),
    ],
)
def test_an_invalid_token_names_where_it_came_from(
    monkeypatch: pytest.MonkeyPatch,
    spool: Path,
    given: str | None,
    env: str | None,
    argument: str,
) -> None:
    if env is None:
        monkeypatch.delenv("BNWATCH_API_TOKEN", raising=False)
    else:
        monkeypatch.setenv("BNWATCH_API_TOKEN", env)
    with pytest.raises(ConfigError) as info:
        HttpSink("http://h:1", token=given, spool_dir=spool)
    assert info.value.argument == argument
    assert str(info.value).startswith(f"{argument}='<hidden>' is invalid")
    assert "words" not in str(info.value) and "bell" not in str(info.value)


# ------------------------------------------------------------------------------------------
# failures
# ------------------------------------------------------------------------------------------
def test_503s_are_retried_until_delivered(
    service: FakeService,
    windows: Windows,
    spool: Path,
    sinks: list[HttpSink],
    caplog: pytest.LogCaptureFixture,
) -> None:
    service.plan.extend([503, 503, 503])
    records = windows(3)
    with caplog.at_level(logging.INFO, logger="bnwatch"):
        sink = HttpSink(service.url, spool_dir=spool, **FAST)
        sinks.append(sink)
        for r in records:
            sink.write(r)
        # a delivered batch is counted written before its spool file is deleted: wait for both
        assert wait_for(lambda: (s := sink.stats()).written == 3 and s.spooled == 0)
    stats = sink.stats()
    assert stats.failures == 3
    assert stats.last_error is not None and "503" in stats.last_error
    assert (stats.dropped, stats.rejected, stats.spooled) == (0, 0, 0)
    assert [p.status for p in service.posts()][-1] == 200
    assert sorted(service.stored) == sorted(r.uid for r in records)
    messages = [r.getMessage() for r in caplog.records]
    assert any("cannot send windows" in m and "503" in m for m in messages)
    assert any("is back after 3 failed attempt(s)" in m for m in messages)
    assert spool_files(spool) == []  # deleted after the 200


def test_a_lost_answer_is_resent_and_stored_once(
    service: FakeService, windows: Windows, spool: Path, sinks: list[HttpSink]
) -> None:
    service.plan.append(LOSE_ANSWER)  # stored, then the connection drops: the sink retries
    records = windows(3)
    sink = HttpSink(service.url, spool_dir=spool, **FAST)
    sinks.append(sink)
    for r in records:
        sink.write(r)
    assert sink.flush(timeout=30)
    stats = sink.stats()
    # the sink never saw the first answer: the service reports the re-sent windows as
    # duplicates; written + duplicates counts every window delivered
    assert (stats.written, stats.duplicates, stats.failures) == (0, 3, 1)
    assert [p.status for p in service.posts()] == [LOSE_ANSWER, 200]
    assert sorted(service.stored) == sorted(r.uid for r in records)  # once each


def test_backoff_grows_exponentially_up_to_retry_max(
    service: FakeService, windows: Windows, spool: Path, sinks: list[HttpSink]
) -> None:
    service.plan.extend([503] * 4)
    sink = HttpSink(service.url, spool_dir=spool, retry_initial=0.1, retry_max=10.0)
    sinks.append(sink)
    sink.write(windows(1)[0])
    assert wait_for(lambda: sink.stats().written == 1)
    times = [p.at for p in service.posts()]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert len(gaps) == 4
    for i, gap in enumerate(gaps):  # 0.1, 0.2, 0.4, 0.8 s, ± 20 % jitter, + scheduling
        nominal = 0.1 * 2**i
        assert 0.8 * nominal - 0.01 <= gap <= 1.2 * nominal + 0.3, (i, gaps)

    service.plan.extend([503] * 6)
    capped = HttpSink(
        service.url, spool_dir=spool.parent / "capped", retry_initial=0.05, retry_max=0.1
    )
    sinks.append(capped)
    start = len(service.posts())
    capped.write(windows(1)[0])
    assert wait_for(lambda: capped.stats().written == 1)
    times = [p.at for p in service.posts()[start:]]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert len(gaps) == 6
    assert min(gaps[1:]) >= 0.08 - 0.01  # 0.1 s from the second retry on ...
    assert max(gaps[3:]) <= 0.12 + 0.3, gaps  # ... not 0.4, 0.8, 1.6 s: capped


def test_retry_after_is_honoured(
    service: FakeService, windows: Windows, spool: Path, sinks: list[HttpSink]
) -> None:
    service.plan.append((503, {"Retry-After": "1"}))
    sink = HttpSink(service.url, spool_dir=spool, retry_initial=0.01, retry_max=5.0)
    sinks.append(sink)
    sink.write(windows(1)[0])
    assert wait_for(lambda: sink.stats().written == 1)
    first, second = (p.at for p in service.posts())
    assert second - first >= 0.95


def test_a_retryable_answer_is_logged_with_what_the_service_said(
    service: FakeService,
    windows: Windows,
    spool: Path,
    sinks: list[HttpSink],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A service started without a token answers every batch 503 and says why; the sink
    logged only "HTTP 503 Service Unavailable", for ever."""
    why = "ingest is disabled because the service has no API token: set BNWATCH_API_TOKEN"
    service.plan.append((503, {}, {"error": {"message": why, "field": None}}))
    with caplog.at_level(logging.WARNING, logger="bnwatch"):
        sink = HttpSink(service.url, spool_dir=spool, **FAST)
        sinks.append(sink)
        sink.write(windows(1)[0])
        assert wait_for(lambda: sink.stats().written == 1)
    last_error = sink.stats().last_error
    assert last_error is not None and "HTTP 503" in last_error and why in last_error
    assert any(
        "cannot send windows" in r.getMessage() and why in r.getMessage() for r in caplog.records
    )


def test_an_undecodable_answer_is_retried_not_lost(
    service: FakeService,
    windows: Windows,
    spool: Path,
    sinks: list[HttpSink],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A proxy answering ``Content-Encoding: gzip`` with a body that is not gzip: httpx
    raises DecodingError, neither a timeout nor a transport error.  It escaped, and the batch
    in hand was lost uncounted."""
    service.plan.extend([(503, {"Content-Encoding": "gzip"})] * 2)
    records = windows(3)
    with caplog.at_level(logging.WARNING, logger="bnwatch"):
        sink = HttpSink(service.url, spool_dir=spool, **FAST)
        sinks.append(sink)
        for r in records:
            sink.write(r)
        assert sink.flush(timeout=10)
    stats = sink.stats()
    assert (stats.written, stats.dropped, stats.rejected, stats.spooled) == (3, 0, 0, 0)
    assert stats.failures == 2
    assert stats.last_error is not None and "DecodingError" in stats.last_error
    assert sorted(service.stored) == sorted(r.uid for r in records)
    assert not any("thread failed" in r.getMessage() for r in caplog.records)


def test_an_unexpected_error_while_sending_keeps_the_windows(
    service: FakeService,
    windows: Windows,
    spool: Path,
    sinks: list[HttpSink],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Whatever goes wrong while a batch taken from the queue is sent (a bug, an error a
    library does not wrap), its windows are spooled and sent again -- they vanished."""
    sink = HttpSink(service.url, spool_dir=spool, **FAST)
    sinks.append(sink)
    deliver, calls = sink._deliver, []

    def broken_once(parts: list[Any]) -> list[Any]:
        calls.append(len(parts))
        if len(calls) == 1:
            raise RuntimeError("a bug")
        return deliver(parts)

    monkeypatch.setattr(sink, "_deliver", broken_once)
    records = windows(3)
    with caplog.at_level(logging.ERROR, logger="bnwatch"):
        for r in records:
            sink.write(r)
        assert wait_for(lambda: sink.stats().written == 3, timeout=5)
    stats = sink.stats()
    assert (stats.dropped, stats.spooled, stats.queued) == (0, 0, 0)
    assert sorted(service.stored) == sorted(r.uid for r in records)
    assert any("RuntimeError: a bug" in r.getMessage() for r in caplog.records)


def test_an_answer_trickled_a_byte_at_a_time_is_cut_at_the_timeout(
    service: FakeService,
    windows: Windows,
    spool: Path,
    sinks: list[HttpSink],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """httpx's timeout bounds each read, not the request: an answer trickled a byte every
    0.1 s held the sink's thread, and all delivery, for good (windows piled up in memory,
    nothing logged).  Each attempt now takes at most ``timeout`` in all -- on a connection
    kept alive from an earlier request too -- and fails as a timeout: spooled, retried."""
    sink = HttpSink(service.url, spool_dir=spool, retry_initial=0.02, retry_max=0.1, timeout=0.5)
    sinks.append(sink)
    first, second = windows(2)
    sink.write(first)
    assert wait_for(lambda: sink.stats().written == 1)  # its connection is kept alive
    service.plan.append(TRICKLE)
    with caplog.at_level(logging.WARNING, logger="bnwatch"):
        sink.write(second)
        assert wait_for(lambda: sink.stats().written == 2, timeout=5)
    stats = sink.stats()
    assert stats.failures == 1 and stats.dropped == 0
    assert stats.last_error is not None and "timed out" in stats.last_error
    trickled, again = service.posts()[-2:]
    assert (trickled.status, again.status) == (TRICKLE, 200)
    assert 0.4 <= again.at - trickled.at <= 0.5 + 1.0
    assert service.stored == [first.uid, second.uid]
    assert any(
        "cannot send windows" in r.getMessage() and "timed out" in r.getMessage()
        for r in caplog.records
    )


def test_an_invalid_window_is_rejected_counted_and_not_retried(
    service: FakeService,
    windows: Windows,
    spool: Path,
    sinks: list[HttpSink],
    caplog: pytest.LogCaptureFixture,
) -> None:
    good = windows(4)
    bad = renamed(good[0], uid="not a uid!")  # the service's validation refuses it: 422
    sink = HttpSink(service.url, spool_dir=spool, batch_size=8, **FAST)
    sinks.append(sink)
    with caplog.at_level(logging.ERROR, logger="bnwatch"):
        for r in [good[0], good[1], bad, good[2], good[3]]:
            sink.write(r)
        assert sink.flush(timeout=30)  # nothing left to retry
    stats = sink.stats()
    assert (stats.written, stats.rejected, stats.dropped, stats.spooled) == (4, 1, 0, 0)
    assert stats.failures == 0  # a rejection is not an outage
    assert stats.last_error is not None and "422" in stats.last_error
    assert "uid" in stats.last_error  # the service's detail says which field
    assert sorted(service.stored) == sorted(r.uid for r in good)
    # the bad window was sent while bisecting (5, 2 or 3, 1 windows), never once rejected
    with_bad = [p for p in service.posts() if bad.uid in p.uids]
    assert with_bad[-1].uids == (bad.uid,) and with_bad[-1].status == 422
    assert len(with_bad) <= 4
    assert any("rejected 1 window(s)" in r.getMessage() for r in caplog.records)


def test_413_splits_the_batch(
    windows: Windows, spool: Path, sinks: list[HttpSink], base_records: list[WindowRecord]
) -> None:
    records = [renamed(base_records[0]) for _ in range(7)]
    limit = int(2.5 * body_size(records[0]))  # two windows per request fit
    with FakeService(max_bytes=limit) as service:
        sink = HttpSink(service.url, spool_dir=spool, batch_size=8, **FAST)
        sinks.append(sink)
        for r in records:
            sink.write(r)
        assert sink.flush(timeout=30)
        stats = sink.stats()
        assert (stats.written, stats.rejected, stats.failures) == (7, 0, 0)
        statuses = [p.status for p in service.posts()]
        assert statuses[0] == 413 and 413 in statuses and statuses.count(200) >= 4
        assert all(p.size <= limit for p in service.posts() if p.status == 200)
        assert sorted(service.stored) == sorted(r.uid for r in records)


def test_a_single_window_too_large_is_rejected(
    windows: Windows, spool: Path, sinks: list[HttpSink]
) -> None:
    with FakeService(max_bytes=100) as service:
        sink = HttpSink(service.url, spool_dir=spool, **FAST)
        sinks.append(sink)
        sink.write(windows(1)[0])
        assert sink.flush()
        stats = sink.stats()
        assert (stats.written, stats.rejected, stats.spooled) == (0, 1, 0)
        assert stats.last_error is not None and "413" in stats.last_error
        assert len(service.posts()) == 1


def test_a_refused_token_is_logged_loudly_spooled_and_probed_slowly(
    windows: Windows, spool: Path, sinks: list[HttpSink], caplog: pytest.LogCaptureFixture
) -> None:
    secret = "wrong-secret-123"
    records = windows(3)
    with FakeService(token="right") as service, caplog.at_level(logging.DEBUG, logger="bnwatch"):
        sink = HttpSink(
            service.url, token=secret, spool_dir=spool, retry_initial=0.01, retry_max=0.3
        )
        sinks.append(sink)
        for r in records:
            sink.write(r)
        assert wait_for(lambda: sink.stats().spooled == 3 and sink.stats().failures >= 2)
        stats = sink.stats()
        assert (stats.written, stats.dropped, stats.rejected) == (0, 0, 0)
        assert stats.last_error is not None and "401" in stats.last_error
        assert "token" in stats.last_error
        posts = service.posts()
        gaps = [b.at - a.at for a, b in itertools.pairwise(posts)]
        assert gaps and min(gaps) >= 0.25  # probed at retry_max, not retry_initial
        errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
        assert any("401" in r.getMessage() for r in errors)
        service.token = secret  # the service is fixed: delivery resumes without a restart
        assert wait_for(lambda: sink.stats().written == 3)
        assert sorted(service.stored) == sorted(r.uid for r in records)
    assert all(secret not in r.getMessage() for r in caplog.records)
    assert secret not in repr(sink)


def test_close_does_not_wait_out_a_refused_token(
    windows: Windows, spool: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with FakeService(token="right") as service:
        sink = HttpSink(service.url, token="wrong", spool_dir=spool, retry_max=30.0)
        for r in windows(4):
            sink.write(r)
        assert wait_for(lambda: sink.stats().failures >= 1)
        started = time.monotonic()
        sink.close(timeout=20)
        assert time.monotonic() - started < 5
    stats = sink.stats()
    assert (stats.spooled, stats.dropped) == (4, 0)


def test_a_wrong_path_is_a_configuration_error(
    service: FakeService,
    windows: Windows,
    spool: Path,
    sinks: list[HttpSink],
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.ERROR, logger="bnwatch"):
        sink = HttpSink(service.url + "/not-here", spool_dir=spool, **FAST)
        sinks.append(sink)
        sink.write(windows(1)[0])
        assert wait_for(lambda: sink.stats().failures >= 1 and sink.stats().spooled == 1)
    assert any("404" in r.getMessage() for r in caplog.records)


# ------------------------------------------------------------------------------------------
# the spool
# ------------------------------------------------------------------------------------------
def test_close_timeout_leaves_the_spool_for_the_next_sink(windows: Windows, spool: Path) -> None:
    port = free_port()  # nobody listens
    url = f"http://127.0.0.1:{port}"
    records = windows(5)
    sink = HttpSink(url, spool_dir=spool, batch_size=2, retry_initial=0.05, retry_max=0.2)
    for r in records:
        sink.write(r)
    started = time.monotonic()
    sink.close(timeout=0.5)
    assert time.monotonic() - started < 3.0
    stats = sink.stats()
    assert (stats.spooled, stats.dropped, stats.written, stats.queued) == (5, 0, 0, 0)
    assert stats.failures >= 1
    assert sum(int(p.name.split("_")[1][:-6]) for p in spool_files(spool)) == 5
    with FakeService(port=port) as service:
        again = HttpSink(url, spool_dir=spool, **FAST)
        assert again.stats().spooled == 5
        assert wait_for(lambda: again.stats().written == 5)
        again.close()
        assert sorted(service.stored) == sorted(r.uid for r in records)
    assert spool_files(spool) == []


def test_spooled_windows_go_first_in_order(
    windows: Windows, spool: Path, sinks: list[HttpSink]
) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    early, late = windows(6), windows(6)
    sink = HttpSink(url, spool_dir=spool, batch_size=2, retry_initial=0.05, retry_max=0.3)
    sinks.append(sink)
    for r in early:
        sink.write(r)
    assert wait_for(lambda: sink.stats().spooled == 6)
    with FakeService(port=port) as service:
        for r in late:
            sink.write(r)
        assert sink.flush(timeout=30)
        assert service.stored == [r.uid for r in early + late]


def test_the_spool_bound_drops_the_oldest_and_counts_them(
    base_records: list[WindowRecord],
    spool: Path,
    sinks: list[HttpSink],
    caplog: pytest.LogCaptureFixture,
) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    records = [renamed(base_records[0]) for _ in range(10)]
    bound = int(3.5 * body_size(records[0]))  # room for three one-window batches
    with caplog.at_level(logging.WARNING, logger="bnwatch"):
        sink = HttpSink(
            url,
            spool_dir=spool,
            batch_size=1,
            spool_max_bytes=bound,
            retry_initial=5.0,
            retry_max=5.0,
        )
        sinks.append(sink)
        for r in records:
            sink.write(r)
        assert wait_for(lambda: sink.stats().dropped + sink.stats().spooled == 10)
    stats = sink.stats()
    assert (stats.dropped, stats.spooled) == (7, 3)
    assert sum(p.stat().st_size for p in spool_files(spool)) <= bound
    assert any("spool" in r.getMessage() and "full" in r.getMessage() for r in caplog.records)
    with FakeService(port=port) as service:
        sink.close(timeout=10)  # one more attempt at once, then the spool is delivered
        assert service.stored == [r.uid for r in records[-3:]]  # the newest survived
    assert sink.stats().written == 3


def test_a_restarted_process_delivers_the_previous_processes_spool(
    spool: Path, sinks: list[HttpSink]
) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    result = subprocess.run(
        python_module("tests.client.sender", url, str(spool), "10"),
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    sent = json.loads(result.stdout)
    assert sent["stats"]["spooled"] == 10 and sent["stats"]["dropped"] == 0
    with FakeService(port=port) as service:
        sink = HttpSink(url, spool_dir=spool, **FAST)
        sinks.append(sink)
        assert wait_for(lambda: sink.stats().written == 10)
        assert service.stored == sent["uids"]  # oldest first
    assert spool_files(spool) == []


def test_partial_writes_of_a_crash_are_ignored(
    service: FakeService, spool: Path, sinks: list[HttpSink]
) -> None:
    spool.mkdir()
    (spool / ".tmp-00000000000000000001-1_1w.json").write_text('{"schema_version":1,"win')
    (spool / "notes.txt").write_text("not a spool file")
    sink = HttpSink(service.url, spool_dir=spool, **FAST)
    sinks.append(sink)
    assert sink.stats().spooled == 0
    assert sink.flush()
    assert not (spool / ".tmp-00000000000000000001-1_1w.json").exists()
    assert (spool / "notes.txt").exists()
    assert service.posts() == []


def test_one_sink_per_spool_directory(spool: Path, sinks: list[HttpSink]) -> None:
    sinks.append(HttpSink("http://127.0.0.1:1", spool_dir=spool))
    with pytest.raises(ConfigError, match="no other open HttpSink") as info:
        HttpSink("http://127.0.0.1:1", spool_dir=spool)
    assert info.value.argument == "spool_dir"
    sinks.pop().close(timeout=0)
    sinks.append(HttpSink("http://127.0.0.1:1", spool_dir=spool))  # free again


def test_a_spool_directory_deleted_while_running_is_made_again_and_its_windows_counted(
    windows: Windows, spool: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A tmp cleaner deletes the spool directory while batches wait in it: its windows are
    lost, and said so -- they were not counted, the sink's thread failed over and over on
    the missing directory, nothing was delivered any more (new windows piled up in memory),
    and close() promised the vanished windows to the next run."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    early, late = windows(4), windows(4)
    sink = HttpSink(url, spool_dir=spool, batch_size=2, retry_initial=0.05, retry_max=0.2)
    for r in early:
        sink.write(r)
    assert wait_for(lambda: sink.stats().spooled == 4)
    shutil.rmtree(spool)
    with caplog.at_level(logging.WARNING, logger="bnwatch"), FakeService(port=port) as service:
        for r in late:
            sink.write(r)
        assert wait_for(lambda: sink.stats().written == 4, timeout=5)
        assert service.stored == [r.uid for r in late]
        assert (spool / ".lock").exists()  # made again, and locked again:
        with pytest.raises(ConfigError, match="no other open HttpSink"):
            HttpSink(url, spool_dir=spool)
        sink.close(timeout=5)
    stats = sink.stats()
    assert (stats.written, stats.dropped, stats.spooled, stats.queued) == (4, 4, 0, 0)
    messages = [r.getMessage() for r in caplog.records]
    assert any(
        f"spool directory {spool} vanished" in m and "4 spooled window(s)" in m for m in messages
    )
    assert not any("thread failed" in m or "stay spooled" in m for m in messages)


def test_an_empty_spool_directory_deleted_is_made_again_for_the_next_outage(
    windows: Windows, spool: Path, sinks: list[HttpSink]
) -> None:
    """Deleted while empty (the service up): every window of the next outage was dropped,
    "cannot spool", since nothing made the directory again."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with FakeService(port=port):
        sink = HttpSink(url, spool_dir=spool, retry_initial=0.05, retry_max=0.2)
        sinks.append(sink)
        sink.write(windows(1)[0])
        assert wait_for(lambda: sink.stats().written == 1)
    shutil.rmtree(spool)
    records = windows(3)
    for r in records:
        sink.write(r)
    assert wait_for(lambda: sink.stats().spooled == 3, timeout=5)
    assert sink.stats().dropped == 0
    assert sum(int(p.name.split("_")[1][:-6]) for p in spool_files(spool)) == 3
    with FakeService(port=port) as service:
        assert wait_for(lambda: sink.stats().written == 4, timeout=5)
        assert service.stored == [r.uid for r in records]


def test_a_spool_deleted_while_backing_off_is_not_promised_to_the_next_run(
    windows: Windows, spool: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """close() without time to try again: the windows of the deleted spool are counted
    dropped, not claimed to "stay spooled" for the next run."""
    sink = HttpSink(f"http://127.0.0.1:{free_port()}", spool_dir=spool, retry_max=30.0)
    for r in windows(3):
        sink.write(r)
    assert wait_for(lambda: sink.stats().spooled == 3)
    shutil.rmtree(spool)
    with caplog.at_level(logging.WARNING, logger="bnwatch"):
        sink.close(timeout=0)
    stats = sink.stats()
    assert (stats.spooled, stats.dropped) == (0, 3)
    assert not any("stay spooled" in r.getMessage() for r in caplog.records)


def test_spool_files_deleted_by_hand_are_counted_dropped(
    windows: Windows, spool: Path, sinks: list[HttpSink]
) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    records = windows(6)
    sink = HttpSink(url, spool_dir=spool, batch_size=2, retry_initial=0.05, retry_max=0.2)
    sinks.append(sink)
    for r in records:
        sink.write(r)
    assert wait_for(lambda: sink.stats().spooled == 6)
    spool_files(spool)[0].unlink()  # the oldest batch: the next one the sink reads
    with FakeService(port=port) as service:
        assert wait_for(lambda: sink.stats().written == 4, timeout=5)
        assert service.stored == [r.uid for r in records[2:]]
    stats = sink.stats()
    assert (stats.dropped, stats.spooled) == (2, 0)


def test_default_spools_take_free_slots_and_adopt_orphans(windows: Windows) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    first = HttpSink(url, source="replica", retry_initial=5.0, retry_max=5.0)
    second = HttpSink(url, source="replica", retry_initial=5.0, retry_max=5.0)
    other = HttpSink(url, source="elsewhere", retry_initial=5.0, retry_max=5.0)
    assert first.spool_dir.parent == second.spool_dir.parent
    assert (first.spool_dir.name, second.spool_dir.name) == ("0", "1")
    assert other.spool_dir.parent != first.spool_dir.parent
    records = windows(6)
    for r in records[:2]:
        first.write(r)
    for r in records[2:]:
        second.write(r)
    for sink in (first, second, other):
        sink.close(timeout=0.2)
    assert (first.stats().spooled, second.stats().spooled) == (2, 4)
    # restarted while the service is still down, so that nothing is delivered before the
    # count is read: one replica now, which adopts slot 1's orphans
    restarted = HttpSink(url, source="replica", **FAST)
    assert restarted.spool_dir == first.spool_dir
    assert restarted.stats().spooled == 6
    with FakeService(port=port) as service:
        assert wait_for(lambda: restarted.stats().written == 6)
        restarted.close()
        assert sorted(service.stored) == sorted(r.uid for r in records)


def test_the_default_spool_is_keyed_by_the_host_name_made_storable(
    monkeypatch: pytest.MonkeyPatch, sinks: list[HttpSink]
) -> None:
    """The host name keys the default spool as the monitor's default source has it: an
    ordinary one as it is (a spool of an earlier version is found), one that is not UTF-8
    without the UnicodeEncodeError it raised in HttpSink()."""
    url = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setattr(socket, "gethostname", lambda: "gpu-07.example.com")
    sinks.append(HttpSink(url))
    assert sinks[-1].spool_dir.parent.name == _spool_key(sinks[-1].endpoint, "gpu-07.example.com")
    monkeypatch.setattr(socket, "gethostname", lambda: "node\udcff7")
    sinks.append(HttpSink(url))
    assert sinks[-1].spool_dir.parent != sinks[0].spool_dir.parent


@contextlib.contextmanager
def hung_service() -> Iterator[str]:
    """The URL of a server that accepts connections (into its backlog) and never answers."""
    with socket.socket() as hung:
        hung.bind(("127.0.0.1", 0))
        hung.listen(16)
        yield f"http://127.0.0.1:{hung.getsockname()[1]}"


def fill(sink: HttpSink, records: list[WindowRecord], caplog: pytest.LogCaptureFixture) -> float:
    """Write the first record, wait until the sink's thread has it in flight, then write the
    rest (logging captured); returns the seconds the rest took."""
    with caplog.at_level(logging.WARNING, logger="bnwatch"):
        sink.write(records[0])
        assert wait_for(lambda: sink.stats().queued == 0)
        started = time.perf_counter()
        for r in records[1:]:
            sink.write(r)
        return time.perf_counter() - started


def test_write_never_blocks_and_a_full_queue_drops_and_counts(
    windows: Windows, spool: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with hung_service() as url:
        sink = HttpSink(url, spool_dir=spool, queue_size=5, batch_size=2, timeout=1.0)
        assert fill(sink, windows(50), caplog) < 0.5
        assert sink.dropped == 44  # 5 queued, 1 in flight
        assert any("queue is full" in r.getMessage() for r in caplog.records)
        started = time.perf_counter()
        sink.close(timeout=0.2)
        assert time.perf_counter() - started < 0.2 + 1.0 + 2.0  # timeout + HTTP timeout
        stats = sink.stats()
        assert (stats.dropped, stats.spooled, stats.written) == (44, 6, 0)


def test_a_queue_past_its_bytes_drops_and_counts(
    windows: Windows, spool: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Bounded by the bytes its windows hold as well as by their number: 3 windows' worth."""
    with hung_service() as url:
        records = windows(20)
        size = max(r.nbytes for r in records)
        sink = HttpSink(url, spool_dir=spool, queue_bytes=3 * size, batch_size=1, timeout=1.0)
        fill(sink, records, caplog)
        assert sink.dropped == 16  # 3 queued, 1 in flight
        assert any("MiB of windows" in r.getMessage() for r in caplog.records)
        sink.close(timeout=0.2)
        stats = sink.stats()
        assert (stats.dropped, stats.spooled, stats.written) == (16, 4, 0)


def test_a_spool_file_that_cannot_be_deleted_does_not_stop_delivery(
    windows: Windows, spool: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A disk remounted read-only after errors: deleting a delivered spool file fails.  The
    sink's thread died of it, and everything written afterwards stayed queued, then vanished
    uncounted at close()."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    early, late = windows(4), windows(4)
    sink = HttpSink(url, spool_dir=spool, batch_size=2, retry_initial=0.05, retry_max=0.2)
    for r in early:
        sink.write(r)
    assert wait_for(lambda: sink.stats().spooled == 4)
    unlink = Path.unlink

    def read_only(path: Path, missing_ok: bool = False) -> None:
        if path.parent == spool and path.suffix == ".json":
            raise OSError(30, "Read-only file system", str(path))
        unlink(path, missing_ok=missing_ok)

    monkeypatch.setattr(Path, "unlink", read_only)
    with caplog.at_level(logging.ERROR, logger="bnwatch"), FakeService(port=port) as service:
        assert wait_for(lambda: sink.stats().written == 4)
        for r in late:
            sink.write(r)
        assert wait_for(lambda: sink.stats().written == 8)
        sink.close(timeout=5)
        assert sorted(service.stored) == sorted(r.uid for r in early + late)
    stats = sink.stats()
    assert (stats.written, stats.dropped, stats.spooled, stats.queued) == (8, 0, 0, 0)
    assert any("cannot delete spool file" in r.getMessage() for r in caplog.records)
    assert not any("thread failed" in r.getMessage() for r in caplog.records)


@contextlib.contextmanager
def trickling_service() -> Iterator[tuple[str, threading.Event]]:
    """A server that answers every request with a status line and then one header byte
    every 0.2 s, forever: each read is quick, the request never ends.  Its URL, and an event
    set once a request arrived."""
    stop, asked = threading.Event(), threading.Event()
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(4)
    server.settimeout(0.2)

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                continue
            with conn:
                conn.recv(1 << 16)
                asked.set()
                conn.sendall(b"HTTP/1.1 200 OK\r\n")
                while not stop.wait(0.2):
                    try:
                        conn.sendall(b"X")
                    except OSError:
                        break

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.getsockname()[1]}", asked
    finally:
        stop.set()
        thread.join(5)
        server.close()


def test_close_cuts_a_request_that_never_ends_and_spools_its_windows(
    windows: Windows, spool: Path
) -> None:
    """A request whose answer never ends is cut once it has taken ``timeout`` in all; close()
    then spools its windows with the queued ones."""
    with trickling_service() as (url, asked):
        records = windows(12)
        sink = HttpSink(url, spool_dir=spool, batch_size=8, timeout=0.5)
        for r in records:
            sink.write(r)
        assert asked.wait(10)  # a batch is in flight, and stays so
        started = time.monotonic()
        sink.close(timeout=0.2)
        assert time.monotonic() - started < 0.5 + 1.0
    stats = sink.stats()
    assert (stats.written, stats.queued, stats.dropped, stats.spooled) == (0, 0, 0, 12)
    assert stats.last_error is not None and "timed out" in stats.last_error


def test_close_counts_a_request_it_cannot_wait_for_as_dropped(
    windows: Windows, spool: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A request stuck where no timeout reaches (resolving the host name, say): close() gives
    up on the thread; its windows are counted dropped, the queued ones spooled -- every
    window accounted for (the in-flight ones were lost uncounted: spooling the queue
    overwrote their count)."""
    monkeypatch.setattr(HttpSink, "_CLOSE_GRACE", 0.1)
    stuck, release = threading.Event(), threading.Event()
    sink = HttpSink(f"http://127.0.0.1:{free_port()}", spool_dir=spool, batch_size=8, timeout=0.5)

    def hang(*args: object, **kwargs: object) -> httpx.Response:
        stuck.set()
        release.wait(10)
        raise httpx.ConnectError("released")

    monkeypatch.setattr(sink._client, "post", hang)
    records = windows(12)
    for r in records:
        sink.write(r)
    assert stuck.wait(10)
    sink.close(timeout=0.2)
    stats = sink.stats()
    assert (stats.written, stats.queued) == (0, 0)
    assert stats.dropped >= 1 and stats.dropped + stats.spooled == 12
    release.set()
    assert wait_for(lambda: not sink._thread.is_alive(), timeout=5)
    after = sink.stats()  # the thread, released, does not count them again
    assert (after.written, after.dropped, after.spooled) == (0, stats.dropped, stats.spooled)


def test_write_after_close_is_counted(windows: Windows, spool: Path) -> None:
    sink = HttpSink("http://127.0.0.1:1", spool_dir=spool)
    sink.close(timeout=0)
    sink.write(windows(1)[0])
    assert sink.dropped == 1


def test_endpoint_constant_matches_the_service() -> None:
    assert ENDPOINT == "/api/v1/windows"
