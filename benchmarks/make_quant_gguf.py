"""Rewrite a GGUF file's 2-D weights as random, valid quantized blocks, keeping its metadata
(tokenizer included) and its F32 norms / biases: files of each quant type for the load-time and
decode benchmarks, in the shape of the source (e.g. one written by .peers/make_gguf.py).

    python benchmarks/make_quant_gguf.py /tmp/q05.gguf /tmp/q05-q4_k_m.gguf --scheme q4_k_m

Schemes: one GGML type for every 2-D weight (q8_0, q4_0, q4_1, q5_0, q5_1, q2_k, q3_k, q4_k,
q5_k, q6_k), or q4_k_m: Q4_K, with Q6_K for output.weight and for attn_v / ffn_down in the
first and last eighth of the layers and every third layer between (about llama.cpp's mix).
Like llama.cpp, a K type falls back to a 32-block type (Q4_K/Q3_K/Q2_K -> Q5_0, Q5_K/Q6_K ->
Q8_0) for rows that are not a multiple of 256 values. Block scales are fp16 values of about
2^-12 so that dequantized weights stay within roughly +-0.25; the quants are uniform random.
"""

from __future__ import annotations

import argparse
import re

import gguf
import numpy as np

from kestrel.testing.gguf_blocks import F16_SCALE_OFFSETS

Q = gguf.GGMLQuantizationType
K_FALLBACK = {Q.Q2_K: Q.Q5_0, Q.Q3_K: Q.Q5_0, Q.Q4_K: Q.Q5_0, Q.Q5_K: Q.Q8_0, Q.Q6_K: Q.Q8_0}
FILE_TYPES = {
    "q4_k_m": gguf.LlamaFileType.MOSTLY_Q4_K_M,
    "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
    "q4_1": gguf.LlamaFileType.MOSTLY_Q4_1,
    "q5_0": gguf.LlamaFileType.MOSTLY_Q5_0,
    "q5_1": gguf.LlamaFileType.MOSTLY_Q5_1,
    "q2_k": gguf.LlamaFileType.MOSTLY_Q2_K,
    "q3_k": gguf.LlamaFileType.MOSTLY_Q3_K_M,
    "q4_k": gguf.LlamaFileType.MOSTLY_Q4_K_S,
    "q5_k": gguf.LlamaFileType.MOSTLY_Q5_K_S,
    "q6_k": gguf.LlamaFileType.MOSTLY_Q6_K,
}
_LAYER_RE = re.compile(r"blk\.(\d+)\.(attn_v|ffn_down)\.weight")


def weight_type(name: str, scheme: str, num_layers: int) -> gguf.GGMLQuantizationType:
    if scheme != "q4_k_m":
        return Q[scheme.upper()]
    if name == "output.weight":
        return Q.Q6_K
    match = _LAYER_RE.fullmatch(name)
    if match is not None:
        layer, eighth = int(match.group(1)), max(1, num_layers // 8)
        more_bits = layer < eighth or layer >= num_layers - eighth or (layer - eighth) % 3 == 2
        if more_bits:
            return Q.Q6_K
    return Q.Q4_K


def random_blocks(rng, qtype, rows: int, row_values: int) -> np.ndarray:
    """uint8 [rows, row_bytes] of random valid `qtype` blocks."""
    block_values, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, (rows * (row_values // block_values), block_bytes), np.uint8)
    for offset in F16_SCALE_OFFSETS[qtype]:
        scale = rng.uniform(0.5, 1.0, (blocks.shape[0], 1)) * 2.0**-12
        blocks[:, offset : offset + 2] = scale.astype(np.float16).view(np.uint8)
    return blocks.reshape(rows, -1)


def copy_metadata(src: gguf.GGUFReader, dst: gguf.GGUFWriter, file_type: int) -> None:
    """Every key except the reader's GGUF.* header fields, the architecture (the writer sets
    it) and general.file_type (replaced)."""
    for key, field in src.fields.items():
        if key.startswith("GGUF.") or key in ("general.architecture", "general.file_type"):
            continue
        kind = field.types[0]
        if kind == gguf.GGUFValueType.ARRAY:
            sub = field.types[1]
            values = [
                bytes(field.parts[i]).decode("utf-8", "replace")
                if sub == gguf.GGUFValueType.STRING
                else field.parts[i].tolist()[0]
                for i in field.data
            ]
            dst.add_array(key, values)
        elif kind == gguf.GGUFValueType.STRING:
            dst.add_string(key, bytes(field.parts[field.data[0]]).decode("utf-8"))
        else:
            dst.add_key_value(key, field.parts[field.data[0]].tolist()[0], kind)
    dst.add_file_type(file_type)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("src")
    ap.add_argument("dst")
    ap.add_argument("--scheme", default="q4_k_m", choices=sorted(FILE_TYPES))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    src = gguf.GGUFReader(args.src)
    arch = bytes(src.fields["general.architecture"].parts[-1]).decode()
    num_layers = int(src.fields[f"{arch}.block_count"].parts[-1][0])
    writer = gguf.GGUFWriter(args.dst, arch)
    copy_metadata(src, writer, int(FILE_TYPES[args.scheme]))
    rng = np.random.default_rng(args.seed)
    counts: dict[str, int] = {}
    for tensor in src.tensors:
        shape = tuple(int(n) for n in reversed(list(tensor.shape)))  # numpy order
        if len(shape) != 2:
            writer.add_tensor(tensor.name, np.array(tensor.data), raw_dtype=tensor.tensor_type)
            counts[tensor.tensor_type.name] = counts.get(tensor.tensor_type.name, 0) + 1
            continue
        qtype = weight_type(tensor.name, args.scheme, num_layers)
        if shape[1] % gguf.GGML_QUANT_SIZES[qtype][0] != 0:
            qtype = K_FALLBACK[qtype]
        writer.add_tensor(tensor.name, random_blocks(rng, qtype, *shape), raw_dtype=qtype)
        counts[qtype.name] = counts.get(qtype.name, 0) + 1
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file(progress=False)
    writer.close()
    print("wrote", args.dst, args.scheme, dict(sorted(counts.items())))


if __name__ == "__main__":
    main()
