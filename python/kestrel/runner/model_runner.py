"""ModelRunner: one forward pass per scheduler step over the paged KV cache.

Per step: the StepInput's flat arrays become device tensors (one copy each, no per-token
Python), the model runs over every scheduled token, the rows named by `logits_indices` are
projected to logits and sampled, and the sampled ids come back to the host in one transfer.

Failures (see `kestrel.engine.faults`): a forward-pass exception propagates (fatal: it is no one
request's fault). When sampling the batch raises something other than a device failure, the rows
are sampled again one at a time; rows that fail alone are reported in `StepResult.failed_rows`
and the others keep their tokens. Retried rows give the tokens the batch would have given as long
as the failure came before the noise draw (batch build, logit edits, filters): the per-request
generators have not moved then. A failure after it (logprobs) makes the retried seeded rows draw
again, so their streams move on by one draw.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

from kestrel.ops import AttentionMetadata
from kestrel.ops.attention_backend import PagedAttentionBackend
from kestrel.runner.cuda_graphs import DecodeGraphs
from kestrel.runner.staging import HostStager
from kestrel.sample import Sampler, SamplerOutput, SamplingBatch

if TYPE_CHECKING:
    from kestrel.executor.step_input import StepInput
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
    # Argmax of the raw logits is the whole sampling: greedy, no logit edits, no logprobs.
    plain_greedy: bool = field(init=False)

    def __post_init__(self) -> None:
        p = self.params
        self.plain_greedy = (
            p.is_greedy
            and p.logprobs is None
            and not p.logit_bias
            and p.min_tokens == 0
            and p.repetition_penalty == 1.0
            and p.presence_penalty == 0.0
            and p.frequency_penalty == 0.0
        )


@dataclass
class StepResult:
    sampled_token_ids: np.ndarray  # [S] int64, host; a placeholder 0 at each failed row
    sampler_output: SamplerOutput | None  # device tensors (logprobs), None when S == 0
    # Row index -> the exception that sampling that row alone raised. The engine must fail those
    # rows' requests (abort them before update(), which then drops their placeholder tokens).
    failed_rows: dict[int, BaseException] = field(default_factory=dict)


def kv_block_bytes(config: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    """Bytes of one KV block across all layers (keys and values)."""
    elem = torch.empty((), dtype=dtype).element_size()
    per_layer = 2 * block_size * config.num_key_value_heads * config.head_dim * elem
    return per_layer * config.num_hidden_layers


class ModelRunner:
    """Owns the model, its paged KV cache, the sampler and (on CUDA) the decode graphs.

    Life cycle: construct -> `profile_peak_bytes()` (CUDA memory planning) ->
    `allocate_kv_cache(num_blocks)` -> optionally `capture_decode_graphs()` -> `execute()`.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        model_config: ModelConfig,
        *,
        device: torch.device,
        dtype: torch.dtype,
        block_size: int,
        seed: int,
    ) -> None:
        self.model = model
        self.model_config = model_config
        self.device = device
        self.dtype = dtype
        self.block_size = block_size
        self.num_blocks = 0
        self.kv_caches: list[tuple[torch.Tensor, torch.Tensor]] = []
        generator = torch.Generator(device=device)
        generator.manual_seed(seed)
        self.sampler = Sampler(generator)
        self.vocab_size = model_config.vocab_size
        self.stager = HostStager(device)
        self.graphs: DecodeGraphs | None = None
        self.attention = PagedAttentionBackend(
            num_q_heads=model_config.num_attention_heads,
            num_kv_heads=model_config.num_key_value_heads,
            head_dim=model_config.head_dim,
            block_size=block_size,
            dtype=dtype,
            device=device,
        )

    def _kv_shape(self, num_blocks: int) -> tuple[int, int, int, int]:
        mc = self.model_config
        return (num_blocks, self.block_size, mc.num_key_value_heads, mc.head_dim)

    def allocate_kv_cache(self, num_blocks: int) -> None:
        """One (key_cache, value_cache) per layer, [num_blocks, block_size, num_kv_heads,
        head_dim] each."""
        shape = self._kv_shape(num_blocks)
        self.num_blocks = num_blocks
        self.kv_caches = [
            (
                torch.zeros(shape, dtype=self.dtype, device=self.device),
                torch.zeros(shape, dtype=self.dtype, device=self.device),
            )
            for _ in range(self.model_config.num_hidden_layers)
        ]

    @torch.inference_mode()
    def profile_peak_bytes(self, num_tokens: int, num_seqs: int) -> int:
        """CUDA only: activation memory of the largest step (num_tokens tokens over num_seqs
        prefill sequences, num_seqs sampled rows), measured with a throw-away KV cache."""
        num_seqs = max(1, min(num_seqs, num_tokens))
        per_seq = -(-num_tokens // num_seqs)
        blocks_per_seq = -(-per_seq // self.block_size)
        scratch = torch.zeros(
            self._kv_shape(num_seqs * blocks_per_seq), dtype=self.dtype, device=self.device
        )
        kv = [(scratch, scratch)] * self.model_config.num_hidden_layers
        lens = [per_seq] * (num_tokens // per_seq) + (
            [num_tokens % per_seq] if num_tokens % per_seq else []
        )
        qsl = torch.tensor([0, *np.cumsum(lens).tolist()], dtype=torch.int32)
        seq_lens = torch.tensor(lens, dtype=torch.int32)
        tables = torch.arange(len(lens) * blocks_per_seq, dtype=torch.int32).view(len(lens), -1)
        meta = AttentionMetadata(
            slot_mapping=torch.full((num_tokens,), -1, dtype=torch.int64, device=self.device),
            query_start_loc=qsl.to(self.device),
            seq_lens=seq_lens.to(self.device),
            block_tables=tables.to(self.device),
            num_decodes=0,
            num_decode_tokens=0,
            max_query_len=per_seq,
            max_seq_len=per_seq,
            query_start_loc_cpu=qsl,
            seq_lens_cpu=seq_lens,
        )
        meta = self.attention.plan(meta)
        ids = torch.zeros(num_tokens, dtype=torch.int64, device=self.device)
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        before = torch.cuda.memory_allocated(self.device)
        hidden = self.model(ids, ids, kv, meta)
        rows = hidden[torch.arange(min(num_seqs, num_tokens), device=self.device)]
        logits = self.model.compute_logits(rows)
        # The sampler's working set: a few [S, vocab] fp32 tensors (probabilities, noise, sort).
        work = torch.empty((4, *logits.shape), dtype=torch.float32, device=self.device)
        del work, logits, rows, hidden
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device) - before
        del scratch, kv
        torch.cuda.empty_cache()
        return int(peak)

    def capture_decode_graphs(self, max_num_seqs: int, max_model_len: int) -> None:
        self.graphs = DecodeGraphs(
            self.model,
            self.kv_caches,
            self.attention,
            max_num_seqs=max_num_seqs,
            max_model_len=max_model_len,
            block_size=self.block_size,
            device=self.device,
        )
        self.graphs.capture()

    def build_attention_metadata(self, out: StepInput) -> AttentionMetadata:
        """The step's metadata, staged to the device and planned (validated once)."""
        return self.attention.metadata_for(out, self.stager.to_device)

    @torch.inference_mode()
    def execute(self, out: StepInput, rows: list[SampleRow]) -> StepResult:
        """Runs the step; `rows` describe the sampled rows in `out.logits_indices` order."""
        if len(rows) != out.num_sampled:
            raise ValueError(f"{len(rows)} sample rows for {out.num_sampled} logits indices")
        if out.num_tokens == 0:
            return StepResult(np.zeros(0, dtype=np.int64), None)
        logits = self._logits(out)  # an exception here is fatal: it is no one row's fault
        if logits is None:
            return StepResult(np.zeros(0, dtype=np.int64), None)
        try:
            return self._sample(logits, rows)
        except Exception as exc:
            # Lazy import: kestrel.engine imports this module.
            from kestrel.engine.faults import is_device_failure

            if is_device_failure(exc):
                raise
            result = self._sample_each_row(logits, rows)
            if result is None:  # every row failed on its own: not attributable
                raise
            return result

    def _logits(self, out: StepInput) -> torch.Tensor | None:
        """The forward pass: logits [S, vocab] fp32 of the sampled rows, None when S == 0."""
        self.stager.begin_step()
        if self.graphs is not None and out.num_sampled == out.num_reqs and self.graphs.can_run(out):
            return self.graphs.run(out, self.stager.to_device)  # [S, vocab] fp32
        return self._forward_eager(out)

    def _sample(self, logits: torch.Tensor, rows: list[SampleRow]) -> StepResult:
        """The sampling stage: one token per row of `logits`. Never modifies `logits` (the
        row-by-row retry reads them again)."""
        if all(r.plain_greedy for r in rows):  # fast path: no per-row tensors to build
            return StepResult(logits.argmax(dim=-1).cpu().numpy(), None)
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

    def _sample_each_row(self, logits: torch.Tensor, rows: list[SampleRow]) -> StepResult | None:
        """After the batch failed to sample: each row alone. Rows that still raise (not a device
        failure, which propagates) go into `failed_rows`; None when every row of a multi-row
        batch failed. Logprobs are taken over the whole batch as `_sample` would."""
        from kestrel.engine.faults import is_device_failure

        tokens = np.zeros(len(rows), dtype=np.int64)
        failed: dict[int, BaseException] = {}
        for i, row in enumerate(rows):
            try:
                tokens[i] = self._sample(logits[i : i + 1], [row]).sampled_token_ids[0]
            except Exception as exc:
                if is_device_failure(exc):
                    raise
                failed[i] = exc
        if len(rows) > 1 and len(failed) == len(rows):
            return None
        logger.warning(
            "sampling a batch of %d rows failed; sampled row by row, %d rows failed alone",
            len(rows),
            len(failed),
        )
        num_logprobs = [r.params.logprobs for r in rows if r.params.logprobs is not None]
        sampler_output = None
        if num_logprobs:
            sampled = torch.from_numpy(tokens).to(logits.device)
            sampler_output = Sampler.with_logprobs(logits, sampled, max(num_logprobs))
        return StepResult(tokens, sampler_output, failed)

    def _forward_eager(self, out: StepInput) -> torch.Tensor | None:
        """Logits [S, vocab] fp32 of the sampled rows, or None when no row is sampled."""
        stage = self.stager.to_device
        input_ids = stage(out.input_ids, torch.int64)
        positions = stage(out.positions, torch.int64)
        metadata = self.build_attention_metadata(out)
        hidden = self.model(input_ids, positions, self.kv_caches, metadata)  # [T, hidden]
        if out.num_sampled == 0:
            return None
        logits_indices = stage(out.logits_indices, torch.int64)
        return self.model.compute_logits(hidden[logits_indices])
