import numpy as np
import pytest

from tests.core.helpers import check_invariants, core, make_scheduler, run_step


def test_config_validation():
    with pytest.raises(ValueError, match="block_size"):
        core.SchedulerConfig(num_blocks=4, block_size=0)
    with pytest.raises(ValueError, match="policy"):
        core.SchedulerConfig(num_blocks=4, policy="lifo")


def test_bad_requests_raise_and_leave_state_unchanged():
    s = make_scheduler()
    with pytest.raises(ValueError, match="empty"):
        s.add_request("a", [])
    with pytest.raises(ValueError, match="max_model_len"):
        s.add_request("a", list(range(64)))
    with pytest.raises(ValueError, match="max_tokens"):
        s.add_request("a", [1], max_tokens=0)
    with pytest.raises(ValueError, match="min_tokens"):
        s.add_request("a", [1], max_tokens=2, min_tokens=3)
    with pytest.raises(ValueError, match="out-of-range"):
        s.add_request("a", [1, -5])
    s.add_request("a", [1, 2])
    with pytest.raises(ValueError, match="already in use"):
        s.add_request("a", [3])
    with pytest.raises(KeyError, match="unknown request id"):
        s.abort("zzz")
    with pytest.raises(ValueError, match="blocks"):
        make_scheduler(num_blocks=2).add_request("big", list(range(6)), max_tokens=10)
    assert s.stats()["num_waiting"] == 1
    assert s.request_info("a")["num_prompt_tokens"] == 2
    check_invariants(s)


def test_schedule_output_arrays():
    s = make_scheduler()
    s.add_request("a", [10, 11, 12, 13, 14], max_tokens=2)
    s.add_request("b", [20, 21], max_tokens=2)
    out, upd = run_step(s, token=5)
    assert out.input_ids.tolist() == [10, 11, 12, 13, 14, 20, 21]
    assert out.positions.tolist() == [0, 1, 2, 3, 4, 0, 1]
    assert out.query_start_loc.tolist() == [0, 5, 7]
    assert out.seq_lens.tolist() == [5, 2]
    assert out.block_tables.tolist() == [[0, 1], [2, -1]]
    assert out.slot_mapping.tolist() == [0, 1, 2, 3, 4, 8, 9]
    assert out.logits_indices.tolist() == [4, 6]
    assert out.num_decodes == 0
    assert upd.token_ids.tolist() == [5, 5]
    out, upd = run_step(s, token=6)
    assert out.num_decodes == 2
    assert out.input_ids.tolist() == [5, 5]
    assert out.positions.tolist() == [5, 2]
    assert out.slot_mapping.tolist() == [5, 10]
    assert sorted(upd.finish_reasons) == ["length", "length"]
    assert not s.has_unfinished_requests()
    check_invariants(s)


def test_decodes_come_first_in_mixed_batch():
    s = make_scheduler()
    s.add_request("a", [1, 2, 3], max_tokens=4)
    run_step(s)
    s.add_request("b", [4, 5, 6, 7, 8], max_tokens=4)
    out, _ = run_step(s)
    assert out.num_decodes == 1
    assert out.query_start_loc.tolist() == [0, 1, 6]
    assert out.seq_lens.tolist() == [4, 5]


def test_chunked_prefill_splits_and_respects_budget():
    s = make_scheduler(max_num_batched_tokens=6, num_blocks=32, max_model_len=128)
    s.add_request("long", list(range(100, 117)), max_tokens=3)  # 17 tokens
    s.add_request("short", [1, 2], max_tokens=3)
    sizes = []
    while s.has_unfinished_requests():
        out, _ = run_step(s)
        assert out.num_tokens <= 6
        sizes.append(out.query_start_loc.tolist())
        check_invariants(s)
    # 17 prompt tokens in chunks of 6, 6, 5; the 1 token left in the budget goes to "short",
    # whose one-token chunk is ordered with the decodes (query length 1) ahead of the prefill.
    assert sizes[0] == [0, 6]
    assert sizes[1] == [0, 6]
    assert sizes[2] == [0, 1, 6]


def test_chunking_disabled_rejects_prompts_over_budget():
    s = make_scheduler(max_num_batched_tokens=8, enable_chunked_prefill=False)
    with pytest.raises(ValueError, match="chunked prefill"):
        s.add_request("a", list(range(6)), max_tokens=4)


def test_max_num_seqs_bounds_the_batch():
    s = make_scheduler(max_num_seqs=2, num_blocks=32)
    for i in range(4):
        s.add_request(str(i), [i + 1, i + 2], max_tokens=2)
    out, _ = run_step(s)
    assert out.num_reqs == 2
    assert s.stats()["num_waiting"] == 2


def test_prefix_hit_returns_expected_blocks_and_counts():
    s = make_scheduler()
    prompt = list(range(50, 60))  # 2 full blocks of 4 + 2 tokens
    s.add_request("a", prompt, max_tokens=3)
    run_step(s)
    table_a = s.block_table(s.request_info("a")["seq_id"])
    s.add_request("b", prompt + [1, 2, 3], max_tokens=3)
    out, _ = run_step(s)
    b = s.request_info("b")
    assert b["num_cached_prompt_tokens"] == 8
    assert b["block_table"][:2] == table_a[:2]
    for blk in table_a[:2]:
        assert s.block_ref_count(blk) == 2
    assert out.context_lens.tolist() == [10, 8]  # a decodes, b starts after its cached prefix
    st = s.stats()
    assert st["prefix_hit_tokens"] == 8
    assert st["prefix_query_tokens"] == 10 + 13
    check_invariants(s)


