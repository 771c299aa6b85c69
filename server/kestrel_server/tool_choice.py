"""What a chat request's `tools` / `tool_choice` ask of the server, checked against its flags:

- no tools, or tool_choice "none": no tool parsing (the tools still reach the chat template);
- "auto" (the default with tools): the model's own call format, parsed by `--tool-call-parser`;
  like vLLM, this needs `--enable-auto-tool-choice` and `--tool-call-parser` (else a 400);
- "required": structured outputs constrain the reply to a JSON array of calls
  (`required_schema`), parsed by `RequiredToolParser`;
- a named function: structured outputs constrain the reply to that function's arguments
  (`named_schema`), parsed by `NamedFunctionParser`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kestrel.sampling_params import StructuredOutputsParams
from kestrel_server.errors import bad_request
from kestrel_server.protocol import ChatCompletionRequest, ChatTool, NamedToolChoice
from kestrel_server.tool_parsers import NamedFunctionParser, RequiredToolParser, ToolParser

# An object schema that accepts any arguments (a function without `parameters`).
ANY_OBJECT: dict[str, Any] = {"type": "object"}


@dataclass(frozen=True)
class ToolSettings:
    """The server's tool flags."""

    tool_call_parser: type[ToolParser] | None = None
    enable_auto_tool_choice: bool = False


@dataclass
class ToolPlan:
    """How one request's output is parsed for tool calls (`new_parser` is None: not at all)."""

    new_parser: Callable[[], ToolParser] | None = None
    structured_outputs: StructuredOutputsParams | None = None


def _parameters(tool: ChatTool) -> dict[str, Any]:
    return tool.function.parameters if tool.function.parameters is not None else ANY_OBJECT


def named_schema(tool: ChatTool) -> dict[str, Any]:
    """The JSON schema of a named function choice: the function's arguments."""
    return _parameters(tool)


def required_schema(tools: list[ChatTool], parallel_tool_calls: bool = True) -> dict[str, Any]:
    """The JSON schema of tool_choice "required": a non-empty array of calls, each
    `{"name": <one of the tools>, "arguments": <that tool's parameters schema>}` (at most one
    call when parallel_tool_calls is false)."""
    variants = [
        {
            "type": "object",
            "properties": {
                "name": {"type": "string", "enum": [tool.function.name]},
                "arguments": _parameters(tool),
            },
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for tool in tools
    ]
    items: dict[str, Any] = variants[0] if len(variants) == 1 else {"anyOf": variants}
    schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": items}
    if not parallel_tool_calls:
        schema["maxItems"] = 1
    return schema


def plan_tools(body: ChatCompletionRequest, settings: ToolSettings) -> ToolPlan:
    """The request's tool handling; a 400 naming the field when tools and choice disagree or
    the server's flags do not allow the choice."""
    tools = body.tools or []
    choice = body.tool_choice
    if choice is None:
        choice = "auto" if tools else "none"
    _check_unique_names(tools)
    if choice == "none":
        return ToolPlan()
    if not tools:
        raise bad_request(
            f"tool_choice {_shown(choice)} needs 'tools': the request defines no tools",
            param="tool_choice",
        )
    if choice == "auto":
        parser = settings.tool_call_parser
        if parser is None or not settings.enable_auto_tool_choice:
            raise bad_request(
                'tool_choice "auto" (the default when tools are given) needs the server to run '
                "with --enable-auto-tool-choice and --tool-call-parser; send "
                'tool_choice "none", "required" or a named function otherwise',
                param="tool_choice",
            )
        return ToolPlan(new_parser=parser)
    if choice == "required":
        schema = required_schema(tools, body.parallel_tool_calls)
        return ToolPlan(
            new_parser=RequiredToolParser, structured_outputs=StructuredOutputsParams(json=schema)
        )
    assert isinstance(choice, NamedToolChoice)
    name = choice.function.name
    tool = next((t for t in tools if t.function.name == name), None)
    if tool is None:
        raise bad_request(
            f"tool_choice names the function {name!r}, which is not among the request's tools "
            f"({', '.join(repr(t.function.name) for t in tools)})",
            param="tool_choice",
        )
    return ToolPlan(
        new_parser=lambda: NamedFunctionParser(name),
        structured_outputs=StructuredOutputsParams(json=named_schema(tool)),
    )


def _check_unique_names(tools: list[ChatTool]) -> None:
    seen: set[str] = set()
    for index, tool in enumerate(tools):
        if tool.function.name in seen:
            raise bad_request(
                f"tools[{index}] repeats the function name {tool.function.name!r}; names must "
                "be unique",
                param=f"tools[{index}].function.name",
            )
        seen.add(tool.function.name)


def _shown(choice: Any) -> str:
    if isinstance(choice, NamedToolChoice):
        return f"{{function: {choice.function.name!r}}}"
    return repr(choice)
