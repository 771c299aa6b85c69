"""Byte-level (`gpt2`) GGUF vocabularies: each supported `tokenizer.ggml.pre` family against the
split the original tokenizer makes, and the whole encode against a small BPE written here.

The original splits are the published patterns, run with Python's `regex` module: Llama 3's
tiktoken pattern (contractions case-insensitive, numbers in groups of 1-3 digits), Qwen2's
(NFC first, every digit alone), GPT-2's, and StarCoder's (every digit alone, then GPT-2's).
"""

from __future__ import annotations

import random
import unicodedata
from functools import cache
from itertools import pairwise
from pathlib import Path

import pytest

from kestrel.loader.gguf_loader import GGUFFile
from kestrel.loader.gguf_tokenizer import load_gguf_tokenizer
from tests.gguf.fixtures import write_gguf

regex = pytest.importorskip("regex")

_CONTRACTIONS = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)"
LLAMA3 = (
    _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
QWEN2 = (
    _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"

# pre-tokenizer name -> (NFC first, isolate every digit first, split pattern)
ORIGINAL_SPLITS = {
    **dict.fromkeys(
        ("llama3", "llama-v3", "llama-bpe", "falcon3", "pixtral", "smaug-bpe", "dbrx"),
        (False, False, LLAMA3),
    ),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "megrez"), (True, False, QWEN2)),
    **dict.fromkeys(("default", "gpt2", "gpt-2", "olmo", "phi-2"), (False, False, GPT2)),
    **dict.fromkeys(("smollm", "starcoder", "refact"), (False, True, GPT2)),
}
# Families whose original tokenizer takes a pre-token found in the vocabulary whole (tiktoken).
WHOLE_PIECES = ("llama3", "llama-v3", "llama-bpe", "falcon3", "pixtral")

VIETNAMESE = "Tiếng Việt là ngôn ngữ của người Việt"
CORPUS = [
    "",
    " ",
    "Hello world",
    "  leading, trailing   and    runs   ",
    "tabs\tand\nnewlines\n\n\r\n x\u00a0nbsp\u3000ideographic",
    VIETNAMESE,
    unicodedata.normalize("NFD", VIETNAMESE),
    "e\u0301 a\u0300\u0323 \u0301alone x\u0302\u0303y",
    "don't I'LL we'Re they've she'd IT'S 'S 'x",
    "numbers 1 12 123 1234 12345 1234567 3.14159 -42 1,000,000 ١٢٣ ²½ Ⅻ",
    "東京は日本の首都です。你好，世界！안녕하세요",
    "emoji 😀🎉 family 👩\u200d👩\u200d👧 flags 🇫🇷🇯🇵 skin 👋🏽",
    "def f(x):\n    return x ** 2  # square\n\n",
    "mixed: Việt😀123abc's\t\n  東京!!  ",
]


def _random_texts(count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    atoms = [*" \t\n\r\u00a0abcXYZ'sStTdD0123456789.,!?-_/\"()東京你好😀🎉éếệñßſİ١²½"]
    atoms += ["\u0301", "\u0302", "\u0323", "'ll", "'RE", "   ", "\n\n", "Việt", "12345"]
    return ["".join(rng.choice(atoms) for _ in range(rng.randint(1, 20))) for _ in range(count)]


@cache
def _byte_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character map, written out independently of Kestrel's."""
    keep = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _spell(text: str) -> str:
    return "".join(_byte_alphabet()[b] for b in text.encode("utf-8"))


def original_split(pre: str, text: str) -> list[str]:
    """The original tokenizer's pre-tokens of `text`, in the byte alphabet."""
    nfc, digits_first, pattern = ORIGINAL_SPLITS[pre]
    if nfc:
        text = unicodedata.normalize("NFC", text)
    parts = regex.findall(r"\p{N}|\P{N}+", text) if digits_first else [text]
    return [_spell(p) for part in parts for p in regex.findall(pattern, part)]


def _write_byte_level_gguf(path: Path, pre: str, tokens: list[str], merges: list[str]) -> Path:
    metadata = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": pre,
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [1] * len(tokens),
        "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.bos_token_id": 0,
        "tokenizer.ggml.eos_token_id": 0,
        "tokenizer.ggml.add_bos_token": False,
    }
    return write_gguf(path, "llama", metadata, {})


