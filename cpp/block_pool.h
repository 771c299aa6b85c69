// BlockPool: the fixed set of KV-cache blocks shared by all layers and requests.
//
// Invariants:
//  - every block is either in use (ref_cnt > 0) or in the free list (ref_cnt == 0), never both;
//  - the free list is in eviction order: blocks holding no cached prefix first (they are free to
//    reuse at no cost), then cached blocks from least to most recently freed (LRU);
//  - a block that holds a cached prefix is findable through hash_to_block until it is handed out
//    again; its hash entry is removed before it is reused;
//  - every (re)allocation bumps the block's generation, so a child block that recorded
//    (parent id, parent generation) can tell whether its parent still holds the same content.
#pragma once

#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <unordered_map>
#include <vector>

namespace kestrel {

struct KVBlock {
  int32_t ref_cnt = 0;
  uint64_t generation = 0;
  // Cached-prefix identity, valid when has_hash.
  bool has_hash = false;
  uint64_t hash = 0;
  std::vector<int32_t> token_ids;  // the block's tokens, to verify a hash hit
  int32_t parent_block = -1;       // -1 for a sequence's first block
  uint64_t parent_generation = 0;
  std::string salt;  // first blocks only
  // Intrusive free-list links (block ids), valid when in_free_list.
  int32_t prev = -1;
  int32_t next = -1;
  bool in_free_list = false;
};

class BlockPool {
 public:
  explicit BlockPool(int32_t num_blocks);

  int32_t num_blocks() const { return static_cast<int32_t>(blocks_.size()); }
  int32_t num_free_blocks() const { return num_free_; }
  int32_t num_cached_blocks() const { return static_cast<int32_t>(hash_to_block_.size()); }

  // Takes n blocks from the head of the free list (ref_cnt becomes 1), evicting their cached
  // prefixes. Returns false and changes nothing if fewer than n are free.
  bool allocate(int32_t n, std::vector<int32_t>& out);
  // Adds a reference to a block (a prefix-cache hit); takes it out of the free list if needed.
  void touch(int32_t block_id);
  // Drops one reference from each block, in the given order. Blocks reaching zero join the free
  // list: cached ones at the tail (most recently used), uncached ones at the head.
  void release(std::span<const int32_t> block_ids);

  // The block registered under `hash`, if any (unverified: the caller checks the content).
  std::optional<int32_t> lookup(uint64_t hash) const;
  // Registers `block_id` as holding the given full block. Returns false if another block already
  // holds this hash (the block then stays uncached).
  bool register_cached(int32_t block_id, uint64_t hash, std::span<const int32_t> tokens,
                       int32_t parent_block, const std::string& salt);

  const KVBlock& block(int32_t block_id) const { return blocks_[block_id]; }
  std::vector<int32_t> free_list() const;  // head (next to be reused) first
  int64_t num_evictions() const { return num_evictions_; }

 private:
  void push_front(int32_t id);
  void push_back(int32_t id);
  void unlink(int32_t id);
  void evict(int32_t id);

  std::vector<KVBlock> blocks_;
  std::unordered_map<uint64_t, int32_t> hash_to_block_;
  int32_t head_ = -1;
  int32_t tail_ = -1;
  int32_t num_free_ = 0;
  int64_t num_evictions_ = 0;
};

}  // namespace kestrel
