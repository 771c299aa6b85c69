"""The FastAPI app: `build_app(engine, args)` wires the OpenAI routes, errors, auth and metrics
around an AsyncLLMEngine. The engine thread starts with the app (lifespan) and is shut down,
aborting whatever is still in flight, when the app stops."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request, Response
from starlette.middleware.cors import CORSMiddleware

import kestrel
from kestrel.engine.async_engine import AsyncLLMEngine
from kestrel.structured import DEFAULT_MAX_GRAMMAR_CHARS, GrammarLimits
from kestrel_server.auth import DEFAULT_PUBLIC_PATHS, APIKeyMiddleware
from kestrel_server.body_limit import DEFAULT_MAX_REQUEST_BYTES, BodyLimitMiddleware
from kestrel_server.chat import create_chat_completion, render_prompt_off_loop, tool_dicts
from kestrel_server.common import (
    RequestLimits,
    ServerState,
    check_token_ids,
    off_loop,
    server_state,
)
from kestrel_server.completions import create_completion
from kestrel_server.constraints import ConstraintChecker
from kestrel_server.errors import APIError, bad_request, install_error_handlers
from kestrel_server.metrics import CONTENT_TYPE, ServerMetrics
from kestrel_server.openapi import (
    ServerLimits,
    documented_errors,
    install_openapi,
    streaming_ok,
)
from kestrel_server.protocol import (
    ChatCompletionChunk,
    ChatCompletionResponse,
    CompletionResponse,
    DetokenizeRequest,
    DetokenizeResponse,
    ModelCard,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
    VersionResponse,
)
from kestrel_server.reasoning_parsers import REASONING_PARSERS, ReasoningParser
from kestrel_server.tool_choice import ToolSettings
from kestrel_server.tool_parsers import tool_parser_class

logger = logging.getLogger(__name__)


@dataclass
class ServerArgs:
    """The server's own settings (the engine's live in EngineConfig)."""

    served_model_name: list[str] | str | None = None  # default: the engine's model name
    api_key: str | None = None  # None: every route is open
    public_paths: list[str] | None = None  # open despite the key; None: DEFAULT_PUBLIC_PATHS
    chat_template: str | None = None  # a template file path or the template itself
    drain_timeout_s: float = 0.0  # at app shutdown: wait this long for requests still running
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES  # larger bodies get a 413
    max_n: int = RequestLimits.max_n  # samples per prompt; also sequences per request
    max_prompts: int = RequestLimits.max_prompts  # prompts per completions request
    tool_call_parser: str | None = None  # a TOOL_PARSERS name; needed for tool_choice "auto"
    enable_auto_tool_choice: bool = False  # tool_choice "auto" (also needs tool_call_parser)
    reasoning_parser: str | None = None  # a REASONING_PARSERS name: reasoning_content
    max_logprobs: int = RequestLimits.max_logprobs  # logprobs / top_logprobs per token
    log_requests: bool = False  # one log line per admitted request
    root_path: str | None = None  # the prefix a reverse proxy serves the app under
    allowed_origins: list[str] | None = None  # CORS; None: no CORS middleware
    allowed_methods: list[str] = field(default_factory=lambda: ["*"])
    allowed_headers: list[str] = field(default_factory=lambda: ["*"])
    allow_credentials: bool = False

    @classmethod
    def from_namespace(cls, args: Any) -> ServerArgs:
        return cls(**{k: getattr(args, k) for k in cls.__dataclass_fields__ if hasattr(args, k)})


def load_chat_template(value: str | None) -> str | None:
    """`--chat-template`: a path to a file holding the template, or the template text."""
    if value is None:
        return None
    path = Path(value)
    try:
        if path.is_file():
            return path.read_text(encoding="utf-8")
    except OSError:
        pass  # e.g. a template string too long to be a file name
    if "{" not in value:
        raise ValueError(f"--chat-template {value!r} is neither a file nor a Jinja template")
    return value


def tool_settings(settings: ServerArgs) -> ToolSettings:
    """--tool-call-parser / --enable-auto-tool-choice; unknown names raise ValueError."""
    if settings.enable_auto_tool_choice and settings.tool_call_parser is None:
        raise ValueError("--enable-auto-tool-choice needs --tool-call-parser NAME")
    parser = None
    if settings.tool_call_parser is not None:
        parser = tool_parser_class(settings.tool_call_parser)
    return ToolSettings(parser, settings.enable_auto_tool_choice)


def reasoning_parser_class(name: str | None) -> type[ReasoningParser] | None:
    if name is None:
        return None
    if name not in REASONING_PARSERS:
        raise ValueError(
            f"unknown reasoning parser {name!r}; allowed: {', '.join(sorted(REASONING_PARSERS))}"
        )
    return REASONING_PARSERS[name]


def build_app(engine: AsyncLLMEngine, args: ServerArgs | Any | None = None) -> FastAPI:
    settings = args if isinstance(args, ServerArgs) else ServerArgs.from_namespace(args or {})
    names = settings.served_model_name
    if isinstance(names, str):
        names = [names]
    names = list(names or [engine.model_name])
    state = ServerState(
        engine=engine,
        served_model_names=names,
        metrics=ServerMetrics(
            engine.stats,
            names[0],
            max_model_len=engine.max_model_len,
            cache_config=getattr(engine, "cache_config", None),
        ),
        api_key=settings.api_key or None,
        chat_template=load_chat_template(settings.chat_template),
        tools=tool_settings(settings),
        reasoning_parser=reasoning_parser_class(settings.reasoning_parser),
        limits=RequestLimits(
            max_n=settings.max_n,
            max_prompts=settings.max_prompts,
            max_logprobs=settings.max_logprobs,
        ),
        log_requests=settings.log_requests,
        constraints=ConstraintChecker(
            GrammarLimits(max_chars=getattr(engine, "max_grammar_chars", DEFAULT_MAX_GRAMMAR_CHARS))
        ),
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if not engine.is_running:
            engine.start()
        try:
            yield
        finally:
            logger.info("shutting down the engine (%d requests in flight)", engine.num_in_flight)
            await engine.shutdown(drain_timeout_s=settings.drain_timeout_s)
            state.constraints.shutdown()

    app = FastAPI(
        title="Kestrel",
        version=kestrel.__version__,
        lifespan=lifespan,
        root_path=settings.root_path or "",
    )
    app.state.kestrel = state
    install_error_handlers(app)
    # Outermost last: the key is checked before a body is read, the size before it is parsed.
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_request_bytes)
    if state.api_key:
        public = DEFAULT_PUBLIC_PATHS if settings.public_paths is None else settings.public_paths
        app.add_middleware(APIKeyMiddleware, api_key=state.api_key, public_paths=public)
    if settings.allowed_origins is not None:
        # Outermost: preflight requests (no API key) are answered here, and errors carry the
        # CORS headers too.
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.allowed_origins,
            allow_methods=settings.allowed_methods,
            allow_headers=settings.allowed_headers,
            allow_credentials=settings.allow_credentials,
        )

    work = documented_errors(400, 401, 404, 413, 503)
    app.post(
        "/v1/chat/completions",
        response_model=None,
        responses={**streaming_ok(ChatCompletionResponse, ChatCompletionChunk), **work},
        summary="Chat completion (JSON, or server-sent chat.completion.chunk events)",
    )(create_chat_completion)
    app.post(
        "/v1/completions",
        response_model=None,
        responses={**streaming_ok(CompletionResponse, CompletionResponse), **work},
        summary="Text completion (JSON, or server-sent text_completion events)",
    )(create_completion)

    @app.get("/v1/models", responses=documented_errors(401))
    async def list_models(request: Request) -> ModelList:
        st = server_state(request)
        cards = [
            ModelCard(id=name, root=st.engine.model_name, max_model_len=st.engine.max_model_len)
            for name in st.served_model_names
        ]
        return ModelList(data=cards)

    @app.post("/tokenize", responses=documented_errors(400, 401, 404, 413))
    async def tokenize(body: TokenizeRequest, request: Request) -> TokenizeResponse:
        st = server_state(request)
        st.resolve_model(body.model)
        st.fields.check(body)
        if (body.prompt is None) == (body.messages is None):
            raise bad_request("send exactly one of 'prompt' and 'messages'", param="prompt")
        if body.messages is not None:
            ids = await render_prompt_off_loop(
                st,
                body.messages,
                add_generation_prompt=body.add_generation_prompt,
                tools=tool_dicts(body.tools),
            )
        else:
            if st.engine.tokenizer is None:
                raise bad_request("this model has no tokenizer", param="prompt")
            encode = st.engine.tokenizer.encode
            ids = await off_loop(len(body.prompt), encode, body.prompt, body.add_special_tokens)
        return TokenizeResponse(count=len(ids), max_model_len=st.engine.max_model_len, tokens=ids)

    @app.post("/detokenize", responses=documented_errors(400, 401, 404, 413))
    async def detokenize(body: DetokenizeRequest, request: Request) -> DetokenizeResponse:
        st = server_state(request)
        st.resolve_model(body.model)
        st.fields.check(body)
        if st.engine.tokenizer is None:
            raise bad_request("this model has no tokenizer", param="tokens")
        check_token_ids(body.tokens, st.engine.vocab_size, "tokens")
        text = await off_loop(len(body.tokens) * 4, st.engine.tokenizer.decode, body.tokens)
        return DetokenizeResponse(prompt=text)

    @app.get(
        "/health",
        response_class=Response,
        responses={200: {"description": "serving (empty body)"}, **documented_errors(503)},
    )
    async def health(request: Request) -> Response:
        try:
            server_state(request).engine.check_health()
        except Exception as exc:
            raise APIError(503, str(exc), code="engine_unavailable") from exc
        return Response(status_code=200)

    @app.get("/version")
    async def version() -> VersionResponse:
        return VersionResponse(version=kestrel.__version__)

    @app.get(
        "/metrics",
        response_class=Response,
        responses={200: {"content": {CONTENT_TYPE.split(";")[0]: {"schema": {"type": "string"}}}}},
    )
    async def metrics(request: Request) -> Response:
        body = server_state(request).metrics.exposition()
        return Response(content=body, media_type=CONTENT_TYPE)

    limits = ServerLimits(
        vocab_size=engine.vocab_size,
        max_model_len=engine.max_model_len,
        max_n=settings.max_n,
        max_prompts=settings.max_prompts,
        max_logprobs=settings.max_logprobs,
    )
    install_openapi(app, [ChatCompletionChunk], limits)
    return app
