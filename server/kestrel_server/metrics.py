"""Prometheus metrics (prefix `kestrel:`), one registry per app so several servers can live in
one process (tests).

Engine gauges and prefix-cache counters are read from the engine's stats snapshot at scrape
time; request histograms and token counters are fed by a RequestTracker per engine request.
Times come from the engine's RequestMetrics (wall clock, seconds), except inter-token latency,
which is the gap between consecutive token-bearing outputs as the server receives them.

With several API server processes (`--api-server-count N`) the request series live in
prometheus_client's multiprocess files (`PROMETHEUS_MULTIPROC_DIR`, which the launcher sets for
its workers): any worker's /metrics then adds up every worker's request series, and the engine
series (from the one core) appear once.

Names are vLLM's with the `kestrel:` prefix; docs/metrics.md maps each series to vLLM's and says
where the two differ. One engine request is one prompt (a completions request with k prompts
makes k); its n samples count once in the request-level series (success, token histograms,
latencies) and each in the token counters.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from kestrel.outputs import RequestOutput

PREFIX = "kestrel:"
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"  # prometheus_client's multiprocess mode
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Seconds. Request-level latencies span milliseconds (tiny models) to minutes (long outputs).
_LATENCY_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
    2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0,
)  # fmt: skip
# A request's finish reason is the most telling of its samples' (one errored sample: "error").
_REASON_ORDER = ("error", "abort", "length", "stop")


def token_buckets(max_model_len: int) -> tuple[int, ...]:
    """1, 2, 5, 10, 20, 50, ... up to `max_model_len` (vLLM's build_1_2_5_buckets)."""
    out, scale = [], 1
    while True:
        for m in (1, 2, 5):
            if m * scale > max_model_len:
                return tuple(out)
            out.append(m * scale)
        scale *= 10


_ITL_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05,
    0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0,
)  # fmt: skip


class _EngineCollector(Collector):
    """Gauges and cumulative counters straight from the engine's stats dict."""

    def __init__(
        self,
        stats: Callable[[], dict[str, Any]],
        model_name: str,
        cache_config: dict[str, str] | None = None,
    ) -> None:
        self._stats = stats
        self._model = model_name
        self._cache_config = dict(cache_config or {})

    def collect(self) -> Iterator[Metric]:
        s = self._stats()
        labels = ["model_name"]
        specs = [
            (GaugeMetricFamily, "num_requests_running", "Sequences in the running batch",
             s.get("num_running", 0)),
            (GaugeMetricFamily, "num_requests_waiting", "Sequences waiting to be scheduled",
             s.get("num_waiting", 0)),
            (GaugeMetricFamily, "kv_cache_usage_perc",
             "Fraction of KV-cache blocks in use (1 = full)", s.get("kv_cache_usage", 0.0)),
            (CounterMetricFamily, "prefix_cache_queries",
             "Prompt tokens looked up in the prefix cache", s.get("prefix_query_tokens", 0)),
            (CounterMetricFamily, "prefix_cache_hits",
             "Prompt tokens found in the prefix cache", s.get("prefix_hit_tokens", 0)),
            (CounterMetricFamily, "num_preemptions", "Preemptions of running sequences",
             s.get("num_preemptions", 0)),
        ]  # fmt: skip
        for family, name, doc, value in specs:
            metric = family(PREFIX + name, doc, labels=labels)
            metric.add_metric([self._model], float(value))
            yield metric
        yield from self._iteration_tokens(s)
        if self._cache_config:
            names = sorted(self._cache_config)
            info = GaugeMetricFamily(
                PREFIX + "cache_config_info", "KV-cache settings (labels; value 1)", labels=names
            )
            info.add_metric([self._cache_config[k] for k in names], 1.0)
            yield info

    def _iteration_tokens(self, s: dict[str, Any]) -> Iterator[Metric]:
        """Tokens per engine step, from the engine's per-bucket counts (engine/step_stats.py)."""
        bounds, counts = s.get("iteration_tokens_buckets"), s.get("iteration_tokens_counts")
        if not bounds or not counts or len(counts) != len(bounds) + 1:
            return
        cumulative, buckets = 0, []
        for bound, count in zip([*map(str, map(float, bounds)), "+Inf"], counts):
            cumulative += int(count)
            buckets.append((bound, float(cumulative)))
        metric = HistogramMetricFamily(
            PREFIX + "iteration_tokens_total", "Tokens per engine step", labels=["model_name"]
        )
        metric.add_metric([self._model], buckets, sum_value=float(s.get("iteration_tokens_sum", 0)))
        yield metric


