"""ModelRunner: one forward pass per scheduler step over the paged KV cache.

Per step: the StepInput's flat arrays become device tensors (one copy each, no per-token
Python), the model runs over every scheduled token, the rows named by `logits_indices` are
projected to logits and sampled, and the sampled ids come back to the host in one transfer.

Sampling state is persistent: each running sequence holds a slot of the runner's `InputBatch`
(`runner/input_batch.py`), filled once by `add_sequence` and kept current by `remove_sequence`
and `append_tokens`; a step names its sampled rows by their slots and the runner gathers the
step's `SamplingBatch` from it (nothing is rebuilt from per-request Python lists). When every
row is plain greedy (greedy, no logit edits, no logprobs) sampling is the argmax alone.

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
from typing import TYPE_CHECKING

import numpy as np
import torch

from kestrel.ops import AttentionMetadata
from kestrel.ops.attention_backend import PagedAttentionBackend
from kestrel.runner.cuda_graphs import DecodeGraphs
from kestrel.runner.input_batch import InputBatch
from kestrel.runner.piecewise_graphs import PiecewiseGraphs
from kestrel.runner.prompt_logprobs import PromptLogprobRows, PromptLogprobsOut, score_prompt_rows
from kestrel.runner.staging import HostStager
from kestrel.runner.step_future import StepFuture, StepResult
from kestrel.runner.verify_graphs import VerifyGraphs
from kestrel.sample import Sampler, SamplerOutput
from kestrel.spec.draft_rows import DraftRows
from kestrel.spec.rewind import GeneratorRewind
from kestrel.structured.bitmask import BitmaskApplier, GrammarMask

if TYPE_CHECKING:
    from collections.abc import Callable, Hashable, Sequence

    from kestrel.executor.step_input import StepInput
    from kestrel.model_config import ModelConfig
    from kestrel.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

__all__ = ["ModelRunner", "StepFuture", "StepResult", "kv_block_bytes"]


def kv_block_bytes(
    config: ModelConfig,
    block_size: int,
    dtype: torch.dtype,
    num_kv_heads: int | None = None,
    num_layers: int | None = None,
) -> int:
    """Bytes of one KV block across all layers (keys and values); `num_kv_heads` and
    `num_layers`: this rank's (default: the model's)."""
    elem = torch.empty((), dtype=dtype).element_size()
    heads = config.num_key_value_heads if num_kv_heads is None else num_kv_heads
    per_layer = 2 * block_size * heads * config.head_dim * elem
    return per_layer * (config.num_hidden_layers if num_layers is None else num_layers)


def rank_heads(model: torch.nn.Module, config: ModelConfig) -> tuple[int, int]:
    """(query heads, KV heads) of this tensor-parallel rank's shard of `model` (the whole
    model's at size 1; KV heads are replicated when the ranks outnumber them)."""
    attn = model.model.layers[0].self_attn if hasattr(model, "model") else None
    if attn is None or not hasattr(attn, "num_kv_heads"):
        return config.num_attention_heads, config.num_key_value_heads
    return attn.num_heads, attn.num_kv_heads


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
        max_num_seqs: int,
        kv_cache_dtype: torch.dtype | None = None,
    ) -> None:
        """`kv_cache_dtype`: the KV cache's element type (default `dtype`; or float8 e4m3, see
        kestrel/ops/kv_quant.py)."""
        self.model = model
        self.model_config = model_config
        self.device = device
        self.dtype = dtype
        self.kv_cache_dtype = dtype if kv_cache_dtype is None else kv_cache_dtype
        self.block_size = block_size
        self.num_blocks = 0
        self.kv_caches: list[tuple[torch.Tensor, torch.Tensor]] = []
        generator = torch.Generator(device=device)
        generator.manual_seed(seed)
        self.sampler = Sampler(generator)
        self.vocab_size = model_config.vocab_size
        self.num_q_heads, self.num_kv_heads = rank_heads(model, model_config)
        # This pipeline stage's layers (all of them without pipeline parallelism).
        layers = getattr(getattr(model, "model", None), "layers", None)
        self.num_layers = len(layers) if layers is not None else model_config.num_hidden_layers
        self.input_batch = InputBatch(max_num_seqs, self.vocab_size, device)
        self.stager = HostStager(device)
        self.bitmask = BitmaskApplier()  # grammar masks: pinned staging + one kernel
        self.graphs: DecodeGraphs | None = None
        self.piecewise: PiecewiseGraphs | None = None  # steps with prefill rows
        self.verify_graphs: VerifyGraphs | None = None  # uniform speculative verify steps
        self.rewind = GeneratorRewind()  # seeded drafted rows: see kestrel/spec/rewind.py
        self._last_sampled: torch.Tensor | None = None  # the last launched step's sampled ids
        self.attention = PagedAttentionBackend(
            num_q_heads=self.num_q_heads,
            num_kv_heads=self.num_kv_heads,
            head_dim=model_config.head_dim,
            block_size=block_size,
            dtype=dtype,
            device=device,
            kv_cache_dtype=self.kv_cache_dtype,
        )

    # ---- the persistent batch (the executor forwards these; see runner/input_batch.py) -----

    def add_sequence(
        self,
        key: Hashable,
        params: SamplingParams,
        prompt_ids: Sequence[int],
        generator: torch.Generator | None,
        eos_token_ids: Sequence[int],
        output_ids: Sequence[int] = (),
    ) -> int:
        """Gives sequence `key` a slot of the input batch; returns the slot."""
        return self.input_batch.add(key, params, prompt_ids, generator, eos_token_ids, output_ids)

    def remove_sequence(self, key: Hashable) -> int:
        """Frees the slot of `key` (KeyError when it holds none); returns the slot."""
        slot = self.input_batch.remove(key)
        self.rewind.forget(slot)
        return slot

    def append_tokens(self, slots: Sequence[int] | np.ndarray, tokens: np.ndarray) -> None:
        """One new output token per (unique) slot."""
        self.input_batch.append_tokens(slots, tokens)
        self.rewind.on_append(slots)

    def _kv_shape(self, num_blocks: int) -> tuple[int, int, int, int]:
        mc = self.model_config
        return (num_blocks, self.block_size, self.num_kv_heads, mc.head_dim)

    def allocate_kv_cache(self, num_blocks: int) -> None:
        """One (key_cache, value_cache) per layer, [num_blocks, block_size, num_kv_heads,
        head_dim] each, of kv_cache_dtype."""
        shape = self._kv_shape(num_blocks)
        self.num_blocks = num_blocks
        kv = {"dtype": self.kv_cache_dtype, "device": self.device}
        self.kv_caches = [
            (torch.zeros(shape, **kv), torch.zeros(shape, **kv)) for _ in range(self.num_layers)
        ]

    @torch.inference_mode()
    def profile_peak_bytes(self, num_tokens: int, num_seqs: int) -> int:
        """CUDA only: activation memory of the largest step (num_tokens tokens over num_seqs
        prefill sequences, num_seqs sampled rows), measured with a throw-away KV cache."""
        num_seqs = max(1, min(num_seqs, num_tokens))
        per_seq = -(-num_tokens // num_seqs)
        blocks_per_seq = -(-per_seq // self.block_size)
        scratch = torch.zeros(
            self._kv_shape(num_seqs * blocks_per_seq),
            dtype=self.kv_cache_dtype,
            device=self.device,
        )
        kv = [(scratch, scratch)] * self.num_layers
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
        if hidden is not None:  # None: a later pipeline stage (no logits, no sampling)
            rows = hidden[torch.arange(min(num_seqs, num_tokens), device=self.device)]
            logits = self.model.compute_logits(rows)
            # The sampler's working set: a few [S, vocab] fp32 tensors (probabilities, noise,
            # sort).
            work = torch.empty((4, *logits.shape), dtype=torch.float32, device=self.device)
            del work, logits, rows
        del hidden
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

    def capture_verify_graphs(
        self, max_num_seqs: int, num_speculative_tokens: int, max_model_len: int
    ) -> None:
        """Graphs for uniform verify steps (runner/verify_graphs.py); only over the attention
        kernels: the prefill reference loops over the host's copy of the context lengths,
        which a graph would freeze."""
        if not self.attention.kernels:
            logger.info("speculative verify steps run without CUDA graphs (attention reference)")
            return
        self.verify_graphs = VerifyGraphs(
            self.model,
            self.kv_caches,
            self.attention,
            max_num_seqs=max_num_seqs,
            num_speculative_tokens=num_speculative_tokens,
            max_model_len=max_model_len,
            block_size=self.block_size,
            device=self.device,
        )
        self.verify_graphs.capture()

    def capture_piecewise_graphs(self, max_tokens: int, use_graphs: bool = True) -> None:
        """Graphs for steps of up to `max_tokens` tokens that carry prefill rows
        (runner/piecewise_graphs.py); `use_graphs=False` runs the same pieces eagerly."""
        self.piecewise = PiecewiseGraphs(
            self.model,
            self.kv_caches,
            max_tokens=max_tokens,
            num_q_heads=self.num_q_heads,
            head_dim=self.model_config.head_dim,
            dtype=self.dtype,
            device=self.device,
            use_graphs=use_graphs,
        )
        if use_graphs:
            self.piecewise.capture()

    def build_attention_metadata(self, out: StepInput) -> AttentionMetadata:
        """The step's metadata, staged to the device and planned (validated once)."""
        return self.attention.metadata_for(out, self.stager.to_device)

    def execute(
        self,
        out: StepInput,
        slots: Sequence[int],
        prompt_rows: PromptLogprobRows | None = None,
        grammar_mask: GrammarMask | None = None,
    ) -> StepResult:
        """`launch` and wait for its result."""
        return self.launch(out, slots, prompt_rows, grammar_mask).result()

    @torch.inference_mode()
    def launch(
        self,
        out: StepInput,
        slots: Sequence[int],
        prompt_rows: PromptLogprobRows | None = None,
        grammar_mask: GrammarMask | Callable[[], GrammarMask | None] | None = None,
    ) -> StepFuture:
        """Enqueues the step on the device and returns without waiting for it (see
        runner/step_future.py); `slots[i]` is the input-batch slot of the i-th sampled row (in
        `out.logits_indices` order). `out.placeholder_rows` take their token ids from the
        previous launch's sampled rows `out.placeholder_src`, on the device. `prompt_rows`:
        prefill rows whose prompt logprobs are asked for (scored from the same forward pass).
        `grammar_mask`: the structured-output bitmasks of the constrained rows (or a callable
        making them, called once the forward pass is enqueued, so the host fills them while the
        device runs), applied to the logits before sampling (so every sampling path, the argmax
        fast path and the row-by-row retry included, sees the masked logits)."""
        if len(slots) != out.num_sampled:
            raise ValueError(f"{len(slots)} sampled slots for {out.num_sampled} logits indices")
        if out.num_tokens == 0:
            return self._remember(StepFuture.empty(self.device))
        if prompt_rows is not None and prompt_rows.num_rows == 0:
            prompt_rows = None
        # An exception here is fatal: it is no one row's fault.
        logits, prompt_out = self._logits(out, prompt_rows)
        if logits is None:
            return self._remember(StepFuture.empty(self.device, prompt_out))
        if callable(grammar_mask):
            grammar_mask = grammar_mask()
        if grammar_mask is not None:
            self.bitmask.apply(logits, grammar_mask)
        # Speculation: the rows of a drafted request (its slot repeated) sample their target
        # distribution given the drafts before them (kestrel/spec/rejection.py says why that
        # is the rejection sampler for n-gram drafts).
        drafts = DraftRows.from_step(slots, out.input_ids, out.logits_indices)
        self.rewind.start_step()
        try:
            sampled, sampler_output = self._sample(logits, slots, drafts)
            future = StepFuture(sampled, sampler_output, None, prompt_out)
        except Exception as exc:
            # Lazy import: kestrel.engine imports this module.
            from kestrel.engine.faults import is_device_failure

            if is_device_failure(exc):
                raise
            result = self._sample_each_row(logits, slots, drafts)
            if result is None:  # every row failed on its own: not attributable
                raise
            tokens = torch.from_numpy(result.sampled_token_ids).to(self.device)
            future = StepFuture(tokens, result.sampler_output, result.failed_rows, prompt_out)
        return self._remember(future)

    def _remember(self, future: StepFuture) -> StepFuture:
        self._last_sampled = future.sampled_on_device  # the next step's placeholder source
        return future

    def _input_ids(self, out: StepInput) -> torch.Tensor:
        """The step's token ids on the device, placeholder rows filled from the previous step's
        sampled ids (there, without a round trip through the host)."""
        ids = self.stager.to_device(out.input_ids, torch.int64)
        rows = out.placeholder_rows
        if rows.shape[0]:
            prev = self._last_sampled
            src = out.placeholder_src
            if prev is None or int(src.max()) >= prev.shape[0]:
                raise RuntimeError(
                    f"placeholder rows read sampled row {int(src.max())} of a previous step that "
                    f"sampled {0 if prev is None else prev.shape[0]}"
                )
            dst = self.stager.to_device(rows, torch.int64)
            ids.index_copy_(0, dst, prev.index_select(0, self.stager.to_device(src, torch.int64)))
        return ids

    def _logits(
        self, out: StepInput, prompt_rows: PromptLogprobRows | None
    ) -> tuple[torch.Tensor | None, PromptLogprobsOut | None]:
        """The forward pass: logits [S, vocab] fp32 of the sampled rows (None when S == 0) and
        the scored prompt rows. Steps that score prompt rows run eagerly (prefills)."""
        self.stager.begin_step()
        input_ids = self._input_ids(out)
        if (
            prompt_rows is None
            and self.graphs is not None
            and out.num_sampled == out.num_reqs
            and self.graphs.can_run(out)
        ):
            return self.graphs.run(out, input_ids, self.stager.to_device), None  # [S, vocab]
        if (
            prompt_rows is None
            and self.verify_graphs is not None
            and self.verify_graphs.can_run(out)
        ):
            return self.verify_graphs.run(out, input_ids, self.stager.to_device), None
        return self._forward_eager(out, input_ids, prompt_rows)

    def _sample(
        self, logits: torch.Tensor, slots: Sequence[int], drafts: DraftRows | None = None
    ) -> tuple[torch.Tensor, SamplerOutput | None]:
        """The sampling stage: one token per row of `logits` (row i: the sequence in slots[i]),
        on the device, and the logprob tensors when a row asks for them. Never modifies `logits`
        (the row-by-row retry reads them again). `drafts`: the drafts each row assumes."""
        if self.input_batch.all_plain_greedy(slots):  # fast path: no per-row tensors to gather
            return logits.argmax(dim=-1), None
        batch = self.input_batch.gather(slots, self.stager.to_device, drafts)
        if drafts is None:
            sampled = self.sampler(logits, batch)
        else:
            sampled = self.sampler(logits, batch, record_states=True)
            self.rewind.record(list(slots), batch.generators, sampled.generator_states)
        return sampled.sampled_token_ids, (sampled if sampled.logprobs is not None else None)

    def _sample_each_row(
        self, logits: torch.Tensor, slots: Sequence[int], drafts: DraftRows | None = None
    ) -> StepResult | None:
        """After the batch failed to sample: each row alone. Rows that still raise (not a device
        failure, which propagates) go into `failed_rows`; None when every row of a multi-row
        batch failed. Logprobs are taken over the whole batch as `_sample` would."""
        from kestrel.engine.faults import is_device_failure

        self.rewind.start_step()  # the failed batch's draws moved the generators on already
        tokens = np.zeros(len(slots), dtype=np.int64)
        failed: dict[int, BaseException] = {}
        for i, slot in enumerate(slots):
            try:
                row_drafts = drafts.row(i) if drafts is not None else None
                tokens[i] = int(self._sample(logits[i : i + 1], [slot], row_drafts)[0][0])
            except Exception as exc:
                if is_device_failure(exc):
                    raise
                failed[i] = exc
        if len(slots) > 1 and len(failed) == len(slots):
            return None
        logger.warning(
            "sampling a batch of %d rows failed; sampled row by row, %d rows failed alone",
            len(slots),
            len(failed),
        )
        max_num_logprobs = self.input_batch.max_num_logprobs(slots)
        sampler_output = None
        if max_num_logprobs >= 0:
            sampled = torch.from_numpy(tokens).to(logits.device)
            sampler_output = Sampler.with_logprobs(logits, sampled, max_num_logprobs)
        return StepResult(tokens, sampler_output, failed)

    @torch.inference_mode()
    def forward_stage(self, out: StepInput) -> None:
        """A later pipeline stage's part of a step: its layers over the hidden states the
        previous stage sends (kestrel/layers/pipeline.py); no logits, no sampling."""
        self.stager.begin_step()
        positions = self.stager.to_device(out.positions, torch.int64)
        metadata = self.build_attention_metadata(out)
        self.model(None, positions, self.kv_caches, metadata)

    def _forward_eager(
        self, out: StepInput, input_ids: torch.Tensor, prompt_rows: PromptLogprobRows | None
    ) -> tuple[torch.Tensor | None, PromptLogprobsOut | None]:
        """Logits [S, vocab] fp32 of the sampled rows (None when no row is sampled), and the
        prompt logprobs of `prompt_rows`."""
        stage = self.stager.to_device
        positions = stage(out.positions, torch.int64)
        metadata = self.build_attention_metadata(out)
        if self.piecewise is not None and self.piecewise.can_run(out.num_tokens):
            hidden = self.piecewise.run(input_ids, positions, metadata)  # [T, hidden]
        else:
            hidden = self.model(input_ids, positions, self.kv_caches, metadata)  # [T, hidden]
        prompt_out = None
        if prompt_rows is not None:
            prompt_out = score_prompt_rows(
                hidden, self.model.compute_logits, prompt_rows, self.input_batch.max_num_seqs
            )
        if out.num_sampled == 0:
            return None, prompt_out
        logits_indices = stage(out.logits_indices, torch.int64)
        return self.model.compute_logits(hidden[logits_indices]), prompt_out
