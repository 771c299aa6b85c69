// Scheduler::update() (sampled or accepted tokens, stop checks, rollback of rejected drafts)
// and the draft tokens of speculative decoding.
#include <algorithm>
#include <cassert>
#include <string>

#include "scheduler.h"

namespace kestrel {

namespace {
std::string str(int64_t v) { return std::to_string(v); }
int32_t ceil_div(int32_t a, int32_t b) { return (a + b - 1) / b; }
}  // namespace

Status Scheduler::update(std::span<const int64_t> sampled_token_ids, UpdateOutput& out) {
  return update(sampled_token_ids, {}, out);
}

Status Scheduler::update(std::span<const int64_t> token_ids, std::span<const int32_t> num_accepted,
                         UpdateOutput& out) {
  if (pending_sampled_.empty()) {
    return Status::InvalidArgument("update() called without a preceding schedule()");
  }
  const PendingStep& step = pending_sampled_.front();
  if (num_accepted.empty()) {
    if (step.has_drafts) {
      return Status::InvalidArgument(
          "update(): the step verified draft tokens: pass the number of accepted tokens per "
          "sampled request");
    }
    if (token_ids.size() != step.seq_ids.size()) {
      return Status::InvalidArgument("update() expects " + str(step.seq_ids.size()) +
                                     " sampled tokens (one per logits index), got " +
                                     str(token_ids.size()));
    }
  } else {
    if (num_accepted.size() != step.seq_ids.size()) {
      return Status::InvalidArgument("update() expects " + str(step.seq_ids.size()) +
                                     " accepted-token counts (one per sampled request), got " +
                                     str(num_accepted.size()));
    }
    size_t total = 0;
    for (size_t j = 0; j < num_accepted.size(); ++j) {
      const int32_t lo = step.num_drafts[j] > 0 ? 0 : 1;
      const int32_t hi = step.num_drafts[j] + 1;
      if (num_accepted[j] < lo || num_accepted[j] > hi) {
        return Status::InvalidArgument("update(): sampled request " + str(j) + " (seq " +
                                       str(step.seq_ids[j]) + ") accepted " + str(num_accepted[j]) +
                                       " tokens; allowed [" + str(lo) + ", " + str(hi) + "]");
      }
      total += static_cast<size_t>(num_accepted[j]);
    }
    if (token_ids.size() != total) {
      return Status::InvalidArgument("update() expects " + str(total) +
                                     " accepted tokens (the sum of the counts), got " +
                                     str(token_ids.size()));
    }
  }
  for (const int64_t t : token_ids) {
    if (t < 0 || t > INT32_MAX) {
      return Status::InvalidArgument("sampled token id out of range: " + str(t));
    }
  }
  const PendingStep pending = std::move(pending_sampled_.front());
  pending_sampled_.pop_front();
  out.seq_ids.reserve(token_ids.size());
  out.token_ids.reserve(token_ids.size());
  size_t offset = 0;
  for (size_t k = 0; k < pending.seq_ids.size(); ++k) {
    const size_t count = num_accepted.empty() ? 1 : static_cast<size_t>(num_accepted[k]);
    const auto tokens = token_ids.subspan(offset, count);
    offset += count;
    const auto it = requests_.find(pending.seq_ids[k]);
    // Finished (aborted or stopped) between schedule() and update(): drop its tokens.
    if (it == requests_.end()) continue;
    Request& r = *it->second;
    // Running, or preempted by a schedule() made since (async scheduling): the tokens are its
    // next ones either way (a preempted request recomputes them with the rest).
    assert(r.num_output_placeholders > 0);
    --r.num_output_placeholders;
    const FinishReason reason = accept_tokens(r, tokens, out);
    if (reason != FinishReason::kNone) {
      out.finished_seq_ids.push_back(r.seq_id);
      out.finish_reasons.push_back(reason);
      finish_request(r, reason);
    }
  }
  return Status::Ok();
}

FinishReason Scheduler::accept_tokens(Request& r, std::span<const int64_t> tokens,
                                      UpdateOutput& out) {
  const std::vector<int32_t> drafts = std::move(r.spec_token_ids);
  r.spec_token_ids.clear();
  const int32_t num_known = r.num_tokens();  // before this step's tokens
  // Leading accepted tokens equal to the drafts the step computed over: their KV is valid.
  int32_t num_matched = 0;
  FinishReason reason = FinishReason::kNone;
  for (size_t i = 0; i < tokens.size() && reason == FinishReason::kNone; ++i) {
    const auto token = static_cast<int32_t>(tokens[i]);
    if (num_matched == static_cast<int32_t>(i) && i < drafts.size() && drafts[i] == token) {
      ++num_matched;
    }
    reason = append_token_and_check_stop(r, token, config_.max_model_len);
    out.seq_ids.push_back(r.seq_id);
    out.token_ids.push_back(token);
  }
  if (reason != FinishReason::kNone || drafts.empty() || r.status != RequestStatus::kRunning) {
    return reason;  // finished, a plain step, or preempted since (it recomputes everything)
  }
  // Roll back: the step computed positions num_known - 1 .. num_known + k - 1; keep those whose
  // inputs were right, and always leave the last known token to compute.
  r.num_computed_tokens = std::min(num_known + num_matched, r.num_tokens() - 1);
  kv_.truncate(r, ceil_div(r.num_tokens(), config_.block_size));
  return reason;
}

Status Scheduler::set_draft_tokens(const std::string& request_id, std::span<const int32_t> tokens,
                                   int32_t& num_kept) {
  const auto it = id_to_seq_.find(request_id);
  if (it == id_to_seq_.end()) {
    num_kept = 0;
    return Status::NotFound("unknown request id '" + request_id + "'");
  }
  return set_draft_tokens(it->second, tokens, num_kept);
}

Status Scheduler::set_draft_tokens(int64_t seq_id, std::span<const int32_t> tokens,
                                   int32_t& num_kept) {
  num_kept = 0;
  const auto it = requests_.find(seq_id);
  if (it == requests_.end()) return Status::NotFound("unknown seq id " + str(seq_id));
  Request& r = *it->second;
  for (const int32_t t : tokens) {
    if (t < 0) {
      return Status::InvalidArgument("request '" + r.request_id + "': negative draft token id " +
                                     str(t));
    }
  }
  if (tokens.empty()) {
    r.draft_token_ids.clear();
    return Status::Ok();
  }
  if (r.status != RequestStatus::kRunning || r.num_output_placeholders > 0 ||
      !r.spec_token_ids.empty() || r.num_computed_tokens != r.num_tokens() - 1) {
    return Status::InvalidArgument(
        "request '" + r.request_id +
        "' cannot take draft tokens now: only a running request in decode (all tokens but the "
        "last computed, none in flight) can; it has " +
        str(r.num_computed_tokens) + " of " + str(r.num_tokens()) + " tokens computed and " +
        str(r.num_output_placeholders) + " in flight");
  }
  // At most k + 1 tokens are accepted: they must fit max_tokens and max_model_len.
  const int32_t room =
      std::min(r.stop.max_tokens - r.num_output_tokens(), config_.max_model_len - r.num_tokens()) -
      1;
  num_kept = std::clamp(static_cast<int32_t>(tokens.size()), 0, std::max(0, room));
  r.draft_token_ids.assign(tokens.begin(), tokens.begin() + num_kept);
  return Status::Ok();
}

}  // namespace kestrel
