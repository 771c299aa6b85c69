#include "block_pool.h"

#include <cassert>

namespace kestrel {

BlockPool::BlockPool(int32_t num_blocks) : blocks_(num_blocks) {
  hash_to_block_.reserve(num_blocks);  // never rehash on the scheduling path
  for (int32_t id = 0; id < num_blocks; ++id) push_back(id);
}

bool BlockPool::allocate(int32_t n, std::vector<int32_t>& out) {
  if (n < 0 || n > num_free_) return false;
  for (int32_t i = 0; i < n; ++i) {
    const int32_t id = head_;
    unlink(id);
    KVBlock& b = blocks_[id];
    if (b.has_hash) evict(id);
    b.ref_cnt = 1;
    ++b.generation;
    out.push_back(id);
  }
  return true;
}

void BlockPool::touch(int32_t block_id) {
  KVBlock& b = blocks_[block_id];
  if (b.in_free_list) unlink(block_id);
  ++b.ref_cnt;
}

void BlockPool::release(std::span<const int32_t> block_ids) {
  for (const int32_t id : block_ids) {
    KVBlock& b = blocks_[id];
    assert(b.ref_cnt > 0);
    if (--b.ref_cnt == 0) {
      if (b.has_hash) {
        push_back(id);
      } else {
        push_front(id);
      }
    }
  }
}

std::optional<int32_t> BlockPool::lookup(uint64_t hash) const {
  const auto it = hash_to_block_.find(hash);
  if (it == hash_to_block_.end()) return std::nullopt;
  return it->second;
}

bool BlockPool::register_cached(int32_t block_id, uint64_t hash, std::span<const int32_t> tokens,
                                int32_t parent_block, const std::string& salt) {
  KVBlock& b = blocks_[block_id];
  if (b.has_hash) return b.hash == hash;
  if (!hash_to_block_.try_emplace(hash, block_id).second) return false;
  b.has_hash = true;
  b.hash = hash;
  b.token_ids.assign(tokens.begin(), tokens.end());
  b.parent_block = parent_block;
  b.parent_generation = parent_block >= 0 ? blocks_[parent_block].generation : 0;
  if (parent_block < 0) {
    b.salt = salt;
  } else {
    b.salt.clear();
  }
  return true;
}

std::vector<int32_t> BlockPool::free_list() const {
  std::vector<int32_t> ids;
  ids.reserve(num_free_);
  for (int32_t id = head_; id >= 0; id = blocks_[id].next) ids.push_back(id);
  return ids;
}

void BlockPool::evict(int32_t id) {
  KVBlock& b = blocks_[id];
  hash_to_block_.erase(b.hash);
  b.has_hash = false;
  b.hash = 0;
  b.token_ids.clear();
  b.parent_block = -1;
  b.salt.clear();
  ++num_evictions_;
}

void BlockPool::push_front(int32_t id) {
  KVBlock& b = blocks_[id];
  b.prev = -1;
  b.next = head_;
  if (head_ >= 0) {
    blocks_[head_].prev = id;
  } else {
    tail_ = id;
  }
  head_ = id;
  b.in_free_list = true;
  ++num_free_;
}

void BlockPool::push_back(int32_t id) {
  KVBlock& b = blocks_[id];
  b.next = -1;
  b.prev = tail_;
  if (tail_ >= 0) {
    blocks_[tail_].next = id;
  } else {
    head_ = id;
  }
  tail_ = id;
  b.in_free_list = true;
  ++num_free_;
}

void BlockPool::unlink(int32_t id) {
  KVBlock& b = blocks_[id];
  assert(b.in_free_list);
  if (b.prev >= 0) {
    blocks_[b.prev].next = b.next;
  } else {
    head_ = b.next;
  }
  if (b.next >= 0) {
    blocks_[b.next].prev = b.prev;
  } else {
    tail_ = b.prev;
  }
  b.prev = b.next = -1;
  b.in_free_list = false;
  --num_free_;
}

}  // namespace kestrel
