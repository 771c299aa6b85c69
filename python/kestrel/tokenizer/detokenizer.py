"""Incremental detokenization for streaming, with stop strings.

Text is produced with a prefix/read-offset window over the token ids (`tokenizers`'
`DecodeStream` has no way to flush bytes that never complete a character, so it is not used):
- `ids[prefix_offset:read_offset]` is context whose text was already emitted; decoding
  `ids[prefix_offset:]` and dropping the context's text gives the new text. Decoding a few
  tokens of context keeps decoder behaviour at sequence starts (SentencePiece's leading-space
  strip) the same as in the middle of a text.
- New text that ends in U+FFFD may be a character whose remaining bytes are in tokens not yet
  generated, so it is held until a later token completes it (or the request finishes).
- Byte-fallback vocabularies (SentencePiece: `<0xE4>` tokens) decode a run of byte tokens as
  one group, and one byte more can turn a valid character into one U+FFFD per byte (`中` +
  `<0xB8>` decodes as four U+FFFD). So new text is held while the last token is a byte token,
  until a token that is not a byte ends the run (or the request finishes), and a prompt that
  ends in a byte token gives no context (its bytes would join the output's). Held text never
  goes out, so the deltas always add up to `tokenizer.decode(output ids)`.

Stop strings are searched in the output text. The match that ENDS first wins (ties: the one that
starts first), which is what a character-by-character stream would see, so the result does not
depend on how the text was split into tokens. A trailing piece of text that is a proper prefix of
some stop string is held back until it can no longer become one (or the request finishes), so no
part of a stop string ever reaches the client.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from kestrel.tokenizer.tokenizer import Tokenizer

_REPLACEMENT_CHAR = "\ufffd"
# Prompt tokens decoded as context in front of the first output tokens.
_PROMPT_CONTEXT_TOKENS = 6


@dataclass(frozen=True)
class DetokenizerStep:
    text_delta: str  # new text safe to send to the client now
    stop_reason: str | None = None  # the stop string that matched in this step, if any


class IncrementalDetokenizer:
    """Turns a request's output token ids into text deltas, one `add_tokens` call per step.

    Invariant: the concatenation of all `text_delta`s is a prefix of `output_text`, and once the
    request is finished (`add_tokens(..., finished=True)` or a stop string matched) it equals
    `output_text`. Without a stop match that is `tokenizer.decode(output_ids)` (for byte-level
    BPE; decoders that strip a sequence's leading space keep the space the prompt implies).
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_token_ids: Sequence[int],
        skip_special_tokens: bool = True,
        stop: Sequence[str] = (),
        include_stop_str_in_output: bool = False,
    ) -> None:
        if isinstance(stop, str):
            stop = [stop]
        for s in stop:
            if not isinstance(s, str) or not s:
                raise ValueError(f"stop strings must be non-empty strings, got {s!r}")
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._stop = list(dict.fromkeys(stop))
        self._include_stop = include_stop_str_in_output
        self._byte_ids = tokenizer.byte_fallback_ids()  # empty unless byte fallback
        # Special tokens the decode drops: a run of byte tokens goes on across them.
        self._skipped: frozenset[int] = frozenset()
        if self._byte_ids and skip_special_tokens:
            added = tokenizer.backend.get_added_tokens_decoder()
            self._skipped = frozenset(i for i, t in added.items() if t.special)
        context = list(prompt_token_ids[-_PROMPT_CONTEXT_TOKENS:])
        context_text = self._decode(context)
        if context_text.endswith(_REPLACEMENT_CHAR) or self._in_byte_run(context):
            # The prompt ends inside a character or a run of byte tokens: its bytes cannot join
            # output bytes, so decode the output on its own.
            context, context_text = [], ""
        self._ids = context  # context tokens, then every output token
        self._prefix_offset = 0
        self._read_offset = len(context)
        self._prefix_text = context_text  # decode(ids[prefix_offset:read_offset])
        self._output_text = ""  # stable output text, cut at a stop string
        self._num_emitted = 0  # characters of _output_text handed out in deltas
        self._stop_reason: str | None = None
        self._finished = False

    @property
    def output_text(self) -> str:
        """All output text decoded so far (including any held back from the deltas)."""
        return self._output_text

    @property
    def stop_reason(self) -> str | None:
        """The stop string that ended the output, or None."""
        return self._stop_reason

    @property
    def finished(self) -> bool:
        return self._finished

    def add_tokens(self, new_ids: Sequence[int], *, finished: bool = False) -> DetokenizerStep:
        """Append newly generated ids; returns the text that can be sent now.

        Pass `finished=True` with the request's last ids (or alone with []) when it ends for any
        other reason than a stop string (eos, length, abort): held-back text is released then.
        After a stop string matched, or after `finished`, further calls return an empty step.
        """
        if self._finished:
            return DetokenizerStep("")
        self._ids.extend(new_ids)
        old_len = len(self._output_text)
        self._output_text += self._decode_new_text(force=finished)
        stop = self._find_stop(old_len)
        if stop is not None:
            self._finished = True
            self._stop_reason = stop
            return DetokenizerStep(self._take(len(self._output_text)), stop)
        if finished:
            self._finished = True
            return DetokenizerStep(self._take(len(self._output_text)))
        held = self._stop_prefix_len(self._output_text)
        return DetokenizerStep(self._take(len(self._output_text) - held))

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special_tokens)

    def _decode_new_text(self, force: bool) -> str:
        """Text of ids[read_offset:] that is complete (all of it when `force`)."""
        if len(self._ids) == self._read_offset:
            return ""
        if not force and self._in_byte_run(self._ids):
            return ""  # a run of byte tokens: its text is known once the run ends
        text = self._decode(self._ids[self._prefix_offset :])
        if len(text) <= len(self._prefix_text):
            return ""  # e.g. only skipped special tokens so far
        if text.endswith(_REPLACEMENT_CHAR) and not force:
            return ""  # maybe an unfinished character: wait for more tokens
        new_text = text[len(self._prefix_text) :]
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        self._prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        return new_text

    def _in_byte_run(self, ids: list[int]) -> bool:
        """True when the last token of `ids` that the decode keeps is a byte token."""
        if not self._byte_ids:
            return False
        for token in reversed(ids):
            if token not in self._skipped:
                return token in self._byte_ids
        return False

    def _find_stop(self, old_len: int) -> str | None:
        """Find the first-ending stop string match that ends after `old_len` and cut the output
        text at it. Matches ending at or before `old_len` were looked for in earlier steps."""
        text = self._output_text
        best: tuple[int, int, str] | None = None  # (end, start, stop string)
        for s in self._stop:
            start = text.find(s, max(0, old_len - len(s) + 1))
            if start != -1 and (best is None or (start + len(s), start) < best[:2]):
                best = (start + len(s), start, s)
        if best is None:
            return None
        end, start, s = best
        self._output_text = text[: end if self._include_stop else start]
        return s

    def _stop_prefix_len(self, text: str) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of a stop string."""
        longest = 0
        for s in self._stop:
            for k in range(min(len(s) - 1, len(text)), longest, -1):
                if text.endswith(s[:k]):
                    longest = k
                    break
        return longest

    def _take(self, upto: int) -> str:
        """Hand out output text up to character `upto` (never re-sends or un-sends text)."""
        upto = max(upto, self._num_emitted)
        delta = self._output_text[self._num_emitted : upto]
        self._num_emitted = upto
        return delta
