"""The torch GGML dequantizers (ops/ggml_dequant.py) against the `gguf` package's
`gguf.quants.dequantize`, on tensors written to GGUF files with the `gguf` package and read
back through the loader's staged copy (`gguf_tensor_bytes`): bit-exact in float32, and equal to
the reference rounded to bf16 / fp16. Blocks are random bytes with finite fp16 scales (every bit
pattern of the quants) and, where the package can quantize, quantized random values."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from kestrel.loader.gguf_loader import GGUFFile
from kestrel.loader.gguf_tensor_data import gguf_tensor_bytes, gguf_tensor_to_device
from kestrel.loader.staging import DeviceStager
from kestrel.ops import ggml_dequant
from kestrel.ops.ggml_dequant import TORCH_TYPES, dequantize_raw
from kestrel.testing.gguf_blocks import F16_SCALE_OFFSETS
from tests.gguf.fixtures import write_gguf

Q = gguf.GGMLQuantizationType
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
QUANTIZABLE = (Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1)
ROWS = 7  # odd


def _random_blocks(rng, qtype, rows: int, blocks_per_row: int) -> np.ndarray:
    """uint8 [rows, blocks_per_row * block_bytes]: random bytes, fp16 fields finite."""
    block_bytes = gguf.GGML_QUANT_SIZES[qtype][1]
    raw = rng.integers(0, 256, (rows * blocks_per_row, block_bytes), dtype=np.uint8)
    for offset in F16_SCALE_OFFSETS[qtype]:
        scale = rng.uniform(-2.0, 2.0, (raw.shape[0], 1)) * 2.0 ** rng.integers(
            -20, 4, (raw.shape[0], 1)
        )
        raw[:, offset : offset + 2] = scale.astype(np.float16).view(np.uint8)
    return raw.reshape(rows, blocks_per_row * block_bytes)


def _tensors(qtype) -> dict:
    """name -> what write_gguf stores: 2-D with an odd row count, and a 1-D tensor."""
    rng = np.random.default_rng(int(qtype))
    block_elems = gguf.GGML_QUANT_SIZES[qtype][0]
    blocks_per_row = {1: 96, 32: 3, 256: 2}[block_elems]
    cols = blocks_per_row * block_elems
    values = rng.standard_normal((ROWS, cols)).astype(np.float32)
    if qtype == Q.F32:
        return {"w": values, "v": values[0]}
    if qtype == Q.F16:
        return {"w": values.astype(np.float16), "v": values[0].astype(np.float16)}
    if qtype == Q.BF16:
        return {
            n: (gguf.quants.quantize(x, qtype), qtype) for n, x in (("w", values), ("v", values[0]))
        }
    tensors = {
        "w": (_random_blocks(rng, qtype, ROWS, blocks_per_row), qtype),
        "v": (_random_blocks(rng, qtype, 1, blocks_per_row)[0], qtype),
    }
    if qtype in QUANTIZABLE:
        tensors["quantized"] = (gguf.quants.quantize(values, qtype), qtype)
    return tensors


def _reference(t, dtype: torch.dtype) -> torch.Tensor:
    return torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type))).to(dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("qtype", sorted(TORCH_TYPES, key=lambda q: q.name), ids=lambda q: q.name)
def test_matches_gguf_package(tmp_path, monkeypatch, device, qtype):
    # Chunks of 5 blocks: not a whole number of rows, and a partial last chunk.
    block_elems = gguf.GGML_QUANT_SIZES[qtype][0]
    monkeypatch.setattr(ggml_dequant, "_CHUNK_ELEMS", 5 * block_elems)
    path = write_gguf(tmp_path / "t.gguf", "llama", {}, _tensors(qtype))
    f = GGUFFile(path)
    checked = 0
    for t in f.reader.tensors:
        raw = gguf_tensor_bytes(t, device)
        assert raw.dtype == torch.uint8 and raw.device.type == device
        assert raw.numel() == int(t.n_bytes)
        for dtype in DTYPES:
            got = dequantize_raw(raw, t.tensor_type, dtype)
            ref = _reference(t, dtype)
            assert got.dtype == dtype and got.device.type == device
            assert got.shape == ref.shape, t.name
            assert torch.equal(got.cpu(), ref), (t.name, dtype)
            checked += 1
    assert checked >= 2 * len(DTYPES)


@pytest.mark.parametrize("device", DEVICES)
def test_values_are_those_the_bits_say(device):
    # Independent of the gguf package: one hand-built Q4_0 and one Q8_0 block.
    d = np.array([0.5], dtype=np.float16).view(np.uint8)
    q = np.arange(32) % 16
    q4 = np.concatenate([d, (q[:16] | (q[16:] << 4)).astype(np.uint8)])
    got = dequantize_raw(torch.from_numpy(q4[None]).to(device), Q.Q4_0, torch.float32)
    assert torch.equal(got.cpu()[0], 0.5 * (torch.from_numpy(q).float() - 8))
    q8 = np.concatenate([d, np.arange(-16, 16, dtype=np.int8).view(np.uint8)])
    got = dequantize_raw(torch.from_numpy(q8[None]).to(device), Q.Q8_0, torch.float32)
    assert torch.equal(got.cpu()[0], 0.5 * torch.arange(-16, 16).float())


@pytest.mark.parametrize("device", DEVICES)
def test_other_types_take_the_gguf_cpu_path(tmp_path, device):
    assert Q.IQ4_NL not in TORCH_TYPES
    rng = np.random.default_rng(3)
    raw = _random_blocks(rng, Q.IQ4_NL, 3, 2)
    f = GGUFFile(write_gguf(tmp_path / "iq.gguf", "llama", {}, {"w": (raw, Q.IQ4_NL)}))
    t = f.tensor("w")
    seen = []
    with DeviceStager(device, progress=seen.append) as stager:
        got = gguf_tensor_to_device(t, torch.bfloat16, stager)
    assert got.device.type == device and got.shape == (3, 64)
    assert torch.equal(got.cpu(), _reference(t, torch.bfloat16))
    assert sum(seen) == int(t.n_bytes)  # counted in the byte progress


def test_bad_raw_data_is_refused():
    with pytest.raises(ValueError, match=r"row of 33 bytes is not a whole number of Q8_0 blocks"):
        dequantize_raw(torch.zeros(2, 33, dtype=torch.uint8), Q.Q8_0, torch.float32)
    with pytest.raises(ValueError, match=r"IQ4_NL has no torch dequantizer"):
        dequantize_raw(torch.zeros(2, 18, dtype=torch.uint8), Q.IQ4_NL, torch.float32)
    with pytest.raises(ValueError, match=r"uint8 tensor"):
        dequantize_raw(torch.zeros(2, 34, dtype=torch.int8), Q.Q8_0, torch.float32)


def test_one_stager_serves_weights_and_raw_blocks(tmp_path):
    # The interface of the quantized-weight path: iter_gguf_weights and gguf_tensor_bytes share
    # the caller's stager (its buffers and byte count); a stager for another device is refused.
    from kestrel.loader.gguf_loader import gguf_model_config, iter_gguf_weights
    from kestrel.testing.tiny_models import make_tiny_model
    from tests.gguf.fixtures import write_gguf_from_hf

    pytest.importorskip("transformers")
    hf_dir = make_tiny_model(tmp_path / "hf", "qwen2", with_tokenizer=False)
    path = write_gguf_from_hf(
        hf_dir, tmp_path / "m.gguf", "qwen2", qtype=Q.Q8_0, with_tokenizer=False
    )
    f = GGUFFile(path)
    seen: list[int] = []
    stager = DeviceStager("cpu", progress=seen.append)
    names = [
        name
        for name, _ in iter_gguf_weights(
            f, gguf_model_config(f), torch.float32, "cpu", stager=stager
        )
    ]
    assert len(names) == len(f.reader.tensors)
    q = f.tensor("blk.0.attn_q.weight")
    raw = gguf_tensor_bytes(q, "cpu", stager)
    assert raw.shape == (q.data.shape[0], q.data.shape[1]) and raw.dtype == torch.uint8
    assert np.array_equal(raw.numpy(), q.data)
    assert sum(seen) == sum(int(t.n_bytes) for t in f.reader.tensors) + int(q.n_bytes)
    raw[0, 0] ^= 1  # a private copy on CPU: the file mapping is untouched
    assert not np.array_equal(raw.numpy(), q.data)
    with pytest.raises(ValueError, match=r"the stager copies to cpu, not to meta"):
        gguf_tensor_bytes(q, "meta", stager)
