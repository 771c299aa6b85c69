"""DraftRunner: a smaller model with the target's tokenizer proposes k tokens per step.

The draft is a second `ModelRunner` (its model, its own per-layer KV tensors, attention backend,
host stager and, on CUDA, decode graphs); its logits and sampler are not used for the target.

KV cache: the draft's KV tensors have the target's `num_blocks` and `block_size`, indexed by the
target's block tables and slot mapping (one block id is a block in both caches: a request's
blocks, prefix hits, preemption and rollback are the one block manager's), plus a few scratch
blocks past `num_blocks` for the chain (`kestrel/spec/draft_chain.py`). Memory planning counts
the draft's bytes per block with the target's (fewer blocks) and the scratch blocks apart.

The draft's KV stays current with two passes per engine step (`Speculator` drives both):

1. `mirror(step)`: right after the target's step is enqueued (`Speculator.after_launch`), the
   draft runs over the rows the target ran (prefill chunks, verify rows, the decodes of
   sequences drafting this step: same token ids, positions and slots), writing its KV where the
   target wrote its own. Plain decode rows of sequences that are not drafting (speculation off
   for the step or for them) are left out, so a step without drafts costs (almost) no draft
   forward; `kestrel/spec/draft_kv.py` records how far each sequence's draft KV lags.
   Rejected drafts' positions are rolled back by the scheduler and overwritten later, as the
   target's are; preemption recomputes (and mirrors) from the prefix hit.
2. `propose(...)`: before the next `schedule()`, for the requests that speculate (in decode: all
   T tokens but the newest computed), k greedy decode steps, batched (one forward per draft
   position over all of them): step 0 feeds the tokens from the first position whose draft KV
   lags (usually just the newest, at T - 1), step j its draft j - 1 (on the device, no host
   round trip); the drafts come back in one copy. Chain KV goes to the request's own
   uncomputed slots or its scratch blocks (never a block of another request); the target's
   verify step then recomputes those positions in both caches. A sequence lagging more than
   `max_catch_up_tokens` catches up in parts (`catch_up`, KV only) before it drafts.

The proposer is greedy (the draft's argmax), hence deterministic: its q is one-hot, and the
runner's rejection sampler for one-hot q (`kestrel/spec/rejection.py`: a row accepts iff its
draw from the target distribution equals the draft) keeps sampled requests exact and seeded
ones reproducible. The seam for a sampled draft: `propose` would return q's rows ([n, V]
probabilities of each draft) for `rejection_sample(draft_probs=q, uniform=u)`.

CUDA graphs: chain steps without catch-up rows and all-decode mirror passes replay the draft's
`DecodeGraphs` (captured like the target's; they compute logits a mirror pass ignores);
verify-row, prefill and catch-up passes run eagerly.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

from kestrel.runner.model_runner import ModelRunner, kv_block_bytes
from kestrel.spec.draft_chain import plan_catch_up, plan_chain, scratch_blocks_per_seq

if TYPE_CHECKING:
    from kestrel.executor.step_input import StepInput

logger = logging.getLogger(__name__)


class DraftRunner:
    def __init__(
        self,
        runner: ModelRunner,
        num_speculative_tokens: int,
        max_num_seqs: int,
        max_catch_up_tokens: int = 8192,
    ) -> None:
        """`max_catch_up_tokens`: the most catch-up rows (stale draft KV) one step feeds the
        draft (the engine's max_num_batched_tokens: memory planning covers such a pass)."""
        self.runner = runner
        self.max_catch_up_tokens = max_catch_up_tokens
        self.k = num_speculative_tokens
        self.block_size = runner.block_size
        self.scratch_per_seq = scratch_blocks_per_seq(num_speculative_tokens, runner.block_size)
        self.num_scratch_blocks = max_num_seqs * self.scratch_per_seq
        self.max_num_seqs = max_num_seqs
        self.num_shared_blocks = 0  # the scheduler's num_blocks, once allocated

    @property
    def vocab_size(self) -> int:
        return self.runner.vocab_size

    def block_bytes(self) -> int:
        """Bytes of one shared block in the draft's cache (all its layers, K and V)."""
        r = self.runner
        return kv_block_bytes(r.model_config, r.block_size, r.dtype, r.num_kv_heads, r.num_layers)

    def scratch_bytes(self) -> int:
        return self.block_bytes() * self.num_scratch_blocks

    def allocate_kv_cache(self, num_blocks: int) -> None:
        """`num_blocks` shared with the target (same ids), then the chain's scratch blocks."""
        self.runner.allocate_kv_cache(num_blocks + self.num_scratch_blocks)
        self.num_shared_blocks = num_blocks

    def capture_graphs(
        self, max_num_seqs: int, max_model_len: int, piecewise_tokens: int = 0
    ) -> None:
        """Decode graphs (the chain's steps, all-decode mirrors) and, with `piecewise_tokens`
        > 0, piecewise graphs for the mirrors of steps with prefill or verify rows."""
        self.runner.capture_decode_graphs(max_num_seqs, max_model_len)
        if piecewise_tokens > 0:
            self.runner.capture_piecewise_graphs(piecewise_tokens)

    # ---- pass 1: the target's rows --------------------------------------------------------

    @torch.inference_mode()
    def mirror(self, step: StepInput) -> None:
        """The draft over the step's rows: its KV at the target's slots (no logits needed)."""
        if step.num_tokens == 0:
            return
        if step.placeholder_rows.shape[0]:
            raise RuntimeError("the draft model cannot mirror a step with placeholder rows")
        r = self.runner
        r.stager.begin_step()
        stage = r.stager.to_device
        ids = stage(step.input_ids, torch.int64)
        if r.graphs is not None and r.graphs.can_run(step):
            r.graphs.run(step, ids, stage)  # computes (unused) logits; one replay
            return
        positions = stage(step.positions, torch.int64)
        metadata = r.build_attention_metadata(step)
        if r.piecewise is not None and r.piecewise.can_run(step.num_tokens):
            r.piecewise.run(ids, positions, metadata)  # verify and prefill rows
            return
        r.model(ids, positions, r.kv_caches, metadata)

    @torch.inference_mode()
    def catch_up(
        self,
        token_runs: Sequence[np.ndarray],
        starts: Sequence[int],
        block_tables: Sequence[Sequence[int]],
    ) -> None:
        """Draft KV only (no drafts): request b's `token_runs[b]` at positions starts[b]
        onwards, positions the target has computed (a sequence far behind catches up in parts
        before it drafts again)."""
        self.mirror(plan_catch_up(token_runs, starts, block_tables, block_size=self.block_size))

    # ---- pass 2: the chain ----------------------------------------------------------------

    @torch.inference_mode()
    def propose(
        self,
        token_runs: Sequence[np.ndarray],
        num_tokens: Sequence[int],
        num_steps: Sequence[int],
        block_tables: Sequence[Sequence[int]],
    ) -> list[np.ndarray]:
        """Greedy drafts per request: `num_steps[b]` tokens following its `num_tokens[b]` (T)
        known ones. `token_runs[b]`: its tokens from the first position whose draft KV is stale
        to its newest (usually just the newest token); `block_tables[b]`: its blocks now (after
        the last update()). At most max_num_seqs requests (the scratch is sized so)."""
        num_reqs = len(token_runs)
        if num_reqs > self.max_num_seqs:
            raise ValueError(f"{num_reqs} chain rows exceed max_num_seqs={self.max_num_seqs}")
        if num_reqs == 0:
            return []
        lens = np.asarray(num_tokens, dtype=np.int64)
        plan = plan_chain(
            lens,
            num_steps,
            block_tables,
            block_size=self.block_size,
            scratch_base=self.num_shared_blocks,
            scratch_per_seq=self.scratch_per_seq,
            starts=lens - np.asarray([len(t) for t in token_runs], dtype=np.int64),
        )
        r = self.runner
        r.stager.begin_step()
        stage = r.stager.to_device
        first_ids = np.concatenate([np.asarray(token_runs[b]) for b in plan[0].rows.tolist()])
        ids = stage(first_ids.astype(np.int64))
        drafts = torch.full((num_reqs, len(plan)), -1, dtype=torch.int64, device=r.device)
        prev: torch.Tensor | None = None
        for j, chain_step in enumerate(plan):
            if prev is not None:  # this step's inputs: the previous step's argmax
                keep = chain_step.keep
                same = keep.shape[0] == prev.shape[0] and bool(
                    (keep == np.arange(keep.shape[0])).all()
                )
                ids = prev if same else prev.index_select(0, stage(keep))
            prev = self._logits(chain_step.step, ids, stage).argmax(dim=-1)  # [n_j]
            drafts[:, j].index_copy_(0, stage(chain_step.rows), prev)
        host = drafts.cpu().numpy()
        return [host[b, : int(n)] for b, n in enumerate(num_steps)]

    def _logits(self, step: StepInput, ids: torch.Tensor, stage) -> torch.Tensor:
        """Logits [n, vocab] of a chain step (every row sampled)."""
        r = self.runner
        if r.graphs is not None and r.graphs.can_run(step):
            return r.graphs.run(step, ids, stage)
        positions = stage(step.positions, torch.int64)
        hidden = r.model(ids, positions, r.kv_caches, r.build_attention_metadata(step))
        if step.num_decodes != step.num_reqs:  # catch-up rows: the last row of each request
            hidden = hidden[stage(step.logits_indices, torch.int64)]
        return r.model.compute_logits(hidden)
