"""`<think>...</think>` reasoning parsers, chosen with `kestrel serve --reasoning-parser NAME`.

- `deepseek_r1`: the reply is reasoning until `</think>` (DeepSeek-R1 distills' templates open
  the `<think>` block in the prompt; a leading `<think>` in the reply is dropped too); a reply
  without `</think>` is all reasoning.
- `qwen3`: a reply that starts with `<think>` is reasoning until `</think>` (all of it when the
  block never closes); any other reply is all content (thinking off: Qwen3's template puts an
  empty think block in the prompt).

Content is what follows `</think>`, leading whitespace dropped. Streaming uses the split of
the whole text so far (held back: a partial tag), so the concatenated deltas equal the one-shot
parse of the same text.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from kestrel_server.tool_parsers.base import partial_suffix

THINK = "<think>"
END_THINK = "</think>"


@dataclass
class ReasoningSplit:
    reasoning: str | None
    content: str | None


class ReasoningParser:
    name: ClassVar[str] = ""
    # False: a reply that does not open with <think> has no reasoning.
    reasoning_without_open_tag: ClassVar[bool] = True

    def __init__(self) -> None:
        self._text = ""
        self._sent = ("", "")

    def split(self, text: str, final: bool) -> tuple[str, str]:
        """(reasoning, content) of the text so far."""
        if text.startswith(THINK):
            body = text[len(THINK) :]
        elif not final and THINK.startswith(text):
            return "", ""  # `<think>` may be arriving (or nothing has)
        elif self.reasoning_without_open_tag:
            body = text
        else:
            return "", text
        end = body.find(END_THINK)
        if end < 0:
            if not final:
                body = body[: len(body) - partial_suffix(body, END_THINK)]
            return body, ""
        return body[:end], body[end + len(END_THINK) :].lstrip()

    def extract(self, text: str) -> ReasoningSplit:
        reasoning, content = self.split(text, final=True)
        return ReasoningSplit(reasoning or None, content or None)

    def extract_streaming(self, delta_text: str, *, final: bool = False) -> ReasoningSplit:
        """The new reasoning and content text of this delta (None where there is none)."""
        self._text += delta_text
        reasoning, content = self.split(self._text, final)
        sent_reasoning, sent_content = self._sent
        new_reasoning = new_content = None
        if len(reasoning) > len(sent_reasoning) and reasoning.startswith(sent_reasoning):
            new_reasoning = reasoning[len(sent_reasoning) :]
            sent_reasoning = reasoning
        if len(content) > len(sent_content) and content.startswith(sent_content):
            new_content = content[len(sent_content) :]
            sent_content = content
        self._sent = (sent_reasoning, sent_content)
        return ReasoningSplit(new_reasoning, new_content)


class DeepSeekR1ReasoningParser(ReasoningParser):
    name = "deepseek_r1"


class Qwen3ReasoningParser(ReasoningParser):
    name = "qwen3"
    reasoning_without_open_tag = False


REASONING_PARSERS: dict[str, type[ReasoningParser]] = {
    cls.name: cls for cls in (DeepSeekR1ReasoningParser, Qwen3ReasoningParser)
}
