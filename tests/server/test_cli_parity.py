"""CLI parity with `vllm serve` (issue 13, item 5): vLLM's flags parse, flags of features not
built yet fail with exit 2 naming the feature, `--config FILE.yaml` with command-line flags
winning, a port in use is reported before the model loads, CORS / root path / TLS /
--max-logprobs on a real server, and the `chat`, `complete` and `bench` subcommands."""

from __future__ import annotations

import contextlib
import io
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from kestrel_server.cli import main, parse_args
from kestrel_server.client_cli import run_chat, run_complete
from tests.server.harness import MAX_MODEL_LEN, MODEL_NAME, free_port

# Flags users copy from vLLM command lines, with values Kestrel accepts.
VLLM_LINES = [
    ["--model", "m", "-tp", "1", "--pipeline-parallel-size", "1"],
    ["m", "--tensor-parallel-size", "1", "--kv-cache-dtype", "auto", "--quantization", "gguf"],
    ["m", "--enable-chunked-prefill", "--max-logprobs", "5", "--generation-config", "vllm"],
    ["m", "--revision", "main", "--uvicorn-log-level", "warning", "--disable-log-requests"],
    ["m", "--disable-log-stats", "--allowed-origins", '["*"]', "--root-path", "/api"],
    ["m", "--ssl-keyfile", "k.pem", "--ssl-certfile", "c.pem", "--enable-log-requests"],
    ["m", "--speculative-config", '{"method": "ngram", "num_speculative_tokens": 4}'],
]


@pytest.mark.parametrize("argv", VLLM_LINES, ids=lambda a: a[1] if a[0] == "m" else a[0])
def test_vllm_flags_parse(argv):
    args = parse_args(["serve", *argv])
    assert args.model == "m"


