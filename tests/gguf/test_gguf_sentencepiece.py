"""SentencePiece-style (`llama`) GGUF vocabularies against SentencePiece itself.

The fixtures are small BPE models trained with sentencepiece (byte fallback, whitespace-only
pieces, a user-defined token), written into GGUF files the way llama.cpp's converter does
(tokens, scores, token types, special ids). The oracle is a SentencePiece model proto rebuilt
from what the GGUF file holds, with Llama's normalizer spec (identity, add_dummy_prefix,
escape_whitespaces, no extra-whitespace removal), so Kestrel and the oracle read the same bytes.

Special tokens are not text to SentencePiece; Kestrel (like llama.cpp) matches them in the text
and encodes the text between them as separate pieces, each with its own leading "▁". The oracle
does the same: split at special tokens, encode each piece with SentencePiece.
"""

from __future__ import annotations

import io
import random
import re
import unicodedata
from pathlib import Path

import pytest

from kestrel.loader.gguf_loader import GGUFFile
from kestrel.loader.gguf_tokenizer import load_gguf_tokenizer
from tests.gguf.fixtures import write_gguf

spm = pytest.importorskip("sentencepiece")
pb = pytest.importorskip("sentencepiece.sentencepiece_model_pb2")

_USER_DEFINED = "<think>"
_NORMAL, _USER = 1, 4  # SentencePiece piece types (the same numbers as GGUF token types)

_WORDS = [
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "lazy",
    "dog",
    "def",
    "return",
    "class",
    "import",
    "self",
    "value",
    "world",
    "hello",
    "Tiếng",
    "Việt",
    "có",
    "dấu",
    "chào",
    "thế",
    "giới",
    "東京",
    "日本",
    "你好",
    "世界",
    "naïve",
    "café",
    "résumé",
    "12",
    "345",
    "6789",
    "don't",
    "it's",
    "we're",
]

# Texts where SentencePiece's whitespace handling shows: leading spaces, runs, tabs, newlines.
CORPUS = [
    "",
    " ",
    "  ",
    "   ",
    "     ",
    "\t",
    "\n",
    " \n ",
    "hello",
    " hello",
    "  hello",
    "hello ",
    "hello  ",
    "a b",
    "a  b   c    d        e",
    "\tindented\n\t\ttwice\n",
    "line one\nline two\n\n\nline five\r\nwindows\r\n",
    "    def f(x):\n        return x  +  1\n",
    "numbers 0 7 42 123 4567 89012 3.14159 -2e10 1,000,000",
    "Tiếng Việt có dấu",
    unicodedata.normalize("NFD", "Tiếng Việt có dấu"),
    "e\u0301 a\u0300\u0323 combining",
    "東京は日本の首都です。你好，世界！",
    "emoji 😀🎉 family 👩\u200d👩\u200d👧 flag 🇫🇷",
    "Ünïcödé café naïve façade — “quotes”",
    "don't I'll we're",
    "mixed\t東京 12 😀  café\n  end ",
    f"{_USER_DEFINED}the{_USER_DEFINED} end",
    f"x {_USER_DEFINED} y",
    "<s>hi</s> there",
    "text</s>",
]


def _training_lines(seed: int = 0, count: int = 3000) -> list[str]:
    """Code-like and multilingual lines with indentation and runs of spaces and tabs, so the
    trained vocabulary holds whitespace-only pieces of many lengths."""
    rng = random.Random(seed)
    lines = []
    for _ in range(count):
        indent = " " * rng.choice([0, 0, 1, 2, 3, 4, 6, 8, 12, 16]) + "\t" * rng.choice([0, 0, 1])
        words = [rng.choice(_WORDS) for _ in range(rng.randint(1, 8))]
        seps = [rng.choice([" ", " ", " ", "  ", "   ", "    ", "\t"]) for _ in words]
        lines.append(indent + "".join(w + s for w, s in zip(words, seps)).rstrip())
    return lines


def _train(vocab_size: int) -> pb.ModelProto:
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_training_lines()),
        model_writer=buf,
        model_type="bpe",
        vocab_size=vocab_size,
        byte_fallback=True,
        character_coverage=1.0,
        normalization_rule_name="identity",
        add_dummy_prefix=True,
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        split_by_whitespace=False,
        split_digits=True,
        user_defined_symbols=[_USER_DEFINED],
        unk_id=0,
        bos_id=1,
        eos_id=2,
        minloglevel=2,
        hard_vocab_limit=False,
    )
    model = pb.ModelProto()
    model.ParseFromString(buf.getvalue())
    return model


def _write_spm_gguf(path: Path, model: pb.ModelProto, **extra) -> Path:
    metadata = {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": [p.piece for p in model.pieces],
        "tokenizer.ggml.scores": [p.score for p in model.pieces],
        "tokenizer.ggml.token_type": [int(p.type) for p in model.pieces],
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.unknown_token_id": 0,
        **extra,
    }
    return write_gguf(path, "llama", metadata, {})


