"""`kestrel chat` and `kestrel complete`: terminal clients of a running OpenAI-compatible server
(Kestrel's or any other), like `vllm chat` / `vllm complete`.

    kestrel chat                       # talk to http://127.0.0.1:8000/v1, its first model
    kestrel chat --quick "Hello!"      # one message, print the answer, exit (scripts, tests)
    kestrel complete --quick "The kestrel is"

Interactive mode reads one message (or prompt) per line from stdin until EOF or `exit`, and
streams each answer as it arrives. Only the standard library is used (no HTTP client needed).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any, TextIO

DEFAULT_URL = "http://127.0.0.1:8000/v1"
TIMEOUT_S = 600.0


class ClientError(RuntimeError):
    pass


def add_client_parsers(subparsers: argparse._SubParsersAction) -> None:
    for name, what in (("chat", "chat with"), ("complete", "complete text on")):
        p = subparsers.add_parser(
            name,
            help=f"{what} a running server from the terminal",
            description=f"A terminal client: {what} a running OpenAI-compatible server.",
        )
        p.add_argument("--url", default=DEFAULT_URL, help="the server's API base URL")
        p.add_argument(
            "--model",
            "--model-name",
            dest="model",
            default=None,
            help="model name (default: the server's first model)",
        )
        p.add_argument(
            "--api-key",
            default=None,
            help="API key (default: $KESTREL_API_KEY, else $OPENAI_API_KEY, else none)",
        )
        p.add_argument(
            "-q", "--quick", default=None, metavar="TEXT", help="send TEXT once, print, exit"
        )
        p.add_argument("--max-tokens", type=int, default=None, help="most tokens per answer")
        p.add_argument("--temperature", type=float, default=None, help="sampling temperature")
        if name == "chat":
            p.add_argument("--system-prompt", default=None, help="a system message first")
        p.set_defaults(handler=run_chat if name == "chat" else run_complete)


class Client:
    def __init__(self, url: str, api_key: str | None) -> None:
        self.url = url.rstrip("/")
        self.api_key = api_key

    def _request(self, path: str, body: dict[str, Any] | None = None):
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, headers=headers)
        try:
            return urllib.request.urlopen(req, timeout=TIMEOUT_S)
        except urllib.error.HTTPError as exc:
            raise ClientError(f"{self.url + path}: HTTP {exc.code}: {_error_text(exc)}") from None
        except urllib.error.URLError as exc:
            raise ClientError(f"cannot reach {self.url}: {exc.reason}") from None

    def first_model(self) -> str:
        with self._request("/models") as r:
            models = json.load(r).get("data") or []
        if not models:
            raise ClientError(f"{self.url}/models lists no model")
        return models[0]["id"]

    def stream(self, path: str, body: dict[str, Any]) -> Iterator[dict[str, Any]]:
        """The chunks of a streaming request (server-sent events up to [DONE])."""
        with self._request(path, {**body, "stream": True}) as r:
            for raw in r:
                line = raw.decode("utf-8").strip()
                if not line.startswith("data: "):
                    continue
                payload = line[6:]
                if payload == "[DONE]":
                    return
                chunk = json.loads(payload)
                if "error" in chunk:
                    raise ClientError(chunk["error"].get("message", "the server failed"))
                yield chunk


def _error_text(exc: urllib.error.HTTPError) -> str:
    try:
        return json.loads(exc.read())["error"]["message"]
    except Exception:  # noqa: BLE001 - any body that is not an OpenAI error
        return exc.reason


def _api_key(args: argparse.Namespace) -> str | None:
    return args.api_key or os.environ.get("KESTREL_API_KEY") or os.environ.get("OPENAI_API_KEY")


def _sampling(args: argparse.Namespace) -> dict[str, Any]:
    body: dict[str, Any] = {}
    if args.max_tokens is not None:
        body["max_tokens"] = args.max_tokens
    if args.temperature is not None:
        body["temperature"] = args.temperature
    return body


def _inputs(args: argparse.Namespace, stdin: TextIO, out: TextIO, prompt: str) -> Iterator[str]:
    if args.quick is not None:
        yield args.quick
        return
    interactive = stdin.isatty()
    while True:
        if interactive:
            out.write(prompt)
            out.flush()
        line = stdin.readline()
        if not line or line.strip() in ("exit", "quit"):
            return
        if line.strip():
            yield line.rstrip("\n")


def run_chat(args: argparse.Namespace, stdin: TextIO = sys.stdin, out: TextIO = sys.stdout) -> int:
    client = Client(args.url, _api_key(args))
    try:
        model = args.model or client.first_model()
        messages: list[dict[str, str]] = []
        if args.system_prompt:
            messages.append({"role": "system", "content": args.system_prompt})
        for text in _inputs(args, stdin, out, "> "):
            messages.append({"role": "user", "content": text})
            body = {"model": model, "messages": messages, **_sampling(args)}
            answer = []
            for chunk in client.stream("/chat/completions", body):
                for choice in chunk.get("choices", []):
                    piece = (choice.get("delta") or {}).get("content") or ""
                    answer.append(piece)
                    out.write(piece)
                    out.flush()
            out.write("\n")
            messages.append({"role": "assistant", "content": "".join(answer)})
    except ClientError as exc:
        print(f"kestrel chat: error: {exc}", file=sys.stderr)
        return 1
    return 0


def run_complete(
    args: argparse.Namespace, stdin: TextIO = sys.stdin, out: TextIO = sys.stdout
) -> int:
    client = Client(args.url, _api_key(args))
    try:
        model = args.model or client.first_model()
        for text in _inputs(args, stdin, out, "prompt> "):
            body = {"model": model, "prompt": text, **_sampling(args)}
            for chunk in client.stream("/completions", body):
                for choice in chunk.get("choices", []):
                    out.write(choice.get("text") or "")
                    out.flush()
            out.write("\n")
    except ClientError as exc:
        print(f"kestrel complete: error: {exc}", file=sys.stderr)
        return 1
    return 0
