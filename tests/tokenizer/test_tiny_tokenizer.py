"""The tiny test tokenizer: exact size, special tokens, determinism, transformers compatibility."""

from __future__ import annotations

import json
import unicodedata
from pathlib import Path

from kestrel.testing.tiny_tokenizer import write_tiny_tokenizer
from kestrel.tokenizer import Tokenizer


def test_vocab_is_exactly_512(tiny_dir: Path, tiny: Tokenizer, hf_tiny) -> None:
    assert write_tiny_tokenizer(tiny_dir / "again") == 512
    assert tiny.vocab_size == 512
    assert len(hf_tiny) == 512
    # The trainer puts the special tokens in the BPE vocab too, so no id lies beyond the model's.
    assert tiny.backend.get_vocab_size(with_added_tokens=False) == 512
    assert sorted(tiny.backend.get_vocab().values()) == list(range(512))


def test_special_tokens(tiny: Tokenizer, hf_tiny) -> None:
    ids = [tiny.token_to_id(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")]
    assert ids == [0, 1, 2]
    added = tiny.backend.get_added_tokens_decoder()
    assert sorted(added) == [0, 1, 2] and all(tok.special for tok in added.values())
    assert tiny.eos_token == "<|im_end|>" and tiny.eos_token_id == 2
    assert tiny.bos_token is None and tiny.bos_token_id is None
    assert tiny.pad_token_id == 0
    assert hf_tiny.eos_token_id == 2 and hf_tiny.bos_token_id is None
    # Special tokens in text are matched whole, never split into bytes.
    assert tiny.encode("<|im_start|>x<|im_end|>")[::2] == [1, 2]


def test_training_is_deterministic(tmp_path: Path) -> None:
    write_tiny_tokenizer(tmp_path / "a")
    write_tiny_tokenizer(tmp_path / "b")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_config_file(tiny_dir: Path) -> None:
    config = json.loads((tiny_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert config["eos_token"] == "<|im_end|>"
    assert config["bos_token"] is None
    assert "<|im_start|>" in config["chat_template"]


def test_byte_level_round_trip_of_any_text(tiny: Tokenizer) -> None:
    # Byte-level BPE has no unknown token: every string survives encode -> decode (after NFC).
    text = "Ünïcödé e\u0301 \u200b\x00\x7f tab\t\r\n 𝔘𝔫𝔦 🧪🏳️‍🌈 ﷽ \ufffd end"
    ids = tiny.encode(text)
    assert tiny.decode(ids) == unicodedata.normalize("NFC", text)
    assert all(0 <= i < 512 for i in ids)


def test_merges_compress_trained_text(tiny: Tokenizer) -> None:
    # Words from the corpus merge into multi-byte tokens: far fewer tokens than UTF-8 bytes.
    text = "The quick brown fox jumps over the lazy dog."
    assert len(tiny.encode(text)) < len(text.encode("utf-8")) * 0.7
