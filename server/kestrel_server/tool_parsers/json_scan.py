"""Scanning JSON that may still be arriving: where a value ends, or that it has not ended yet.

Tool-call parsers read JSON objects out of model text one delta at a time, so every scanner here
takes the text so far and answers "complete, ending at index i", "incomplete (more text may
finish it)", or raises `NotJSON` when no continuation could make it valid JSON at that point.
Indices are str indices into the text; spans are half-open [start, end).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

_WS = " \t\n\r"
# Inside a bracketed value only these characters change the scanner's state.
_SPECIAL = re.compile(r'["\\{}\[\]]')
_STRING_SPECIAL = re.compile(r'["\\]')
_PRIMITIVE = re.compile(r"-?[0-9][0-9eE.+-]*|true|false|null|-")
_LITERALS = ("true", "false", "null")


class NotJSON(ValueError):
    """The text cannot be (the start of) the JSON expected here."""


def skip_ws(text: str, i: int) -> int:
    n = len(text)
    while i < n and text[i] in _WS:
        i += 1
    return i


def string_end(text: str, i: int) -> int | None:
    """`text[i]` is '"': the index after the closing quote, or None when it has not arrived."""
    j = i + 1
    while True:
        m = _STRING_SPECIAL.search(text, j)
        if m is None:
            return None
        if m.group() == '"':
            return m.end()
        j = m.end() + 1  # skip the escaped character
        if j > len(text):
            return None


def _bracket_end(text: str, i: int) -> int | None:
    """`text[i]` opens an object or array: the index after its matching close, or None."""
    stack = [text[i]]
    j = i + 1
    while True:
        m = _SPECIAL.search(text, j)
        if m is None:
            return None
        c = m.group()
        if c == '"':
            end = string_end(text, m.start())
            if end is None:
                return None
            j = end
            continue
        if c == "\\":
            raise NotJSON(f"a backslash outside a string at index {m.start()}")
        if c in "{[":
            stack.append(c)
        else:
            opener = stack.pop()
            if (opener, c) not in (("{", "}"), ("[", "]")):
                raise NotJSON(f"{c!r} at index {m.start()} does not close {opener!r}")
            if not stack:
                return m.end()
        j = m.end()


def value_end(text: str, i: int) -> int | None:
    """The end of the JSON value starting at `text[i]` (not whitespace), or None if it may still
    be arriving. A number or literal that reaches the end of the text is incomplete."""
    c = text[i]
    if c == '"':
        return string_end(text, i)
    if c in "{[":
        return _bracket_end(text, i)
    m = _PRIMITIVE.match(text, i)
    if m is None:
        rest = text[i:]
        if any(lit.startswith(rest) for lit in _LITERALS):
            return None
        raise NotJSON(f"no JSON value starts at index {i}: {text[i : i + 20]!r}")
    if m.end() == len(text):
        return None
    return m.end()


@dataclass
class ObjectScan:
    """A JSON object seen so far: its end (None while incomplete) and, per top-level key whose
    value has started, the value's span so far and whether that value is complete."""

    end: int | None
    fields: dict[str, tuple[int, int, bool]] = field(default_factory=dict)

    def text_of(self, text: str, key: str) -> str | None:
        """The raw text of `key`'s value so far (trailing whitespace held back), or None."""
        span = self.fields.get(key)
        if span is None:
            return None
        return text[span[0] : span[1]].rstrip(_WS)

    def string_of(self, text: str, key: str) -> str | None:
        """`key`'s value when it is a complete JSON string, else None."""
        span = self.fields.get(key)
        if span is None or not span[2] or text[span[0]] != '"':
            return None
        return json.loads(text[span[0] : span[1]])


def scan_object(text: str, start: int) -> ObjectScan:
    """Scans the object opening at `text[start]` ('{'), as far as the text goes."""
    if text[start] != "{":
        raise NotJSON(f"expected '{{' at index {start}")
    scan = ObjectScan(end=None)
    n = len(text)
    i = start + 1
    expect_key = True
    while True:
        i = skip_ws(text, i)
        if i >= n:
            return scan
        c = text[i]
        if c == "}":
            scan.end = i + 1
            return scan
        if c == "," and not expect_key:
            expect_key = True
            i += 1
            continue
        if c != '"' or not expect_key:
            raise NotJSON(f"expected a key at index {i}, got {c!r}")
        key_end = string_end(text, i)
        if key_end is None:
            return scan
        key = json.loads(text[i:key_end])
        i = skip_ws(text, key_end)
        if i >= n:
            return scan
        if text[i] != ":":
            raise NotJSON(f"expected ':' at index {i}, got {text[i]!r}")
        i = skip_ws(text, i + 1)
        if i >= n:
            return scan
        end = value_end(text, i)
        if end is None:
            scan.fields[key] = (i, n, False)
            return scan
        scan.fields[key] = (i, end, True)
        i = end
        expect_key = False


def is_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True
