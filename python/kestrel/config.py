"""EngineConfig: everything that shapes an engine instance, validated at construction.

EngineConfig is the one source of the engine's settings: each field carries its help text
(metadata "help") and, where its values form a closed set, the allowed values (metadata
"choices"). `kestrel serve`'s engine flags, the benchmarks' flags (both through
kestrel.config_args) and `LLM(**engine_args)` are derived from it, so a new field needs only
to be added here."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

_DTYPES = ("auto", "float32", "float16", "bfloat16")
_LOAD_FORMATS = ("auto", "safetensors", "gguf", "dummy")
_DEVICES = ("auto", "cpu", "cuda")
_POLICIES = ("fcfs", "priority")
_BLOCK_SIZES = (1, 2, 4, 8, 16, 32, 64, 128)
QUANTIZATIONS = (None, "fp8", "gguf")
KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3")


class ConfigError(ValueError):
    """A setting EngineConfig rejects; `field` names it (a front end maps it to its flag)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


def _fail(name: str, value: object, allowed: str) -> ConfigError:
    return ConfigError(name, f"{name} = {value!r} is invalid; allowed: {allowed}")


def setting(
    default: Any, help: str, *, choices: tuple[Any, ...] | None = None, short: str | None = None
) -> Any:
    """A dataclass field with its documentation: metadata "help" (one line, shown by --help),
    for a closed set of values "choices" (checked in __post_init__ and by argparse), and
    optionally "short", a short spelling of its flag (vLLM's, e.g. "-q", "-tp")."""
    metadata: dict[str, Any] = {"help": help}
    if choices is not None:
        metadata["choices"] = choices
    if short is not None:
        metadata["short"] = short
    return field(default=default, metadata=metadata)


