"""Fixtures for the tokenizer tests: the tiny tokenizer as Kestrel and transformers load it."""

from __future__ import annotations

from pathlib import Path

import pytest

from kestrel.testing.tiny_tokenizer import write_tiny_tokenizer
from kestrel.tokenizer import Tokenizer


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tiny_tokenizer")
    write_tiny_tokenizer(path)
    return path


@pytest.fixture(scope="session")
def tiny(tiny_dir: Path) -> Tokenizer:
    return Tokenizer.from_dir(tiny_dir)


@pytest.fixture(scope="session")
def hf_tiny(tiny_dir: Path):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(tiny_dir))
