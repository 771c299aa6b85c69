// pybind11 module kestrel._kernels: thin wrappers over the launchers declared in kernels.h.
// Every function releases the GIL while it enqueues work and returns a cudaError_t code (0 on
// success); Python turns non-zero codes into exceptions that name the op.
#include <pybind11/pybind11.h>

#include "kernels.h"

namespace py = pybind11;
using namespace kestrel::api;

PYBIND11_MODULE(_kernels, m) {
  m.doc() = "Kestrel fused CUDA kernels (raw-pointer launchers; see kestrel.ops)";
  m.attr("DTYPE_FLOAT16") = 0;
  m.attr("DTYPE_BFLOAT16") = 1;
  const auto nogil = py::call_guard<py::gil_scoped_release>();
  m.def("error_string", &error_string, py::arg("code"));
  m.def("rms_norm", &rms_norm, nogil, py::arg("out"), py::arg("x"), py::arg("weight"),
        py::arg("rows"), py::arg("inner"), py::arg("stride_outer"), py::arg("stride_inner"),
        py::arg("hidden"), py::arg("eps"), py::arg("dtype"), py::arg("vec8"), py::arg("stream"));
  m.def("fused_add_rms_norm", &fused_add_rms_norm, nogil, py::arg("x"), py::arg("residual"),
        py::arg("weight"), py::arg("rows"), py::arg("hidden"), py::arg("eps"), py::arg("dtype"),
        py::arg("vec8"), py::arg("stream"));
  m.def("silu_and_mul", &silu_and_mul, nogil, py::arg("out"), py::arg("x"), py::arg("tokens"),
        py::arg("inter"), py::arg("dtype"), py::arg("vec8"), py::arg("stream"));
  m.def("rotary_embedding_and_cache", &rotary_embedding_and_cache, nogil, py::arg("positions"),
        py::arg("positions_int64"), py::arg("q"), py::arg("q_stride"), py::arg("num_q_heads"),
        py::arg("k"), py::arg("k_stride"), py::arg("num_kv_heads"), py::arg("v"),
        py::arg("v_stride"), py::arg("cos_sin"), py::arg("key_cache"), py::arg("value_cache"),
        py::arg("slot_mapping"), py::arg("slots_int64"), py::arg("num_tokens"), py::arg("head_dim"),
        py::arg("dtype"), py::arg("vec8"), py::arg("stream"));
  m.def("paged_decode_attention", &paged_decode_attention, nogil, py::arg("out"),
        py::arg("out_stride"), py::arg("q"), py::arg("q_stride"), py::arg("key_cache"),
        py::arg("value_cache"), py::arg("block_tables"), py::arg("bt_stride"), py::arg("seq_lens"),
        py::arg("num_seqs"), py::arg("num_q_heads"), py::arg("num_kv_heads"), py::arg("head_dim"),
        py::arg("block_size"), py::arg("scale"), py::arg("heads_per_block"), py::arg("num_splits"),
        py::arg("min_split_len"), py::arg("workspace"), py::arg("workspace_floats"),
        py::arg("dtype"), py::arg("stream"));
  m.def("paged_decode_blocks_per_sm", &paged_decode_blocks_per_sm, py::arg("head_dim"),
        py::arg("heads_per_block"), py::arg("dtype"));
  m.def("paged_prefill_attention", &paged_prefill_attention, nogil, py::arg("out"),
        py::arg("out_stride"), py::arg("q"), py::arg("q_stride"), py::arg("key_cache"),
        py::arg("value_cache"), py::arg("block_tables"), py::arg("bt_stride"),
        py::arg("query_start_loc"), py::arg("seq_lens"), py::arg("num_seqs"), py::arg("num_tokens"),
        py::arg("num_q_heads"), py::arg("num_kv_heads"), py::arg("head_dim"), py::arg("block_size"),
        py::arg("scale"), py::arg("variant"), py::arg("dtype"), py::arg("stream"));
}
