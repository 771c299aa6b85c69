"""Per-token cost of structured outputs on the host: the grammar bitmask of every constrained row
(llguidance) plus advancing each matcher by its token, and applying the bitmask to the logits.

Walks B sequences through a JSON document that follows the schema (its tokens as the
"sampled" ones), so every step has B constrained rows; reports microseconds per step and per
token for the bitmask fill + accept on the host, and for applying the bitmask to the logits on
their device (CPU unless --device cuda) two ways: the engine's path (`BitmaskApplier`: one
pinned staging copy and, on CUDA, the `apply_token_bitmask` kernel) and the torch reference
(`apply_bitmask`: a pageable copy and a few torch ops). Compare with the engine's TPOT at the
same batch size.

    python benchmarks/structured_overhead.py --tokenizer .peers/ggml-vocab-qwen2.gguf \\
        [--batch 1 64] [--device cpu] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from kestrel.sampling_params import StructuredOutputsParams
from kestrel.structured import BitmaskApplier, GrammarBackend, GrammarMask, apply_bitmask

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import commit

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "tags": {"type": "array", "items": {"type": "string"}},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "zip": {"type": "string"}},
            "required": ["city", "zip"],
        },
    },
    "required": ["name", "age", "tags", "address"],
    "additionalProperties": False,
}
DOCUMENT = {
    "name": "Ada Lovelace",
    "age": 36,
    "tags": ["mathematics", "analytical engine", "poetry"],
    "address": {"city": "London", "zip": "W1"},
}


def _tokenizer(path: str):
    from kestrel.loader.gguf_loader import GGUFFile
    from kestrel.loader.gguf_tokenizer import load_gguf_tokenizer
    from kestrel.tokenizer import Tokenizer

    if path.endswith(".gguf"):
        return load_gguf_tokenizer(GGUFFile(Path(path)))
    return Tokenizer.from_dir(Path(path))


def run(backend: GrammarBackend, tokenizer, batch: int, device: torch.device) -> dict:
    constraint = StructuredOutputsParams(json=SCHEMA)
    t0 = time.perf_counter()
    matchers = [backend.compile_async(constraint).result() for _ in range(batch)]
    compile_ms = 1e3 * (time.perf_counter() - t0) / batch
    tokens = tokenizer.encode(json.dumps(DOCUMENT))
    words = matchers[0].num_words
    vocab = 32 * words
    logits = torch.randn(batch, vocab, device=device)
    rows = np.arange(batch, dtype=np.int64)
    applier = BitmaskApplier()
    check = logits.clone()
    host, apply, reference = [], [], []
    for token in tokens:
        t0 = time.perf_counter()
        bitmask = np.empty((batch, words), dtype=np.int32)
        backend.fill_bitmasks(matchers, bitmask)  # parallel across rows, as the engine does
        for m in matchers:
            m.accept(token)
        mask = GrammarMask(rows, bitmask)
        t1 = time.perf_counter()
        applier.apply(logits, mask)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t2 = time.perf_counter()
        apply_bitmask(check, mask)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        host.append(t1 - t0)
        apply.append(t2 - t1)
        reference.append(time.perf_counter() - t2)
        # Both paths mask the same tokens (logits only ever lose tokens, never change values).
        assert torch.equal(torch.isneginf(logits), torch.isneginf(check))
    assert all(m.is_terminated or not m._m.is_error() for m in matchers)
    return {
        "batch": batch,
        "tokens_per_sequence": len(tokens),
        "compile_ms_per_request": compile_ms,
        "host_us_per_step_p50": 1e6 * statistics.median(host),
        "host_us_per_step_mean": 1e6 * statistics.mean(host),
        "host_us_per_token_mean": 1e6 * statistics.mean(host) / batch,
        "apply_us_per_step_mean": 1e6 * statistics.mean(apply[1:] or apply),
        "apply_reference_us_per_step_mean": 1e6 * statistics.mean(reference[1:] or reference),
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokenizer", required=True, help="a .gguf file or a tokenizer directory")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 64])
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    tokenizer = _tokenizer(args.tokenizer)
    t0 = time.perf_counter()
    backend = GrammarBackend(tokenizer, tokenizer.eos_token_id)
    print(f"vocabulary view: {backend.num_words} words, built in "
          f"{time.perf_counter() - t0:.1f} s (once per engine)")  # fmt: skip
    rows = [run(backend, tokenizer, b, torch.device(args.device)) for b in args.batch]
    for r in rows:
        print(
            "  ".join(f"{k}={v:.1f}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items())
        )
    if args.json:
        payload = {"commit": commit(), "host": platform.node(), "device": args.device, "rows": rows}
        Path(args.json).write_text(json.dumps(payload, indent=2))


if __name__ == "__main__":
    main()
