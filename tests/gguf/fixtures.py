"""Test helpers: write GGUF files the way llama.cpp's converter lays them out, and run a
single-sequence prefill through a Kestrel model.

`write_gguf_from_hf` turns a tiny Hugging Face directory (kestrel.testing.tiny_models) into a
GGUF file: llama.cpp tensor names, Q/K rows permuted for the `llama` architecture (each head's
two rotary halves interleaved row by row), optional quantization of the 2-D weights.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from safetensors.torch import load_file

from kestrel.ops import AttentionMetadata
from kestrel.testing.gguf_blocks import random_blocks

_HF_TO_GGUF_BLOCK = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
_HF_TO_GGUF_GLOBAL = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}


_Q = gguf.GGMLQuantizationType
_RANDOM_BLOCK_TYPES = frozenset({_Q.Q4_K, _Q.Q5_K, _Q.Q6_K})  # gguf cannot quantize these


# A tiny model whose linears can be K-quants (every input size a multiple of 256).
MIXED_TINY = {"hidden_size": 256, "intermediate_size": 512, "num_heads": 4, "num_kv_heads": 2}


def mixed_qtype_for(name: str) -> gguf.GGMLQuantizationType:
    """Q4_K and Q8_0 linears (q/k Q4_K with a Q8_0 v: mixed parts); layer 1's v is Q5_0, which
    has no kernel, so that layer's q/k/v is dequantized; embeddings and head F32."""
    if not name.startswith("model.layers."):
        return _Q.F32
    if name == "model.layers.1.self_attn.v_proj.weight":
        return _Q.Q5_0
    if ".v_proj." in name or ".down_proj." in name:
        return _Q.Q8_0
    return _Q.Q4_K


def gguf_name(hf_name: str) -> str:
    if hf_name in _HF_TO_GGUF_GLOBAL:
        return _HF_TO_GGUF_GLOBAL[hf_name]
    parts = hf_name.split(".")  # model.layers.N.<module path>.weight|bias
    module, kind = ".".join(parts[3:-1]), parts[-1]
    return f"blk.{parts[2]}.{_HF_TO_GGUF_BLOCK[module]}.{kind}"


def llama_cpp_permute(w: np.ndarray, num_heads: int) -> np.ndarray:
    """llama.cpp's converter order: per head, row 2i <- HF row i, row 2i+1 <- HF row i + d/2."""
    head_dim = w.shape[0] // num_heads
    out = np.empty_like(w)
    for h in range(num_heads):
        base = h * head_dim
        for i in range(head_dim // 2):
            out[base + 2 * i] = w[base + i]
            out[base + 2 * i + 1] = w[base + head_dim // 2 + i]
    return out


def write_gguf_from_hf(
    hf_dir: Path,
    out_path: Path,
    arch: str,
    *,
    qtype: gguf.GGMLQuantizationType = gguf.GGMLQuantizationType.F32,
    rope_freqs: np.ndarray | None = None,
    with_tokenizer: bool = True,
    permute: bool = True,
    qtype_for: Callable[[str], gguf.GGMLQuantizationType] | None = None,
) -> Path:
    """Write the tiny HF model in `hf_dir` as a GGUF of architecture `arch` (llama, qwen2,
    qwen3). 2-D weights are stored as `qtype`, or as `qtype_for(hf_name)` when given (types
    `gguf` cannot quantize, the K-quants, get random valid blocks: other weights than the HF
    model's); norms and biases stay F32. `permute=False` leaves llama Q/K rows in HF order (a
    wrong file, for tests)."""
    config = json.loads((hf_dir / "config.json").read_text())
    tensors = load_file(str(hf_dir / "model.safetensors"))
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    writer = gguf.GGUFWriter(out_path, arch)
    writer.add_name("tiny-test")
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    rope = config.get("rope_parameters") or {}
    writer.add_rope_freq_base(float(rope.get("rope_theta", config.get("rope_theta", 10000.0))))
    writer.add_vocab_size(config["vocab_size"])
    unquantized = qtype == gguf.GGMLQuantizationType.F32 and qtype_for is None
    writer.add_file_type(0 if unquantized else 7)
    if with_tokenizer:
        _add_byte_level_tokenizer(writer, hf_dir, config["vocab_size"])
    for name, tensor in tensors.items():
        if name == "lm_head.weight" and config.get("tie_word_embeddings"):
            continue
        array = tensor.to(torch.float32).numpy()
        if permute and arch == "llama" and ".q_proj." in name:
            array = llama_cpp_permute(array, heads)
        elif permute and arch == "llama" and ".k_proj." in name:
            array = llama_cpp_permute(array, kv_heads)
        tensor_qtype = qtype_for(name) if qtype_for is not None and array.ndim == 2 else qtype
        if array.ndim == 2 and tensor_qtype in _RANDOM_BLOCK_TYPES:
            rng = np.random.default_rng(zlib.crc32(name.encode()))
            blocks = random_blocks(tensor_qtype, *array.shape, rng, centered=True)
            writer.add_tensor(gguf_name(name), blocks, raw_dtype=tensor_qtype)
        elif array.ndim == 2 and tensor_qtype != gguf.GGMLQuantizationType.F32:
            blocks = gguf.quants.quantize(array, tensor_qtype)
            writer.add_tensor(gguf_name(name), blocks, raw_dtype=tensor_qtype)
        else:
            writer.add_tensor(gguf_name(name), array)
    if rope_freqs is not None:
        writer.add_tensor("rope_freqs.weight", rope_freqs.astype(np.float32))
    _finish(writer)
    return out_path


def _add_byte_level_tokenizer(writer: gguf.GGUFWriter, hf_dir: Path, vocab_size: int) -> None:
    data = json.loads((hf_dir / "tokenizer.json").read_text())
    vocab = dict(data["model"]["vocab"])
    for added in data.get("added_tokens", []):
        vocab[added["content"]] = added["id"]
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    for token, index in vocab.items():
        tokens[index] = token
    special = {a["content"] for a in data.get("added_tokens", []) if a.get("special")}
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in special else 1 for t in tokens])
    writer.add_token_merges(merges)
    writer.add_bos_token_id(vocab["<|endoftext|>"])
    writer.add_eos_token_id(vocab["<|im_end|>"])
    writer.add_add_bos_token(False)


