"""Parsers for outputs constrained by structured outputs (tool_choice "required" or a named
function): the text is pure JSON, not the model's own tool-call format.

- required: `[{"name": "f", "arguments": {...}}, ...]` (the schema of tool_choice.py)
- a named function: the arguments object itself.
"""

from __future__ import annotations

from kestrel_server.tool_parsers.base import CallPiece, Piece, ToolParser, array_of_calls
from kestrel_server.tool_parsers.json_scan import NotJSON, skip_ws


class RequiredToolParser(ToolParser):
    name = "required"

    def pieces(self, text: str, final: bool) -> list[Piece]:
        i = skip_ws(text, 0)
        if i >= len(text):
            return [] if not final else [text]
        if text[i] != "[":
            return [text]
        pieces: list[Piece] = []
        try:
            end = array_of_calls(text, i, final, pieces)
        except NotJSON:
            return [text]
        if end is not None and end < len(text):
            pieces.append(text[end:])
        return pieces


class NamedFunctionParser(ToolParser):
    name = "named"

    def __init__(self, function_name: str) -> None:
        super().__init__()
        self.function_name = function_name

    def pieces(self, text: str, final: bool) -> list[Piece]:
        return [CallPiece(name=self.function_name, arguments=text.strip(), complete=final)]
