"""The tokenizer a GGUF file describes, built as a `tokenizers.Tokenizer` from its metadata.

GGUF has no tokenizer.json: it stores the vocabulary (`tokenizer.ggml.tokens`, with a type per
token), BPE merges or SentencePiece scores, the special token ids, the pre-tokenizer family
(`tokenizer.ggml.pre`) and the chat template. Two vocabularies are supported:

- `gpt2`: byte-level BPE. Tokens are spelled in the GPT-2 byte alphabet; the text is split by
  the regex of its pre-tokenizer family before the byte mapping, as the original tokenizers
  split it (Llama 3 style: pieces in the vocabulary are taken whole, like tiktoken; Qwen2 style:
  NFC first, digits one by one; StarCoder style: digits one by one, then GPT-2's regex).
- `llama`: SentencePiece-style BPE with byte fallback (`<0xNN>` tokens) and "▁" for spaces, as
  SentencePiece encodes it: every space becomes "▁" and, with `add_space_prefix` (the default),
  one "▁" is put in front of the text even when it already starts with a space (" " is "▁▁").
  Text between special tokens gets its own prefix, as llama.cpp does. Files without merges get
  them from the token scores.

Token types (llama.cpp): 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte.
Control tokens become special added tokens, user-defined ones plain added tokens, so both
always match whole.
"""

from __future__ import annotations

import logging
from functools import cache
from typing import Any

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers

from kestrel.loader.gguf_loader import GGUFFile
from kestrel.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

_CONTROL, _USER_DEFINED = 3, 4
_SPACE = "\u2581"  # SentencePiece's visible space

# Split regexes of the byte-level pre-tokenizer families (the model's training-time splits).
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_LLAMA3_PRE = ("llama3", "llama-v3", "llama-bpe", "falcon3", "pixtral")
_SPLIT_BY_PRE = {
    **dict.fromkeys((*_LLAMA3_PRE, "smaug-bpe", "dbrx"), _LLAMA3_SPLIT),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "megrez"), _QWEN2_SPLIT),
}
# Families whose original tokenizer takes a pre-token that is itself in the vocabulary whole,
# without merging (tiktoken's rule; `ignore_merges` in tokenizer.json, as llama.cpp does).
_IGNORE_MERGES_PRE = _LLAMA3_PRE
# Families whose original tokenizer applies Unicode NFC before splitting (Qwen2's tokenizer.json).
_NFC_PRE = ("qwen2", "deepseek-r1-qwen", "megrez")
# Families that split with GPT-2's own regex (the ByteLevel default), optionally after
# isolating every digit (StarCoder's tokenizer and those derived from it).
_GPT2_PRE = ("default", "gpt2", "gpt-2", "olmo", "phi-2")
_DIGITS_THEN_GPT2_PRE = ("smollm", "starcoder", "refact")


class GGUFTokenizerError(ValueError):
    """The GGUF tokenizer metadata is missing, inconsistent or of an unsupported kind."""


@cache
def _byte_alphabet() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (256 entries)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def _byte_level_spelling(token: str) -> str:
    """A vocabulary entry in the byte alphabet (files from some converters store raw text)."""
    alphabet = _byte_alphabet()
    if set(token) <= set(alphabet.values()):
        return token
    return "".join(alphabet[b] for b in token.encode("utf-8"))


def _merges(f: GGUFFile) -> list[tuple[str, str]] | None:
    raw = f.get("tokenizer.ggml.merges")
    if raw is None:
        return None
    merges = []
    for entry in raw:
        left, sep, right = entry.partition(" ")
        if not sep:
            raise GGUFTokenizerError(f"{f.path}: malformed merge {entry!r} (no space)")
        merges.append((left, right))
    return merges


