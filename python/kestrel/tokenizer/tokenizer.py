"""Kestrel's tokenizer: a `tokenizers.Tokenizer` plus special tokens and chat templates.

Loading follows what transformers' `AutoTokenizer` (v5, tokenizers backend) does with the same
files, so `encode`/`decode`/`apply_chat_template` give the same ids and text:
- `tokenizer.json` is the backend, used as saved (truncation and padding switched off).
- Tokens listed in `tokenizer_config.json`'s `added_tokens_decoder` and named special tokens
  missing from the backend are added to it.
- The config's `add_bos_token`/`add_eos_token` are ignored, as transformers 5 does when a
  tokenizer.json exists: its post-processor decides which special tokens `encode` adds. A
  backend without a post-processor gets a plain "$A" one.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import tokenizers
from tokenizers import AddedToken, processors

from kestrel.tokenizer.chat_template import (
    ChatTemplateError,
    compile_chat_template,
    render_chat_template,
)
from kestrel.tokenizer.hf_files import NAMED_SPECIAL_TOKENS, read_tokenizer_dir

# Texts longer than this (characters) are encoded through the backend's GIL-releasing batch call.
_GIL_FREE_ENCODE_CHARS = 65_536
_ADDED_TOKEN_FIELDS = ("single_word", "lstrip", "rstrip", "normalized", "special")

TokenSpec = str | AddedToken | Mapping[str, Any]


class NoChatTemplateError(ChatTemplateError):
    """The model ships no chat template and none was passed."""


def _as_added_token(value: TokenSpec, where: str) -> AddedToken:
    """A special token from a config value: a string, an AddedToken or its JSON dict."""
    if isinstance(value, AddedToken):  # copied: the caller's object is never mutated
        props = {k: getattr(value, k) for k in _ADDED_TOKEN_FIELDS}
        return AddedToken(value.content, **props)
    if isinstance(value, str):
        return AddedToken(value, special=True)
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        props = {k: bool(value[k]) for k in _ADDED_TOKEN_FIELDS if k in value}
        return AddedToken(value["content"], **props)
    raise ValueError(f"{where}: expected a token string or an AddedToken dict, got {value!r}")


class Tokenizer:
    """Text <-> token ids, special tokens and chat templates for one model.

    Build it with `from_dir` (a Hugging Face model directory) or `from_tokenizers` (a backend
    built elsewhere, e.g. from GGUF metadata). The backend object is owned: it is copied on entry.
    """

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        special_tokens: Mapping[str, TokenSpec | None] | None = None,
        extra_special_tokens: Iterable[TokenSpec] = (),
        added_tokens: Iterable[TokenSpec] = (),
        chat_template: str | Mapping[str, str] | None = None,
        add_bos_token: bool | None = None,
        add_eos_token: bool | None = None,
        clean_up_tokenization_spaces: bool = False,
        name_or_path: str = "",
    ) -> None:
        """`special_tokens` maps names ending in `_token` (bos_token, eos_token, ... or model
        specific ones such as image_token) to tokens; their string values become chat template
        variables. `added_tokens` are extra tokens to ensure in the vocabulary (a config's
        `added_tokens_decoder`). `add_bos_token`/`add_eos_token`: None keeps the backend's
        post-processor; a bool rebuilds it."""
        self._backend = tokenizers.Tokenizer.from_str(backend.to_str())
        self._backend.no_truncation()
        self._backend.no_padding()
        self.name_or_path = name_or_path
        self.clean_up_tokenization_spaces = clean_up_tokenization_spaces
        self._special: dict[str, AddedToken] = {}
        for name, value in (special_tokens or {}).items():
            if not name.endswith("_token"):
                raise ValueError(f"special token name {name!r} must end with '_token'")
            if value is not None:
                self._special[name] = _as_added_token(value, name)
        self._extra_special = [
            _as_added_token(v, "extra_special_tokens") for v in extra_special_tokens
        ]
        self._add_missing_tokens([_as_added_token(v, "added_tokens") for v in added_tokens])
        if (
            add_bos_token is not None
            or add_eos_token is not None
            or (self._backend.post_processor is None)
        ):
            self._set_bos_eos_post_processor(bool(add_bos_token), bool(add_eos_token))
        self._chat_templates: dict[str, str] | None = None
        self._default_chat_template: str | None = None
        if isinstance(chat_template, Mapping):
            self._chat_templates = dict(chat_template)
        elif chat_template is not None:
            self._default_chat_template = chat_template
        self._compiled_templates: dict[str, Any] = {}
        self._byte_fallback_ids: frozenset[int] | None = None  # computed on first use

    def backend_json(self) -> str:
        """The `tokenizers` backend serialized (tokenizer.json), e.g. for a grammar engine."""
        return self._backend.to_str()

    # ---- construction -------------------------------------------------------------------

    @classmethod
    def from_tokenizers(
        cls,
        tok: tokenizers.Tokenizer,
        *,
        bos_token: TokenSpec | None = None,
        eos_token: TokenSpec | None = None,
        pad_token: TokenSpec | None = None,
        unk_token: TokenSpec | None = None,
        extra_special_tokens: Iterable[TokenSpec] = (),
        chat_template: str | Mapping[str, str] | None = None,
        add_bos_token: bool | None = None,
        add_eos_token: bool | None = None,
        clean_up_tokenization_spaces: bool = False,
        name_or_path: str = "",
    ) -> Tokenizer:
        """Wrap a backend built by another loader (e.g. GGUF). See `__init__` for the flags."""
        special = {"bos_token": bos_token, "eos_token": eos_token}
        special.update(pad_token=pad_token, unk_token=unk_token)
        return cls(
            tok,
            special_tokens=special,
            extra_special_tokens=extra_special_tokens,
            chat_template=chat_template,
            add_bos_token=add_bos_token,
            add_eos_token=add_eos_token,
            clean_up_tokenization_spaces=clean_up_tokenization_spaces,
            name_or_path=name_or_path,
        )

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        """Load `tokenizer.json` (required), `tokenizer_config.json`, `special_tokens_map.json`,
        `chat_template.jinja` and `additional_chat_templates/*.jinja` from a model directory."""
        backend, kwargs = read_tokenizer_dir(path)
        return cls(backend, **kwargs)

    def _add_missing_tokens(self, added_tokens: list[AddedToken]) -> None:
        present = {t.content for t in self._backend.get_added_tokens_decoder().values()}
        to_add: list[AddedToken] = []
        for token in added_tokens:
            if token.content not in present:
                to_add.append(token)
                present.add(token.content)
        # Like transformers: a special token that is only in the model's vocab (not an added
        # token) is added too, so that it matches as a whole and is skipped by decode.
        for token in (*self._special.values(), *self._extra_special):
            if token.content not in present:
                token.special = True
                to_add.append(token)
                present.add(token.content)
        if to_add:
            self._backend.add_tokens(to_add)

    def _set_bos_eos_post_processor(self, add_bos: bool, add_eos: bool) -> None:
        bos, eos = self.bos_token, self.eos_token
        add_bos = add_bos and bos is not None
        add_eos = add_eos and eos is not None
        prefix = f"{bos}:0 " if add_bos else ""
        suffix = f" {eos}:0" if add_eos else ""
        single = f"{prefix}$A:0{suffix}"
        pair_b = (f" {bos}:1" if add_bos else "") + " $B:1" + (f" {eos}:1" if add_eos else "")
        used = [t for t, on in ((bos, add_bos), (eos, add_eos)) if on and t is not None]
        self._backend.post_processor = processors.TemplateProcessing(
            single=single,
            pair=single + pair_b,
            special_tokens=[(t, self._backend.token_to_id(t)) for t in dict.fromkeys(used)],
        )

    # ---- vocabulary ---------------------------------------------------------------------

    @property
    def backend(self) -> tokenizers.Tokenizer:
        """The underlying `tokenizers.Tokenizer` (treat as read-only)."""
        return self._backend

    @property
    def vocab_size(self) -> int:
        """Number of token ids including added tokens (= len(transformers tokenizer))."""
        return self._backend.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    def byte_fallback_ids(self) -> frozenset[int]:
        """Ids of the byte tokens `<0x00>`..`<0xFF>` when the decoder has a ByteFallback step
        (SentencePiece-style vocabularies), else empty. A run of them decodes as one group:
        valid UTF-8 becomes its characters, anything else one U+FFFD per byte, so the text
        of a run is only known once a token that is not a byte ends it."""
        if self._byte_fallback_ids is None:
            backend_decoder = self._backend.decoder  # its state is its JSON (small)
            decoder = json.loads(backend_decoder.__getstate__()) if backend_decoder else {}
            is_sequence = decoder.get("type") == "Sequence"
            steps = decoder.get("decoders") or [] if is_sequence else [decoder]
            found = any(isinstance(s, dict) and s.get("type") == "ByteFallback" for s in steps)
            ids = (self._backend.token_to_id(f"<0x{b:02X}>") for b in range(256)) if found else ()
            self._byte_fallback_ids = frozenset(i for i in ids if i is not None)
        return self._byte_fallback_ids

    def token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._backend.id_to_token(token_id)

    def _special_content(self, name: str) -> str | None:
        token = self._special.get(name)
        return None if token is None else token.content

    @property
    def bos_token(self) -> str | None:
        return self._special_content("bos_token")

    @property
    def eos_token(self) -> str | None:
        return self._special_content("eos_token")

    @property
    def pad_token(self) -> str | None:
        return self._special_content("pad_token")

    @property
    def bos_token_id(self) -> int | None:
        bos = self.bos_token
        return None if bos is None else self.token_to_id(bos)

    @property
    def eos_token_id(self) -> int | None:
        eos = self.eos_token
        return None if eos is None else self.token_to_id(eos)

    @property
    def pad_token_id(self) -> int | None:
        pad = self.pad_token
        return None if pad is None else self.token_to_id(pad)

    @property
    def special_tokens_map(self) -> dict[str, str]:
        """Named special tokens (`bos_token`, ... and model-specific `*_token`) as strings."""
        return {name: token.content for name, token in self._special.items()}

    @property
    def all_special_tokens(self) -> list[str]:
        """Named special tokens (transformers' order), then extra special tokens, deduplicated."""
        named = [self._special[n].content for n in NAMED_SPECIAL_TOKENS if n in self._special]
        named += [t.content for n, t in self._special.items() if n not in NAMED_SPECIAL_TOKENS]
        contents = named + [t.content for t in self._extra_special]
        return list(dict.fromkeys(contents))

    @property
    def all_special_ids(self) -> list[int]:
        ids = (self.token_to_id(t) for t in self.all_special_tokens)
        return [i for i in ids if i is not None]

    # ---- text <-> ids -------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        if len(text) > _GIL_FREE_ENCODE_CHARS:
            # The backend's batch call releases the GIL (its single call does not): other
            # threads, e.g. the server's event loop, run while a long text is encoded.
            return self._backend.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids
        return self._backend.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(
        self, texts: Sequence[str], add_special_tokens: bool = True
    ) -> list[list[int]]:
        encodings = self._backend.encode_batch(list(texts), add_special_tokens=add_special_tokens)
        return [e.ids for e in encodings]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Ids to text; ids >= vocab_size are ignored (as the backend does)."""
        try:
            text = self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens)
        except OverflowError as e:  # a negative id
            raise ValueError(f"token ids must be in [0, {self.vocab_size}), got {ids!r}") from e
        if self.clean_up_tokenization_spaces and not self._is_bpe():
            text = clean_up_tokenization(text)
        return text

    def _is_bpe(self) -> bool:
        # transformers never applies the WordPiece-era space cleanup to BPE models.
        return isinstance(self._backend.model, tokenizers.models.BPE)

    # ---- chat templates -----------------------------------------------------------------

    @property
    def chat_template(self) -> str | dict[str, str] | None:
        if self._chat_templates is not None:
            return dict(self._chat_templates)
        return self._default_chat_template

    def get_chat_template(self, chat_template: str | None = None, tools: Any = None) -> str:
        """The template source to use: `chat_template` (a template string or, when the model has
        named templates, a template name), else the model's default ("tool_use" when tools are
        given and the model has it)."""
        named = self._chat_templates
        if named is not None:
            if chat_template is not None:
                return named.get(chat_template, chat_template)
            if tools is not None and "tool_use" in named:
                return named["tool_use"]
            if "default" in named:
                return named["default"]
            raise ChatTemplateError(
                "the model has several chat templates and none is named 'default': pass "
                f"chat_template=<name> with one of {sorted(named)}"
            )
        if chat_template is not None:
            return chat_template
        if self._default_chat_template is None:
            raise NoChatTemplateError(
                f"the model {self.name_or_path or '(unnamed)'} has no chat template: pass "
                "chat_template='<jinja template>' (e.g. the server's --chat-template option), or "
                "add chat_template.jinja / a 'chat_template' entry in tokenizer_config.json to "
                "the model directory"
            )
        return self._default_chat_template

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
        chat_template: str | None = None,
        *,
        documents: list[dict[str, Any]] | None = None,
        continue_final_message: bool | str = False,
        **template_kwargs: Any,
    ) -> str:
        """Render `messages` (dicts with "role" and "content") to the prompt text, as transformers'
        `apply_chat_template(..., tokenize=False)` does. `template_kwargs` become template
        variables and override the special-token variables (`bos_token`, `eos_token`, ...)."""
        source = self.get_chat_template(chat_template, tools)
        template = self._compiled_templates.get(source)
        if template is None:
            template = compile_chat_template(source)
            self._compiled_templates[source] = template
        return render_chat_template(
            template,
            source,
            messages,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message,
            tools=tools,
            documents=documents,
            variables={**self.special_tokens_map, **template_kwargs},
        )

    def render_chat_prompt_ids(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
        chat_template: str | None = None,
        **kwargs: Any,
    ) -> list[int]:
        """`apply_chat_template` then encode without adding special tokens (the template writes
        them), like transformers' `apply_chat_template(..., tokenize=True)`."""
        text = self.apply_chat_template(
            messages, add_generation_prompt, tools, chat_template, **kwargs
        )
        return self.encode(text, add_special_tokens=False)


def clean_up_tokenization(text: str) -> str:
    """Remove the spaces WordPiece-era decoders leave before punctuation and contractions."""
    for spaced, joined in (
        (" .", "."),
        (" ?", "?"),
        (" !", "!"),
        (" ,", ","),
        (" ' ", "'"),
        (" n't", "n't"),
        (" 'm", "'m"),
        (" 's", "'s"),
        (" 've", "'ve"),
        (" 're", "'re"),
    ):
        text = text.replace(spaced, joined)
    return text
