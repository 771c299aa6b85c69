"""`kestrel serve` flags copied from `vllm serve` command lines that are not EngineConfig fields:
the HTTP front end's (CORS, root path, TLS, uvicorn's log level, request logging, the logprobs
limit), `--model`, `--config FILE.yaml`, and the flags of features not built yet.

A feature not built yet keeps its vLLM flag: the value that means "off" is accepted, any other
fails with exit 2 and a message naming the feature (`not_built_yet`, over `NOT_BUILT`; empty
now that `--kv-cache-dtype` is an EngineConfig field), never argparse's "unrecognized
arguments".

`--config FILE.yaml` (vLLM's semantics): a mapping of flag names (`port`, `max-num-seqs` or
`max_num_seqs`) to values; `true` sets a switch, `false` its `--no-` form (or leaves a plain
switch off), a list gives a flag several values. Flags on the command line win over the file.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kestrel.sampling_params import MAX_LOGPROBS

# flag dest -> (the feature, the values that ask for nothing)
NOT_BUILT: dict[str, tuple[str, tuple[Any, ...]]] = {}


def not_built_yet(args: argparse.Namespace) -> str | None:
    """The message for the first flag that asks for a feature not built yet, else None."""
    for dest, (feature, off) in NOT_BUILT.items():
        value = getattr(args, dest, None)
        if value not in off:
            flag = "--" + dest.replace("_", "-")
            return (
                f"argument {flag}: {value!r} needs {feature}, which Kestrel has not built yet; "
                f"allowed now: {', '.join(repr(v) for v in off if v is not None) or 'leave it out'}"
            )
    return None


def _origins(text: str) -> list[str]:
    """vLLM's JSON list (`'["https://a.example"]'`), or origins separated by commas."""
    text = text.strip()
    if text.startswith("["):
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            raise argparse.ArgumentTypeError(f"not a JSON list: {exc}") from None
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise argparse.ArgumentTypeError("must be a JSON list of strings")
        return value
    return [part.strip() for part in text.split(",") if part.strip()]


def _max_logprobs(text: str) -> int:
    value = int(text)
    if not 0 <= value <= MAX_LOGPROBS:
        raise argparse.ArgumentTypeError(
            f"{value} is invalid; allowed: 0..{MAX_LOGPROBS} (more logprobs per token are not "
            "built)"
        )
    return value


def add_serve_compat_arguments(p: argparse.ArgumentParser, log_levels: Sequence[str]) -> None:
    p.add_argument(
        "--model",
        dest="model_flag",
        default=None,
        metavar="MODEL",
        help="the model (the same as the positional MODEL; vLLM's spelling)",
    )
    p.add_argument(
        "--config",
        default=None,
        metavar="FILE.yaml",
        help="read flags from a YAML file (keys: flag names); command-line flags win",
    )
    http = p.add_argument_group("HTTP front end (vllm serve's flags)")
    http.add_argument(
        "--max-logprobs",
        type=_max_logprobs,
        default=MAX_LOGPROBS,
        help="most logprobs per token a request may ask for (logprobs / top_logprobs)",
    )
    http.add_argument(
        "--uvicorn-log-level",
        choices=(*log_levels, "trace"),
        default=None,
        help="uvicorn's log level (default: --log-level)",
    )
    requests = http.add_mutually_exclusive_group()
    requests.add_argument(
        "--enable-log-requests",
        dest="log_requests",
        action="store_true",
        default=False,
        help="log one line per request (id, prompt tokens, sampling parameters)",
    )
    requests.add_argument(
        "--disable-log-requests",
        dest="log_requests",
        action="store_false",
        help="do not log requests (the default, as in current vLLM)",
    )
    http.add_argument(
        "--allowed-origins",
        type=_origins,
        default=None,
        help="CORS: origins allowed to call the API from a browser, a JSON list or commas "
        "('[\"*\"]' = any); default: no CORS headers at all",
    )
    http.add_argument(
        "--allowed-methods",
        type=_origins,
        default=["*"],
        help="CORS: allowed methods (with --allowed-origins)",
    )
    http.add_argument(
        "--allowed-headers",
        type=_origins,
        default=["*"],
        help="CORS: allowed request headers (with --allowed-origins)",
    )
    http.add_argument(
        "--allow-credentials",
        action="store_true",
        help="CORS: allow credentials (with --allowed-origins)",
    )
    http.add_argument(
        "--root-path",
        default=None,
        help="the path prefix a reverse proxy serves this server under (FastAPI's root_path)",
    )
    http.add_argument("--ssl-keyfile", default=None, help="TLS: the private key file (PEM)")
    http.add_argument("--ssl-certfile", default=None, help="TLS: the certificate file (PEM)")


