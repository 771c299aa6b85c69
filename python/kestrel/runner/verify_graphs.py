"""CUDA graphs for uniform speculative verify steps, keyed on (batch size, query length).

A verify step of n requests that each carry the same number of drafts d runs q = d + 1 query
rows per request and samples every row. Its attention is the prefill kernel over n sequences of
q query rows each: the launch depends on n and q alone (each sequence's context is cut by its
real `seq_lens` on the device), so the whole forward pass, attention and LM head included, is
one graph per (bs, q), replayed like a decode graph (`runner/cuda_graphs.py`): the step's ids,
positions, slots, context lengths and block tables are copied into static buffers held here,
rows of the padding sequences n..bs get slot -1 (nothing written to the KV cache) and a context
of q tokens over block 0 (valid memory to read).

Only small batches are captured (speculation is for latency: bs 1, 2, 4, 8 within max_num_seqs
and q = 2 .. k + 1 for k <= MAX_DRAFTS drafts); all of them write one static logits buffer
[max bs * max q, vocab] fp32 (a replay's logits are read before the next replay). A verify step that is not uniform (requests with different draft counts, a prefill in the
step) takes the piecewise graphs or the eager forward.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import numpy as np
import torch

from kestrel.ops import AttentionMetadata
from kestrel.runner.cuda_graphs import graph_batch_sizes

if TYPE_CHECKING:
    from kestrel.executor.step_input import StepInput
    from kestrel.ops.attention_backend import PagedAttentionBackend

logger = logging.getLogger(__name__)

MAX_BATCH = 8
MAX_DRAFTS = 8


def verify_batch_sizes(max_num_seqs: int) -> list[int]:
    """The decode graphs' sizes (1, 2, 4, 8) up to min(max_num_seqs, MAX_BATCH), included."""
    return graph_batch_sizes(min(max_num_seqs, MAX_BATCH))


