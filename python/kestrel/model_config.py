"""Model architecture description parsed from a Hugging Face `config.json` dict.

Torch-free on purpose: the engine, the scheduler and the server can read model geometry
(layers, heads, head dim, vocab) without importing torch.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

logger = logging.getLogger(__name__)

_CONFIG_FILE = "config.json"

# Keys every supported config.json must define (transformers' per-class defaults differ, so a
# missing value cannot be guessed safely).
_REQUIRED_KEYS = (
    "architectures",
    "model_type",
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "max_position_embeddings",
    "rms_norm_eps",
)

_SUPPORTED_ACTIVATIONS = ("silu",)
_DTYPE_NAMES = ("float32", "float16", "bfloat16")
_DEFAULT_ROPE_THETA = 10000.0


@dataclass(frozen=True)
class KVCacheSpec:
    """What one attention layer keeps in the paged KV cache: K and V of `num_kv_heads` heads
    of `head_dim` per cached token."""

    num_kv_heads: int
    head_dim: int

    def __post_init__(self) -> None:
        for name in ("num_kv_heads", "head_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{type(self).__name__}.{name}={value!r} must be > 0")

    def bytes_per_token(self, element_size: int) -> int:
        """Cache bytes of one token in this layer (keys and values)."""
        return 2 * self.num_kv_heads * self.head_dim * element_size


@dataclass(frozen=True)
class FullAttentionSpec(KVCacheSpec):
    """Each token attends to every earlier token: the layer keeps the whole sequence's K/V."""


@dataclass(frozen=True)
class SlidingWindowSpec(KVCacheSpec):
    """Each token attends to the last `window` tokens (itself included), so K/V older than
    that may be dropped. Expressible only: no model uses it yet (the engine assumes full
    attention in every layer)."""

    window: int = field(kw_only=True)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.window, int) or isinstance(self.window, bool) or self.window <= 0:
            raise ValueError(f"SlidingWindowSpec.window={self.window!r} must be > 0")


