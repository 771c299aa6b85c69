"""Piecewise CUDA graphs for the steps the decode graphs cannot take (prefill rows in the step).

A step that carries a prefill chunk (a mixed step of decodes plus a new request's prompt, a
prefill-only step, a speculative verify step) cannot be one CUDA graph: its attention launches
depend on the batch layout (how many sequences, their query and context lengths). Everything
else in the decoder depends on the number of tokens alone. So the forward pass is cut at every
attention (`DecoderModel.forward_split`): for each bucketed token count T there is one graph
per piece, L + 1 of them for L layers, piece 0 = embedding + layer 0 up to its attention (norm,
QKV projection, q/k norms, RoPE and the KV write), piece i = layer i-1 after its attention
(o_proj, norm, MLP) + layer i up to its attention, piece L = the last layer's tail + final
norm. Between two replays the layer's attention runs eagerly over the step's real metadata.

Eager, a step carrying a 128-token prefill cost 8.6–12.6 ms of host time on the H200 machine for
1.1 ms of GPU work (~500 torch ops; docs/performance.md); replayed, the same work is L + 1 graph
launches and L attention calls.

Static buffers (allocated here, outside the graphs' pool): the step's token ids, positions and
KV slots (rows past the real tokens get slot -1: nothing is written to the cache), each layer's
rotated q (copied out of the QKV projection inside the piece, so the projection's memory is free
for the next piece) and the attention output the next piece reads. Graphs of every size share
one private pool, captured largest first; a size's pieces are always replayed in order, one
size at a time, so memory one size's piece frees may be another size's.

Off with tensor or pipeline parallelism (collectives in graphs: not built), under
`enforce_eager`, and for steps of more than `piecewise_graph_max_tokens` tokens (those run
eagerly; their GPU time hides the host's). `use_graphs=False` runs the same pieces eagerly over
the same static buffers (the CPU tests check the padding and buffer logic that way).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Generator
from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm

if TYPE_CHECKING:
    from kestrel.ops import AttentionMetadata

logger = logging.getLogger(__name__)

Pieces = Generator[torch.Tensor, torch.Tensor, torch.Tensor]


def piecewise_token_sizes(max_tokens: int) -> list[int]:
    """The captured token counts: 16, 32, 64, 96, 128, 192, 256, 384, 512, 768, ... (each at
    most 1.5x the one before from 64 on), up to max_tokens, which is always included."""
    if max_tokens < 1:
        raise ValueError(f"piecewise_graph_max_tokens must be >= 1 to capture; got {max_tokens}")
    sizes, size = [16, 32], 64
    while size < max_tokens:
        sizes += [size, size * 3 // 2]
        size *= 2
    return sorted({s for s in sizes if s < max_tokens} | {max_tokens})


class PiecewiseGraphs:
    def __init__(
        self,
        model: torch.nn.Module,
        kv_caches: list,
        *,
        max_tokens: int,
        num_q_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
        use_graphs: bool = True,
    ) -> None:
        self.decoder = model.model  # DecoderModel
        self.attn_layers = [layer.self_attn.attn for layer in self.decoder.layers]
        self.kv_caches = kv_caches
        self.sizes = piecewise_token_sizes(max_tokens)
        self.use_graphs = use_graphs
        t = self.sizes[-1]
        self.input_ids = torch.zeros(t, dtype=torch.int64, device=device)
        self.positions = torch.zeros(t, dtype=torch.int64, device=device)
        self.slot_mapping = torch.full((t,), -1, dtype=torch.int64, device=device)
        self.q = torch.zeros((t, num_q_heads, head_dim), dtype=dtype, device=device)
        self.attn_out = torch.zeros((t, num_q_heads, head_dim), dtype=dtype, device=device)
        self.graphs: dict[int, list[torch.cuda.CUDAGraph]] = {}
        self.hidden: dict[int, torch.Tensor] = {}  # each size's output [T, hidden]

    @property
    def max_tokens(self) -> int:
        return self.sizes[-1]

    def can_run(self, num_tokens: int) -> bool:
        return 0 < num_tokens <= self.sizes[-1]

    def _start(self, size: int) -> Pieces:
        return self.decoder.forward_split(
            self.input_ids[:size], self.positions[:size], self.kv_caches, self.slot_mapping[:size]
        )

    def _piece(self, pieces: Pieces, size: int, first: bool) -> torch.Tensor | None:
        """Runs one piece: up to the next attention (its q copied to the static buffer; None
        returned) or, after the last attention, to the end (the hidden states returned)."""
        try:
            q = next(pieces) if first else pieces.send(self.attn_out[:size])
        except StopIteration as done:
            return done.value
        self.q[:size].copy_(q)
        return None

    def _eager(self, size: int) -> torch.Tensor:
        """All pieces in order with a stand-in attention (the static output as it is): the
        warm-up before a capture."""
        pieces = self._start(size)
        hidden = self._piece(pieces, size, first=True)
        while hidden is None:
            hidden = self._piece(pieces, size, first=False)
        return hidden

    @torch.inference_mode()
    def capture(self) -> None:
        start = time.perf_counter()
        pool = None
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for size in tqdm(list(reversed(self.sizes)), desc="capturing piecewise CUDA graphs"):
                self._eager(size)  # lazy inits and autotuning happen outside capture
                pieces, graphs, hidden = self._start(size), [], None
                while hidden is None:
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph, pool=pool, stream=stream):
                        hidden = self._piece(pieces, size, first=not graphs)
                    pool = graph.pool()
                    graphs.append(graph)
                self.graphs[size], self.hidden[size] = graphs, hidden
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()
        logger.info(
            "captured piecewise CUDA graphs for %d token counts (16..%d, %d pieces each) in %.1f s",
            len(self.sizes),
            self.sizes[-1],
            len(self.attn_layers) + 1,
            time.perf_counter() - start,
        )

    def run(
        self, input_ids: torch.Tensor, positions: torch.Tensor, metadata: AttentionMetadata
    ) -> torch.Tensor:
        """The step's final-normed hidden states [n, hidden] (n = metadata.num_tokens, on the
        device: `input_ids`, `positions` [n] and the metadata's slots)."""
        n = input_ids.shape[0]
        size = next(s for s in self.sizes if s >= n)
        self.input_ids[:n].copy_(input_ids, non_blocking=True)
        self.positions[:n].copy_(positions, non_blocking=True)
        self.slot_mapping[:n].copy_(metadata.slot_mapping[:n], non_blocking=True)
        if size > n:
            self.slot_mapping[n:size].fill_(-1)  # padding rows write nothing to the cache
        run_piece = self._replayer(size)
        hidden = run_piece(0)
        for i, attn in enumerate(self.attn_layers):
            attn.attend(self.q[:size], self.kv_caches[i], metadata, out=self.attn_out[:size])
            hidden = run_piece(i + 1)
        assert hidden is not None
        return hidden[:n]

    def _replayer(self, size: int) -> Callable[[int], torch.Tensor | None]:
        if self.use_graphs:
            graphs, last = self.graphs[size], len(self.attn_layers)

            def replay(i: int) -> torch.Tensor | None:
                graphs[i].replay()
                return self.hidden[size] if i == last else None

            return replay
        pieces = self._start(size)
        return lambda i: self._piece(pieces, size, first=i == 0)
