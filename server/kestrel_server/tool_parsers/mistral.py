"""Mistral tool calls, after the `[TOOL_CALLS]` token, in either of two shapes:

    [TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}, {...}]   (v3 tokenizers)
    [TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}[TOOL_CALLS]other[ARGS]{...}     (v11+)

Text before the first `[TOOL_CALLS]` is content. Call ids are 9 alphanumeric characters, the
only shape Mistral's chat templates accept back in the history.
"""

from __future__ import annotations

from kestrel_server.tool_parsers.base import (
    CallPiece,
    FixedIdMixin,
    Piece,
    ToolParser,
    add_incomplete,
    array_of_calls,
    partial_suffix,
)
from kestrel_server.tool_parsers.json_scan import NotJSON, skip_ws, value_end

TOOL_CALLS = "[TOOL_CALLS]"
ARGS = "[ARGS]"
CALL_ID = "[CALL_ID]"
EOS = "</s>"  # decoded too, since the markers need skip_special_tokens=false


class MistralToolParser(FixedIdMixin, ToolParser):
    name = "mistral"
    needs_special_tokens = True

    def pieces(self, text: str, final: bool) -> list[Piece]:
        text = text.replace(EOS, "")
        if not final:
            text = text[: len(text) - partial_suffix(text, EOS)]
        j = text.find(TOOL_CALLS)
        if j < 0:
            if not final:
                return [text[: len(text) - partial_suffix(text, TOOL_CALLS)]]
            return [text]
        pieces: list[Piece] = [text[:j]]
        i = skip_ws(text, j + len(TOOL_CALLS))
        if i >= len(text):
            add_incomplete(pieces, CallPiece(name=None, arguments=""), text[j:], final)
            return pieces
        try:
            if text[i] == "[":
                end = array_of_calls(text, i, final, pieces)
                if end is not None and end < len(text):
                    pieces.append(text[end:])
                return pieces
            self._named_calls(text, i, j, final, pieces)
        except NotJSON:
            return [text]
        return pieces

    def _named_calls(self, text: str, i: int, j: int, final: bool, pieces: list[Piece]) -> None:
        """`name[ARGS]{...}` calls, each after its own [TOOL_CALLS]."""
        n = len(text)
        while True:
            a = text.find(ARGS, i)
            if a < 0:
                add_incomplete(pieces, CallPiece(name=None, arguments=""), text[j:], final)
                return
            name = text[i:a].split(CALL_ID, 1)[0].strip()
            v = skip_ws(text, a + len(ARGS))
            if v >= n:
                pieces.append(CallPiece(name=name, arguments=""))
                return
            end = value_end(text, v)
            if end is None:
                pieces.append(CallPiece(name=name, arguments=text[v:].rstrip()))
                return
            pieces.append(CallPiece(name=name, arguments=text[v:end], complete=True))
            k = skip_ws(text, end)
            if text.startswith(TOOL_CALLS, k):
                j = k
                i = skip_ws(text, k + len(TOOL_CALLS))
                continue
            if k >= n or (not final and TOOL_CALLS.startswith(text[k:])):
                return
            pieces.append(text[end:])
            return
