"""EngineConfig is the one source of the engine's flags (issue 11, item 5): every field has a
documented `kestrel serve` flag and a benchmark flag derived by kestrel.config_args, defaults
and values round-trip into EngineConfig, and LLM(**kwargs) rejects unknown keys by name."""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from kestrel.config import ConfigError, EngineConfig, setting
from kestrel.config_args import add_dataclass_arguments, dataclass_from_namespace, flag_name
from kestrel_server.cli import add_serve_parser, engine_config, parse_args

ROOT = Path(__file__).resolve().parents[2]
ENGINE_FIELDS = [f for f in dataclasses.fields(EngineConfig) if f.name != "model"]
# A value other than the default for every field but `model`; a new field must be added here
# (test_non_defaults_cover_every_field), so that the round trip covers it too.
NON_DEFAULTS: dict[str, Any] = {
    "revision": "v1.0",
    "tokenizer": "some/tokenizer",
    "dtype": "float16",
    "device": "cpu",
    "max_model_len": 128,
    "block_size": 8,
    "num_kv_blocks": 64,
    "kv_cache_dtype": "fp8",
    "kv_cache_memory_gib": 0.5,
    "gpu_memory_utilization": 0.5,
    "max_num_seqs": 3,
    "tensor_parallel_size": 2,
    "pipeline_parallel_size": 2,
    "max_num_batched_tokens": 64,
    "enable_prefix_caching": False,
    "enable_chunked_prefill": False,
    "scheduling_policy": "priority",
    "seed": 9,
    "load_format": "dummy",
    "quantization": "fp8",
    "enforce_eager": True,
    "piecewise_graph_max_tokens": 512,
    "async_scheduling": False,
    "speculative_config": '{"method": "ngram", "num_speculative_tokens": 3}',
    "generation_config": "vllm",
    "disable_log_stats": True,
    "max_grammar_chars": 4096,
}
# Python < 3.13's BooleanOptionalAction appends this to the help it is given.
_BOOL_SUFFIX = " (default: %(default)s)"


def _serve_parser() -> argparse.ArgumentParser:
    return add_serve_parser(argparse.ArgumentParser(prog="kestrel").add_subparsers())


