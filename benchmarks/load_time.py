"""Load time: GGUF files and safetensors directories to weights on the device (and, with
--engine, to a ready engine), warm page cache, per file type; with --legacy also the previous
path (the package's own GGUFReader; every tensor dequantized / converted on the CPU through the
`gguf` package, then copied) in the same run.

    python benchmarks/load_time.py /models/qwen7b-bf16.gguf /models/qwen7b-q4_k_m.gguf \
        --legacy --engine --json load.json

Columns: file GiB (checkpoint bytes read), device GiB (parameters and buffers on the device),
seconds from the call to the weights being on the device (synchronized), and GiB/s of file
bytes. "page cache GiB/s" is one plain sequential read of the file just before (the ceiling of
any host-side path). Random-weight files of each type: .peers/make_gguf.py (BF16) and
benchmarks/make_quant_gguf.py (Q4_K_M, Q8_0, ...).
"""

from __future__ import annotations

import argparse
import collections
import gc
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from unittest import mock

import gguf
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import commit, device_name, print_table, write_json

from kestrel.layers.linear import process_weights_after_loading
from kestrel.loader import find_safetensors_files, load_model, resolve_dtype
from kestrel.loader.gguf_dequant import dequantize_to_torch
from kestrel.loader.gguf_loader import (
    GGUFFile,
    gguf_model_config,
    hf_tensor_name,
    unpermute_rotary_rows,
)
from kestrel.loader.hf_dir import read_model_config
from kestrel.loader.load_report import GiB, device_weight_bytes
from kestrel.models.registry import get_model_class


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def checkpoint_files(path: Path) -> list[Path]:
    return [path] if path.suffix.lower() == ".gguf" else find_safetensors_files(path)


def page_cache_read(files: list[Path]) -> float:
    """Read the files once (warms the page cache); returns GiB/s of that read."""
    start, total = time.perf_counter(), 0
    for file in files:
        with open(file, "rb", buffering=0) as f:
            while chunk := f.read(64 << 20):
                total += len(chunk)
    return total / GiB / (time.perf_counter() - start)


def file_types(path: Path) -> str:
    """'Q4_K:169 Q6_K:29 F32:141' for a GGUF file; the dtypes of a safetensors checkpoint."""
    if path.suffix.lower() == ".gguf":
        counts = collections.Counter(t.tensor_type.name for t in GGUFFile(path).reader.tensors)
    else:
        from kestrel.loader.safetensors_file import SafetensorsFile

        counts = collections.Counter(
            str(e.dtype).removeprefix("torch.")
            for f in find_safetensors_files(path)
            for e in SafetensorsFile(f).entries
        )
    return " ".join(f"{name}:{n}" for name, n in counts.most_common())


# ---- the previous path (before weights went straight to the device), for comparison -------


def _legacy_gguf_weights(f: GGUFFile, config, dtype: torch.dtype) -> Iterator:
    for tensor in f.reader.tensors:
        name = hf_tensor_name(tensor.name)
        if name is None:
            continue
        weight = dequantize_to_torch(tensor.name, tensor.data, tensor.tensor_type, dtype)
        if f.architecture == "llama" and ".self_attn.q_proj." in name:
            weight = unpermute_rotary_rows(weight, config.num_attention_heads)
        elif f.architecture == "llama" and ".self_attn.k_proj." in name:
            weight = unpermute_rotary_rows(weight, config.num_key_value_heads)
        yield name, weight


def _legacy_safetensors_weights(files: list[Path]) -> Iterator:
    from safetensors import safe_open

    for file in files:
        with safe_open(str(file), framework="pt", device="cpu") as handle:
            for name in handle.keys():  # noqa: SIM118
                yield name, handle.get_tensor(name)


