"""Weights straight to the device: the staged byte copy (loader/staging.py), the safetensors
reader over one memory mapping (loader/safetensors_file.py) against the `safetensors` library,
the load summary line, and (on a GPU) whole models loaded to CUDA equal to the CPU load."""

from __future__ import annotations

import logging
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from kestrel.loader import find_safetensors_files, iter_safetensors_weights, load_model
from kestrel.loader.load_report import device_weight_bytes
from kestrel.loader.staging import DeviceStager, file_bytes
from kestrel.testing.tiny_models import make_tiny_model
from tests.gguf.fixtures import write_gguf_from_hf

pytest.importorskip("transformers")

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


def _mapped_bytes(tmp_path: Path, num_bytes: int) -> tuple[np.ndarray, torch.Tensor]:
    data = np.random.default_rng(0).integers(0, 256, num_bytes, dtype=np.uint8)
    path = tmp_path / "bytes.bin"
    data.tofile(path)
    return data, file_bytes(np.memmap(path, mode="r"))


@pytest.mark.parametrize("device", DEVICES)
def test_stager_copies_every_byte_through_the_two_buffers(tmp_path, device):
    data, mapped = _mapped_bytes(tmp_path, 10_007)
    seen: list[int] = []
    ranges = [(0, 10_007), (5, 5), (3, 4), (17, 2_517), (9_000, 10_007)]
    with DeviceStager(device, buffer_bytes=1_000, progress=seen.append) as stager:
        # Many chunks per call and buffers reused across calls, results read only at the end.
        outs = [stager.to_device(mapped[a:b]) for a, b in ranges]
    for (a, b), out in zip(ranges, outs, strict=True):
        assert out.device.type == device and out.dtype == torch.uint8
        np.testing.assert_array_equal(out.cpu().numpy(), data[a:b])
    assert sum(seen) == stager.bytes_staged == sum(b - a for a, b in ranges)
    if device == "cpu":
        assert outs[0].data_ptr() == mapped.data_ptr()  # a view of the mapping, not a copy
    else:
        assert max(seen) <= 1_000  # progress per chunk


def test_stager_rejects_what_it_cannot_copy():
    with pytest.raises(ValueError, match=r"buffer_bytes=0 must be >= 1"):
        DeviceStager("cpu", buffer_bytes=0)
    stager = DeviceStager("cpu")
    with pytest.raises(ValueError, match=r"1-D CPU uint8 tensor, got torch.float32 \(2, 2\)"):
        stager.to_device(torch.zeros(2, 2))


def _all_dtypes() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "f32": torch.randn(3, 5, generator=g),
        "f16": torch.randn(7, generator=g).half(),
        "bf16": torch.randn(2, 3, 4, generator=g).bfloat16(),  # odd byte offsets follow
        "i8": torch.randint(-128, 127, (3,), generator=g, dtype=torch.int8),
        "i64": torch.randint(-(2**40), 2**40, (4,), generator=g),
        "bool": torch.rand(5, generator=g) > 0.5,
        "f8": torch.randn(6, generator=g).to(torch.float8_e4m3fn),
        "empty": torch.zeros(0, 3),
        "scalar": torch.tensor(2.5),
    }


@pytest.mark.parametrize("device", DEVICES)
def test_safetensors_reader_matches_the_library(tmp_path, device):
    save_file(_all_dtypes(), tmp_path / "model.safetensors")
    expected = load_file(tmp_path / "model.safetensors")
    got = dict(iter_safetensors_weights([tmp_path / "model.safetensors"], device))
    assert got.keys() == expected.keys()
    for name, tensor in expected.items():
        assert got[name].device.type == device, name
        assert got[name].dtype == tensor.dtype and got[name].shape == tensor.shape, name
        bits = got[name].cpu().reshape(-1).view(torch.uint8)
        assert torch.equal(bits, tensor.reshape(-1).view(torch.uint8)), name


