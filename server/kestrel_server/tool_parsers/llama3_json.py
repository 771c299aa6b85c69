"""Llama 3.x JSON tool calls: the whole reply is one call object, or several separated by
semicolons, optionally after `<|python_tag|>`:

    {"name": "get_weather", "parameters": {"city": "Paris"}}
    <|python_tag|>{"name": "a", "parameters": {}}; {"name": "b", "parameters": {"x": 1}}

A reply whose first non-space character is not `{` is plain content.
"""

from __future__ import annotations

from kestrel_server.tool_parsers.base import Piece, ToolParser, add_incomplete, call_from_object
from kestrel_server.tool_parsers.json_scan import NotJSON, scan_object, skip_ws

PYTHON_TAG = "<|python_tag|>"


class Llama3JsonToolParser(ToolParser):
    name = "llama3_json"

    def pieces(self, text: str, final: bool) -> list[Piece]:
        stripped = text.lstrip()
        if not final and (stripped == "" or PYTHON_TAG.startswith(stripped)):
            return []  # a tag or a call may still start here
        i = len(text) - len(stripped)
        if stripped.startswith(PYTHON_TAG):
            i += len(PYTHON_TAG)
        i = skip_ws(text, i)
        n = len(text)
        if i >= n:
            return [text] if not stripped.startswith(PYTHON_TAG) else []
        if text[i] != "{":
            return [text]
        pieces: list[Piece] = []
        try:
            while True:
                scan = scan_object(text, i)
                call = call_from_object(text, scan)
                if scan.end is None:
                    add_incomplete(pieces, call, text[i:], final)
                    return pieces
                if call.name is None:
                    return [text]
                pieces.append(call)
                k = skip_ws(text, scan.end)
                if k < n and text[k] == ";":
                    k = skip_ws(text, k + 1)
                    if k < n and text[k] == "{":
                        i = k
                        continue
                if k < n:
                    pieces.append(text[k:])
                return pieces
        except NotJSON:
            return [text]
