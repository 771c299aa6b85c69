"""Rotary position embedding (rotate-half / NeoX style) and the paged KV-cache write.

The cos/sin cache is one tensor [max_position, head_dim]: columns [0, head_dim/2) hold
cos(position * inv_freq[i]) and columns [head_dim/2, head_dim) hold sin(position * inv_freq[i]).

`rotary_embedding_and_cache` dispatches to the fused kernel (a CUDA input it cannot take is a
logged fallback, an error under graph capture); `layers.PagedAttention` picks it or
`rotary_embedding_and_cache_reference` at construction. The cache may be of q's dtype or
float8 e4m3 (`ops/kv_quant.py`: codes of k / k_scale and v / v_scale, saturated).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from kestrel.ops import _dispatch
from kestrel.ops.kv_quant import FP8_KV_DTYPE, check_scale, is_fp8, to_cache_dtype

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
_LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def _rope_type(rope_scaling: dict[str, Any] | None) -> str:
    if rope_scaling is None:
        return "default"
    # HF configs spell it `rope_type`; configs written before transformers 4.45 spell it `type`.
    return str(rope_scaling.get("rope_type", rope_scaling.get("type", "default")))


def _require(rope_scaling: dict[str, Any], key: str, rope_type: str) -> float:
    if key not in rope_scaling:
        raise ValueError(f"rope_scaling of rope_type {rope_type!r} needs key {key!r}")
    return float(rope_scaling[key])


def _llama3_inv_freq(inv_freq: torch.Tensor, rope_scaling: dict[str, Any]) -> torch.Tensor:
    """Llama 3.1 frequency smoothing: long wavelengths are slowed down by `factor`, short ones
    are kept, and the band in between is linearly interpolated in 1/wavelength."""
    factor = _require(rope_scaling, "factor", "llama3")
    low = _require(rope_scaling, "low_freq_factor", "llama3")
    high = _require(rope_scaling, "high_freq_factor", "llama3")
    old_context = _require(rope_scaling, "original_max_position_embeddings", "llama3")
    if not (factor > 0 and high > low > 0 and old_context > 0):
        raise ValueError(
            "llama3 rope_scaling needs factor > 0, high_freq_factor > low_freq_factor > 0 and "
            f"original_max_position_embeddings > 0; got {dict(rope_scaling)}"
        )
    # Wavelengths (in positions) delimiting the three bands.
    long_wavelen = old_context / low  # wavelen above this: fully scaled
    short_wavelen = old_context / high  # wavelen below this: untouched
    wavelen = 2 * math.pi / inv_freq  # [head_dim / 2]
    # smooth = 0 at long_wavelen, 1 at short_wavelen.
    smooth = (old_context / wavelen - low) / (high - low)
    interpolated = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    scaled = torch.where(wavelen > long_wavelen, inv_freq / factor, interpolated)
    return torch.where(wavelen < short_wavelen, inv_freq, scaled)


def compute_cos_sin_cache(
    head_dim: int,
    max_position: int,
    rope_theta: float,
    rope_scaling: dict[str, Any] | None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Build the rotary cos/sin table.

    Args:
        head_dim: rotary dimension, even, > 0.
        max_position: number of positions (rows), > 0.
        rope_theta: base of the frequencies, inv_freq[i] = 1 / rope_theta^(2i / head_dim).
        rope_scaling: the Hugging Face dict (key ``rope_type`` or legacy ``type``) or None.
            Supported: None / "default"; "linear" (positions divided by ``factor``); "llama3"
            (``factor``, ``low_freq_factor``, ``high_freq_factor``,
            ``original_max_position_embeddings``).
        dtype, device: of the returned table. The math runs in fp32 on ``device``.

    Returns:
        [max_position, head_dim] table: cos in columns [0, head_dim/2), sin in the rest.
    """
    if head_dim <= 0 or head_dim % 2 != 0:
        raise ValueError(f"head_dim must be a positive even integer; got {head_dim}")
    if max_position <= 0:
        raise ValueError(f"max_position must be > 0; got {max_position}")
    if not rope_theta > 0:
        raise ValueError(f"rope_theta must be > 0; got {rope_theta}")
    rope_type = _rope_type(rope_scaling)
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(
            f"unsupported rope_type {rope_type!r}; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    if rope_scaling is not None and float(rope_scaling.get("partial_rotary_factor", 1.0)) != 1.0:
        raise ValueError(
            "partial_rotary_factor must be 1.0 (partial rotary is not supported); got "
            f"{rope_scaling['partial_rotary_factor']}"
        )

    # fp32 throughout, in the same operation order as transformers, so tables agree bit for bit.
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim
    inv_freq = 1.0 / (rope_theta**exponents)  # [head_dim / 2], fp32
    if rope_type == "linear":
        assert rope_scaling is not None
        factor = _require(rope_scaling, "factor", "linear")
        if not factor > 0:
            raise ValueError(f"linear rope_scaling factor must be > 0; got {factor}")
        # position / factor == position * (inv_freq / factor)
        inv_freq = inv_freq / factor
    elif rope_type == "llama3":
        assert rope_scaling is not None
        inv_freq = _llama3_inv_freq(inv_freq, rope_scaling)

    positions = torch.arange(max_position, dtype=torch.int64, device=device).float()
    angles = positions[:, None] * inv_freq[None, :]  # [max_position, head_dim / 2], radians
    return torch.cat([angles.cos(), angles.sin()], dim=-1).to(dtype)


def _rotate_in_place(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """x [num_tokens, num_heads, head_dim]; cos, sin [num_tokens, 1, head_dim / 2] fp32."""
    half = x.shape[-1] // 2
    x_fp32 = x.float()
    x1, x2 = x_fp32[..., :half], x_fp32[..., half:]
    rotated = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    x.copy_(rotated)


def apply_rotary(
    positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_sin_cache: torch.Tensor
) -> None:
    """Rotate q and k in place (rotate-half convention of NeoX / HF Llama).

    Args:
        positions: [num_tokens] int32 or int64, each in [0, max_position).
        q: [num_tokens, num_q_heads, head_dim], float dtype; overwritten.
        k: [num_tokens, num_kv_heads, head_dim], float dtype; overwritten.
        cos_sin_cache: [max_position, head_dim] from :func:`compute_cos_sin_cache`.

    With (x1, x2) the two halves of a head vector and (c, s) the row ``positions[t]`` of the
    table: ``x <- cat(x1*c - x2*s, x2*c + x1*s)``, computed in fp32 and rounded to the dtype of
    q / k. Returns None.
    """
    _check_rotary_args(positions, q, k, cos_sin_cache)
    half = q.shape[-1] // 2
    table = cos_sin_cache[positions.long()].float()  # [num_tokens, head_dim]
    cos = table[:, None, :half]  # [num_tokens, 1, head_dim / 2]
    sin = table[:, None, half:]
    _rotate_in_place(q, cos, sin)
    _rotate_in_place(k, cos, sin)


def _check_rotary_args(
    positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_sin_cache: torch.Tensor
) -> None:
    if positions.dtype not in (torch.int32, torch.int64) or positions.dim() != 1:
        raise ValueError(
            f"positions must be a 1-D int32/int64 tensor; got {positions.dtype} "
            f"{tuple(positions.shape)}"
        )
    num_tokens = positions.shape[0]
    for name, t in (("q", q), ("k", k)):
        if t.dim() != 3 or t.shape[0] != num_tokens:
            raise ValueError(
                f"{name} must be [num_tokens={num_tokens}, num_heads, head_dim]; "
                f"got {tuple(t.shape)}"
            )
    head_dim = q.shape[-1]
    if k.shape[-1] != head_dim or cos_sin_cache.dim() != 2 or cos_sin_cache.shape[1] != head_dim:
        raise ValueError(
            f"q, k and cos_sin_cache must share head_dim; got q {tuple(q.shape)}, "
            f"k {tuple(k.shape)}, cos_sin_cache {tuple(cos_sin_cache.shape)}"
        )


def _check_cache_args(
    k: torch.Tensor,
    v: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    if key_cache.shape != value_cache.shape or key_cache.dim() != 4:
        raise ValueError(
            "key_cache and value_cache must both be [num_blocks, block_size, num_kv_heads, "
            f"head_dim]; got {tuple(key_cache.shape)} and {tuple(value_cache.shape)}"
        )
    if not (key_cache.is_contiguous() and value_cache.is_contiguous()):
        raise ValueError("key_cache and value_cache must be contiguous (they are written in place)")
    if slot_mapping.dim() != 1:
        raise ValueError(f"slot_mapping must be 1-D [num_tokens]; got {tuple(slot_mapping.shape)}")
    row_shape = key_cache.shape[2:]
    num_tokens = slot_mapping.shape[0]
    if k.shape != (num_tokens, *row_shape) or v.shape != k.shape:
        raise ValueError(
            f"k and v must be [num_tokens={num_tokens}, {row_shape[0]}, {row_shape[1]}] to match "
            f"slot_mapping and the cache; got k {tuple(k.shape)}, v {tuple(v.shape)}"
        )


def write_kv_cache(
    k: torch.Tensor,
    v: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> None:
    """Scatter this step's key/value rows into the paged cache.

    Args:
        k, v: [num_tokens, num_kv_heads, head_dim].
        key_cache, value_cache: [num_blocks, block_size, num_kv_heads, head_dim], contiguous;
            written in place (rows cast to the cache dtype; for a float8 e4m3 cache, the codes
            of k / k_scale and v / v_scale saturated to +-448, see ops/kv_quant.py).
        slot_mapping: [num_tokens] int; slot = block_id * block_size + offset_in_block, in
            [0, num_blocks * block_size). A negative slot skips that row (nothing is written).
            Two rows with the same non-negative slot give an unspecified winner.

    Returns None.
    """
    _check_cache_args(k, v, key_cache, value_cache, slot_mapping)
    row_shape = key_cache.shape[2:]
    # view() (not reshape) so that the writes land in the caller's storage.
    key_rows = key_cache.view(-1, *row_shape)  # [num_blocks * block_size, num_kv_heads, head_dim]
    value_rows = value_cache.view(-1, *row_shape)
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    key_rows[slots] = to_cache_dtype(k[keep], key_cache.dtype, k_scale)
    value_rows[slots] = to_cache_dtype(v[keep], value_cache.dtype, v_scale)


def rotary_embedding_and_cache_reference(
    positions: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> None:
    """Fused :func:`apply_rotary` (q and k in place) then :func:`write_kv_cache` of the ROTATED k
    and of v. Shapes and semantics are those of the two ops. Returns None."""
    apply_rotary(positions, q, k, cos_sin_cache)
    write_kv_cache(k, v, key_cache, value_cache, slot_mapping, k_scale, v_scale)


def _heads_contiguous(t: torch.Tensor) -> bool:
    """[T, H, D] with head stride D and element stride 1 (any token stride)."""
    return t.stride(2) == 1 and (t.shape[1] == 1 or t.stride(1) == t.shape[2])


def _rotary_kernel_dtype(
    positions: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> int | None:
    """The kernel dtype code when the fused kernel handles these tensors, else None (a CUDA
    input it cannot take is a logged fallback)."""
    if not _dispatch.use_kernels(q):
        return None
    if is_fp8(key_cache.dtype) and not _dispatch.kernel_verified(_dispatch.FP8_KV_OP):
        return None  # see _dispatch.UNVERIFIED_OPS
    _dispatch.require_same_device(
        "rotary_embedding_and_cache",
        positions=positions,
        q=q,
        k=k,
        v=v,
        cos_sin_cache=cos_sin_cache,
        key_cache=key_cache,
        value_cache=value_cache,
        slot_mapping=slot_mapping,
    )
    code = _dispatch.dtype_code(q.dtype)
    cache_ok = key_cache.dtype == value_cache.dtype and key_cache.dtype in (q.dtype, FP8_KV_DTYPE)
    same_dtype = cache_ok and all(t.dtype == q.dtype for t in (k, v))
    layout_ok = (
        all(_heads_contiguous(t) for t in (q, k, v))
        and cos_sin_cache.dtype == torch.float32
        and cos_sin_cache.is_contiguous()
        and positions.is_contiguous()
        and slot_mapping.is_contiguous()
        and slot_mapping.dtype in (torch.int32, torch.int64)
        and v.shape == k.shape
    )
    if code is None or not same_dtype or not layout_ok:
        why = (
            f"q {q.dtype}, cache {key_cache.dtype}, same dtypes: {same_dtype}, layout: {layout_ok}"
        )
        _dispatch.reference_fallback("rotary_embedding_and_cache", why)
        return None
    return code


def rotary_embedding_and_cache(
    positions: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> None:
    """Rotate q and k in place and write the rotated k and v into the paged cache (see
    :func:`rotary_embedding_and_cache_reference`).

    On CUDA fp16/bf16 tensors this is one kernel: q, k, v may be per-token views into a fused
    qkv projection ([T, H, D] with head stride D and any token stride); cos_sin_cache must be
    fp32; the caches are of q's dtype or float8 e4m3 (then k_scale, v_scale > 0 apply).
    Positions must lie in [0, max_position): the kernel does not check them (that would
    need a device-to-host sync), and so must non-negative slots ([0, num_blocks * block_size)).
    """
    _check_rotary_args(positions, q, k, cos_sin_cache)
    _check_cache_args(k, v, key_cache, value_cache, slot_mapping)
    k_scale, v_scale = check_scale("k_scale", k_scale), check_scale("v_scale", v_scale)
    code = _rotary_kernel_dtype(
        positions, q, k, v, cos_sin_cache, key_cache, value_cache, slot_mapping
    )
    if code is None:
        rotary_embedding_and_cache_reference(
            positions, q, k, v, cos_sin_cache, key_cache, value_cache, slot_mapping,
            k_scale, v_scale,
        )  # fmt: skip
        return
    num_tokens, num_q_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    strides = (q.stride(0), k.stride(0), v.stride(0))
    vec8 = (
        head_dim % 16 == 0
        and all(s % 8 == 0 for s in strides)
        and _dispatch.aligned16(q, k, v, cos_sin_cache, key_cache, value_cache)
    )
    assert _dispatch.kernels is not None
    with _dispatch.on_device(q.device):
        args = _dispatch.kernel_args(
            _dispatch.kernels.RotaryCacheArgs,
            positions=positions.data_ptr(),
            positions_int64=positions.dtype == torch.int64,
            q=q.data_ptr(),
            q_stride=q.stride(0),
            num_q_heads=num_q_heads,
            k=k.data_ptr(),
            k_stride=k.stride(0),
            num_kv_heads=num_kv_heads,
            v=v.data_ptr(),
            v_stride=v.stride(0),
            cos_sin=cos_sin_cache.data_ptr(),
            key_cache=key_cache.data_ptr(),
            value_cache=value_cache.data_ptr(),
            slot_mapping=slot_mapping.data_ptr(),
            slots_int64=slot_mapping.dtype == torch.int64,
            num_tokens=num_tokens,
            head_dim=head_dim,
            dtype=code,
            kv_dtype=_dispatch.FP8_CODE if is_fp8(key_cache.dtype) else code,
            k_scale=k_scale,
            v_scale=v_scale,
            vec8=vec8,
        )
        status = _dispatch.kernels.rotary_embedding_and_cache(
            args, _dispatch.stream_handle(q.device)
        )
    _dispatch.check("rotary_embedding_and_cache", status)
