"""Resolving the MODEL argument: local files and directories, the Hugging Face cache layout
(laid out on disk by the test), and the errors when nothing matches."""

from __future__ import annotations

import pytest

from kestrel import LLM, SamplingParams
from kestrel.model_source import ModelNotFoundError, hf_hub_cache_dir, resolve_model
from kestrel.testing.tiny_models import make_tiny_model
from tests.gguf.fixtures import write_gguf

REV_MAIN = "a" * 40
REV_OLD = "b" * 40


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """An empty hub cache in HF_HUB_CACHE; downloads are off (the hub is unreachable here)."""
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def _snapshot(cache, repo: str, rev: str, main: bool):
    repo_dir = cache / ("models--" + repo.replace("/", "--"))
    snap = repo_dir / "snapshots" / rev
    snap.mkdir(parents=True)
    if main:
        (repo_dir / "refs").mkdir(exist_ok=True)
        (repo_dir / "refs" / "main").write_text(rev)
    return snap


def test_hf_cache_dir_precedence(tmp_path, monkeypatch):
    for var in ("HF_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert hf_hub_cache_dir() == tmp_path / "home" / ".cache" / "huggingface" / "hub"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert hf_hub_cache_dir() == tmp_path / "xdg" / "huggingface" / "hub"
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hfhome"))
    assert hf_hub_cache_dir() == tmp_path / "hfhome" / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "direct"))
    assert hf_hub_cache_dir() == tmp_path / "direct"


def test_hf_id_resolves_to_refs_main_snapshot_and_runs(hub):
    old = _snapshot(hub, "org/tiny", REV_OLD, main=False)
    make_tiny_model(old, "qwen2", seed=1)
    new = _snapshot(hub, "org/tiny", REV_MAIN, main=True)
    make_tiny_model(new, "qwen2", seed=0)
    source = resolve_model("org/tiny")
    assert (source.path, source.format, source.name) == (new, "hf", "org/tiny")
    llm = LLM("org/tiny", dtype="float32", device="cpu", num_kv_blocks=32)
    out = llm.generate([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=3), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) >= 1


def test_hf_id_with_gguf_repo(hub):
    snap = _snapshot(hub, "org/ggufs", REV_MAIN, main=True)
    write_gguf(snap / "one.Q4_0.gguf", "llama", {}, {})
    assert resolve_model("org/ggufs").path == snap / "one.Q4_0.gguf"
    write_gguf(snap / "two.Q8_0.gguf", "llama", {}, {})
    assert resolve_model("org/ggufs/two.Q8_0.gguf").path == snap / "two.Q8_0.gguf"
    # Two files and no choice: not resolvable from the cache, and downloads are off.
    with pytest.raises(ModelNotFoundError, match="not in the Hugging Face cache"):
        resolve_model("org/ggufs")


def test_single_snapshot_without_ref(hub):
    snap = _snapshot(hub, "org/noref", REV_OLD, main=False)
    (snap / "config.json").write_text("{}")
    assert resolve_model("org/noref").path == snap


def test_hf_id_not_cached_and_offline(hub):
    with pytest.raises(ModelNotFoundError) as info:
        resolve_model("org/absent")
    message = str(info.value)
    assert "'org/absent'" in message and str(hub) in message and "HF_HUB_OFFLINE" in message
    with pytest.raises(ModelNotFoundError, match="downloads are disabled"):
        resolve_model("org/absent", download=False)


def test_local_paths(tmp_path):
    gguf_path = write_gguf(tmp_path / "m.gguf", "llama", {}, {})
    assert (resolve_model(str(gguf_path)).format, resolve_model(gguf_path).path) == (
        "gguf",
        gguf_path,
    )
    assert resolve_model(str(tmp_path)).path == gguf_path  # the only .gguf of a directory
    write_gguf(tmp_path / "n.gguf", "llama", {}, {})
    with pytest.raises(ModelNotFoundError, match="several GGUF files"):
        resolve_model(str(tmp_path))
    (tmp_path / "config.json").write_text("{}")
    assert resolve_model(str(tmp_path)).format == "hf"
    with pytest.raises(ModelNotFoundError, match="no such file or directory"):
        resolve_model(str(tmp_path / "missing.gguf"))
    with pytest.raises(ModelNotFoundError, match="no such file or directory"):
        resolve_model("./nothing/here")
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(ModelNotFoundError, match="not a GGUF file"):
        resolve_model(str(tmp_path / "notes.txt"))
    with pytest.raises(ModelNotFoundError, match="empty string"):
        resolve_model("")
