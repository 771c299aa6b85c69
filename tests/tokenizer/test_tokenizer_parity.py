"""Tokenizer encode/decode and loading rules against transformers' AutoTokenizer on the same files."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import models, pre_tokenizers, processors

from kestrel.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")

CORPUS = [
    "",
    " ",
    "Hello, world!",
    "  leading and trailing spaces   ",
    "tabs\tand\t\tmore\ttabs",
    "line one\nline two\n\n\nline five\r\nwindows\r\n",
    "multiple     spaces    between      words",
    "café naïve résumé Straße e\u0301 (combining accent)",
    "你好，世界！今天天气很好。",
    "こんにちは世界 カタカナ 안녕하세요",
    "emoji 😀🚀🌍 family 👨\u200d👩\u200d👧 flag 🇫🇷 heart ❤️",
    "def f(x: int) -> int:\n    return x ** 2  # square\n",
    "for (int i = 0; i < n; ++i) { sum += a[i]; }",
    "numbers 0 7 42 123 4567 89012 3.14159 -2e10 1,000,000",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "text<|endoftext|>more text<|im_end|>",
    "<|im_start <|im_end| partial specials |>",
    "ÿ\x00\x01 control \x7f chars",
    "Ελληνικά русский עברית العربية हिन्दी",
    "∑∫√∞≈≠≤≥ πθλ → ⇒",
]


def _hf(path: Path):
    return transformers.AutoTokenizer.from_pretrained(str(path))


def _variant(tiny_dir: Path, dest: Path, **config_changes) -> Path:
    """A copy of the tiny tokenizer dir with tokenizer_config.json keys replaced (None deletes)."""
    dest.mkdir()
    shutil.copy(tiny_dir / "tokenizer.json", dest / "tokenizer.json")
    config = json.loads((tiny_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    for key, value in config_changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    (dest / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return dest


@pytest.mark.parametrize("add_special_tokens", [True, False])
def test_encode_matches_transformers(tiny: Tokenizer, hf_tiny, add_special_tokens: bool) -> None:
    for text in CORPUS:
        expected = hf_tiny.encode(text, add_special_tokens=add_special_tokens)
        assert tiny.encode(text, add_special_tokens=add_special_tokens) == expected, text
    batch = tiny.encode_batch(CORPUS, add_special_tokens=add_special_tokens)
    assert batch == [hf_tiny.encode(t, add_special_tokens=add_special_tokens) for t in CORPUS]


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_decode_matches_transformers(tiny: Tokenizer, hf_tiny, skip_special_tokens: bool) -> None:
    rng = random.Random(1234)
    sequences = [tiny.encode(text) for text in CORPUS]
    # Random ids include the special tokens 0..2 and byte tokens that form invalid UTF-8.
    sequences += [[rng.randrange(512) for _ in range(rng.randrange(1, 30))] for _ in range(200)]
    for ids in sequences:
        expected = hf_tiny.decode(ids, skip_special_tokens=skip_special_tokens)
        assert tiny.decode(ids, skip_special_tokens=skip_special_tokens) == expected, ids


def test_vocab_queries_match_transformers(tiny: Tokenizer, hf_tiny) -> None:
    assert tiny.vocab_size == len(hf_tiny)
    assert tiny.all_special_ids == hf_tiny.all_special_ids
    assert tiny.all_special_tokens == hf_tiny.all_special_tokens
    assert tiny.special_tokens_map == hf_tiny.special_tokens_map
    for token_id in (0, 1, 2, 3, 100, 300, 511):
        token = tiny.id_to_token(token_id)
        assert token == hf_tiny.convert_ids_to_tokens(token_id)
        assert tiny.token_to_id(token) == token_id
    assert tiny.id_to_token(512) is None
    assert tiny.decode([70, 512, 71]) == hf_tiny.decode([70, 512, 71]) == tiny.decode([70, 71])
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 512\)"):
        tiny.decode([70, -1])
    assert tiny.token_to_id("not-a-token-at-all") is None


def test_config_add_bos_eos_flags_defer_to_tokenizer_json(tiny_dir: Path, tmp_path: Path) -> None:
    # transformers 5 ignores add_bos_token/add_eos_token when tokenizer.json exists: its
    # post-processor (here: none adding tokens) decides.
    path = _variant(
        tiny_dir,
        tmp_path / "bos",
        bos_token="<|endoftext|>",
        add_bos_token=True,
        add_eos_token=True,
    )
    ours, hf = Tokenizer.from_dir(path), _hf(path)
    assert ours.bos_token_id == hf.bos_token_id == 0
    for text in CORPUS:
        assert ours.encode(text) == hf.encode(text), text
    assert ours.encode("hi") == hf.encode("hi") == ours.encode("hi", add_special_tokens=False)
    assert 0 not in ours.encode("hi")


def test_post_processor_from_tokenizer_json_adds_bos(tiny_dir: Path, tmp_path: Path) -> None:
    path = _variant(tiny_dir, tmp_path / "llama3ish", bos_token="<|endoftext|>")
    backend = BackendTokenizer.from_file(str(path / "tokenizer.json"))
    backend.post_processor = processors.TemplateProcessing(
        single="<|endoftext|> $A",
        pair="<|endoftext|> $A <|endoftext|> $B",
        special_tokens=[("<|endoftext|>", 0)],
    )
    backend.save(str(path / "tokenizer.json"))
    ours, hf = Tokenizer.from_dir(path), _hf(path)
    for text in CORPUS:
        assert ours.encode(text) == hf.encode(text), text
        assert ours.encode(text, add_special_tokens=False) == hf.encode(
            text, add_special_tokens=False
        )
    assert ours.encode("hi")[0] == 0 and ours.encode("hi")[1:] == ours.encode("hi", False)


def test_named_special_token_missing_from_vocab_is_added(tiny_dir: Path, tmp_path: Path) -> None:
    path = _variant(tiny_dir, tmp_path / "pad", pad_token="<pad>", mask_token="<mask>")
    ours, hf = Tokenizer.from_dir(path), _hf(path)
    assert ours.vocab_size == len(hf) == 514
    assert ours.pad_token_id == hf.pad_token_id == 512
    text = "a<pad>b<mask>"
    assert ours.encode(text) == hf.encode(text)
    assert ours.decode(ours.encode(text)) == hf.decode(hf.encode(text), skip_special_tokens=True)
    assert ours.all_special_ids == hf.all_special_ids


def test_legacy_special_tokens_map(tiny_dir: Path, tmp_path: Path) -> None:
    path = _variant(tiny_dir, tmp_path / "legacy", added_tokens_decoder=None)
    special_map = {"eos_token": {"content": "<|endoftext|>", "lstrip": False, "rstrip": False}}
    (path / "special_tokens_map.json").write_text(json.dumps(special_map), encoding="utf-8")
    ours, hf = Tokenizer.from_dir(path), _hf(path)
    assert ours.eos_token == hf.eos_token == "<|endoftext|>"
    assert ours.eos_token_id == hf.eos_token_id == 0


def test_clean_up_tokenization_spaces_for_word_level(tmp_path: Path) -> None:
    # WordPiece-era cleanup: decode joins word-level tokens with spaces, then removes " ," etc.
    vocab = {"[UNK]": 0, "hello": 1, ",": 2, "world": 3, ".": 4, "don": 5, "'": 6, "t": 7}
    backend = BackendTokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.save(str(tmp_path / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "unk_token": "[UNK]",
        "clean_up_tokenization_spaces": True,
    }
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    ours, hf = Tokenizer.from_dir(tmp_path), _hf(tmp_path)
    ids = ours.encode("hello, world. don't")
    assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=True) == "hello, world. don't"


def test_clean_up_tokenization_spaces_never_applies_to_bpe(tiny_dir: Path, tmp_path: Path) -> None:
    path = _variant(tiny_dir, tmp_path / "cleanup", clean_up_tokenization_spaces=True)
    ours, hf = Tokenizer.from_dir(path), _hf(path)
    ids = ours.encode("a . b , c don 't")
    assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=True) == "a . b , c don 't"


def test_from_tokenizers(tiny_dir: Path, hf_tiny) -> None:
    backend = BackendTokenizer.from_file(str(tiny_dir / "tokenizer.json"))
    tok = Tokenizer.from_tokenizers(
        backend, eos_token="<|im_end|>", bos_token="<|endoftext|>", add_bos_token=True
    )
    assert tok.eos_token_id == 2 and tok.bos_token_id == 0
    assert tok.encode("Hello") == [0, *hf_tiny.encode("Hello")]
    assert tok.encode("Hello", add_special_tokens=False) == hf_tiny.encode("Hello")
    # The caller's backend is copied, not modified.
    assert backend.encode("Hello").ids == hf_tiny.encode("Hello")


def test_missing_tokenizer_json_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer.from_dir(tmp_path)
    with pytest.raises(FileNotFoundError, match="does-not-exist"):
        Tokenizer.from_dir(tmp_path / "does-not-exist")


@pytest.mark.parametrize("content", ["{not json", "{}", '{"model": {"type": "Nope"}}', ""])
def test_malformed_tokenizer_json_names_the_file(tmp_path: Path, content: str) -> None:
    (tmp_path / "tokenizer.json").write_text(content, encoding="utf-8")
    with pytest.raises(ValueError, match=r"tokenizer\.json: malformed"):
        Tokenizer.from_dir(tmp_path)


def test_malformed_tokenizer_config_names_the_file(tiny_dir: Path, tmp_path: Path) -> None:
    path = _variant(tiny_dir, tmp_path / "badconfig")
    (path / "tokenizer_config.json").write_text('{"eos_token": ', encoding="utf-8")
    with pytest.raises(ValueError, match=r"tokenizer_config\.json: malformed JSON"):
        Tokenizer.from_dir(path)
    (path / "tokenizer_config.json").write_text('{"chat_template": 5}', encoding="utf-8")
    with pytest.raises(ValueError, match=r"tokenizer_config\.json: chat_template must be"):
        Tokenizer.from_dir(path)


@pytest.mark.parametrize("add_special_tokens", [True, False])
def test_long_text_encodes_as_transformers(tiny: Tokenizer, hf_tiny, add_special_tokens) -> None:
    """Texts past the GIL-free threshold take the backend's batch call: same ids."""
    rng = random.Random(7)
    words = ["kestrel", "hover", " wind", "\n", "héllo", "🦅", "<|im_start|>", "42"]
    text = "".join(rng.choice(words) for _ in range(40_000))
    assert len(text) > 65_536
    ids = tiny.encode(text, add_special_tokens)
    assert ids == hf_tiny.encode(text, add_special_tokens=add_special_tokens)
    assert ids == tiny._backend.encode(text, add_special_tokens=add_special_tokens).ids
