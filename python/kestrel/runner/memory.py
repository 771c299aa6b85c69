"""How many KV-cache blocks an engine gets.

CUDA: gpu_memory_utilization of the card, minus what is already in use (the weights), the
profiled activation peak of the largest step and a reserve for CUDA graphs. CPU: a fixed
budget (kv_cache_memory_gib). Never more than max_num_seqs sequences of max_model_len need;
never fewer than one such sequence needs (that is an error naming the remedies).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch

from kestrel.runner.model_runner import ModelRunner, kv_block_bytes

if TYPE_CHECKING:
    from kestrel.config import EngineConfig

logger = logging.getLogger(__name__)
_GIB = float(1 << 30)
_GRAPH_RESERVE_BYTES = 1 << 29  # decode graphs' private pool (measured well under this)


def plan_num_kv_blocks(
    cfg: EngineConfig,
    runner: ModelRunner,
    max_model_len: int,
    extra_block_bytes: int = 0,
    reserved_bytes: int = 0,
) -> int:
    """`extra_block_bytes`: more bytes per block (a draft model's KV of the same block ids);
    `reserved_bytes`: taken from the budget first (the draft's scratch blocks and graphs)."""
    if cfg.num_kv_blocks is not None:
        return cfg.num_kv_blocks
    kv_dtype = runner.kv_cache_dtype  # an FP8 cache: half the bytes, twice the blocks
    per_block = extra_block_bytes + kv_block_bytes(
        runner.model_config, cfg.block_size, kv_dtype, runner.num_kv_heads, runner.num_layers
    )
    if runner.device.type == "cuda":
        free, total = torch.cuda.mem_get_info(runner.device)
        used = total - free  # weights and anything else already on the card
        peak = runner.profile_peak_bytes(cfg.max_num_batched_tokens, cfg.max_num_seqs)
        graph_reserve = 0 if cfg.enforce_eager else _GRAPH_RESERVE_BYTES
        pw_tokens = min(cfg.piecewise_graph_max_tokens, cfg.max_num_batched_tokens)
        if not cfg.enforce_eager and pw_tokens > 0:
            # The piecewise graphs' pool holds one piece's activations at their largest size:
            # at most the profiled peak scaled to that many tokens (activations grow with T).
            graph_reserve += int(peak * pw_tokens / cfg.max_num_batched_tokens)
        budget = cfg.gpu_memory_utilization * total - used - peak - graph_reserve
        weights = sum(p.numel() * p.element_size() for p in runner.model.parameters())
        logger.info(
            "memory: %.2f GiB card, %.2f GiB in use (weights %.2f GiB), activation peak %.2f "
            "GiB, graph reserve %.2f GiB -> KV budget %.2f GiB",
            total / _GIB,
            used / _GIB,
            weights / _GIB,
            peak / _GIB,
            graph_reserve / _GIB,
            budget / _GIB,
        )
    else:
        budget = cfg.kv_cache_memory_gib * _GIB
    budget -= reserved_bytes
    blocks_per_seq = -(-max_model_len // cfg.block_size)
    num_blocks = min(int(budget // per_block), cfg.max_num_seqs * blocks_per_seq)
    if num_blocks < blocks_per_seq:
        raise ValueError(
            f"the KV cache budget ({budget / _GIB:.2f} GiB) holds {max(num_blocks, 0)} blocks "
            f"of {cfg.block_size} tokens, fewer than one sequence of max_model_len="
            f"{max_model_len} needs; lower max_model_len or raise "
            "gpu_memory_utilization / kv_cache_memory_gib"
        )
    tokens = num_blocks * cfg.block_size
    logger.info(
        "KV cache: %s, %d blocks of %d tokens (%.2f GiB): %d tokens, up to %d sequences of "
        "max_model_len",
        str(kv_dtype).removeprefix("torch."),
        num_blocks,
        cfg.block_size,
        num_blocks * per_block / _GIB,
        tokens,
        tokens // max_model_len,
    )
    return num_blocks