def write_gguf(path: Path, arch: str, metadata: dict[str, Any], tensors: dict) -> Path:
    """A GGUF with arbitrary metadata (`key -> value`, typed by the writer from Python types) and
    tensors (`name -> float array` or `name -> (raw bytes array, GGML type)`)."""
    writer = gguf.GGUFWriter(path, arch)
    for key, value in metadata.items():
        if isinstance(value, bool):
            writer.add_bool(key, value)
        elif isinstance(value, int):
            writer.add_uint32(key, value)
        elif isinstance(value, float):
            writer.add_float32(key, value)
        elif isinstance(value, str):
            writer.add_string(key, value)
        else:
            writer.add_array(key, list(value))
    for name, value in tensors.items():
        if isinstance(value, tuple):
            writer.add_tensor(name, value[0], raw_dtype=value[1])
        else:
            writer.add_tensor(name, value)
    _finish(writer)
    return path


def _finish(writer: gguf.GGUFWriter) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@torch.inference_mode()
def prefill_logits(model: torch.nn.Module, config, token_ids: list[int]) -> torch.Tensor:
    """Logits [len(token_ids), vocab] of one sequence fed in one step (contiguous KV blocks), on
    the model's device."""
    n = len(token_ids)
    block_size = 16
    num_blocks = -(-n // block_size)
    first = next(model.parameters())
    dtype, device = first.dtype, first.device
    shape = (num_blocks, block_size, config.num_key_value_heads, config.head_dim)
    kv_caches = [
        (
            torch.zeros(shape, dtype=dtype, device=device),
            torch.zeros(shape, dtype=dtype, device=device),
        )
        for _ in range(config.num_hidden_layers)
    ]
    qsl = torch.tensor([0, n], dtype=torch.int32)
    lens = torch.tensor([n], dtype=torch.int32)
    metadata = AttentionMetadata(
        slot_mapping=torch.arange(n, dtype=torch.int64, device=device),
        query_start_loc=qsl.to(device),
        seq_lens=lens.to(device),
        block_tables=torch.arange(num_blocks, dtype=torch.int32, device=device)[None],
        num_decodes=0,
        num_decode_tokens=0,
        max_query_len=n,
        max_seq_len=n,
        query_start_loc_cpu=qsl.clone(),
        seq_lens_cpu=lens.clone(),
    )
    ids = torch.tensor(token_ids, device=device)
    hidden = model(ids, torch.arange(n, device=device), kv_caches, metadata)
    return model.compute_logits(hidden)
