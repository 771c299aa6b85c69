"""Per-step counters of the engine (cumulative, plain ints) and the periodic log line.

`StepCounters` is updated once per `LLMEngine.step_states()`; `LLMEngine.stats()` merges its
`as_stats()` into the scheduler's counters, so the same dict reaches the front ends (core
process: `CoreOutputs.stats`; in process: `AsyncLLMEngine.stats()`), the Prometheus collector
and the log line. Keys added to the stats dict:

- `prompt_tokens_computed`: prefill tokens run through the model (scheduled tokens less one
  per decode row; a recomputed preempted request counts again, a prefix-cache hit does not);
- `generation_tokens`: tokens sampled and accepted by the scheduler;
- with speculative decoding (`kestrel/spec/greedy.py`, `SpecCounters`): `spec_decode_num_drafts`,
  `spec_decode_num_draft_tokens`, `spec_decode_num_accepted_tokens`;
- `iteration_tokens_buckets` / `iteration_tokens_counts` / `iteration_tokens_sum`: the
  histogram of tokens per step (`counts[i]`: steps with at most `buckets[i]` tokens, not in a
  smaller bucket; the last count is the +Inf bucket).
"""

from __future__ import annotations

import bisect
import time
from dataclasses import dataclass, field
from typing import Any

# vLLM's buckets for vllm:iteration_tokens_total (tokens per engine step).
ITERATION_TOKEN_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)


@dataclass
class StepCounters:
    prompt_tokens_computed: int = 0
    generation_tokens: int = 0
    iteration_tokens_sum: int = 0
    # Per bucket (not cumulative), one more for +Inf.
    iteration_tokens_counts: list[int] = field(
        default_factory=lambda: [0] * (len(ITERATION_TOKEN_BUCKETS) + 1)
    )

    def record(self, num_tokens: int, num_decodes: int, num_generated: int) -> None:
        """One step: `num_tokens` scheduled, `num_decodes` of its rows decodes (one token
        each), `num_generated` tokens accepted. A step of no tokens is not counted."""
        if num_tokens <= 0:
            return
        self.prompt_tokens_computed += max(0, num_tokens - num_decodes)
        self.generation_tokens += num_generated
        self.iteration_tokens_sum += num_tokens
        self.iteration_tokens_counts[bisect.bisect_left(ITERATION_TOKEN_BUCKETS, num_tokens)] += 1

    def as_stats(self) -> dict[str, Any]:
        return {
            "prompt_tokens_computed": self.prompt_tokens_computed,
            "generation_tokens": self.generation_tokens,
            "iteration_tokens_buckets": list(ITERATION_TOKEN_BUCKETS),
            "iteration_tokens_counts": list(self.iteration_tokens_counts),
            "iteration_tokens_sum": self.iteration_tokens_sum,
        }


@dataclass
class ThroughputLog:
    """The periodic engine log line, in vLLM's words: average prompt and generation
    throughput since the previous line (the first: since this object was made, with the
    engine's counters at zero), then the scheduler's gauges. One per engine loop; `now` is
    time.monotonic()."""

    # time, prompt tokens, generation tokens, prefix hits, prefix queries at the last line
    _last: tuple[float, int, int, int, int] = field(
        default_factory=lambda: (time.monotonic(), 0, 0, 0, 0)
    )
    _last_spec: tuple[int, int, int] = (0, 0, 0)  # drafts, draft tokens, accepted tokens

    def line(self, stats: dict[str, Any], now: float) -> str:
        prompt = int(stats.get("prompt_tokens_computed", 0))
        gen = int(stats.get("generation_tokens", 0))
        hits = int(stats.get("prefix_hit_tokens", 0))
        queries = int(stats.get("prefix_query_tokens", 0))
        last, self._last = self._last, (now, prompt, gen, hits, queries)
        elapsed = now - last[0]
        prompt_tps = (prompt - last[1]) / elapsed if elapsed > 0 else 0.0
        gen_tps = (gen - last[2]) / elapsed if elapsed > 0 else 0.0
        d_queries = queries - last[4]
        hit_rate = 100.0 * (hits - last[3]) / d_queries if d_queries > 0 else 0.0
        return (
            f"Avg prompt throughput: {prompt_tps:.1f} tokens/s, "
            f"Avg generation throughput: {gen_tps:.1f} tokens/s, "
            f"Running: {stats.get('num_running', 0)} reqs, "
            f"Waiting: {stats.get('num_waiting', 0)} reqs, "
            f"KV cache usage: {100.0 * stats.get('kv_cache_usage', 0.0):.1f}%, "
            f"Prefix cache hit rate: {hit_rate:.1f}%" + self._spec_part(stats)
        )

    def _spec_part(self, stats: dict[str, Any]) -> str:
        """With speculative decoding: the draft acceptance rate and the mean acceptance length
        (tokens per drafted request-step, the bonus token included) since the last line."""
        if "spec_decode_num_drafts" not in stats:
            return ""
        now = (
            int(stats["spec_decode_num_drafts"]),
            int(stats["spec_decode_num_draft_tokens"]),
            int(stats["spec_decode_num_accepted_tokens"]),
        )
        last, self._last_spec = self._last_spec, now
        drafts, drafted, accepted = (a - b for a, b in zip(now, last))
        rate = 100.0 * accepted / drafted if drafted > 0 else 0.0
        mean_len = 1.0 + accepted / drafts if drafts > 0 else 0.0
        return f", Draft acceptance rate: {rate:.1f}%, Mean acceptance length: {mean_len:.2f}"
