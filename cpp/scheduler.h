// Scheduler: continuous batching with no phases. Each request has num_computed_tokens and
// num_tokens; a step gives it some of the difference, bounded by the token budget. Chunked
// prefill, prefix caching and recompute after preemption all follow from that rule.
#pragma once

#include <cstdint>
#include <deque>
#include <memory>
#include <set>
#include <string>
#include <tuple>
#include <unordered_map>
#include <vector>

#include "kv_cache_manager.h"
#include "request.h"
#include "status.h"

namespace kestrel {

enum class SchedulingPolicy : uint8_t { kFcfs, kPriority };

struct SchedulerConfig {
  int32_t num_blocks = 1024;
  int32_t block_size = 16;
  int32_t max_num_seqs = 256;
  int32_t max_num_batched_tokens = 8192;
  int32_t max_model_len = 4096;
  bool enable_prefix_caching = true;
  bool enable_chunked_prefill = true;
  SchedulingPolicy policy = SchedulingPolicy::kFcfs;
  // Allow schedule() while the previous step's update() is still pending (one step ahead): the
  // tokens that step will sample are placeholders (see SchedulerOutput::placeholder_rows).
  bool async_scheduling = false;

  Status validate() const;
};

// One step's batch as flat arrays. Requests are ordered decodes first (query length 1), then
// prefill chunks; token rows follow the request order.
struct SchedulerOutput {
  uint64_t step = 0;
  // Per token row, [num_tokens].
  std::vector<int32_t> input_ids;
  std::vector<int32_t> positions;
  std::vector<int64_t> slot_mapping;  // block_id * block_size + offset
  // Per request, [num_reqs] (query_start_loc has num_reqs + 1 entries).
  std::vector<int64_t> seq_ids;
  std::vector<int32_t> query_start_loc;
  std::vector<int32_t> seq_lens;      // context length after this step
  std::vector<int32_t> context_lens;  // tokens already computed before this step
  std::vector<int32_t> block_tables;  // [num_reqs, max_blocks_per_seq], padded with -1
  int32_t max_blocks_per_seq = 0;
  // Rows whose logits are sampled, [num_sampled]: the last row of each request that reaches its
  // end this step, and the index of that request in seq_ids.
  std::vector<int32_t> logits_indices;
  std::vector<int32_t> sampled_request_indices;
  int32_t num_decodes = 0;  // the first num_decodes requests (and rows) are decodes
  int32_t max_query_len = 0;
  int32_t max_seq_len = 0;
  // Requests preempted during this step (their blocks are gone; they will be recomputed).
  std::vector<int64_t> preempted_seq_ids;
  // Async scheduling: token rows whose input id is the token the previous step samples for
  // their request (input_ids holds 0 there), and that token's index among the previous step's
  // sampled rows (its logits_indices order). Empty when the previous step was updated first.
  std::vector<int32_t> placeholder_rows;
  std::vector<int32_t> placeholder_src;

  int32_t num_reqs() const { return static_cast<int32_t>(seq_ids.size()); }
  int32_t num_tokens() const { return static_cast<int32_t>(input_ids.size()); }
};

// What update() did with the sampled tokens.
struct UpdateOutput {
  std::vector<int64_t> seq_ids;    // requests that received a token, in sampled order
  std::vector<int32_t> token_ids;  // the token each received
  std::vector<int64_t> finished_seq_ids;
  std::vector<FinishReason> finish_reasons;  // parallel to finished_seq_ids
};

struct AddRequestArgs {
  std::string request_id;
  std::vector<int32_t> prompt_token_ids;
  StopCriteria stop;  // stop.max_tokens < 0 means "up to max_model_len"
  int32_t priority = 0;
  std::string cache_salt;
};

struct SchedulerStats {
  int32_t num_running = 0;
  int32_t num_waiting = 0;
  double kv_cache_usage = 0.0;
  int32_t num_free_blocks = 0;
  int32_t num_cached_blocks = 0;
  int64_t prefix_query_tokens = 0;
  int64_t prefix_hit_tokens = 0;
  int64_t num_preemptions = 0;
  int64_t num_evictions = 0;
  uint64_t num_steps = 0;
};

class Scheduler {
 public:
  // The config must be valid (see SchedulerConfig::validate / Scheduler::create).
  explicit Scheduler(const SchedulerConfig& config);
  static Status create(const SchedulerConfig& config, std::unique_ptr<Scheduler>& out);

  // Validates and queues a request. On error nothing changes. On success `seq_id` is set.
  Status add_request(AddRequestArgs args, int64_t& seq_id);
  // Finishes a request at once (waiting or running), freeing all its blocks.
  Status abort(const std::string& request_id);
  // Like abort but reports `reason` (e.g. kStop for a stop string found by the detokenizer).
  Status finish(const std::string& request_id, FinishReason reason);

  // Builds the next step's batch. Fails if the previous step's update() has not been called
  // (with async_scheduling: if the two previous steps' updates have not).
  Status schedule(std::shared_ptr<SchedulerOutput>& out);
  // One sampled token per entry of the oldest un-updated output's logits_indices, in order.
  // Tokens of requests that finished (or were aborted) since that schedule() are dropped.
  Status update(std::span<const int64_t> sampled_token_ids, UpdateOutput& out);
  // Steps scheduled whose update() has not come yet (0 or 1; up to 2 with async_scheduling).
  int32_t num_pending_updates() const { return static_cast<int32_t>(pending_sampled_.size()); }

  bool has_unfinished_requests() const { return !requests_.empty(); }
  const Request* find(const std::string& request_id) const;
  const Request* find(int64_t seq_id) const;
  const std::vector<int32_t>& block_table(int64_t seq_id) const { return kv_.block_table(seq_id); }
  const SchedulerConfig& config() const { return config_; }
  const KVCacheManager& kv_cache() const { return kv_; }
  SchedulerStats stats() const;
  std::vector<int64_t> running_seq_ids() const;
  std::vector<int64_t> waiting_seq_ids() const;

 private:
  using WaitingKey = std::tuple<int64_t, int64_t>;  // (priority or 0, seq_id)
  WaitingKey waiting_key(const Request& r) const;
  bool lower_priority(const Request& a, const Request& b) const;  // a is preempted before b
  void preempt(size_t running_index);
  void finish_request(Request& request, FinishReason reason);
  void build_output(const std::vector<std::pair<Request*, int32_t>>& scheduled,
                    SchedulerOutput& out) const;

  SchedulerConfig config_;
  KVCacheManager kv_;
  std::unordered_map<int64_t, std::unique_ptr<Request>> requests_;
  std::unordered_map<std::string, int64_t> id_to_seq_;
  std::set<WaitingKey> waiting_;
  std::vector<Request*> running_;
  int64_t next_seq_id_ = 0;
  uint64_t step_ = 0;
  int64_t num_preemptions_ = 0;
  // The sampled requests of each scheduled step not yet updated, oldest first.
  std::deque<std::vector<int64_t>> pending_sampled_;
  // May `r` be scheduled now? A request with a placeholder that will reach its length limit
  // when that token lands has nothing left to compute (update() finishes it).
  bool can_grow(const Request& r) const;
};

}  // namespace kestrel
