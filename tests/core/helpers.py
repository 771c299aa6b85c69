import numpy as np
import pytest

core = pytest.importorskip("kestrel._core")


def make_scheduler(**kw):
    cfg = {
        "num_blocks": 16,
        "block_size": 4,
        "max_num_seqs": 8,
        "max_num_batched_tokens": 64,
        "max_model_len": 64,
    }
    cfg.update(kw)
    return core.Scheduler(core.SchedulerConfig(**cfg))


def run_step(sched, token=7):
    """schedule() + update() sampling `token` for every sampled row; returns (out, upd)."""
    out = sched.schedule()
    upd = sched.update(np.full(out.num_sampled, token, dtype=np.int64))
    return out, upd


def check_invariants(sched):
    """No block leaked or double-owned; free + used = total."""
    total = sched.config.num_blocks
    owners = {}
    for seq in list(sched.running_seq_ids()) + list(sched.waiting_seq_ids()):
        table = sched.block_table(seq)
        assert len(table) == len(set(table)), f"seq {seq} holds a block twice: {table}"
        for b in table:
            owners[b] = owners.get(b, 0) + 1
    free = sched.free_block_ids()
    assert len(free) == len(set(free))
    for b in free:
        assert b not in owners, f"block {b} is free and owned"
        assert sched.block_ref_count(b) == 0
    for b, n in owners.items():
        assert sched.block_ref_count(b) == n, f"block {b}: ref {sched.block_ref_count(b)} != {n}"
    assert len(free) + len(owners) == total
    assert sched.stats()["num_free_blocks"] == len(free)
