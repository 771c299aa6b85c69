// KVCacheManager: per-request block tables over a BlockPool, with prefix caching.
//
// A full block's hash chains its parent's hash, its token ids and (first block only) the
// request's cache salt. A hash hit is verified before use: the block's stored tokens must equal
// the request's, and its recorded parent must be the block matched just before it, still in the
// same generation (first blocks: same salt). By induction a hit therefore holds exactly the
// request's prefix, so a hash collision can cost a miss but never return wrong KV.
#pragma once

#include <cstdint>
#include <unordered_map>
#include <vector>

#include "block_pool.h"
#include "request.h"

namespace kestrel {

struct PrefixHit {
  std::vector<int32_t> block_ids;  // the request's first blocks, in order
  int32_t num_tokens = 0;          // block_ids.size() * block_size
};

class KVCacheManager {
 public:
  KVCacheManager(int32_t num_blocks, int32_t block_size, bool enable_prefix_caching);

  int32_t block_size() const { return block_size_; }
  bool prefix_caching_enabled() const { return enable_prefix_caching_; }
  BlockPool& pool() { return pool_; }
  const BlockPool& pool() const { return pool_; }

  // Longest verified cached prefix of a request that has no blocks yet. At least one token is
  // always left to compute, so the hit covers at most num_tokens - 1 tokens (whole blocks).
  PrefixHit find_cached_prefix(Request& request);

  // Gives `request` the blocks for `hit` (if any) followed by `num_new_tokens` more tokens after
  // request.num_computed_tokens + hit.num_tokens, and registers the full blocks they complete in
  // the prefix cache. Returns false and changes nothing when blocks run out.
  bool allocate_slots(Request& request, int32_t num_new_tokens, const PrefixHit& hit);

  // Releases all of the request's blocks (tail blocks first, so they are evicted first).
  void free(const Request& request);
  // Releases the request's blocks past its first `num_blocks` (tail first): the slots of
  // rejected draft tokens. Those blocks were never registered in the prefix cache (only blocks
  // of known tokens are).
  void truncate(const Request& request, int32_t num_blocks);

  // The request's block table (empty if it holds no blocks).
  const std::vector<int32_t>& block_table(int64_t seq_id) const;
  int32_t num_requests() const { return static_cast<int32_t>(tables_.size()); }

  // Fraction of blocks in use by requests (cached-but-free blocks count as free).
  double usage() const;
  int64_t prefix_query_tokens() const { return prefix_query_tokens_; }
  int64_t prefix_hit_tokens() const { return prefix_hit_tokens_; }
  // Counts a prefix lookup in the hit counters (once per admission, not per attempt).
  void record_prefix_query(int32_t num_query_tokens, int32_t num_hit_tokens);

 private:
  struct Table {
    std::vector<int32_t> blocks;
    int32_t num_registered = 0;  // leading full blocks already offered to the prefix cache
  };

  void ensure_block_hashes(Request& request, int32_t num_full_blocks) const;
  void register_full_blocks(Request& request, Table& table, int32_t num_tokens);

  int32_t block_size_;
  bool enable_prefix_caching_;
  BlockPool pool_;
  std::unordered_map<int64_t, Table> tables_;
  int64_t prefix_query_tokens_ = 0;
  int64_t prefix_hit_tokens_ = 0;
};

}  // namespace kestrel