def test_full_prompt_hit_still_computes_last_token():
    s = make_scheduler()
    prompt = list(range(8))  # exactly 2 blocks
    s.add_request("a", prompt, max_tokens=1)
    run_step(s)
    s.add_request("b", prompt, max_tokens=1)
    out, upd = run_step(s)
    assert out.context_lens.tolist() == [4]  # only the first block may be reused
    assert out.num_tokens == 4
    assert upd.token_ids.tolist() == [7]


def test_lru_eviction_order_of_cached_prefixes():
    s = make_scheduler(num_blocks=4, max_model_len=32)
    # Each request fills one full block (4 tokens) + 1 token; finishes after 1 output token.
    for name, base in (("x", 100), ("y", 200)):
        s.add_request(name, [base + i for i in range(5)], max_tokens=1)
        run_step(s)
    free = s.free_block_ids()
    # Uncached partial blocks first, then cached full blocks in the order they were freed.
    assert free == [2, 3, 0, 1]  # 3 never used; 0 = x's cached block, 1 = y's
    assert s.stats()["num_cached_blocks"] == 2
    # x's prefix was freed first, so it is evicted first when blocks run short: z needs all
    # 3 uncached-or-older blocks (2, 3, then x's 0); y's block 1 survives.
    s.add_request("z", [300 + i for i in range(9)], max_tokens=1)
    run_step(s)
    assert s.stats()["num_evictions"] == 1
    s.add_request("y2", [200 + i for i in range(5)], max_tokens=1)
    run_step(s)
    assert s.stats()["prefix_hit_tokens"] == 4
    s.add_request("x2", [100 + i for i in range(5)], max_tokens=1)
    run_step(s)
    assert s.stats()["prefix_hit_tokens"] == 4  # x's block was evicted: no hit
    check_invariants(s)


def test_preemption_then_resumption_completes_every_request():
    s = make_scheduler(num_blocks=6, max_num_batched_tokens=32, enable_prefix_caching=False)
    for i in range(3):
        s.add_request(f"r{i}", [10 * i + j for j in range(4)], max_tokens=8)
    received = {}
    preempted = 0
    for _ in range(200):
        if not s.has_unfinished_requests():
            break
        out, upd = run_step(s)
        preempted += len(out.preempted_seq_ids)
        for seq in upd.seq_ids.tolist():
            received[seq] = received.get(seq, 0) + 1
        check_invariants(s)
    assert not s.has_unfinished_requests()
    assert preempted >= 1
    assert received == {0: 8, 1: 8, 2: 8}
    assert s.stats()["num_free_blocks"] == 6


def test_preempted_request_resumes_with_its_output():
    s = make_scheduler(num_blocks=3, enable_prefix_caching=False, max_model_len=32)
    s.add_request("old", [1, 2, 3], max_tokens=6)
    s.add_request("new", [4, 5, 6], max_tokens=6)
    victim_outputs = None
    for step in range(60):
        if not s.has_unfinished_requests():
            break
        out = s.schedule()
        if out.preempted_seq_ids.size and victim_outputs is None:
            victim = int(out.preempted_seq_ids[0])
            info = s.request_info("new" if victim == 1 else "old")
            victim_outputs = info["output_token_ids"]
            assert info["status"] == "preempted" and info["num_computed_tokens"] == 0
        s.update(np.arange(out.num_sampled, dtype=np.int64) + 20 + step)
        if victim_outputs is not None and s.contains("new"):
            info = s.request_info("new")
            assert info["output_token_ids"][: len(victim_outputs)] == victim_outputs
    assert victim_outputs is not None
    assert not s.has_unfinished_requests()


def test_abort_frees_all_blocks_waiting_or_running():
    s = make_scheduler()
    s.add_request("run", list(range(9)), max_tokens=5)
    run_step(s)
    s.add_request("wait", list(range(9)), max_tokens=5)
    assert s.stats()["num_free_blocks"] < 16
    s.abort("run")
    s.abort("wait")
    assert s.stats()["num_free_blocks"] == 16
    assert not s.has_unfinished_requests()
    check_invariants(s)


def test_finish_with_stop_reason_and_priority_policy():
    s = make_scheduler(policy="priority", max_num_seqs=1)
    s.add_request("low", [1, 2], max_tokens=4, priority=5)
    s.add_request("high", [3, 4], max_tokens=4, priority=-1)
    out, _ = run_step(s)
    assert out.seq_ids.tolist() == [1]  # "high" first despite arriving second
    s.finish("high", "stop")
    assert not s.contains("high")
    with pytest.raises(ValueError):
        s.finish("low", "bogus")


def test_eos_and_stop_token_ids_and_ignore_eos():
    s = make_scheduler()
    s.add_request("eos", [1], max_tokens=5, eos_token_ids=[7])
    s.add_request("ign", [1], max_tokens=2, eos_token_ids=[7], ignore_eos=True)
    s.add_request("stopid", [1], max_tokens=5, stop_token_ids=[7])
    _, upd = run_step(s, token=7)
    assert dict(zip(upd.finished_seq_ids.tolist(), upd.finish_reasons)) == {0: "stop", 2: "stop"}
    _, upd = run_step(s, token=7)
    assert dict(zip(upd.finished_seq_ids.tolist(), upd.finish_reasons)) == {1: "length"}


def test_update_contract_errors():
    s = make_scheduler()
    with pytest.raises(ValueError, match="without a preceding"):
        s.update(np.zeros(0, dtype=np.int64))
    s.add_request("a", [1, 2], max_tokens=2)
    out = s.schedule()
    with pytest.raises(ValueError, match="twice"):
        s.schedule()
    with pytest.raises(ValueError, match="expects 1"):
        s.update(np.zeros(2, dtype=np.int64))
    s.update(np.zeros(1, dtype=np.int64))
    assert out.input_ids.tolist() == [1, 2]  # views stay valid after later calls
