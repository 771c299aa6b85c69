"""Tiny random Hugging Face-format models, built with transformers' own classes.

`make_tiny_model(dir, arch)` writes a directory that both transformers
(`AutoModelForCausalLM.from_pretrained`) and Kestrel (`kestrel.loader.load_model`) load:
config.json, safetensors weights (sharded with an index when `max_shard_size` is small),
generation_config.json and, optionally, the tiny 512-token tokenizer.

transformers is a test-only dependency, so it is imported inside the function.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

# arch -> (transformers config class name, causal LM class name)
_ARCHS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "mistral": ("MistralConfig", "MistralForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
}
# Ids of <|endoftext|> and <|im_end|> in the tiny tokenizer (trained first, ids 0 and 2); used
# as bos / eos when no tokenizer is written and no id is given.
_DEFAULT_BOS_ID = 0
_DEFAULT_EOS_ID = 2
# transformers initialises with std 0.02 (and zero biases, unit norms), which makes the logits
# of a tiny model nearly uniform; these larger scales give well-separated greedy choices.
_WEIGHT_STD = 0.15
_VOCAB_STD = 0.4  # embedding and LM head: logits std ~ 0.4 * sqrt(hidden_size)
_BIAS_STD = 0.1
_NORM_JITTER = 0.1  # norm weights ~ 1 + N(0, jitter^2): a norm left at 1.0 would go unnoticed


def make_tiny_model(
    path: str | Path,
    arch: str = "llama",
    *,
    seed: int = 0,
    vocab_size: int = 512,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    head_dim: int | None = None,
    tie_word_embeddings: bool = False,
    rope_theta: float = 10000.0,
    rope_scaling: dict[str, Any] | None = None,
    max_shard_size: str | int | None = None,
    max_position_embeddings: int = 512,
    with_tokenizer: bool = True,
    bos_token_id: int | None = None,
    eos_token_id: int | None = None,
) -> Path:
    """Write a deterministic tiny random `arch` model into `path` (created) and return it.

    head_dim: None = hidden_size // num_heads (not supported for qwen2, whose config has none).
    rope_scaling: an HF scaling dict with `rope_type` (e.g. llama3), stored in transformers 5's
    `rope_parameters` together with rope_theta.
    bos/eos ids: default to the tokenizer's <|endoftext|> / <|im_end|> ids.
    """
    import transformers

    if arch not in _ARCHS:
        raise ValueError(f"arch={arch!r} is not supported; supported: {sorted(_ARCHS)}")
    out_dir = Path(path)
    out_dir.mkdir(parents=True, exist_ok=True)
    if with_tokenizer:
        from kestrel.testing.tiny_tokenizer import write_tiny_tokenizer

        tokenizer_vocab = write_tiny_tokenizer(out_dir)
        if tokenizer_vocab > vocab_size:
            raise ValueError(
                f"vocab_size={vocab_size} is smaller than the tokenizer's {tokenizer_vocab} tokens"
            )
        special_ids = _special_token_ids(out_dir / "tokenizer.json")
        default_bos = special_ids["<|endoftext|>"]
        default_eos = special_ids["<|im_end|>"]
    else:
        default_bos, default_eos = _DEFAULT_BOS_ID, _DEFAULT_EOS_ID
    bos = default_bos if bos_token_id is None else bos_token_id
    eos = default_eos if eos_token_id is None else eos_token_id

    rope_parameters = {"rope_type": "default", **(rope_scaling or {}), "rope_theta": rope_theta}
    config_kwargs: dict[str, Any] = {
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads,
        "intermediate_size": intermediate_size,
        "max_position_embeddings": max_position_embeddings,
        "tie_word_embeddings": tie_word_embeddings,
        "rope_parameters": rope_parameters,
        "bos_token_id": bos,
        "eos_token_id": eos,
        "pad_token_id": default_bos,
        "rms_norm_eps": 1e-6,
    }
    if arch == "qwen2":
        if head_dim is not None and head_dim * num_heads != hidden_size:
            raise ValueError(f"qwen2 needs head_dim == hidden_size // num_heads; got {head_dim}")
    else:
        # Qwen3Config defaults head_dim to 128, so always set it.
        config_kwargs["head_dim"] = head_dim if head_dim is not None else hidden_size // num_heads
    config_name, model_name = _ARCHS[arch]
    config = getattr(transformers, config_name)(**config_kwargs)

    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(config).to(torch.float32).eval()
    _scale_up_init(model, seed)
    save_kwargs: dict[str, Any] = {}
    if max_shard_size is not None:
        save_kwargs["max_shard_size"] = max_shard_size
    model.save_pretrained(out_dir, **save_kwargs)
    generation_config = {
        "bos_token_id": bos,
        "eos_token_id": [eos] if eos == default_bos else [eos, default_bos],
        "pad_token_id": default_bos,
    }
    with open(out_dir / "generation_config.json", "w", encoding="utf-8") as f:
        json.dump(generation_config, f, indent=2)
        f.write("\n")
    return out_dir


@torch.no_grad()
def _scale_up_init(model: torch.nn.Module, seed: int) -> None:
    """Re-initialise every parameter: embedding / LM head N(0, 0.4^2), other matrices
    N(0, 0.15^2), biases N(0, 0.1^2), norm weights 1 + N(0, 0.1^2). Tied weights are one
    parameter and are drawn once."""
    generator = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        noise = torch.randn(param.shape, generator=generator, dtype=torch.float32)
        if name.endswith(("embed_tokens.weight", "lm_head.weight")):
            param.copy_(noise * _VOCAB_STD)
        elif param.dim() >= 2:
            param.copy_(noise * _WEIGHT_STD)
        elif name.endswith(".bias"):
            param.copy_(noise * _BIAS_STD)
        else:  # RMSNorm weights
            param.copy_(1.0 + noise * _NORM_JITTER)


def _special_token_ids(tokenizer_json: Path) -> dict[str, int]:
    data = json.loads(tokenizer_json.read_text(encoding="utf-8"))
    return {token["content"]: token["id"] for token in data.get("added_tokens", [])}
