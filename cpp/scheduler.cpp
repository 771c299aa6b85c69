#include "scheduler.h"

#include <algorithm>
#include <cassert>
#include <string>

namespace kestrel {

namespace {
std::string str(int64_t v) { return std::to_string(v); }
int32_t ceil_div(int32_t a, int32_t b) { return (a + b - 1) / b; }
}  // namespace

Status SchedulerConfig::validate() const {
  if (block_size < 1 || block_size > 1024) {
    return Status::InvalidArgument("block_size must be in [1, 1024], got " + str(block_size));
  }
  if (num_blocks < 1) {
    return Status::InvalidArgument("num_blocks must be >= 1, got " + str(num_blocks));
  }
  if (max_num_seqs < 1) {
    return Status::InvalidArgument("max_num_seqs must be >= 1, got " + str(max_num_seqs));
  }
  if (max_num_batched_tokens < 1) {
    return Status::InvalidArgument("max_num_batched_tokens must be >= 1, got " +
                                   str(max_num_batched_tokens));
  }
  if (max_model_len < 2) {
    return Status::InvalidArgument("max_model_len must be >= 2, got " + str(max_model_len));
  }
  return Status::Ok();
}

Scheduler::Scheduler(const SchedulerConfig& config)
    : config_(config), kv_(config.num_blocks, config.block_size, config.enable_prefix_caching) {
  running_.reserve(config.max_num_seqs);
}

Status Scheduler::create(const SchedulerConfig& config, std::unique_ptr<Scheduler>& out) {
  if (Status s = config.validate(); !s.ok()) return s;
  out = std::make_unique<Scheduler>(config);
  return Status::Ok();
}

Status Scheduler::add_request(AddRequestArgs args, int64_t& seq_id) {
  const std::string& id = args.request_id;
  if (id_to_seq_.contains(id)) {
    return Status::AlreadyExists("request id '" + id + "' is already in use");
  }
  const auto num_prompt = static_cast<int32_t>(args.prompt_token_ids.size());
  if (num_prompt == 0) {
    return Status::InvalidArgument("request '" + id + "': the prompt is empty");
  }
  if (num_prompt >= config_.max_model_len) {
    return Status::InvalidArgument("request '" + id + "': the prompt has " + str(num_prompt) +
                                   " tokens; it must be shorter than max_model_len (" +
                                   str(config_.max_model_len) +
                                   ") to leave room for at least one output token");
  }
  for (const int32_t t : args.prompt_token_ids) {
    if (t < 0) return Status::InvalidArgument("request '" + id + "': negative token id " + str(t));
  }
  StopCriteria& stop = args.stop;
  const int32_t room = config_.max_model_len - num_prompt;
  if (stop.max_tokens < 0) {
    stop.max_tokens = room;
  } else if (stop.max_tokens < 1) {
    return Status::InvalidArgument("request '" + id + "': max_tokens must be >= 1, got " +
                                   str(stop.max_tokens));
  }
  if (stop.min_tokens < 0 || stop.min_tokens > stop.max_tokens) {
    return Status::InvalidArgument("request '" + id + "': min_tokens must be in [0, max_tokens=" +
                                   str(stop.max_tokens) + "], got " + str(stop.min_tokens));
  }
  const int32_t longest = num_prompt + std::min(stop.max_tokens, room);
  const int32_t blocks_needed = ceil_div(longest, config_.block_size);
  if (blocks_needed > config_.num_blocks) {
    return Status::ResourceExhausted("request '" + id + "' may need " + str(longest) +
                                     " tokens of KV cache (" + str(blocks_needed) +
                                     " blocks) but the cache has only " + str(config_.num_blocks) +
                                     " blocks of " + str(config_.block_size) + " tokens");
  }
  if (!config_.enable_chunked_prefill && longest > config_.max_num_batched_tokens) {
    return Status::InvalidArgument("request '" + id + "' may need " + str(longest) +
                                   " tokens in one step but max_num_batched_tokens is " +
                                   str(config_.max_num_batched_tokens) +
                                   " and chunked prefill is disabled");
  }

  auto request = std::make_unique<Request>();
  request->request_id = id;
  request->seq_id = next_seq_id_++;
  request->token_ids = std::move(args.prompt_token_ids);
  request->token_ids.reserve(longest);
  request->num_prompt_tokens = num_prompt;
  request->stop = std::move(stop);
  request->priority = args.priority;
  request->cache_salt = std::move(args.cache_salt);
  seq_id = request->seq_id;
  waiting_.insert(waiting_key(*request));
  id_to_seq_.emplace(id, seq_id);
  requests_.emplace(seq_id, std::move(request));
  return Status::Ok();
}

Scheduler::WaitingKey Scheduler::waiting_key(const Request& r) const {
  const int64_t prio = config_.policy == SchedulingPolicy::kPriority ? r.priority : 0;
  return {prio, r.seq_id};
}

bool Scheduler::lower_priority(const Request& a, const Request& b) const {
  return waiting_key(a) > waiting_key(b);
}

const Request* Scheduler::find(const std::string& request_id) const {
  const auto it = id_to_seq_.find(request_id);
  return it == id_to_seq_.end() ? nullptr : find(it->second);
}

const Request* Scheduler::find(int64_t seq_id) const {
  const auto it = requests_.find(seq_id);
  return it == requests_.end() ? nullptr : it->second.get();
}

Status Scheduler::abort(const std::string& request_id) {
  return finish(request_id, FinishReason::kAbort);
}

Status Scheduler::finish(const std::string& request_id, FinishReason reason) {
  const auto it = id_to_seq_.find(request_id);
  if (it == id_to_seq_.end()) {
    return Status::NotFound("unknown request id '" + request_id + "'");
  }
  if (reason == FinishReason::kNone) {
    return Status::InvalidArgument("finish reason must be stop, length or abort");
  }
  finish_request(*requests_.at(it->second), reason);
  return Status::Ok();
}

void Scheduler::finish_request(Request& request, FinishReason reason) {
  if (request.status == RequestStatus::kRunning) {
    running_.erase(std::find(running_.begin(), running_.end(), &request));
  } else {
    waiting_.erase(waiting_key(request));
  }
  kv_.free(request);
  request.status = RequestStatus::kFinished;
  request.finish_reason = reason;
  id_to_seq_.erase(request.request_id);
  requests_.erase(request.seq_id);  // destroys `request`
}

void Scheduler::preempt(size_t running_index) {
  Request* victim = running_[running_index];
  running_.erase(running_.begin() + static_cast<std::ptrdiff_t>(running_index));
  kv_.free(*victim);
  victim->num_computed_tokens = 0;
  victim->status = RequestStatus::kPreempted;
  ++victim->num_preemptions;
  ++num_preemptions_;
  waiting_.insert(waiting_key(*victim));
}

Status Scheduler::schedule(std::shared_ptr<SchedulerOutput>& result) {
  const size_t max_pending = config_.async_scheduling ? 1 : 0;
  if (pending_sampled_.size() > max_pending) {
    return Status::InvalidArgument(
        std::string(config_.async_scheduling ? "schedule() called with two steps not updated"
                                             : "schedule() called twice without update()") +
        ": pass the sampled tokens of step " +
        str(static_cast<int64_t>(step_ - pending_sampled_.size() + 1)) + " first");
  }
  auto out = std::make_shared<SchedulerOutput>();
  out->step = ++step_;
  int32_t budget = config_.max_num_batched_tokens;
  std::vector<std::pair<Request*, int32_t>> scheduled;  // (request, tokens this step)
  scheduled.reserve(running_.size() + 8);
  const PrefixHit no_hit;

  // Running requests first, in admission order. When blocks run out, the lowest-priority
  // (for FCFS: newest) request not yet scheduled this step is preempted, possibly the current one.
  size_t i = 0;
  while (i < running_.size() && budget > 0) {
    Request* r = running_[i];
    if (!can_grow(*r)) {  // its last token is in flight and ends it: nothing to compute
      ++i;
      continue;
    }
    const int32_t num_new =
        std::min(r->num_tokens_with_placeholders() - r->num_computed_tokens, budget);
    assert(num_new > 0);
    bool preempted_self = false;
    while (!kv_.allocate_slots(*r, num_new, no_hit)) {
      size_t victim = i;
      for (size_t j = i + 1; j < running_.size(); ++j) {
        if (lower_priority(*running_[j], *running_[victim])) victim = j;
      }
      out->preempted_seq_ids.push_back(running_[victim]->seq_id);
      preempt(victim);
      if (victim == i) {
        preempted_self = true;
        break;
      }
    }
    if (preempted_self) continue;
    scheduled.emplace_back(r, num_new);
    budget -= num_new;
    ++i;
  }

  // Then waiting requests (FCFS or priority order), unless this step had to preempt.
  while (out->preempted_seq_ids.empty() && !waiting_.empty() && budget > 0 &&
         static_cast<int32_t>(running_.size()) < config_.max_num_seqs) {
    Request* r = requests_.at(std::get<1>(*waiting_.begin())).get();
    // Preempted while a token of it was in flight: it waits for that token (next step).
    if (r->num_output_placeholders > 0) break;
    assert(r->num_computed_tokens == 0);
    PrefixHit hit = kv_.find_cached_prefix(*r);
    int32_t num_new = r->num_tokens() - hit.num_tokens;
    if (num_new > budget) {
      if (!config_.enable_chunked_prefill) break;
      num_new = budget;
    }
    if (!kv_.allocate_slots(*r, num_new, hit)) break;
    kv_.record_prefix_query(r->num_tokens(), hit.num_tokens);
    if (r->num_cached_prompt_tokens < 0) r->num_cached_prompt_tokens = hit.num_tokens;
    waiting_.erase(waiting_.begin());
    r->status = RequestStatus::kRunning;
    r->num_computed_tokens = hit.num_tokens;
    running_.push_back(r);
    scheduled.emplace_back(r, num_new);
    budget -= num_new;
  }

  build_output(scheduled, *out);
  std::vector<int64_t>& sampled = pending_sampled_.emplace_back();
  sampled.reserve(out->sampled_request_indices.size());
  for (size_t k = 0; k < out->sampled_request_indices.size(); ++k) {
    const int64_t seq_id = out->seq_ids[out->sampled_request_indices[k]];
    sampled.push_back(seq_id);
    Request& r = *requests_.at(seq_id);
    ++r.num_output_placeholders;
    r.last_sampled_index = static_cast<int32_t>(k);
  }
  for (auto& [r, num_new] : scheduled) r->num_computed_tokens += num_new;
  result = std::move(out);
  return Status::Ok();
}

void Scheduler::build_output(const std::vector<std::pair<Request*, int32_t>>& scheduled,
                             SchedulerOutput& out) const {
  std::vector<const std::pair<Request*, int32_t>*> order;
  order.reserve(scheduled.size());
  int32_t num_tokens = 0;
  int32_t max_blocks = 0;
  for (const auto& entry : scheduled) {
    if (entry.second == 1) order.push_back(&entry);
    num_tokens += entry.second;
    max_blocks =
        std::max(max_blocks, static_cast<int32_t>(kv_.block_table(entry.first->seq_id).size()));
  }
  out.num_decodes = static_cast<int32_t>(order.size());
  for (const auto& entry : scheduled) {
    if (entry.second != 1) order.push_back(&entry);
  }

  const size_t num_reqs = order.size();
  const int32_t bs = config_.block_size;
  out.input_ids.resize(num_tokens);
  out.positions.resize(num_tokens);
  out.slot_mapping.resize(num_tokens);
  out.seq_ids.resize(num_reqs);
  out.query_start_loc.resize(num_reqs + 1);
  out.seq_lens.resize(num_reqs);
  out.context_lens.resize(num_reqs);
  out.max_blocks_per_seq = max_blocks;
  out.block_tables.assign(num_reqs * static_cast<size_t>(max_blocks), -1);

  int32_t row = 0;
  out.query_start_loc[0] = 0;
  for (size_t k = 0; k < num_reqs; ++k) {
    const Request& r = *order[k]->first;
    const int32_t num_new = order[k]->second;
    const int32_t start = r.num_computed_tokens;
    const std::vector<int32_t>& table = kv_.block_table(r.seq_id);
    for (int32_t pos = start; pos < start + num_new; ++pos, ++row) {
      if (pos < r.num_tokens()) {
        out.input_ids[row] = r.token_ids[pos];
      } else {  // sampled by the previous step, still in flight: the runner fills it in
        assert(pos == r.num_tokens() && r.num_output_placeholders == 1);
        out.input_ids[row] = 0;
        out.placeholder_rows.push_back(row);
        out.placeholder_src.push_back(r.last_sampled_index);
      }
      out.positions[row] = pos;
      out.slot_mapping[row] = static_cast<int64_t>(table[pos / bs]) * bs + pos % bs;
    }
    out.seq_ids[k] = r.seq_id;
    out.query_start_loc[k + 1] = row;
    out.seq_lens[k] = start + num_new;
    out.context_lens[k] = start;
    std::copy(table.begin(), table.end(),
              out.block_tables.begin() + static_cast<std::ptrdiff_t>(k * max_blocks));
    out.max_query_len = std::max(out.max_query_len, num_new);
    out.max_seq_len = std::max(out.max_seq_len, start + num_new);
    if (start + num_new == r.num_tokens_with_placeholders()) {
      out.logits_indices.push_back(row - 1);
      out.sampled_request_indices.push_back(static_cast<int32_t>(k));
    }
  }
}

Status Scheduler::update(std::span<const int64_t> sampled_token_ids, UpdateOutput& out) {
  if (pending_sampled_.empty()) {
    return Status::InvalidArgument("update() called without a preceding schedule()");
  }
  if (sampled_token_ids.size() != pending_sampled_.front().size()) {
    return Status::InvalidArgument("update() expects " + str(pending_sampled_.front().size()) +
                                   " sampled tokens (one per logits index), got " +
                                   str(sampled_token_ids.size()));
  }
  for (const int64_t t : sampled_token_ids) {
    if (t < 0 || t > INT32_MAX) {
      return Status::InvalidArgument("sampled token id out of range: " + str(t));
    }
  }
  const std::vector<int64_t> pending = std::move(pending_sampled_.front());
  pending_sampled_.pop_front();
  out.seq_ids.reserve(pending.size());
  out.token_ids.reserve(pending.size());
  for (size_t k = 0; k < pending.size(); ++k) {
    const auto it = requests_.find(pending[k]);
    // Finished (aborted or stopped) between schedule() and update(): drop its token.
    if (it == requests_.end()) continue;
    Request& r = *it->second;
    // Running, or preempted by a schedule() made since (async scheduling): the token is its
    // next one either way (a preempted request recomputes it with the rest).
    assert(r.num_output_placeholders > 0);
    --r.num_output_placeholders;
    const auto token = static_cast<int32_t>(sampled_token_ids[k]);
    const FinishReason reason = append_token_and_check_stop(r, token, config_.max_model_len);
    out.seq_ids.push_back(r.seq_id);
    out.token_ids.push_back(token);
    if (reason != FinishReason::kNone) {
      out.finished_seq_ids.push_back(r.seq_id);
      out.finish_reasons.push_back(reason);
      finish_request(r, reason);
    }
  }
  return Status::Ok();
}

bool Scheduler::can_grow(const Request& r) const {
  if (r.num_output_placeholders == 0) return true;
  return r.num_output_tokens() + r.num_output_placeholders < r.stop.max_tokens &&
         r.num_tokens_with_placeholders() < config_.max_model_len;
}

SchedulerStats Scheduler::stats() const {
  SchedulerStats s;
  s.num_running = static_cast<int32_t>(running_.size());
  s.num_waiting = static_cast<int32_t>(waiting_.size());
  s.kv_cache_usage = kv_.usage();
  s.num_free_blocks = kv_.pool().num_free_blocks();
  s.num_cached_blocks = kv_.pool().num_cached_blocks();
  s.prefix_query_tokens = kv_.prefix_query_tokens();
  s.prefix_hit_tokens = kv_.prefix_hit_tokens();
  s.num_preemptions = num_preemptions_;
  s.num_evictions = kv_.pool().num_evictions();
  s.num_steps = step_;
  return s;
}

std::vector<int64_t> Scheduler::running_seq_ids() const {
  std::vector<int64_t> ids;
  ids.reserve(running_.size());
  for (const Request* r : running_) ids.push_back(r->seq_id);
  return ids;
}

std::vector<int64_t> Scheduler::waiting_seq_ids() const {
  std::vector<int64_t> ids;
  ids.reserve(waiting_.size());
  for (const auto& key : waiting_) ids.push_back(std::get<1>(key));
  return ids;
}

}  // namespace kestrel
