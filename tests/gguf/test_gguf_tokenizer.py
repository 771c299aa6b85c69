"""Tokenizers built from GGUF metadata: the default model's byte-level BPE vocabulary against
transformers' GGUF tokenizer on the same file, and a SentencePiece-style (`llama`) vocabulary
written by the test against SentencePiece."""

from __future__ import annotations

import pytest

from kestrel.loader.gguf_loader import GGUFFile
from kestrel.loader.gguf_tokenizer import (
    GGUFTokenizerError,
    load_gguf_tokenizer,
    merges_from_scores,
)
from tests.gguf.fixtures import write_gguf
from tests.gguf.test_gguf_sentencepiece import oracle_encode, sentencepiece_oracle

transformers = pytest.importorskip("transformers")

CORPUS = [
    "Hello world",
    "  leading, trailing   and    runs of spaces   ",
    "tabs\tand\nnewlines\n\n\r\nand\u00a0nbsp",
    "Ünïcödé café naïve façade — “quotes” ‘single’",
    "東京は日本の首都です。Привет, мир! Γειά σου κόσμε",
    "emoji 😀🎉 family 👩‍👩‍👧 flags 🇫🇷🇯🇵 skin 👋🏽",
    "def f(x):\n    return x ** 2  # square\n\nprint(f(12))\n",
    "for (int i = 0; i < n; ++i) { sum += a[i]; }",
    "numbers 12345 3.14159 -42 1,000,000 0x1F 2024-06-01 1e-9",
    "don't I'll we're they've she'd IT'S",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "text<|endoftext|>more <repo_name> x",
    "",
    " ",
    "a" * 40,
    "https://example.com/path?q=1&r=two#frag",
]


def test_default_model_tokenizer_matches_transformers(smollm_path, hf_smollm_tokenizer):
    ours = load_gguf_tokenizer(GGUFFile(smollm_path))
    ref = hf_smollm_tokenizer
    assert len(ours) == len(ref) == 49152
    assert (ours.bos_token, ours.eos_token, ours.pad_token) == (
        ref.bos_token,
        ref.eos_token,
        ref.pad_token,
    )
    for text in CORPUS:
        ids = ours.encode(text)
        assert ids == ref(text).input_ids, text
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == ref.decode(
                ids, skip_special_tokens=skip
            ), text
    # Digits are split one by one (the `smollm` pre-tokenizer).
    digits = ours.encode("12345")
    assert [ours.id_to_token(i) for i in digits] == ["1", "2", "3", "4", "5"]
    # Control tokens stay whole.
    assert ours.encode("<|im_start|>") == [1]


def _spm_vocab() -> tuple[list[str], list[float], list[int]]:
    """A small SentencePiece-style vocabulary: <unk>, <s>, </s>, 256 byte tokens, pieces with
    descending scores, and one user-defined token."""
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [2, 3, 3] + [6] * 256
    scores = [0.0, 0.0, 0.0] + [0.0] * 256
    pieces_text = (
        "▁ e t a o n i s r h l d ▁t ▁a he in th ▁th er ▁the on re at en ▁s ▁w ▁o ou ▁i "
        "ing nd ▁c an ▁b es ▁f ▁h is ▁d ▁m or it ar ▁p ed ▁in ▁to ▁and ▁of ll ▁he as "
        "c u m w f g y p b v k x q j z . , ! ? ' 1 2 3 T H I W ▁T ▁I ▁W lo ▁lo low ▁low "
        "er ▁new est ▁wide st ▁hello hello ll o ▁wor ld ▁world 東 京"
    )
    pieces = pieces_text.split()
    seen = set(tokens)
    for rank, piece in enumerate(pieces):
        if piece in seen:
            continue
        seen.add(piece)
        tokens.append(piece)
        types.append(1)
        scores.append(-float(rank))
    tokens.append("<think>")
    types.append(4)
    scores.append(0.0)
    return tokens, scores, types


@pytest.fixture(scope="module")
def spm_gguf(tmp_path_factory):
    tokens, scores, types = _spm_vocab()
    path = tmp_path_factory.mktemp("spm") / "spm.gguf"
    metadata = {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.scores": scores,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.unknown_token_id": 0,
        "tokenizer.chat_template": "{% for m in messages %}[{{ m['content'] }}]{% endfor %}",
    }
    return write_gguf(path, "llama", metadata, {})


def test_sentencepiece_vocab_matches_sentencepiece(spm_gguf):
    """The oracle is SentencePiece on a model proto made from the file (see
    test_gguf_sentencepiece.py; transformers' GGUF conversion drops the leading "▁" of a text
    that starts with a space)."""
    ours = load_gguf_tokenizer(GGUFFile(spm_gguf))
    sp = sentencepiece_oracle(spm_gguf)
    assert len(ours) == sp.get_piece_size()
    corpus = [*CORPUS, "the lowest newest widest hello world", "<think>the</think> end", "Zz"]
    for text in corpus:
        expected = oracle_encode(sp, text)
        ids = ours.encode(text, add_special_tokens=False)
        assert ids == expected, text
        assert ours.decode(ids) == sp.decode(expected), text
    ids = ours.encode("the world")
    assert ids[0] == ours.bos_token_id == 1  # llama vocabularies add BOS by default
    assert [ours.id_to_token(i) for i in ids[1:]] == ["▁the", "▁world"]
    # Characters outside the vocabulary fall back to their UTF-8 bytes.
    assert [ours.id_to_token(i) for i in ours.encode("é", add_special_tokens=False)] == [
        "▁",
        "<0xC3>",
        "<0xA9>",
    ]
    assert ours.apply_chat_template([{"role": "user", "content": "x"}]) == "[x]"


def test_merges_from_scores_rank_by_merged_score():
    tokens = ["a", "b", "c", "ab", "bc", "abc"]
    scores = [0.0, 0.0, 0.0, -2.0, -1.0, -3.0]
    # bc (-1) before ab (-2); abc (-3) last, its longer left piece first.
    assert merges_from_scores(tokens, scores) == [("b", "c"), ("a", "b"), ("ab", "c"), ("a", "bc")]


def test_unsupported_tokenizer_model_is_named(tmp_path):
    path = write_gguf(
        tmp_path / "t.gguf",
        "llama",
        {"tokenizer.ggml.model": "bert", "tokenizer.ggml.tokens": ["[UNK]", "a"]},
        {},
    )
    with pytest.raises(GGUFTokenizerError, match="tokenizer.ggml.model='bert' is not supported"):
        load_gguf_tokenizer(GGUFFile(path))
