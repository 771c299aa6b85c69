#include "block_pool.h"

#include <gtest/gtest.h>

#include <vector>

namespace kestrel {
namespace {

std::vector<int32_t> tokens(int32_t first, int32_t n) {
  std::vector<int32_t> t;
  for (int32_t i = 0; i < n; ++i) t.push_back(first + i);
  return t;
}

TEST(BlockPool, AllocatesInOrderAndFailsCleanly) {
  BlockPool pool(4);
  std::vector<int32_t> ids;
  ASSERT_TRUE(pool.allocate(3, ids));
  EXPECT_EQ(ids, (std::vector<int32_t>{0, 1, 2}));
  EXPECT_EQ(pool.num_free_blocks(), 1);
  std::vector<int32_t> more;
  EXPECT_FALSE(pool.allocate(2, more));
  EXPECT_TRUE(more.empty());
  EXPECT_EQ(pool.num_free_blocks(), 1);
  EXPECT_EQ(pool.free_list(), (std::vector<int32_t>{3}));
}

TEST(BlockPool, FreedUncachedBlocksAreReusedFirst) {
  BlockPool pool(4);
  std::vector<int32_t> ids;
  ASSERT_TRUE(pool.allocate(2, ids));  // 0, 1
  const std::vector<int32_t> one = {1};
  pool.release(one);
  EXPECT_EQ(pool.free_list(), (std::vector<int32_t>{1, 2, 3}));
  std::vector<int32_t> again;
  ASSERT_TRUE(pool.allocate(1, again));
  EXPECT_EQ(again, (std::vector<int32_t>{1}));
}

TEST(BlockPool, RefCountsUnderSharing) {
  BlockPool pool(2);
  std::vector<int32_t> ids;
  ASSERT_TRUE(pool.allocate(1, ids));
  pool.touch(0);
  pool.touch(0);
  EXPECT_EQ(pool.block(0).ref_cnt, 3);
  const std::vector<int32_t> zero = {0};
  pool.release(zero);
  pool.release(zero);
  EXPECT_EQ(pool.block(0).ref_cnt, 1);
  EXPECT_EQ(pool.num_free_blocks(), 1);
  pool.release(zero);
  EXPECT_EQ(pool.block(0).ref_cnt, 0);
  EXPECT_EQ(pool.num_free_blocks(), 2);
}

TEST(BlockPool, CachedBlocksEvictInLruOrder) {
  BlockPool pool(3);
  std::vector<int32_t> ids;
  ASSERT_TRUE(pool.allocate(3, ids));
  const auto t = tokens(0, 4);
  for (int32_t id = 0; id < 3; ++id) {
    ASSERT_TRUE(pool.register_cached(id, 100 + id, t, -1, ""));
  }
  // Free in order 2, 0, 1: the least recently freed is reused first.
  for (const int32_t id : {2, 0, 1}) {
    const std::vector<int32_t> one = {id};
    pool.release(one);
  }
  EXPECT_EQ(pool.free_list(), (std::vector<int32_t>{2, 0, 1}));
  EXPECT_EQ(pool.num_cached_blocks(), 3);
  // A hit on block 0 takes it out of the free list; freeing it again makes it most recent.
  pool.touch(0);
  const std::vector<int32_t> zero = {0};
  pool.release(zero);
  EXPECT_EQ(pool.free_list(), (std::vector<int32_t>{2, 1, 0}));
  std::vector<int32_t> got;
  ASSERT_TRUE(pool.allocate(1, got));
  EXPECT_EQ(got, (std::vector<int32_t>{2}));
  // Its hash entry is gone before reuse.
  EXPECT_FALSE(pool.lookup(102).has_value());
  EXPECT_EQ(pool.lookup(100), 0);
  EXPECT_EQ(pool.num_evictions(), 1);
}

TEST(BlockPool, DuplicateHashStaysUncached) {
  BlockPool pool(2);
  std::vector<int32_t> ids;
  ASSERT_TRUE(pool.allocate(2, ids));
  const auto t = tokens(5, 4);
  EXPECT_TRUE(pool.register_cached(0, 7, t, -1, ""));
  EXPECT_FALSE(pool.register_cached(1, 7, t, -1, ""));
  EXPECT_EQ(pool.lookup(7), 0);
  EXPECT_FALSE(pool.block(1).has_hash);
}

TEST(BlockPool, GenerationBumpsOnEveryAllocation) {
  BlockPool pool(1);
  std::vector<int32_t> ids;
  ASSERT_TRUE(pool.allocate(1, ids));
  const uint64_t g = pool.block(0).generation;
  pool.release(ids);
  ids.clear();
  ASSERT_TRUE(pool.allocate(1, ids));
  EXPECT_EQ(pool.block(0).generation, g + 1);
}

}  // namespace
}  // namespace kestrel