class ServerMetrics:
    def __init__(
        self,
        stats: Callable[[], dict[str, Any]],
        model_name: str,
        *,
        max_model_len: int = 1 << 20,
        cache_config: dict[str, str] | None = None,
    ) -> None:
        self.registry = CollectorRegistry()
        self.model_name = model_name
        self._engine_collector = _EngineCollector(stats, model_name, cache_config)
        self.registry.register(self._engine_collector)
        reg, labels = self.registry, ["model_name"]

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(PREFIX + name, doc, labels, buckets=buckets, registry=reg)

        self.prompt_tokens = Counter(
            PREFIX + "prompt_tokens", "Prompt tokens of requests", labels, registry=reg
        ).labels(model_name)
        self.generation_tokens = Counter(
            PREFIX + "generation_tokens", "Generated tokens", labels, registry=reg
        ).labels(model_name)
        self.finished = Counter(
            PREFIX + "request_success",
            "Finished requests by finish reason (stop, length, abort, error)",
            ["model_name", "finished_reason"],
            registry=reg,
        )
        self.ttft = histogram(
            "time_to_first_token_seconds", "Arrival to first token", _LATENCY_BUCKETS
        ).labels(model_name)
        self.itl = histogram(
            "inter_token_latency_seconds", "Gap between consecutive token outputs", _ITL_BUCKETS
        ).labels(model_name)
        self.e2e = histogram(
            "e2e_request_latency_seconds", "Arrival to finish", _LATENCY_BUCKETS
        ).labels(model_name)
        self.queue_time = histogram(
            "request_queue_time_seconds", "Arrival to first scheduled", _LATENCY_BUCKETS
        ).labels(model_name)
        self.prefill_time = histogram(
            "request_prefill_time_seconds", "First scheduled to first token", _LATENCY_BUCKETS
        ).labels(model_name)
        self.decode_time = histogram(
            "request_decode_time_seconds", "First token to finish", _LATENCY_BUCKETS
        ).labels(model_name)
        self.inference_time = histogram(
            "request_inference_time_seconds", "First scheduled to finish", _LATENCY_BUCKETS
        ).labels(model_name)
        self.tpot = histogram(
            "request_time_per_output_token_seconds",
            "Decode time / (generated tokens - 1), per request",
            _ITL_BUCKETS,
        ).labels(model_name)
        tokens = token_buckets(max_model_len)
        self.request_prompt_tokens = histogram(
            "request_prompt_tokens", "Prompt tokens per request", tokens
        ).labels(model_name)
        self.request_generation_tokens = histogram(
            "request_generation_tokens", "Generated tokens per request (all n samples)", tokens
        ).labels(model_name)

    def tracker(self) -> RequestTracker:
        return RequestTracker(self)

    def exposition(self) -> bytes:
        shared = os.environ.get(MULTIPROC_ENV)
        if not shared:
            return generate_latest(self.registry)
        # Every API process's request series (files in `shared`), the engine's once.
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=shared)
        registry.register(self._engine_collector)
        return generate_latest(registry)


class RequestTracker:
    """Feeds the metrics from one engine request's outputs (event loop only)."""

    def __init__(self, metrics: ServerMetrics) -> None:
        self._m = metrics
        self._seen_first = False
        self._last_token_at: float | None = None
        self._done = False

    def on_output(self, output: RequestOutput) -> None:
        m = self._m
        now = time.monotonic()
        new_tokens = sum(len(c.token_ids_delta) for c in output.outputs)
        times = output.metrics
        if not self._seen_first:
            self._seen_first = True
            m.prompt_tokens.inc(len(output.prompt_token_ids))
            if times.first_token_time is not None:
                m.ttft.observe(max(0.0, times.first_token_time - times.arrival_time))
            if times.first_scheduled_time is not None:
                m.queue_time.observe(max(0.0, times.first_scheduled_time - times.arrival_time))
        elif new_tokens and self._last_token_at is not None:
            m.itl.observe(now - self._last_token_at)
        if new_tokens:
            m.generation_tokens.inc(new_tokens)
            self._last_token_at = now
        if output.finished:
            self._done = True
            self._on_finished(output)

    def _on_finished(self, output: RequestOutput) -> None:
        """The request-level series, once per engine request."""
        m, times = self._m, output.metrics
        reasons = {c.finish_reason for c in output.outputs}
        reason = next((r for r in _REASON_ORDER if r in reasons), None)
        m.finished.labels(m.model_name, reason or "stop").inc()
        end = times.finished_time if times.finished_time is not None else time.time()
        m.e2e.observe(max(0.0, end - times.arrival_time))
        generated = sum(len(c.token_ids) for c in output.outputs)
        m.request_prompt_tokens.observe(len(output.prompt_token_ids))
        m.request_generation_tokens.observe(generated)
        scheduled, first = times.first_scheduled_time, times.first_token_time
        if scheduled is not None:
            m.inference_time.observe(max(0.0, end - scheduled))
            if first is not None:
                m.prefill_time.observe(max(0.0, first - scheduled))
        if first is not None:
            decode = max(0.0, end - first)
            m.decode_time.observe(decode)
            per_sample = generated / max(1, len(output.outputs))
            if per_sample > 1:
                m.tpot.observe(decode / (per_sample - 1))

    def on_abort(self) -> None:
        if not self._done:
            self._done = True
            self._m.finished.labels(self._m.model_name, "abort").inc()