def sentencepiece_oracle(path: Path):
    """SentencePiece built from the GGUF file's vocabulary, with Llama's normalizer spec."""
    f = GGUFFile(path)
    model = pb.ModelProto()
    for token, score, kind in zip(
        f.get("tokenizer.ggml.tokens"),
        f.get("tokenizer.ggml.scores"),
        f.get("tokenizer.ggml.token_type"),
    ):
        model.pieces.add(piece=token, score=float(score), type=int(kind))
    model.trainer_spec.model_type = pb.TrainerSpec.BPE  # scores are merge priorities
    model.trainer_spec.byte_fallback = True
    model.trainer_spec.unk_id = int(f.get("tokenizer.ggml.unknown_token_id"))
    model.trainer_spec.bos_id = int(f.get("tokenizer.ggml.bos_token_id"))
    model.trainer_spec.eos_id = int(f.get("tokenizer.ggml.eos_token_id"))
    model.trainer_spec.pad_id = -1
    spec = model.normalizer_spec
    spec.name = "identity"
    spec.add_dummy_prefix = bool(f.get("tokenizer.ggml.add_space_prefix", True))
    spec.remove_extra_whitespaces = bool(f.get("tokenizer.ggml.remove_extra_whitespaces", False))
    spec.escape_whitespaces = True
    return spm.SentencePieceProcessor(model_proto=model.SerializeToString())


def oracle_encode(sp, text: str) -> list[int]:
    """SentencePiece ids of `text`, special tokens matched in the text (as Kestrel does) and
    the text between them encoded piece by piece."""
    specials = [_USER_DEFINED, "<s>", "</s>"]
    pattern = "(" + "|".join(re.escape(s) for s in specials) + ")"
    ids: list[int] = []
    for part in re.split(pattern, text):
        if part in specials:
            ids.append(sp.piece_to_id(part))
        elif part:
            ids.extend(sp.encode(part))
    return ids


def _random_texts(count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    atoms = [*" \t\n\r\u00a0abcdeTtlorwnh0123456789.,!?'\"-東京你好😀🎉éếệñ", "\u0301", "\u0302"]
    atoms += ["  ", "   ", "    ", "        ", "\t\t", " \n", *rng.sample(_WORDS, 12)]
    return ["".join(rng.choice(atoms) for _ in range(rng.randint(1, 24))) for _ in range(count)]


@pytest.fixture(scope="module")
def trained() -> pb.ModelProto:
    return _train(vocab_size=700)


@pytest.fixture(scope="module")
def spm_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("trained_spm")


@pytest.mark.parametrize(
    "variant",
    [
        {},
        {"tokenizer.ggml.add_space_prefix": False},
        {"tokenizer.ggml.remove_extra_whitespaces": True},
    ],
    ids=["llama", "no_space_prefix", "remove_extra_whitespaces"],
)
def test_encode_decode_match_sentencepiece(trained, spm_dir, variant):
    name = "_".join(f"{k.split('.')[-1]}-{v}" for k, v in variant.items()) or "llama"
    path = _write_spm_gguf(spm_dir / f"{name}.gguf", trained, **variant)
    ours, sp = load_gguf_tokenizer(GGUFFile(path)), sentencepiece_oracle(path)
    assert len(ours) == sp.get_piece_size()
    mismatches = []
    for text in [*CORPUS, *_random_texts(3000, seed=len(name))]:
        expected = oracle_encode(sp, text)
        ids = ours.encode(text, add_special_tokens=False)
        if ids != expected:
            mismatches.append((text, [ours.id_to_token(i) for i in ids], sp.id_to_piece(expected)))
            continue
        with_bos = ours.encode(text)
        assert with_bos == [sp.bos_id(), *expected], text
        # SentencePiece drops control tokens from text and strips the leading "▁".
        if "<s>" not in text and "</s>" not in text:
            assert ours.decode(with_bos, skip_special_tokens=True) == sp.decode(expected), text
    assert not mismatches, mismatches[:5]


def test_whitespace_examples(trained, spm_dir):
    """The cases of the issue, spelled out."""
    path = _write_spm_gguf(spm_dir / "examples.gguf", trained)
    ours = load_gguf_tokenizer(GGUFFile(path))

    def pieces(text: str) -> list[str]:
        return [ours.id_to_token(i) for i in ours.encode(text, add_special_tokens=False)]

    assert pieces(" ") == ["▁▁"]  # the dummy prefix, then the space
    assert "".join(pieces(" hello")).startswith("▁▁")
    assert "".join(pieces("a   b")) == "▁a▁▁▁b"
    assert "".join(pieces("\tx")) == "▁\tx"
    assert pieces("") == []
    for text in (" ", "  a", "a\n\n b ", " \t "):
        assert ours.decode(ours.encode(text)) == text


def test_random_ids_decode_like_sentencepiece(trained, spm_dir):
    """Any id sequence of whole-character tokens decodes as SentencePiece decodes it."""
    path = _write_spm_gguf(spm_dir / "decode.gguf", trained)
    ours, sp = load_gguf_tokenizer(GGUFFile(path)), sentencepiece_oracle(path)
    rng = random.Random(7)
    normal = [i for i, p in enumerate(trained.pieces) if p.type in (_NORMAL, _USER)]
    for _ in range(2000):
        ids = [rng.choice(normal) for _ in range(rng.randint(1, 10))]
        if rng.random() < 0.3:
            ids.insert(0, sp.bos_id())
        assert ours.decode(ids, skip_special_tokens=True) == sp.decode(ids), ids
