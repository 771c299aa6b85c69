"""Hermes-style tool calls, as Qwen2.5 and Qwen3 write them:

some text<tool_call>
{"name": "get_weather", "arguments": {"city": "Paris"}}
</tool_call>
<tool_call>
{"name": ..., "arguments": ...}
</tool_call>
"""

from __future__ import annotations

from kestrel_server.tool_parsers.base import (
    CallPiece,
    Piece,
    ToolParser,
    add_incomplete,
    call_from_object,
    partial_suffix,
)
from kestrel_server.tool_parsers.json_scan import NotJSON, scan_object, skip_ws

START = "<tool_call>"
END = "</tool_call>"


class HermesToolParser(ToolParser):
    name = "hermes"

    def pieces(self, text: str, final: bool) -> list[Piece]:
        pieces: list[Piece] = []
        n = len(text)
        i = 0
        while True:
            j = text.find(START, i)
            if j < 0:
                tail = text[i:]
                if not final:
                    tail = tail[: len(tail) - partial_suffix(tail, START)]
                pieces.append(tail)
                return pieces
            pieces.append(text[i:j])
            body = skip_ws(text, j + len(START))
            if body >= n:
                add_incomplete(pieces, CallPiece(name=None, arguments=""), text[j:], final)
                return pieces
            try:
                scan = scan_object(text, body)
                call = call_from_object(text, scan)
            except NotJSON:
                scan = call = None
            if call is None or (call.complete and call.name is None):
                # Not a call after all: the block is text (up to its closing tag, if any).
                close = text.find(END, body)
                stop = n if close < 0 else close + len(END)
                pieces.append(text[j:stop])
                i = stop
                continue
            if scan.end is None:
                add_incomplete(pieces, call, text[j:], final)
                return pieces
            pieces.append(call)
            k = skip_ws(text, scan.end)
            if text.startswith(END, k):
                i = k + len(END)
            elif k >= n or (not final and END.startswith(text[k:])):
                return pieces  # the closing tag has not (fully) arrived
            else:
                i = scan.end  # no closing tag: what follows is text
