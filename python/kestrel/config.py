"""EngineConfig: everything that shapes an engine instance, validated at construction."""

from __future__ import annotations

from dataclasses import dataclass

_DTYPES = ("auto", "float32", "float16", "bfloat16")
_LOAD_FORMATS = ("auto", "safetensors", "gguf", "dummy")
_DEVICES = ("auto", "cpu", "cuda")
_POLICIES = ("fcfs", "priority")


def _fail(name: str, value: object, allowed: str) -> ValueError:
    return ValueError(f"{name} = {value!r} is invalid; allowed: {allowed}")


@dataclass
class EngineConfig:
    # A Hugging Face model directory, a .gguf file, a Hugging Face model id (org/name), or
    # None for the default model (SmolLM2-135M-Instruct, fetched once; see default_model.py).
    model: str | None = None
    tokenizer: str | None = None  # tokenizer directory or .gguf; default: the model's own
    dtype: str = "auto"  # auto = float32 on CPU, the checkpoint's dtype (bf16/fp16) on GPU
    device: str = "auto"  # auto = cuda when available, else cpu
    max_model_len: int | None = None  # default: the model's max_position_embeddings
    block_size: int = 16  # tokens per KV block
    num_kv_blocks: int | None = None  # default: sized from memory (see kv_cache_memory_gib)
    kv_cache_memory_gib: float = 1.0  # CPU: KV cache budget when num_kv_blocks is not set
    gpu_memory_utilization: float = 0.9  # GPU: fraction of device memory the engine may use
    max_num_seqs: int = 256
    max_num_batched_tokens: int | None = None  # default: max(8192, max_num_seqs)
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    scheduling_policy: str = "fcfs"
    seed: int = 0  # seeds dummy weights and the shared sampling generator
    load_format: str = "auto"
    enforce_eager: bool = False  # GPU: no CUDA graphs

    def __post_init__(self) -> None:
        if self.model is not None and (not isinstance(self.model, str) or not self.model):
            raise _fail("model", self.model, "None (the default model) or a non-empty path / id")
        if self.dtype not in _DTYPES:
            raise _fail("dtype", self.dtype, ", ".join(_DTYPES))
        if self.device not in _DEVICES:
            raise _fail("device", self.device, ", ".join(_DEVICES))
        if self.load_format not in _LOAD_FORMATS:
            raise _fail("load_format", self.load_format, ", ".join(_LOAD_FORMATS))
        if self.scheduling_policy not in _POLICIES:
            raise _fail("scheduling_policy", self.scheduling_policy, ", ".join(_POLICIES))
        if self.max_model_len is not None and self.max_model_len < 2:
            raise _fail("max_model_len", self.max_model_len, "None or an int >= 2")
        if self.block_size not in (1, 2, 4, 8, 16, 32, 64, 128):
            raise _fail("block_size", self.block_size, "a power of two in [1, 128]")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise _fail("num_kv_blocks", self.num_kv_blocks, "None or an int >= 1")
        if not self.kv_cache_memory_gib > 0:
            raise _fail("kv_cache_memory_gib", self.kv_cache_memory_gib, "a float > 0")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise _fail("gpu_memory_utilization", self.gpu_memory_utilization, "(0, 1]")
        if self.max_num_seqs < 1:
            raise _fail("max_num_seqs", self.max_num_seqs, "an int >= 1")
        if self.max_num_batched_tokens is None:
            self.max_num_batched_tokens = max(8192, self.max_num_seqs)
        if self.max_num_batched_tokens < 1:
            raise _fail("max_num_batched_tokens", self.max_num_batched_tokens, "an int >= 1")
