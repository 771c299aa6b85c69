"""The engine refuses FP8 on a device without FP8 tensor cores (here: the CPU) before it reads
any weight, for quantization="fp8" and for an FP8 checkpoint alike, naming the device and what
FP8 needs. (FP8 engines run in tests/gpu/test_fp8_gpu.py.)"""

from __future__ import annotations

import pytest

from kestrel import LLM
from kestrel.config import ConfigError
from kestrel.testing.tiny_models import make_tiny_model
from tests.models.fp8_checkpoints import compressed_tensors_config, write_fp8_checkpoint


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny"), "llama")


def _refused(model, **kwargs) -> str:
    with pytest.raises(ConfigError) as info:
        LLM(str(model), device="cpu", **kwargs)
    assert info.value.field == "quantization"
    return str(info.value)


def test_quantization_fp8_on_cpu_is_refused(tiny_dir, monkeypatch):
    def never(*args, **kwargs):
        raise AssertionError("weights were loaded before the device check")

    monkeypatch.setattr("kestrel.engine.llm_engine.load_engine_model", never)
    message = _refused(tiny_dir, quantization="fp8")
    assert "device is cpu" in message and "compute capability 8.9" in message


def test_gguf_with_quantization_fp8_on_cpu_is_refused():
    from kestrel.default_model import default_model_path

    assert "device is cpu" in _refused(default_model_path(), quantization="fp8")


def test_fp8_checkpoint_on_cpu_is_refused(tiny_dir, tmp_path):
    path = write_fp8_checkpoint(
        tiny_dir, tmp_path / "fp8", compressed_tensors_config("channel", ["lm_head"]),
        strategy="channel",
    )  # fmt: skip
    assert "device is cpu" in _refused(path)


def test_unquantized_and_gguf_values_still_run_on_cpu(tiny_dir):
    for quantization in (None, "gguf"):
        llm = LLM(str(tiny_dir), device="cpu", quantization=quantization, num_kv_blocks=8)
        assert llm.engine.model.quant_config is None
