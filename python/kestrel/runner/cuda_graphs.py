"""CUDA graphs for decode-only steps, captured once per bucketed batch size.

A decode step (every request has one query token) is replayed from a graph: the step's token
ids and positions are copied into static buffers held here, its attention metadata into the
attention backend's static buffers (`PagedAttentionBackend.prepare_replay`: rows past the real
batch are padding, slot -1 so nothing is written to the KV cache, context length 1 over block
0 so attention reads valid memory), and the graph recomputes hidden states and logits for the
whole bucket. Graphs share one memory pool, captured largest first, and one static logits
buffer [max_bs, vocab] fp32 (each size writes its first bs rows; a replay's logits are read
before the next replay, in stream order): one buffer per size would hold sum(sizes) rows, 2.6 GB
for a 152k vocabulary at max_num_seqs 256. The attention plan is made
once per captured size (`PagedAttentionBackend.capture_metadata`) for the engine's
max_model_len: it fixes the number of decode splits and the workspace, and the kernels cut each
row's context by its real `seq_lens` at replay, so one graph serves every context length with
short contexts spread over full splits.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm

from kestrel.ops.attention_backend import PagedAttentionBackend

if TYPE_CHECKING:
    from kestrel.executor.step_input import StepInput

logger = logging.getLogger(__name__)


def graph_batch_sizes(max_num_seqs: int) -> list[int]:
    """1, 2, 4, 8, then every 8 up to max_num_seqs (which is always included)."""
    sizes = [s for s in (1, 2, 4) if s < max_num_seqs]
    sizes += list(range(8, max_num_seqs, 8))
    return sorted(set(sizes + [max_num_seqs]))


class DecodeGraphs:
    def __init__(
        self,
        model: torch.nn.Module,
        kv_caches: list,
        attention: PagedAttentionBackend,
        *,
        max_num_seqs: int,
        max_model_len: int,
        block_size: int,
        device: torch.device,
    ) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.attention = attention
        self.sizes = graph_batch_sizes(max_num_seqs)
        self.max_model_len = max_model_len
        self.max_blocks = -(-max_model_len // block_size)
        b = self.sizes[-1]
        self.input_ids = torch.zeros(b, dtype=torch.int64, device=device)
        self.positions = torch.zeros(b, dtype=torch.int64, device=device)
        attention.init_graph_buffers(b, self.max_blocks)  # slots, lengths, offsets, tables
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        vocab = model.config.vocab_size
        self.logits = torch.zeros((b, vocab), dtype=torch.float32, device=device)

    def _forward(self, bs: int) -> torch.Tensor:
        metadata = self.attention.capture_metadata(bs, self.max_model_len)  # planned once per bs
        hidden = self.model(self.input_ids[:bs], self.positions[:bs], self.kv_caches, metadata)
        return self.model.compute_logits(hidden, self.logits[:bs])  # [bs, vocab] fp32

    @torch.inference_mode()
    def capture(self) -> None:
        start = time.perf_counter()
        pool = None
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for bs in tqdm(list(reversed(self.sizes)), desc="capturing CUDA graphs"):
                for _ in range(2):  # warm-up: lazy inits and autotuning happen outside capture
                    self._forward(bs)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool, stream=stream):
                    self._forward(bs)
                pool = graph.pool()
                self.graphs[bs] = graph
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()
        logger.info(
            "captured %d decode CUDA graphs (batch 1..%d) in %.1f s",
            len(self.sizes),
            self.sizes[-1],
            time.perf_counter() - start,
        )

    def can_run(self, out: StepInput) -> bool:
        n = out.num_reqs
        return (
            n > 0
            and out.num_decodes == n
            and n <= self.sizes[-1]
            and out.max_blocks_per_seq <= self.max_blocks
        )

    def run(self, out: StepInput, input_ids: torch.Tensor, stage) -> torch.Tensor:
        """Replays the smallest graph that holds the batch (`input_ids`: its token ids, on the
        device); returns logits [n, vocab]."""
        n = out.num_reqs
        bs = next(s for s in self.sizes if s >= n)
        self.input_ids[:n].copy_(input_ids, non_blocking=True)
        self.positions[:n].copy_(stage(out.positions, torch.int64), non_blocking=True)
        if bs > n:
            self.positions[n:bs].fill_(0)
        self.attention.prepare_replay(out, bs, stage)  # metadata rows, padding rows n..bs
        self.graphs[bs].replay()
        return self.logits[:n]
