"""Reading a Hugging Face model directory's tokenizer files the way transformers 5 reads them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import tokenizers

# transformers' named special tokens, in the order it lists them (`all_special_ids` keeps it).
NAMED_SPECIAL_TOKENS = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)


def read_tokenizer_dir(path: str | Path) -> tuple[tokenizers.Tokenizer, dict[str, Any]]:
    """The backend from `tokenizer.json` (required) and `Tokenizer` constructor arguments from
    `tokenizer_config.json`, `special_tokens_map.json`, `chat_template.jinja` and
    `additional_chat_templates/*.jinja` (all optional). Errors name the offending file."""
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"tokenizer directory {root} does not exist")
    tokenizer_file = root / "tokenizer.json"
    if not tokenizer_file.is_file():
        raise FileNotFoundError(
            f"{tokenizer_file} not found: Kestrel needs a tokenizers-format tokenizer.json"
        )
    try:
        backend = tokenizers.Tokenizer.from_file(str(tokenizer_file))
    except Exception as e:  # the Rust side raises a bare Exception on parse errors
        raise ValueError(f"{tokenizer_file}: malformed tokenizer file ({e})") from e
    config_file = root / "tokenizer_config.json"
    config: dict[str, Any] = _read_json(config_file) if config_file.is_file() else {}
    if not isinstance(config, dict):
        raise TypeError(f"{config_file}: expected a JSON object, got {type(config).__name__}")
    map_file = root / "special_tokens_map.json"
    if "added_tokens_decoder" not in config and map_file.is_file():
        # Legacy file: transformers only reads it without added_tokens_decoder; it wins.
        special_map = _read_json(map_file)
        if not isinstance(special_map, dict):
            raise TypeError(f"{map_file}: expected a JSON object")
        config.update(special_map)
    kwargs = _config_to_kwargs(config, root)
    kwargs["name_or_path"] = str(root)
    return backend, kwargs


def _read_json(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: malformed JSON ({e})") from e


def _config_to_kwargs(config: dict[str, Any], root: Path) -> dict[str, Any]:
    """Tokenizer constructor arguments from a tokenizer_config.json dict (plus template files)."""
    where = root / "tokenizer_config.json"
    special: dict[str, Any] = {}
    for name, value in config.items():
        is_named = name in NAMED_SPECIAL_TOKENS
        is_model_specific = name.endswith("_token") and isinstance(value, (str, dict))
        if value is not None and (is_named or is_model_specific):
            special[name] = value
    extra = config.get("extra_special_tokens") or config.get("additional_special_tokens") or []
    if isinstance(extra, dict):  # named model-specific tokens, e.g. {"image_token": "<image>"}
        special.update(extra)
        extra = []
    added_decoder = config.get("added_tokens_decoder") or {}
    if not isinstance(added_decoder, dict):
        raise TypeError(f"{where}: added_tokens_decoder must be an object of id -> token")
    added = [added_decoder[k] for k in sorted(added_decoder, key=int)]
    # A named token that is also in added_tokens_decoder keeps that entry's properties.
    by_content = {t["content"]: t for t in added if isinstance(t, dict) and "content" in t}
    special = {n: by_content.get(v, v) if isinstance(v, str) else v for n, v in special.items()}
    return {
        "special_tokens": special,
        "extra_special_tokens": extra,
        "added_tokens": added,
        "chat_template": _load_chat_templates(config, root),
        "clean_up_tokenization_spaces": bool(config.get("clean_up_tokenization_spaces", False)),
    }


def _load_chat_templates(config: dict[str, Any], root: Path) -> str | dict[str, str] | None:
    """Template files (chat_template.jinja, additional_chat_templates/*.jinja) replace the
    config's `chat_template`, which may be a string or a list of {"name", "template"}."""
    from_files: dict[str, str] = {}
    default_file = root / "chat_template.jinja"
    if default_file.is_file():
        from_files["default"] = default_file.read_text(encoding="utf-8")
    extra_dir = root / "additional_chat_templates"
    if extra_dir.is_dir():
        for file in sorted(extra_dir.glob("*.jinja")):
            from_files[file.name.removesuffix(".jinja")] = file.read_text(encoding="utf-8")
    if from_files:
        return from_files["default"] if list(from_files) == ["default"] else from_files
    template = config.get("chat_template")
    if template is None or isinstance(template, str):
        return template
    if isinstance(template, list) and all(
        isinstance(t, dict)
        and isinstance(t.get("name"), str)
        and isinstance(t.get("template"), str)
        for t in template
    ):
        return {t["name"]: t["template"] for t in template}
    raise ValueError(
        f"{root / 'tokenizer_config.json'}: chat_template must be a string or a list of "
        "{'name': ..., 'template': ...} objects"
    )
