"""argparse flags derived from a dataclass, so that the dataclass (EngineConfig) is the one
source of each flag's name, type, default, help and choices.

A field `max_num_seqs: int = setting(256, "most sequences in one batch")` becomes
`--max-num-seqs MAX_NUM_SEQS` with type int, default 256, help from the field's metadata "help"
and choices from its metadata "choices" (kestrel.config.setting writes both). Annotations may
be int, float, str, `X | None` of those, or bool: a bool defaulting to True becomes
`--x / --no-x` (BooleanOptionalAction), one defaulting to False a plain `--x` (store_true).
Invariant: every flag's dest is its field's name, so `dataclass_from_namespace` reads the
values back without a mapping. Range checks stay in the dataclass (`__post_init__`)."""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Callable, Collection, Mapping
from typing import Any, Protocol, TypeVar

T = TypeVar("T")
_SCALARS: tuple[type, ...] = (int, float, str)


class ArgumentContainer(Protocol):
    """An ArgumentParser or one of its argument groups."""

    def add_argument(self, *name_or_flags: str, **kwargs: Any) -> argparse.Action: ...


def flag_name(name: str, rename: Mapping[str, str] | None = None) -> str:
    """The option string of field `name`: `rename[name]` if given, else `--kebab-case`."""
    if rename and name in rename:
        return rename[name]
    return "--" + name.replace("_", "-")


def add_dataclass_arguments(
    container: ArgumentContainer,
    cls: type,
    *,
    skip: Collection[str] = (),
    rename: Mapping[str, str] | None = None,
    value_aliases: Mapping[str, Mapping[str, str]] | None = None,
) -> dict[str, argparse.Action]:
    """Adds one flag per field of dataclass `cls` (but those in `skip`) to `container`; returns
    field name -> its argparse Action. `rename` maps a field to another option string; a
    field's metadata "short" (e.g. "-q") is a second spelling of the same flag;
    `value_aliases[field]` maps extra spellings a user may type to the values the field
    accepts (e.g. "half" -> "float16"), resolved when parsing. A field without help text, or
    with an annotation not listed above, is a TypeError: every flag is documented."""
    hints = typing.get_type_hints(cls)
    actions: dict[str, argparse.Action] = {}
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        kwargs = _argument_kwargs(cls, f, hints[f.name], (value_aliases or {}).get(f.name))
        short = f.metadata.get("short")
        names = (short, flag_name(f.name, rename)) if short else (flag_name(f.name, rename),)
        actions[f.name] = container.add_argument(*names, **kwargs)
    return actions


def namespace_kwargs(
    cls: type, namespace: argparse.Namespace, *, skip: Collection[str] = ()
) -> dict[str, Any]:
    """The values of `cls`'s fields that `namespace` holds (by dest = field name)."""
    return {
        f.name: getattr(namespace, f.name)
        for f in dataclasses.fields(cls)
        if f.name not in skip and hasattr(namespace, f.name)
    }


def dataclass_from_namespace(cls: type[T], namespace: argparse.Namespace, **overrides: Any) -> T:
    """`cls` built from the parsed flags (fields missing from `namespace` keep their
    defaults), `overrides` winning; the dataclass's own validation runs as usual."""
    return cls(**{**namespace_kwargs(cls, namespace), **overrides})


def _argument_kwargs(
    cls: type, f: dataclasses.Field, hint: Any, aliases: Mapping[str, str] | None
) -> dict[str, Any]:
    help_text = f.metadata.get("help")
    if not isinstance(help_text, str) or not help_text.strip():
        raise TypeError(f"{cls.__name__}.{f.name} has no help text (metadata 'help')")
    default = _default(f)
    kwargs: dict[str, Any] = {"dest": f.name, "help": help_text}
    if hint is bool:
        if default is dataclasses.MISSING:
            raise TypeError(f"{cls.__name__}.{f.name}: a bool flag needs a default")
        action = argparse.BooleanOptionalAction if default else "store_true"
        return {**kwargs, "action": action, "default": bool(default)}
    base = _scalar_type(cls, f.name, hint)
    kwargs["type"] = _converter(base, aliases) if aliases else base
    if default is dataclasses.MISSING:
        kwargs["required"] = True
    else:
        kwargs["default"] = default
    if f.metadata.get("choices") is not None:
        # None (a default meaning "off") is not typed on a command line
        kwargs["choices"] = tuple(c for c in f.metadata["choices"] if c is not None)
    return kwargs


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _scalar_type(cls: type, name: str, hint: Any) -> type:
    """int / float / str from an annotation `X` or `X | None` (a None default needs no
    parsing: an optional flag left out keeps it)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        members = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(members) == 1:
            hint = members[0]
    if hint in _SCALARS:
        return hint
    raise TypeError(f"{cls.__name__}.{name}: no flag for annotation {hint!r}")


def _converter(base: type, aliases: Mapping[str, str]) -> Callable[[str], Any]:
    def convert(text: str) -> Any:
        return base(aliases.get(text, text))

    convert.__name__ = base.__name__  # argparse names the type in "invalid int value" errors
    return convert
