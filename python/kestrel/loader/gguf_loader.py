"""Loading a GGUF file (llama.cpp's format): metadata -> ModelConfig, tensors -> HF names.

Supported architectures: `llama` (incl. Mistral-style files), `qwen2`, `qwen3`. Tensors are
copied raw to the device and converted / dequantized there into the run dtype, one at a time
(`gguf_tensor_data`; the IQ formats on the CPU through `gguf_dequant`), renamed to the Hugging
Face names the models' `load_weights` understands (packed q/k/v and gate/up included), and, for
`llama`, the Q/K rows are put back in the Hugging Face order (llama.cpp's converter interleaves
the two rotary halves of every head).
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from kestrel.layers.linear import process_weights_after_loading
from kestrel.layers.parallel import SINGLE_RANK, TensorParallelGroup
from kestrel.layers.pipeline import SINGLE_STAGE, PipelineStage
from kestrel.layers.quant_config import fp8_config_for
from kestrel.loader.dtypes import resolve_dtype
from kestrel.loader.dummy import init_dummy_weights
from kestrel.loader.gguf_dequant import dequantize_to_torch
from kestrel.loader.gguf_quantized import (
    gguf_quant_config,
    keep_quantized,
    log_weight_memory,
    raw_gguf_blocks,
)
from kestrel.loader.gguf_reader_fast import FastGGUFReader
from kestrel.loader.gguf_tensor_data import (  # gguf_tensor_bytes: re-exported for callers
    gguf_tensor_bytes,  # noqa: F401 (raw GGML blocks of one tensor on the device)
    gguf_tensor_to_device,
)
from kestrel.loader.load_report import LoadTimer, byte_progress
from kestrel.loader.staging import DeviceStager, normalize_device
from kestrel.model_config import ModelConfig
from kestrel.models.registry import get_model_class

logger = logging.getLogger(__name__)

GGUF_MAGIC = b"GGUF"
# GGUF `general.architecture` -> (HF architecture name, HF model_type)
GGUF_ARCHITECTURES = {
    "llama": ("LlamaForCausalLM", "llama"),
    "qwen2": ("Qwen2ForCausalLM", "qwen2"),
    "qwen3": ("Qwen3ForCausalLM", "qwen3"),
}
# GGUF `general.file_type` values of unquantized files -> checkpoint dtype name.
_FILE_TYPE_DTYPES = {0: "float32", 1: "float16", 32: "bfloat16"}
_GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
# Per-block tensor stem -> HF module path under model.layers.N.
_BLOCK_TENSORS = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_BLOCK_RE = re.compile(r"blk\.(\d+)\.([a-z_]+)\.(weight|bias)")
_ROPE_FREQS = "rope_freqs.weight"  # llama3-style per-frequency divisors [head_dim / 2]


class GGUFFile:
    """An opened, validated GGUF file: metadata access and its tensor list (memory-mapped)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"GGUF file {self.path} not found")
        with open(self.path, "rb") as f:
            magic = f.read(4)
        if magic != GGUF_MAGIC:
            raise ValueError(f"{self.path} is not a GGUF file (starts with {magic!r}, not b'GGUF')")
        try:
            self.reader = FastGGUFReader(self.path, "r")
        except Exception as exc:  # gguf raises ValueError/IndexError/struct.error on bad files
            raise ValueError(
                f"{self.path} is a truncated or corrupt GGUF file ({type(exc).__name__}: {exc})"
            ) from exc
        size = self.path.stat().st_size
        for tensor in self.reader.tensors:
            if tensor.data_offset + tensor.n_bytes > size:
                raise ValueError(
                    f"{self.path} is truncated: tensor {tensor.name!r} ends at byte "
                    f"{tensor.data_offset + tensor.n_bytes} but the file has {size} bytes"
                )
        self.architecture = str(self.require("general.architecture"))
        self.tensor_names = {t.name for t in self.reader.tensors}

    def get(self, key: str, default: Any = None) -> Any:
        """Metadata value (str, int, float, bool or a list of them), or `default` if absent."""
        field = self.reader.get_field(key)
        return default if field is None else field.contents()

    def require(self, key: str) -> Any:
        value = self.get(key)
        if value is None:
            raise ValueError(f"{self.path}: GGUF metadata key {key!r} is missing")
        return value

    def arch_get(self, suffix: str, default: Any = None) -> Any:
        """`<architecture>.<suffix>` metadata, e.g. arch_get("block_count")."""
        return self.get(f"{self.architecture}.{suffix}", default)

    def arch_require(self, suffix: str) -> Any:
        return self.require(f"{self.architecture}.{suffix}")

    def tensor(self, name: str):
        for tensor in self.reader.tensors:
            if tensor.name == name:
                return tensor
        raise KeyError(f"{self.path}: no tensor {name!r}")


