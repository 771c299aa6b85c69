"""Llama-family decoder: Llama 2/3, Mistral, Qwen2/2.5 (q/k/v bias), Qwen3 (q/k norm).

Parameter names follow the Hugging Face checkpoints except for two fused projections:
`self_attn.qkv_proj` (rows: q, then k, then v) and `mlp.gate_up_proj` (rows: gate, then up).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from kestrel import ops
from kestrel.layers import (
    Linear,
    LMHead,
    MergedLinear,
    PagedAttention,
    RMSNorm,
    RotaryEmbedding,
    VocabEmbedding,
)
from kestrel.model_config import ModelConfig

KVCache = tuple[torch.Tensor, torch.Tensor]  # (key_cache, value_cache) of one layer

# (checkpoint name fragment, fused parameter fragment, shard id)
_FUSED_SHARDS = (
    (".self_attn.q_proj.", ".self_attn.qkv_proj.", "q"),
    (".self_attn.k_proj.", ".self_attn.qkv_proj.", "k"),
    (".self_attn.v_proj.", ".self_attn.qkv_proj.", "v"),
    (".mlp.gate_proj.", ".mlp.gate_up_proj.", "gate"),
    (".mlp.up_proj.", ".mlp.gate_up_proj.", "up"),
)
# Checkpoint tensors that are not parameters here (recomputed buffers).
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class LlamaMLP(nn.Module):
    def __init__(self, config: ModelConfig, dtype: torch.dtype, device: torch.device | str):
        super().__init__()
        hidden, inter = config.hidden_size, config.intermediate_size
        self.gate_up_proj = MergedLinear(
            hidden, {"gate": inter, "up": inter}, config.mlp_bias, dtype, device
        )
        self.down_proj = Linear(inter, hidden, config.mlp_bias, dtype, device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x [T, hidden] -> gate_up [T, 2 * intermediate] -> [T, intermediate] -> [T, hidden]
        return self.down_proj(ops.silu_and_mul(self.gate_up_proj(x)))


class LlamaAttention(nn.Module):
    def __init__(self, config: ModelConfig, dtype: torch.dtype, device: torch.device | str):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.q_size = config.q_size
        self.kv_size = config.kv_size
        self.qkv_proj = MergedLinear(
            config.hidden_size,
            {"q": self.q_size, "k": self.kv_size, "v": self.kv_size},
            config.qkv_bias,
            dtype,
            device,
        )
        self.o_proj = Linear(self.q_size, config.hidden_size, config.o_proj_bias, dtype, device)
        if config.qk_norm:
            eps = config.rms_norm_eps
            self.q_norm: RMSNorm | None = RMSNorm(self.head_dim, eps, dtype, device)
            self.k_norm: RMSNorm | None = RMSNorm(self.head_dim, eps, dtype, device)
        else:
            self.q_norm = None
            self.k_norm = None
        self.attn = PagedAttention(
            self.num_heads, self.num_kv_heads, self.head_dim, scale=self.head_dim**-0.5
        )

    def forward(
        self,
        positions: torch.Tensor,
        hidden: torch.Tensor,
        cos_sin_cache: torch.Tensor,
        kv_cache: KVCache,
        attn_metadata: ops.AttentionMetadata,
    ) -> torch.Tensor:
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
        out = self.attn(positions, q, k, v, cos_sin_cache, kv_cache, attn_metadata)
        return self.o_proj(out.reshape(num_tokens, self.q_size))  # [T, hidden]


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, dtype: torch.dtype, device: torch.device | str):
        super().__init__()
        eps = config.rms_norm_eps
        self.input_layernorm = RMSNorm(config.hidden_size, eps, dtype, device)
        self.self_attn = LlamaAttention(config, dtype, device)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps, dtype, device)
        self.mlp = LlamaMLP(config, dtype, device)

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
        if residual is None:
            residual = hidden
            hidden, _ = self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(positions, hidden, cos_sin_cache, kv_cache, attn_metadata)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        assert residual is not None
        return self.mlp(hidden), residual


class LlamaModel(nn.Module):
    def __init__(self, config: ModelConfig, dtype: torch.dtype, device: torch.device | str):
        super().__init__()
        self.embed_tokens = VocabEmbedding(config.vocab_size, config.hidden_size, dtype, device)
        self.rotary_emb = RotaryEmbedding(
            config.head_dim,
            config.max_position_embeddings,
            config.rope_theta,
            config.rope_scaling,
            device,
        )
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(config, dtype, device) for _ in range(config.num_hidden_layers)
        )
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
        hidden = self.embed_tokens(input_ids)  # [T, hidden]
        residual: torch.Tensor | None = None
        cos_sin_cache = self.rotary_emb.cos_sin_cache
        for layer, kv_cache in zip(self.layers, kv_caches):
            hidden, residual = layer(
                positions, hidden, residual, cos_sin_cache, kv_cache, attn_metadata
            )
        hidden, _ = self.norm(hidden, residual)
        return hidden


class LlamaForCausalLM(nn.Module):
    """Decoder + LM head. Inference only: parameters have requires_grad=False."""

    def __init__(
        self,
        config: ModelConfig,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        super().__init__()
        self.config = config
        self.model = LlamaModel(config, dtype, device)
        tie_to = self.model.embed_tokens if config.tie_word_embeddings else None
        self.lm_head = LMHead(config.vocab_size, config.hidden_size, dtype, device, tie_to)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[KVCache],
        attn_metadata: ops.AttentionMetadata,
    ) -> torch.Tensor:
        """input_ids, positions [T] int; kv_caches: one (key_cache, value_cache) per layer,
        each [num_blocks, block_size, num_kv_heads, head_dim], written in place for every row
        whose slot_mapping entry is >= 0. Returns the final-normed hidden states [T, hidden]."""
        return self.model(input_ids, positions, kv_caches, attn_metadata)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [S, hidden] (the rows to sample) -> logits [S, vocab_size] float32."""
        return self.lm_head(hidden)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Copy Hugging Face-named checkpoint tensors into the parameters (dtype converted).

        q/k/v and gate/up tensors go to their row range of the fused parameters. Returns the
        names of the parameters loaded. Raises ValueError, after consuming every tensor, that
        lists unknown checkpoint names and parameters (or fused shards) never loaded.
        """
        params = dict(self.named_parameters())
        loaded: set[tuple[str, str | None]] = set()
        unknown: list[str] = []
        for ckpt_name, tensor in weights:
            if ckpt_name.endswith(_IGNORED_SUFFIXES):
                continue
            if ckpt_name == "lm_head.weight" and self.config.tie_word_embeddings:
                continue  # the head reuses model.embed_tokens.weight
            param_name, shard_id = _map_checkpoint_name(ckpt_name)
            param = params.get(param_name)
            if param is None:
                unknown.append(ckpt_name)
                continue
            try:
                param.weight_loader(param, tensor, shard_id)
            except ValueError as exc:
                raise ValueError(f"cannot load checkpoint tensor {ckpt_name!r}: {exc}") from exc
            loaded.add((param_name, shard_id))
        missing = [
            _describe(name, shard)
            for name, param in params.items()
            for shard in getattr(param, "shard_ids", (None,))
            if (name, shard) not in loaded
        ]
        if unknown or missing:
            raise ValueError(
                f"checkpoint does not match {type(self).__name__} "
                f"({self.config.architecture}): unexpected tensors {sorted(unknown)}; "
                f"parameters never loaded {missing}"
            )
        return {name for name, _ in loaded}


def _map_checkpoint_name(name: str) -> tuple[str, str | None]:
    """HF tensor name -> (parameter name here, shard id or None)."""
    for ckpt_fragment, param_fragment, shard_id in _FUSED_SHARDS:
        if ckpt_fragment in name:
            return name.replace(ckpt_fragment, param_fragment, 1), shard_id
    return name, None


def _describe(param_name: str, shard_id: str | None) -> str:
    """Checkpoint name of a parameter or fused shard (the inverse of _map_checkpoint_name)."""
    for ckpt_fragment, param_fragment, fused_shard in _FUSED_SHARDS:
        if shard_id == fused_shard and param_fragment in param_name:
            return param_name.replace(param_fragment, ckpt_fragment, 1)
    return param_name
