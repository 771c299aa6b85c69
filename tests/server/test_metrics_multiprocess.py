"""With --api-server-count N every API process's /metrics counts the requests of all N
(prometheus_client's multiprocess files): two worker processes record requests, a third
scrapes; the engine's own series appear once."""

from __future__ import annotations

import multiprocessing
import os

import pytest

pytest.importorskip("prometheus_client")


def _record(count: int, queue) -> None:
    from kestrel_server.metrics import ServerMetrics

    metrics = ServerMetrics(lambda: {"num_running": 0}, "tiny")
    metrics.finished.labels("tiny", "stop").inc(count)
    metrics.generation_tokens.inc(10 * count)
    queue.put(os.getpid())


def _scrape(queue) -> None:
    from kestrel_server.metrics import ServerMetrics

    metrics = ServerMetrics(lambda: {"num_running": 2}, "tiny")
    queue.put(metrics.exposition().decode())


def _value(text: str, prefix: str) -> float:
    return sum(
        float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(prefix)
    )


def test_request_series_add_up_over_processes(tmp_path, monkeypatch):
    # As the --api-server-count launcher does: set before the workers start (and import
    # prometheus_client), inherited by them.
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    pids = []
    for count in (3, 5):
        p = ctx.Process(target=_record, args=(count, queue))
        p.start()
        pids.append(queue.get(timeout=60))
        p.join(60)
    assert len(set(pids)) == 2 and len(list(tmp_path.iterdir())) >= 2
    scraper = ctx.Process(target=_scrape, args=(queue,))
    scraper.start()
    text = queue.get(timeout=60)
    scraper.join(60)
    assert (
        _value(text, 'kestrel:request_success_total{finished_reason="stop"') == 8
        or _value(text, "kestrel:request_success_total{") == 8
    ), text
    assert _value(text, "kestrel:generation_tokens_total{") == 80, text
    assert text.count("# TYPE kestrel:num_requests_running gauge") == 1
    assert _value(text, "kestrel:num_requests_running{") == 2
