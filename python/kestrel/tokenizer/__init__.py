"""Tokenization: the `Tokenizer` wrapper, chat templates and incremental detokenization."""

from kestrel.tokenizer.chat_template import ChatTemplateError
from kestrel.tokenizer.detokenizer import DetokenizerStep, IncrementalDetokenizer
from kestrel.tokenizer.tokenizer import NoChatTemplateError, Tokenizer

__all__ = [
    "ChatTemplateError",
    "DetokenizerStep",
    "IncrementalDetokenizer",
    "NoChatTemplateError",
    "Tokenizer",
]
