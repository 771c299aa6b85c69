"""The engine loop: schedule (C++) -> run (torch) -> update (C++)."""

from kestrel.engine.llm_engine import LLMEngine

__all__ = ["LLMEngine"]
