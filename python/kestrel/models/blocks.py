"""Shared blocks of the Llama-family decoders (Llama, Mistral, Qwen2, Qwen3).

Pre-norm decoder layers of RMSNorm -> attention (fused q/k/v, optional per-head q/k RMSNorm,
RoPE, GQA) and RMSNorm -> SwiGLU MLP, over a (vocabulary-parallel) embedding and LM head. The
per-architecture switches come from `ModelConfig` (qkv_bias, o_proj_bias, mlp_bias, qk_norm);
each architecture's file subclasses `DecoderForCausalLM`.

Tensor parallelism (Megatron layout): q/k/v and gate/up are column-parallel (heads and
intermediate columns sharded), o_proj and down_proj row-parallel (all-reduce after), so each
rank runs attention over its own heads. At tp size 1 the forward pass is one F.linear per
projection, exactly as an unsharded model.

Parameter names follow the Hugging Face checkpoints except for the packed projections listed in
each model's `packed_modules_mapping`: `self_attn.qkv_proj` (rows: q, then k, then v) and
`mlp.gate_up_proj` (rows: gate, then up).
"""

from __future__ import annotations

import re
from collections.abc import Generator, Iterable, Iterator, Mapping, Sequence
from typing import ClassVar

import torch
from torch import nn

from kestrel import ops
from kestrel.layers import (
    SINGLE_RANK,
    LinearMethodBase,
    MergedColumnParallelLinear,
    PagedAttention,
    ParallelLMHead,
    QKVParallelLinear,
    RMSNorm,
    RotaryEmbedding,
    RowParallelLinear,
    TensorParallelGroup,
    VocabParallelEmbedding,
)
from kestrel.layers.kv_scales import take_kv_scales
from kestrel.layers.pipeline import SINGLE_STAGE, PipelineStage
from kestrel.layers.quant_config import Fp8Config, LinearMethods
from kestrel.model_config import ModelConfig
from kestrel.models.weights import load_packed_weights
from kestrel.ops import _dispatch

KVCache = tuple[torch.Tensor, torch.Tensor]  # (key_cache, value_cache) of one layer
_LAYER_NAME = re.compile(r"model\.layers\.(\d+)\.(.+)")
_FIRST_STAGE_ONLY = ("model.embed_tokens.", "model.norm.", "lm_head.")
Device = torch.device | str


def unquantized(prefix: str) -> LinearMethodBase | None:
    """The LinearMethods of a model without quantization: every layer plain F.linear."""
    return None


class DecoderMLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)); gate/up fused, column-parallel; down row-parallel."""

    def __init__(
        self,
        config: ModelConfig,
        dtype: torch.dtype,
        device: Device,
        tp_group: TensorParallelGroup,
        prefix: str,
        quant: LinearMethods = unquantized,
    ) -> None:
        super().__init__()
        hidden, inter = config.hidden_size, config.intermediate_size
        self.gate_up_proj = MergedColumnParallelLinear(
            hidden, [inter, inter], bias=config.mlp_bias, dtype=dtype, device=device,
            tp_group=tp_group, quant_method=quant(f"{prefix}.gate_up_proj"),
            prefix=f"{prefix}.gate_up_proj",
        )  # fmt: skip
        self.down_proj = RowParallelLinear(
            inter, hidden, bias=config.mlp_bias, dtype=dtype, device=device, tp_group=tp_group,
            quant_method=quant(f"{prefix}.down_proj"), prefix=f"{prefix}.down_proj",
        )  # fmt: skip
        # The gate's implementation, chosen once (the kernel on CUDA fp16/bf16).
        kernels = _dispatch.kernels_for(device, dtype)
        self._silu_and_mul = ops.silu_and_mul if kernels else ops.silu_and_mul_reference

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x [T, hidden] -> gate_up [T, 2 * I/tp] -> [T, I/tp] -> [T, hidden] (summed over ranks)
        return self.down_proj(self._silu_and_mul(self.gate_up_proj(x)))


class DecoderAttention(nn.Module):
    """Self-attention over this rank's heads: num_heads = Hq/tp query heads and num_kv_heads
    key/value heads (Hkv/tp, or 1 replicated KV head when Hkv < tp)."""

    def __init__(
        self,
        config: ModelConfig,
        dtype: torch.dtype,
        device: Device,
        tp_group: TensorParallelGroup,
        prefix: str,
        quant: LinearMethods = unquantized,
    ) -> None:
        super().__init__()
        self.head_dim = head_dim = config.head_dim
        self.qkv_proj = QKVParallelLinear(
            config.hidden_size, head_dim, config.num_attention_heads,
            config.num_key_value_heads, bias=config.qkv_bias, dtype=dtype, device=device,
            tp_group=tp_group, quant_method=quant(f"{prefix}.qkv_proj"),
            prefix=f"{prefix}.qkv_proj",
        )  # fmt: skip
        self.num_heads = self.qkv_proj.num_heads
        self.num_kv_heads = self.qkv_proj.num_kv_heads
        self.q_size = self.qkv_proj.q_size  # num_heads * head_dim
        self.kv_size = self.qkv_proj.kv_size  # num_kv_heads * head_dim
        self.o_proj = RowParallelLinear(
            config.q_size, config.hidden_size, bias=config.o_proj_bias, dtype=dtype,
            device=device, tp_group=tp_group, quant_method=quant(f"{prefix}.o_proj"),
            prefix=f"{prefix}.o_proj",
        )  # fmt: skip
        if config.qk_norm:
            eps = config.rms_norm_eps
            self.q_norm: RMSNorm | None = RMSNorm(head_dim, eps, dtype, device)
            self.k_norm: RMSNorm | None = RMSNorm(head_dim, eps, dtype, device)
        else:
            self.q_norm = None
            self.k_norm = None
        self.attn = PagedAttention(
            self.num_heads, self.num_kv_heads, head_dim, scale=head_dim**-0.5, dtype=dtype,
            device=device,
        )  # fmt: skip

    def project(
        self,
        positions: torch.Tensor,
        hidden: torch.Tensor,
        cos_sin_cache: torch.Tensor,
        kv_cache: KVCache,
        slot_mapping: torch.Tensor,
    ) -> torch.Tensor:
        """Everything before attention: q/k/v, the q/k norms, RoPE and the KV write. Returns
        the rotated q [T, Hq, D] (a view into the qkv projection)."""
        num_tokens = hidden.shape[0]
        qkv = self.qkv_proj(hidden)  # [T, q_size + 2 * kv_size]
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        # Views into qkv; RoPE rotates q and k in place.
        q = q.view(num_tokens, self.num_heads, self.head_dim)  # [T, Hq, D]
        k = k.view(num_tokens, self.num_kv_heads, self.head_dim)  # [T, Hkv, D]
        v = v.view(num_tokens, self.num_kv_heads, self.head_dim)  # [T, Hkv, D]
        if self.q_norm is not None and self.k_norm is not None:
            q, _ = self.q_norm(q)  # per-head RMSNorm over D, before RoPE
            k, _ = self.k_norm(k)
        self.attn.write_cache(positions, q, k, v, cos_sin_cache, kv_cache, slot_mapping)
        return q

    def output(self, attn_out: torch.Tensor) -> torch.Tensor:
        """attention output [T, Hq, D] -> o_proj [T, hidden]."""
        return self.o_proj(attn_out.reshape(attn_out.shape[0], self.q_size))


class DecoderLayer(nn.Module):
    def __init__(
        self,
        config: ModelConfig,
        dtype: torch.dtype,
        device: Device,
        tp_group: TensorParallelGroup,
        prefix: str,
        quant: LinearMethods = unquantized,
    ) -> None:
        super().__init__()
        eps, hidden = config.rms_norm_eps, config.hidden_size
        self.input_layernorm = RMSNorm(hidden, eps, dtype, device)
        self.self_attn = DecoderAttention(
            config, dtype, device, tp_group, f"{prefix}.self_attn", quant
        )
        self.post_attention_layernorm = RMSNorm(hidden, eps, dtype, device)
        self.mlp = DecoderMLP(config, dtype, device, tp_group, f"{prefix}.mlp", quant)

    def forward(
        self,
        positions: torch.Tensor,
        hidden: torch.Tensor,
        residual: torch.Tensor | None,
        cos_sin_cache: torch.Tensor,
        kv_cache: KVCache,
        attn_metadata: ops.AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Pre-norm block with the residual carried separately.

        In: hidden = this layer's input delta, residual = running sum so far (None for the
        first layer, whose hidden is the embedding). Out: (mlp output, updated residual); the
        true hidden state after the layer is their sum.
        """
        q, residual = self.before_attention(
            positions, hidden, residual, cos_sin_cache, kv_cache, attn_metadata.slot_mapping
        )
        attn_out = self.self_attn.attn.attend(q, kv_cache, attn_metadata)
        return self.after_attention(attn_out, residual)

    def before_attention(
        self,
        positions: torch.Tensor,
        hidden: torch.Tensor,
        residual: torch.Tensor | None,
        cos_sin_cache: torch.Tensor,
        kv_cache: KVCache,
        slot_mapping: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The input norm and the attention's projection, RoPE and KV write: (q, residual)."""
        if residual is None:
            residual = hidden
            hidden, _ = self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        assert residual is not None
        q = self.self_attn.project(positions, hidden, cos_sin_cache, kv_cache, slot_mapping)
        return q, residual

    def after_attention(
        self, attn_out: torch.Tensor, residual: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """o_proj, the post-attention norm and the MLP: (mlp output, residual)."""
        hidden = self.self_attn.output(attn_out)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        assert residual is not None
        return self.mlp(hidden), residual


class DecoderModel(nn.Module):
    """The trunk: embedding -> layers -> final norm (one RoPE table shared by all layers)."""

    def __init__(
        self,
        config: ModelConfig,
        dtype: torch.dtype,
        device: Device,
        tp_group: TensorParallelGroup,
        prefix: str = "model",
        quant: LinearMethods = unquantized,
        pp: PipelineStage = SINGLE_STAGE,
    ) -> None:
        """`pp`: this pipeline stage's layers; the embedding and the final norm live on the
        first stage only (see kestrel/layers/pipeline.py)."""
        super().__init__()
        self.pp = pp
        self.hidden_size, self.dtype, self.device = config.hidden_size, dtype, device
        self.embed_tokens = None
        if pp.is_first:
            self.embed_tokens = VocabParallelEmbedding(
                config.vocab_size, config.hidden_size, dtype=dtype, device=device,
                tp_group=tp_group, prefix=f"{prefix}.embed_tokens",
            )  # fmt: skip
        self.rotary_emb = RotaryEmbedding(
            config.head_dim,
            config.max_position_embeddings,
            config.rope_theta,
            config.rope_scaling,
            device,
        )
        # Checkpoint layer i is self.layers[i - pp.start] (prefixes keep the checkpoint's i).
        self.layer_ids = list(pp.layers(config.num_hidden_layers))
        self.layers = nn.ModuleList(
            DecoderLayer(config, dtype, device, tp_group, f"{prefix}.layers.{i}", quant)
            for i in self.layer_ids
        )
        self.norm = None
        if pp.is_first:
            self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype, device)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[KVCache],
        attn_metadata: ops.AttentionMetadata,
    ) -> torch.Tensor:
        if len(kv_caches) != len(self.layers):
            raise ValueError(
                f"need one (key_cache, value_cache) pair per layer: {len(self.layers)} layers, "
                f"got {len(kv_caches)} pairs"
            )
        residual: torch.Tensor | None = None
        if self.pp.is_first:
            hidden = self.embed_tokens(input_ids)  # [T, hidden]
        else:  # a later pipeline stage: the previous stage's output
            like = torch.empty(
                (positions.shape[0], self.hidden_size), dtype=self.dtype, device=self.device
            )
            hidden, residual = self.pp.recv_from_previous(like)
        cos_sin_cache = self.rotary_emb.cos_sin_cache
        for layer, kv_cache in zip(self.layers, kv_caches):
            hidden, residual = layer(
                positions, hidden, residual, cos_sin_cache, kv_cache, attn_metadata
            )
        if self.pp.size > 1:
            assert residual is not None  # every stage has a layer
            self.pp.send_to_next(hidden, residual)
            if not self.pp.is_first:
                return None  # the first stage finishes the step
            hidden, residual = self.pp.recv_from_previous(hidden)
        hidden, _ = self.norm(hidden, residual)
        return hidden

    def forward_split(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[KVCache],
        slot_mapping: torch.Tensor,
    ) -> Generator[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`forward` cut at every attention (one pipeline stage only), for piecewise CUDA
        graphs (kestrel/runner/piecewise_graphs.py): yields each layer's rotated q
        [T, Hq, D] after its KV write, is sent that layer's attention output [T, Hq, D], and
        returns the final-normed hidden states [T, hidden]. What runs between two yields
        depends on T alone, never on the step's batch layout."""
        if self.pp.size > 1:
            raise ValueError("forward_split runs a single pipeline stage")
        hidden = self.embed_tokens(input_ids)  # [T, hidden]
        residual: torch.Tensor | None = None
        cos_sin_cache = self.rotary_emb.cos_sin_cache
        for layer, kv_cache in zip(self.layers, kv_caches, strict=True):
            q, residual = layer.before_attention(
                positions, hidden, residual, cos_sin_cache, kv_cache, slot_mapping
            )
            attn_out = yield q
            del q
            hidden, residual = layer.after_attention(attn_out, residual)
        hidden, _ = self.norm(hidden, residual)
        return hidden


class DecoderForCausalLM(nn.Module):
    """Decoder + LM head. Inference only: parameters have requires_grad=False.

    Subclasses (one per architecture) declare `packed_modules_mapping`: packed parameter
    module -> the checkpoint modules fused into it, in the order of its shards.
    `quant_config`: FP8 for the decoder's linear layers (which ones: the config says, by
    checkpoint module name); the embedding and the LM head stay in `dtype`.
    """

    packed_modules_mapping: ClassVar[Mapping[str, Sequence[str]]] = {}
    # Checkpoint tensors that are not parameters here (recomputed buffers).
    ignored_checkpoint_suffixes: ClassVar[tuple[str, ...]] = ("rotary_emb.inv_freq",)

    def __init__(
        self,
        config: ModelConfig,
        dtype: torch.dtype = torch.float32,
        device: Device = "cpu",
        *,
        tp_group: TensorParallelGroup = SINGLE_RANK,
        quant_config: Fp8Config | None = None,
        pp_stage: PipelineStage = SINGLE_STAGE,
    ) -> None:
        """`quant_config`: the quant method of each linear layer (None: all unquantized);
        embeddings, norms and the LM head are never quantized here. `pp_stage`: the layers of
        this pipeline stage (the LM head on the first stage only)."""
        super().__init__()
        self.config = config
        self.tp_group = tp_group
        self.pp_stage = pp_stage
        self.quant_config = quant_config
        quant = unquantized
        # Checkpoint tensors read past: recomputed buffers, and the quantization's extras.
        self._skipped_suffixes = self.ignored_checkpoint_suffixes
        if quant_config is not None:
            quant = quant_config.methods_for(self.packed_modules_mapping)
            self._skipped_suffixes += quant_config.ignored_checkpoint_suffixes
        self.model = DecoderModel(config, dtype, device, tp_group, quant=quant, pp=pp_stage)
        self.lm_head = None
        if pp_stage.is_first:
            tie_to = self.model.embed_tokens if config.tie_word_embeddings else None
            self.lm_head = ParallelLMHead(
                config.vocab_size, config.hidden_size, dtype=dtype, device=device,
                tp_group=tp_group, tie_to=tie_to, prefix="lm_head",
            )  # fmt: skip

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[KVCache],
        attn_metadata: ops.AttentionMetadata,
    ) -> torch.Tensor:
        """input_ids, positions [T] int; kv_caches: one (key_cache, value_cache) per layer,
        each [num_blocks, block_size, num_kv_heads, head_dim] (this rank's KV heads), written
        in place for every row whose slot_mapping entry is >= 0. Returns the final-normed
        hidden states [T, hidden]."""
        return self.model(input_ids, positions, kv_caches, attn_metadata)

    def compute_logits(self, hidden: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """hidden [S, hidden] (the rows to sample) -> logits [S, vocab_size] float32 (into
        `out` when given)."""
        return self.lm_head(hidden, out)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Copy Hugging Face-named checkpoint tensors (full, unsharded) into the parameters
        (this rank's shards, dtype converted).

        Tensors of packed modules go to their shard of the packed parameter. Returns the names
        of the parameters loaded. Raises ValueError, after consuming every tensor, that lists
        unknown checkpoint names and parameters (or packed shards) never loaded.
        """
        tied = self.config.tie_word_embeddings

        def skip(name: str) -> bool:
            if name == "lm_head.weight" and tied:
                return True  # the head reuses model.embed_tokens.weight
            return name.endswith(self._skipped_suffixes)

        what = f"{type(self).__name__} ({self.config.architecture})"
        if self.pp_stage.size > 1:
            weights = self._stage_weights(weights)
        weights = take_kv_scales(self, weights)  # FP8 KV-cache scales: set on the layers
        return load_packed_weights(self, weights, self.packed_modules_mapping, skip, what)

    def _stage_weights(
        self, weights: Iterable[tuple[str, torch.Tensor]]
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """This pipeline stage's tensors, layer i renamed to its local index i - start; the
        embedding, final norm and LM head only on the first stage."""
        local = {i: k for k, i in enumerate(self.model.layer_ids)}
        for name, tensor in weights:
            match = _LAYER_NAME.match(name)
            if match is not None:
                k = local.get(int(match.group(1)))
                if k is not None:
                    yield f"model.layers.{k}.{match.group(2)}", tensor
            elif self.pp_stage.is_first or not name.startswith(_FIRST_STAGE_ONLY):
                yield name, tensor