def test_safetensors_reader_names_bad_files(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file({"w": torch.zeros(64)}, path)
    path.write_bytes(path.read_bytes()[:-8])
    with pytest.raises(ValueError, match=r"truncated: tensor 'w' ends at byte \d+ but the file"):
        list(iter_safetensors_weights([path]))
    header = b'{"w": {"dtype": "F4", "shape": [2], "data_offsets": [0, 1]}}'
    path.write_bytes(len(header).to_bytes(8, "little") + header + b"\0")
    with pytest.raises(ValueError, match=r"tensor 'w': dtype 'F4' is not supported"):
        list(iter_safetensors_weights([path]))
    header = b'{"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}'
    path.write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 8)
    with pytest.raises(ValueError, match=r"4 data bytes, but shape \[2\] of F32 needs 8"):
        list(iter_safetensors_weights([path]))
    path.write_bytes(b"\xff" * 16)
    with pytest.raises(ValueError, match=r"header length \d+ exceeds the file"):
        list(iter_safetensors_weights([path]))


def test_load_logs_time_device_gib_and_rate(tmp_path, caplog):
    hf_dir = make_tiny_model(tmp_path / "hf", "qwen2", with_tokenizer=False)
    gguf_path = write_gguf_from_hf(hf_dir, tmp_path / "m.gguf", "qwen2", with_tokenizer=False)
    for source in (hf_dir, gguf_path):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="kestrel.loader.load_report"):
            model, _ = load_model(source, "float32")
        lines = [r.getMessage() for r in caplog.records if "loaded weights" in r.getMessage()]
        assert len(lines) == 1, lines
        gib = device_weight_bytes(model) / (1 << 30)
        assert f"{gib:.2f} GiB on cpu" in lines[0] and "GiB/s" in lines[0]
        assert str(source) in lines[0]


def test_device_weight_bytes_counts_a_tied_weight_once(tmp_path):
    tied = make_tiny_model(
        tmp_path / "tied", "llama", tie_word_embeddings=True, with_tokenizer=False
    )
    model, _ = load_model(tied, "float32")
    expected = sum(p.numel() * 4 for p in model.parameters())  # parameters() dedupes too
    expected += sum(b.numel() * b.element_size() for b in model.buffers())
    assert device_weight_bytes(model) == expected
    assert model.lm_head.weight is model.model.embed_tokens.weight


def _assert_same_weights(on_device: torch.nn.Module, on_cpu: torch.nn.Module) -> None:
    cpu_params = dict(on_cpu.named_parameters())
    for name, param in on_device.named_parameters():
        assert param.device.type == "cuda", name
        assert torch.equal(param.cpu(), cpu_params[name]), name


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_safetensors_model_loaded_to_cuda_equals_cpu_load(tmp_path, dtype):
    hf_dir = make_tiny_model(tmp_path / "hf", "qwen2", max_shard_size="60KB", with_tokenizer=False)
    assert len(find_safetensors_files(hf_dir)) > 1
    on_cuda, _ = load_model(hf_dir, dtype, "cuda")
    on_cpu, _ = load_model(hf_dir, dtype, "cpu")
    _assert_same_weights(on_cuda, on_cpu)


@pytest.mark.cuda
@pytest.mark.parametrize("qtype", [gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.Q8_0])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_gguf_model_loaded_to_cuda_equals_cpu_load(tmp_path, qtype, arch):
    hf_dir = make_tiny_model(tmp_path / "hf", arch, with_tokenizer=False)
    path = write_gguf_from_hf(hf_dir, tmp_path / "m.gguf", arch, qtype=qtype, with_tokenizer=False)
    on_cuda, _ = load_model(path, "bfloat16", "cuda")
    on_cpu, _ = load_model(path, "bfloat16", "cpu")
    _assert_same_weights(on_cuda, on_cpu)


def test_safetensors_reader_reads_a_tensor_off_its_alignment(tmp_path):
    # The format does not force alignment: a float32 tensor at data offset 2.
    header = (
        b'{"a": {"dtype": "U8", "shape": [2], "data_offsets": [0, 2]}, '
        b'"b": {"dtype": "F32", "shape": [2], "data_offsets": [2, 10]}}'
    )
    header += b" " * (-len(header) % 8)
    values = np.array([1.5, -3.25], dtype=np.float32).tobytes()
    path = tmp_path / "model.safetensors"
    path.write_bytes(len(header).to_bytes(8, "little") + header + b"\x07\x09" + values)
    got = dict(iter_safetensors_weights([path]))
    assert torch.equal(got["a"], torch.tensor([7, 9], dtype=torch.uint8))
    assert torch.equal(got["b"], torch.tensor([1.5, -3.25]))
