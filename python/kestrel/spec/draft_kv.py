"""DraftKV: where the draft model's KV cache is valid, per sequence, and which of a step's rows
the draft runs over (`DraftRunner.mirror`).

The draft's pass over the target's rows keeps its KV equal to the target's at the same slots.
Running it over every row costs a draft forward per step even when nothing is drafted (a large
batch, or sequences whose drafts keep being rejected), so plain decode rows of a sequence that
did not draft this step are left out: its draft KV falls behind, and `valid[seq_id]` (draft KV
is right for positions < valid) records by how much. When it drafts again, the chain's first
step catches up over the positions it missed (`plan_chain(starts=)`: a varlen step over
tokens valid .. T - 1, all computed by the target, in the request's own blocks) before it
proposes. Prefill chunks and verify rows are always mirrored, so a prompt's draft KV (and a
prefix-cache block's, which some request's prefill computed) is always valid.

Rules, per scheduled request with rows at positions [c, e) that are mirrored (all but the
single-row ones of sequences with a known valid that did not draft): valid becomes e
if it was >= c (or unknown: what precedes a request's first rows is a prefix hit or a mirrored
chunk); skipped rows leave it as it is; a preempted sequence forgets it (its recomputation is
mirrored again from its prefix hit); a chain over a sequence with T tokens caught it up to
T - 1 (its position T - 1 may have gone to a scratch block). At chain time valid is capped at
T - 1 (rejected drafts' positions rolled back). A block of a sequence's own decoded tokens may
reach the prefix cache while its draft KV lags; a request hitting it then drafts from a stale
draft KV there (lower acceptance, never a wrong output: the target verifies every draft), and
the lagging sequence's catch-up later rewrites those positions with the values they should
hold.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np

from kestrel.executor.step_input import StepInput


class DraftKV:
    def __init__(self) -> None:
        self.valid: dict[int, int] = {}  # seq_id -> draft KV right for positions < this

    def start_of(self, seq_id: int, num_tokens: int) -> int:
        """The first position a chain over a sequence with `num_tokens` known tokens must feed
        the draft (num_tokens - 1 when its draft KV is current)."""
        return min(self.valid.get(seq_id, num_tokens - 1), num_tokens - 1)

    def caught_up(self, seq_id: int, num_tokens: int) -> None:
        self.valid[seq_id] = num_tokens - 1

    def retain(self, seq_ids: Iterable[int]) -> None:
        """Forget sequences that left (finished, aborted): `seq_ids` are the live ones."""
        keep = set(seq_ids)
        self.valid = {s: v for s, v in self.valid.items() if s in keep}

    def rows_to_mirror(self, out: Any, chained: set[int]) -> StepInput | None:
        """The part of a step (`out`: its SchedulerOutput) the draft runs over: every request
        but the single-row ones of known sequences not in `chained` (this step's drafting
        ones). Updates `valid`; None when no row is left."""
        for seq_id in out.preempted_seq_ids.tolist():
            self.valid.pop(int(seq_id), None)
        num_reqs = int(out.seq_lens.shape[0])
        if num_reqs == 0:
            return None
        seq_ids = out.seq_ids
        qsl = np.asarray(out.query_start_loc, dtype=np.int64)
        query_lens = np.diff(qsl)  # [num_reqs]
        # Single-row requests are left out unless drafting (their draft KV is needed now) or
        # unknown here (a 1-token prompt, a recomputation after preemption): mirrored to know.
        known = np.fromiter(self.valid, dtype=np.int64, count=len(self.valid))
        keep = (query_lens > 1) | ~np.isin(seq_ids, known)
        if chained:
            keep |= np.isin(seq_ids, np.fromiter(chained, dtype=np.int64, count=len(chained)))
        for k in np.flatnonzero(keep).tolist():
            seq_id, start = int(seq_ids[k]), int(out.context_lens[k])
            if self.valid.get(seq_id, start) >= start:
                self.valid[seq_id] = int(out.seq_lens[k])
        if bool(keep.all()):
            return StepInput.from_scheduler_output(out)
        if not bool(keep.any()):
            return None
        rows = np.repeat(keep, query_lens)  # [num_tokens]
        lens = query_lens[keep]
        seq_lens = np.asarray(out.seq_lens)[keep]
        return StepInput(
            input_ids=np.asarray(out.input_ids)[rows],
            positions=np.asarray(out.positions)[rows],
            slot_mapping=np.asarray(out.slot_mapping)[rows],
            query_start_loc=np.concatenate(([0], np.cumsum(lens))).astype(np.int32),
            seq_lens=seq_lens,
            block_tables=np.ascontiguousarray(np.asarray(out.block_tables)[keep]),
            logits_indices=np.zeros(0, dtype=np.int32),
            num_decodes=int(keep[: out.num_decodes].sum()),  # decodes stay first
            max_query_len=int(lens.max()),
            max_seq_len=int(seq_lens.max()),
            max_blocks_per_seq=int(out.max_blocks_per_seq),
        )