def merges_from_scores(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """BPE merges implied by a SentencePiece vocabulary: every split of a token into two
    vocabulary pieces, ranked by the merged token's score (higher first), then by the lengths
    of the left and right pieces (longer first), then by token order (as transformers ranks
    them)."""
    vocab = {token: i for i, token in enumerate(tokens)}
    ranked: list[tuple[float, int, int, int, int, int, str, str]] = []
    for token_id, token in enumerate(tokens):
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in vocab and right in vocab:
                key = (-scores[token_id], -cut, -len(right), token_id, vocab[left], vocab[right])
                ranked.append((*key, left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def _byte_level_backend(f: GGUFFile, tokens: list[str]) -> tokenizers.Tokenizer:
    merges = _merges(f)
    if merges is None:
        raise GGUFTokenizerError(f"{f.path}: a gpt2 tokenizer needs tokenizer.ggml.merges")
    vocab = {_byte_level_spelling(t): i for i, t in enumerate(tokens)}
    pre = str(f.get("tokenizer.ggml.pre", "default"))
    model = models.BPE(
        vocab=vocab, merges=merges, fuse_unk=False, ignore_merges=pre in _IGNORE_MERGES_PRE
    )
    backend = tokenizers.Tokenizer(model)
    if pre in _NFC_PRE:
        backend.normalizer = normalizers.NFC()
    split = _SPLIT_BY_PRE.get(pre)
    if split is not None:
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(split), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    elif pre in _DIGITS_THEN_GPT2_PRE:
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        )
    else:
        if pre not in _GPT2_PRE:
            logger.warning("%s: unknown pre-tokenizer %r; splitting like GPT-2", f.path, pre)
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    return backend


def _sentencepiece_backend(f: GGUFFile, tokens: list[str]) -> tokenizers.Tokenizer:
    merges = _merges(f)
    if merges is None:
        scores = f.get("tokenizer.ggml.scores")
        if scores is None or len(scores) != len(tokens):
            raise GGUFTokenizerError(
                f"{f.path}: a llama tokenizer needs tokenizer.ggml.merges or one score per token"
            )
        merges = merges_from_scores(tokens, [float(s) for s in scores])
    unk_id = f.get("tokenizer.ggml.unknown_token_id")
    unk = tokens[int(unk_id)] if unk_id is not None else None
    vocab = {t: i for i, t in enumerate(tokens)}
    model = models.BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True, byte_fallback=True)
    backend = tokenizers.Tokenizer(model)
    add_space = bool(f.get("tokenizer.ggml.add_space_prefix", True))
    # SentencePiece's normalizer with Llama's spec (identity, add_dummy_prefix,
    # escape_whitespaces): a "▁" in front of every non-empty text, then " " -> "▁". No
    # pre-tokenizer: BPE runs over the whole text, as SentencePiece's does. (A Metaspace
    # pre-tokenizer would skip the prefix of a text that starts with a space.)
    steps_in = [normalizers.Replace(" ", _SPACE)]
    if add_space:
        steps_in.insert(0, normalizers.Prepend(_SPACE))
    if f.get("tokenizer.ggml.remove_extra_whitespaces", False):
        # Leading and trailing spaces dropped, inner runs of spaces made one.
        steps_in[:0] = [
            normalizers.Replace(Regex(r"\A +| +\z"), ""),
            normalizers.Replace(Regex(" {2,}"), " "),
        ]
    backend.normalizer = normalizers.Sequence(steps_in)
    backend.pre_tokenizer = None
    steps = [decoders.Replace(_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_space:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    backend.decoder = decoders.Sequence(steps)
    return backend


def _chat_template(f: GGUFFile) -> str | dict[str, str] | None:
    default = f.get("tokenizer.chat_template")
    names = f.get("tokenizer.chat_templates") or []
    named = {n: f.get(f"tokenizer.chat_template.{n}") for n in names}
    named = {n: t for n, t in named.items() if t is not None}
    if not named:
        return default
    if default is not None:
        named["default"] = default
    return named


def _token_at(tokens: list[str], f: GGUFFile, key: str) -> str | None:
    token_id = f.get(f"tokenizer.ggml.{key}")
    if token_id is None:
        return None
    if not 0 <= int(token_id) < len(tokens):
        raise GGUFTokenizerError(
            f"{f.path}: tokenizer.ggml.{key}={token_id} is out of range [0, {len(tokens)})"
        )
    return tokens[int(token_id)]


def load_gguf_tokenizer(f: GGUFFile) -> Tokenizer:
    """The file's tokenizer: vocabulary, special tokens, BOS/EOS flags and chat template."""
    kind = f.get("tokenizer.ggml.model")
    tokens = f.get("tokenizer.ggml.tokens")
    if kind is None or not tokens:
        raise GGUFTokenizerError(
            f"{f.path} holds no tokenizer (tokenizer.ggml.model / tokenizer.ggml.tokens); "
            "pass tokenizer=<a Hugging Face model directory> instead"
        )
    if kind == "gpt2":
        backend = _byte_level_backend(f, tokens)
    elif kind == "llama":
        backend = _sentencepiece_backend(f, tokens)
    else:
        raise GGUFTokenizerError(
            f"{f.path}: tokenizer.ggml.model={kind!r} is not supported; supported: gpt2, llama"
        )
    token_types = f.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    byte_alphabet = set(_byte_alphabet().values())
    control: list[AddedToken] = []
    user_defined: list[AddedToken] = []
    for token, token_type in zip(tokens, token_types):
        if token_type == _CONTROL:
            if kind == "gpt2" and not set(token) <= byte_alphabet:
                continue  # not a byte-level spelling: not a real vocabulary entry
            control.append(AddedToken(token, special=True, normalized=False))
        elif token_type == _USER_DEFINED:
            user_defined.append(AddedToken(token, special=False, normalized=False))
    backend.add_special_tokens(control)
    backend.add_tokens(user_defined)
    add_bos: Any = f.get("tokenizer.ggml.add_bos_token")
    if add_bos is None and kind == "llama":
        add_bos = True  # SentencePiece vocabularies start with BOS unless the file says not
    return Tokenizer.from_tokenizers(
        backend,
        bos_token=_token_at(tokens, f, "bos_token_id"),
        eos_token=_token_at(tokens, f, "eos_token_id"),
        pad_token=_token_at(tokens, f, "padding_token_id"),
        unk_token=_token_at(tokens, f, "unknown_token_id"),
        extra_special_tokens=[t.content for t in control],
        chat_template=_chat_template(f),
        add_bos_token=add_bos,
        add_eos_token=f.get("tokenizer.ggml.add_eos_token"),
        name_or_path=str(f.path),
    )
