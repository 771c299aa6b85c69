"""One chat choice's text as the client sees it: `<think>` reasoning split off by the reasoning
parser, then tool calls read out of the content by the tool parser (each optional). One
`ChoiceParser` per choice and stream; `finish` reads a whole reply, `delta` a stream."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from kestrel_server.protocol import AssistantMessage, DeltaMessage
from kestrel_server.reasoning_parsers import ReasoningParser
from kestrel_server.tool_parsers import ToolParser


@dataclass(frozen=True)
class OutputParsing:
    """The parsers a request's choices use (None: that step is skipped)."""

    new_reasoning_parser: Callable[[], ReasoningParser] | None = None
    new_tool_parser: Callable[[], ToolParser] | None = None

    @property
    def active(self) -> bool:
        return self.new_reasoning_parser is not None or self.new_tool_parser is not None

    def choice(self) -> ChoiceParser:
        reasoning = self.new_reasoning_parser() if self.new_reasoning_parser else None
        tools = self.new_tool_parser() if self.new_tool_parser else None
        return ChoiceParser(reasoning, tools)


def finish_reason_with_tools(finish_reason: str | None, called_tools: bool) -> str | None:
    """ "tool_calls" for a reply that stopped normally after calling tools (a reply cut by the
    length limit stays "length": its last call may be incomplete)."""
    if called_tools and finish_reason == "stop":
        return "tool_calls"
    return finish_reason


class ChoiceParser:
    def __init__(self, reasoning: ReasoningParser | None, tools: ToolParser | None) -> None:
        self.reasoning = reasoning
        self.tools = tools

    def message(self, text: str) -> AssistantMessage:
        """The whole reply as the assistant message."""
        reasoning_content = None
        content: str | None = text
        if self.reasoning is not None:
            split = self.reasoning.extract(text)
            reasoning_content, content = split.reasoning, split.content
        if self.tools is None:
            return AssistantMessage(content=content, reasoning_content=reasoning_content)
        extracted = self.tools.extract(content or "")
        return AssistantMessage(
            content=extracted.content,
            reasoning_content=reasoning_content,
            tool_calls=extracted.tool_calls or None,
        )

    def delta(self, text_delta: str, *, final: bool) -> DeltaMessage:
        """This stream delta's new reasoning, content and tool-call parts (`final`: the last)."""
        reasoning_delta = None
        content_delta: str | None = text_delta
        if self.reasoning is not None:
            split = self.reasoning.extract_streaming(text_delta, final=final)
            reasoning_delta, content_delta = split.reasoning, split.content
        if self.tools is None:
            return DeltaMessage(content=content_delta, reasoning_content=reasoning_delta)
        tools = self.tools.extract_streaming(content_delta or "", final=final)
        return DeltaMessage(
            content=tools.content,
            reasoning_content=reasoning_delta,
            tool_calls=tools.tool_calls or None,
        )

    @property
    def called_tools(self) -> bool:
        return self.tools is not None and self.tools.called_tools


def is_empty(delta: DeltaMessage) -> bool:
    return not delta.content and not delta.reasoning_content and not delta.tool_calls
