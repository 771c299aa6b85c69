"""The `kestrel` command. `kestrel serve [MODEL]` starts the OpenAI-compatible server; flag
names and meanings follow `vllm serve`."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

import kestrel
from kestrel.config import ConfigError, EngineConfig
from kestrel.config_args import add_dataclass_arguments, flag_name

# The server's own defaults live in ServerArgs. Importing it costs `kestrel --help` nothing
# today: the kestrel_server package (__init__) imports the app before any of its modules.
from kestrel_server.app import ServerArgs
from kestrel_server.bench_cli import add_bench_parser
from kestrel_server.client_cli import add_client_parsers
from kestrel_server.listen import check_tls, listen_or_explain
from kestrel_server.reasoning_parsers import REASONING_PARSERS
from kestrel_server.serve_flags import (
    ConfigFileError,
    add_serve_compat_arguments,
    expand_config_file,
    not_built_yet,
    resolve_model_flag,
)
from kestrel_server.serve_http import (
    engine_config,
    serve_http,
    setup_logging,
)
from kestrel_server.tool_parsers import TOOL_PARSERS

_LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
# vllm-serve spellings of dtypes -> EngineConfig's.
_DTYPE_ALIASES = {"half": "float16", "float": "float32", "bf16": "bfloat16", "fp16": "float16"}
# Default drain window: seconds in-flight requests may run on after SIGINT/SIGTERM.
DEFAULT_SHUTDOWN_TIMEOUT_S = 30.0
# Request limits' defaults (as vLLM's: VLLM_MAX_N_SEQUENCES, VLLM_MAX_COMPLETION_PROMPTS).
_SERVER_DEFAULTS = ServerArgs()


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is invalid; allowed: an int >= 1")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is invalid; allowed: an int >= 0")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not 0.0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"{value} is invalid; allowed: a finite float >= 0")
    return value


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{value} is invalid; allowed: 0..65535")
    return value


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: ...)" to a flag's help unless the help already says its default."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.help and "default" in action.help:
            return action.help
        return super()._get_help_string(action)


def add_serve_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "serve",
        help="start the OpenAI-compatible HTTP server",
        description="Start an OpenAI-compatible HTTP server (/v1/chat/completions, "
        "/v1/completions, /v1/models, /tokenize, /detokenize, /health, /version, /metrics).",
        formatter_class=_HelpFormatter,
    )
    p.add_argument(
        "model",
        nargs="?",
        default=None,
        help="model to serve: a Hugging Face model directory (config.json + safetensors + "
        "tokenizer.json), a .gguf file or a model id; omitted = Kestrel's default model",
    )
    net = p.add_argument_group("HTTP server")
    net.add_argument("--host", default="127.0.0.1", help="address to listen on")
    net.add_argument("--port", type=_port, default=8000, help="port to listen on")
    net.add_argument(
        "--served-model-name",
        nargs="+",
        default=None,
        help="model name(s) clients use in the 'model' field (the first is reported in "
        "responses); default: the MODEL argument",
    )
    net.add_argument(
        "--api-key",
        default=None,
        help="require 'Authorization: Bearer <key>' on every route but --public-paths; when "
        "not given, $KESTREL_API_KEY is used; neither = no key",
    )
    net.add_argument(
        "--public-paths",
        nargs="*",
        default=None,
        metavar="PATH",
        help="routes that need no API key (default: /health /version /metrics /openapi.json "
        "/docs /redoc); pass the flag with no paths to protect every route",
    )
    net.add_argument(
        "--chat-template",
        default=None,
        help="chat template (a file path or the Jinja text) used instead of the model's",
    )
    tools = p.add_argument_group("tool calling and reasoning (as vllm serve)")
    tools.add_argument(
        "--tool-call-parser",
        choices=sorted(TOOL_PARSERS),
        default=None,
        help="parse tool calls out of chat replies in this model family's format: hermes "
        "(Qwen2.5, Qwen3: <tool_call>...</tool_call>), llama3_json (Llama 3.x JSON), mistral "
        "([TOOL_CALLS])",
    )
    tools.add_argument(
        "--enable-auto-tool-choice",
        action="store_true",
        help='allow tool_choice "auto" (the default when a request has tools); needs '
        "--tool-call-parser",
    )
    tools.add_argument(
        "--reasoning-parser",
        choices=sorted(REASONING_PARSERS),
        default=None,
        help="split <think>...</think> reasoning off chat replies into reasoning_content "
        "(qwen3: when the reply opens <think>; deepseek_r1: up to </think>)",
    )
    net.add_argument(
        "--max-queued-requests",
        type=_non_negative_int,
        default=None,
        help="sequences (requests x n) allowed to wait beyond --max-num-seqs; more are refused "
        "with HTTP 503, a request that could never fit with 400 (default: unlimited)",
    )
    net.add_argument(
        "--max-n",
        type=_positive_int,
        default=_SERVER_DEFAULTS.max_n,
        help="most samples per prompt (n), and most sequences (prompts x n) per request",
    )
    net.add_argument(
        "--max-prompts",
        type=_positive_int,
        default=_SERVER_DEFAULTS.max_prompts,
        help="most prompts in one /v1/completions request",
    )
    net.add_argument(
        "--max-request-bytes",
        type=_positive_int,
        default=_SERVER_DEFAULTS.max_request_bytes,
        help="largest request body accepted; larger ones get HTTP 413",
    )
    net.add_argument(
        "--shutdown-timeout",
        type=_non_negative_float,
        default=DEFAULT_SHUTDOWN_TIMEOUT_S,
        help="seconds that running requests may go on after SIGINT/SIGTERM; streams still "
        "running then end with an error event and [DONE]",
    )
    net.add_argument(
        "--log-level", choices=_LOG_LEVELS, default="info", help="log level of server and engine"
    )
    net.add_argument(
        "--api-server-count",
        type=_positive_int,
        default=1,
        help="API server processes sharing the port in front of the one engine core process "
        "(tokenization, detokenization and HTTP spread over them)",
    )
    net.add_argument(
        "--engine-in-process",
        action="store_true",
        help="run the engine in a thread of the API server process instead of a process of "
        "its own (for debugging: the HTTP work and the step loop then share one interpreter "
        "lock); only with --api-server-count 1",
    )
    net.add_argument(
        "--restart-core-on-failure",
        action="store_true",
        help="when the engine core process dies, fail its requests, answer 503 meanwhile and "
        "start a new core (default: the server exits with code 1 for a supervisor to restart "
        "it); with --api-server-count N the parent process starts it and tells every API server",
    )
    eng = p.add_argument_group(
        "engine", "kestrel.EngineConfig's fields (the keyword arguments of kestrel.LLM)"
    )
    add_dataclass_arguments(
        eng, EngineConfig, skip=("model",), value_aliases={"dtype": _DTYPE_ALIASES}
    )
    add_serve_compat_arguments(p, _LOG_LEVELS)
    p.set_defaults(handler=run_serve)
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kestrel",
        description="Kestrel: an LLM inference and serving engine.",
    )
    parser.add_argument("--version", action="version", version=f"kestrel {kestrel.__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    add_serve_parser(subparsers)
    add_client_parsers(subparsers)
    add_bench_parser(subparsers)
    return parser


def _engine_flag(field: str) -> str:
    """The command-line spelling of EngineConfig field `field`."""
    return "MODEL" if field == "model" else flag_name(field)


def parse_args(
    argv: Sequence[str] | None = None, parser: argparse.ArgumentParser | None = None
) -> argparse.Namespace:
    """The parsed command line. For `serve`, the engine flags must also form a valid
    EngineConfig: a value it rejects (a range, say) is a usage error naming the flag, exit 2,
    like argparse's own, reported before any engine or server is built."""
    parser = parser or build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["serve"]:
        try:
            argv = expand_config_file(parser, argv)
        except ConfigFileError as exc:
            parser.exit(2, f"kestrel serve: error: argument --config: {exc}\n")
    args = parser.parse_args(argv)
    if args.command == "serve":
        if args.enable_auto_tool_choice and args.tool_call_parser is None:
            parser.exit(
                2, "kestrel serve: error: --enable-auto-tool-choice needs --tool-call-parser\n"
            )
        problem = resolve_model_flag(args) or not_built_yet(args)
        if problem:
            parser.exit(2, f"kestrel serve: error: {problem}\n")
        try:
            engine_config(args)
        except ConfigError as exc:
            parser.exit(2, f"kestrel serve: error: argument {_engine_flag(exc.field)}: {exc}\n")
    return args


