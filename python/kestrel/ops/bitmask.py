"""Grammar bitmask op (structured outputs): the CUDA kernel on GPU logits, the torch reference
(the oracle) elsewhere.

`apply_token_bitmask(logits, rows, bitmask)`, in place: for each constrained row r and token v,
`logits[rows[r], v] = -inf` unless bit `v % 32` of `bitmask[r, v // 32]` is set (bit j of word
w allows token 32 * w + j, little-endian, as llguidance writes them); tokens at or past
`32 * words` (model vocabularies padded beyond the tokenizer's) are never allowed. `rows` is
int64 on the logits' device, distinct and in range (the caller checks that on the host, see
structured/bitmask.py: the kernel only skips rows out of range, it cannot raise).
"""

from __future__ import annotations

import torch

from kestrel.ops import _dispatch

# cuda/kernels.h TokenBitmaskArgs.logits_dtype
_LOGITS_DTYPE_CODES = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2}


def _check_args(logits: torch.Tensor, rows: torch.Tensor, bitmask: torch.Tensor) -> None:
    if logits.dim() != 2 or not logits.is_floating_point():
        raise ValueError(
            f"apply_token_bitmask expects float logits [S, V]; got {logits.dtype} "
            f"{tuple(logits.shape)}"
        )
    if rows.dim() != 1 or rows.dtype != torch.int64:
        raise ValueError(f"rows must be int64 [R]; got {rows.dtype} {tuple(rows.shape)}")
    if bitmask.dim() != 2 or bitmask.dtype != torch.int32 or bitmask.shape[1] < 1:
        raise ValueError(
            f"bitmask must be int32 [R, W] with W >= 1; got {bitmask.dtype} {tuple(bitmask.shape)}"
        )
    if bitmask.shape[0] != rows.shape[0]:
        raise ValueError(f"{rows.shape[0]} rows for {bitmask.shape[0]} bitmask rows")


def allowed_tokens(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[R, W] int32 bitmask -> [R, vocab_size] bool (True = allowed)."""
    rows, words = bitmask.shape
    as_bytes = bitmask.contiguous().view(torch.uint8).view(rows, words * 4)  # little-endian
    shifts = torch.arange(8, dtype=torch.uint8, device=bitmask.device)
    bits = ((as_bytes.unsqueeze(-1) >> shifts) & 1).view(rows, words * 32).bool()
    if bits.shape[1] >= vocab_size:
        return bits[:, :vocab_size]
    pad = torch.zeros(rows, vocab_size - bits.shape[1], dtype=torch.bool, device=bits.device)
    return torch.cat([bits, pad], dim=1)


def apply_token_bitmask_reference(
    logits: torch.Tensor, rows: torch.Tensor, bitmask: torch.Tensor
) -> None:
    """The torch reference (see the module docstring); every tensor on one device."""
    _check_args(logits, rows, bitmask)
    num = rows.shape[0]
    if num == 0:
        return
    allowed = allowed_tokens(bitmask, logits.shape[1])
    if num == logits.shape[0] and bool((rows == torch.arange(num, device=rows.device)).all()):
        logits.masked_fill_(~allowed, float("-inf"))  # every row constrained: in place
        return
    constrained = logits.index_select(0, rows)
    constrained.masked_fill_(~allowed, float("-inf"))
    logits.index_copy_(0, rows, constrained)


def apply_token_bitmask(logits: torch.Tensor, rows: torch.Tensor, bitmask: torch.Tensor) -> None:
    """In place (see the module docstring). On CUDA logits (fp32, fp16 or bf16, unit stride
    along the vocabulary) with `rows` and a contiguous `bitmask` on the same device, one
    kernel launch; otherwise the reference. No host sync on the kernel path."""
    _check_args(logits, rows, bitmask)
    if not _dispatch.use_kernels(logits) or not _dispatch.kernel_verified("apply_token_bitmask"):
        apply_token_bitmask_reference(logits, rows, bitmask)
        return
    _dispatch.require_same_device("apply_token_bitmask", logits=logits, rows=rows, bitmask=bitmask)
    code = _LOGITS_DTYPE_CODES.get(logits.dtype)
    fits = code is not None and logits.stride(1) == 1 and bitmask.is_contiguous()
    fits = fits and rows.is_contiguous() and rows.shape[0] <= 65535
    if not fits:
        why = f"logits {logits.dtype} strides {logits.stride()}, {rows.shape[0]} rows"
        _dispatch.reference_fallback("apply_token_bitmask", why)
        apply_token_bitmask_reference(logits, rows, bitmask)
        return
    if rows.shape[0] == 0:
        return
    assert _dispatch.kernels is not None
    with _dispatch.on_device(logits.device):
        args = _dispatch.kernel_args(
            _dispatch.kernels.TokenBitmaskArgs,
            logits=logits.data_ptr(),
            row_stride=logits.stride(0) if logits.shape[0] > 1 else logits.shape[1],
            num_logit_rows=logits.shape[0],
            vocab=logits.shape[1],
            rows=rows.data_ptr(),
            num_rows=rows.shape[0],
            bitmask=bitmask.data_ptr(),
            words=bitmask.shape[1],
            logits_dtype=code,
        )
        status = _dispatch.kernels.apply_token_bitmask(args, _dispatch.stream_handle(logits.device))
    _dispatch.check("apply_token_bitmask", status)
