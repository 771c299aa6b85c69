"""The OpenAPI document matches what the server returns: every documented error is the OpenAI
error body (`ErrorResponse`), FastAPI's default 422 (never returned: validation errors are 400s)
is removed, and the streaming endpoints list both their JSON and their event-stream bodies.

The schemas of the request and response bodies are pydantic's own (FastAPI's conversion writes
integer bounds as floats, so 2**63 - 1 came out as 2**63), and they carry this server's limits:
n <= --max-n, top_k <= the vocabulary, token ids < the vocabulary, max_tokens < the context,
at most --max-prompts prompts. A client or fuzzer reading the schema knows the real ranges."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

from kestrel_server import protocol
from kestrel_server.protocol import ErrorResponse

_REF_TEMPLATE = "#/components/schemas/{model}"

_DESCRIPTIONS = {
    400: "Invalid request (a bad parameter, a prompt too long for the context, ...)",
    401: "Missing or wrong API key",
    404: "Unknown model",
    413: "Request body larger than --max-request-bytes",
    503: "Queue full, shutting down, or the engine is unavailable (see Retry-After)",
}


def documented_errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {s: {"model": ErrorResponse, "description": _DESCRIPTIONS[s]} for s in statuses}


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def streaming_ok(model: type[BaseModel], chunk: type[BaseModel]) -> dict[int | str, dict[str, Any]]:
    """200: `model` as JSON, or with `stream: true` server-sent events: each event's data is a
    `chunk` or an error body (JSON), and the last one is `[DONE]`. (In OpenAPI 3.1 the schema of
    an event-stream media type describes one event.)"""
    event = {
        "type": "object",
        "required": ["data"],
        "properties": {
            "data": {
                "anyOf": [
                    {"const": "[DONE]"},
                    {
                        "type": "string",
                        "contentMediaType": "application/json",
                        "contentSchema": {"anyOf": [_ref(chunk), _ref(ErrorResponse)]},
                    },
                ]
            }
        },
    }
    return {
        200: {
            "model": model,
            "description": "The result; with stream=true, server-sent events of chunks",
            "content": {"text/event-stream": {"schema": event}},
        }
    }


def _protocol_models() -> dict[str, type[BaseModel]]:
    return {
        name: obj
        for name, obj in vars(protocol).items()
        if isinstance(obj, type)
        and issubclass(obj, BaseModel)
        and obj.__module__ == protocol.__name__
    }


def _put_components(schema: dict[str, Any], extra: list[type[BaseModel]]) -> None:
    """Our models' schemas as pydantic writes them, replacing FastAPI's renderings; `extra`
    (models that only the event streams mention, by $ref) are added."""
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    wanted = {name for name in _protocol_models() if name in components}
    wanted.update(m.__name__ for m in extra)
    for name, model in _protocol_models().items():
        if name not in wanted:
            continue
        mode = "validation" if issubclass(model, protocol._Request) else "serialization"
        body = model.model_json_schema(ref_template=_REF_TEMPLATE, mode=mode)
        for sub_name, sub in body.pop("$defs", {}).items():
            components[sub_name] = sub
        components[name] = body


def _integer_schema(node: dict[str, Any]) -> dict[str, Any]:
    """The integer member of `node` (itself, or the integer branch of an anyOf with null)."""
    if node.get("type") == "integer":
        return node
    for branch in node.get("anyOf", ()):
        if branch.get("type") in ("integer", "array"):
            return branch
    raise KeyError(f"no integer or array schema in {node}")


def _set_limits(components: dict[str, Any], limits: ServerLimits) -> None:
    vocab_max = limits.vocab_size - 1
    for name in ("ChatCompletionRequest", "CompletionRequest"):
        props = components[name]["properties"]
        _integer_schema(props["n"])["maximum"] = limits.max_n
        _integer_schema(props["top_k"])["maximum"] = limits.vocab_size
        for field in ("max_tokens", "max_completion_tokens"):
            if field in props:
                _integer_schema(props[field])["maximum"] = limits.max_model_len - 1
        _integer_schema(props["stop_token_ids"])["items"]["maximum"] = vocab_max
    chat_props = components["ChatCompletionRequest"]["properties"]
    _integer_schema(chat_props["top_logprobs"])["maximum"] = limits.max_logprobs
    completion_props = components["CompletionRequest"]["properties"]
    _integer_schema(completion_props["logprobs"])["maximum"] = limits.max_logprobs
    prompt = components["CompletionRequest"]["properties"]["prompt"]["anyOf"]
    prompt[1]["maxItems"] = limits.max_prompts  # list of texts
    prompt[2]["items"]["maximum"] = vocab_max  # token ids
    prompt[3]["maxItems"] = limits.max_prompts  # list of token-id lists
    prompt[3]["items"]["items"]["maximum"] = vocab_max
    components["DetokenizeRequest"]["properties"]["tokens"]["items"]["maximum"] = vocab_max


@dataclass(frozen=True)
class ServerLimits:
    vocab_size: int
    max_model_len: int
    max_n: int
    max_prompts: int
    max_logprobs: int = protocol.MAX_LOGPROBS


def install_openapi(
    app: FastAPI, stream_chunks: list[type[BaseModel]], limits: ServerLimits
) -> None:
    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(
                title=app.title, version=app.version, routes=app.routes, openapi_version="3.1.0"
            )
            _put_components(schema, [*stream_chunks, ErrorResponse])
            _set_limits(schema["components"]["schemas"], limits)
            for path_item in schema.get("paths", {}).values():
                for operation in path_item.values():
                    operation.get("responses", {}).pop("422", None)
            components = schema.get("components", {}).get("schemas", {})
            for name in ("HTTPValidationError", "ValidationError"):
                components.pop(name, None)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
