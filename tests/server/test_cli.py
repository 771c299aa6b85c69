"""`kestrel --help`, `kestrel serve --help` and the flag -> EngineConfig mapping."""

from __future__ import annotations

import subprocess
import sys

import pytest

from kestrel_server.cli import build_parser, engine_config, main, resolve_api_key

SERVE_FLAGS = (
    "--host", "--port", "--served-model-name", "--api-key", "--dtype", "--max-model-len",
    "--max-num-seqs", "--max-num-batched-tokens", "--gpu-memory-utilization", "--block-size",
    "--enable-prefix-caching", "--no-enable-prefix-caching", "--load-format",
    "--max-queued-requests", "--chat-template", "--enforce-eager", "--seed", "--log-level",
    "--num-kv-blocks", "--scheduling-policy", "--enable-chunked-prefill",
    "--no-enable-chunked-prefill", "--tokenizer", "--device", "--kv-cache-memory-gib",
)  # fmt: skip


def test_serve_help_lists_every_flag(capsys):
    with pytest.raises(SystemExit) as info:
        main(["serve", "--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    for flag in SERVE_FLAGS:
        assert flag in text, flag
    assert "127.0.0.1" in text  # the host default is shown


def test_top_level_help_runs_as_a_script():
    out = subprocess.run(
        [sys.executable, "-m", "kestrel_server.cli", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0 and "serve" in out.stdout


def test_flags_map_onto_engine_config(tiny_model):
    args = build_parser().parse_args(
        [
            "serve", tiny_model, "--dtype", "half", "--max-model-len", "128",
            "--max-num-seqs", "3", "--max-num-batched-tokens", "64", "--block-size", "8",
            "--no-enable-prefix-caching", "--gpu-memory-utilization", "0.5", "--seed", "9",
            "--enforce-eager", "--load-format", "dummy",
        ]
    )  # fmt: skip
    config = engine_config(args)
    assert (config.model, config.dtype, config.max_model_len) == (tiny_model, "float16", 128)
    assert (config.max_num_seqs, config.max_num_batched_tokens, config.block_size) == (3, 64, 8)
    assert config.enable_prefix_caching is False and config.enforce_eager is True
    assert (config.gpu_memory_utilization, config.seed, config.load_format) == (0.5, 9, "dummy")
    defaults = build_parser().parse_args(["serve"])
    assert defaults.model is None and defaults.host == "127.0.0.1" and defaults.port == 8000
    assert defaults.enable_prefix_caching is True


def test_api_key_from_environment_and_never_in_help(monkeypatch, capsys):
    monkeypatch.setenv("KESTREL_API_KEY", "from-env")
    assert resolve_api_key(build_parser().parse_args(["serve", "m"])) == "from-env"
    assert resolve_api_key(build_parser().parse_args(["serve", "m", "--api-key", "x"])) == "x"
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    assert "from-env" not in capsys.readouterr().out
    monkeypatch.delenv("KESTREL_API_KEY")
    assert resolve_api_key(build_parser().parse_args(["serve", "m"])) is None


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["serve", "m", "--max-num-seqs", "0"], "--max-num-seqs"),
        (["serve", "m", "--port", "70000"], "--port"),
        (["serve", "m", "--log-level", "loud"], "--log-level"),
        # Checked by EngineConfig, reported by the CLI under the flag's name:
        (["serve", "m", "--gpu-memory-utilization", "1.5"], "--gpu-memory-utilization"),
        (["serve", "m", "--num-kv-blocks", "0"], "--num-kv-blocks"),
        (["serve", "m", "--max-model-len", "1"], "--max-model-len"),
        (["serve", ""], "MODEL"),
        # A closed set (EngineConfig's metadata "choices"), checked by argparse:
        (["serve", "m", "--block-size", "3"], "--block-size"),
        (["serve", "m", "--scheduling-policy", "lifo"], "--scheduling-policy"),
    ],
)
def test_bad_flag_values_exit_with_usage_error(argv, needle, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    assert needle in capsys.readouterr().err


def test_bad_engine_value_is_a_clear_error(tiny_model, capsys):
    with pytest.raises(SystemExit) as info:
        main(["serve", tiny_model, "--dtype", "int3"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "kestrel serve: error:" in err and "dtype" in err and "int3" in err
