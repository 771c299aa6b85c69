// Multi-token steps: draft tokens, k + 1 sampled rows, accepted tokens and rollback.
#include <gtest/gtest.h>

#include <memory>
#include <numeric>
#include <string>
#include <vector>

#include "scheduler.h"

namespace kestrel {
namespace {

SchedulerConfig config() {
  SchedulerConfig c;
  c.num_blocks = 16;
  c.block_size = 4;
  c.max_num_seqs = 8;
  c.max_num_batched_tokens = 64;
  c.max_model_len = 64;
  return c;
}

std::vector<int32_t> iota_tokens(int32_t first, int32_t n) {
  std::vector<int32_t> t(n);
  std::iota(t.begin(), t.end(), first);
  return t;
}

int64_t add(Scheduler& s, const std::string& id, std::vector<int32_t> prompt, int32_t max_tokens,
            std::vector<int32_t> eos = {}) {
  AddRequestArgs a;
  a.request_id = id;
  a.prompt_token_ids = std::move(prompt);
  a.stop.max_tokens = max_tokens;
  a.stop.eos_token_ids = std::move(eos);
  int64_t seq = -1;
  EXPECT_TRUE(s.add_request(std::move(a), seq).ok());
  return seq;
}

std::shared_ptr<SchedulerOutput> schedule(Scheduler& s) {
  std::shared_ptr<SchedulerOutput> out;
  EXPECT_TRUE(s.schedule(out).ok());
  return out;
}

UpdateOutput update(Scheduler& s, std::vector<int64_t> tokens, std::vector<int32_t> counts) {
  UpdateOutput u;
  const Status st = s.update(tokens, counts, u);
  EXPECT_TRUE(st.ok()) << st.message();
  return u;
}

int32_t set_drafts(Scheduler& s, int64_t seq, std::vector<int32_t> drafts) {
  int32_t kept = -1;
  const Status st = s.set_draft_tokens(seq, drafts, kept);
  EXPECT_TRUE(st.ok()) << st.message();
  return kept;
}

// A request with a 6-token prompt whose first step (prefill) sampled token 50.
int64_t prefilled(Scheduler& s, const std::string& id, int32_t max_tokens,
                  std::vector<int32_t> eos = {}) {
  const int64_t seq = add(s, id, iota_tokens(0, 6), max_tokens, std::move(eos));
  schedule(s);
  update(s, {50}, {1});
  return seq;
}

TEST(SpecDecode, DraftsGetQueryRowsSlotsAndSampledRows) {
  Scheduler s(config());
  const int64_t seq = prefilled(s, "a", 20);
  EXPECT_EQ(set_drafts(s, seq, {51, 52, 53}), 3);
  auto out = schedule(s);
  EXPECT_EQ(out->num_decodes, 0);  // a verify step has 4 query rows
  EXPECT_EQ(out->input_ids, (std::vector<int32_t>{50, 51, 52, 53}));
  EXPECT_EQ(out->positions, (std::vector<int32_t>{6, 7, 8, 9}));
  EXPECT_EQ(out->logits_indices, (std::vector<int32_t>{0, 1, 2, 3}));
  EXPECT_EQ(out->sampled_request_indices, (std::vector<int32_t>{0, 0, 0, 0}));
  EXPECT_EQ(out->sampled_query_start_loc, (std::vector<int32_t>{0, 4}));
  EXPECT_EQ(out->num_draft_tokens, (std::vector<int32_t>{3}));
  EXPECT_EQ(out->total_draft_tokens, 3);
  EXPECT_EQ(out->seq_lens, (std::vector<int32_t>{10}));
  EXPECT_EQ(s.block_table(seq).size(), 3u);  // 10 slots of 4
  // All three drafts accepted plus the bonus token.
  UpdateOutput u = update(s, {51, 52, 53, 54}, {4});
  EXPECT_EQ(u.token_ids, (std::vector<int32_t>{51, 52, 53, 54}));
  EXPECT_EQ(u.seq_ids, (std::vector<int64_t>(4, seq)));
  EXPECT_EQ(s.find(seq)->num_computed_tokens, 10);
  out = schedule(s);  // a plain decode of the bonus token
  EXPECT_EQ(out->num_decodes, 1);
  EXPECT_EQ(out->input_ids, (std::vector<int32_t>{54}));
  EXPECT_EQ(out->positions, (std::vector<int32_t>{10}));
  EXPECT_EQ(out->num_draft_tokens, (std::vector<int32_t>{0}));
}

TEST(SpecDecode, RejectedDraftsRollBackAndFreeTheirBlocks) {
  Scheduler s(config());
  const int64_t seq = prefilled(s, "a", 30);
  const int32_t free_before = s.kv_cache().pool().num_free_blocks();
  set_drafts(s, seq, {51, 52, 53, 54, 55, 56, 57});  // rows at positions 6..13: 4 blocks
  schedule(s);
  EXPECT_EQ(s.block_table(seq).size(), 4u);
  // The first draft is right, the second is not: the correction token is 60.
  UpdateOutput u = update(s, {51, 60}, {2});
  EXPECT_EQ(u.token_ids, (std::vector<int32_t>{51, 60}));
  const Request& r = *s.find(seq);
  EXPECT_EQ(r.num_tokens(), 9);
  EXPECT_EQ(r.num_computed_tokens, 8);       // positions 0..7 (6 = 50, 7 = 51) have valid KV
  EXPECT_EQ(s.block_table(seq).size(), 3u);  // 9 known tokens
  EXPECT_EQ(s.kv_cache().pool().num_free_blocks(), free_before - 1);
  auto out = schedule(s);
  EXPECT_EQ(out->input_ids, (std::vector<int32_t>{60}));
  EXPECT_EQ(out->positions, (std::vector<int32_t>{8}));
}

TEST(SpecDecode, OnlyDraftsEqualToTheAcceptedTokensKeepTheirKv) {
  Scheduler s(config());
  const int64_t seq = prefilled(s, "a", 30);
  set_drafts(s, seq, {51, 52, 53});
  schedule(s);
  // A token that differs from its draft invalidates every later position, accepted or not.
  update(s, {51, 60, 53}, {3});
  EXPECT_EQ(s.find(seq)->num_computed_tokens, 8);  // 50 at 6 and 51 at 7 were computed right
  auto out = schedule(s);
  EXPECT_EQ(out->input_ids, (std::vector<int32_t>{60, 53}));
  EXPECT_EQ(out->positions, (std::vector<int32_t>{8, 9}));
}

TEST(SpecDecode, RejectedDraftsNeverReachThePrefixCache) {
  Scheduler s(config());
  const int64_t seq = prefilled(s, "a", 30);  // 7 tokens: 0..5, 50
  set_drafts(s, seq, {51, 52, 53, 54, 55});   // positions 7..11 would complete blocks 1 and 2
  schedule(s);
  EXPECT_EQ(s.kv_cache().pool().num_cached_blocks(), 1);  // only block 0 holds known tokens
  update(s, {51, 70}, {2});  // 0..5, 50, 51, 70: block 1 (positions 4..7) is complete now
  EXPECT_EQ(s.kv_cache().pool().num_cached_blocks(), 1);
  schedule(s);  // computes position 8 and registers block 1 of known, computed tokens
  EXPECT_EQ(s.kv_cache().pool().num_cached_blocks(), 2);
  update(s, {71}, {1});
  ASSERT_TRUE(s.abort("a").ok());
  // A new request with the accepted prefix hits blocks 0 and 1, never a block of drafts.
  std::vector<int32_t> prompt = iota_tokens(0, 6);
  prompt.insert(prompt.end(), {50, 51, 70, 52, 53, 54, 55});
  const int64_t b = add(s, "b", prompt, 4);
  auto out = schedule(s);
  EXPECT_EQ(out->context_lens, (std::vector<int32_t>{8}));
  EXPECT_EQ(s.find(b)->num_cached_prompt_tokens, 8);
}

TEST(SpecDecode, ZeroAcceptedRecomputesTheLastToken) {
  Scheduler s(config());
  const int64_t seq = prefilled(s, "a", 30);
  set_drafts(s, seq, {51, 52});
  schedule(s);
  UpdateOutput u = update(s, {}, {0});
  EXPECT_TRUE(u.token_ids.empty());
  EXPECT_EQ(s.find(seq)->num_computed_tokens, 6);
  auto out = schedule(s);
  EXPECT_EQ(out->input_ids, (std::vector<int32_t>{50}));
  EXPECT_EQ(out->positions, (std::vector<int32_t>{6}));
}

TEST(SpecDecode, EosInsideAcceptedTokensEndsTheRequestThere) {
  Scheduler s(config());
  const int64_t seq = prefilled(s, "a", 30, {2});
  set_drafts(s, seq, {51, 2, 53});
  schedule(s);
  UpdateOutput u = update(s, {51, 2, 53, 54}, {4});
  EXPECT_EQ(u.token_ids, (std::vector<int32_t>{51, 2}));
  ASSERT_EQ(u.finished_seq_ids, (std::vector<int64_t>{seq}));
  EXPECT_EQ(u.finish_reasons[0], FinishReason::kStop);
  EXPECT_EQ(s.kv_cache().pool().num_free_blocks(), 16);
}

TEST(SpecDecode, DraftsAreTrimmedToMaxTokensAndTheBudget) {
  SchedulerConfig c = config();
  c.max_num_batched_tokens = 3;
  Scheduler s(c);
  const int64_t seq = add(s, "a", {1, 2}, 4);
  schedule(s);
  update(s, {50}, {1});  // one output so far: at most 3 more
  EXPECT_EQ(set_drafts(s, seq, {1, 2, 3, 4, 5}), 2);
  const int64_t other = add(s, "b", {9, 9}, 4);
  auto out = schedule(s);  // a takes base + 2 drafts: the whole budget, b waits
  EXPECT_EQ(out->seq_ids, (std::vector<int64_t>{seq}));
  EXPECT_EQ(out->num_draft_tokens, (std::vector<int32_t>{2}));
  UpdateOutput u = update(s, {1, 2, 3}, {3});
  ASSERT_EQ(u.finished_seq_ids, (std::vector<int64_t>{seq}));
  EXPECT_EQ(u.finish_reasons[0], FinishReason::kLength);
  // With a budget of 3 and one running decode ahead of it, a drafted request keeps 1 draft.
  schedule(s);
  update(s, {7}, {1});  // b prefilled
  EXPECT_EQ(set_drafts(s, other, {7, 7}), 2);
  c.max_num_batched_tokens = 2;
  Scheduler t(c);
  const int64_t x = add(t, "x", {1}, 8);
  const int64_t y = add(t, "y", {2}, 8);
  schedule(t);
  update(t, {5, 5}, {1, 1});
  set_drafts(t, y, {6, 6, 6});
  out = schedule(t);  // x's base row, then y's base row: no room for y's drafts
  EXPECT_EQ(out->seq_ids, (std::vector<int64_t>{x, y}));
  EXPECT_EQ(out->num_draft_tokens, (std::vector<int32_t>{0, 0}));
  UpdateOutput v;
  EXPECT_TRUE(t.update(std::vector<int64_t>{3, 4}, v).ok());  // no drafts: the plain overload
  EXPECT_TRUE(t.find(y)->draft_token_ids.empty());
}

TEST(SpecDecode, BadCallsAreRefusedWithoutChangingState) {
  Scheduler s(config());
  const int64_t seq = add(s, "a", iota_tokens(0, 6), 10);
  int32_t kept = 0;
  EXPECT_EQ(s.set_draft_tokens(seq, std::vector<int32_t>{1}, kept).code(),
            StatusCode::kInvalidArgument);  // still waiting for its prefill
  EXPECT_EQ(s.set_draft_tokens("nope", std::vector<int32_t>{1}, kept).code(),
            StatusCode::kNotFound);
  schedule(s);
  update(s, {50}, {1});
  EXPECT_EQ(s.set_draft_tokens(seq, std::vector<int32_t>{-1}, kept).code(),
            StatusCode::kInvalidArgument);
  set_drafts(s, seq, {1, 2});
  schedule(s);
  UpdateOutput u;
  EXPECT_EQ(s.update(std::vector<int64_t>{1}, u).code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(s.update(std::vector<int64_t>{1, 2, 3, 4}, std::vector<int32_t>{4}, u).code(),
            StatusCode::kInvalidArgument);  // more than k + 1
  EXPECT_EQ(s.update(std::vector<int64_t>{1, 2}, std::vector<int32_t>{3}, u).code(),
            StatusCode::kInvalidArgument);  // counts and tokens disagree
  EXPECT_EQ(s.num_pending_updates(), 1);
  update(s, {1, 2, 3}, {3});
  EXPECT_EQ(s.find(seq)->num_tokens(), 10);
}

TEST(SpecDecode, PreemptionClearsDrafts) {
  SchedulerConfig c = config();
  c.num_blocks = 4;  // 16 slots
  Scheduler s(c);
  const int64_t a = add(s, "a", iota_tokens(0, 7), 8);
  const int64_t b = add(s, "b", iota_tokens(20, 7), 8);
  schedule(s);
  update(s, {1, 1}, {1, 1});  // both hold 2 blocks (8 slots), the pool is full
  set_drafts(s, b, {2, 2, 2});
  set_drafts(s, a, {3, 3});
  auto out = schedule(s);  // a's drafts need a third block: dropped before preempting anyone
  EXPECT_EQ(out->num_draft_tokens, (std::vector<int32_t>{0, 0}));
  update(s, {3, 2}, {1, 1});
  set_drafts(s, b, {2, 2, 2});
  out = schedule(s);  // a needs a new block for its base row: b (newest) is preempted
  EXPECT_EQ(out->preempted_seq_ids, (std::vector<int64_t>{b}));
  EXPECT_TRUE(s.find(b)->draft_token_ids.empty());
}

TEST(SpecDecode, AsyncNeverSchedulesADraftedRequestAhead) {
  SchedulerConfig c = config();
  c.async_scheduling = true;
  Scheduler s(c);
  const int64_t a = add(s, "a", iota_tokens(0, 6), 20);
  const int64_t b = add(s, "b", iota_tokens(10, 6), 20);
  schedule(s);
  update(s, {50, 60}, {1, 1});
  set_drafts(s, a, {51, 52});
  auto first = schedule(s);
  EXPECT_EQ(first->num_draft_tokens, (std::vector<int32_t>{0, 2}));  // b decodes first
  auto ahead = schedule(s);  // b over its placeholder; a waits for its verify step
  EXPECT_EQ(ahead->seq_ids, (std::vector<int64_t>{b}));
  EXPECT_EQ(ahead->placeholder_src, (std::vector<int32_t>{0}));
  int32_t kept = 0;
  EXPECT_EQ(s.set_draft_tokens(b, std::vector<int32_t>{1}, kept).code(),
            StatusCode::kInvalidArgument);  // b has a token in flight
  update(s, {61, 51, 70}, {1, 2});          // a: draft 51 accepted, 70 corrects 52
  EXPECT_EQ(s.find(a)->num_computed_tokens, 8);
  auto next = schedule(s);
  EXPECT_EQ(next->seq_ids, (std::vector<int64_t>{a, b}));
  EXPECT_EQ(next->input_ids, (std::vector<int32_t>{70, 0}));
}

}  // namespace
}  // namespace kestrel
