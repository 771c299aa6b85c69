"""No silent drops: what the server does with request fields it does not act on.

The request models (`protocol.py`) keep every field they do not declare (`extra="allow"`);
each endpoint calls `FieldPolicy.check(body)` before doing any work. A field is then:

- **declared**: validated strictly and acted on (`protocol.py`);
- **accepted, ignored**: harmless fields clients send (bookkeeping, OpenAI-only services); the
  request runs, and the field name is logged once (a warning) per server process;
- **refused**: fields whose semantics the engine does not implement: a 400 naming the field
  (`param`), unless the value is one that asks for nothing (the "harmless values" column);
- **unknown**: any other name; logged once per name (like vLLM), then ignored.

| field | what | handling |
| --- | --- | --- |
| `user`, `metadata`, `store`, `service_tier`, `prompt_cache_key`, `safety_identifier` | OpenAI bookkeeping / billing / caching hints | accepted, ignored (logged once) |
| `parallel_tool_calls` | a tool-calling hint | accepted, ignored (logged once) |
| `reasoning_effort`, `verbosity` | OpenAI reasoning-model hints | accepted, ignored (logged once) |
| `best_of` | completions: keep the best of k samples | refused; harmless: null, 1 |
| `use_beam_search` | vLLM: beam search | refused; harmless: null, false |
| `length_penalty` | vLLM: a beam-search score | refused; harmless: null, 1.0 |
| `truncate_prompt_tokens` | vLLM: cut the prompt to its last k tokens | refused; harmless: null |
| `audio`, `modalities` | audio output | refused; harmless for `modalities`: ["text"] |
| `prediction` | predicted outputs (speculative hints) | refused; harmless: null |
| `web_search_options` | OpenAI web search | refused; harmless: null |
| `functions`, `function_call` | the deprecated OpenAI function calling | refused; harmless: null, `function_call` "none" |
| `tools`, `tool_choice` | tool calling: declared on chat; on completions refused (harmless: null, [], "none") |
| any other name | | unknown: logged once per name, ignored |

A row stops applying by itself once `protocol.py` declares the field on an endpoint:
only undeclared fields (a model's `model_extra`) are looked up here.

Nested models count too: an unknown key of a chat message is reported as `messages[].key`.
At most `MAX_LOGGED_NAMES` distinct unknown names are remembered (a hostile client could send
millions); past that, one more line says that further names go unlogged.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel

from kestrel_server.errors import bad_request

logger = logging.getLogger(__name__)

IGNORED_FIELDS = frozenset(
    {
        "user",
        "metadata",
        "store",
        "service_tier",
        "prompt_cache_key",
        "safety_identifier",
        "parallel_tool_calls",
        "reasoning_effort",
        "verbosity",
    }
)

_NOTHING = (None,)
# field -> (what the engine would have to implement, the values that ask for nothing)
REFUSED_FIELDS: dict[str, tuple[str, tuple[Any, ...]]] = {
    "best_of": ("best-of-k sampling", (None, 1)),
    "use_beam_search": ("beam search", (None, False)),
    "length_penalty": ("beam search (length_penalty)", (None, 1, 1.0)),
    "truncate_prompt_tokens": ("prompt truncation", _NOTHING),
    "audio": ("audio output", _NOTHING),
    "modalities": ("output modalities other than text", (None, ["text"])),
    "prediction": ("predicted outputs", _NOTHING),
    "web_search_options": ("web search", _NOTHING),
    "functions": ("function calling", (None, [])),
    "function_call": ("function calling", (None, "none")),
    "tools": ("tool calling", (None, [])),
    "tool_choice": ("tool calling", (None, "none")),
}

MAX_LOGGED_NAMES = 1024
_MAX_NAME_CHARS = 80


def extra_fields(model: BaseModel, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted name, value) of every field `model` and its nested models did not declare; a
    list of models contributes `name[].key` once per item that has it."""
    for name, value in (model.model_extra or {}).items():
        yield prefix + name, value
    for name in type(model).model_fields:
        value = getattr(model, name, None)
        if isinstance(value, BaseModel):
            yield from extra_fields(value, f"{prefix}{name}.")
        elif isinstance(value, list) and value and isinstance(value[0], BaseModel):
            # Lists of models hold models only (token-id lists are never walked item by item).
            for item in value:
                yield from extra_fields(item, f"{prefix}{name}[].")


@dataclass
class FieldPolicy:
    """Applies the table above to parsed requests; remembers which names it logged (one
    instance per app, so each server process logs a name once)."""

    logged: set[str] = field(default_factory=set)
    max_logged: int = MAX_LOGGED_NAMES
    _saturated: bool = False

    def check(self, body: BaseModel) -> None:
        """Raises a 400 naming the first refused field that asks for something; logs the
        ignored and unknown ones (once per name)."""
        for name, value in extra_fields(body):
            refused = REFUSED_FIELDS.get(name)
            if refused is not None and not _harmless(value, refused[1]):
                raise bad_request(
                    f"'{name}' is not supported: this server does not implement "
                    f"{refused[0]}; leave the field out",
                    param=name,
                    code="unsupported_field",
                )
        for name, value in extra_fields(body):
            if name in REFUSED_FIELDS:
                continue  # a value that asks for nothing: nothing to say
            self._log_once(name, known=name in IGNORED_FIELDS)
        for name in IGNORED_FIELDS.intersection(body.model_fields_set):
            if getattr(body, name, None) is not None:
                self._log_once(name, known=True)  # declared for clients' sake, not acted on

    def _log_once(self, name: str, *, known: bool) -> None:
        if name in self.logged:
            return
        if len(self.logged) >= self.max_logged:
            if not self._saturated:
                self._saturated = True
                logger.warning(
                    "%d distinct ignored request fields logged; further ones are not",
                    self.max_logged,
                )
            return
        self.logged.add(name)
        shown = name if len(name) <= _MAX_NAME_CHARS else name[:_MAX_NAME_CHARS] + "..."
        if known:
            logger.warning("request field %r is accepted but has no effect here", shown)
        else:
            logger.warning("request field %r is unknown and was ignored", shown)


def _harmless(value: Any, harmless_values: tuple[Any, ...]) -> bool:
    # `True == 1` in Python: a bool only matches a bool.
    return any(
        value == h and isinstance(value, bool) == isinstance(h, bool) for h in harmless_values
    )