def _actions_by_dest(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {a.dest: a for a in parser._actions}


def _load_benchmarks_common() -> ModuleType:
    """benchmarks/common.py under a name of its own (the scripts import it as `common`)."""
    spec = importlib.util.spec_from_file_location(
        "kestrel_benchmarks_common", ROOT / "benchmarks" / "common.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _argv(name: str, value: Any) -> list[str]:
    """The flags that set field `name` to `value` (bools: the flag or its --no- form)."""
    flag = flag_name(name)
    if isinstance(value, bool):
        return [flag if value else "--no-" + flag[2:]]
    return [flag, str(value)]


def test_every_field_is_documented():
    for f in dataclasses.fields(EngineConfig):
        assert isinstance(f.metadata.get("help"), str) and f.metadata["help"].strip(), f.name


def test_every_engine_field_has_a_serve_flag():
    actions = _actions_by_dest(_serve_parser())
    for f in ENGINE_FIELDS:
        assert f.name in actions, f.name
        assert flag_name(f.name) in actions[f.name].option_strings, f.name
    assert actions["model"].option_strings == []  # MODEL stays positional


def test_bool_flags_keep_their_spellings():
    actions = _actions_by_dest(_serve_parser())
    for name, default in (("enable_prefix_caching", True), ("enable_chunked_prefill", True)):
        flag = flag_name(name)
        assert actions[name].option_strings == [flag, "--no-" + flag[2:]]
        assert actions[name].default is default
    assert actions["enforce_eager"].option_strings == ["--enforce-eager"]
    assert actions["enforce_eager"].nargs == 0 and actions["enforce_eager"].default is False


def test_flag_help_is_the_field_help():
    actions = _actions_by_dest(_serve_parser())
    for f in ENGINE_FIELDS:
        assert actions[f.name].help.removesuffix(_BOOL_SUFFIX) == f.metadata["help"], f.name


def test_flag_choices_are_the_field_choices():
    actions = _actions_by_dest(_serve_parser())
    with_choices = [f for f in ENGINE_FIELDS if "choices" in f.metadata]
    assert {f.name for f in with_choices} >= {"dtype", "device", "load_format", "block_size"}
    for f in ENGINE_FIELDS:
        choices = f.metadata.get("choices")
        if choices is not None:  # None (the "off" default) is not typed on a command line
            choices = tuple(c for c in choices if c is not None)
        assert actions[f.name].choices == choices, f.name


@pytest.mark.parametrize(
    "f", [f for f in ENGINE_FIELDS if "choices" in f.metadata], ids=lambda f: f.name
)
def test_engine_config_rejects_a_value_outside_the_choices(f):
    with pytest.raises(ConfigError) as info:
        EngineConfig(**{f.name: "not-a-choice"})
    assert info.value.field == f.name and "not-a-choice" in str(info.value)


def test_default_flags_give_the_default_config():
    args = parse_args(["serve"])
    assert engine_config(args) == EngineConfig()
    for f in ENGINE_FIELDS:
        assert getattr(args, f.name) == f.default, f.name  # before __post_init__ fills any


def test_non_defaults_cover_every_field():
    assert set(NON_DEFAULTS) == {f.name for f in ENGINE_FIELDS}
    for f in ENGINE_FIELDS:
        assert NON_DEFAULTS[f.name] != f.default, f.name


def test_round_trip_of_non_default_values():
    argv = ["serve", "some/model"]
    for name, value in NON_DEFAULTS.items():
        argv += _argv(name, value)
    config = engine_config(parse_args(argv))
    assert config == EngineConfig(model="some/model", **NON_DEFAULTS)
    assert dataclasses.asdict(config) == {"model": "some/model", **NON_DEFAULTS}


@pytest.mark.parametrize(
    ("alias", "dtype"),
    [("half", "float16"), ("fp16", "float16"), ("bf16", "bfloat16"), ("float", "float32")],
)
def test_vllm_dtype_aliases(alias, dtype):
    assert engine_config(parse_args(["serve", "--dtype", alias])).dtype == dtype


def test_llm_rejects_an_unknown_keyword_by_name():
    from kestrel import LLM

    with pytest.raises(TypeError) as info:
        LLM(bogus=1)
    message = str(info.value)
    assert "'bogus'" in message
    for f in ENGINE_FIELDS:
        assert f.name in message, f.name  # the allowed keywords are listed
    with pytest.raises(TypeError, match="'also_bad', 'bogus'"):
        LLM("some/model", max_num_seqs=2, bogus=1, also_bad=2)


# --- benchmarks/common.py ---------------------------------------------------------------


def test_benchmark_parser_has_the_same_engine_flags():
    common = _load_benchmarks_common()
    bench = _actions_by_dest(common.engine_arg_parser("test"))
    serve = _actions_by_dest(_serve_parser())
    for f in ENGINE_FIELDS:
        assert bench[f.name].option_strings == serve[f.name].option_strings, f.name
        assert bench[f.name].help == serve[f.name].help, f.name
    for flag in ("--model", "--compare-hf", "--json", "--png"):
        assert any(flag in a.option_strings for a in bench.values()), flag


def test_benchmark_defaults_and_engine_kwargs():
    common = _load_benchmarks_common()
    args = common.engine_arg_parser("test").parse_args([])
    assert args.model == "qwen2.5-7b" and args.dtype == "bfloat16" and args.enforce_eager is False
    assert args.compare_hf is False and args.json is None and args.png is None
    kwargs = common.engine_kwargs(args, True, max_model_len=300)
    assert "model" not in kwargs and kwargs["load_format"] == "dummy"
    assert kwargs["max_model_len"] == 300
    assert EngineConfig(**kwargs) == EngineConfig(
        dtype="bfloat16", load_format="dummy", max_model_len=300
    )
    args = common.engine_arg_parser("test").parse_args(["--max-model-len", "64", "--seed", "3"])
    kwargs = common.engine_kwargs(args, False, max_model_len=300)
    assert (kwargs["max_model_len"], kwargs["seed"], kwargs["load_format"]) == (64, 3, "auto")


def test_benchmark_script_can_skip_an_engine_flag():
    common = _load_benchmarks_common()
    ap = common.engine_arg_parser("test", skip=("max_num_seqs",))
    ap.add_argument("--batch-size", type=int, default=2)
    args = ap.parse_args([])
    assert not hasattr(args, "max_num_seqs")
    assert common.engine_kwargs(args, True, max_num_seqs=args.batch_size)["max_num_seqs"] == 2


def test_benchmark_fp8_row_and_its_unquantized_twin():
    common = _load_benchmarks_common()
    ap = common.engine_arg_parser("test")
    seen = []

    def kestrel(run_args):
        seen.append(run_args.quantization)
        return {"tpot_ms": 1.0}

    args = ap.parse_args(["--quantization", "fp8", "--compare-unquantized"])
    assert common.engine_kwargs(args, True)["quantization"] == "fp8"
    results = common.run_both(kestrel, None, args)
    assert list(results) == ["kestrel fp8", "kestrel bfloat16"] and seen == ["fp8", None]
    seen.clear()
    assert list(common.run_both(kestrel, None, ap.parse_args([]))) == ["kestrel"]
    assert seen == [None]


@pytest.mark.parametrize("script", ["latency.py", "offline_throughput.py"])
def test_benchmark_scripts_build_their_parsers(script):
    """No flag of a script clashes with an engine flag (argparse would refuse to start)."""
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert "--max-model-len" in out.stdout and "--enforce-eager" in out.stdout
    assert "--quantization" in out.stdout and "--compare-unquantized" in out.stdout


# --- kestrel.config_args on its own -------------------------------------------------------


@dataclasses.dataclass
class _Toy:
    count: int = setting(2, "how many")
    ratio: float | None = setting(None, "a ratio")
    mode: str = setting("a", "the mode", choices=("a", "b"))
    on: bool = setting(True, "switch on")
    off: bool = setting(False, "switch off")


def test_toy_dataclass_flags():
    parser = argparse.ArgumentParser()
    actions = add_dataclass_arguments(
        parser, _Toy, rename={"count": "--n"}, value_aliases={"mode": {"B": "b"}}
    )
    assert list(actions) == ["count", "ratio", "mode", "on", "off"]
    assert dataclass_from_namespace(_Toy, parser.parse_args([])) == _Toy()
    args = parser.parse_args(["--n", "5", "--ratio", "0.5", "--mode", "B", "--no-on", "--off"])
    assert dataclass_from_namespace(_Toy, args) == _Toy(5, 0.5, "b", False, True)
    assert dataclass_from_namespace(_Toy, args, count=7).count == 7


@pytest.mark.parametrize(
    "argv", [["--n", "x"], ["--mode", "c"], ["--ratio", "high"], ["--count", "1"]]
)
def test_toy_dataclass_bad_values_are_usage_errors(argv):
    parser = argparse.ArgumentParser()
    add_dataclass_arguments(parser, _Toy, rename={"count": "--n"})
    with pytest.raises(SystemExit) as info:
        parser.parse_args(argv)
    assert info.value.code == 2


def test_a_field_without_help_is_refused():
    @dataclasses.dataclass
    class Undocumented:
        x: int = 1

    with pytest.raises(TypeError, match=r"Undocumented\.x has no help"):
        add_dataclass_arguments(argparse.ArgumentParser(), Undocumented)


def test_an_unsupported_annotation_is_refused():
    @dataclasses.dataclass
    class Listy:
        xs: list[int] = dataclasses.field(default_factory=list, metadata={"help": "xs"})

    with pytest.raises(TypeError, match=r"Listy\.xs: no flag"):
        add_dataclass_arguments(argparse.ArgumentParser(), Listy)
