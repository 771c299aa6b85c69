"""The draft model's k greedy decode steps ("the chain") as plain arrays, one StepInput each.

A request in decode has T known tokens, of which T - 1 are computed (target and draft KV alike;
`kestrel/spec/draft_runner.py` says why the draft's KV is current). Chain step j (0 .. n - 1)
feeds the draft the token at position T - 1 + j (step 0: the request's newest token; step j > 0:
draft j - 1, produced by step j - 1 on the device) and writes the draft's KV there; its argmax
is draft j. The KV of those positions must land in slots the chain may use:

- positions inside the request's allocated blocks (its block table now, after the last
  update()) go to those blocks: they are this request's alone (a block reaches the prefix cache
  only when full of known tokens, and position T - 1 is the first one not computed, so its block
  and the later ones are not shared), and the draft's later passes over the verify rows
  overwrite them anyway;
- positions past the allocated blocks go to the request's scratch blocks: `scratch_per_seq`
  blocks of the draft's own cache past the shared pool's `num_blocks` (ids the scheduler never
  hands out), one group per chain row. Their KV is only read by the chain's own later steps.

So the chain never writes into a block of another request, needs no slot the scheduler has not
given out, and no draft is dropped at a block boundary. Requests leave the chain after their
own n steps (n: the drafts the scheduler accepts for them, trimmed to max_tokens and
max_model_len), so later steps may have fewer rows; `keep` maps each row to its row in the
previous step (whose argmax is this row's input).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from kestrel.executor.step_input import StepInput


@dataclass(frozen=True)
class ChainStep:
    rows: np.ndarray  # [n_j] int64: the batch requests in this step (increasing)
    keep: np.ndarray  # [n_j] int64: each row's index among the previous step's rows
    step: StepInput  # input_ids are zeros: the real ids are on the device


def scratch_blocks_per_seq(num_speculative_tokens: int, block_size: int) -> int:
    """Blocks a chain row may need past its allocated ones: its k positions start at most at
    a block boundary past them."""
    return -(-num_speculative_tokens // block_size)


def plan_chain(
    num_tokens: Sequence[int] | np.ndarray,
    num_steps: Sequence[int] | np.ndarray,
    block_tables: Sequence[Sequence[int]],
    *,
    block_size: int,
    scratch_base: int,
    scratch_per_seq: int,
) -> list[ChainStep]:
    """The chain's steps for B requests: `num_tokens[b]` (T) known tokens, `num_steps[b]` >= 1
    drafts to make, `block_tables[b]` its allocated blocks; row b's scratch blocks are
    scratch_base + b * scratch_per_seq + (0 .. scratch_per_seq - 1)."""
    lens = np.asarray(num_tokens, dtype=np.int64)
    steps = np.asarray(num_steps, dtype=np.int64)
    num_reqs = int(lens.shape[0])
    if steps.shape != (num_reqs,) or len(block_tables) != num_reqs:
        raise ValueError(
            f"plan_chain: {num_reqs} requests but {steps.shape[0]} step counts and "
            f"{len(block_tables)} block tables"
        )
    if num_reqs == 0:
        return []
    if int(steps.min()) < 1 or int(lens.min()) < 1:
        raise ValueError(
            f"plan_chain: every request needs >= 1 token and >= 1 step; got tokens {lens.tolist()}"
            f", steps {steps.tolist()}"
        )
    table_lens = np.asarray([len(t) for t in block_tables], dtype=np.int64)
    short = np.flatnonzero(table_lens * block_size < lens - 1)
    if short.shape[0]:
        b = int(short[0])
        raise ValueError(
            f"plan_chain: request {b} has {int(lens[b])} tokens but blocks for only "
            f"{int(table_lens[b]) * block_size}: its first {int(lens[b]) - 1} must be computed"
        )
    last = lens - 2 + steps  # the last position each request writes
    over = np.flatnonzero(last // block_size >= table_lens + scratch_per_seq)
    if over.shape[0]:
        raise ValueError(
            f"plan_chain: request {int(over[0])} needs more than {scratch_per_seq} scratch "
            f"blocks for {int(steps[over[0]])} steps"
        )
    width = int(table_lens.max()) + scratch_per_seq
    tables = np.full((num_reqs, width), -1, dtype=np.int64)  # real blocks, then scratch ones
    for b, table in enumerate(block_tables):
        n = len(table)
        tables[b, :n] = table
        tables[b, n : n + scratch_per_seq] = (
            scratch_base + b * scratch_per_seq + np.arange(scratch_per_seq)
        )
    out: list[ChainStep] = []
    prev_rows = np.arange(num_reqs, dtype=np.int64)
    for j in range(int(steps.max())):
        rows = np.flatnonzero(steps > j).astype(np.int64)
        keep = np.searchsorted(prev_rows, rows).astype(np.int64)
        positions = lens[rows] - 1 + j  # [n_j]
        blocks = tables[rows, positions // block_size]
        slots = blocks * block_size + positions % block_size
        seq_lens = positions + 1
        num_blocks = int((-(-seq_lens // block_size)).max())
        n = int(rows.shape[0])
        step = StepInput(
            input_ids=np.zeros(n, dtype=np.int64),
            positions=positions,
            slot_mapping=slots,
            query_start_loc=np.arange(n + 1, dtype=np.int32),
            seq_lens=seq_lens.astype(np.int32),
            block_tables=np.ascontiguousarray(tables[rows, :num_blocks], dtype=np.int32),
            logits_indices=np.arange(n, dtype=np.int32),
            num_decodes=n,
            max_query_len=1,
            max_seq_len=int(seq_lens.max()),
            max_blocks_per_seq=num_blocks,
        )
        out.append(ChainStep(rows, keep, step))
        prev_rows = rows
    return out