def resolve_model_flag(args: argparse.Namespace) -> str | None:
    """Merges `--model` into the positional MODEL; the message when they disagree."""
    flag = getattr(args, "model_flag", None)
    if flag is None:
        return None
    if args.model is not None and args.model != flag:
        return f"MODEL {args.model!r} and --model {flag!r} disagree; give one"
    args.model = flag
    return None


# ---- --config FILE.yaml -----------------------------------------------------------------


class ConfigFileError(ValueError):
    pass


def _load_mapping(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigFileError(f"cannot read {path}: {exc}") from None
    try:
        import yaml
    except ImportError:  # JSON is YAML too
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            raise ConfigFileError(
                f"{path}: reading YAML needs pyyaml (pip install pyyaml)"
            ) from None
    else:
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigFileError(f"{path} is not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigFileError(f"{path} must hold a mapping of flag names to values")
    return data


def _option_strings(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {s: a for a in parser._actions for s in a.option_strings}


def _given(action: argparse.Action, argv: Sequence[str]) -> bool:
    names = set(action.option_strings)
    return any(tok in names or tok.split("=", 1)[0] in names for tok in argv)


def config_file_argv(parser: argparse.ArgumentParser, path: Path, argv: Sequence[str]) -> list[str]:
    """The flags `path` sets that `argv` (the command line) does not."""
    options = _option_strings(parser)
    out: list[str] = []
    for key, value in _load_mapping(path).items():
        name = str(key).strip().lstrip("-").replace("_", "-")
        if name == "model":
            flag = "--model"
        elif name == "config":
            raise ConfigFileError(f"{path}: 'config' cannot name another file")
        else:
            flag = "--" + name
        action = options.get(flag)
        if action is None:
            raise ConfigFileError(f"{path}: {key!r} is not a flag of kestrel serve")
        if flag == "--model" and _model_given(argv):
            continue
        if _given(action, argv):
            continue
        out += _flag_argv(flag, action, value, path)
    return out


def _model_given(argv: Sequence[str]) -> bool:
    """Whether the command line names the model (--model, or a positional after `serve`)."""
    return any(t == "--model" or t.startswith("--model=") for t in argv)


def _flag_argv(flag: str, action: argparse.Action, value: Any, path: Path) -> list[str]:
    if isinstance(action, argparse.BooleanOptionalAction):
        if not isinstance(value, bool):
            raise ConfigFileError(f"{path}: {flag[2:]} must be true or false, got {value!r}")
        return [flag if value else "--no-" + flag[2:]]
    if action.nargs == 0:  # store_true / store_false
        if not isinstance(value, bool):
            raise ConfigFileError(f"{path}: {flag[2:]} must be true or false, got {value!r}")
        return [flag] if value else []
    if isinstance(value, list):
        if action.nargs in (None, "?"):
            return [flag, json.dumps(value)]  # a flag taking a JSON list (--allowed-origins)
        return [flag, *map(_text, value)]
    if isinstance(value, dict):
        return [flag, json.dumps(value)]  # e.g. --speculative-config
    return [flag, _text(value)]


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def expand_config_file(parser: argparse.ArgumentParser, argv: Sequence[str]) -> list[str]:
    """`argv` with the flags of its `--config FILE` appended (those the command line does not
    give); unchanged without --config. The positional MODEL, if any, is kept in place."""
    argv = list(argv)
    path = None
    for i, tok in enumerate(argv):
        if tok == "--config" and i + 1 < len(argv):
            path = argv[i + 1]
        elif tok.startswith("--config="):
            path = tok.split("=", 1)[1]
    if path is None:
        return argv
    serve = _subparser(parser, "serve")
    extra = config_file_argv(serve, Path(path).expanduser(), argv)
    if "--model" in extra and _positional_model(serve, argv):
        i = extra.index("--model")
        del extra[i : i + 2]
    return argv + extra


def _subparser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction) and name in action.choices:
            return action.choices[name]
    raise KeyError(name)


def _positional_model(serve: argparse.ArgumentParser, argv: Sequence[str]) -> bool:
    """Whether the command line holds a positional MODEL (parsed without the config file)."""
    try:
        i = list(argv).index("serve")
    except ValueError:
        return False
    known, _ = _quiet_parse(serve, list(argv)[i + 1 :])
    return known is not None and known.model is not None


def _quiet_parse(
    parser: argparse.ArgumentParser, argv: list[str]
) -> tuple[argparse.Namespace | None, list[str]]:
    try:
        return parser.parse_known_args(argv)
    except SystemExit:
        return None, argv
