"""Request and response bodies in the shapes of OpenAI's API (plus vLLM's common extras).

Requests are strict: types are not coerced (`"max_tokens": "10"` and `"stream": "yes"` are 400s),
numbers carry their ranges (floats must be finite), enums are closed, lists that the API needs
non-empty say so, and text must be valid Unicode (no lone UTF-16 surrogates). The schema is what
clients and fuzzers see in /openapi.json; ranges that depend on the model (top_k <= vocabulary,
token ids < vocabulary, prompt + max_tokens <= context) and on the server's flags (n, prompt-list
length) are checked by the endpoints, which name the value and the allowed range.

Fields a model does not declare are kept (`extra="allow"`, in `model_extra`) for the endpoint's
`request_fields.FieldPolicy`: accepted and logged once, or a 400 naming the field when its
semantics are not implemented (the table is in `request_fields.py`). Nothing is dropped silently.
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from kestrel.sampling_params import LOGIT_BIAS_RANGE, MAX_LOGPROBS, PENALTY_RANGE, SEED_RANGE

# Bounds on lists that every step would otherwise pay for (stop strings are matched per token,
# logit_bias and stop_token_ids become per-step tensors).
MAX_STOP_STRINGS = 64
MAX_TOKEN_ID_LIST = 1024
MAX_LOGIT_BIAS = 1024
INT64_MAX = 2**63 - 1


def _valid_unicode(text: str) -> str:
    """Rejects lone UTF-16 surrogates (JSON allows "\\ud800"; no tokenizer can encode it)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(
            f"the text holds a lone UTF-16 surrogate ({text[exc.start]!r} at index "
            f"{exc.start}); text must be valid Unicode"
        ) from None
    return text


Text = Annotated[str, AfterValidator(_valid_unicode)]
NonEmptyText = Annotated[str, Field(min_length=1), AfterValidator(_valid_unicode)]
TokenId = Annotated[int, Field(ge=0, le=INT64_MAX)]
TokenIds = Annotated[list[TokenId], Field(min_length=1)]
Count = Annotated[int, Field(ge=1, le=INT64_MAX)]
Penalty = Annotated[float, Field(ge=PENALTY_RANGE[0], le=PENALTY_RANGE[1])]
Role = Literal["system", "developer", "user", "assistant", "tool"]


class _Request(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True, allow_inf_nan=False)


class _Response(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ---- requests -------------------------------------------------------------------------------


class StreamOptions(_Request):
    include_usage: bool = False


class JsonSchemaFormat(_Request):
    name: Text = "response"
    description: Text | None = None
    schema_: dict[Text, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Request):
    """OpenAI's `response_format`: plain text, any JSON object, or a JSON schema."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputs(_Request):
    """vLLM's `structured_outputs` extra: exactly one constraint."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)
    json_: dict[Text, Any] | Text | None = Field(default=None, alias="json")
    regex: NonEmptyText | None = None
    choice: Annotated[list[Text], Field(min_length=1)] | None = None
    grammar: NonEmptyText | None = None
    json_object: bool | None = None


class SamplingRequest(_Request):
    """Fields shared by /v1/chat/completions and /v1/completions. None = the model's default
    (generation_config.json) or SamplingParams' default."""

    model: Text | None = None
    n: Count = 1  # at most the server's --max-n (checked by the endpoint)
    temperature: Annotated[float, Field(ge=0.0)] | None = None
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    top_k: Annotated[int, Field(ge=-1, le=INT64_MAX)] | None = None  # also <= vocabulary size
    min_p: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    seed: Annotated[int, Field(ge=SEED_RANGE[0], le=SEED_RANGE[1])] | None = None
    stop: (
        NonEmptyText | Annotated[list[NonEmptyText], Field(max_length=MAX_STOP_STRINGS)] | None
    ) = None
    stop_token_ids: Annotated[list[TokenId], Field(max_length=MAX_TOKEN_ID_LIST)] | None = None
    max_tokens: Count | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    repetition_penalty: Annotated[float, Field(gt=0.0)] | None = None
    logit_bias: (
        Annotated[
            dict[
                Annotated[str, Field(pattern=r"^[0-9]{1,18}$")],
                Annotated[float, Field(ge=LOGIT_BIAS_RANGE[0], le=LOGIT_BIAS_RANGE[1])],
            ],
            Field(max_length=MAX_LOGIT_BIAS),
        ]
        | None
    ) = None
    ignore_eos: bool = False
    min_tokens: Annotated[int, Field(ge=0, le=INT64_MAX)] = 0
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    stream: bool = False
    # vLLM's extra: logprobs of the prompt's tokens (the top-k of each position and the token
    # itself), returned as `prompt_logprobs`.
    prompt_logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    stream_options: StreamOptions | None = None
    user: Text | None = None
    # Structured outputs: OpenAI's response_format, vLLM's structured_outputs and its older
    # guided_* fields (at most one of them per request).
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None
    guided_json: dict[Text, Any] | Text | None = None
    guided_regex: NonEmptyText | None = None
    guided_choice: Annotated[list[Text], Field(min_length=1)] | None = None
    guided_grammar: NonEmptyText | None = None


class TextPart(_Request):
    type: Literal["text"]
    text: Text


# Function names as OpenAI allows them (the same pattern vLLM's clients send).
FunctionName = Annotated[str, Field(pattern=r"^[a-zA-Z0-9_.:-]{1,64}$")]
MAX_TOOLS = 1024


class FunctionDefinition(_Request):
    name: FunctionName
    description: Text | None = None
    parameters: dict[Text, Any] | None = None  # a JSON schema (an object schema, as a rule)
    strict: bool | None = None


class ChatTool(_Request):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_Request):
    name: FunctionName


