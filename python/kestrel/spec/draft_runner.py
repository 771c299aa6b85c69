"""DraftRunner: a smaller model with the target's tokenizer proposes k tokens per step.

The draft is a second `ModelRunner` (its model, its own per-layer KV tensors, attention backend,
host stager and, on CUDA, decode graphs); its logits and sampler are not used for the target.

KV cache: the draft's KV tensors have the target's `num_blocks` and `block_size`, indexed by the
target's block tables and slot mapping (one block id is a block in both caches: a request's
blocks, prefix hits, preemption and rollback are the one block manager's), plus a few scratch
blocks past `num_blocks` for the chain (`kestrel/spec/draft_chain.py`). Memory planning counts
the draft's bytes per block with the target's (fewer blocks) and the scratch blocks apart.

The draft's KV stays current with two passes per engine step:

1. `mirror(step)`: after the target's forward pass (`UniProcExecutor.launch`), the draft runs
   over exactly the rows the target ran (prefill chunks, decodes, verify rows: same token ids,
   positions and slots), writing its KV where the target wrote its own. So draft KV is valid
   exactly where target KV is: positions the scheduler counts as computed, prefix-cached blocks
   (computed by some earlier request's step, mirrored then), recomputation after preemption;
   positions of rejected drafts are rolled back by the scheduler and overwritten later, as the
   target's are.
2. `propose(...)`: before the next `schedule()`, for the requests that speculate (in decode: all
   T tokens but the newest computed), k greedy decode steps, batched (one forward per draft
   position over all of them): step 0 feeds the newest token at position T - 1, step j its
   draft j - 1 (on the device, no host round trip); the drafts come back in one copy. Chain KV
   goes to the request's own uncomputed slots or its scratch blocks (never a block of another
   request); the target's verify step then recomputes those positions in both caches.

The proposer is greedy (the draft's argmax), hence deterministic: its q is one-hot, and the
runner's rejection sampler for one-hot q (`kestrel/spec/rejection.py`: a row accepts iff its
draw from the target distribution equals the draft) keeps sampled requests exact and seeded
ones reproducible. The seam for a sampled draft: `propose` would return q's rows ([n, V]
probabilities of each draft) for `rejection_sample(draft_probs=q, uniform=u)`.

CUDA graphs: chain steps and all-decode mirror passes replay the draft's `DecodeGraphs`
(captured like the target's); verify-row and prefill mirror passes run eagerly.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

from kestrel.runner.model_runner import ModelRunner, kv_block_bytes
from kestrel.spec.draft_chain import plan_chain, scratch_blocks_per_seq

if TYPE_CHECKING:
    from kestrel.executor.step_input import StepInput

logger = logging.getLogger(__name__)


class DraftRunner:
    def __init__(self, runner: ModelRunner, num_speculative_tokens: int, max_num_seqs: int) -> None:
        self.runner = runner
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

    def capture_graphs(self, max_num_seqs: int, max_model_len: int) -> None:
        self.runner.capture_decode_graphs(max_num_seqs, max_model_len)

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
        r.model(ids, positions, r.kv_caches, r.build_attention_metadata(step))

    # ---- pass 2: the chain ----------------------------------------------------------------

    @torch.inference_mode()
    def propose(
        self,
        last_tokens: Sequence[int],
        num_tokens: Sequence[int],
        num_steps: Sequence[int],
        block_tables: Sequence[Sequence[int]],
    ) -> list[np.ndarray]:
        """Greedy drafts per request: `num_steps[b]` tokens following its `num_tokens[b]` known
        ones (the newest is `last_tokens[b]`), its blocks `block_tables[b]` (now, after the
        last update()). Requests beyond max_num_seqs are refused (the scratch is sized so)."""
        num_reqs = len(last_tokens)
        if num_reqs > self.max_num_seqs:
            raise ValueError(f"{num_reqs} chain rows exceed max_num_seqs={self.max_num_seqs}")
        if num_reqs == 0:
            return []
        plan = plan_chain(
            num_tokens,
            num_steps,
            block_tables,
            block_size=self.block_size,
            scratch_base=self.num_shared_blocks,
            scratch_per_seq=self.scratch_per_seq,
        )
        r = self.runner
        r.stager.begin_step()
        stage = r.stager.to_device
        ids = stage(np.asarray(last_tokens, dtype=np.int64))
        drafts = torch.full((num_reqs, len(plan)), -1, dtype=torch.int64, device=r.device)
        prev: torch.Tensor | None = None
        for j, chain_step in enumerate(plan):
            if prev is not None:  # this step's inputs: the previous step's argmax
                same = chain_step.keep.shape[0] == prev.shape[0]
                ids = prev if same else prev.index_select(0, stage(chain_step.keep))
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
        return r.model.compute_logits(hidden)
