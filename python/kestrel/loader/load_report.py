"""Loading feedback: one byte progress bar for a whole load, and its summary log line."""

from __future__ import annotations

import logging
import time

import torch
from torch import nn
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

GiB = float(1 << 30)
# Below this many checkpoint bytes no progress bar is shown (tiny test models).
PROGRESS_MIN_BYTES = 16 << 20


def byte_progress(total_bytes: int, desc: str) -> tqdm:
    """The byte bar of one load (all files, all tensors); hidden for small checkpoints."""
    return tqdm(
        total=total_bytes,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        desc=desc,
        disable=total_bytes < PROGRESS_MIN_BYTES,
    )


def device_weight_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and buffers (each storage counted once: tied weights)."""
    seen: set[tuple[torch.device, int]] = set()
    total = 0
    for tensor in [*model.parameters(), *model.buffers()]:
        key = (tensor.device, tensor.untyped_storage().data_ptr())
        if key not in seen:
            seen.add(key)
            total += tensor.untyped_storage().nbytes()
    return total


class LoadTimer:
    """Times one load from construction to `finish` (which waits for the device first)."""

    def __init__(self) -> None:
        self.start = time.perf_counter()

    def finish(
        self, model: nn.Module, source: object, device: torch.device, read_bytes: int
    ) -> float:
        """Log the load time (s), the weight GiB now on `device` and the read rate (GiB/s of
        checkpoint bytes); returns the seconds."""
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # the staged copies and conversions are asynchronous
        seconds = time.perf_counter() - self.start
        weights = device_weight_bytes(model) / GiB
        read = read_bytes / GiB
        logger.info(
            "loaded weights from %s in %.2f s: %.2f GiB on %s, %.2f GiB read (%.2f GiB/s)",
            source,
            seconds,
            weights,
            device,
            read,
            read / max(seconds, 1e-9),
        )
        return seconds