def resolve_api_key(args: argparse.Namespace) -> str | None:
    """--api-key, else $KESTREL_API_KEY (read here, not as the flag's default, so that
    --help never prints the key); empty = no key."""
    return args.api_key or os.environ.get("KESTREL_API_KEY") or None


def run_serve(args: argparse.Namespace) -> int:
    setup_logging(args)
    args.api_key = resolve_api_key(args)
    if args.api_server_count > 1 and args.engine_in_process:
        print(
            "kestrel serve: error: --engine-in-process needs --api-server-count 1", file=sys.stderr
        )
        return 2
    if args.engine_in_process and args.restart_core_on_failure:
        print(
            "kestrel serve: error: --restart-core-on-failure needs the engine core process "
            "(not --engine-in-process)",
            file=sys.stderr,
        )
        return 2
    tls_problem = check_tls(args)
    if tls_problem:
        print(f"kestrel serve: error: {tls_problem}", file=sys.stderr)
        return 2
    sock = listen_or_explain(args)
    if sock is None:
        return 2
    if args.api_server_count > 1:
        from kestrel_server.multi_server import run_api_servers

        return run_api_servers(args, sock)
    from kestrel.engine.async_engine import AsyncLLMEngine
    from kestrel.engine.core_client import MPAsyncEngine

    try:
        config = engine_config(args)
        if args.engine_in_process:
            engine = AsyncLLMEngine.from_config(
                config, max_queued_requests=args.max_queued_requests
            )
        else:
            engine = MPAsyncEngine.launch(
                config,
                max_queued_requests=args.max_queued_requests,
                log_level=args.log_level,
                restart_on_failure=args.restart_core_on_failure,
            )
    except (ValueError, OSError, RuntimeError) as exc:  # bad flags, missing model, fetch failed
        logging.getLogger(__name__).debug("start-up failed", exc_info=exc)
        print(f"kestrel serve: error: {exc}", file=sys.stderr)
        sock.close()
        return 2
    if not args.served_model_name and args.model is None:
        logging.getLogger(__name__).info("serving the default model as %r", engine.model_name)
    return serve_http(engine, args, sockets=[sock])


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parse_args(argv, parser)
    if getattr(args, "handler", None) is None:
        parser.print_help()
        return 0
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