class NamedToolChoice(_Request):
    type: Literal["function"]
    function: NamedFunction


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class FunctionCallParam(_Request):
    name: Text
    arguments: Text  # JSON text, as OpenAI sends it


class ToolCallParam(_Request):
    id: Text
    type: Literal["function"] = "function"
    function: FunctionCallParam


class ChatMessage(_Request):
    role: Role
    content: Text | list[TextPart] | None = None
    name: Text | None = None
    tool_calls: list[ToolCallParam] | None = None  # assistant messages
    tool_call_id: Text | None = None  # tool messages
    reasoning_content: Text | None = None  # assistant messages (a reasoning model's thinking)


class ChatCompletionRequest(SamplingRequest):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    tools: Annotated[list[ChatTool], Field(max_length=MAX_TOOLS)] | None = None
    tool_choice: ToolChoice | None = None  # None: "auto" with tools, "none" without
    parallel_tool_calls: bool = True
    max_completion_tokens: Count | None = None  # OpenAI's newer name for max_tokens
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    # Extra template variables (e.g. `documents`, `enable_thinking`); the renderer's own
    # arguments (`messages`, `add_generation_prompt`, ...) are refused by the endpoint.
    chat_template_kwargs: dict[Text, Any] | None = None


class CompletionRequest(SamplingRequest):
    # A text, a batch of texts, token ids, or a batch of token-id lists (at most --max-prompts).
    prompt: (
        Text
        | Annotated[list[Text], Field(min_length=1)]
        | TokenIds
        | Annotated[list[TokenIds], Field(min_length=1)]
    )
    # OpenAI's default for completions; null = rest of the context; 0 only with echo (the
    # prompt is scored, nothing is generated: lm-eval's loglikelihood requests).
    max_tokens: Annotated[int, Field(ge=0, le=INT64_MAX)] | None = 16
    echo: bool = False
    logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    suffix: Text | None = None


class TokenizeRequest(_Request):
    model: Text | None = None
    prompt: Text | None = None
    messages: Annotated[list[ChatMessage], Field(min_length=1)] | None = None
    tools: Annotated[list[ChatTool], Field(max_length=MAX_TOOLS)] | None = None  # with messages
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class DetokenizeRequest(_Request):
    model: Text | None = None
    tokens: list[TokenId]


# ---- responses ------------------------------------------------------------------------------


class ErrorInfo(_Response):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(_Response):
    """Every error, whatever its status: OpenAI's shape."""

    error: ErrorInfo


class UsageInfo(_Response):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class TopLogprob(_Response):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(_Response):
    token: str
    logprob: float
    bytes: list[int] | None
    top_logprobs: list[TopLogprob]


class ChatLogprobs(_Response):
    content: list[TokenLogprob] | None


class PromptLogprob(_Response):
    """vLLM's shape of one entry of `prompt_logprobs`."""

    logprob: float
    rank: int | None
    decoded_token: str | None


# vLLM's `prompt_logprobs`: None for the first prompt token, then {token id: PromptLogprob}.
PromptLogprobList = list[dict[int, PromptLogprob] | None]


class CompletionLogprobs(_Response):
    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)


FinishReason = Literal["stop", "length", "tool_calls", "abort", "error"]


# Fields left out of a response while None (OpenAI sends them only when they hold something).
Omitted = Field(default=None, exclude_if=lambda value: value is None)


class FunctionCall(_Response):
    name: str
    arguments: str  # JSON text


class ToolCall(_Response):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class DeltaFunctionCall(_Response):
    name: str | None = Omitted
    arguments: str | None = Omitted


class DeltaToolCall(_Response):
    """One tool call's part in a stream chunk: the first carries id, type and the name, later
    ones only argument fragments (their concatenation is the arguments' JSON text)."""

    index: int
    id: str | None = Omitted
    type: Literal["function"] | None = Omitted
    function: DeltaFunctionCall


class AssistantMessage(_Response):
    role: Literal["assistant"] = "assistant"
    content: str | None
    reasoning_content: str | None = Omitted  # only with --reasoning-parser
    tool_calls: list[ToolCall] | None = Omitted  # only when the model called tools


class ChatChoice(_Response):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason | None
    stop_reason: int | str | None = None


class ChatCompletionResponse(_Response):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo
    prompt_logprobs: PromptLogprobList | None = None  # vLLM's extra, when asked


class DeltaMessage(_Response):
    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning_content: str | None = Omitted  # only with --reasoning-parser
    tool_calls: list[DeltaToolCall] | None = Omitted


class ChatChunkChoice(_Response):
    index: int
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason | None = None
    stop_reason: int | str | None = None


class ChatCompletionChunk(_Response):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: UsageInfo | None = None
    prompt_logprobs: PromptLogprobList | None = None  # in the first chunk after the prompt ran


class CompletionChoice(_Response):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: FinishReason | None
    stop_reason: int | str | None = None
    prompt_logprobs: PromptLogprobList | None = None  # vLLM's extra, when asked (first chunk)


class CompletionResponse(_Response):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None


class ModelCard(_Response):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "kestrel"
    root: str
    max_model_len: int


class ModelList(_Response):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizeResponse(_Response):
    count: int
    max_model_len: int
    tokens: list[int]


class DetokenizeResponse(_Response):
    prompt: str


class VersionResponse(_Response):
    version: str