@dataclass(frozen=True)
class ModelConfig:
    """Geometry and per-family switches of a Llama-family decoder.

    Invariants (checked in `__post_init__`): all sizes > 0, num_attention_heads is a multiple
    of num_key_value_heads, head_dim is even (rotate-half RoPE), one KV-cache spec per layer.
    """

    architecture: str  # first entry of config.json `architectures`
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int  # per attention head; may differ from hidden_size // num_attention_heads
    rms_norm_eps: float
    rope_theta: float
    # HF-style scaling dict with a `rope_type` key (e.g. "llama3", "linear"); None = plain RoPE.
    rope_scaling: dict[str, Any] | None
    max_position_embeddings: int
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # bias on the q/k/v projections (always on for Qwen2)
    o_proj_bias: bool = False  # bias on the attention output projection
    mlp_bias: bool = False  # bias on gate/up/down projections (Llama `mlp_bias`)
    qk_norm: bool = False  # per-head RMSNorm of q and k before RoPE (Qwen3)
    hidden_act: str = "silu"
    dtype: str | None = None  # checkpoint dtype name: "float32" | "float16" | "bfloat16"
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    sliding_window: int | None = None  # recorded only; attention is always full
    # One per layer; () = full attention of num_key_value_heads x head_dim everywhere (filled
    # in by __post_init__).
    kv_cache_specs: tuple[KVCacheSpec, ...] = ()
    hf_config: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "max_position_embeddings",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{_CONFIG_FILE}: {name}={value!r} must be a positive integer")
        if self.num_attention_heads % self.num_key_value_heads != 0:
            raise ValueError(
                f"{_CONFIG_FILE}: num_attention_heads={self.num_attention_heads} must be a "
                f"multiple of num_key_value_heads={self.num_key_value_heads}"
            )
        if self.head_dim % 2 != 0:
            raise ValueError(f"{_CONFIG_FILE}: head_dim={self.head_dim} must be even for RoPE")
        if not self.rms_norm_eps > 0:
            raise ValueError(f"{_CONFIG_FILE}: rms_norm_eps={self.rms_norm_eps!r} must be > 0")
        if self.hidden_act not in _SUPPORTED_ACTIVATIONS:
            raise ValueError(
                f"{_CONFIG_FILE}: hidden_act={self.hidden_act!r} is not supported; "
                f"supported: {list(_SUPPORTED_ACTIVATIONS)}"
            )
        if self.dtype is not None and self.dtype not in _DTYPE_NAMES:
            raise ValueError(
                f"{_CONFIG_FILE}: dtype={self.dtype!r} is not supported; "
                f"supported: {list(_DTYPE_NAMES)}"
            )
        if not self.kv_cache_specs:
            full = FullAttentionSpec(self.num_key_value_heads, self.head_dim)
            object.__setattr__(self, "kv_cache_specs", (full,) * self.num_hidden_layers)
        specs = tuple(self.kv_cache_specs)
        object.__setattr__(self, "kv_cache_specs", specs)
        if len(specs) != self.num_hidden_layers or not all(
            isinstance(spec, KVCacheSpec) for spec in specs
        ):
            raise ValueError(
                f"kv_cache_specs must hold one KVCacheSpec per layer "
                f"({self.num_hidden_layers}), got {specs!r}"
            )

    @property
    def q_size(self) -> int:
        """Width of the query projection output: num_attention_heads * head_dim."""
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        """Width of each of the key and value projection outputs: num_kv_heads * head_dim."""
        return self.num_key_value_heads * self.head_dim

    @classmethod
    def from_hf_config(cls, d: dict[str, Any]) -> ModelConfig:
        """Parse a `config.json` dict (transformers 4.x or 5.x layout)."""
        if not isinstance(d, dict):
            raise TypeError(f"{_CONFIG_FILE} must hold a JSON object, got {type(d).__name__}")
        for key in _REQUIRED_KEYS:
            if d.get(key) is None:
                raise ValueError(f"{_CONFIG_FILE} is missing the required key {key!r}")
        architectures = d["architectures"]
        if not isinstance(architectures, list) or not architectures:
            raise ValueError(
                f"{_CONFIG_FILE}: architectures={architectures!r} must be a non-empty list"
            )
        architecture = str(architectures[0])
        model_type = str(d["model_type"])
        num_heads = d["num_attention_heads"]
        num_kv_heads = d.get("num_key_value_heads")
        if num_kv_heads is None:
            num_kv_heads = num_heads
        head_dim = d.get("head_dim")
        if head_dim is None:
            head_dim = _divide_exact(d["hidden_size"], num_heads)
        rope_theta, rope_scaling = _parse_rope(d)
        read_fields = _ARCHITECTURE_FIELDS.get(architecture) or _MODEL_TYPE_FIELDS.get(
            model_type, _llama_fields
        )

        config = cls(
            architecture=architecture,
            model_type=model_type,
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_hidden_layers=d["num_hidden_layers"],
            num_attention_heads=num_heads,
            num_key_value_heads=num_kv_heads,
            head_dim=head_dim,
            rms_norm_eps=float(d["rms_norm_eps"]),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=d["max_position_embeddings"],
            tie_word_embeddings=bool(d.get("tie_word_embeddings") or False),
            **read_fields(d),
            hidden_act=str(d.get("hidden_act") or "silu"),
            dtype=_parse_dtype(d),
            bos_token_id=_first_id(d.get("bos_token_id"), "bos_token_id"),
            eos_token_ids=_id_tuple(d.get("eos_token_id"), "eos_token_id"),
            sliding_window=d.get("sliding_window"),
            hf_config=dict(d),
        )
        _warn_sliding_window(config, d)
        return config


# ---- per-architecture fields -----------------------------------------------------------------
# Each returns the family switches of ModelConfig (qkv_bias, o_proj_bias, mlp_bias, qk_norm)
# read from that architecture's config.json fields. They live here, not in the model files,
# so that the engine can read a ModelConfig without importing torch.


def _llama_fields(d: dict[str, Any]) -> dict[str, bool]:
    """Llama: `attention_bias` on q/k/v and o_proj, `mlp_bias` on gate/up/down."""
    attention_bias = bool(d.get("attention_bias") or False)
    return {
        "qkv_bias": attention_bias,
        "o_proj_bias": attention_bias,
        "mlp_bias": bool(d.get("mlp_bias") or False),
        "qk_norm": False,
    }


def _mistral_fields(d: dict[str, Any]) -> dict[str, bool]:
    """Mistral: Llama's layout (its configs set no bias key; Llama-style keys are honoured)."""
    return _llama_fields(d)