def legacy_load(path: Path, dtype: str, device: torch.device) -> torch.nn.Module:
    if path.suffix.lower() == ".gguf":
        with mock.patch("kestrel.loader.gguf_loader.FastGGUFReader", gguf.GGUFReader):
            f = GGUFFile(path)  # the package's reader, as before
        config = gguf_model_config(f)
        torch_dtype = resolve_dtype(dtype, config, device)
        weights = _legacy_gguf_weights(f, config, torch_dtype)
    else:
        config = read_model_config(path)
        torch_dtype = resolve_dtype(dtype, config, device)
        weights = _legacy_safetensors_weights(find_safetensors_files(path))
    model = get_model_class(config.architecture)(config, torch_dtype, device)
    model.load_weights(weights)
    process_weights_after_loading(model)
    return model.eval()


# ---- timing ---------------------------------------------------------------------------------


def timed(load: Callable[[], object], device: torch.device) -> tuple[float, object]:
    start = time.perf_counter()
    result = load()
    _sync(device)
    return time.perf_counter() - start, result


def release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def measure(path: Path, args, device: torch.device) -> list[dict]:
    files = checkpoint_files(path)
    file_gib = sum(f.stat().st_size for f in files) / GiB
    cache_rate = page_cache_read(files)
    loaders: dict[str, Callable[[], object]] = {
        "kestrel": lambda: load_model(path, args.dtype, device)[0]
    }
    if args.legacy:
        loaders["legacy (CPU dequant)"] = lambda: legacy_load(path, args.dtype, device)
    rows = []
    for label, load in loaders.items():
        seconds, device_gib = [], 0.0
        for _ in range(args.repeat if label == "kestrel" else 1):  # the legacy path is slow
            elapsed, model = timed(load, device)
            seconds.append(elapsed)
            device_gib = device_weight_bytes(model) / GiB
            del model
            release(device)
        rows.append(_row(path, label, file_gib, device_gib, statistics.median(seconds), cache_rate))
    if args.engine:
        from kestrel import LLM

        kwargs = {"dtype": args.dtype, "device": str(device), "max_model_len": args.max_model_len}
        if args.enforce_eager:
            kwargs["enforce_eager"] = True
        elapsed, llm = timed(lambda: LLM(str(path), **kwargs), device)
        device_gib = device_weight_bytes(llm.engine.model) / GiB
        del llm
        release(device)
        rows.append(_row(path, "kestrel engine ready", file_gib, device_gib, elapsed, cache_rate))
    return rows


def _row(path, label, file_gib, device_gib, seconds, cache_rate) -> dict:
    return {
        "file": path.name,
        "types": file_types(path),
        "path": label,
        "file_gib": file_gib,
        "device_gib": device_gib,
        "seconds": seconds,
        "file_gib_per_s": file_gib / seconds,
        "page_cache_gib_per_s": cache_rate,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("models", nargs="+", type=Path, help=".gguf files or safetensors model dirs")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--repeat", type=int, default=3, help="Kestrel loads (median); legacy: 1")
    ap.add_argument("--legacy", action="store_true", help="also time the previous CPU path")
    ap.add_argument("--engine", action="store_true", help="also time LLM(...) to ready")
    ap.add_argument("--max-model-len", type=int, default=4096)
    ap.add_argument("--enforce-eager", action="store_true")
    ap.add_argument("--json")
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.zeros(1, device=device)  # CUDA context made before any timing
    results = [row for path in args.models for row in measure(path, args, device)]
    print_table(
        f"load time  device={device_name()} dtype={args.dtype} commit={commit()}",
        ["file", "path", "file GiB", "device GiB", "s", "GiB/s", "page cache GiB/s", "types"],
        [
            [r["file"], r["path"], r["file_gib"], r["device_gib"], r["seconds"]]
            + [r["file_gib_per_s"], r["page_cache_gib_per_s"], r["types"]]
            for r in results
        ],
    )
    write_json(
        args.json,
        {
            "benchmark": "load_time",
            "device": device_name(),
            "commit": commit(),
            "args": {k: str(v) for k, v in vars(args).items()},
            "results": results,
        },
    )


if __name__ == "__main__":
    main()
