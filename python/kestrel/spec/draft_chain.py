"""The draft model's k greedy decode steps ("the chain") as plain arrays, one StepInput each.

A request in decode has T known tokens, of which T - 1 are computed (target KV; the draft's KV
is current up to some position, `kestrel/spec/draft_kv.py`). Chain step j (0 .. n - 1) feeds
the draft the token at position T - 1 + j (step 0: the request's newest token, after any
catch-up rows over positions whose draft KV fell behind; step j > 0: draft j - 1, produced by
step j - 1 on the device) and writes the draft's KV there; its argmax is draft j. The KV of those positions must land in slots the chain may use:

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

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from kestrel.executor.step_input import StepInput


@dataclass(frozen=True)
class ChainStep:
    rows: np.ndarray  # [n_j] int64: the batch requests in this step, in row order
    keep: np.ndarray  # [n_j] int64: each row's index among the previous step's rows (step 0:
    # the request itself)
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
    starts: Sequence[int] | np.ndarray | None = None,
) -> list[ChainStep]:
    """The chain's steps for B requests: `num_tokens[b]` (T) known tokens, `num_steps[b]` >= 1
    drafts to make, `block_tables[b]` its allocated blocks; row b's scratch blocks are
    scratch_base + b * scratch_per_seq + (0 .. scratch_per_seq - 1). `starts[b]` (default
    T - 1): step 0 feeds request b's tokens at positions starts[b] .. T - 1 (a catch-up over
    positions whose draft KV fell behind: `kestrel/spec/draft_kv.py`) and samples the last;
    step 0 lists its single-row requests first (decodes first, as the scheduler does)."""
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
    first = lens - 1 if starts is None else np.asarray(starts, dtype=np.int64)
    if first.shape != (num_reqs,) or bool(((first < 0) | (first > lens - 1)).any()):
        raise ValueError(f"plan_chain: starts {first.tolist()} must lie in [0, T - 1] per request")
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
    run_lens = lens - first  # step 0's rows per request (>= 1)
    order = np.argsort(run_lens > 1, kind="stable").astype(np.int64)  # single rows first
    out = [_step(order, first[order], run_lens[order], tables, block_size, order)]
    slot_of = np.full(num_reqs, -1, dtype=np.int64)  # a request's row in the previous step
    for j in range(1, int(steps.max())):
        slot_of[out[-1].rows] = np.arange(out[-1].rows.shape[0])
        rows = np.flatnonzero(steps > j).astype(np.int64)
        ones = np.ones(rows.shape[0], dtype=np.int64)
        out.append(_step(rows, lens[rows] - 1 + j, ones, tables, block_size, slot_of[rows]))
    return out


def _step(
    rows: np.ndarray,
    first: np.ndarray,
    run_lens: np.ndarray,
    tables: np.ndarray,
    block_size: int,
    keep: np.ndarray,
) -> ChainStep:
    """Requests `rows`, each feeding positions first .. first + run_len - 1 (its last row
    sampled)."""
    n = int(rows.shape[0])
    qsl = np.concatenate(([0], np.cumsum(run_lens))).astype(np.int32)
    owner = np.repeat(np.arange(n), run_lens)  # [num_tokens]: each row's request
    positions = first[owner] + np.arange(int(qsl[-1])) - qsl[:-1][owner]
    blocks = tables[rows[owner], positions // block_size]
    seq_lens = first + run_lens  # [n]
    num_blocks = int((-(-seq_lens // block_size)).max())
    step = StepInput(
        input_ids=np.zeros(int(qsl[-1]), dtype=np.int64),
        positions=positions,
        slot_mapping=blocks * block_size + positions % block_size,
        query_start_loc=qsl,
        seq_lens=seq_lens.astype(np.int32),
        block_tables=np.ascontiguousarray(tables[rows, :num_blocks], dtype=np.int32),
        logits_indices=(qsl[1:] - 1).astype(np.int32),
        num_decodes=int((run_lens == 1).sum()),
        max_query_len=int(run_lens.max()),
        max_seq_len=int(seq_lens.max()),
        max_blocks_per_seq=num_blocks,
    )
    return ChainStep(rows, keep, step)


def plan_catch_up(
    token_runs: Sequence[np.ndarray],
    starts: Sequence[int] | np.ndarray,
    block_tables: Sequence[Sequence[int]],
    *,
    block_size: int,
) -> StepInput:
    """A draft forward that only writes KV (no drafts): request b feeds `token_runs[b]` at
    positions starts[b] onwards, all of them computed by the target already (so inside its
    allocated blocks); single-row requests first."""
    first = np.asarray(starts, dtype=np.int64)
    run_lens = np.asarray([len(t) for t in token_runs], dtype=np.int64)
    num_reqs = int(first.shape[0])
    if num_reqs == 0 or run_lens.shape != (num_reqs,) or len(block_tables) != num_reqs:
        raise ValueError(
            f"plan_catch_up: {len(token_runs)} runs, {num_reqs} starts and "
            f"{len(block_tables)} block tables (at least one of each, as many)"
        )
    table_lens = np.asarray([len(t) for t in block_tables], dtype=np.int64)
    bad = np.flatnonzero((run_lens < 1) | (first + run_lens > table_lens * block_size))
    if bad.shape[0]:
        b = int(bad[0])
        raise ValueError(
            f"plan_catch_up: request {b}'s run of {int(run_lens[b])} tokens from position "
            f"{int(first[b])} is empty or leaves its {int(table_lens[b])} blocks"
        )
    tables = np.full((num_reqs, int(table_lens.max())), -1, dtype=np.int64)
    for b, table in enumerate(block_tables):
        tables[b, : len(table)] = table
    order = np.argsort(run_lens > 1, kind="stable").astype(np.int64)
    step = _step(order, first[order], run_lens[order], tables, block_size, order).step
    ids = np.concatenate([np.asarray(token_runs[b], dtype=np.int64) for b in order.tolist()])
    return dataclasses.replace(step, input_ids=ids, logits_indices=np.zeros(0, dtype=np.int32))
