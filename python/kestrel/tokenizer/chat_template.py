"""Chat template rendering with jinja2, matching what transformers' `apply_chat_template` renders.

Templates come from model repositories and are untrusted code, so they run in jinja2's immutable
sandbox. The environment mirrors transformers': `trim_blocks` and `lstrip_blocks`, the
`loopcontrols` extension, a `{% generation %}` block tag (rendered as its body), the globals
`raise_exception`, `strftime_now`, a restricted `dict` and `namespace`, and a `tojson` filter that
does not escape HTML and accepts `indent`, `separators` and `sort_keys`.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any, ClassVar

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.utils
import numpy as np
from jinja2.sandbox import ImmutableSandboxedEnvironment

# A message's reasoning may arrive under any of these keys; templates read `reasoning_content`
# (most) or `thinking` (gpt-oss), so both are filled from whichever is present.
_REASONING_KEYS = ("reasoning_content", "thinking", "reasoning")

# Appended to the final message when continuing it; its last occurrence marks where to cut.
_CONTINUE_TAG = "KESTREL_CONTINUE_FINAL_MESSAGE "


class ChatTemplateError(ValueError):
    """A chat template could not be chosen or rendered (bad template, or it raised an error)."""


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text for training masks; render the body."""

    tags: ClassVar[set[str]] = {"generation"}

    def parse(self, parser: Any) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body).set_lineno(lineno)


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | str | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # Unlike jinja2's built-in filter, no HTML escaping: the output is a prompt, not a web page.
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _SafeDict:
    """`dict(...)` for templates without exposing the `dict` type itself."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
        return dict.fromkeys(*args, **kwargs)


def _check_namespace_name(name: Any) -> None:
    if isinstance(name, str) and name.startswith("_"):
        raise jinja2.exceptions.SecurityError(
            f"chat templates may not set underscore-prefixed namespace attributes, got {name!r}"
        )


class _SafeNamespace(jinja2.utils.Namespace):
    """jinja2's `namespace()` that refuses underscore-prefixed (dunder) attribute names."""

    def __init__(*args: Any, **kwargs: Any) -> None:
        self, rest = args[0], args[1:]
        attrs = dict(*rest, **kwargs)
        for name in attrs:
            _check_namespace_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _check_namespace_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)


def compile_chat_template(source: str) -> jinja2.Template:
    """Compile a chat template in the sandboxed environment; syntax errors raise ChatTemplateError."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[_GenerationTag, jinja2.ext.loopcontrols],
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _SafeDict()
    env.globals["namespace"] = _SafeNamespace
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise ChatTemplateError(f"chat template has a syntax error at line {e.lineno}: {e}") from e


def to_template_data(value: Any) -> Any:
    """A copy of `value` made only of JSON-like types (dict, list, tuple, str, int, float, bool, None).

    The sandbox cannot know which methods of arbitrary objects are dangerous, so templates only
    ever see plain data: pydantic models become their `model_dump()`, dataclasses dicts, and any
    other object a placeholder string `"<TypeName>"`.
    """
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {to_template_data(k): to_template_data(v) for k, v in value.items()}
    if isinstance(value, list):
        return [to_template_data(item) for item in value]
    if isinstance(value, tuple):
        return tuple(to_template_data(item) for item in value)
    if isinstance(value, np.generic):  # np.bool_(False) must not become a truthy placeholder
        return to_template_data(value.item())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = dataclasses.fields(value)
        return {f.name: to_template_data(getattr(value, f.name)) for f in fields}
    if callable(getattr(value, "model_dump", None)):
        return to_template_data(value.model_dump())
    return f"<{type(value).__name__}>"


def prepare_messages(messages: Sequence[Any]) -> list[dict[str, Any]]:
    """Plain-data copies of `messages` with None-valued keys dropped and reasoning keys aliased."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise TypeError(f"messages must be a list of dicts, got {type(messages).__name__}")
    if len(messages) == 0:
        raise ValueError("messages is empty: a chat needs at least one message")
    prepared = []
    for index, message in enumerate(to_template_data(list(messages))):
        if not isinstance(message, dict):
            raise TypeError(f"messages[{index}] must be a dict, got {message!r}")
        message = {k: v for k, v in message.items() if v is not None}
        reasoning = next((message[k] for k in _REASONING_KEYS if k in message), None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        prepared.append(message)
    return prepared


def _tag_final_message(messages: list[dict[str, Any]], field: str) -> str:
    """Append the continue tag to the final message's `field`; returns the untagged text."""
    final = messages[-1]
    value = final.get(field)
    if value is None:
        raise ValueError(f"continue_final_message: the final message has no {field!r} to continue")
    if isinstance(value, str):
        final[field] = value + _CONTINUE_TAG
        return value
    if isinstance(value, (list, tuple)):
        blocks = list(value)
        for i in range(len(blocks) - 1, -1, -1):
            if isinstance(blocks[i], dict) and "text" in blocks[i]:
                text = blocks[i]["text"]
                blocks[i] = {**blocks[i], "text": text + _CONTINUE_TAG}
                final[field] = blocks
                return text
    raise ValueError("continue_final_message: the final message has no text to continue")


def render_chat_template(
    template: jinja2.Template,
    template_source: str,
    messages: Sequence[Any],
    *,
    add_generation_prompt: bool,
    continue_final_message: bool | str,
    tools: list[dict[str, Any]] | None,
    documents: list[dict[str, Any]] | None,
    variables: Mapping[str, Any],
) -> str:
    """Render one chat. `variables` (special tokens, user kwargs) are passed as template globals.

    With `continue_final_message` (True means the "content" field) the output ends with the final
    message's text, open for the model to continue, as transformers does it.
    """
    if continue_final_message and add_generation_prompt:
        raise ValueError(
            "continue_final_message and add_generation_prompt are exclusive: set at most one"
        )
    chat = prepare_messages(messages)
    if tools is not None and any(not isinstance(t, Mapping) for t in tools):
        raise TypeError("tools must be a list of JSON-schema dicts")
    if documents is not None and any(not isinstance(d, Mapping) for d in documents):
        raise TypeError("documents must be a list of dicts (e.g. with 'title' and 'text' keys)")
    final_text = None
    if continue_final_message:
        field = continue_final_message if isinstance(continue_final_message, str) else "content"
        if field not in template_source:
            raise ValueError(
                f"continue_final_message={continue_final_message!r}: the chat template never "
                f"reads the field {field!r}"
            )
        final_text = _tag_final_message(chat, field)
    try:
        rendered = template.render(
            messages=chat,
            tools=to_template_data(tools),
            documents=to_template_data(documents),
            add_generation_prompt=add_generation_prompt,
            **to_template_data(dict(variables)),
        )
    except jinja2.exceptions.TemplateError as e:
        raise ChatTemplateError(f"chat template error: {e}") from e
    if final_text is None:
        return rendered
    tag = _CONTINUE_TAG.strip()
    if final_text.strip() not in rendered or tag not in rendered:
        raise ValueError(
            "continue_final_message: the chat template dropped (part of) the final message, so it "
            "cannot be continued"
        )
    cut = rendered.rindex(tag)
    if rendered[cut : cut + len(_CONTINUE_TAG)] == _CONTINUE_TAG:
        return rendered[:cut]
    return rendered[:cut].rstrip()  # the template trimmed the message's trailing whitespace
