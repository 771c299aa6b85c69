// pybind11 module kestrel._kernels: thin wrappers over the launchers declared in kernels.h.
// Every launch releases the GIL while it enqueues work and returns a cudaError_t code (0 on
// success); Python turns non-zero codes into exceptions that name the op. The launches with
// many arguments take a parameter struct whose fields are set by name (ints for pointers,
// strides and sizes; no torch here): args = _kernels.DecodeAttentionArgs(); args.q = ...;
// _kernels.paged_decode_attention(args, stream).
#include <pybind11/pybind11.h>

#include "kernels.h"

namespace py = pybind11;
using namespace kestrel::api;

// One named, read-write field of a parameter struct.
#define KESTREL_FIELD(Struct, name) def_readwrite(#name, &Struct::name)

PYBIND11_MODULE(_kernels, m) {
  m.doc() = "Kestrel fused CUDA kernels (raw-pointer launchers; see kestrel.ops)";
  m.attr("DTYPE_FLOAT16") = 0;
  m.attr("DTYPE_BFLOAT16") = 1;
  m.attr("DTYPE_FLOAT8_E4M3") = 2;  // KV caches (kv_dtype) and dense_gemv weights only
  const auto nogil = py::call_guard<py::gil_scoped_release>();
  m.def("error_string", &error_string, py::arg("code"));

  py::class_<RmsNormArgs>(m, "RmsNormArgs")
      .def(py::init<>())
      .KESTREL_FIELD(RmsNormArgs, out)
      .KESTREL_FIELD(RmsNormArgs, x)
      .KESTREL_FIELD(RmsNormArgs, weight)
      .KESTREL_FIELD(RmsNormArgs, rows)
      .KESTREL_FIELD(RmsNormArgs, inner)
      .KESTREL_FIELD(RmsNormArgs, stride_outer)
      .KESTREL_FIELD(RmsNormArgs, stride_inner)
      .KESTREL_FIELD(RmsNormArgs, hidden)
      .KESTREL_FIELD(RmsNormArgs, eps)
      .KESTREL_FIELD(RmsNormArgs, dtype)
      .KESTREL_FIELD(RmsNormArgs, vec8);
  m.def("rms_norm", &rms_norm, nogil, py::arg("args"), py::arg("stream"));

  py::class_<FusedAddRmsNormArgs>(m, "FusedAddRmsNormArgs")
      .def(py::init<>())
      .KESTREL_FIELD(FusedAddRmsNormArgs, x)
      .KESTREL_FIELD(FusedAddRmsNormArgs, residual)
      .KESTREL_FIELD(FusedAddRmsNormArgs, weight)
      .KESTREL_FIELD(FusedAddRmsNormArgs, rows)
      .KESTREL_FIELD(FusedAddRmsNormArgs, hidden)
      .KESTREL_FIELD(FusedAddRmsNormArgs, eps)
      .KESTREL_FIELD(FusedAddRmsNormArgs, dtype)
      .KESTREL_FIELD(FusedAddRmsNormArgs, vec8);
  m.def("fused_add_rms_norm", &fused_add_rms_norm, nogil, py::arg("args"), py::arg("stream"));

  m.def("silu_and_mul", &silu_and_mul, nogil, py::arg("out"), py::arg("x"), py::arg("tokens"),
        py::arg("inter"), py::arg("dtype"), py::arg("vec8"), py::arg("stream"));

  py::class_<RotaryCacheArgs>(m, "RotaryCacheArgs")
      .def(py::init<>())
      .KESTREL_FIELD(RotaryCacheArgs, positions)
      .KESTREL_FIELD(RotaryCacheArgs, positions_int64)
      .KESTREL_FIELD(RotaryCacheArgs, q)
      .KESTREL_FIELD(RotaryCacheArgs, q_stride)
      .KESTREL_FIELD(RotaryCacheArgs, num_q_heads)
      .KESTREL_FIELD(RotaryCacheArgs, k)
      .KESTREL_FIELD(RotaryCacheArgs, k_stride)
      .KESTREL_FIELD(RotaryCacheArgs, num_kv_heads)
      .KESTREL_FIELD(RotaryCacheArgs, v)
      .KESTREL_FIELD(RotaryCacheArgs, v_stride)
      .KESTREL_FIELD(RotaryCacheArgs, cos_sin)
      .KESTREL_FIELD(RotaryCacheArgs, key_cache)
      .KESTREL_FIELD(RotaryCacheArgs, value_cache)
      .KESTREL_FIELD(RotaryCacheArgs, slot_mapping)
      .KESTREL_FIELD(RotaryCacheArgs, slots_int64)
      .KESTREL_FIELD(RotaryCacheArgs, num_tokens)
      .KESTREL_FIELD(RotaryCacheArgs, head_dim)
      .KESTREL_FIELD(RotaryCacheArgs, dtype)
      .KESTREL_FIELD(RotaryCacheArgs, kv_dtype)
      .KESTREL_FIELD(RotaryCacheArgs, k_scale)
      .KESTREL_FIELD(RotaryCacheArgs, v_scale)
      .KESTREL_FIELD(RotaryCacheArgs, vec8);
  m.def("rotary_embedding_and_cache", &rotary_embedding_and_cache, nogil, py::arg("args"),
        py::arg("stream"));

  py::class_<DecodeAttentionArgs>(m, "DecodeAttentionArgs")
      .def(py::init<>())
      .KESTREL_FIELD(DecodeAttentionArgs, out)
      .KESTREL_FIELD(DecodeAttentionArgs, out_stride)
      .KESTREL_FIELD(DecodeAttentionArgs, q)
      .KESTREL_FIELD(DecodeAttentionArgs, q_stride)
      .KESTREL_FIELD(DecodeAttentionArgs, key_cache)
      .KESTREL_FIELD(DecodeAttentionArgs, value_cache)
      .KESTREL_FIELD(DecodeAttentionArgs, block_tables)
      .KESTREL_FIELD(DecodeAttentionArgs, bt_stride)
      .KESTREL_FIELD(DecodeAttentionArgs, seq_lens)
      .KESTREL_FIELD(DecodeAttentionArgs, num_seqs)
      .KESTREL_FIELD(DecodeAttentionArgs, num_q_heads)
      .KESTREL_FIELD(DecodeAttentionArgs, num_kv_heads)
      .KESTREL_FIELD(DecodeAttentionArgs, head_dim)
      .KESTREL_FIELD(DecodeAttentionArgs, block_size)
      .KESTREL_FIELD(DecodeAttentionArgs, scale)
      .KESTREL_FIELD(DecodeAttentionArgs, heads_per_block)
      .KESTREL_FIELD(DecodeAttentionArgs, num_splits)
      .KESTREL_FIELD(DecodeAttentionArgs, min_split_len)
      .KESTREL_FIELD(DecodeAttentionArgs, workspace)
      .KESTREL_FIELD(DecodeAttentionArgs, workspace_floats)
      .KESTREL_FIELD(DecodeAttentionArgs, dtype)
      .KESTREL_FIELD(DecodeAttentionArgs, kv_dtype)
      .KESTREL_FIELD(DecodeAttentionArgs, k_scale)
      .KESTREL_FIELD(DecodeAttentionArgs, v_scale);
  m.def("paged_decode_attention", &paged_decode_attention, nogil, py::arg("args"),
        py::arg("stream"));
  m.def("paged_decode_blocks_per_sm", &paged_decode_blocks_per_sm, py::arg("head_dim"),
        py::arg("heads_per_block"), py::arg("dtype"), py::arg("kv_dtype") = -1);

  py::class_<PrefillAttentionArgs>(m, "PrefillAttentionArgs")
      .def(py::init<>())
      .KESTREL_FIELD(PrefillAttentionArgs, out)
      .KESTREL_FIELD(PrefillAttentionArgs, out_stride)
      .KESTREL_FIELD(PrefillAttentionArgs, q)
      .KESTREL_FIELD(PrefillAttentionArgs, q_stride)
      .KESTREL_FIELD(PrefillAttentionArgs, key_cache)
      .KESTREL_FIELD(PrefillAttentionArgs, value_cache)
      .KESTREL_FIELD(PrefillAttentionArgs, block_tables)
      .KESTREL_FIELD(PrefillAttentionArgs, bt_stride)
      .KESTREL_FIELD(PrefillAttentionArgs, query_start_loc)
      .KESTREL_FIELD(PrefillAttentionArgs, seq_lens)
      .KESTREL_FIELD(PrefillAttentionArgs, num_seqs)
      .KESTREL_FIELD(PrefillAttentionArgs, num_tokens)
      .KESTREL_FIELD(PrefillAttentionArgs, num_q_heads)
      .KESTREL_FIELD(PrefillAttentionArgs, num_kv_heads)
      .KESTREL_FIELD(PrefillAttentionArgs, head_dim)
      .KESTREL_FIELD(PrefillAttentionArgs, block_size)
      .KESTREL_FIELD(PrefillAttentionArgs, scale)
      .KESTREL_FIELD(PrefillAttentionArgs, variant)
      .KESTREL_FIELD(PrefillAttentionArgs, dtype)
      .KESTREL_FIELD(PrefillAttentionArgs, kv_dtype)
      .KESTREL_FIELD(PrefillAttentionArgs, k_scale)
      .KESTREL_FIELD(PrefillAttentionArgs, v_scale);
  m.def("paged_prefill_attention", &paged_prefill_attention, nogil, py::arg("args"),
        py::arg("stream"));

  py::class_<GgufGemvArgs>(m, "GgufGemvArgs")
      .def(py::init<>())
      .KESTREL_FIELD(GgufGemvArgs, out)
      .KESTREL_FIELD(GgufGemvArgs, ldo)
      .KESTREL_FIELD(GgufGemvArgs, x)
      .KESTREL_FIELD(GgufGemvArgs, ldx)
      .KESTREL_FIELD(GgufGemvArgs, weight)
      .KESTREL_FIELD(GgufGemvArgs, row_bytes)
      .KESTREL_FIELD(GgufGemvArgs, m)
      .KESTREL_FIELD(GgufGemvArgs, n)
      .KESTREL_FIELD(GgufGemvArgs, k)
      .KESTREL_FIELD(GgufGemvArgs, ggml_type)
      .KESTREL_FIELD(GgufGemvArgs, dtype);
  m.def("gguf_gemv", &gguf_gemv, nogil, py::arg("args"), py::arg("stream"));

  py::class_<GgufDequantizeArgs>(m, "GgufDequantizeArgs")
      .def(py::init<>())
      .KESTREL_FIELD(GgufDequantizeArgs, out)
      .KESTREL_FIELD(GgufDequantizeArgs, ldo)
      .KESTREL_FIELD(GgufDequantizeArgs, weight)
      .KESTREL_FIELD(GgufDequantizeArgs, row_bytes)
      .KESTREL_FIELD(GgufDequantizeArgs, n)
      .KESTREL_FIELD(GgufDequantizeArgs, k)
      .KESTREL_FIELD(GgufDequantizeArgs, ggml_type)
      .KESTREL_FIELD(GgufDequantizeArgs, dtype);
  m.def("gguf_dequantize", &gguf_dequantize, nogil, py::arg("args"), py::arg("stream"));

  m.attr("DTYPE_FLOAT8_E4M3") = 2;  // a dense_gemv weight_dtype
  py::class_<DenseGemvArgs>(m, "DenseGemvArgs")
      .def(py::init<>())
      .KESTREL_FIELD(DenseGemvArgs, out)
      .KESTREL_FIELD(DenseGemvArgs, ldo)
      .KESTREL_FIELD(DenseGemvArgs, x)
      .KESTREL_FIELD(DenseGemvArgs, ldx)
      .KESTREL_FIELD(DenseGemvArgs, weight)
      .KESTREL_FIELD(DenseGemvArgs, ldw)
      .KESTREL_FIELD(DenseGemvArgs, scale)
      .KESTREL_FIELD(DenseGemvArgs, bias)
      .KESTREL_FIELD(DenseGemvArgs, m)
      .KESTREL_FIELD(DenseGemvArgs, n)
      .KESTREL_FIELD(DenseGemvArgs, k)
      .KESTREL_FIELD(DenseGemvArgs, warps)
      .KESTREL_FIELD(DenseGemvArgs, fp8_widen)
      .KESTREL_FIELD(DenseGemvArgs, weight_dtype)
      .KESTREL_FIELD(DenseGemvArgs, dtype);
  m.def("dense_gemv", &dense_gemv, nogil, py::arg("args"), py::arg("stream"));

  py::class_<TokenBitmaskArgs>(m, "TokenBitmaskArgs")
      .def(py::init<>())
      .KESTREL_FIELD(TokenBitmaskArgs, logits)
      .KESTREL_FIELD(TokenBitmaskArgs, row_stride)
      .KESTREL_FIELD(TokenBitmaskArgs, num_logit_rows)
      .KESTREL_FIELD(TokenBitmaskArgs, vocab)
      .KESTREL_FIELD(TokenBitmaskArgs, rows)
      .KESTREL_FIELD(TokenBitmaskArgs, num_rows)
      .KESTREL_FIELD(TokenBitmaskArgs, bitmask)
      .KESTREL_FIELD(TokenBitmaskArgs, words)
      .KESTREL_FIELD(TokenBitmaskArgs, logits_dtype);
  m.def("apply_token_bitmask", &apply_token_bitmask, nogil, py::arg("args"), py::arg("stream"));
}
