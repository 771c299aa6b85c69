"""Metrics parity with vLLM (issue 13, item 6): queue time ends at the first scheduling (not at
the first token), success is counted per request, the per-request token and phase histograms,
iteration_tokens_total and cache_config_info exist, and the periodic log line shows
throughput in vLLM's words."""

from __future__ import annotations

import re

import httpx
import pytest

from kestrel.engine.step_stats import ITERATION_TOKEN_BUCKETS, StepCounters, ThroughputLog
from kestrel.outputs import CompletionOutput, RequestMetrics, RequestOutput
from kestrel_server.metrics import ServerMetrics, token_buckets
from tests.server.harness import MODEL_NAME


def _samples(text: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def test_step_counters_split_prefill_from_decode_and_bucket_steps():
    c = StepCounters()
    c.record(num_tokens=100, num_decodes=4, num_generated=5)  # 96 prefill + 4 decodes
    c.record(num_tokens=8, num_decodes=8, num_generated=8)
    c.record(num_tokens=0, num_decodes=0, num_generated=0)  # an empty step: not counted
    s = c.as_stats()
    assert s["prompt_tokens_computed"] == 96 and s["generation_tokens"] == 13
    assert s["iteration_tokens_sum"] == 108 and sum(s["iteration_tokens_counts"]) == 2
    assert s["iteration_tokens_counts"][ITERATION_TOKEN_BUCKETS.index(8)] == 1  # le 8
    assert s["iteration_tokens_counts"][ITERATION_TOKEN_BUCKETS.index(128)] == 1  # le 128


def test_throughput_log_line_reads_like_vllms():
    log = ThroughputLog(_last=(0.0, 0, 0, 0, 0))
    stats = {
        "prompt_tokens_computed": 500, "generation_tokens": 250, "num_running": 3,
        "num_waiting": 1, "kv_cache_usage": 0.25, "prefix_hit_tokens": 30,
        "prefix_query_tokens": 120,
    }  # fmt: skip
    line = log.line(stats, now=10.0)
    assert line == (
        "Avg prompt throughput: 50.0 tokens/s, Avg generation throughput: 25.0 tokens/s, "
        "Running: 3 reqs, Waiting: 1 reqs, KV cache usage: 25.0%, Prefix cache hit rate: 25.0%"
    )
    # The next line covers only the interval since this one.
    assert log.line({**stats, "generation_tokens": 270}, now=20.0).startswith(
        "Avg prompt throughput: 0.0 tokens/s, Avg generation throughput: 2.0 tokens/s"
    )


def test_speculative_decoding_adds_its_counters_and_the_acceptance_rate():
    spec = {"spec_decode_num_drafts": 10, "spec_decode_num_draft_tokens": 40,
            "spec_decode_num_accepted_tokens": 30}  # fmt: skip
    log = ThroughputLog(_last=(0.0, 0, 0, 0, 0))
    line = log.line(spec, now=1.0)
    assert line.endswith("Draft acceptance rate: 75.0%, Mean acceptance length: 4.00")
    later = {"spec_decode_num_drafts": 20, "spec_decode_num_draft_tokens": 80,
             "spec_decode_num_accepted_tokens": 40}  # fmt: skip
    assert log.line(later, now=2.0).endswith(  # the interval only: 10 of 40, 10 drafts
        "Draft acceptance rate: 25.0%, Mean acceptance length: 2.00"
    )
    assert "Draft" not in ThroughputLog().line({}, now=1.0)
    s = _samples(ServerMetrics(lambda: spec, "m", max_model_len=64).exposition().decode())
    assert s['kestrel:spec_decode_num_drafts_total{model_name="m"}'] == 10
    assert s['kestrel:spec_decode_num_draft_tokens_total{model_name="m"}'] == 40
    assert s['kestrel:spec_decode_num_accepted_tokens_total{model_name="m"}'] == 30
    plain = _samples(ServerMetrics(dict, "m", max_model_len=64).exposition().decode())
    assert not any("spec_decode" in k for k in plain)


def test_token_buckets_are_1_2_5_up_to_the_context():
    assert token_buckets(100) == (1, 2, 5, 10, 20, 50, 100)
    assert token_buckets(4) == (1, 2)


def _output(reasons: list[str], tokens: int) -> RequestOutput:
    outputs = [
        CompletionOutput(i, "x", list(range(tokens)), finish_reason=r, token_ids_delta=[1])
        for i, r in enumerate(reasons)
    ]
    times = RequestMetrics(100.0, first_scheduled_time=100.5, first_token_time=101.0,
                           finished_time=103.0)  # fmt: skip
    return RequestOutput("r", "p", [1, 2, 3], outputs, True, times)


def test_success_is_per_request_with_the_most_telling_reason_and_phase_times():
    stats = {"iteration_tokens_buckets": [1, 8], "iteration_tokens_counts": [2, 1, 1],
             "iteration_tokens_sum": 30}  # fmt: skip
    m = ServerMetrics(lambda: stats, "m", max_model_len=64, cache_config={"block_size": "16"})
    m.tracker().on_output(_output(["stop", "length"], 5))  # one request of n = 2
    m.tracker().on_output(_output(["stop", "abort"], 3))
    s = _samples(m.exposition().decode())
    assert s['kestrel:request_success_total{finished_reason="length",model_name="m"}'] == 1
    assert s['kestrel:request_success_total{finished_reason="abort",model_name="m"}'] == 1
    assert 'kestrel:request_success_total{finished_reason="stop",model_name="m"}' not in s
    assert s['kestrel:request_queue_time_seconds_sum{model_name="m"}'] == pytest.approx(1.0)
    assert s['kestrel:request_prefill_time_seconds_sum{model_name="m"}'] == pytest.approx(1.0)
    assert s['kestrel:request_decode_time_seconds_sum{model_name="m"}'] == pytest.approx(4.0)
    assert s['kestrel:request_inference_time_seconds_sum{model_name="m"}'] == pytest.approx(5.0)
    assert s['kestrel:e2e_request_latency_seconds_sum{model_name="m"}'] == pytest.approx(6.0)
    assert s['kestrel:request_prompt_tokens_sum{model_name="m"}'] == 6
    assert s['kestrel:request_generation_tokens_sum{model_name="m"}'] == 16
    assert s['kestrel:request_generation_tokens_bucket{le="20.0",model_name="m"}'] == 2
    # decode 2 s over 5 - 1 and 3 - 1 tokens per sample
    assert s['kestrel:request_time_per_output_token_seconds_sum{model_name="m"}'] == (
        pytest.approx(2.0 / 4 + 2.0 / 2)
    )
    assert s['kestrel:iteration_tokens_total_bucket{le="1.0",model_name="m"}'] == 2
    assert s['kestrel:iteration_tokens_total_bucket{le="8.0",model_name="m"}'] == 3
    assert s['kestrel:iteration_tokens_total_bucket{le="+Inf",model_name="m"}'] == 4
    assert s['kestrel:iteration_tokens_total_sum{model_name="m"}'] == 30
    assert s['kestrel:cache_config_info{block_size="16"}'] == 1


def test_engine_queue_time_ends_before_the_first_token(offline):
    """The first scheduling is stamped when the step is scheduled, before the forward pass and
    sampling (it was stamped after them, so queue time equalled TTFT)."""
    from kestrel.sampling_params import SamplingParams

    engine = offline.engine
    engine.add_request("q", "hello there", SamplingParams(max_tokens=2, ignore_eos=True))
    outputs = []
    while engine.has_unfinished_requests():
        outputs += engine.step()
    times = outputs[-1].metrics
    assert times.arrival_time <= times.first_scheduled_time < times.first_token_time


def test_server_metrics_over_the_process_split(server):
    before = _samples(httpx.get(server.url + "/metrics", timeout=30).text)
    body = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 4, "n": 2, "ignore_eos": True}  # fmt: skip
    r = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    after = _samples(httpx.get(server.url + "/metrics", timeout=30).text)
    success = 'kestrel:request_success_total{finished_reason="length",model_name="tiny"}'
    assert after[success] - before.get(success, 0) == 1  # one request, two samples

    def delta(name: str) -> float:
        return after[name] - before.get(name, 0.0)

    label = '{model_name="tiny"}'
    assert delta(f"kestrel:request_generation_tokens_sum{label}") == 8
    assert delta(f"kestrel:request_queue_time_seconds_count{label}") == 1
    assert delta(f"kestrel:request_queue_time_seconds_sum{label}") < delta(
        f"kestrel:time_to_first_token_seconds_sum{label}"
    )
    assert delta(f"kestrel:request_prefill_time_seconds_count{label}") == 1
    assert delta(f"kestrel:iteration_tokens_total_count{label}") >= 4
    assert any(re.match(r"kestrel:cache_config_info\{.*block_size=\"16\"", k) for k in after)
