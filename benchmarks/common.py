"""Shared pieces of the benchmark scripts: model shape presets (random "dummy" weights with the
real shapes), run metadata (device, commit), tables and JSON."""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kestrel.config import EngineConfig
from kestrel.config_args import add_dataclass_arguments, namespace_kwargs

# Real configs of the yardstick models (DESIGN.md section 4), for load_format="dummy".
_QWEN2 = {
    "architectures": ["Qwen2ForCausalLM"],
    "model_type": "qwen2",
    "hidden_act": "silu",
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "torch_dtype": "bfloat16",
}
SHAPES: dict[str, dict[str, Any]] = {
    "qwen2.5-7b": {
        **_QWEN2,
        "vocab_size": 152064,
        "hidden_size": 3584,
        "intermediate_size": 18944,
        "num_hidden_layers": 28,
        "num_attention_heads": 28,
        "num_key_value_heads": 4,
        "tie_word_embeddings": False,
    },
    "qwen2.5-0.5b": {
        **_QWEN2,
        "vocab_size": 151936,
        "hidden_size": 896,
        "intermediate_size": 4864,
        "num_hidden_layers": 24,
        "num_attention_heads": 14,
        "num_key_value_heads": 2,
        "tie_word_embeddings": True,
    },
}


def model_dir_for(model: str) -> tuple[str, bool]:
    """(directory, is_dummy): a preset name becomes a temp dir holding only its config.json."""
    if model in SHAPES:
        path = Path(tempfile.mkdtemp(prefix=f"kestrel-{model}-"))
        (path / "config.json").write_text(json.dumps(SHAPES[model], indent=2))
        return str(path), True
    return model, False


def hf_model(model_dir: str, dummy: bool, dtype_name: str):
    """transformers' model for the comparison runs: random init on the GPU for a preset shape
    (fast), else the checkpoint; sdpa attention, eval mode."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    dtype = getattr(torch, dtype_name) if dtype_name != "auto" else torch.bfloat16
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if dummy:
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(
                AutoConfig.from_pretrained(model_dir), dtype=dtype, attn_implementation="sdpa"
            )
    else:
        model = AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=dtype, attn_implementation="sdpa"
        ).to(device)
    return model.eval()


def commit() -> str:
    """The git commit (short), or $KESTREL_COMMIT where the tree has no .git (device copies)."""
    if os.environ.get("KESTREL_COMMIT"):
        return os.environ["KESTREL_COMMIT"]
    try:
        return subprocess.check_output(
            ["git", "rev-parse", "--short", "HEAD"], text=True, stderr=subprocess.DEVNULL
        ).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def device_name() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return f"cpu ({platform.machine()})"


def print_table(title: str, header: list[str], rows: list[list[Any]]) -> None:
    cells = [[str(h) for h in header]] + [
        [f"{v:.2f}" if isinstance(v, float) else str(v) for v in row] for row in rows
    ]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    print(f"\n{title}")
    for k, r in enumerate(cells):
        print("  ".join(c.rjust(w) for c, w in zip(r, widths)))
        if k == 0:
            print("  ".join("-" * w for w in widths))


def write_json(path: str | None, payload: dict[str, Any]) -> None:
    if path:
        Path(path).write_text(json.dumps(payload, indent=2))


def bar_chart(
    path: str | None, title: str, labels: list[str], values: list[float], ylabel: str
) -> None:
    """A PNG bar chart when matplotlib is installed (else a note); e.g. Kestrel vs transformers."""
    if not path:
        return
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"(matplotlib not installed: no chart written to {path})")
        return
    fig, ax = plt.subplots(figsize=(5, 3.5))
    bars = ax.bar(labels, values, color=["#1f77b4", "#ff7f0e", "#2ca02c"][: len(values)])
    ax.bar_label(bars, fmt="%.1f")
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(
    benchmark: str,
    args,
    results: dict[str, dict[str, Any]],
    metric: str,
    ylabel: str,
    chart_title: str,
) -> None:
    """The JSON record (device, commit, args, results) and the Kestrel-vs-baseline chart."""
    write_json(
        args.json,
        {
            "benchmark": benchmark,
            "model": args.model,
            "device": device_name(),
            "commit": commit(),
            "args": vars(args),
            "results": results,
        },
    )
    bar_chart(args.png, chart_title, list(results), [r[metric] for r in results.values()], ylabel)


# The benchmarks' defaults where they differ from EngineConfig's.
ENGINE_DEFAULTS: dict[str, Any] = {"dtype": "bfloat16"}


def engine_arg_parser(
    description: str, default_model: str = "qwen2.5-7b", *, skip: tuple[str, ...] = ()
) -> argparse.ArgumentParser:
    """The flags every Kestrel-vs-transformers script shares (scripts add their workload's):
    --model (a preset or a dir), --compare-hf, --json, --png, and one flag per EngineConfig
    field, as `kestrel serve` has them. `skip`: engine fields a script sets from its own
    workload flags (e.g. max_num_seqs from --batch-size); see engine_kwargs."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument(
        "--model",
        default=default_model,
        help=f"a preset shape with random weights ({', '.join(SHAPES)}) or a model dir",
    )
    ap.add_argument("--compare-hf", action="store_true")
    ap.add_argument(
        "--compare-unquantized",
        action="store_true",
        help="with --quantization fp8: also run Kestrel without it (same flags otherwise), in "
        "the same run, as a row of its own",
    )
    ap.add_argument("--json")
    ap.add_argument("--png")
    engine = ap.add_argument_group("engine", "kestrel.EngineConfig's fields")
    add_dataclass_arguments(engine, EngineConfig, skip=("model", *skip))
    ap.set_defaults(**ENGINE_DEFAULTS)
    return ap


def engine_kwargs(args: argparse.Namespace, dummy: bool, **workload: Any) -> dict[str, Any]:
    """LLM(...) keyword arguments from the parsed engine flags (not --model: scripts pass the
    model dir), load_format "dummy" for a preset shape (its dir holds only config.json), and
    `workload` values for fields the flags leave unset (None) or that the script skipped."""
    kwargs = namespace_kwargs(EngineConfig, args, skip=("model",))
    for name, value in workload.items():
        if kwargs.get(name) is None:
            kwargs[name] = value
    if dummy:
        kwargs["load_format"] = "dummy"
    return kwargs


def _quantized(args: argparse.Namespace) -> bool:
    return getattr(args, "quantization", None) not in (None, "gguf")


def kestrel_label(args: argparse.Namespace) -> str:
    """The row name of Kestrel's run: "kestrel", or "kestrel fp8" under --quantization fp8."""
    return f"kestrel {args.quantization}" if _quantized(args) else "kestrel"


def _release_gpu() -> None:
    import torch

    gc.collect()  # the previous engine (KV cache, graph pools) must be gone first
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_both(
    kestrel: Callable[[argparse.Namespace], dict],
    transformers: Callable[[], dict] | None,
    args: argparse.Namespace,
) -> dict[str, dict]:
    """Kestrel's run on `args`; with --compare-unquantized under --quantization, Kestrel again
    without the quantization (row "kestrel <dtype>"); then (when given) transformers' run. Each
    run starts once the previous engine is released."""
    results = {kestrel_label(args): kestrel(args)}
    if getattr(args, "compare_unquantized", False) and _quantized(args):
        _release_gpu()
        plain = argparse.Namespace(**{**vars(args), "quantization": None})
        results[f"kestrel {args.dtype}"] = kestrel(plain)
    if transformers is not None:
        _release_gpu()
        results["transformers"] = transformers()
    return results