@dataclass
class EngineConfig:
    model: str | None = setting(
        None,
        "a Hugging Face model directory (config.json + safetensors + tokenizer.json), a .gguf "
        "file or a Hugging Face model id (org/name); None = Kestrel's default model "
        "(SmolLM2-135M-Instruct, fetched once)",
    )
    revision: str | None = setting(
        None,
        "branch, tag or commit of a Hugging Face model id (default: main); ignored for local paths",
    )
    tokenizer: str | None = setting(None, "tokenizer directory or .gguf (default: MODEL)")
    dtype: str = setting(
        "auto",
        "weight and activation dtype: auto (float32 on CPU, the checkpoint's on GPU), "
        "float32, float16 (half), bfloat16",
        choices=_DTYPES,
    )
    device: str = setting(
        "auto", "where to run (auto: cuda when available, else cpu)", choices=_DEVICES
    )
    max_model_len: int | None = setting(
        None, "context length in tokens (prompt + output); default: the model's"
    )
    block_size: int = setting(16, "tokens per KV-cache block (power of 2)", choices=_BLOCK_SIZES)
    num_kv_blocks: int | None = setting(
        None,
        "KV-cache blocks to allocate; default: sized from memory (--kv-cache-memory-gib on "
        "CPU, --gpu-memory-utilization on GPU)",
    )
    kv_cache_dtype: str = setting(
        "auto",
        "KV-cache element type: auto (the model's dtype), fp8 / fp8_e4m3 (float8 e4m3 codes of "
        "K / k_scale and V / v_scale, saturated to +-448; scales from the checkpoint, else 1.0): "
        "half the bytes per block, twice the tokens; a GPU needs compute capability 8.9+",
        choices=KV_CACHE_DTYPES,
    )
    kv_cache_memory_gib: float = setting(
        1.0, "CPU only: memory for the KV cache, in GiB (when --num-kv-blocks is not set)"
    )
    gpu_memory_utilization: float = setting(
        0.9, "fraction of GPU memory the engine may use (weights, activations, KV cache)"
    )
    max_num_seqs: int = setting(256, "most sequences in one batch")
    tensor_parallel_size: int = setting(
        1,
        "tensor-parallel ranks (-tp): one process per rank, one GPU each on CUDA (NCCL), "
        "gloo on CPU; attention heads and MLP columns are split across them",
        short="-tp",
    )
    pipeline_parallel_size: int = setting(
        1,
        "pipeline-parallel stages (-pp): one process per stage (x tensor_parallel_size), each "
        "a range of the layers",
        short="-pp",
    )
    max_num_batched_tokens: int | None = setting(
        None, "most tokens in one engine step (default: max(8192, --max-num-seqs))"
    )
    enable_prefix_caching: bool = setting(True, "reuse the KV cache of shared prompt prefixes")
    enable_chunked_prefill: bool = setting(
        True,
        "split long prompts over several engine steps (--max-num-batched-tokens each), "
        "batched with running decodes",
    )
    scheduling_policy: str = setting(
        "fcfs",
        "order of admission: fcfs (first come, first served) or priority (a request's "
        "priority, lower first, then arrival)",
        choices=_POLICIES,
    )
    seed: int = setting(
        0, "seed of the engine's random state (dummy weights, the shared sampling generator)"
    )
    load_format: str = setting(
        "auto",
        "weights format: auto, safetensors, gguf, or dummy (random weights, for benchmarks)",
        choices=_LOAD_FORMATS,
    )
    quantization: str | None = setting(
        None,
        "fp8: FP8 (e4m3) weights on a GPU of compute capability 8.9+ (Ada, Hopper): a "
        "BF16/FP16 checkpoint is quantized at load (per-channel weight scales, per-token "
        "activation scales); an FP8 checkpoint loads as published without it; gguf: accepted "
        "for vLLM command lines (a GGUF file's weights are dequantized at load)",
        choices=QUANTIZATIONS,
        short="-q",
    )
    enforce_eager: bool = setting(False, "GPU: always run eagerly (no CUDA graphs)")
    piecewise_graph_max_tokens: int = setting(
        2048,
        "GPU: steps with prefill rows (mixed, prefill, speculative verify) of up to this many "
        "tokens replay piecewise CUDA graphs, attention eager between them; 0: they run eagerly",
    )
    async_scheduling: bool = setting(
        True,
        "overlap scheduling: prepare step N+1 on the host while the device runs step N "
        "(outputs are the same either way; --no-async-scheduling turns it off)",
    )
    speculative_config: str | None = setting(
        None,
        "speculative decoding, a JSON object as vLLM's: "
        '{"method": "ngram", "num_speculative_tokens": K, "prompt_lookup_max": 5, '
        '"prompt_lookup_min": 1}, or {"method": "draft_model", "model": DRAFT, '
        '"num_speculative_tokens": K} (overlap scheduling is off with a draft model); '
        "LLM(speculative_config=...) also takes a dict",
    )
    generation_config: str = setting(
        "auto",
        "default sampling parameters: auto (the model's generation_config.json), vllm "
        "(none: temperature 1, top_p 1, ...), or a folder holding a generation_config.json",
    )
    disable_log_stats: bool = setting(
        False, "no periodic engine log line (throughput, running and waiting requests)"
    )
    max_grammar_chars: int = setting(
        131_072,
        "largest structured-output constraint, in characters (a JSON schema as compact JSON, "
        "a regex, the choices, a grammar); larger ones are refused",
    )

    def __post_init__(self) -> None:
        if self.model is not None and (not isinstance(self.model, str) or not self.model):
            raise _fail("model", self.model, "None (the default model) or a non-empty path / id")
        self._check_choices()
        if self.max_model_len is not None and self.max_model_len < 2:
            raise _fail("max_model_len", self.max_model_len, "None or an int >= 2")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise _fail("num_kv_blocks", self.num_kv_blocks, "None or an int >= 1")
        if not self.kv_cache_memory_gib > 0:
            raise _fail("kv_cache_memory_gib", self.kv_cache_memory_gib, "a float > 0")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise _fail("gpu_memory_utilization", self.gpu_memory_utilization, "(0, 1]")
        if self.max_num_seqs < 1:
            raise _fail("max_num_seqs", self.max_num_seqs, "an int >= 1")
        tp = self.tensor_parallel_size
        if isinstance(tp, bool) or not isinstance(tp, int) or not 1 <= tp <= 64:
            raise _fail("tensor_parallel_size", tp, "an int in [1, 64]")
        pp = self.pipeline_parallel_size
        if isinstance(pp, bool) or not isinstance(pp, int) or not 1 <= pp <= 64:
            raise _fail("pipeline_parallel_size", pp, "an int in [1, 64]")

        if self.max_num_batched_tokens is None:
            self.max_num_batched_tokens = max(8192, self.max_num_seqs)
        if self.max_num_batched_tokens < 1:
            raise _fail("max_num_batched_tokens", self.max_num_batched_tokens, "an int >= 1")
        pw = self.piecewise_graph_max_tokens
        if isinstance(pw, bool) or not isinstance(pw, int) or not 0 <= pw <= 1 << 16:
            raise _fail("piecewise_graph_max_tokens", pw, "an int in [0, 65536]")
        if not isinstance(self.generation_config, str) or not self.generation_config:
            raise _fail("generation_config", self.generation_config, "auto, vllm or a folder")
        if isinstance(self.max_grammar_chars, bool) or not (
            isinstance(self.max_grammar_chars, int) and 1 <= self.max_grammar_chars <= 1 << 20
        ):
            raise _fail("max_grammar_chars", self.max_grammar_chars, "an int in [1, 1048576]")
        if self.speculative_config is not None:
            self._check_speculative_config()
        if self.revision is not None and (not isinstance(self.revision, str) or not self.revision):
            raise _fail("revision", self.revision, "None or a non-empty branch, tag or commit")

    def _check_speculative_config(self) -> None:
        """Parses the setting (a dict becomes its JSON text, so the config stays plain data)."""
        import json

        from kestrel.spec.config import SpeculativeConfig, SpeculativeConfigError

        try:
            SpeculativeConfig.parse(self.speculative_config)
        except SpeculativeConfigError as e:
            raise ConfigError("speculative_config", str(e)) from None
        if isinstance(self.speculative_config, dict):
            self.speculative_config = json.dumps(self.speculative_config)

    def _check_choices(self) -> None:
        """Every field with metadata "choices" holds one of them (the CLI offers the same)."""
        for f in fields(self):
            choices = f.metadata.get("choices")
            if choices is not None and getattr(self, f.name) not in choices:
                raise _fail(f.name, getattr(self, f.name), ", ".join(map(str, choices)))
