"""Test helper: drives a Kestrel model step by step over a hand-built paged KV cache.

Each sequence owns a shuffled, non-contiguous set of cache blocks; the cache starts filled with
random garbage, so any read of a slot that was never written corrupts the result.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kestrel.model_config import ModelConfig
from kestrel.ops import AttentionMetadata


@dataclass
class Sequence:
    token_ids: list[int]  # every token the sequence will ever be fed
    blocks: list[int]  # cache block ids owned by the sequence, in position order
    num_computed: int = 0  # tokens whose K/V are in the cache


class PagedRunner:
    def __init__(
        self,
        model: torch.nn.Module,
        config: ModelConfig,
        prompts: list[list[int]],
        block_size: int,
        seed: int = 0,
    ) -> None:
        self.model = model
        self.block_size = block_size
        generator = torch.Generator().manual_seed(seed)
        blocks_per_seq = [-(-len(p) // block_size) for p in prompts]
        num_blocks = sum(blocks_per_seq) + 3  # a few blocks no sequence owns
        order = torch.randperm(num_blocks, generator=generator).tolist()
        self.seqs: list[Sequence] = []
        for prompt, count in zip(prompts, blocks_per_seq):
            self.seqs.append(Sequence(list(prompt), order[:count]))
            order = order[count:]
        shape = (num_blocks, block_size, config.num_key_value_heads, config.head_dim)
        self.kv_caches = [
            (torch.randn(shape, generator=generator), torch.randn(shape, generator=generator))
            for _ in range(config.num_hidden_layers)
        ]

    def step(self, schedule: list[tuple[int, int]]) -> dict[int, torch.Tensor]:
        """Run one step feeding (seq index, num new tokens) pairs, in batch order (the leading
        one-token entries count as decodes). Returns seq index -> logits [num new, vocab]."""
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        query_start = [0]
        seq_lens: list[int] = []
        num_decodes = 0
        for index, (seq_index, count) in enumerate(schedule):
            seq = self.seqs[seq_index]
            start, end = seq.num_computed, seq.num_computed + count
            assert 0 < count and end <= len(seq.token_ids)
            if count == 1 and num_decodes == index:
                num_decodes += 1
            input_ids += seq.token_ids[start:end]
            for pos in range(start, end):
                block = seq.blocks[pos // self.block_size]
                positions.append(pos)
                slots.append(block * self.block_size + pos % self.block_size)
            query_start.append(query_start[-1] + count)
            seq_lens.append(end)
        width = max(len(self.seqs[i].blocks) for i, _ in schedule)
        # Unused table entries are -1 (the ops contract allows any value there).
        table = [
            self.seqs[i].blocks + [-1] * (width - len(self.seqs[i].blocks)) for i, _ in schedule
        ]
        query_start_t = torch.tensor(query_start, dtype=torch.int32)
        seq_lens_t = torch.tensor(seq_lens, dtype=torch.int32)
        metadata = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.int64),
            query_start_loc=query_start_t,
            seq_lens=seq_lens_t,
            block_tables=torch.tensor(table, dtype=torch.int32),
            num_decodes=num_decodes,
            num_decode_tokens=num_decodes,
            max_query_len=max(count for _, count in schedule),
            max_seq_len=max(seq_lens),
            query_start_loc_cpu=query_start_t.clone(),
            seq_lens_cpu=seq_lens_t.clone(),
        )
        with torch.inference_mode():
            hidden = self.model(
                torch.tensor(input_ids), torch.tensor(positions), self.kv_caches, metadata
            )
            logits = self.model.compute_logits(hidden)  # [num_tokens, vocab] fp32
        assert logits.dtype == torch.float32
        out: dict[int, torch.Tensor] = {}
        for index, (seq_index, count) in enumerate(schedule):
            out[seq_index] = logits[query_start[index] : query_start[index + 1]]
            self.seqs[seq_index].num_computed += count
        return out
