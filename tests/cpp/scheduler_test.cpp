#include "scheduler.h"

#include <gtest/gtest.h>

#include <map>
#include <memory>
#include <numeric>
#include <string>
#include <vector>

namespace kestrel {
namespace {

std::vector<int32_t> iota_tokens(int32_t first, int32_t n) {
  std::vector<int32_t> t(n);
  std::iota(t.begin(), t.end(), first);
  return t;
}

SchedulerConfig small_config() {
  SchedulerConfig c;
  c.num_blocks = 16;
  c.block_size = 4;
  c.max_num_seqs = 8;
  c.max_num_batched_tokens = 64;
  c.max_model_len = 64;
  return c;
}

int64_t add(Scheduler& s, const std::string& id, std::vector<int32_t> prompt, int32_t max_tokens) {
  AddRequestArgs a;
  a.request_id = id;
  a.prompt_token_ids = std::move(prompt);
  a.stop.max_tokens = max_tokens;
  int64_t seq = -1;
  EXPECT_TRUE(s.add_request(std::move(a), seq).ok());
  return seq;
}

// One step: schedule, sample token 7 for every sampled row, update.
std::shared_ptr<SchedulerOutput> step(Scheduler& s, UpdateOutput* upd = nullptr) {
  std::shared_ptr<SchedulerOutput> out;
  EXPECT_TRUE(s.schedule(out).ok());
  std::vector<int64_t> sampled(out->logits_indices.size(), 7);
  UpdateOutput u;
  EXPECT_TRUE(s.update(sampled, u).ok());
  if (upd) *upd = u;
  return out;
}

TEST(Scheduler, RejectsBadRequestsWithoutChangingState) {
  Scheduler s(small_config());
  int64_t seq = -1;
  AddRequestArgs empty;
  empty.request_id = "a";
  EXPECT_EQ(s.add_request(empty, seq).code(), StatusCode::kInvalidArgument);
  AddRequestArgs too_long;
  too_long.request_id = "b";
  too_long.prompt_token_ids = iota_tokens(0, 64);
  EXPECT_EQ(s.add_request(too_long, seq).code(), StatusCode::kInvalidArgument);
  AddRequestArgs zero_max;
  zero_max.request_id = "c";
  zero_max.prompt_token_ids = {1};
  zero_max.stop.max_tokens = 0;
  EXPECT_EQ(s.add_request(zero_max, seq).code(), StatusCode::kInvalidArgument);
  add(s, "d", {1, 2}, 4);
  AddRequestArgs dup;
  dup.request_id = "d";
  dup.prompt_token_ids = {1};
  EXPECT_EQ(s.add_request(dup, seq).code(), StatusCode::kAlreadyExists);
  EXPECT_EQ(s.abort("nope").code(), StatusCode::kNotFound);
  EXPECT_EQ(s.stats().num_waiting, 1);
}

TEST(Scheduler, RejectsRequestThatCanNeverFit) {
  SchedulerConfig c = small_config();
  c.num_blocks = 2;  // 8 tokens of KV
  Scheduler s(c);
  AddRequestArgs a;
  a.request_id = "big";
  a.prompt_token_ids = iota_tokens(0, 6);
  a.stop.max_tokens = 10;
  int64_t seq;
  EXPECT_EQ(s.add_request(a, seq).code(), StatusCode::kResourceExhausted);
}

TEST(Scheduler, DecodesRunToMaxTokensAndFreeBlocks) {
  Scheduler s(small_config());
  add(s, "a", iota_tokens(0, 5), 3);
  auto out = step(s);
  EXPECT_EQ(out->num_tokens(), 5);
  EXPECT_EQ(out->num_decodes, 0);
  EXPECT_EQ(out->logits_indices, (std::vector<int32_t>{4}));
  UpdateOutput u;
  out = step(s, &u);
  EXPECT_EQ(out->num_decodes, 1);
  EXPECT_EQ(out->positions, (std::vector<int32_t>{5}));
  EXPECT_EQ(out->input_ids, (std::vector<int32_t>{7}));
  out = step(s, &u);
  ASSERT_EQ(u.finished_seq_ids.size(), 1u);
  EXPECT_EQ(u.finish_reasons[0], FinishReason::kLength);
  EXPECT_FALSE(s.has_unfinished_requests());
  EXPECT_EQ(s.stats().num_free_blocks, 16);
}

TEST(Scheduler, ChunkedPrefillRespectsBudget) {
  SchedulerConfig c = small_config();
  c.max_num_batched_tokens = 8;
  Scheduler s(c);
  add(s, "a", iota_tokens(0, 20), 2);
  add(s, "b", iota_tokens(100, 3), 2);
  auto o1 = step(s);
  EXPECT_EQ(o1->num_tokens(), 8);
  EXPECT_TRUE(o1->logits_indices.empty());
  auto o2 = step(s);
  EXPECT_EQ(o2->num_tokens(), 8);
  auto o3 = step(s);  // a's last 4 prompt tokens + b's first 3 prompt tokens (budget 8)
  EXPECT_EQ(o3->num_tokens(), 7);
  EXPECT_EQ(o3->seq_lens, (std::vector<int32_t>{20, 3}));
  EXPECT_EQ(o3->context_lens, (std::vector<int32_t>{16, 0}));
  EXPECT_EQ(o3->logits_indices, (std::vector<int32_t>{3, 6}));
  auto o4 = step(s);
  EXPECT_EQ(o4->num_decodes, 2);
}

TEST(Scheduler, PrefixHitSkipsCachedBlocks) {
  Scheduler s(small_config());
  std::vector<int32_t> shared = iota_tokens(0, 10);  // 2 full blocks + 2 tokens
  add(s, "a", shared, 1);
  step(s);  // a prefilled and finished (max_tokens 1)
  EXPECT_FALSE(s.has_unfinished_requests());
  std::vector<int32_t> b_prompt = shared;
  b_prompt.push_back(99);
  add(s, "b", b_prompt, 1);
  auto out = step(s);
  EXPECT_EQ(out->context_lens, (std::vector<int32_t>{8}));
  EXPECT_EQ(out->num_tokens(), 3);
  const auto st = s.stats();
  EXPECT_EQ(st.prefix_hit_tokens, 8);
  EXPECT_EQ(st.prefix_query_tokens, 10 + 11);
}

TEST(Scheduler, SaltSeparatesPrefixes) {
  Scheduler s(small_config());
  AddRequestArgs a;
  a.request_id = "a";
  a.prompt_token_ids = iota_tokens(0, 9);
  a.stop.max_tokens = 1;
  a.cache_salt = "tenant-1";
  int64_t seq;
  ASSERT_TRUE(s.add_request(a, seq).ok());
  step(s);
  a.request_id = "b";
  a.cache_salt = "tenant-2";
  ASSERT_TRUE(s.add_request(a, seq).ok());
  auto out = step(s);
  EXPECT_EQ(out->context_lens, (std::vector<int32_t>{0}));
}

TEST(Scheduler, PreemptsNewestAndResumesWithOutput) {
  SchedulerConfig c = small_config();
  c.num_blocks = 4;  // 16 tokens
  c.enable_prefix_caching = false;
  Scheduler s(c);
  add(s, "old", iota_tokens(0, 4), 6);
  add(s, "new", iota_tokens(50, 4), 6);
  std::map<int64_t, int> tokens_received;
  int preemptions = 0;
  for (int i = 0; i < 40 && s.has_unfinished_requests(); ++i) {
    UpdateOutput u;
    auto out = step(s, &u);
    preemptions += static_cast<int>(out->preempted_seq_ids.size());
    for (const int64_t id : u.seq_ids) tokens_received[id]++;
  }
  EXPECT_FALSE(s.has_unfinished_requests());
  EXPECT_GE(preemptions, 1);
  EXPECT_EQ(tokens_received[0], 6);
  EXPECT_EQ(tokens_received[1], 6);
  EXPECT_EQ(s.stats().num_free_blocks, 4);
}

TEST(Scheduler, AbortFreesEverythingAndDropsPendingToken) {
  Scheduler s(small_config());
  add(s, "a", iota_tokens(0, 9), 5);
  std::shared_ptr<SchedulerOutput> out;
  ASSERT_TRUE(s.schedule(out).ok());
  EXPECT_EQ(s.stats().num_free_blocks, 13);
  ASSERT_TRUE(s.abort("a").ok());
  EXPECT_EQ(s.stats().num_free_blocks, 16);
  UpdateOutput u;
  const std::vector<int64_t> sampled = {3};
  ASSERT_TRUE(s.update(sampled, u).ok());
  EXPECT_TRUE(u.seq_ids.empty());
  EXPECT_FALSE(s.has_unfinished_requests());
}

TEST(Scheduler, StopTokensRespectMinTokens) {
  Scheduler s(small_config());
  AddRequestArgs a;
  a.request_id = "a";
  a.prompt_token_ids = {1, 2};
  a.stop.max_tokens = 10;
  a.stop.min_tokens = 2;
  a.stop.eos_token_ids = {7};
  int64_t seq;
  ASSERT_TRUE(s.add_request(a, seq).ok());
  UpdateOutput u;
  step(s, &u);  // output 1 token (7) but min_tokens 2
  EXPECT_TRUE(u.finished_seq_ids.empty());
  step(s, &u);
  ASSERT_EQ(u.finished_seq_ids.size(), 1u);
  EXPECT_EQ(u.finish_reasons[0], FinishReason::kStop);
}

TEST(Scheduler, UpdateChecksSampledCount) {
  Scheduler s(small_config());
  add(s, "a", {1, 2, 3}, 2);
  std::shared_ptr<SchedulerOutput> out;
  ASSERT_TRUE(s.schedule(out).ok());
  EXPECT_FALSE(s.schedule(out).ok());  // update() pending
  UpdateOutput u;
  const std::vector<int64_t> two = {1, 2};
  EXPECT_EQ(s.update(two, u).code(), StatusCode::kInvalidArgument);
  const std::vector<int64_t> one = {1};
  EXPECT_TRUE(s.update(one, u).ok());
}

TEST(Scheduler, AsyncSchedulesOneStepAheadOverPlaceholders) {
  SchedulerConfig c = small_config();
  c.async_scheduling = true;
  Scheduler s(c);
  add(s, "a", {1, 2, 3}, 3);
  std::shared_ptr<SchedulerOutput> first, second, third;
  ASSERT_TRUE(s.schedule(first).ok());
  ASSERT_TRUE(s.schedule(second).ok());  // over the token `first` is still sampling
  EXPECT_EQ(s.num_pending_updates(), 2);
  ASSERT_EQ(second->placeholder_rows, std::vector<int32_t>{0});
  EXPECT_EQ(second->placeholder_src, std::vector<int32_t>{0});
  EXPECT_EQ(second->positions, std::vector<int32_t>{3});
  EXPECT_FALSE(s.schedule(third).ok());  // two steps not updated
  UpdateOutput u;
  const std::vector<int64_t> one = {9};
  ASSERT_TRUE(s.update(one, u).ok());  // the oldest step: token 9 at position 3
  ASSERT_EQ(u.token_ids, std::vector<int32_t>{9});
  EXPECT_EQ(s.find("a")->num_output_placeholders, 1);
  ASSERT_TRUE(s.schedule(third).ok());
  EXPECT_EQ(third->positions, std::vector<int32_t>{4});
  EXPECT_EQ(third->placeholder_rows, std::vector<int32_t>{0});
  const std::vector<int64_t> two = {8};
  ASSERT_TRUE(s.update(two, u).ok());
  std::shared_ptr<SchedulerOutput> fourth;
  ASSERT_TRUE(s.schedule(fourth).ok());  // a's third token is in flight and its last
  EXPECT_EQ(fourth->num_tokens(), 0);
  const std::vector<int64_t> three = {7};
  UpdateOutput last;
  ASSERT_TRUE(s.update(three, last).ok());
  ASSERT_EQ(last.finish_reasons.size(), 1u);
  EXPECT_EQ(last.finish_reasons[0], FinishReason::kLength);
  UpdateOutput empty;
  ASSERT_TRUE(s.update({}, empty).ok());
  EXPECT_FALSE(s.has_unfinished_requests());
  EXPECT_EQ(s.stats().num_free_blocks, 16);
}

TEST(Scheduler, AsyncDropsTheStepAfterAnEos) {
  SchedulerConfig c = small_config();
  c.async_scheduling = true;
  Scheduler s(c);
  AddRequestArgs a;
  a.request_id = "a";
  a.prompt_token_ids = {1, 2};
  a.stop.max_tokens = 10;
  a.stop.eos_token_ids = {5};
  int64_t seq;
  ASSERT_TRUE(s.add_request(a, seq).ok());
  std::shared_ptr<SchedulerOutput> first, second;
  ASSERT_TRUE(s.schedule(first).ok());
  ASSERT_TRUE(s.schedule(second).ok());
  UpdateOutput u;
  const std::vector<int64_t> eos = {5};
  ASSERT_TRUE(s.update(eos, u).ok());
  ASSERT_EQ(u.finish_reasons.size(), 1u);
  EXPECT_EQ(s.stats().num_free_blocks, 16);  // freed at once, the step ahead still pending
  const std::vector<int64_t> after = {6};
  UpdateOutput late;
  ASSERT_TRUE(s.update(after, late).ok());
  EXPECT_TRUE(late.token_ids.empty());  // the token computed past the EOS is dropped
  EXPECT_FALSE(s.has_unfinished_requests());
}

}  // namespace
}  // namespace kestrel