def as_gguf_file(source: str | Path | GGUFFile) -> GGUFFile:
    return source if isinstance(source, GGUFFile) else GGUFFile(source)


# ---- hyperparameters ------------------------------------------------------------------------


def gguf_hf_config(f: GGUFFile) -> dict[str, Any]:
    """A Hugging Face config.json-style dict built from the file's metadata."""
    if f.architecture not in GGUF_ARCHITECTURES:
        raise ValueError(
            f"{f.path}: GGUF architecture {f.architecture!r} is not supported; supported: "
            f"{', '.join(sorted(GGUF_ARCHITECTURES))}"
        )
    architecture, model_type = GGUF_ARCHITECTURES[f.architecture]
    hidden = int(f.arch_require("embedding_length"))
    num_heads = int(f.arch_require("attention.head_count"))
    num_kv_heads = int(f.arch_get("attention.head_count_kv", num_heads))
    head_dim = int(f.arch_get("attention.key_length", hidden // max(num_heads, 1)))
    value_dim = int(f.arch_get("attention.value_length", head_dim))
    rope_dim = int(f.arch_get("rope.dimension_count", head_dim))
    if value_dim != head_dim or rope_dim != head_dim:
        raise ValueError(
            f"{f.path}: key_length={head_dim}, value_length={value_dim} and "
            f"rope.dimension_count={rope_dim} must be equal (partial rotary is not supported)"
        )
    vocab_size = f.arch_get("vocab_size")
    if vocab_size is None:
        tokens = f.get("tokenizer.ggml.tokens")
        vocab_size = len(tokens) if tokens else int(f.tensor("token_embd.weight").shape[-1])
    config: dict[str, Any] = {
        "architectures": [architecture],
        "model_type": model_type,
        "vocab_size": int(vocab_size),
        "hidden_size": hidden,
        "intermediate_size": int(f.arch_require("feed_forward_length")),
        "num_hidden_layers": int(f.arch_require("block_count")),
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads,
        "head_dim": head_dim,
        "max_position_embeddings": int(f.arch_require("context_length")),
        "rms_norm_eps": float(f.arch_require("attention.layer_norm_rms_epsilon")),
        "rope_theta": float(f.arch_get("rope.freq_base", 10000.0)),
        "tie_word_embeddings": "output.weight" not in f.tensor_names,
        "attention_bias": "blk.0.attn_q.bias" in f.tensor_names,
        "hidden_act": "silu",
        "dtype": _FILE_TYPE_DTYPES.get(f.get("general.file_type")),
        "bos_token_id": f.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": gguf_eos_token_ids(f) or None,
    }
    rope_scaling = _rope_scaling(f, head_dim, float(config["rope_theta"]))
    if rope_scaling is not None:
        config["rope_scaling"] = rope_scaling
    return config


def gguf_model_config(f: GGUFFile) -> ModelConfig:
    try:
        return ModelConfig.from_hf_config(gguf_hf_config(f))
    except ValueError as exc:
        raise ValueError(f"{f.path}: {exc}") from exc


def gguf_eos_token_ids(f: GGUFFile) -> list[int]:
    """End-of-generation ids: EOS, then end-of-turn / end-of-message when the file names them."""
    keys = ("eos_token_id", "eot_token_id", "eom_token_id")
    ids = [f.get(f"tokenizer.ggml.{key}") for key in keys]
    return list(dict.fromkeys(int(i) for i in ids if i is not None))


def gguf_generation_config(f: GGUFFile) -> dict[str, Any]:
    """generation_config.json-style defaults (GGUF files carry only the special token ids)."""
    config: dict[str, Any] = {}
    bos = f.get("tokenizer.ggml.bos_token_id")
    if bos is not None:
        config["bos_token_id"] = int(bos)
    eos = gguf_eos_token_ids(f)
    if eos:
        config["eos_token_id"] = eos
    pad = f.get("tokenizer.ggml.padding_token_id")
    if pad is not None:
        config["pad_token_id"] = int(pad)
    return config


def _rope_scaling(f: GGUFFile, head_dim: int, theta: float) -> dict[str, Any] | None:
    if _ROPE_FREQS in f.tensor_names:
        t = f.tensor(_ROPE_FREQS)
        factors = dequantize_to_torch(t.name, t.data, t.tensor_type, torch.float32)
        return llama3_scaling_from_factors(factors.numpy(), head_dim, theta)
    kind = f.arch_get("rope.scaling.type", "none")
    if kind == "none":
        return None
    if kind == "linear":
        return {"rope_type": "linear", "factor": float(f.arch_require("rope.scaling.factor"))}
    raise ValueError(
        f"{f.path}: rope scaling type {kind!r} is not supported; supported: none, linear, "
        "llama3 (rope_freqs tensor)"
    )


def llama3_scaling_from_factors(
    factors: np.ndarray, head_dim: int, theta: float
) -> dict[str, Any] | None:
    """Recover an HF `llama3` rope_scaling dict from llama.cpp's `rope_freqs` tensor.

    factors[i] [head_dim / 2] divides inv_freq[i]: 1 for short wavelengths, `factor` for long
    ones, and 1 / ((1 - s) / factor + s) in between, where s is linear in 1 / wavelength. Two
    in-between points fix that line; low_freq_factor is set to 1 and the other two parameters
    follow, which gives the same frequencies. The result is checked against every entry.
    """
    factors = np.asarray(factors, dtype=np.float64).reshape(-1)
    if factors.shape[0] != head_dim // 2:
        raise ValueError(f"rope_freqs has {factors.shape[0]} entries, expected {head_dim // 2}")
    factor = float(factors.max())
    if np.allclose(factors, 1.0, rtol=0, atol=1e-6):
        return None
    inv_freq = theta ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    inv_wavelen = inv_freq / (2 * math.pi)
    between = (factors > 1 + 1e-4) & (factors < factor * (1 - 1e-4))
    if between.sum() < 2:
        raise ValueError(
            "rope_freqs tensor: cannot infer llama3 rope scaling from fewer than two "
            f"interpolated frequencies (factors {factors.tolist()})"
        )
    smooth = (1 / factors[between] - 1 / factor) / (1 - 1 / factor)
    slope, intercept = np.polyfit(inv_wavelen[between], smooth, 1)  # smooth = slope/wl + icpt
    high = 1.0 - 1.0 / intercept  # from intercept = -low / (high - low) with low = 1
    scaling = {
        "rope_type": "llama3",
        "factor": factor,
        "low_freq_factor": 1.0,
        "high_freq_factor": float(high),
        "original_max_position_embeddings": float(slope * (high - 1.0)),
    }
    # Recompute every factor from the recovered parameters (same band logic as ops.rotary).
    old_context = scaling["original_max_position_embeddings"]
    wavelen = 1 / inv_wavelen
    s = (old_context / wavelen - 1.0) / (high - 1.0)
    expected = np.where(wavelen > old_context, factor, 1 / ((1 - s) / factor + s))
    expected = np.where(wavelen < old_context / high, 1.0, expected)
    if not (high > 1.0 and old_context > 0 and np.allclose(expected, factors, rtol=1e-3)):
        raise ValueError(
            "rope_freqs tensor does not follow llama3 rope scaling; cannot reproduce it "
            f"(factors {factors.tolist()})"
        )
    return scaling


# ---- tensors --------------------------------------------------------------------------------


def hf_tensor_name(gguf_name: str) -> str | None:
    """GGUF tensor name -> HF checkpoint name, or None for tensors with no HF counterpart."""
    if gguf_name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[gguf_name]
    match = _BLOCK_RE.fullmatch(gguf_name)
    if match is None or match.group(2) not in _BLOCK_TENSORS:
        return None
    layer, stem, kind = match.groups()
    return f"model.layers.{layer}.{_BLOCK_TENSORS[stem]}.{kind}"


def unpermute_rotary_rows(tensor: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undo llama.cpp's Q/K row order for the `llama` architecture.

    tensor [num_heads * head_dim, ...] (a weight, or a 1-D bias). In the file, the rows of each
    head alternate between the two rotary halves (row 2i is HF row i, row 2i+1 is HF row
    i + head_dim/2); Hugging Face keeps the first half, then the second.
    """
    rows = tensor.shape[0]
    if rows % (2 * num_heads) != 0:
        raise ValueError(f"cannot unpermute {rows} rows into {num_heads} heads of even size")
    half = rows // num_heads // 2
    rest = tuple(tensor.shape[1:])
    return tensor.reshape(num_heads, half, 2, *rest).transpose(1, 2).reshape(tensor.shape)


def iter_gguf_weights(
    f: GGUFFile,
    config: ModelConfig,
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
    *,
    stager: DeviceStager | None = None,
    raw: frozenset[str] = frozenset(),
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (HF name, tensor in `dtype` on `device`) one tensor at a time, in file order; the
    GGUF tensors named in `raw` come as their raw blocks, uint8 [rows, row_bytes] on the CPU
    (layers that keep them quantized: loader/gguf_quantized.py).

    Each other tensor's raw bytes go from the memory-mapped file to the device and are converted
    or dequantized there (`gguf_tensor_data.gguf_tensor_to_device`). `stager`: the load's stager
    (its pinned buffers and byte progress, e.g. shared with `gguf_tensor_bytes` calls); by
    default one is made, with a progress bar over all the file's tensors.
    """
    unpermute = f.architecture == "llama"
    total = sum(int(t.n_bytes) for t in f.reader.tensors)
    # A caller's stager reports to the caller's progress; otherwise one bar for the file.
    progress = byte_progress(total if stager is None else 0, f"Loading {f.path.name}")
    if stager is None:
        stager = DeviceStager(device, progress=progress.update)
    elif stager.device != normalize_device(device):
        raise ValueError(f"the stager copies to {stager.device}, not to {device}")
    with progress, stager:
        for tensor in f.reader.tensors:
            name = hf_tensor_name(tensor.name)
            if name is None:
                if tensor.name != _ROPE_FREQS:  # folded into the config's rope_scaling
                    logger.warning("ignoring GGUF tensor %s (no model parameter)", tensor.name)
                stager.report(int(tensor.n_bytes))
                continue
            if tensor.name in raw:
                weight = raw_gguf_blocks(tensor.data)  # rows permute as whole rows below
                stager.report(int(tensor.n_bytes))
            else:
                weight = gguf_tensor_to_device(tensor, dtype, stager)
            if unpermute and ".self_attn.q_proj." in name:
                weight = unpermute_rotary_rows(weight, config.num_attention_heads)
            elif unpermute and ".self_attn.k_proj." in name:
                weight = unpermute_rotary_rows(weight, config.num_key_value_heads)
            yield name, weight


def load_gguf_model(
    source: str | Path | GGUFFile,
    dtype: torch.dtype | str | None = "auto",
    device: torch.device | str = "cpu",
    *,
    dummy: bool = False,
    seed: int = 0,
    quantization: str | None = None,
    keep_quantized_blocks: bool | None = None,
    tp_group: TensorParallelGroup = SINGLE_RANK,
    pp_stage: PipelineStage = SINGLE_STAGE,
) -> tuple[nn.Module, ModelConfig]:
    """Build the model a GGUF file describes and fill its weights (dequantized to the dtype;
    `dummy`: random weights of the same shapes, deterministic in `seed`). quantization="fp8"
    quantizes the dequantized linear weights to FP8 (kestrel.layers.fp8).

    Linear layers whose tensors are in a type with GGUF kernels keep the raw blocks when
    `keep_quantized_blocks` (None: on CUDA, or as KESTREL_GGUF_QUANTIZED says; see
    loader.gguf_quantized; never for a tensor-parallel shard, `tp_group` of size > 1). Returns
    (model in eval mode on `device`, its ModelConfig).
    """
    timer = LoadTimer()
    f = as_gguf_file(source)
    config = gguf_model_config(f)
    device = torch.device(device)
    torch_dtype = resolve_dtype(dtype, config, device)
    quant_config = fp8_config_for(config.hf_config, quantization)  # the metadata declares none
    model_class = get_model_class(config.architecture)
    if keep_quantized_blocks is None:
        keep_quantized_blocks = quant_config is None and keep_quantized(device)
    keep_quantized_blocks = keep_quantized_blocks and tp_group.size == 1 and pp_stage.size == 1
    if keep_quantized_blocks and quant_config is None and not dummy:
        tensors = [(hf_tensor_name(t.name), t.name, int(t.tensor_type)) for t in f.reader.tensors]
        quant_config = gguf_quant_config(tensors, model_class.packed_modules_mapping)
    model = model_class(
        config,
        torch_dtype,
        device,
        quant_config=quant_config,
        tp_group=tp_group,
        pp_stage=pp_stage,
    )
    if dummy:
        init_dummy_weights(model, seed=seed)
    else:
        try:
            raw: frozenset[str] = frozenset()
            if quant_config is not None and hasattr(quant_config, "raw_tensor_names"):
                raw = quant_config.raw_tensor_names()
            model.load_weights(iter_gguf_weights(f, config, torch_dtype, device, raw=raw))
        except ValueError as exc:
            raise type(exc)(f"{f.path}: {exc}") from exc  # keeps UnsupportedTensorTypeError
    process_weights_after_loading(model)  # quant methods finish (repack) their weights
    model.eval()
    linear = quant_config.description if quant_config is not None else torch_dtype
    logger.info(
        "loaded %s from %s (%s, %s, linear layers: %s)",
        config.architecture,
        f.path,
        torch_dtype,
        device,
        linear,
    )
    if not dummy:
        timer.finish(model, f.path, device, sum(int(t.n_bytes) for t in f.reader.tensors))
    log_weight_memory(model, device)
    return model, config
