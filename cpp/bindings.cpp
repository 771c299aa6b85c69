// pybind11 bindings for the native core (kestrel._core). The only file that includes pybind11.
// Status errors become Python exceptions: ValueError (bad argument, cannot fit) or KeyError
// (unknown request id). Output arrays are zero-copy numpy views kept alive by their owner.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <optional>
#include <span>

#include "block_pool.h"
#include "scheduler.h"

namespace py = pybind11;
using namespace kestrel;

namespace {

void raise_if_error(const Status& s) {
  switch (s.code()) {
    case StatusCode::kOk:
      return;
    case StatusCode::kNotFound:
      throw py::key_error(s.message());
    default:
      throw py::value_error(s.message());
  }
}

// A 1-D numpy view of `v`, owned by `owner` (the Python object holding the C++ struct).
template <typename T>
py::array_t<T> view(const std::vector<T>& v, const py::handle& owner) {
  return py::array_t<T>({static_cast<py::ssize_t>(v.size())}, {sizeof(T)}, v.data(), owner);
}

std::vector<int32_t> to_token_vector(const py::handle& obj, const char* what) {
  auto arr = py::array_t<int64_t, py::array::c_style | py::array::forcecast>::ensure(obj);
  if (!arr || arr.ndim() != 1) {
    throw py::type_error(std::string(what) + " must be a 1-D sequence of ints");
  }
  std::vector<int32_t> out(arr.size());
  const int64_t* data = arr.data();
  for (py::ssize_t i = 0; i < arr.size(); ++i) {
    if (data[i] < 0 || data[i] > INT32_MAX) {
      throw py::value_error(std::string(what) + " holds an out-of-range token id " +
                            std::to_string(data[i]));
    }
    out[i] = static_cast<int32_t>(data[i]);
  }
  return out;
}

int32_t checked_block(const BlockPool& p, int32_t id) {
  if (id < 0 || id >= p.num_blocks()) {
    throw py::value_error("block id " + std::to_string(id) + " is out of range [0, " +
                          std::to_string(p.num_blocks()) + ")");
  }
  return id;
}

FinishReason parse_reason(const std::string& reason) {
  if (reason == "stop") return FinishReason::kStop;
  if (reason == "length") return FinishReason::kLength;
  if (reason == "abort") return FinishReason::kAbort;
  throw py::value_error("finish reason must be 'stop', 'length' or 'abort', got '" + reason + "'");
}

const char* status_name(RequestStatus s) {
  switch (s) {
    case RequestStatus::kWaiting:
      return "waiting";
    case RequestStatus::kRunning:
      return "running";
    case RequestStatus::kPreempted:
      return "preempted";
    case RequestStatus::kFinished:
      return "finished";
  }
  return "unknown";
}

py::dict request_info(const Request& r, const Scheduler& s) {
  py::dict d;
  d["request_id"] = r.request_id;
  d["seq_id"] = r.seq_id;
  d["status"] = status_name(r.status);
  d["num_prompt_tokens"] = r.num_prompt_tokens;
  d["num_computed_tokens"] = r.num_computed_tokens;
  d["output_token_ids"] =
      std::vector<int32_t>(r.output_token_ids().begin(), r.output_token_ids().end());
  d["num_output_placeholders"] = r.num_output_placeholders;
  d["num_preemptions"] = r.num_preemptions;
  d["num_cached_prompt_tokens"] = r.num_cached_prompt_tokens;
  d["block_table"] = s.block_table(r.seq_id);
  return d;
}

}  // namespace

