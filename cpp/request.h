// Request: one sequence known to the scheduler, its tokens and its stop criteria.
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <vector>

namespace kestrel {

enum class RequestStatus : uint8_t { kWaiting, kRunning, kPreempted, kFinished };

enum class FinishReason : uint8_t { kNone, kStop, kLength, kAbort };

const char* to_string(FinishReason reason);

struct StopCriteria {
  int32_t max_tokens = 16;              // >= 1: output tokens at most
  int32_t min_tokens = 0;               // eos / stop ids don't stop before this many outputs
  std::vector<int32_t> eos_token_ids;   // ignored when ignore_eos
  std::vector<int32_t> stop_token_ids;  // always honoured (after min_tokens)
  bool ignore_eos = false;
};

struct Request {
  std::string request_id;
  int64_t seq_id = 0;              // unique, increasing: doubles as the arrival order
  std::vector<int32_t> token_ids;  // prompt tokens followed by output tokens
  int32_t num_prompt_tokens = 0;
  // Tokens whose KV is in the cache (or is being computed by the step just scheduled).
  int32_t num_computed_tokens = 0;
  StopCriteria stop;
  int32_t priority = 0;  // lower value = scheduled first (policy "priority")
  std::string cache_salt;
  RequestStatus status = RequestStatus::kWaiting;
  FinishReason finish_reason = FinishReason::kNone;
  int32_t num_preemptions = 0;
  int32_t num_cached_prompt_tokens = -1;  // prefix-cache hit at first admission; -1 = not yet
  // Async scheduling: tokens sampled by scheduled steps whose update() has not come yet. A step
  // scheduled meanwhile computes the next token over them: its input row is a placeholder that
  // the runner fills on the device from the previous step's sampled row `last_sampled_index`.
  int32_t num_output_placeholders = 0;
  int32_t last_sampled_index = -1;
  // Chained hashes of this request's full blocks, filled lazily by the KV cache manager.
  std::vector<uint64_t> block_hashes;

  int32_t num_tokens() const { return static_cast<int32_t>(token_ids.size()); }
  int32_t num_output_tokens() const { return num_tokens() - num_prompt_tokens; }
  std::span<const int32_t> output_token_ids() const {
    return std::span<const int32_t>(token_ids).subspan(num_prompt_tokens);
  }
  bool is_finished() const { return status == RequestStatus::kFinished; }
  // Tokens known plus those still being sampled.
  int32_t num_tokens_with_placeholders() const { return num_tokens() + num_output_placeholders; }
};

// Appends `token` to `request` and returns why it must finish now, or kNone.
// The total length never exceeds max_model_len.
FinishReason append_token_and_check_stop(Request& request, int32_t token, int32_t max_model_len);

}  // namespace kestrel