class VerifyGraphs:
    def __init__(
        self,
        model: torch.nn.Module,
        kv_caches: list,
        attention: PagedAttentionBackend,
        *,
        max_num_seqs: int,
        num_speculative_tokens: int,
        max_model_len: int,
        block_size: int,
        device: torch.device,
    ) -> None:
        if num_speculative_tokens < 1:
            raise ValueError(f"num_speculative_tokens must be >= 1; got {num_speculative_tokens}")
        self.model = model
        self.kv_caches = kv_caches
        self.attention = attention
        self.batch_sizes = verify_batch_sizes(max_num_seqs)
        self.query_lens = list(range(2, min(num_speculative_tokens, MAX_DRAFTS) + 2))
        self.max_model_len = max_model_len
        self.max_blocks = -(-max_model_len // block_size)
        bs, q = self.batch_sizes[-1], self.query_lens[-1]
        i32 = {"dtype": torch.int32, "device": device}
        i64 = {"dtype": torch.int64, "device": device}
        self.input_ids = torch.zeros(bs * q, **i64)
        self.positions = torch.zeros(bs * q, **i64)
        self.slot_mapping = torch.full((bs * q,), -1, **i64)
        self.seq_lens = torch.full((bs,), q, **i32)
        self.block_tables = torch.zeros(bs, self.max_blocks, **i32)
        # Query start offsets of q rows per sequence: static per q.
        self.query_start_loc = {
            ql: torch.arange(0, (bs + 1) * ql, ql, **i32) for ql in self.query_lens
        }
        self.graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        vocab = model.config.vocab_size if model is not None else 0
        self.logits = torch.zeros((bs * q, vocab), dtype=torch.float32, device=device)
        self._metadata: dict[tuple[int, int], AttentionMetadata] = {}

    def _metadata_for(self, bs: int, q: int) -> AttentionMetadata:
        """The planned metadata the (bs, q) graph is captured with (views of the static
        buffers), made once per key so warm-ups and the capture share it."""
        key = (bs, q)
        cached = self._metadata.get(key)
        if cached is not None:
            return cached
        metadata = AttentionMetadata(
            slot_mapping=self.slot_mapping[: bs * q],
            query_start_loc=self.query_start_loc[q][: bs + 1],
            seq_lens=self.seq_lens[:bs],
            block_tables=self.block_tables[:bs],
            num_decodes=0,
            num_decode_tokens=0,
            max_query_len=q,
            max_seq_len=self.max_model_len,
            query_start_loc_cpu=torch.arange(0, (bs + 1) * q, q, dtype=torch.int32),
            seq_lens_cpu=torch.full((bs,), self.max_model_len, dtype=torch.int32),
        )
        planned = self.attention.plan(metadata)
        self._metadata[key] = planned
        return planned

    def _forward(self, bs: int, q: int) -> torch.Tensor:
        metadata = self._metadata_for(bs, q)
        rows = bs * q
        hidden = self.model(self.input_ids[:rows], self.positions[:rows], self.kv_caches, metadata)
        return self.model.compute_logits(hidden, self.logits[:rows])  # [bs * q, vocab] fp32

    @torch.inference_mode()
    def capture(self) -> None:
        start = time.perf_counter()
        keys = [(bs, q) for bs in self.batch_sizes for q in self.query_lens]
        keys.sort(key=lambda k: k[0] * k[1], reverse=True)  # largest first
        pool = None
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for bs, q in keys:
                self.seq_lens[:bs].fill_(q)  # a valid context for the warm-up and capture
                for _ in range(2):
                    self._forward(bs, q)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool, stream=stream):
                    self._forward(bs, q)
                pool = graph.pool()
                self.graphs[(bs, q)] = graph
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()
        logger.info(
            "captured %d speculative verify CUDA graphs (batch 1..%d, %d..%d query rows) in %.1f s",
            len(keys),
            self.batch_sizes[-1],
            self.query_lens[0],
            self.query_lens[-1],
            time.perf_counter() - start,
        )

    def can_run(self, out: StepInput) -> bool:
        """A uniform verify step: every request has q = max_query_len rows (q >= 2, no decode
        or prefill of another length) and every row is sampled, in row order."""
        n, q = out.num_reqs, out.max_query_len
        return (
            0 < n <= self.batch_sizes[-1]
            and out.num_decodes == 0
            and q in self.query_lens
            and out.num_tokens == n * q
            and out.num_sampled == out.num_tokens
            and out.max_blocks_per_seq <= self.max_blocks
            and bool(np.array_equal(out.logits_indices, np.arange(out.num_tokens)))
        )

    def run(self, out: StepInput, input_ids: torch.Tensor, stage) -> torch.Tensor:
        """Replays the graph of the smallest batch that holds the step (`input_ids`: its token
        ids on the device); returns logits [n * q, vocab]."""
        n, q = out.num_reqs, out.max_query_len
        bs = next(s for s in self.batch_sizes if s >= n)
        rows, width = n * q, out.max_blocks_per_seq
        self.input_ids[:rows].copy_(input_ids, non_blocking=True)
        self.positions[:rows].copy_(stage(out.positions, torch.int64), non_blocking=True)
        self.slot_mapping[:rows].copy_(stage(out.slot_mapping, torch.int64), non_blocking=True)
        self.seq_lens[:n].copy_(stage(out.seq_lens, torch.int32), non_blocking=True)
        self.block_tables[:n, :width].copy_(stage(out.block_tables, torch.int32), non_blocking=True)
        if bs > n:  # padding sequences: q rows over block 0, nothing written
            self.slot_mapping[rows : bs * q].fill_(-1)
            self.positions[rows : bs * q].fill_(0)
            self.seq_lens[n:bs].fill_(q)
            self.block_tables[n:bs, 0].fill_(0)
        self.graphs[(bs, q)].replay()
        return self.logits[:rows]
