"""Kestrel: an LLM inference and serving engine.

Heavy submodules (torch, the native core) are imported lazily so that
`import kestrel` stays cheap and light modules are usable on their own.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "LLM": "kestrel.entrypoints.llm",
    "SamplingParams": "kestrel.sampling_params",
    "EngineConfig": "kestrel.config",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'kestrel' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


__all__ = ["LLM", "EngineConfig", "SamplingParams", "__version__"]
