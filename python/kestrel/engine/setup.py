"""What an engine (or a front end that only needs the tokenizer) sets up before it runs:
the device (and whether it can run the model's FP8 layers), the tokenizer and the default
sampling parameters."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from kestrel.config import EngineConfig
from kestrel.layers.fp8 import require_fp8_device
from kestrel.layers.quant_config import fp8_config_for
from kestrel.loader import read_generation_config, read_model_config
from kestrel.loader.gguf_loader import GGUFFile
from kestrel.loader.gguf_tokenizer import load_gguf_tokenizer
from kestrel.model_config import ModelConfig
from kestrel.model_source import ModelSource
from kestrel.tokenizer import Tokenizer

logger = logging.getLogger(__name__)


def sampling_defaults(setting: str, model_generation_config: dict) -> dict:
    """The generation config the default sampling parameters come from (`--generation-config`):
    "auto" the model's, "vllm" none (SamplingParams' own defaults), else the
    generation_config.json in that folder (which must exist). The model's EOS ids are used in
    every case."""
    if setting == "auto":
        return model_generation_config
    if setting == "vllm":
        return {}
    folder = Path(setting).expanduser()
    if not (folder / "generation_config.json").is_file():
        raise ValueError(
            f"generation_config = {setting!r} is invalid; allowed: auto, vllm, or a folder "
            "holding a generation_config.json"
        )
    return read_generation_config(folder)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' was asked for but no CUDA GPU is available")
    return torch.device(name)


def check_quantization_device(
    config: EngineConfig, source: ModelSource, device: torch.device
) -> None:
    """FP8 linear layers (asked for, or declared by the checkpoint) need a GPU built for them:
    refused here, before any weight is read."""
    if source.is_gguf:
        fp8 = config.quantization == "fp8"  # GGUF metadata declares no FP8
    else:
        hf_config = read_model_config(source.path).hf_config
        fp8 = fp8_config_for(hf_config, config.quantization) is not None
    if fp8:
        require_fp8_device(device)


def load_tokenizer(
    config: EngineConfig, source: ModelSource, gguf_file: GGUFFile | None = None
) -> Tokenizer | None:
    """The tokenizer of `config` (its `tokenizer` path, else the model's own), without loading
    the model: a front end process needs only this. None when a model directory has no
    tokenizer.json (then only token-id prompts are accepted)."""
    path = Path(config.tokenizer) if config.tokenizer is not None else source.path
    if path.suffix.lower() == ".gguf":
        if gguf_file is None or config.tokenizer is not None:
            gguf_file = GGUFFile(path)
        return load_gguf_tokenizer(gguf_file)
    if config.tokenizer is None and not (path / "tokenizer.json").is_file():
        logger.warning("%s has no tokenizer.json: only token-id prompts are accepted", path)
        return None
    return Tokenizer.from_dir(path)


def as_id_list(value: object) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value]  # type: ignore[union-attr]


def build_executor(config: EngineConfig, runner, tp_world, max_model_len: int, drafter=None):
    """The engine's executor over its rank-0 `runner` (a MultiProcExecutor when `tp_world`
    holds tensor-parallel workers: their shards checked against rank 0's model, the KV cache
    sized as the minimum over the ranks) with the KV cache allocated; returns (executor,
    num_blocks). `drafter`: a DraftRunner whose KV cache shares the target's block ids (its
    bytes per block count too; single process only)."""
    from kestrel.executor import UniProcExecutor
    from kestrel.runner.memory import _GRAPH_RESERVE_BYTES, plan_num_kv_blocks

    if tp_world is None:
        extra, reserved = 0, 0
        if drafter is not None:
            extra, reserved = drafter.block_bytes(), drafter.scratch_bytes()
            if runner.device.type == "cuda" and not config.enforce_eager:
                reserved += _GRAPH_RESERVE_BYTES  # the draft's decode graphs
        num_blocks = plan_num_kv_blocks(config, runner, max_model_len, extra, reserved)
        runner.allocate_kv_cache(num_blocks)
        if drafter is not None:
            drafter.allocate_kv_cache(num_blocks)
        return UniProcExecutor(runner), num_blocks
    if drafter is not None:
        raise ValueError("a draft model runs in a single process only (tp = pp = 1)")
    from kestrel.executor.multiproc import MultiProcExecutor

    executor = MultiProcExecutor(runner, tp_world)
    try:
        executor.check_workers(runner.model_config)
        num_blocks = executor.plan_num_kv_blocks(config, max_model_len)
        executor.allocate_kv_cache(num_blocks)
    except BaseException:
        executor.shutdown()
        raise
    return executor, num_blocks


def load_engine_model(
    config: EngineConfig,
    source: ModelSource,
    device: torch.device,
    tp_group,
    pp_stage=None,
) -> tuple[torch.nn.Module, ModelConfig, Tokenizer | None, dict]:
    """This rank's model (its shard under tensor parallelism, `tp_group`), its config, the
    tokenizer and the generation defaults (a GGUF file is parsed once for all of them)."""
    from kestrel.loader import load_model
    from kestrel.loader.gguf_loader import gguf_generation_config, load_gguf_model

    stage = {} if pp_stage is None else {"pp_stage": pp_stage}
    if not source.is_gguf:
        model, model_config = load_model(
            source.path,
            config.dtype,
            device,
            config.load_format,
            seed=config.seed,
            quantization=config.quantization,
            tp_group=tp_group,
            **stage,
        )
        return (
            model,
            model_config,
            load_tokenizer(config, source),
            read_generation_config(source.path),
        )
    path = source.path
    if config.load_format not in ("auto", "gguf", "dummy"):
        raise ValueError(
            f"load_format={config.load_format!r} cannot read the GGUF file {path}; "
            "use auto, gguf or dummy"
        )
    gguf_file = GGUFFile(path)
    model, model_config = load_gguf_model(
        gguf_file,
        config.dtype,
        device,
        dummy=config.load_format == "dummy",
        seed=config.seed,
        quantization=config.quantization,
        tp_group=tp_group,
        **stage,
    )
    tokenizer = load_tokenizer(config, source, gguf_file)
    return model, model_config, tokenizer, gguf_generation_config(gguf_file)


def load_draft_runner(
    config: EngineConfig,
    spec,
    device: torch.device,
    target_config: ModelConfig,
    target_tokenizer: Tokenizer | None,
    max_model_len: int,
):
    """The draft model of `spec` (a SpeculativeConfig of method "draft_model") in a
    DraftRunner: loaded like the target (dtype, seed; dummy weights for a dummy target, no
    quantization), and refused unless its vocabulary fits the target's (see
    `check_draft_vocab`) and its context covers max_model_len."""
    import dataclasses

    from kestrel.layers.parallel import SINGLE_RANK
    from kestrel.model_source import resolve_model
    from kestrel.runner.model_runner import ModelRunner
    from kestrel.spec.draft_runner import DraftRunner

    # Dummy weights for a dummy target (benchmarks); else the draft's own format.
    load_format = "dummy" if config.load_format == "dummy" else "auto"
    draft_config = dataclasses.replace(
        config, model=spec.model, revision=None, tokenizer=None, quantization=None,
        speculative_config=None, tensor_parallel_size=1, pipeline_parallel_size=1,
        load_format=load_format,
    )  # fmt: skip
    source = resolve_model(spec.model)
    model, draft_mc, _, _ = load_engine_model(draft_config, source, device, SINGLE_RANK)
    check_draft_vocab(draft_mc.vocab_size, target_config.vocab_size, target_tokenizer)
    if draft_mc.max_position_embeddings < max_model_len:
        raise ValueError(
            f"speculative_config model {spec.model!r} has max_position_embeddings="
            f"{draft_mc.max_position_embeddings} < max_model_len={max_model_len}; allowed: a "
            "draft whose context covers max_model_len (or lower max_model_len)"
        )
    runner = ModelRunner(
        model,
        draft_mc,
        device=device,
        dtype=next(model.parameters()).dtype,
        block_size=config.block_size,
        seed=config.seed,
        max_num_seqs=config.max_num_seqs,
    )
    logger.info(
        "draft model: %s (%s, %d layers) proposes %d tokens per step",
        spec.model,
        draft_mc.architecture,
        draft_mc.num_hidden_layers,
        spec.num_speculative_tokens,
    )
    return DraftRunner(
        runner, spec.num_speculative_tokens, config.max_num_seqs, config.max_num_batched_tokens
    )


def check_draft_parallelism(spec, config: EngineConfig) -> None:
    """A draft model runs with one process only (not built for tensor / pipeline parallelism):
    refused before any worker starts."""
    if spec.method != "draft_model":
        return
    tp, pp = config.tensor_parallel_size, config.pipeline_parallel_size
    if tp != 1 or pp != 1:
        raise ValueError(
            f"speculative_config method 'draft_model' with tensor_parallel_size={tp}, "
            f"pipeline_parallel_size={pp} is not supported (not built yet); allowed: both 1, "
            "or method 'ngram'"
        )


def check_draft_vocab(draft_vocab: int, target_vocab: int, target_tokenizer) -> None:
    """The draft must propose only ids the target has, and every token of the target's
    tokenizer: equal vocab sizes, or a draft no larger than the target that still covers the
    tokenizer (checkpoints pad their embeddings differently: Qwen2.5-7B has 152064 rows,
    0.5B 151936, one tokenizer of 151665 tokens)."""
    if draft_vocab == target_vocab:
        return
    tokens = len(target_tokenizer) if target_tokenizer is not None else None
    if tokens is not None and tokens <= draft_vocab < target_vocab:
        return
    have = f" (the target's tokenizer has {tokens} tokens)" if tokens is not None else ""
    raise ValueError(
        f"speculative_config model has vocab_size={draft_vocab}, the target {target_vocab}"
        f"{have}; allowed: a draft with the target's vocabulary (the same vocab_size, or one "
        "between the tokenizer's size and the target's)"
    )


def peek_model_config(config: EngineConfig, source: ModelSource) -> ModelConfig:
    """The model's config without its weights (config.json, or the GGUF file's metadata)."""
    if source.is_gguf:
        from kestrel.loader.gguf_loader import gguf_model_config

        return gguf_model_config(GGUFFile(source.path))
    return read_model_config(source.path)