def _toy_vocab() -> tuple[list[str], list[str]]:
    """The 256 byte tokens, merges for "the"/" the", and whole-word tokens no merge reaches."""
    tokens = list(_byte_alphabet().values())
    merges = ["t h", "th e", "Ġ the"]
    tokens += ["th", "the", "Ġthe"]
    tokens += [_spell(" Việt"), _spell("Tiếng"), _spell("123")]  # reachable only whole
    return tokens, merges


@pytest.mark.parametrize("pre", sorted(ORIGINAL_SPLITS))
def test_pre_tokenizer_matches_original_split(tmp_path, pre):
    tokens, merges = _toy_vocab()
    ours = load_gguf_tokenizer(
        GGUFFile(_write_byte_level_gguf(tmp_path / "v.gguf", pre, tokens, merges))
    )
    backend = ours.backend
    for text in [*CORPUS, *_random_texts(1500, seed=3)]:
        normalized = backend.normalizer.normalize_str(text) if backend.normalizer else text
        pieces = [p for p, _ in backend.pre_tokenizer.pre_tokenize_str(normalized)]
        assert pieces == original_split(pre, text), text


def _bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """Merge the lowest-ranked adjacent pair until none is left (GPT-2's BPE)."""
    parts = list(word)
    while len(parts) > 1:
        pairs = [(ranks.get((a, b), len(ranks)), i) for i, (a, b) in enumerate(pairwise(parts))]
        rank, i = min(pairs)
        if rank == len(ranks):
            break
        parts[i : i + 2] = [parts[i] + parts[i + 1]]
    return parts


def original_encode(pre: str, text: str, vocab: dict[str, int], ranks) -> list[int]:
    ids = []
    for piece in original_split(pre, text):
        if pre in WHOLE_PIECES and piece in vocab:
            ids.append(vocab[piece])
        else:
            ids.extend(vocab[p] for p in _bpe(piece, ranks))
    return ids


@pytest.mark.parametrize("pre", ["llama-bpe", "qwen2", "gpt2", "starcoder"])
def test_encode_matches_original(tmp_path, pre):
    tokens, merges = _toy_vocab()
    path = _write_byte_level_gguf(tmp_path / "v.gguf", pre, tokens, merges)
    ours = load_gguf_tokenizer(GGUFFile(path))
    vocab = {t: i for i, t in enumerate(tokens)}
    ranks = {tuple(m.split(" ")): r for r, m in enumerate(merges)}
    for text in [*CORPUS, "the Tiếng Việt 123 the", *_random_texts(500, seed=4)]:
        assert ours.encode(text) == original_encode(pre, text, vocab, ranks), text
        assert ours.decode(ours.encode(text)) == (
            unicodedata.normalize("NFC", text) if pre == "qwen2" else text
        )
    # Llama 3 takes a word in the vocabulary whole even where no merge leads to it.
    words = [ours.id_to_token(i) for i in ours.encode("Tiếng Việt")]
    if pre == "llama-bpe":
        assert words == [_spell("Tiếng"), _spell(" Việt")]
    else:
        assert len(words) > 2


QWEN2_VOCAB = Path("/work/shared/peers/ggml-vocab-qwen2.gguf")


@pytest.mark.skipif(not QWEN2_VOCAB.exists(), reason="the real Qwen2 vocabulary is not here")
def test_real_qwen2_vocab_matches_original():
    f = GGUFFile(QWEN2_VOCAB)
    assert f.get("tokenizer.ggml.pre") == "qwen2"
    ours = load_gguf_tokenizer(f)
    tokens = list(f.get("tokenizer.ggml.tokens"))
    vocab = {t: i for i, t in enumerate(tokens)}
    ranks = {tuple(m.split(" ")): r for r, m in enumerate(f.get("tokenizer.ggml.merges"))}
    for text in [*CORPUS, *_random_texts(100, seed=5)]:
        assert ours.encode(text, add_special_tokens=False) == original_encode(
            "qwen2", text, vocab, ranks
        ), text
    nfd = unicodedata.normalize("NFD", VIETNAMESE)
    assert ours.encode(nfd) == ours.encode(VIETNAMESE)  # NFC first, as Qwen2's tokenizer.json
