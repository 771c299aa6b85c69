"""Which linear layers run in FP8 and how their checkpoint tensors look, from the engine's
`quantization` setting and the checkpoint's `quantization_config` (config.json).

Supported:
- no `quantization_config` and quantization="fp8": a BF16/FP16 checkpoint quantized at load
  (every linear layer of the decoder; embeddings and the LM head stay in the model dtype).
- `quant_method: "fp8"` (vLLM / AutoFP8 style): float8_e4m3fn weights with one `weight_scale`
  per tensor; `activation_scheme` dynamic or static (static `input_scale` tensors are read
  past: activations are always scaled per token at run time); `ignored_layers` or
  `modules_to_not_convert` stay unquantized. Block-wise scales (`weight_block_size`,
  `weight_scale_inv`) are refused.
- `quant_method: "compressed-tensors"` (llm-compressor) with `format: "float-quantized"` (or
  the older "naive-quantized", the same layout for float weights): 8-bit
  float weights, strategy "channel" (`weight_scale` [N, 1]) or "tensor"; input activations
  absent, dynamic per token / tensor, or static per tensor (read past, as above); `ignore`
  and `targets` as module names, "re:" regular expressions or "Linear".

Everything else a config declares (another method, int weights, groups or blocks, a KV-cache
scheme, output activations) is refused with a ConfigError naming the field and its value.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from kestrel.config import QUANTIZATIONS, ConfigError
from kestrel.layers.fp8 import Fp8LinearMethod
from kestrel.layers.linear import LinearMethodBase

_FIELD = "quantization"
_INPUT_SCALE = ".input_scale"
# compressed-tensors formats that store 8-bit float weights as float8_e4m3fn tensors as they are
# ("naive-quantized" is the older name of the same layout for float weights).
_CT_FORMATS = ("float-quantized", "naive-quantized")

# prefix of a linear layer (the model's name, e.g. "model.layers.0.self_attn.qkv_proj") -> its
# method (None: unquantized); built by DecoderForCausalLM from its packed_modules_mapping.
LinearMethods = Callable[[str], LinearMethodBase | None]


@dataclass(frozen=True)
class Fp8Config:
    """FP8 for a model's linear layers.

    serialized: the checkpoint holds FP8 weights (else they are quantized at load).
    weight_scale: "channel" or "tensor" (the checkpoint's scales; serialized only).
    targets / ignore: checkpoint module names, "re:" patterns or "Linear" (every linear layer)
    saying which layers are FP8. ignored_checkpoint_suffixes: checkpoint tensors read past.
    """

    serialized: bool
    weight_scale: str = "channel"
    targets: tuple[str, ...] = ("Linear",)
    ignore: tuple[str, ...] = ()
    ignored_checkpoint_suffixes: tuple[str, ...] = ()
    description: str = "fp8 (quantized at load)"

    def quantizes(self, module: str) -> bool:
        """Whether checkpoint module `module` (e.g. model.layers.0.self_attn.q_proj) is FP8."""
        return _matches(module, self.targets) and not _matches(module, self.ignore)

    def linear_method(
        self, prefix: str, packed_modules_mapping: Mapping[str, Sequence[str]]
    ) -> LinearMethodBase | None:
        """The method of the layer `prefix`; a fused layer (its last name component a key of
        `packed_modules_mapping`) must have all its checkpoint modules FP8 or none."""
        parent, _, leaf = prefix.rpartition(".")
        sources = packed_modules_mapping.get(leaf)
        modules = [f"{parent}.{s}" if parent else s for s in sources] if sources else [prefix]
        flags = [self.quantizes(m) for m in modules]
        if all(flags):
            return Fp8LinearMethod(serialized=self.serialized, weight_scale=self.weight_scale)
        if not any(flags):
            return None
        fp8 = [m for m, f in zip(modules, flags) if f]
        plain = [m for m, f in zip(modules, flags) if not f]
        raise ConfigError(
            _FIELD,
            f"{prefix} fuses {modules}, but the quantization config makes {fp8} FP8 and "
            f"{plain} not; a fused layer must be all FP8 or none",
        )

    def methods_for(self, packed_modules_mapping: Mapping[str, Sequence[str]]) -> LinearMethods:
        mapping = dict(packed_modules_mapping)
        return lambda prefix: self.linear_method(prefix, mapping)


def fp8_config_for(hf_config: Mapping[str, Any], quantization: str | None) -> Fp8Config | None:
    """The FP8 config of a checkpoint (its config.json dict) under the engine's `quantization`
    setting (None, "fp8", or "gguf", which asks for nothing here); None: no FP8 layers."""
    if quantization is not None and quantization not in QUANTIZATIONS:
        raise ConfigError(
            _FIELD,
            f"quantization={quantization!r} is not supported; allowed: "
            f"{', '.join(map(str, QUANTIZATIONS))}",
        )
    declared = hf_config.get("quantization_config") or hf_config.get("compression_config")
    if declared is None:
        return Fp8Config(serialized=False) if quantization == "fp8" else None
    if not isinstance(declared, Mapping):
        raise ConfigError(_FIELD, f"quantization_config must be an object; got {declared!r}")
    config = checkpoint_fp8_config(declared)
    if quantization == "gguf":
        raise ConfigError(
            _FIELD,
            f"quantization='gguf' is for GGUF files; this checkpoint is {config.description} "
            "(leave --quantization out, or use fp8)",
        )
    return config


def checkpoint_fp8_config(declared: Mapping[str, Any]) -> Fp8Config:
    """Parse a checkpoint's `quantization_config`; ConfigError for what is not supported."""
    method = declared.get("quant_method")
    if method == "fp8":
        return _fp8_method(declared)
    if method == "compressed-tensors":
        return _compressed_tensors(declared)
    raise ConfigError(
        _FIELD,
        f"quantization_config.quant_method={method!r} is not supported; supported: 'fp8' "
        "(per-tensor weight_scale) and 'compressed-tensors' (format 'float-quantized')",
    )


def _fp8_method(d: Mapping[str, Any]) -> Fp8Config:
    block = d.get("weight_block_size")
    if block is not None:
        raise ConfigError(
            _FIELD,
            f"quantization_config.weight_block_size={block!r}: block-wise FP8 (weight_scale_inv "
            "tensors) is not supported; supported: per-tensor or per-channel weight_scale",
        )
    fmt = d.get("fmt", "e4m3")
    if fmt != "e4m3":
        raise ConfigError(
            _FIELD, f"quantization_config.fmt={fmt!r} is not supported; allowed: e4m3"
        )
    scheme = d.get("activation_scheme", "dynamic")
    if scheme not in ("dynamic", "static"):
        raise ConfigError(
            _FIELD,
            f"quantization_config.activation_scheme={scheme!r} is not supported; allowed: "
            "dynamic, static",
        )
    ignore = d.get("ignored_layers") or d.get("modules_to_not_convert") or ()
    return Fp8Config(
        serialized=True,
        weight_scale="tensor",
        ignore=_names(ignore, "ignored_layers"),
        ignored_checkpoint_suffixes=(_INPUT_SCALE,) if scheme == "static" else (),
        description=f"fp8 (per-tensor weight scales, {scheme} activation scales in the file)",
    )


def _compressed_tensors(d: Mapping[str, Any]) -> Fp8Config:
    groups = d.get("config_groups")
    if not isinstance(groups, Mapping) or not groups:
        raise ConfigError(_FIELD, "quantization_config.config_groups must be a non-empty object")
    _check_kv_cache_scheme(d.get("kv_cache_scheme"))
    strategies: set[str] = set()
    targets: list[str] = []
    static = False
    for name, group in groups.items():
        where = f"quantization_config.config_groups.{name}"
        if not isinstance(group, Mapping):
            raise ConfigError(_FIELD, f"{where} must be an object")
        fmt = group.get("format") or d.get("format")
        if fmt not in _CT_FORMATS:
            raise ConfigError(
                _FIELD,
                f"{where}: format={fmt!r} is not supported; supported: "
                f"{', '.join(map(repr, _CT_FORMATS))}",
            )
        strategies.add(_weights_strategy(group.get("weights"), f"{where}.weights"))
        static |= _activations_static(group.get("input_activations"), f"{where}.input_activations")
        if group.get("output_activations") is not None:
            raise ConfigError(_FIELD, f"{where}.output_activations is not supported; allowed: null")
        targets += _names(group.get("targets") or (), f"{where}.targets")
    if len(strategies) != 1:
        raise ConfigError(
            _FIELD,
            f"quantization_config.config_groups mix weight strategies {sorted(strategies)}; "
            "supported: one strategy for every group",
        )
    strategy = strategies.pop()
    return Fp8Config(
        serialized=True,
        weight_scale=strategy,
        targets=tuple(targets),
        ignore=_names(d.get("ignore") or (), "quantization_config.ignore"),
        ignored_checkpoint_suffixes=(_INPUT_SCALE,) if static else (),
        description=f"compressed-tensors float-quantized (per-{strategy} weight scales)",
    )


def _check_kv_cache_scheme(kv: Any) -> None:
    """llm-compressor's FP8 KV-cache scheme: its `self_attn.k_scale` / `v_scale` tensors are
    read by kestrel.layers.kv_scales (used with --kv-cache-dtype fp8, ignored otherwise)."""
    if kv is None:
        return
    where = "quantization_config.kv_cache_scheme"
    if not isinstance(kv, Mapping):
        raise ConfigError(_FIELD, f"{where} must be an object or null")
    _expect(kv, where, "type", ("float",))
    _expect(kv, where, "num_bits", (8,))
    _expect(kv, where, "dynamic", (False, None))
    _expect(kv, where, "strategy", ("tensor", "attn_head", None))


def _weights_strategy(w: Any, where: str) -> str:
    if not isinstance(w, Mapping):
        raise ConfigError(_FIELD, f"{where} must be an object (weight-only configs need weights)")
    _expect(w, where, "type", ("float",))
    _expect(w, where, "num_bits", (8,))
    _expect(w, where, "symmetric", (True, None))
    _expect(w, where, "dynamic", (False, None))
    for key in ("group_size", "block_structure", "actorder"):
        _expect(w, where, key, (None,))
    return _expect(w, where, "strategy", ("channel", "tensor"))


def _activations_static(a: Any, where: str) -> bool:
    """Whether the checkpoint holds static input scales (which are read past: the run always
    quantizes activations per token, dynamically). None (weight-only FP8) runs the same way."""
    if a is None:
        return False
    if not isinstance(a, Mapping):
        raise ConfigError(_FIELD, f"{where} must be an object or null")
    _expect(a, where, "type", ("float",))
    _expect(a, where, "num_bits", (8,))
    strategy = _expect(a, where, "strategy", ("token", "tensor"))
    dynamic = bool(a.get("dynamic", True))
    if not dynamic and strategy != "tensor":
        raise ConfigError(
            _FIELD, f"{where}: static activation scales per {strategy!r}; supported: per tensor"
        )
    return not dynamic


def _expect(d: Mapping[str, Any], where: str, key: str, allowed: tuple[Any, ...]) -> Any:
    value = d.get(key)
    # exact: True is not 1, 8.0 is not 8
    if not any(type(value) is type(a) and value == a for a in allowed):
        shown = ", ".join("null" if a is None else repr(a) for a in allowed)
        raise ConfigError(_FIELD, f"{where}.{key}={value!r} is not supported; allowed: {shown}")
    return value


def _names(value: Any, where: str) -> tuple[str, ...]:
    if isinstance(value, str) or not all(isinstance(v, str) for v in value):
        raise ConfigError(_FIELD, f"{where} must be a list of module names; got {value!r}")
    return tuple(value)


def _matches(module: str, patterns: Sequence[str]) -> bool:
    """ "Linear" matches every linear layer; "re:<regex>" matches from the name's start (as
    compressed-tensors does); a plain name matches when its dotted components appear in a row
    in the module's (so "lm_head", "model.layers.0" and "self_attn.q_proj" all match)."""
    parts = module.split(".")
    for pattern in patterns:
        if pattern == "Linear":
            return True
        if pattern.startswith("re:"):
            if re.match(pattern[3:], module):
                return True
            continue
        want = pattern.split(".")
        if any(parts[i : i + len(want)] == want for i in range(len(parts) - len(want) + 1)):
            return True
    return False
