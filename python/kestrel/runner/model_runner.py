"""ModelRunner: one forward pass per scheduler step over the paged KV cache.

Per step: the SchedulerOutput's flat arrays become device tensors (one copy each, no per-token
Python), the model runs over every scheduled token, the rows named by `logits_indices` are
projected to logits and sampled, and the sampled ids come back to the host in one transfer.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from kestrel.ops import AttentionMetadata
from kestrel.sample import Sampler, SamplerOutput, SamplingBatch

if TYPE_CHECKING:
    from kestrel._core import SchedulerOutput
    from kestrel.model_config import ModelConfig
    from kestrel.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


@dataclass
class SampleRow:
    """What the sampler needs to know about one sampled row's request."""

    params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    generator: torch.Generator | None
    eos_token_ids: tuple[int, ...]


@dataclass
class StepResult:
    sampled_token_ids: np.ndarray  # [S] int64, host
    sampler_output: SamplerOutput | None  # device tensors (logprobs), None when S == 0


def kv_block_bytes(config: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    """Bytes of one KV block across all layers (keys and values)."""
    elem = torch.empty((), dtype=dtype).element_size()
    per_layer = 2 * block_size * config.num_key_value_heads * config.head_dim * elem
    return per_layer * config.num_hidden_layers


class ModelRunner:
    def __init__(
        self,
        model: torch.nn.Module,
        model_config: ModelConfig,
        *,
        device: torch.device,
        dtype: torch.dtype,
        num_blocks: int,
        block_size: int,
        seed: int,
    ) -> None:
        self.model = model
        self.model_config = model_config
        self.device = device
        self.dtype = dtype
        self.block_size = block_size
        self.num_blocks = num_blocks
        shape = (num_blocks, block_size, model_config.num_key_value_heads, model_config.head_dim)
        # One (key_cache, value_cache) per layer, [num_blocks, block_size, num_kv_heads, head_dim].
        self.kv_caches = [
            (
                torch.zeros(shape, dtype=dtype, device=device),
                torch.zeros(shape, dtype=dtype, device=device),
            )
            for _ in range(model_config.num_hidden_layers)
        ]
        generator = torch.Generator(device=device)
        generator.manual_seed(seed)
        self.sampler = Sampler(generator)
        self.vocab_size = model_config.vocab_size

    def _to_device(self, array: np.ndarray, dtype: torch.dtype | None = None) -> torch.Tensor:
        t = torch.from_numpy(array)
        if dtype is not None:
            t = t.to(dtype)
        if self.device.type == "cpu":
            return t
        return t.pin_memory().to(self.device, non_blocking=True)

    def build_attention_metadata(self, out: SchedulerOutput) -> AttentionMetadata:
        qsl_cpu = torch.from_numpy(out.query_start_loc)
        seq_lens_cpu = torch.from_numpy(out.seq_lens)
        return AttentionMetadata(
            slot_mapping=self._to_device(out.slot_mapping),
            query_start_loc=self._to_device(out.query_start_loc),
            seq_lens=self._to_device(out.seq_lens),
            block_tables=self._to_device(out.block_tables),
            num_decodes=out.num_decodes,
            num_decode_tokens=out.num_decodes,
            max_query_len=out.max_query_len,
            max_seq_len=out.max_seq_len,
            query_start_loc_cpu=qsl_cpu,
            seq_lens_cpu=seq_lens_cpu,
        )

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput, rows: list[SampleRow]) -> StepResult:
        """Runs the step; `rows` describe the sampled rows in `out.logits_indices` order."""
        if len(rows) != out.num_sampled:
            raise ValueError(f"{len(rows)} sample rows for {out.num_sampled} logits indices")
        if out.num_tokens == 0:
            return StepResult(np.zeros(0, dtype=np.int64), None)
        input_ids = self._to_device(out.input_ids, torch.int64)
        positions = self._to_device(out.positions, torch.int64)
        metadata = self.build_attention_metadata(out)
        hidden = self.model(input_ids, positions, self.kv_caches, metadata)  # [T, hidden]
        if out.num_sampled == 0:
            return StepResult(np.zeros(0, dtype=np.int64), None)
        logits_indices = self._to_device(out.logits_indices, torch.int64)
        logits = self.model.compute_logits(hidden[logits_indices])  # [S, vocab] fp32
        batch = SamplingBatch.build(
            [r.params for r in rows],
            [r.prompt_token_ids for r in rows],
            [r.output_token_ids for r in rows],
            [r.generator for r in rows],
            vocab_size=self.vocab_size,
            device=self.device,
            eos_token_ids=[r.eos_token_ids for r in rows],
        )
        sampled = self.sampler(logits, batch)
        return StepResult(sampled.sampled_token_ids.cpu().numpy(), sampled)
