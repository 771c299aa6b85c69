"""Which CUDA graphs an engine captures at start-up, and why it captures none.

Decode graphs (`runner/cuda_graphs.py`), piecewise graphs for steps with prefill rows
(`runner/piecewise_graphs.py`), verify graphs when speculation is configured
(`runner/verify_graphs.py`) and the draft model's own graphs. None on CPU, under
`enforce_eager`, with tensor or pipeline parallelism (collectives in graphs: not built), without
the kernels module, for dtypes the kernels do not run, or over unverified FP8 KV-cache kernels:
graphs need every op on a kernel (the torch references synchronize with the host).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch

from kestrel.ops._dispatch import FP8_KV_OP, UNVERIFIED_ENV, kernel_verified, kernels_available
from kestrel.ops.kv_quant import is_fp8

if TYPE_CHECKING:
    from kestrel.config import EngineConfig
    from kestrel.runner.model_runner import ModelRunner
    from kestrel.spec.draft_runner import DraftRunner

logger = logging.getLogger(__name__)


def why_no_graphs(config: EngineConfig, runner: ModelRunner, multi_process: bool) -> str | None:
    """The reason this engine runs without CUDA graphs, or None when it captures them."""
    if runner.device.type != "cuda" or config.enforce_eager:
        return "eager"
    if multi_process:
        return "tensor / pipeline parallelism runs without CUDA graphs (not built yet)"
    if not kernels_available():
        return "CUDA kernels not built: running without CUDA graphs"
    if runner.dtype not in (torch.float16, torch.bfloat16):
        return f"kernels run fp16/bf16 only: {runner.dtype} runs without CUDA graphs"
    if is_fp8(runner.kv_cache_dtype) and not kernel_verified(FP8_KV_OP):
        return (
            f"the FP8 KV-cache kernels are not verified on a GPU yet ({UNVERIFIED_ENV}=1 runs "
            "them): running the torch reference without CUDA graphs"
        )
    return None


def capture_graphs(
    config: EngineConfig,
    runner: ModelRunner,
    max_model_len: int,
    *,
    multi_process: bool,
    num_speculative_tokens: int | None,
    drafter: DraftRunner | None,
) -> None:
    why = why_no_graphs(config, runner, multi_process)
    if why is not None:
        if why != "eager":
            logger.log(logging.INFO if multi_process else logging.WARNING, "%s", why)
        return
    runner.capture_decode_graphs(config.max_num_seqs, max_model_len)
    pw_tokens = min(config.piecewise_graph_max_tokens, config.max_num_batched_tokens)
    if pw_tokens > 0:
        runner.capture_piecewise_graphs(pw_tokens)
    if num_speculative_tokens is not None:
        runner.capture_verify_graphs(config.max_num_seqs, num_speculative_tokens, max_model_len)
    if drafter is not None:
        drafter.capture_graphs(config.max_num_seqs, max_model_len, max(pw_tokens, 0))
