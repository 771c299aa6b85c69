"""The tool-call parser interface, and the one streaming algorithm every family shares.

A family only says how to split a model's text into pieces: outside text (`str`) and calls
(`CallPiece`: the name once complete, the arguments' raw JSON text so far). It does so for the
whole text so far, holding back anything that might still turn into a marker (`final=False`),
and the shared code turns those pieces into a response (`extract`) or into stream deltas
(`extract_streaming`: the difference between this delta's pieces and what was already sent).
So a stream's concatenated deltas equal the one-shot parse of the same text, however it was
split, as long as every family's pieces only grow as text arrives (names appear complete,
arguments grow by appending, held-back text is never shown early).

Re-splitting the whole text per delta costs a `str.find` over it for plain content (C speed);
JSON scanning is only over the call regions.
"""

from __future__ import annotations

import secrets
import string
from dataclasses import dataclass, field
from typing import ClassVar

from kestrel_server.protocol import DeltaFunctionCall, DeltaToolCall, FunctionCall, ToolCall
from kestrel_server.tool_parsers.json_scan import NotJSON, ObjectScan, scan_object, skip_ws

_WS = " \t\n\r"


@dataclass
class CallPiece:
    name: str | None  # None until the whole name has arrived
    arguments: str  # raw JSON text of the arguments so far (complete once `complete`)
    complete: bool = False


Piece = str | CallPiece


@dataclass
class ExtractedToolCalls:
    content: str | None  # text outside the calls (None when there is none)
    tool_calls: list[ToolCall] = field(default_factory=list)


@dataclass
class DeltaToolCalls:
    content: str | None = None  # new content text (None: none in this delta)
    tool_calls: list[DeltaToolCall] = field(default_factory=list)


def random_call_id() -> str:
    return f"call_{secrets.token_hex(12)}"


def partial_suffix(text: str, marker: str) -> int:
    """Length of the longest proper prefix of `marker` that `text` ends with."""
    for k in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:k]):
            return k
    return 0


def assemble_content(pieces: list[Piece], final: bool) -> str:
    """Outside text joined. Whitespace next to a call is dropped (text before a call loses its
    trailing whitespace, text after one its leading whitespace); the last piece's trailing
    whitespace is held back until the text is final (a call might follow it)."""
    merged: list[Piece] = []
    for piece in pieces:
        if isinstance(piece, str) and merged and isinstance(merged[-1], str):
            merged[-1] += piece
        else:
            merged.append(piece)
    pieces = merged
    out = []
    for i, piece in enumerate(pieces):
        if not isinstance(piece, str):
            continue
        text = piece
        if i > 0:
            text = text.lstrip(_WS)
        if i + 1 < len(pieces) or not final:
            text = text.rstrip(_WS)
        out.append(text)
    return "".join(out)


class ToolParser:
    """Parses one choice's output. `extract` reads a whole response; `extract_streaming` is fed
    the deltas of one stream in order (one parser object per stream and choice), the last call
    with `final=True`."""

    name: ClassVar[str] = ""
    # True: the markers are special tokens, which skip_special_tokens would delete from the text
    # (the server then decodes the request with skip_special_tokens=false unless the client
    # set it).
    needs_special_tokens: ClassVar[bool] = False

    def __init__(self) -> None:
        self._text = ""
        self._sent_content = ""  # content text already streamed
        self._sent_calls: list[tuple[str, int]] = []  # per call emitted: (id, argument chars)

    # ---- what a family implements ----

    def pieces(self, text: str, final: bool) -> list[Piece]:
        raise NotImplementedError

    def new_call_id(self) -> str:
        return random_call_id()

    # ---- shared ----

    def extract(self, text: str) -> ExtractedToolCalls:
        pieces = self.pieces(text, final=True)
        content = assemble_content(pieces, final=True)
        calls = [
            ToolCall(
                id=self.new_call_id(),
                function=FunctionCall(name=p.name, arguments=p.arguments or "{}"),
            )
            for p in pieces
            if isinstance(p, CallPiece) and p.name is not None
        ]
        return ExtractedToolCalls(content=content or None, tool_calls=calls)

    def extract_streaming(self, delta_text: str, *, final: bool = False) -> DeltaToolCalls:
        self._text += delta_text
        pieces = self.pieces(self._text, final=final)
        out = DeltaToolCalls()
        content = assemble_content(pieces, final=final)
        # Content only grows by appending; anything else (never expected) is not re-sent.
        if len(content) > len(self._sent_content) and content.startswith(self._sent_content):
            out.content = content[len(self._sent_content) :]
            self._sent_content = content
        calls = [p for p in pieces if isinstance(p, CallPiece) and p.name is not None]
        for index, call in enumerate(calls):
            arguments = call.arguments
            if final and not arguments:
                arguments = "{}"
            if index >= len(self._sent_calls):
                call_id = self.new_call_id()
                self._sent_calls.append((call_id, len(arguments)))
                function = DeltaFunctionCall(name=call.name, arguments=arguments)
                out.tool_calls.append(
                    DeltaToolCall(index=index, id=call_id, type="function", function=function)
                )
                continue
            call_id, sent = self._sent_calls[index]
            if len(arguments) > sent:
                function = DeltaFunctionCall(arguments=arguments[sent:])
                out.tool_calls.append(DeltaToolCall(index=index, function=function))
                self._sent_calls[index] = (call_id, len(arguments))
        return out

    @property
    def called_tools(self) -> bool:
        """Whether the stream so far produced a tool call."""
        return bool(self._sent_calls)


def call_from_object(text: str, scan: ObjectScan) -> CallPiece:
    """A call object `{"name": ..., "arguments" | "parameters": {...}}` as scanned so far."""
    name = scan.string_of(text, "name")
    key = next((k for k in ("arguments", "parameters") if k in scan.fields), None)
    complete = scan.end is not None
    if key is None:
        arguments = "{}" if complete else ""
    else:
        arguments = scan.text_of(text, key) or ""
    return CallPiece(name=name, arguments=arguments, complete=complete)


def add_incomplete(pieces: list[Piece], call: CallPiece, raw: str, final: bool) -> None:
    """An unfinished call ends the pieces: while streaming, as a call; in the final text, as a
    call if its name arrived (its arguments as far as they went), else as plain text."""
    if final and call.name is None:
        pieces.append(raw)
    else:
        pieces.append(call)


def array_of_calls(text: str, start: int, final: bool, pieces: list[Piece]) -> int | None:
    """Appends the calls of the JSON array opening at `text[start]` ('[') to `pieces`; returns
    the index after the array, or None when it is incomplete."""
    n = len(text)
    i = start + 1
    expect_item = True
    while True:
        i = skip_ws(text, i)
        if i >= n:
            return None
        c = text[i]
        if c == "]":
            return i + 1
        if c == "," and not expect_item:
            expect_item = True
            i += 1
            continue
        if c != "{" or not expect_item:
            raise NotJSON(f"expected a call object at index {i}, got {c!r}")
        scan = scan_object(text, i)
        call = call_from_object(text, scan)
        if scan.end is None:
            add_incomplete(pieces, call, text[i:], final)
            return None
        pieces.append(call)
        i = scan.end
        expect_item = False


class FixedIdMixin:
    """Ids of 9 alphanumeric characters: Mistral's chat templates refuse any other shape."""

    def new_call_id(self) -> str:
        alphabet = string.ascii_letters + string.digits
        return "".join(secrets.choice(alphabet) for _ in range(9))