PYBIND11_MODULE(_core, m) {
  m.doc() = "Kestrel native core: KV block manager and continuous-batching scheduler";

  py::class_<SchedulerConfig>(m, "SchedulerConfig")
      .def(py::init([](int32_t num_blocks, int32_t block_size, int32_t max_num_seqs,
                       int32_t max_num_batched_tokens, int32_t max_model_len,
                       bool enable_prefix_caching, bool enable_chunked_prefill,
                       const std::string& policy, bool async_scheduling) {
             SchedulerConfig c;
             c.num_blocks = num_blocks;
             c.block_size = block_size;
             c.max_num_seqs = max_num_seqs;
             c.max_num_batched_tokens = max_num_batched_tokens;
             c.max_model_len = max_model_len;
             c.enable_prefix_caching = enable_prefix_caching;
             c.enable_chunked_prefill = enable_chunked_prefill;
             c.async_scheduling = async_scheduling;
             if (policy == "fcfs") {
               c.policy = SchedulingPolicy::kFcfs;
             } else if (policy == "priority") {
               c.policy = SchedulingPolicy::kPriority;
             } else {
               throw py::value_error("policy must be 'fcfs' or 'priority', got '" + policy + "'");
             }
             raise_if_error(c.validate());
             return c;
           }),
           py::kw_only(), py::arg("num_blocks"), py::arg("block_size") = 16,
           py::arg("max_num_seqs") = 256, py::arg("max_num_batched_tokens") = 8192,
           py::arg("max_model_len") = 4096, py::arg("enable_prefix_caching") = true,
           py::arg("enable_chunked_prefill") = true, py::arg("policy") = "fcfs",
           py::arg("async_scheduling") = false)
      .def_readonly("num_blocks", &SchedulerConfig::num_blocks)
      .def_readonly("block_size", &SchedulerConfig::block_size)
      .def_readonly("max_num_seqs", &SchedulerConfig::max_num_seqs)
      .def_readonly("max_num_batched_tokens", &SchedulerConfig::max_num_batched_tokens)
      .def_readonly("max_model_len", &SchedulerConfig::max_model_len)
      .def_readonly("enable_prefix_caching", &SchedulerConfig::enable_prefix_caching)
      .def_readonly("enable_chunked_prefill", &SchedulerConfig::enable_chunked_prefill)
      .def_readonly("async_scheduling", &SchedulerConfig::async_scheduling);

  using Out = SchedulerOutput;
  py::class_<Out, std::shared_ptr<Out>>(m, "SchedulerOutput")
      .def_readonly("step", &Out::step)
      .def_property_readonly("input_ids",
                             [](py::object o) { return view(o.cast<Out&>().input_ids, o); })
      .def_property_readonly("positions",
                             [](py::object o) { return view(o.cast<Out&>().positions, o); })
      .def_property_readonly("slot_mapping",
                             [](py::object o) { return view(o.cast<Out&>().slot_mapping, o); })
      .def_property_readonly("seq_ids",
                             [](py::object o) { return view(o.cast<Out&>().seq_ids, o); })
      .def_property_readonly("query_start_loc",
                             [](py::object o) { return view(o.cast<Out&>().query_start_loc, o); })
      .def_property_readonly("seq_lens",
                             [](py::object o) { return view(o.cast<Out&>().seq_lens, o); })
      .def_property_readonly("context_lens",
                             [](py::object o) { return view(o.cast<Out&>().context_lens, o); })
      .def_property_readonly("block_tables",
                             [](py::object o) {
                               const Out& out = o.cast<Out&>();
                               const auto rows = static_cast<py::ssize_t>(out.seq_ids.size());
                               const auto cols = static_cast<py::ssize_t>(out.max_blocks_per_seq);
                               return py::array_t<int32_t>(
                                   {rows, cols},
                                   {static_cast<py::ssize_t>(cols * sizeof(int32_t)),
                                    static_cast<py::ssize_t>(sizeof(int32_t))},
                                   out.block_tables.data(), o);
                             })
      .def_property_readonly("logits_indices",
                             [](py::object o) { return view(o.cast<Out&>().logits_indices, o); })
      .def_property_readonly(
          "sampled_request_indices",
          [](py::object o) { return view(o.cast<Out&>().sampled_request_indices, o); })
      .def_property_readonly("preempted_seq_ids",
                             [](py::object o) { return view(o.cast<Out&>().preempted_seq_ids, o); })
      .def_property_readonly("placeholder_rows",
                             [](py::object o) { return view(o.cast<Out&>().placeholder_rows, o); })
      .def_property_readonly("placeholder_src",
                             [](py::object o) { return view(o.cast<Out&>().placeholder_src, o); })
      .def_readonly("num_decodes", &Out::num_decodes)
      .def_readonly("max_query_len", &Out::max_query_len)
      .def_readonly("max_seq_len", &Out::max_seq_len)
      .def_readonly("max_blocks_per_seq", &Out::max_blocks_per_seq)
      .def_property_readonly("num_reqs", &Out::num_reqs)
      .def_property_readonly("num_tokens", &Out::num_tokens)
      .def_property_readonly("num_sampled", [](const Out& o) { return o.logits_indices.size(); });

  py::class_<UpdateOutput, std::shared_ptr<UpdateOutput>>(m, "UpdateOutput")
      .def_property_readonly("seq_ids",
                             [](py::object o) { return view(o.cast<UpdateOutput&>().seq_ids, o); })
      .def_property_readonly(
          "token_ids", [](py::object o) { return view(o.cast<UpdateOutput&>().token_ids, o); })
      .def_property_readonly(
          "finished_seq_ids",
          [](py::object o) { return view(o.cast<UpdateOutput&>().finished_seq_ids, o); })
      .def_property_readonly("finish_reasons", [](const UpdateOutput& u) {
        py::list reasons;
        for (const FinishReason r : u.finish_reasons) reasons.append(to_string(r));
        return reasons;
      });

  py::class_<BlockPool>(m, "BlockPool")
      .def(py::init([](int32_t n) {
             if (n < 1) throw py::value_error("num_blocks must be >= 1, got " + std::to_string(n));
             return std::make_unique<BlockPool>(n);
           }),
           py::arg("num_blocks"))
      .def("allocate",
           [](BlockPool& p, int32_t n) -> std::optional<std::vector<int32_t>> {
             std::vector<int32_t> ids;
             if (!p.allocate(n, ids)) return std::nullopt;
             return ids;
           })
      .def("touch",
           [](BlockPool& p, int32_t id) {
             if (id < 0 || id >= p.num_blocks()) throw py::value_error("block id out of range");
             p.touch(id);
           })
      .def("release",
           [](BlockPool& p, const std::vector<int32_t>& ids) {
             for (const int32_t id : ids) {
               if (id < 0 || id >= p.num_blocks() || p.block(id).ref_cnt == 0) {
                 throw py::value_error("block " + std::to_string(id) + " is not in use");
               }
             }
             p.release(ids);
           })
      .def("ref_count",
           [](const BlockPool& p, int32_t id) { return p.block(checked_block(p, id)).ref_cnt; })
      .def("free_list", &BlockPool::free_list)
      .def_property_readonly("num_blocks", &BlockPool::num_blocks)
      .def_property_readonly("num_free_blocks", &BlockPool::num_free_blocks);

  py::class_<Scheduler>(m, "Scheduler")
      .def(py::init([](const SchedulerConfig& c) {
             std::unique_ptr<Scheduler> s;
             raise_if_error(Scheduler::create(c, s));
             return s;
           }),
           py::arg("config"))
      .def(
          "add_request",
          [](Scheduler& s, const std::string& request_id, const py::handle& prompt_token_ids,
             std::optional<int32_t> max_tokens, int32_t min_tokens, const py::handle& eos_token_ids,
             const py::handle& stop_token_ids, bool ignore_eos, int32_t priority,
             const std::string& cache_salt) {
            AddRequestArgs args;
            args.request_id = request_id;
            args.prompt_token_ids = to_token_vector(prompt_token_ids, "prompt_token_ids");
            args.stop.max_tokens = max_tokens.value_or(-1);
            if (max_tokens && *max_tokens < 1) {
              throw py::value_error("request '" + request_id + "': max_tokens must be >= 1, got " +
                                    std::to_string(*max_tokens));
            }
            args.stop.min_tokens = min_tokens;
            args.stop.eos_token_ids = to_token_vector(eos_token_ids, "eos_token_ids");
            args.stop.stop_token_ids = to_token_vector(stop_token_ids, "stop_token_ids");
            args.stop.ignore_eos = ignore_eos;
            args.priority = priority;
            args.cache_salt = cache_salt;
            int64_t seq_id = -1;
            raise_if_error(s.add_request(std::move(args), seq_id));
            return seq_id;
          },
          py::arg("request_id"), py::arg("prompt_token_ids"), py::kw_only(),
          py::arg("max_tokens") = py::none(), py::arg("min_tokens") = 0,
          py::arg("eos_token_ids") = py::tuple(), py::arg("stop_token_ids") = py::tuple(),
          py::arg("ignore_eos") = false, py::arg("priority") = 0, py::arg("cache_salt") = "",
          "Queues a request; returns its seq_id. max_tokens=None means up to max_model_len.")
      .def("schedule",
           [](Scheduler& s) {
             std::shared_ptr<SchedulerOutput> out;
             raise_if_error(s.schedule(out));
             return out;
           })
      .def(
          "update",
          [](Scheduler& s,
             const py::array_t<int64_t, py::array::c_style | py::array::forcecast>& ids) {
            if (ids.ndim() != 1) throw py::value_error("sampled token ids must be 1-D");
            auto out = std::make_shared<UpdateOutput>();
            raise_if_error(s.update(std::span<const int64_t>(ids.data(), ids.size()), *out));
            return out;
          },
          py::arg("sampled_token_ids"))
      .def("abort", [](Scheduler& s, const std::string& id) { raise_if_error(s.abort(id)); })
      .def(
          "finish",
          [](Scheduler& s, const std::string& id, const std::string& reason) {
            raise_if_error(s.finish(id, parse_reason(reason)));
          },
          py::arg("request_id"), py::arg("reason"))
      .def("has_unfinished_requests", &Scheduler::has_unfinished_requests)
      .def("num_pending_updates", &Scheduler::num_pending_updates)
      .def("contains",
           [](const Scheduler& s, const std::string& id) { return s.find(id) != nullptr; })
      .def("request_info",
           [](const Scheduler& s, const std::string& id) {
             const Request* r = s.find(id);
             if (!r) throw py::key_error("unknown request id '" + id + "'");
             return request_info(*r, s);
           })
      .def("running_seq_ids", &Scheduler::running_seq_ids)
      .def("waiting_seq_ids", &Scheduler::waiting_seq_ids)
      .def("block_table", [](const Scheduler& s, int64_t seq_id) { return s.block_table(seq_id); })
      .def("free_block_ids", [](const Scheduler& s) { return s.kv_cache().pool().free_list(); })
      .def("block_ref_count",
           [](const Scheduler& s, int32_t id) {
             const BlockPool& p = s.kv_cache().pool();
             return p.block(checked_block(p, id)).ref_cnt;
           })
      .def_property_readonly("config", &Scheduler::config)
      .def("stats", [](const Scheduler& s) {
        const SchedulerStats st = s.stats();
        py::dict d;
        d["num_running"] = st.num_running;
        d["num_waiting"] = st.num_waiting;
        d["kv_cache_usage"] = st.kv_cache_usage;
        d["num_free_blocks"] = st.num_free_blocks;
        d["num_cached_blocks"] = st.num_cached_blocks;
        d["prefix_query_tokens"] = st.prefix_query_tokens;
        d["prefix_hit_tokens"] = st.prefix_hit_tokens;
        d["num_preemptions"] = st.num_preemptions;
        d["num_evictions"] = st.num_evictions;
        d["num_steps"] = st.num_steps;
        return d;
      });
}
