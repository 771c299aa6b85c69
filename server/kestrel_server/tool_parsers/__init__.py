"""Tool-call output parsers, chosen with `kestrel serve --tool-call-parser NAME`."""

from __future__ import annotations

from kestrel_server.tool_parsers.base import DeltaToolCalls, ExtractedToolCalls, ToolParser
from kestrel_server.tool_parsers.hermes import HermesToolParser
from kestrel_server.tool_parsers.llama3_json import Llama3JsonToolParser
from kestrel_server.tool_parsers.mistral import MistralToolParser
from kestrel_server.tool_parsers.structured import NamedFunctionParser, RequiredToolParser

TOOL_PARSERS: dict[str, type[ToolParser]] = {
    cls.name: cls for cls in (HermesToolParser, Llama3JsonToolParser, MistralToolParser)
}


def tool_parser_class(name: str) -> type[ToolParser]:
    try:
        return TOOL_PARSERS[name]
    except KeyError:
        raise ValueError(
            f"unknown tool-call parser {name!r}; allowed: {', '.join(sorted(TOOL_PARSERS))}"
        ) from None


__all__ = [
    "TOOL_PARSERS",
    "DeltaToolCalls",
    "ExtractedToolCalls",
    "NamedFunctionParser",
    "RequiredToolParser",
    "ToolParser",
    "tool_parser_class",
]