def _qwen2_fields(d: dict[str, Any]) -> dict[str, bool]:
    """Qwen2/2.5: always q/k/v biases, never an o_proj bias."""
    return {**_llama_fields(d), "qkv_bias": True, "o_proj_bias": False}


def _qwen3_fields(d: dict[str, Any]) -> dict[str, bool]:
    """Qwen3: per-head RMSNorm of q and k before RoPE; `attention_bias` like Llama."""
    return {**_llama_fields(d), "qk_norm": True}


_FieldReader = Callable[[dict[str, Any]], dict[str, bool]]
# By config.json `architectures[0]`, then by `model_type`; anything else reads like Llama.
_ARCHITECTURE_FIELDS: MappingProxyType[str, _FieldReader] = MappingProxyType(
    {
        "LlamaForCausalLM": _llama_fields,
        "MistralForCausalLM": _mistral_fields,
        "Qwen2ForCausalLM": _qwen2_fields,
        "Qwen3ForCausalLM": _qwen3_fields,
    }
)
_MODEL_TYPE_FIELDS: MappingProxyType[str, _FieldReader] = MappingProxyType(
    {
        "llama": _llama_fields,
        "mistral": _mistral_fields,
        "qwen2": _qwen2_fields,
        "qwen3": _qwen3_fields,
    }
)


def _divide_exact(hidden_size: int, num_heads: int) -> int:
    if not isinstance(num_heads, int) or num_heads <= 0:
        raise ValueError(f"{_CONFIG_FILE}: num_attention_heads={num_heads!r} must be > 0")
    if hidden_size % num_heads != 0:
        raise ValueError(
            f"{_CONFIG_FILE}: hidden_size={hidden_size} is not divisible by "
            f"num_attention_heads={num_heads} and no head_dim is given"
        )
    return hidden_size // num_heads


def _parse_rope(d: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """Returns (rope_theta, scaling dict with `rope_type` or None for plain RoPE).

    transformers 5 writes `rope_parameters: {rope_type, rope_theta, <scaling keys>}`;
    older configs have top-level `rope_theta` and `rope_scaling: {type|rope_type, ...}`.
    """
    params = d.get("rope_parameters")
    if isinstance(params, dict) and params:
        if "full_attention" in params and isinstance(params["full_attention"], dict):
            params = params["full_attention"]  # per-layer-type layout; we use full attention
        theta = params.get("rope_theta", d.get("rope_theta"))
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    else:
        theta = d.get("rope_theta")
        scaling = dict(d.get("rope_scaling") or {})
    if theta is None:
        theta = _DEFAULT_ROPE_THETA
    if "type" in scaling and "rope_type" not in scaling:
        scaling["rope_type"] = scaling.pop("type")
    scaling.pop("type", None)
    rope_type = scaling.get("rope_type", "default")
    if rope_type == "default":
        return float(theta), None
    return float(theta), scaling


def _parse_dtype(d: dict[str, Any]) -> str | None:
    name = d.get("dtype")
    if name is None:
        name = d.get("torch_dtype")
    if name is None:
        return None
    name = str(name).removeprefix("torch.")
    aliases = {"float": "float32", "half": "float16", "bf16": "bfloat16", "fp16": "float16"}
    return aliases.get(name, name)


def _id_tuple(value: Any, key: str) -> tuple[int, ...]:
    if value is None:
        return ()
    values = value if isinstance(value, list) else [value]
    for v in values:
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise ValueError(f"{_CONFIG_FILE}: {key}={value!r} must be an int or a list of ints")
    return tuple(values)


def _first_id(value: Any, key: str) -> int | None:
    ids = _id_tuple(value, key)
    return ids[0] if ids else None


def _warn_sliding_window(config: ModelConfig, d: dict[str, Any]) -> None:
    window = config.sliding_window
    if window is None or d.get("use_sliding_window") is False:
        return
    if window < config.max_position_embeddings:
        logger.warning(
            "%s sets sliding_window=%d < max_position_embeddings=%d; Kestrel applies full "
            "attention, so outputs past %d tokens may differ from the reference model",
            _CONFIG_FILE,
            window,
            config.max_position_embeddings,
            window,
        )
