"""FastGGUFReader gives exactly what gguf.GGUFReader gives: every field (offsets, types, parts,
data indices, contents) and every tensor, on a file with every kind of metadata value."""

from __future__ import annotations

import gguf
import numpy as np
import pytest

from kestrel.loader.gguf_reader_fast import FastGGUFReader
from tests.gguf.fixtures import write_gguf

VT = gguf.GGUFValueType


def _write_every_kind(path):
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_token_list(["a", "", "héllo", "<|im_end|>", " " * 40] * 50)
    writer.add_token_types([1, 3, 1, 4, 1] * 50)
    writer.add_token_scores([0.5, -1.25, 0.0, 3.0, 7.5] * 50)
    writer.add_array("test.bools", [True, False, True])
    writer.add_array("test.ints", [-(2**30), 0, 2**30])
    writer.add_array("test.floats", [0.25, -8.0])
    writer.add_array("test.nested", [[1, 2], [3]])
    for kind, value in [
        (VT.UINT8, 7),
        (VT.INT8, -7),
        (VT.UINT16, 700),
        (VT.INT16, -700),
        (VT.UINT32, 70000),
        (VT.INT32, -70000),
        (VT.FLOAT32, 1.5),
        (VT.UINT64, 2**40),
        (VT.INT64, -(2**40)),
        (VT.FLOAT64, 2.25),
        (VT.BOOL, True),
        (VT.STRING, "ünïcode"),
    ]:
        writer.add_key_value(f"test.{kind.name.lower()}", value, kind)
    writer.add_tensor("w", np.arange(12, dtype=np.float32).reshape(3, 4))
    raw = np.zeros((2, 2 * 34), dtype=np.uint8)
    writer.add_tensor("q", raw, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("which", ["every_kind", "tensors_only"])
def test_fields_and_tensors_equal_the_package_reader(tmp_path, which):
    if which == "every_kind":
        path = _write_every_kind(tmp_path / "k.gguf")
    else:
        path = write_gguf(tmp_path / "t.gguf", "qwen2", {}, {"v": np.ones(5, np.float32)})
    ours, theirs = FastGGUFReader(path), gguf.GGUFReader(path)
    assert list(ours.fields) == list(theirs.fields)
    for key, expected in theirs.fields.items():
        got = ours.fields[key]
        assert (got.offset, got.name, got.types, got.data) == (
            expected.offset,
            expected.name,
            expected.types,
            expected.data,
        ), key
        assert len(got.parts) == len(expected.parts), key
        for a, b in zip(got.parts, expected.parts, strict=True):
            assert a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b), key
        assert got.contents() == expected.contents(), key
    assert ours.data_offset == theirs.data_offset
    assert [t.name for t in ours.tensors] == [t.name for t in theirs.tensors]
    for got, expected in zip(ours.tensors, theirs.tensors, strict=True):
        assert got.tensor_type == expected.tensor_type and got.n_bytes == expected.n_bytes
        assert got.data_offset == expected.data_offset
        assert np.array_equal(got.shape, expected.shape)
        assert got.data.dtype == expected.data.dtype
        assert np.array_equal(got.data, expected.data)
    if which == "every_kind":
        assert ours.fields["tokenizer.ggml.tokens"].contents()[:3] == ["a", "", "héllo"]
        assert ours.fields["test.bools"].contents() == [True, False, True]
        assert ours.fields["test.nested"].types[:2] == [VT.ARRAY, VT.ARRAY]  # package's path
