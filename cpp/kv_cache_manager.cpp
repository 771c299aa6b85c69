#include "kv_cache_manager.h"

#include <algorithm>
#include <cassert>
#include <span>

namespace kestrel {

namespace {

constexpr uint64_t kPrime1 = 0x9E3779B185EBCA87ULL;
constexpr uint64_t kPrime2 = 0xC2B2AE3D27D4EB4FULL;

uint64_t splitmix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ULL;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ULL;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBULL;
  return x ^ (x >> 31);
}

uint64_t rotl(uint64_t x, int r) { return (x << r) | (x >> (64 - r)); }

uint64_t salt_seed(const std::string& salt) {
  uint64_t h = 0xCBF29CE484222325ULL;  // FNV-1a over the salt bytes
  for (const unsigned char c : salt) h = (h ^ c) * 0x100000001B3ULL;
  return splitmix64(h ^ salt.size());
}

uint64_t chain_hash(uint64_t parent, std::span<const int32_t> tokens) {
  uint64_t h = parent ^ kPrime2;
  for (const int32_t t : tokens) {
    h = rotl(h ^ (static_cast<uint64_t>(static_cast<uint32_t>(t)) * kPrime1), 31) * kPrime2;
  }
  return splitmix64(h);
}

const std::vector<int32_t> kEmptyTable;

}  // namespace

KVCacheManager::KVCacheManager(int32_t num_blocks, int32_t block_size, bool enable_prefix_caching)
    : block_size_(block_size), enable_prefix_caching_(enable_prefix_caching), pool_(num_blocks) {}

void KVCacheManager::ensure_block_hashes(Request& request, int32_t num_full_blocks) const {
  auto& hashes = request.block_hashes;
  const auto tokens = std::span<const int32_t>(request.token_ids);
  while (static_cast<int32_t>(hashes.size()) < num_full_blocks) {
    const size_t i = hashes.size();
    const uint64_t parent = i == 0 ? salt_seed(request.cache_salt) : hashes[i - 1];
    hashes.push_back(chain_hash(parent, tokens.subspan(i * block_size_, block_size_)));
  }
}

PrefixHit KVCacheManager::find_cached_prefix(Request& request) {
  PrefixHit hit;
  if (!enable_prefix_caching_) return hit;
  assert(!tables_.contains(request.seq_id));
  const int32_t max_blocks = (request.num_tokens() - 1) / block_size_;
  ensure_block_hashes(request, max_blocks);
  const auto tokens = std::span<const int32_t>(request.token_ids);
  for (int32_t i = 0; i < max_blocks; ++i) {
    const auto found = pool_.lookup(request.block_hashes[i]);
    if (!found) break;
    const KVBlock& b = pool_.block(*found);
    const auto want = tokens.subspan(i * block_size_, block_size_);
    if (!std::equal(want.begin(), want.end(), b.token_ids.begin(), b.token_ids.end())) break;
    if (i == 0) {
      if (b.parent_block != -1 || b.salt != request.cache_salt) break;
    } else {
      const int32_t parent = hit.block_ids.back();
      if (b.parent_block != parent || b.parent_generation != pool_.block(parent).generation) break;
    }
    hit.block_ids.push_back(*found);
  }
  hit.num_tokens = static_cast<int32_t>(hit.block_ids.size()) * block_size_;
  return hit;
}

bool KVCacheManager::allocate_slots(Request& request, int32_t num_new_tokens,
                                    const PrefixHit& hit) {
  auto it = tables_.find(request.seq_id);
  const int32_t held = it == tables_.end() ? 0 : static_cast<int32_t>(it->second.blocks.size());
  assert(hit.block_ids.empty() || held == 0);
  const int32_t total = request.num_computed_tokens + hit.num_tokens + num_new_tokens;
  const int32_t needed = (total + block_size_ - 1) / block_size_;
  const int32_t num_new_blocks =
      std::max(0, needed - held - static_cast<int32_t>(hit.block_ids.size()));
  int32_t num_hit_free = 0;
  for (const int32_t id : hit.block_ids) num_hit_free += pool_.block(id).ref_cnt == 0 ? 1 : 0;
  if (num_new_blocks + num_hit_free > pool_.num_free_blocks()) return false;

  Table& table = it == tables_.end() ? tables_[request.seq_id] : it->second;
  for (const int32_t id : hit.block_ids) {
    pool_.touch(id);
    table.blocks.push_back(id);
  }
  table.num_registered = std::max(table.num_registered, static_cast<int32_t>(hit.block_ids.size()));
  [[maybe_unused]] const bool ok = pool_.allocate(num_new_blocks, table.blocks);
  assert(ok);
  // Only blocks whose tokens are all known (async scheduling computes over a placeholder).
  if (enable_prefix_caching_) {
    register_full_blocks(request, table, std::min(total, request.num_tokens()));
  }
  return true;
}

void KVCacheManager::register_full_blocks(Request& request, Table& table, int32_t num_tokens) {
  const int32_t num_full = num_tokens / block_size_;
  if (num_full <= table.num_registered) return;
  ensure_block_hashes(request, num_full);
  const auto tokens = std::span<const int32_t>(request.token_ids);
  for (int32_t i = table.num_registered; i < num_full; ++i) {
    const int32_t parent = i == 0 ? -1 : table.blocks[i - 1];
    pool_.register_cached(table.blocks[i], request.block_hashes[i],
                          tokens.subspan(i * block_size_, block_size_), parent, request.cache_salt);
  }
  table.num_registered = num_full;
}

void KVCacheManager::free(const Request& request) {
  const auto it = tables_.find(request.seq_id);
  if (it == tables_.end()) return;
  std::vector<int32_t>& blocks = it->second.blocks;
  std::reverse(blocks.begin(), blocks.end());
  pool_.release(blocks);
  tables_.erase(it);
}

const std::vector<int32_t>& KVCacheManager::block_table(int64_t seq_id) const {
  const auto it = tables_.find(seq_id);
  return it == tables_.end() ? kEmptyTable : it->second.blocks;
}

double KVCacheManager::usage() const {
  const int32_t total = pool_.num_blocks();
  return total == 0 ? 0.0 : 1.0 - static_cast<double>(pool_.num_free_blocks()) / total;
}

void KVCacheManager::record_prefix_query(int32_t num_query_tokens, int32_t num_hit_tokens) {
  prefix_query_tokens_ += num_query_tokens;
  prefix_hit_tokens_ += num_hit_tokens;
}

}  // namespace kestrel