def test_flag_of_a_feature_not_built_yet_exits_2_naming_it(capsys, monkeypatch):
    # No vllm flag waits for its feature now; the mechanism is kept for the next one.
    from kestrel_server import serve_flags

    monkeypatch.setitem(serve_flags.NOT_BUILT, "kv_cache_dtype", ("a feature X", ("auto",)))
    with pytest.raises(SystemExit) as info:
        main(["serve", "m", "--kv-cache-dtype", "fp8"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "a feature X" in err and "not built yet" in err, err
    assert "unrecognized" not in err


@pytest.mark.parametrize("value", ["auto", "fp8", "fp8_e4m3"])
def test_kv_cache_dtype_flag(value):
    args = parse_args(["serve", "m", "--kv-cache-dtype", value])
    assert args.kv_cache_dtype == value


def test_bad_kv_cache_dtype_exits_2_naming_the_choices(capsys):
    with pytest.raises(SystemExit) as info:
        parse_args(["serve", "m", "--kv-cache-dtype", "fp16"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "fp16" in err and "fp8_e4m3" in err, err


@pytest.mark.parametrize(
    ("argv", "field"),
    [
        (["-tp", "2"], "tensor_parallel_size"),
        (["--tensor-parallel-size", "2"], "tensor_parallel_size"),
        (["-pp", "2"], "pipeline_parallel_size"),
        (["--pipeline-parallel-size", "2"], "pipeline_parallel_size"),
    ],
)
def test_parallel_sizes_reach_the_engine_config(argv, field):
    from kestrel_server.cli import engine_config

    assert getattr(engine_config(parse_args(["serve", "m", *argv])), field) == 2
    assert getattr(engine_config(parse_args(["serve", "m"])), field) == 1


@pytest.mark.parametrize("argv", [["--quantization", "fp8"], ["-q", "fp8"]])
def test_quantization_flag_reaches_the_engine_config(argv):
    from kestrel_server.cli import engine_config

    assert engine_config(parse_args(["serve", "m", *argv])).quantization == "fp8"
    assert engine_config(parse_args(["serve", "m"])).quantization is None


def test_quantization_method_not_built_exits_2_naming_the_allowed_ones(capsys):
    with pytest.raises(SystemExit) as info:
        main(["serve", "m", "--quantization", "awq"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "--quantization" in err and "'awq'" in err and "fp8" in err, err


def test_a_speculative_method_not_built_exits_2_naming_the_allowed_ones(capsys):
    with pytest.raises(SystemExit) as info:
        main(["serve", "m", "--speculative-config", '{"method": "eagle"}'])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "--speculative-config" in err and "allowed: ['ngram', 'draft_model']" in err, err


def test_model_flag_and_positional_must_agree(capsys):
    assert parse_args(["serve", "--model", "a"]).model == "a"
    assert parse_args(["serve", "a", "--model", "a"]).model == "a"
    with pytest.raises(SystemExit) as info:
        parse_args(["serve", "a", "--model", "b"])
    assert info.value.code == 2 and "disagree" in capsys.readouterr().err


def test_max_logprobs_beyond_the_built_limit_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as info:
        parse_args(["serve", "--max-logprobs", "21"])
    assert info.value.code == 2 and "--max-logprobs" in capsys.readouterr().err


def test_config_file_sets_flags_and_the_command_line_wins(tmp_path):
    cfg = tmp_path / "serve.yaml"
    cfg.write_text(
        "model: from-file\n"
        "port: 9001\n"
        "max-num-seqs: 7\n"
        "max_model_len: 128\n"
        "enable-prefix-caching: false\n"
        "enforce-eager: true\n"
        "served-model-name: [a, b]\n"
        "allowed-origins: ['https://x.example']\n"
    )
    args = parse_args(["serve", "--config", str(cfg), "--port", "9002"])
    assert args.model == "from-file" and args.port == 9002
    assert (args.max_num_seqs, args.max_model_len) == (7, 128)
    assert args.enable_prefix_caching is False and args.enforce_eager is True
    assert args.served_model_name == ["a", "b"]
    assert args.allowed_origins == ["https://x.example"]
    # A positional MODEL wins over the file's.
    assert parse_args(["serve", "cli-model", f"--config={cfg}"]).model == "cli-model"


@pytest.mark.parametrize(
    ("text", "needle"),
    [("bogus-flag: 1\n", "'bogus-flag' is not a flag"), ("- a\n", "mapping"),
     ("enforce-eager: 3\n", "true or false")],
)  # fmt: skip
def test_bad_config_file_is_a_usage_error(tmp_path, capsys, text, needle):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(text)
    with pytest.raises(SystemExit) as info:
        parse_args(["serve", "--config", str(cfg)])
    assert info.value.code == 2
    assert needle in capsys.readouterr().err


def test_port_in_use_exits_2_before_the_model_loads(tiny_model):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        # A model that does not exist: had the check come after loading, the error would be
        # about the model.
        run = subprocess.run(
            [sys.executable, "-m", "kestrel_server.cli", "serve", "/no/such/model",
             "--port", str(port)],
            capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
    assert run.returncode == 2, run.stderr
    assert f"port {port} is already in use" in run.stderr


def _start(tiny_model: str, log: Path, *extra: str, scheme: str = "http"):
    port = free_port()
    cmd = [
        sys.executable, "-m", "kestrel_server.cli", "serve", tiny_model, "--port", str(port),
        "--served-model-name", MODEL_NAME, "--max-model-len", str(MAX_MODEL_LEN),
        "--log-level", "info", *extra,
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT)
    url = f"{scheme}://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(log.read_text())
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url + "/health", timeout=2, verify=False).status_code == 200:
                return proc, url
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError(log.read_text())


def _stop(proc) -> None:
    proc.terminate()
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()


def test_http_flags_on_a_real_server(tiny_model, tmp_path):
    log = tmp_path / "server.log"
    cfg = tmp_path / "serve.yaml"
    cfg.write_text("max-logprobs: 2\nenable-log-requests: true\nroot-path: /proxy\n")
    proc, url = _start(
        tiny_model, log, "--allowed-origins", "https://ui.example", "--config", str(cfg),
        "--uvicorn-log-level", "warning",
    )  # fmt: skip
    try:
        pre = httpx.options(
            url + "/v1/chat/completions",
            headers={"Origin": "https://ui.example", "Access-Control-Request-Method": "POST"},
            timeout=30,
        )
        assert pre.status_code == 200
        assert pre.headers["access-control-allow-origin"] == "https://ui.example"
        other = httpx.get(url + "/v1/models", headers={"Origin": "https://evil.example"})
        assert "access-control-allow-origin" not in other.headers
        assert httpx.get(url + "/openapi.json").json()["servers"] == [{"url": "/proxy"}]
        body = {"model": MODEL_NAME, "prompt": "hi", "max_tokens": 2, "logprobs": 3}
        r = httpx.post(url + "/v1/completions", json=body, timeout=60)
        assert r.status_code == 400 and r.json()["error"]["param"] == "logprobs", r.text
        r = httpx.post(url + "/v1/completions", json={**body, "logprobs": 2}, timeout=60)
        assert r.status_code == 200, r.text
        out = io.StringIO()
        args = parse_args(["chat", "--url", url + "/v1", "--quick", "hi", "--max-tokens", "3"])
        assert run_chat(args, out=out) == 0 and out.getvalue().endswith("\n")
        out = io.StringIO()
        args = parse_args(["complete", "--url", url + "/v1", "--max-tokens", "3"])
        assert run_complete(args, stdin=io.StringIO("one\ntwo\n"), out=out) == 0
        assert out.getvalue().count("\n") == 2
    finally:
        _stop(proc)
    text = log.read_text()
    assert "request cmpl-" in text  # --enable-log-requests
    assert "serving on http://127.0.0.1" in text


def test_default_server_sends_no_cors_headers(server):
    r = httpx.get(server.url + "/v1/models", headers={"Origin": "https://ui.example"})
    assert "access-control-allow-origin" not in r.headers


def test_chat_client_reports_an_unreachable_server(capsys):
    args = parse_args(["chat", "--url", f"http://127.0.0.1:{free_port()}/v1", "-q", "hi"])
    assert run_chat(args) == 1
    assert "cannot reach" in capsys.readouterr().err


def test_tls(tiny_model, tmp_path):
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    made = subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key),
         "-out", str(cert), "-days", "1", "-subj", "/CN=127.0.0.1"],
        capture_output=True, check=False,
    )  # fmt: skip
    if made.returncode != 0:
        pytest.skip("openssl could not make a certificate")
    proc, url = _start(
        tiny_model, tmp_path / "tls.log", "--ssl-keyfile", str(key), "--ssl-certfile",
        str(cert), scheme="https",
    )  # fmt: skip
    try:
        assert httpx.get(url + "/v1/models", verify=False).status_code == 200
    finally:
        _stop(proc)


def test_tls_files_that_do_not_load_exit_2(tmp_path):
    run = subprocess.run(
        [sys.executable, "-m", "kestrel_server.cli", "serve", "/no/such/model",
         "--port", str(free_port()), "--ssl-keyfile", str(tmp_path / "k"),
         "--ssl-certfile", str(tmp_path / "c")],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert run.returncode == 2 and "--ssl-certfile" in run.stderr, run.stderr


ROOT = Path(__file__).resolve().parents[2]


def test_bench_runs_the_scripts(capsys):
    for name in ("latency", "throughput", "serve"):
        run = subprocess.run(
            [sys.executable, "-m", "kestrel_server.cli", "bench", name, "--help"],
            capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        assert run.returncode == 0, run.stderr
        assert "usage:" in run.stdout
    assert (ROOT / "benchmarks" / "latency.py").is_file()  # `python benchmarks/X.py` stays
