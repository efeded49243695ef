// Inverted index over sparse embeddings: build, search, save / load.
//
// Index file layout (version 3, little-endian), every section starting at a
// multiple of 64 bytes and zero-padded up to the next one:
//
//   header, 128 bytes:
//     0  char[8]  magic "SPEMBIDX"
//     8  uint32   format version (kIndexFormatVersion)
//    12  uint32   header size (128)
//    16  uint64   rows N
//    24  uint64   dims D
//    32  uint64   non-zeros NNZ
//    40  uint32   flags (bit 0: labels present, bit 1: row order present,
//                 bit 2: forward store present, int8 only)
//    44  uint32   log2 of the rows per segment block (16)
//    48  uint64   XXH64 of every byte after the header
//    56  uint32   rows per pruning block R (a power of two)
//    64  uint64   block-max entries E
//    72  uint32   values: 0 float32, 1 int8 (codes with a per-dimension scale)
//   120  uint64   XXH64 of header bytes [0, 120); the other bytes are zero
//   uint64  segments[D * B + 1]  B = max(1, ceil(N / 65536)) row blocks; the postings
//                                of dimension d in block b are
//                                [segments[d * B + b], segments[d * B + b + 1])
//   uint16  rows[NNZ]    position - 65536 * b, non-decreasing within a segment
//   float32 values[NNZ]  (int8: uint8 codes[NNZ], read as int8 in a signed dimension)
//   int32   labels[N]    only when flag bit 0 is set, by caller row id
//   uint32  order[N]     only when flag bit 1 is set: the caller id at each position
//   uint64  bm_offsets[D + 1]   the block-max entries of dimension d are
//                               [bm_offsets[d], bm_offsets[d + 1])
//   uint32  bm_block[E]  pruning block (positions [R b, R (b + 1))), increasing per dimension
//   float32 bm_max[E], bm_min[E]   the dimension's max / min over the block's rows (0 for
//                                  rows without it); int8: uint8 codes
//   uint32  bm_start[E]  the block's first posting, relative to the dimension's first;
//                        int8: uint16, relative to the dimension's first in the segment
//   int8 only:
//   float32 scales[D]    value = code * scale
//   uint8   signed[D]    1: int8 codes, 0: uint8 codes
//   uint64  fwd_offsets[N + 1]   only when flag bit 2 is set: the float32 entries of
//   uint32  fwd_dims[NNZ]        the row at position i are [fwd_offsets[i],
//   float32 fwd_values[NNZ]      fwd_offsets[i + 1]), dimensions increasing
//
// The postings of a dimension are contiguous (its segments follow each other),
// sorted by position. A posting costs 6 bytes (uint16 position within its
// block + float32 value), 3 with int8 values; the rest is 8 * D * B + 4 * N
// (labels) + 4 * N (order) + 8 * (D + 1) + 16 * E bytes (8 * E and 5 * D with
// int8 values, and 8 * (N + 1) + 8 * NNZ for the forward store). A float32
// index is laid out as in version 2, whose files (header byte 72 zero) still
// load, as do version 1 files (64-byte header, the hash at 56, no order and no
// block metadata).

#include "sparse_index.h"

#include <fcntl.h>
#include <sched.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <exception>
#include <mutex>
#include <thread>
#include <utility>

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "the index and .bin formats are little-endian; this build targets a big-endian machine"
#endif

// The score scan and the dense dot product also get an AVX2 clone, picked at
// load time (GNU ifunc), so the default build stays portable without
// -march=native. Both clones do the same float operations in the same order
// (no FMA contraction), so results do not depend on the CPU. ThreadSanitizer
// builds go without: their instrumented ifunc resolvers run before the
// sanitizer runtime is up and crash.
#if defined(__has_feature)
#if __has_feature(thread_sanitizer)
#define SPARSE_EMBED_TSAN 1
#endif
#endif
#if defined(__x86_64__) && defined(__linux__) && defined(__GLIBC__) && \
    !defined(__SANITIZE_THREAD__) && !defined(SPARSE_EMBED_TSAN) && \
    (defined(__clang__) || (defined(__GNUC__) && __GNUC__ >= 6))
#define SPARSE_EMBED_MULTIVERSION __attribute__((target_clones("avx2", "default")))
#else
#define SPARSE_EMBED_MULTIVERSION
#endif

namespace sparse_embed {
namespace {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

// Cores this process may run on (its affinity mask under taskset, cpusets
// or a container), which can be fewer than the machine has.
int64_t available_cores() {
#if defined(__linux__) && defined(CPU_COUNT)
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) == 0) return std::max(1, CPU_COUNT(&set));
#endif
  return std::max<int64_t>(1, std::thread::hardware_concurrency());
}

// Rows of one block. In the dense accumulation mode a block's 256 KiB of
// float scores stays in L2 while a query's postings for those rows are added
// into it and then scanned for the top-k, so the full score vector never goes
// through memory. Postings store a row as its uint16 offset in its block: 6
// bytes a posting instead of 8, and no search for where a block starts.
constexpr int kBlockBits = 16;
constexpr int64_t kBlockRows = int64_t{1} << kBlockBits;
// A query whose postings are fewer than rows / kSparseModeRatio accumulates
// into a full score vector and visits only the rows it touched. Tracking
// touched rows costs several random accesses per posting against about a
// quarter of one per row for the blocked scan of every row, so it pays only
// for queries far sparser than the database (measured crossover: about
// rows / 32 at 100k rows, lower at 1M).
constexpr int64_t kSparseModeRatio = 64;
// Pruned search: blocks scored first, before the others are filtered by the
// k-th score they reach (at least twice the blocks k rows fill).
constexpr int64_t kSeedBlocks = 8;
// Mode kAuto accumulates exhaustively when the query's block-max entries
// exceed its postings / kPruneEntryRatio, when they are not kPruneCoherence
// times fewer than rows in random order would give (blocks about as mixed as
// the whole database: few can be skipped), or when the seeds alone or the
// blocks left after them hold more than rows / kPruneRowRatio rows: bounding
// or scoring that much costs more than reading every posting once (a bound
// costs about a posting, and block scoring has a binary search per term and
// block). The seed test matters for small indexes: on 5,000 learned
// embeddings (40 blocks), bounding and scoring 8 seeds before falling back
// made auto 1.5-2.7x slower than exhaustive accumulation. Postings per entry
// alone do not tell the cases apart, since they grow with the block size:
// measured at 200k rows x 1024 dims, 32 nnz, identity groups of 10 whose
// images swap 10% of their dimensions have 4.7 postings per entry in blocks
// of 32 (pruning 4x faster than exhaustive) and 6.9 in blocks of 128 (1.8x
// slower), uniform rows 4.3 in blocks of 128 (slower). Rows in random order
// would give 1.6 postings per entry in blocks of 32 and 4.1 in blocks of 128,
// so the lists are 3.0, 1.7 and 1.1 times shorter than random, and those of
// identities that share their support (12 per entry, pruning 7x faster in
// blocks of 128) 2.9 times. With kPruneCoherence 2, auto prunes the first
// and the last case (0.044 ms/query against 0.182 exhaustive; 0.023 against
// 0.178) and falls back within 4% of exhaustive in the others.
constexpr int64_t kPruneEntryRatio = 2;
constexpr double kPruneCoherence = 2.0;
constexpr int64_t kPruneRowRatio = 8;
// Batched accumulation: a group's score buffers take at most
// kBatchScoreBytes together (half of a 2 MiB L2; budgets of 512 KiB and
// 2 MiB measured no faster at 200k rows), and a span (the rows a group
// accumulates at once) at least kMinBatchRows.
constexpr int64_t kBatchScoreBytes = int64_t{1} << 20;
constexpr int64_t kMinBatchRows = 1024;
// Row ids are uint32 (result ids, the touched-row list of the sparse mode).
constexpr int64_t kMaxRows = int64_t{1} << 32;
// Largest index read_bin accepts: the index allocates O(dim) segment bounds,
// so a flipped bit in a corrupted file must not turn into gigabytes.
constexpr int32_t kMaxBinIndex = (1 << 24) - 1;

constexpr char kMagic[8] = {'S', 'P', 'E', 'M', 'B', 'I', 'D', 'X'};
constexpr uint64_t kHeaderSize = 128;
constexpr uint64_t kHeaderSizeV1 = 64;
constexpr uint64_t kAlign = 64;
constexpr uint32_t kFlagLabels = 1;
constexpr uint32_t kFlagOrder = 2;
constexpr uint32_t kFlagForward = 4;
// Header field at byte 72 (version 3): how posting values are stored.
constexpr uint32_t kStoredFloat32 = 0;
constexpr uint32_t kStoredInt8 = 1;

uint64_t align_up(uint64_t n) { return (n + kAlign - 1) / kAlign * kAlign; }

// ---------------------------------------------------------------------------
// XXH64 (https://github.com/Cyan4973/xxHash/blob/dev/doc/xxhash_spec.md),
// streaming: the checksum of the index file is computed while it is written.

constexpr uint64_t kP1 = 0x9E3779B185EBCA87ULL;
constexpr uint64_t kP2 = 0xC2B2AE3D27D4EB4FULL;
constexpr uint64_t kP3 = 0x165667B19E3779F9ULL;
constexpr uint64_t kP4 = 0x85EBCA77C2B2AE63ULL;
constexpr uint64_t kP5 = 0x27D4EB2F165667C5ULL;

uint64_t rotl(uint64_t x, int r) { return (x << r) | (x >> (64 - r)); }
uint64_t read64(const uint8_t* p) {
  uint64_t v;
  std::memcpy(&v, p, 8);
  return v;
}
uint32_t read32(const uint8_t* p) {
  uint32_t v;
  std::memcpy(&v, p, 4);
  return v;
}
uint64_t xxh_round(uint64_t acc, uint64_t input) { return rotl(acc + input * kP2, 31) * kP1; }
uint64_t xxh_merge(uint64_t acc, uint64_t val) { return (acc ^ xxh_round(0, val)) * kP1 + kP4; }

class Xxh64 {
 public:
  Xxh64() : v_{kP1 + kP2, kP2, 0, 0 - kP1} {}

  void update(const void* data, size_t len) {
    const auto* p = static_cast<const uint8_t*>(data);
    total_ += len;
    if (buffered_ + len < 32) {
      std::memcpy(buffer_ + buffered_, p, len);
      buffered_ += len;
      return;
    }
    if (buffered_ > 0) {
      const size_t fill = 32 - buffered_;
      std::memcpy(buffer_ + buffered_, p, fill);
      stripe(buffer_);
      p += fill;
      len -= fill;
      buffered_ = 0;
    }
    for (; len >= 32; p += 32, len -= 32) stripe(p);
    std::memcpy(buffer_, p, len);
    buffered_ = len;
  }

  uint64_t digest() const {
    uint64_t h;
    if (total_ >= 32) {
      h = rotl(v_[0], 1) + rotl(v_[1], 7) + rotl(v_[2], 12) + rotl(v_[3], 18);
      for (uint64_t v : v_) h = xxh_merge(h, v);
    } else {
      h = kP5;
    }
    h += total_;
    const uint8_t* p = buffer_;
    const uint8_t* end = buffer_ + buffered_;
    for (; p + 8 <= end; p += 8) h = rotl(h ^ xxh_round(0, read64(p)), 27) * kP1 + kP4;
    if (p + 4 <= end) {
      h = rotl(h ^ (uint64_t{read32(p)} * kP1), 23) * kP2 + kP3;
      p += 4;
    }
    for (; p < end; ++p) h = rotl(h ^ (uint64_t{*p} * kP5), 11) * kP1;
    h ^= h >> 33;
    h *= kP2;
    h ^= h >> 29;
    h *= kP3;
    h ^= h >> 32;
    return h;
  }

 private:
  void stripe(const uint8_t* p) {
    for (int i = 0; i < 4; ++i) v_[i] = xxh_round(v_[i], read64(p + 8 * i));
  }

  uint64_t v_[4];
  uint8_t buffer_[32] = {};
  size_t buffered_ = 0;
  uint64_t total_ = 0;
};

uint64_t xxh64(const void* data, size_t len) {
  Xxh64 h;
  h.update(data, len);
  return h.digest();
}

// ---------------------------------------------------------------------------
// Row sources for the build and the search: each calls f(dim, value) for the
// non-zero entries of row i.

struct DenseRows {
  DenseView x;
  float zero_threshold;
  int64_t size() const { return x.rows; }
  template <typename F>
  void for_each(int64_t i, F&& f) const {
    const float* row = x.data + i * x.cols;
    for (int64_t j = 0; j < x.cols; ++j) {
      if (std::fabs(row[j]) > zero_threshold) f(j, row[j]);
    }
  }
};

struct CsrRows {
  CsrView x;
  int64_t size() const { return x.rows; }
  template <typename F>
  void for_each(int64_t i, F&& f) const {
    for (int64_t p = x.indptr[i]; p < x.indptr[i + 1]; ++p) {
      if (x.values[p] != 0.0f) f(x.indices[p], x.values[p]);
    }
  }
};

void check_dense(const DenseView& x, const char* what) {
  if (x.rows < 0 || x.cols < 0 || (x.data == nullptr && x.rows * x.cols > 0)) {
    throw std::invalid_argument(std::string(what) + ": invalid dense matrix");
  }
  const int64_t n = x.rows * x.cols;
  for (int64_t i = 0; i < n; ++i) {
    if (!std::isfinite(x.data[i])) {
      throw std::invalid_argument(std::string(what) + " must be finite; row " +
                                  std::to_string(i / x.cols) + " column " +
                                  std::to_string(i % x.cols) + " is " + std::to_string(x.data[i]));
    }
  }
}

void check_csr(const CsrView& x, int64_t dim, const char* what) {
  if (x.rows < 0 || (x.rows > 0 && x.indptr == nullptr)) {
    throw std::invalid_argument(std::string(what) + ": invalid CSR matrix");
  }
  if (x.rows == 0) return;
  if (x.indptr[0] < 0) {
    throw std::invalid_argument(std::string(what) + ": indptr[0] must be >= 0");
  }
  for (int64_t i = 0; i < x.rows; ++i) {
    if (x.indptr[i + 1] < x.indptr[i]) {
      throw std::invalid_argument(std::string(what) + ": indptr must be non-decreasing (row " +
                                  std::to_string(i) + ")");
    }
    for (int64_t p = x.indptr[i]; p < x.indptr[i + 1]; ++p) {
      if (x.indices[p] < 0 || x.indices[p] >= dim) {
        throw std::invalid_argument(std::string(what) + ": index " + std::to_string(x.indices[p]) +
                                    " in row " + std::to_string(i) + " is outside [0, " +
                                    std::to_string(dim) + ")");
      }
      if (!std::isfinite(x.values[p])) {
        throw std::invalid_argument(std::string(what) + " must be finite; row " +
                                    std::to_string(i) + " has " + std::to_string(x.values[p]));
      }
    }
  }
}

// ---------------------------------------------------------------------------
// Top-k selection.

struct Candidate {
  float score;
  uint32_t row;
};

// Higher score first; among equal scores the lower row id.
bool better(const Candidate& a, const Candidate& b) {
  return a.score > b.score || (a.score == b.score && a.row < b.row);
}

// The best `capacity` candidates pushed so far, in a heap whose front is the
// worst of them.
class TopK {
 public:
  void reset(int64_t capacity) {
    capacity_ = static_cast<size_t>(capacity);
    heap_.clear();
    heap_.reserve(capacity_);
  }
  size_t capacity() const { return capacity_; }
  bool full() const { return heap_.size() >= capacity_; }
  // What a row must score strictly above to enter. Visited in increasing id
  // order, ties with the worst kept row lose to its lower id; visited in any
  // other order (`any_order`), a tie may still enter by a lower id.
  float cut(float threshold, bool any_order = false) const {
    if (!full()) return threshold;
    const float worst = heap_.front().score;
    return any_order ? std::nextafter(worst, -std::numeric_limits<float>::infinity()) : worst;
  }
  // The worst kept score (valid when full()).
  float worst() const { return heap_.front().score; }

  void push(Candidate c) {
    if (heap_.size() < capacity_) {
      heap_.push_back(c);
      std::push_heap(heap_.begin(), heap_.end(), better);
    } else if (better(c, heap_.front())) {
      std::pop_heap(heap_.begin(), heap_.end(), better);
      heap_.back() = c;
      std::push_heap(heap_.begin(), heap_.end(), better);
    }
  }

  // Moves the kept candidates, best first, into `out`; leaves this empty.
  void take_sorted(std::vector<Candidate>& out) {
    std::sort_heap(heap_.begin(), heap_.end(), better);
    out.assign(heap_.begin(), heap_.end());
    heap_.clear();
  }

 private:
  size_t capacity_ = 0;
  std::vector<Candidate> heap_;
};

// Pushes the rows of a score block whose score is above `threshold` into
// `top`; row base + i is caller row order[base + i] (base + i when `order` is
// null). `any_order`: the rows pushed so far may have higher ids than these
// (otherwise rows come in increasing id order). Returns how many of them have
// a non-zero score above `threshold`.
SPARSE_EMBED_MULTIVERSION
int64_t scan_block(const float* s, int64_t n, int64_t base, float threshold, TopK& top,
                   const uint32_t* order, bool any_order) {
  constexpr int64_t kChunk = 32;
  auto id = [&](int64_t i) {
    return order != nullptr ? order[base + i] : static_cast<uint32_t>(base + i);
  };
  int64_t candidates = 0;
  float cut = top.cut(threshold, any_order);
  int64_t i = 0;
  // The branch-free chunk test vectorises; rows rarely beat the cut once the
  // heap is full, so the per-row path runs for few chunks.
  for (; i + kChunk <= n; i += kChunk) {
    int any = 0;
    int count = 0;
    for (int64_t j = 0; j < kChunk; ++j) {
      const float x = s[i + j];
      any |= x > cut;
      count += (x != 0.0f) & (x > threshold);
    }
    candidates += count;
    if (!any) continue;
    for (int64_t j = 0; j < kChunk; ++j) {
      if (s[i + j] > cut) {
        top.push({s[i + j], id(i + j)});
        cut = top.cut(threshold, any_order);
      }
    }
  }
  for (; i < n; ++i) {
    const float x = s[i];
    candidates += (x != 0.0f) & (x > threshold);
    if (x > cut) {
      top.push({x, id(i)});
      cut = top.cut(threshold, any_order);
    }
  }
  return candidates;
}

// Exact re-scoring of an int8 index: a row can still be in the exact top-k
// while its quantized score reaches the k-th quantized score less `widen`
// and the threshold less `lower` (see SparseIndex::search_impl). Such rows
// are collected in `rows` (caller ids and quantized scores), best or not.
struct Pool {
  std::vector<Candidate> rows;
  double widen = 0.0;
  double lower = 0.0;
  // What a quantized score must reach to join, rounded down to float32 (a
  // larger pool is only slower, never wrong).
  float cut(const TopK& top, float threshold) const {
    double c = static_cast<double>(threshold) - lower;
    if (top.full()) c = std::max(c, static_cast<double>(top.worst()) - widen);
    const float f = static_cast<float>(c);
    return static_cast<double>(f) <= c ? f : std::nextafter(f, -std::numeric_limits<float>::infinity());
  }
};

// scan_block, and rows reaching pool.cut() join the pool.
SPARSE_EMBED_MULTIVERSION
int64_t scan_block_pool(const float* s, int64_t n, int64_t base, float threshold, TopK& top,
                        const uint32_t* order, bool any_order, Pool& pool) {
  constexpr int64_t kChunk = 32;
  auto id = [&](int64_t i) {
    return order != nullptr ? order[base + i] : static_cast<uint32_t>(base + i);
  };
  int64_t candidates = 0;
  float cut = top.cut(threshold, any_order);
  float joins = pool.cut(top, threshold);
  for (int64_t i = 0; i < n; i += kChunk) {
    const int64_t end = std::min(n, i + kChunk);
    int any = 0;
    int count = 0;
    for (int64_t j = i; j < end; ++j) {
      any |= s[j] >= joins;
      count += (s[j] != 0.0f) & (s[j] > threshold);
    }
    candidates += count;
    if (!any) continue;
    for (int64_t j = i; j < end; ++j) {
      if (s[j] < joins) continue;
      pool.rows.push_back({s[j], id(j)});
      if (s[j] > cut) {
        top.push({s[j], id(j)});
        cut = top.cut(threshold, any_order);
        joins = pool.cut(top, threshold);
      }
    }
  }
  return candidates;
}

// Inner product with eight independent lanes: vectorisable without
// -ffast-math, and the summation order (hence the result) is fixed.
SPARSE_EMBED_MULTIVERSION
float dot(const float* a, const float* b, int64_t n) {
  float lane[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    for (int j = 0; j < 8; ++j) lane[j] += a[i + j] * b[i + j];
  }
  float sum = ((lane[0] + lane[1]) + (lane[2] + lane[3])) + ((lane[4] + lane[5]) + (lane[6] + lane[7]));
  for (; i < n; ++i) sum += a[i] * b[i];
  return sum;
}

// A query dimension: its weight and the [blocks + 1] bounds of its segments.
// On an int8 index `table` holds weight * (the dequantized value of code c)
// for the 256 codes: a posting then costs a lookup instead of a multiply, and
// adds exactly the product a float32 index of the dequantized values adds.
struct Term {
  const uint64_t* segments;
  float weight;
  int64_t dim;
  const float* table = nullptr;
};

// The postings of one query dimension in one row block: float32 values, or
// codes and their term's table.
struct Segment {
  const uint16_t* rows;
  const float* values;
  const uint8_t* codes;
  const float* table;
  int64_t size;
  float weight;
};

// Postings read ahead of the scatter loops. A block visits 64 short posting
// streams (row ids and values of 32 terms), more than hardware prefetchers
// follow, so without this every stream stalls on cache misses (measured:
// about a fifth of the query time at 1M rows).
constexpr int64_t kPrefetchPostings = 128;

// Prefetches base[offset] if it lies before `end`, the end of base's array.
template <typename T>
void prefetch(const T* base, int64_t offset, const T* end) {
  if (offset < end - base) __builtin_prefetch(base + offset);
}

// buf[row] += weight * value over postings [from, size) of one segment.
// Prefetching runs past the segment into the dimension's next block.
void scatter(float* buf, const Segment& a, int64_t from, const uint16_t* rows_end,
             const float* values_end) {
  int64_t i = from;
  for (; i + 16 <= a.size; i += 16) {
    prefetch(a.rows, i + kPrefetchPostings, rows_end);
    prefetch(a.values, i + kPrefetchPostings, values_end);
    for (int64_t u = i; u < i + 16; ++u) buf[a.rows[u]] += a.weight * a.values[u];
  }
  for (; i < a.size; ++i) buf[a.rows[i]] += a.weight * a.values[i];
}

// The same over codes: buf[row] += table[code].
void scatter_codes(float* buf, const Segment& a, const uint16_t* rows_end,
                   const uint8_t* codes_end) {
  int64_t i = 0;
  for (; i + 16 <= a.size; i += 16) {
    prefetch(a.rows, i + kPrefetchPostings, rows_end);
    prefetch(a.codes, i + kPrefetchPostings, codes_end);
    for (int64_t u = i; u < i + 16; ++u) buf[a.rows[u]] += a.table[a.codes[u]];
  }
  for (; i < a.size; ++i) buf[a.rows[i]] += a.table[a.codes[i]];
}

// Codes per dimension: the size of a term's product table.
constexpr int64_t kCodes = 256;

// The integer level of every code, read as uint8 ([0]) and as int8 ([1]).
struct CodeLevels {
  float level[2][kCodes];
  CodeLevels() {
    for (int c = 0; c < kCodes; ++c) {
      level[0][c] = static_cast<float>(c);
      level[1][c] = static_cast<float>(static_cast<int8_t>(c));
    }
  }
};
const CodeLevels kCodeLevels;

// table[c] = weight * (level[c] * scale): the product of the weight and the
// dequantized value, rounded as SparseIndex::dequantize rounds it. A branch-
// free loop, vectorised (measured on identity groups at 200k rows, mode auto,
// 2 threads: 0.042 ms/query building the tables code by code, 0.026 so).
SPARSE_EMBED_MULTIVERSION
void fill_table(float* table, const float* level, float scale, float weight) {
  for (int64_t c = 0; c < kCodes; ++c) table[c] = weight * (level[c] * scale);
}

// A query dimension of a group of queries answered together: the query's
// slot in the group, its weight, and the dimension's segment bounds.
struct GroupTerm {
  int64_t dim;
  uint32_t slot;
  float weight;
  const uint64_t* segments;
  const float* table;  // int8 index: the term's products (Term::table)
};

// A posting's product with a term's weight: of its float32 value, or, on an
// int8 index, of its code, looked up in the term's table (Term).
inline float term_product(float weight, const float*, float value) { return weight * value; }
inline float term_product(float, const float* table, uint8_t code) { return table[code]; }

// A dimension of a group's union: its postings not yet scattered in the
// current segment block, [cursor, end), and the group terms that hold it,
// [first, last) of the group's term list.
struct GroupDim {
  const uint64_t* segments;
  uint64_t cursor;
  uint64_t end;
  uint32_t first;
  uint32_t last;
};

// buf[slot * stride + row - lo] += weight * value for postings [begin, end)
// of one dimension and each group term [first, last) that holds it: a
// posting is loaded once for every query of the group. Value is the posting
// value array's type: float32 values, or the uint8 codes of an int8 index
// (term_product). Each query still adds its terms one dimension after the
// other, in its own order, so its float32 sums equal the one-query path's.
// The scores of a group are one buffer per query: interleaving them, so that
// one posting's adds for the whole group share a cache line, measured about
// 1.4x slower on uniform rows, where most dimensions belong to one query of
// the group and every add then touches its own line.
template <typename Value>
void scatter_group(float* __restrict buf, int64_t stride, int64_t lo, const uint16_t* rows,
                   const Value* values, uint64_t begin, uint64_t end, const GroupTerm* first,
                   const GroupTerm* last, const uint16_t* rows_end, const Value* values_end) {
  const int64_t m = last - first;
  if (m == 1) {
    float* __restrict b = buf + int64_t{first->slot} * stride;
    const float w = first->weight;
    const float* table = first->table;
    uint64_t p = begin;
    for (; p + 16 <= end; p += 16) {
      prefetch(rows, static_cast<int64_t>(p) + kPrefetchPostings, rows_end);
      prefetch(values, static_cast<int64_t>(p) + kPrefetchPostings, values_end);
      for (uint64_t u = p; u < p + 16; ++u) b[rows[u] - lo] += term_product(w, table, values[u]);
    }
    for (; p < end; ++p) b[rows[p] - lo] += term_product(w, table, values[p]);
    return;
  }
  // Buffers and weights in locals: stores into the scores cannot alias them.
  float* target[kMaxBatch];
  float weight[kMaxBatch];
  const float* table[kMaxBatch];
  for (int64_t j = 0; j < m; ++j) {
    target[j] = buf + int64_t{first[j].slot} * stride;
    weight[j] = first[j].weight;
    table[j] = first[j].table;
  }
  for (uint64_t p = begin; p < end; ++p) {
    if ((p & 15) == 0) {
      prefetch(rows, static_cast<int64_t>(p) + kPrefetchPostings, rows_end);
      prefetch(values, static_cast<int64_t>(p) + kPrefetchPostings, values_end);
    }
    const int64_t r = int64_t{rows[p]} - lo;
    const Value v = values[p];
    for (int64_t j = 0; j < m; ++j) target[j][r] += term_product(weight[j], table[j], v);
  }
}

// One query of a thread's group: its terms, top-k, exact re-scoring pool and counters.
struct Slot {
  int64_t query = 0;
  std::vector<Term> terms;
  std::vector<float> tables;  // int8 index: kCodes products per term
  // Terms in strictly increasing dimension: the order a group accumulates in.
  bool increasing = true;
  TopK top;
  int64_t postings = 0;
  int64_t entries = 0;
  // Block-max entries the terms would have if the rows were in random order.
  double random_entries = 0.0;
  int64_t candidates = 0;
  int64_t blocks = 0;
  int64_t scored = 0;
  uint8_t certified = 0;
  double seconds = 0.0;
  Pool pool;  // exact re-scoring: rows that may be in the exact top-k
};

// Per-thread scratch memory, reused across the thread's queries.
struct Workspace {
  std::vector<Slot> slots;
  std::vector<float> row;        // re-scoring: one float row over every dimension
  std::vector<uint32_t> positions;  // re-scoring: the candidates' positions
  std::vector<float> block;      // dense mode: one block of scores
  std::vector<float> scores;     // sparse mode: every row, zero between queries
  std::vector<uint8_t> seen;     // sparse mode: row touched by the current query
  std::vector<uint32_t> touched; // sparse mode: rows touched, in first-touch order
  TopK second;
  std::vector<Candidate> ranked;
  std::vector<float> bounds;     // pruned mode: upper bound of every row block
  std::vector<std::pair<double, uint32_t>> order;  // pruned mode: the seed blocks
  std::vector<std::pair<double, uint32_t>> rest;   // pruned mode: the other blocks that can enter
  std::vector<Slot*> group;         // batched mode: the slots accumulated together
  std::vector<GroupTerm> group_terms;  // batched mode: by dimension, then slot
  std::vector<GroupDim> group_dims;    // batched mode: the group's distinct dimensions
  std::vector<float> group_scores;     // batched mode: [group, span] scores
};

void write_all(std::FILE* f, const void* data, size_t len, Xxh64* hash, const std::string& path) {
  if (len == 0) return;
  if (std::fwrite(data, 1, len, f) != len) {
    throw FormatError("cannot write " + path + ": " + std::strerror(errno));
  }
  if (hash != nullptr) hash->update(data, len);
}

void write_padding(std::FILE* f, uint64_t written, Xxh64* hash, const std::string& path) {
  static const uint8_t zeros[kAlign] = {};
  write_all(f, zeros, align_up(written) - written, hash, path);
}

}  // namespace

// ---------------------------------------------------------------------------
// Search modes.

namespace {
constexpr std::pair<SearchMode, const char*> kModeNames[] = {
    {SearchMode::kExhaustive, "exhaustive"},
    {SearchMode::kPruned, "pruned"},
    {SearchMode::kApprox, "approx"},
    {SearchMode::kAuto, "auto"},
};
}  // namespace

SearchMode parse_search_mode(const std::string& name) {
  std::string valid;
  for (const auto& [mode, mode_name] : kModeNames) {
    if (name == mode_name) return mode;
    valid += (valid.empty() ? "" : ", ") + std::string(mode_name);
  }
  throw std::invalid_argument("unknown search mode '" + name + "'; valid modes: " + valid);
}

const char* search_mode_name(SearchMode mode) {
  for (const auto& [m, name] : kModeNames) {
    if (m == mode) return name;
  }
  return "unknown";
}

namespace {
constexpr std::pair<ValueType, const char*> kValueTypeNames[] = {
    {ValueType::kFloat32, "float32"},
    {ValueType::kInt8, "int8"},
};
}  // namespace

ValueType parse_value_type(const std::string& name) {
  std::string valid;
  for (const auto& [type, type_name] : kValueTypeNames) {
    if (name == type_name) return type;
    valid += (valid.empty() ? "" : ", ") + std::string(type_name);
  }
  throw std::invalid_argument("unknown value type '" + name + "'; valid types: " + valid);
}

const char* value_type_name(ValueType type) {
  for (const auto& [t, name] : kValueTypeNames) {
    if (t == type) return name;
  }
  return "unknown";
}

// ---------------------------------------------------------------------------
// Storage: owned vectors (built in memory) or a read-only file mapping.

struct SparseIndex::Storage {
  std::vector<uint64_t> segments;
  std::vector<uint16_t> rows;
  std::vector<float> values;
  std::vector<int32_t> labels;
  std::vector<uint32_t> order;
  std::vector<uint32_t> position;
  std::vector<uint64_t> bm_offsets;
  std::vector<uint32_t> bm_block;
  std::vector<float> bm_max;
  std::vector<float> bm_min;
  std::vector<uint32_t> bm_start;
  std::vector<float> dim_absmax;
  std::vector<uint8_t> codes;
  std::vector<float> scales;
  std::vector<uint8_t> is_signed;
  std::vector<uint8_t> bm_max_code;
  std::vector<uint8_t> bm_min_code;
  std::vector<uint16_t> bm_start16;
  std::vector<uint64_t> fwd_offsets;
  std::vector<uint32_t> fwd_dims;
  std::vector<float> fwd_values;
  void* map = nullptr;
  size_t map_size = 0;

  Storage() = default;
  Storage(const Storage&) = delete;
  Storage& operator=(const Storage&) = delete;
  ~Storage() {
    if (map != nullptr) munmap(map, map_size);
  }
};

CsrView CsrMatrix::view(int64_t begin, int64_t end) const {
  CsrView v;
  v.indptr = indptr.data() + begin;
  v.indices = indices.data();
  v.values = values.data();
  v.rows = end - begin;
  return v;
}

namespace {

// Rows of `rows` in the order `order` (position -> caller row).
template <typename Rows>
struct OrderedRows {
  const Rows& rows;
  const uint32_t* order;
  int64_t size() const { return rows.size(); }
  template <typename F>
  void for_each(int64_t i, F&& f) const {
    rows.for_each(order[i], f);
  }
};

// MinHash values of a row's support that lead its sort key.
constexpr int kOrderHashes = 3;

// Hash function j of a dimension (splitmix64's finaliser over the dimension
// and the function's number): j < kOrderHashes for the MinHash signature,
// j = kOrderHashes for the support hash.
uint32_t dim_hash(int64_t d, int j) {
  uint64_t x = static_cast<uint64_t>(d) * 0x9E3779B97F4A7C15ULL + static_cast<uint64_t>(j + 1) * kP2;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ULL;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBULL;
  return static_cast<uint32_t>((x ^ (x >> 31)) >> 32);
}

// A row's sort key: the MinHash signature of its support (kOrderHashes
// minima of independent dimension hashes), then a hash of the whole support.
using OrderKey = std::array<uint32_t, kOrderHashes + 1>;

template <typename Rows>
std::vector<OrderKey> order_keys(const Rows& rows) {
  const int64_t n = rows.size();
  std::vector<OrderKey> keys(n);
  for (int64_t i = 0; i < n; ++i) {
    OrderKey key;
    key.fill(std::numeric_limits<uint32_t>::max());  // empty rows go last
    uint32_t support = 0;
    rows.for_each(i, [&](int64_t d, float) {
      for (int j = 0; j < kOrderHashes; ++j) key[j] = std::min(key[j], dim_hash(d, j));
      support += dim_hash(d, kOrderHashes);  // order-free: a sum mod 2^32
    });
    key[kOrderHashes] = support;
    keys[i] = key;
  }
  return keys;
}

// Rows sorted by their order key, then by caller id. Two rows share a
// signature entry with probability equal to the Jaccard similarity of their
// supports, so rows with overlapping supports tend to be close and rows of
// one support are consecutive, whatever their values; the support hash keeps
// two supports that share a signature from interleaving. This is the order
// of query batches; the index orders its rows by clustered_order. O(nnz +
// N log N).
template <typename Rows>
std::vector<uint32_t> similarity_order(const Rows& rows) {
  const std::vector<OrderKey> keys = order_keys(rows);
  const int64_t n = rows.size();
  std::vector<uint32_t> order(n);
  for (int64_t i = 0; i < n; ++i) order[i] = static_cast<uint32_t>(i);
  std::sort(order.begin(), order.end(), [&](uint32_t a, uint32_t b) {
    return keys[a] < keys[b] || (keys[a] == keys[b] && a < b);
  });
  return order;
}

// Clustering of the build order: kBands bands of kBandHashes MinHash values.
// Rows that agree on every value of some band are joined (union-find). A
// pair of Jaccard similarity J agrees on a band with probability J^r (r =
// kBandHashes): two images of an identity that each replace 10% of its 32
// dimensions (J ~ 0.69) agree on one of 16 bands of 6 with probability ~0.9,
// while the chance agreements of unrelated rows, dominated by the few pairs
// that overlap on 4-6 of 32 dimensions, stay below one per 20 rows at 1M
// rows. Measured at 1M rows of such identities (blocks of 32): bands of 5
// chained unrelated clusters (21 blocks scored per query), bands of 6 (12 or
// 16 bands) scored 12 and 8.
constexpr int kBands = 16;
constexpr int kBandHashes = 6;
constexpr int kSignature = kBands * kBandHashes;
constexpr int kLanes = 8;
static_assert(kSignature % kLanes == 0, "the signature is taken kLanes minima at a time");
// A cluster takes no more rows than this: a run of chance agreements cannot
// chain the whole index into one cluster.
constexpr int64_t kMaxClusterRows = 1024;
// Dimension hashes are tabulated for indexes of at most this many
// dimensions (kSignature int16 each), computed per posting otherwise.
constexpr int64_t kTableDims = int64_t{1} << 16;

// Signature hash j of a dimension, as int16: minima of 16-bit values are
// taken 8 at a time by SSE2. Two different dimensions tie with probability
// 2^-16, far below the Jaccard similarity of unrelated rows.
int16_t signature_hash(int64_t d, int j) {
  return static_cast<int16_t>(dim_hash(d, kOrderHashes + 1 + j) >> 16);
}

// Sorts `v` by its high 32 bits, keeping the order of equal ones (LSD radix
// sort, 8 bits a pass): O(n), where std::sort of 1M values took ~90 ms.
void sort_by_high_word(std::vector<uint64_t>& v, std::vector<uint64_t>& tmp) {
  tmp.resize(v.size());
  for (int shift = 32; shift < 64; shift += 8) {
    std::array<size_t, 257> start{};
    for (uint64_t x : v) ++start[((x >> shift) & 255) + 1];
    for (int b = 0; b < 256; ++b) start[b + 1] += start[b];
    for (uint64_t x : v) tmp[start[(x >> shift) & 255]++] = x;
    v.swap(tmp);
  }
}

// Union-find over rows, by size, capped at kMaxClusterRows.
class Clusters {
 public:
  explicit Clusters(int64_t n) : parent_(n), size_(n, 1) {
    for (int64_t i = 0; i < n; ++i) parent_[i] = static_cast<uint32_t>(i);
  }
  uint32_t find(uint32_t i) {
    while (parent_[i] != i) i = parent_[i] = parent_[parent_[i]];
    return i;
  }
  void join(uint32_t a, uint32_t b) {
    a = find(a);
    b = find(b);
    if (a == b || size_[a] + size_[b] > kMaxClusterRows) return;
    if (size_[a] < size_[b] || (size_[a] == size_[b] && b < a)) std::swap(a, b);
    parent_[b] = a;
    size_[a] += size_[b];
  }

 private:
  std::vector<uint32_t> parent_;
  std::vector<uint32_t> size_;
};

// Row order that keeps near-duplicates together when their supports differ
// (the images of one identity, each with a few dimensions of its own): rows
// clustered by MinHash bands, clusters sorted by their first row in
// similarity_order, rows within a cluster as there. Rows of one support
// share every band, so they stay consecutive as in similarity_order.
// Measured on identity groups of 10 whose images replace 10% of the
// identity's dimensions (200k rows, blocks of 32): pruning scores 2 blocks a
// query in this order and 41 in similarity_order (0.055 against 0.32
// ms/query), as few as with rows sorted by their true identity. Bands are
// found by an O(n) radix sort each; the whole order costs O(nnz * kSignature
// / kLanes + kBands * n).
template <typename Rows>
std::vector<uint32_t> clustered_order(const Rows& rows, int64_t dim) {
  const int64_t n = rows.size();
  std::vector<uint32_t> order = similarity_order(rows);
  std::vector<int16_t> table;
  if (dim <= kTableDims) {
    table.resize(static_cast<size_t>(dim) * kSignature);
    for (int64_t d = 0; d < dim; ++d) {
      for (int j = 0; j < kSignature; ++j) table[d * kSignature + j] = signature_hash(d, j);
    }
  }
  // bands[b * n + i]: row i's hash of band b (0: an empty row, in no band).
  std::vector<uint32_t> bands(static_cast<size_t>(n) * kBands);
  std::vector<int64_t> dims;
  std::array<int16_t, kSignature> computed;
  for (int64_t i = 0; i < n; ++i) {
    dims.clear();
    rows.for_each(i, [&](int64_t d, float) { dims.push_back(d); });
    const bool empty = dims.empty();
    // Minima in kLanes-wide groups the compiler keeps in vector registers
    // (a loop over the whole signature kept it in memory: 3-4x slower).
    int16_t sig[kSignature / kLanes][kLanes];
    for (auto& group : sig) std::fill(group, group + kLanes, std::numeric_limits<int16_t>::max());
    for (const int64_t d : dims) {
      const int16_t* h = computed.data();
      if (table.empty()) {
        for (int j = 0; j < kSignature; ++j) computed[j] = signature_hash(d, j);
      } else {
        h = table.data() + d * kSignature;
      }
      for (int g = 0; g < kSignature / kLanes; ++g) {
        for (int l = 0; l < kLanes; ++l) {
          const int16_t x = h[g * kLanes + l];
          sig[g][l] = x < sig[g][l] ? x : sig[g][l];
        }
      }
    }
    for (int b = 0; b < kBands; ++b) {
      uint64_t h = kP5 + static_cast<uint64_t>(b);
      for (int j = 0; j < kBandHashes; ++j) {
        const int j_all = b * kBandHashes + j;
        h = xxh_round(h, static_cast<uint16_t>(sig[j_all / kLanes][j_all % kLanes]));
      }
      bands[b * n + i] = empty ? 0 : static_cast<uint32_t>(h >> 32) | 1;
    }
  }
  Clusters clusters(n);
  std::vector<uint64_t> run(n);
  std::vector<uint64_t> tmp;
  for (int b = 0; b < kBands; ++b) {
    for (int64_t i = 0; i < n; ++i) run[i] = uint64_t{bands[b * n + i]} << 32 | static_cast<uint64_t>(i);
    sort_by_high_word(run, tmp);
    for (int64_t i = 1; i < n; ++i) {
      const uint32_t h = static_cast<uint32_t>(run[i] >> 32);
      if (h != 0 && h == static_cast<uint32_t>(run[i - 1] >> 32)) {
        clusters.join(static_cast<uint32_t>(run[i - 1]), static_cast<uint32_t>(run[i]));
      }
    }
  }
  // A cluster's place: the first position of its rows in `order`.
  std::vector<uint32_t> first(n, std::numeric_limits<uint32_t>::max());
  for (int64_t p = 0; p < n; ++p) {
    uint32_t& f = first[clusters.find(order[p])];
    if (f > p) f = static_cast<uint32_t>(p);
  }
  for (int64_t p = 0; p < n; ++p) {
    run[p] = uint64_t{first[clusters.find(order[p])]} << 32 | static_cast<uint64_t>(p);
  }
  sort_by_high_word(run, tmp);
  std::vector<uint32_t> clustered(n);
  for (int64_t p = 0; p < n; ++p) clustered[p] = order[static_cast<uint32_t>(run[p])];
  return clustered;
}

void check_block_rows(int64_t block_rows) {
  if (block_rows < kMinBlockRows || block_rows > kBlockRows || (block_rows & (block_rows - 1)) != 0) {
    throw std::invalid_argument("block_rows must be a power of two in [" +
                                std::to_string(kMinBlockRows) + ", " + std::to_string(kBlockRows) +
                                "], got " + std::to_string(block_rows));
  }
}

}  // namespace

template <typename Rows>
SparseIndex SparseIndex::build(const Rows& rows, int64_t dim, const int32_t* labels,
                               const BuildOptions& options) {
  const auto start = Clock::now();
  const int64_t n = rows.size();
  if (dim < 1 || dim > std::numeric_limits<int32_t>::max()) {
    throw std::invalid_argument("dim must be in [1, 2^31), got " + std::to_string(dim));
  }
  if (n >= kMaxRows) {
    throw std::invalid_argument("an index holds fewer than 2^32 rows; split the database into "
                                "shards (got " + std::to_string(n) + " rows)");
  }
  check_block_rows(options.block_rows);
  if (options.keep_float && options.values != ValueType::kInt8) {
    throw std::invalid_argument("keep_float applies to int8 values only (a float32 index holds "
                                "the float values already)");
  }
  if (!options.reorder) {
    SparseIndex index = build_postings(rows, dim, labels, {});
    index.finish_build(options, start);
    return index;
  }
  std::vector<uint32_t> order = clustered_order(rows, dim);
  const OrderedRows<Rows> ordered{rows, order.data()};  // before `order` moves into the index
  SparseIndex index = build_postings(ordered, dim, labels, std::move(order));
  index.finish_build(options, start);
  return index;
}

// Two passes over the rows: count the postings of every (dimension, block)
// segment, then place each entry at its segment's cursor. O(rows + nnz +
// segments), and the rows of a segment come out increasing. `labels` are by
// caller row id; `order` (empty: identity) maps positions to caller ids.
template <typename Rows>
SparseIndex SparseIndex::build_postings(const Rows& rows, int64_t dim, const int32_t* labels,
                                        std::vector<uint32_t> order) {
  const int64_t n = rows.size();
  const int64_t blocks = std::max<int64_t>(1, (n + kBlockRows - 1) / kBlockRows);
  const int64_t keys = dim * blocks;  // < 2^31 * 2^16: no overflow
  auto storage = std::make_shared<Storage>();
  storage->segments.assign(static_cast<size_t>(keys) + 1, 0);
  uint64_t* segments = storage->segments.data();
  for (int64_t i = 0; i < n; ++i) {
    const int64_t block = i >> kBlockBits;
    rows.for_each(i, [&](int64_t d, float) { ++segments[d * blocks + block + 1]; });
  }
  for (int64_t key = 0; key < keys; ++key) segments[key + 1] += segments[key];
  const uint64_t nnz = segments[keys];
  storage->rows.resize(nnz);
  storage->values.resize(nnz);
  std::vector<uint64_t> cursor(segments, segments + keys);
  uint16_t* post_rows = storage->rows.data();
  float* post_values = storage->values.data();
  for (int64_t i = 0; i < n; ++i) {
    const int64_t block = i >> kBlockBits;
    const auto local = static_cast<uint16_t>(i & (kBlockRows - 1));
    rows.for_each(i, [&](int64_t d, float v) {
      const uint64_t p = cursor[d * blocks + block]++;
      post_rows[p] = local;
      post_values[p] = v;
    });
  }
  if (labels != nullptr) storage->labels.assign(labels, labels + n);
  storage->order = std::move(order);

  SparseIndex index;
  index.rows_ = n;
  index.dim_ = dim;
  index.nnz_ = static_cast<int64_t>(nnz);
  index.blocks_ = blocks;
  index.segments_ = storage->segments.data();
  index.post_rows_ = storage->rows.data();
  index.post_values_ = storage->values.data();
  index.labels_ = labels != nullptr ? storage->labels.data() : nullptr;
  index.order_ = storage->order.empty() ? nullptr : storage->order.data();
  index.storage_ = std::move(storage);
  return index;
}

void SparseIndex::finish_build(const BuildOptions& options, Clock::time_point start) {
  // The storage was made by build_postings and is not shared yet.
  auto& storage = const_cast<Storage&>(*storage_);
  if (options.values == ValueType::kInt8) quantize(storage, options.keep_float);
  compute_blocks(storage, options.block_rows);
  finish_derived(storage);
  build_seconds_ = seconds_since(start);
}

// Codes round to the nearest level; a value too small for the smallest level
// of its sign takes it anyway, so support, postings and candidate counts stay
// those of the float index (the per-value error is below scale / 2, and below
// scale for those smallest values).
void SparseIndex::quantize(Storage& storage, bool keep_float) {
  const uint64_t nnz = static_cast<uint64_t>(nnz_);
  if (keep_float) {
    // Rows by position, dimensions increasing: a counting sort of the postings.
    storage.fwd_offsets.assign(static_cast<size_t>(rows_) + 1, 0);
    uint64_t* offsets = storage.fwd_offsets.data();
    for (int64_t d = 0; d < dim_; ++d) {
      const uint64_t* seg = segments_ + d * blocks_;
      for (int64_t c = 0; c < blocks_; ++c) {
        for (uint64_t p = seg[c]; p < seg[c + 1]; ++p) ++offsets[(c << kBlockBits) + post_rows_[p] + 1];
      }
    }
    for (int64_t i = 0; i < rows_; ++i) offsets[i + 1] += offsets[i];
    std::vector<uint64_t> cursor(offsets, offsets + rows_);
    storage.fwd_dims.resize(nnz);
    storage.fwd_values.resize(nnz);
    for (int64_t d = 0; d < dim_; ++d) {
      const uint64_t* seg = segments_ + d * blocks_;
      for (int64_t c = 0; c < blocks_; ++c) {
        for (uint64_t p = seg[c]; p < seg[c + 1]; ++p) {
          const uint64_t at = cursor[(c << kBlockBits) + post_rows_[p]]++;
          storage.fwd_dims[at] = static_cast<uint32_t>(d);
          storage.fwd_values[at] = post_values_[p];
        }
      }
    }
    fwd_offsets_ = storage.fwd_offsets.data();
    fwd_dims_ = storage.fwd_dims.data();
    fwd_values_ = storage.fwd_values.data();
  }
  storage.scales.assign(static_cast<size_t>(dim_), 0.0f);
  storage.is_signed.assign(static_cast<size_t>(dim_), 0);
  storage.codes.resize(nnz);
  for (int64_t d = 0; d < dim_; ++d) {
    const uint64_t begin = segments_[d * blocks_], end = segments_[(d + 1) * blocks_];
    float lo = 0.0f, hi = 0.0f;
    for (uint64_t p = begin; p < end; ++p) {
      lo = std::min(lo, post_values_[p]);
      hi = std::max(hi, post_values_[p]);
    }
    const bool is_signed = lo < 0.0f;
    const float levels = is_signed ? 127.0f : 255.0f;
    float scale = std::max(hi, -lo) / levels;
    // Values within 255 of the smallest float: keep a scale codes can reach.
    if (!(scale > 0.0f)) scale = std::numeric_limits<float>::denorm_min();
    storage.scales[d] = scale;
    storage.is_signed[d] = is_signed;
    for (uint64_t p = begin; p < end; ++p) {
      const float v = post_values_[p];
      float level = std::min(levels, std::max(-levels, std::nearbyint(v / scale)));
      if (level == 0.0f) level = v > 0.0f ? 1.0f : -1.0f;
      // Conversion to uint8 is modulo 256: a negative level gets its int8 bits.
      storage.codes[p] = static_cast<uint8_t>(static_cast<int>(level));
    }
  }
  std::vector<float>().swap(storage.values);
  post_values_ = nullptr;
  post_codes_ = storage.codes.data();
  dim_scale_ = storage.scales.data();
  dim_signed_ = storage.is_signed.data();
  values_ = ValueType::kInt8;
}

uint64_t SparseIndex::entry_start(int64_t d, uint64_t e) const {
  const uint64_t* seg = segments_ + d * blocks_;
  if (values_ == ValueType::kFloat32) return seg[0] + bm_start_[e];
  return seg[(int64_t{bm_block_[e]} * block_rows_) >> kBlockBits] + bm_start16_[e];
}

void SparseIndex::compute_blocks(Storage& storage, int64_t block_rows) {
  block_rows_ = block_rows;
  num_blocks_ = (rows_ + block_rows - 1) / block_rows;
  const bool quantized = values_ == ValueType::kInt8;
  storage.bm_offsets.assign(static_cast<size_t>(dim_) + 1, 0);
  storage.bm_block.clear();
  // Max and min of a block as levels: the float values, or the codes as
  // signed or unsigned integers (exact in float, ordered like the values).
  std::vector<float> hi, lo;
  std::vector<uint32_t> start;
  for (int64_t d = 0; d < dim_; ++d) {
    const uint64_t* seg = segments_ + d * blocks_;
    const uint64_t first = seg[0];
    const bool is_signed = quantized && dim_signed_[d];
    auto level = [&](uint64_t p) {
      if (!quantized) return post_values_[p];
      return is_signed ? static_cast<float>(static_cast<int8_t>(post_codes_[p]))
                       : static_cast<float>(post_codes_[p]);
    };
    int64_t current = -1;
    int64_t count = 0;
    auto close = [&]() {
      if (current < 0) return;
      const int64_t size = std::min(block_rows, rows_ - current * block_rows);
      // Rows of the block without dimension d hold a 0 there.
      if (count < size) {
        hi.back() = std::max(hi.back(), 0.0f);
        lo.back() = std::min(lo.back(), 0.0f);
      }
    };
    for (int64_t c = 0; c < blocks_; ++c) {
      for (uint64_t p = seg[c]; p < seg[c + 1]; ++p) {
        const int64_t row = (c << kBlockBits) + post_rows_[p];
        const int64_t block = row / block_rows;
        const float v = level(p);
        if (block != current) {
          close();
          current = block;
          count = 0;
          storage.bm_block.push_back(static_cast<uint32_t>(block));
          hi.push_back(v);
          lo.push_back(v);
          // Relative to the dimension (float32) or to its segment (int8).
          start.push_back(static_cast<uint32_t>(p - (quantized ? seg[c] : first)));
        } else {
          hi.back() = std::max(hi.back(), v);
          lo.back() = std::min(lo.back(), v);
        }
        ++count;
      }
    }
    close();
    storage.bm_offsets[d + 1] = storage.bm_block.size();
  }
  bm_entries_ = static_cast<int64_t>(storage.bm_block.size());
  bm_offsets_ = storage.bm_offsets.data();
  bm_block_ = storage.bm_block.data();
  if (quantized) {
    const auto code = [](float level) { return static_cast<uint8_t>(static_cast<int>(level)); };
    storage.bm_max_code.resize(hi.size());
    storage.bm_min_code.resize(lo.size());
    storage.bm_start16.resize(start.size());
    std::transform(hi.begin(), hi.end(), storage.bm_max_code.begin(), code);
    std::transform(lo.begin(), lo.end(), storage.bm_min_code.begin(), code);
    // A block's postings in its segment start below 65536 - block_rows.
    std::transform(start.begin(), start.end(), storage.bm_start16.begin(),
                   [](uint32_t x) { return static_cast<uint16_t>(x); });
    bm_max_code_ = storage.bm_max_code.data();
    bm_min_code_ = storage.bm_min_code.data();
    bm_start16_ = storage.bm_start16.data();
  } else {
    storage.bm_max = std::move(hi);
    storage.bm_min = std::move(lo);
    storage.bm_start = std::move(start);
    bm_max_ = storage.bm_max.data();
    bm_min_ = storage.bm_min.data();
    bm_start_ = storage.bm_start.data();
  }
}

void SparseIndex::finish_derived(Storage& storage) {
  storage.dim_absmax.assign(static_cast<size_t>(dim_), 0.0f);
  for (int64_t d = 0; d < dim_; ++d) {
    float m = 0.0f;
    for (uint64_t e = bm_offsets_[d]; e < bm_offsets_[d + 1]; ++e) {
      m = std::max({m, std::fabs(entry_max(d, e)), std::fabs(entry_min(d, e))});
    }
    storage.dim_absmax[d] = m;
  }
  dim_absmax_ = storage.dim_absmax.data();
  if (order_ != nullptr) {
    storage.position.assign(static_cast<size_t>(rows_), 0);
    for (int64_t i = 0; i < rows_; ++i) storage.position[order_[i]] = static_cast<uint32_t>(i);
    position_ = storage.position.data();
  }
}

SparseIndex SparseIndex::from_dense(const DenseView& x, float zero_threshold,
                                    const BuildOptions& options) {
  if (!(zero_threshold >= 0.0f) || !std::isfinite(zero_threshold)) {
    throw std::invalid_argument("zero_threshold must be finite and >= 0, got " +
                                std::to_string(zero_threshold));
  }
  check_dense(x, "database");
  return build(DenseRows{x, zero_threshold}, x.cols, nullptr, options);
}

SparseIndex SparseIndex::from_csr(const CsrView& x, int64_t dim, const int32_t* labels,
                                  const BuildOptions& options) {
  check_csr(x, dim, "database");
  return build(CsrRows{x}, dim, labels, options);
}

SparseIndex SparseIndex::from_bin(const std::string& path, int64_t dim,
                                  const BuildOptions& options) {
  const CsrMatrix m = read_bin(path);
  if (dim <= 0) dim = std::max<int64_t>(m.cols, 1);
  if (m.cols > dim) {
    throw std::invalid_argument(path + " has index " + std::to_string(m.cols - 1) +
                                ", outside dim " + std::to_string(dim));
  }
  return build(CsrRows{m.view(0, m.rows())}, dim, m.labels.data(), options);
}

int64_t SparseIndex::memory_bytes() const {
  const bool quantized = values_ == ValueType::kInt8;
  return 8 * (dim_ * blocks_ + 1) + (quantized ? 3 * nnz_ + 5 * dim_ : 6 * nnz_) +
         (labels_ != nullptr ? 4 * rows_ : 0);
}

int64_t SparseIndex::rescore_bytes() const {
  return fwd_offsets_ != nullptr ? 8 * (rows_ + 1) + 8 * nnz_ : 0;
}

int64_t SparseIndex::block_bytes() const {
  // Block-max lists (block, max, min, start: 16 bytes an entry, 8 with int8
  // values), their per-dimension bounds, the per-dimension |max|, and the
  // order with its inverse.
  const int64_t entry = values_ == ValueType::kInt8 ? 8 : 16;
  return entry * bm_entries_ + 8 * (dim_ + 1) + 4 * dim_ + (order_ != nullptr ? 8 * rows_ : 0);
}

CsrMatrix SparseIndex::to_csr() const {
  CsrMatrix m;
  m.cols = dim_;
  m.indptr.assign(static_cast<size_t>(rows_) + 1, 0);
  auto caller = [&](int64_t position) { return order_ != nullptr ? order_[position] : position; };
  m.indices.resize(nnz_);
  m.values.resize(nnz_);
  if (fwd_offsets_ != nullptr) {
    for (int64_t i = 0; i < rows_; ++i) {
      m.indptr[caller(i) + 1] = static_cast<int64_t>(fwd_offsets_[i + 1] - fwd_offsets_[i]);
    }
    for (int64_t i = 0; i < rows_; ++i) m.indptr[i + 1] += m.indptr[i];
    for (int64_t i = 0; i < rows_; ++i) {
      const int64_t at = m.indptr[caller(i)];
      for (uint64_t p = fwd_offsets_[i]; p < fwd_offsets_[i + 1]; ++p) {
        m.indices[at + (p - fwd_offsets_[i])] = static_cast<int32_t>(fwd_dims_[p]);
        m.values[at + (p - fwd_offsets_[i])] = fwd_values_[p];
      }
    }
    return m;
  }
  // A counting sort of the postings by caller row; dimensions come in
  // increasing order, so each row's indices do too.
  auto each_posting = [&](auto&& f) {
    for (int64_t d = 0; d < dim_; ++d) {
      const uint64_t* seg = segments_ + d * blocks_;
      for (int64_t c = 0; c < blocks_; ++c) {
        for (uint64_t p = seg[c]; p < seg[c + 1]; ++p) f(d, caller((c << kBlockBits) + post_rows_[p]), p);
      }
    }
  };
  each_posting([&](int64_t, int64_t row, uint64_t) { ++m.indptr[row + 1]; });
  for (int64_t i = 0; i < rows_; ++i) m.indptr[i + 1] += m.indptr[i];
  std::vector<int64_t> cursor(m.indptr.begin(), m.indptr.end() - 1);
  each_posting([&](int64_t d, int64_t row, uint64_t p) {
    const int64_t at = cursor[row]++;
    m.indices[at] = static_cast<int32_t>(d);
    m.values[at] = values_ == ValueType::kFloat32 ? post_values_[p] : dequantize(d, post_codes_[p]);
  });
  return m;
}

bool SparseIndex::memory_mapped() const { return storage_ != nullptr && storage_->map != nullptr; }

// ---------------------------------------------------------------------------
// Search.

void SparseIndex::search(const DenseView& queries, const SearchParams& params,
                         const SearchOutput& out) const {
  if (queries.cols != dim_) {
    throw std::invalid_argument("queries must have shape [Q, " + std::to_string(dim_) +
                                "] (the index dim), got [" + std::to_string(queries.rows) + ", " +
                                std::to_string(queries.cols) + "]");
  }
  check_dense(queries, "queries");
  search_impl(DenseRows{queries, 0.0f}, params, out);
}

void SparseIndex::search(const CsrView& queries, const SearchParams& params,
                         const SearchOutput& out) const {
  check_csr(queries, dim_, "queries");
  search_impl(CsrRows{queries}, params, out);
}

template <typename Queries>
void SparseIndex::search_impl(const Queries& queries, const SearchParams& params,
                              const SearchOutput& out) const {
  const int64_t num_queries = queries.size();
  const int64_t k = params.k;
  if (k < 1) throw std::invalid_argument("k must be >= 1, got " + std::to_string(k));
  if (std::isnan(params.threshold)) throw std::invalid_argument("threshold must not be NaN");
  if (params.num_threads < 0) {
    throw std::invalid_argument("num_threads must be >= 0 (0: every core), got " +
                                std::to_string(params.num_threads));
  }
  const bool rerank = params.rerank_database.data != nullptr || params.rerank_queries.data != nullptr;
  if (rerank) {
    const DenseView& db = params.rerank_database;
    const DenseView& qd = params.rerank_queries;
    if (db.data == nullptr || qd.data == nullptr) {
      throw std::invalid_argument("re-ranking needs both the database and the query dense vectors");
    }
    if (db.rows != rows_) {
      throw std::invalid_argument("rerank database must have one row per index row (" +
                                  std::to_string(rows_) + "), got " + std::to_string(db.rows));
    }
    if (qd.rows != num_queries || qd.cols != db.cols) {
      throw std::invalid_argument("rerank queries must have shape [" + std::to_string(num_queries) +
                                  ", " + std::to_string(db.cols) + "], got [" +
                                  std::to_string(qd.rows) + ", " + std::to_string(qd.cols) + "]");
    }
    if (params.rerank_k < k) {
      throw std::invalid_argument("rerank_k (" + std::to_string(params.rerank_k) +
                                  ") must be >= k (" + std::to_string(k) + ")");
    }
    check_dense(db, "rerank database");
    check_dense(qd, "rerank queries");
  }
  const bool rescore = params.rescore_k != 0;
  if (rescore) {
    if (params.rescore_k < k) {
      throw std::invalid_argument("rescore_k (" + std::to_string(params.rescore_k) +
                                  ") must be >= k (" + std::to_string(k) + ")");
    }
    if (fwd_offsets_ == nullptr) {
      throw std::invalid_argument("rescore_k needs an int8 index built with keep_float (the float "
                                  "rows it re-scores from)");
    }
    if (rerank) throw std::invalid_argument("rescore_k and the dense re-rank are exclusive");
  }
  const bool exact_rescore = params.rescore_exact;
  if (exact_rescore) {
    if (fwd_offsets_ == nullptr) {
      throw std::invalid_argument("exact re-scoring needs an int8 index built with keep_float (the "
                                  "float rows it re-scores from)");
    }
    if (rerank || rescore) {
      throw std::invalid_argument("exact re-scoring excludes rescore_k and the dense re-rank");
    }
  }
  if (params.mode == SearchMode::kApprox ? params.max_blocks < 1 : params.max_blocks != 0) {
    throw std::invalid_argument(
        params.mode == SearchMode::kApprox
            ? "approx search needs max_blocks >= 1 (blocks scored per query), got " +
                  std::to_string(params.max_blocks)
            : std::string("max_blocks applies to mode approx only"));
  }
  const bool pruned = params.mode != SearchMode::kExhaustive;
  const int64_t max_blocks =
      params.mode == SearchMode::kApprox ? params.max_blocks : std::numeric_limits<int64_t>::max();
  const float threshold = params.threshold;
  const bool quantized = values_ == ValueType::kInt8;
  const uint16_t* rows_end = post_rows_ + nnz_;
  const float* values_end = post_values_ + nnz_;
  const uint8_t* codes_end = post_codes_ + nnz_;
  const int64_t first_capacity =
      std::min(rerank ? params.rerank_k : rescore ? params.rescore_k : k, rows_);
  // Pruned modes: blocks scored before the others are filtered, at least
  // twice the blocks the first top-k fills.
  const int64_t seed_blocks =
      std::max<int64_t>(kSeedBlocks, 2 * ((first_capacity + block_rows_ - 1) / block_rows_));
  // Exact re-scoring: rows of the slot's pool (scan_block_pool) rather than the heap.
  auto scan = [&](const float* buf, int64_t size, int64_t lo, Slot& slot, bool any_order) {
    return exact_rescore
               ? scan_block_pool(buf, size, lo, threshold, slot.top, order_, any_order, slot.pool)
               : scan_block(buf, size, lo, threshold, slot.top, order_, any_order);
  };
  const int64_t final_capacity = std::min(k, rows_);

  // Block-max pruning over the query's terms (slot.terms), into slot.top.
  //
  // A block's bound adds, per query term of weight w, w * (the block's max of
  // that dimension) for w > 0 and w * (its min) for w < 0, rows lacking the
  // dimension counting as 0: no row of the block can score above it in exact
  // arithmetic. The bounds are summed term at a time from the block-max lists
  // (one float add per list entry, no search) and raised by twice the worst
  // rounding error of a float32 sum of the query's products, 2 (terms + 2) *
  // 2^-23 * sum |w| * max |value|: once for the bound's own float sum, once
  // for the score as the exhaustive mode computes it. Blocks are scored in
  // decreasing bound (equal bounds: the lower block first) while the bound
  // reaches the k-th score (equal may still hold a tie with a lower caller id)
  // and is above the threshold; each block is scored term by term in the
  // query's order, the arithmetic of the exhaustive mode, so its scores are
  // bit-identical. The kSeedBlocks highest bounds are found by one scan and
  // scored first, so the k-th score is high before the other blocks are
  // filtered against it; only the survivors are sorted. Returns false, with
  // nothing kept, when mode kAuto finds that more than 1 / kPruneRowRatio
  // of the rows would still have to be scored: exhaustive accumulation
  // (identical results) is cheaper then.
  auto run_pruned = [&](Workspace& ws, Slot& slot) {
    TopK& top = slot.top;
    int64_t& candidates = slot.candidates;
    int64_t& blocks = slot.blocks;
    int64_t& scored = slot.scored;
    ws.bounds.assign(static_cast<size_t>(num_blocks_), 0.0f);
    float* bounds = ws.bounds.data();
    double magnitude = 0.0;
    for (const Term& t : slot.terms) {
      const float w = t.weight;
      const uint64_t end = bm_offsets_[t.dim + 1];
      if (quantized) {
        // The table's product of the extreme code is the float index's bound.
        const uint8_t* bound = w > 0 ? bm_max_code_ : bm_min_code_;
        for (uint64_t e = bm_offsets_[t.dim]; e < end; ++e) bounds[bm_block_[e]] += t.table[bound[e]];
      } else {
        const float* bound = w > 0 ? bm_max_ : bm_min_;
        for (uint64_t e = bm_offsets_[t.dim]; e < end; ++e) bounds[bm_block_[e]] += w * bound[e];
      }
      magnitude += std::fabs(static_cast<double>(w)) * dim_absmax_[t.dim];
    }
    const double slack =
        2.0 * static_cast<double>(slot.terms.size() + 2) * std::ldexp(magnitude, -23) + 1e-30;
    using Entry = std::pair<double, uint32_t>;
    // Higher bound first; among equal bounds the lower block.
    const auto before = [](const Entry& a, const Entry& b) {
      return a.first > b.first || (a.first == b.first && a.second < b.second);
    };
    if (ws.block.size() < static_cast<size_t>(block_rows_)) ws.block.resize(block_rows_);
    float* buf = ws.block.data();
    blocks = 0;
    scored = 0;
    candidates = 0;
    auto score_block = [&](uint32_t b) {
      const int64_t lo = int64_t{b} * block_rows_;
      const int64_t size = std::min(block_rows_, rows_ - lo);
      // Blocks never straddle a 65536-row segment (block_rows divides it).
      const int64_t local = lo & (kBlockRows - 1);
      std::fill(buf, buf + size, 0.0f);
      for (const Term& t : slot.terms) {
        const uint32_t* first = bm_block_ + bm_offsets_[t.dim];
        const uint32_t* last = bm_block_ + bm_offsets_[t.dim + 1];
        const uint32_t* it = std::lower_bound(first, last, b);
        if (it == last || *it != b) continue;
        const uint64_t e = static_cast<uint64_t>(it - bm_block_);
        const uint64_t begin = entry_start(t.dim, e);
        const uint64_t end = it + 1 < last ? entry_start(t.dim, e + 1) : t.segments[blocks_];
        const float w = t.weight;
        if (quantized) {
          for (uint64_t p = begin; p < end; ++p) buf[post_rows_[p] - local] += t.table[post_codes_[p]];
        } else {
          for (uint64_t p = begin; p < end; ++p) buf[post_rows_[p] - local] += w * post_values_[p];
        }
        scored += static_cast<int64_t>(end - begin);
      }
      candidates += scan(buf, size, lo, slot, true);
      ++blocks;
    };
    // Scores `list` (sorted by `before`) until no block can enter; false when
    // the budget ran out or a block could not.
    auto visit = [&](const std::vector<Entry>& list) {
      for (const auto& [hi, b] : list) {
        if (blocks >= max_blocks || (top.full() && hi + slot.pool.widen < top.worst())) return false;
        score_block(b);
      }
      return true;
    };
    // Seeds: the highest bounds above the threshold, kept in a heap whose
    // front is the lowest of them.
    const int64_t seeds = std::min<int64_t>(max_blocks, seed_blocks);
    auto& heap = ws.order;
    heap.clear();
    for (int64_t b = 0; b < num_blocks_; ++b) {
      const double hi = bounds[b] + slack;
      if (!(hi + slot.pool.lower > threshold)) continue;
      const Entry entry{hi, static_cast<uint32_t>(b)};
      if (static_cast<int64_t>(heap.size()) < seeds) {
        heap.push_back(entry);
        std::push_heap(heap.begin(), heap.end(), before);
      } else if (before(entry, heap.front())) {
        std::pop_heap(heap.begin(), heap.end(), before);
        heap.back() = entry;
        std::push_heap(heap.begin(), heap.end(), before);
      }
    }
    std::sort_heap(heap.begin(), heap.end(), before);
    const bool more = static_cast<int64_t>(heap.size()) == seeds;
    if (!visit(heap) || !more) return true;
    // The rest: blocks that can still enter, in decreasing bound. A block's
    // bound is below a seed's or equal with a higher block id, so `before`
    // keeps the global order.
    for (const Entry& s : heap) bounds[s.second] = -std::numeric_limits<float>::infinity();
    const double cut =
        top.full() ? static_cast<double>(top.worst()) : -std::numeric_limits<double>::infinity();
    auto& rest = ws.rest;
    rest.clear();
    for (int64_t b = 0; b < num_blocks_; ++b) {
      const double hi = bounds[b] + slack;
      if (hi + slot.pool.lower > threshold && hi + slot.pool.widen >= cut) {
        rest.push_back({hi, static_cast<uint32_t>(b)});
      }
    }
    if (params.mode == SearchMode::kAuto &&
        static_cast<int64_t>(rest.size()) * block_rows_ * kPruneRowRatio > rows_) {
      top.reset(first_capacity);
      slot.pool.rows.clear();
      return false;
    }
    std::sort(rest.begin(), rest.end(), before);
    visit(rest);
    return true;
  };

  // Exhaustive accumulation of a query with few postings into the full score
  // vector, remembering the rows touched and visiting only those.
  auto run_touched = [&](Workspace& ws, Slot& slot) {
    TopK& top = slot.top;
    if (ws.scores.empty()) {
      ws.scores.assign(rows_, 0.0f);
      ws.seen.assign(rows_, 0);
    }
    float* s = ws.scores.data();
    uint8_t* seen = ws.seen.data();
    ws.touched.clear();
    for (const Term& t : slot.terms) {
      for (int64_t b = 0; b < blocks_; ++b) {
        const auto base = static_cast<uint32_t>(b << kBlockBits);
        for (uint64_t p = t.segments[b]; p < t.segments[b + 1]; ++p) {
          const uint32_t r = base + post_rows_[p];
          if (!seen[r]) {
            seen[r] = 1;
            ws.touched.push_back(r);
          }
          s[r] += quantized ? t.table[post_codes_[p]] : t.weight * post_values_[p];
        }
      }
    }
    for (const uint32_t r : ws.touched) {
      if (s[r] != 0.0f && s[r] > threshold) {
        ++slot.candidates;
        top.push({s[r], order_ != nullptr ? order_[r] : r});
      }
    }
    if (exact_rescore) {
      // Touched rows may score 0 by cancellation, and not exactly in float.
      const float joins = slot.pool.cut(top, threshold);
      for (const uint32_t r : ws.touched) {
        if (s[r] >= joins) slot.pool.rows.push_back({s[r], order_ != nullptr ? order_[r] : r});
      }
    }
    // Every other row scores exactly 0; when 0 qualifies, the lowest
    // caller ids among them compete too.
    if (0.0f > threshold) {
      size_t taken = 0;
      for (int64_t c = 0; c < rows_ && taken < top.capacity(); ++c) {
        const int64_t r = position_ != nullptr ? position_[c] : c;
        if (s[r] == 0.0f) {
          top.push({0.0f, static_cast<uint32_t>(c)});
          ++taken;
          // An untouched row scores 0 in float too.
          if (exact_rescore && !seen[r]) slot.pool.rows.push_back({0.0f, static_cast<uint32_t>(c)});
        }
      }
    }
    for (const uint32_t r : ws.touched) {
      s[r] = 0.0f;
      seen[r] = 0;
    }
  };

  // Exhaustive accumulation of a query with many postings: one
  // cache-resident block of rows at a time, then a scan of the block while
  // it is hot.
  auto run_dense = [&](Workspace& ws, Slot& slot) {
    if (ws.block.size() < static_cast<size_t>(std::min(rows_, kBlockRows))) {
      ws.block.resize(std::min(rows_, kBlockRows));
    }
    float* buf = ws.block.data();
    for (int64_t b = 0; b < blocks_; ++b) {
      const int64_t lo = b << kBlockBits;
      const int64_t size = std::min(rows_ - lo, kBlockRows);
      std::fill(buf, buf + size, 0.0f);
      auto segment = [&](const Term& t) {
        const uint64_t begin = t.segments[b];
        return Segment{post_rows_ + begin, quantized ? nullptr : post_values_ + begin,
                       quantized ? post_codes_ + begin : nullptr, t.table,
                       static_cast<int64_t>(t.segments[b + 1] - begin), t.weight};
      };
      // One term after the other, in the query's order: every mode adds a
      // row's products in that order, so their float32 scores agree bit
      // for bit (interleaving two terms' scatters would reorder them).
      for (const Term& t : slot.terms) {
        if (quantized) {
          scatter_codes(buf, segment(t), rows_end, codes_end);
        } else {
          scatter(buf, segment(t), 0, rows_end, values_end);
        }
      }
      slot.candidates += scan(buf, size, lo, slot, order_ != nullptr);
    }
  };

  // Exhaustive accumulation of the queries ws.group together. Their terms
  // are merged by dimension; each segment block is cut into spans whose
  // scores, one buffer of `span` rows per query, stay in L2 together, and
  // each span reads the postings of every dimension of the group once,
  // adding them into the buffer of each query that holds the dimension. A
  // query's terms increase in dimension (Slot::increasing), so the merged
  // order adds a row's products in the query's order: its scores equal
  // run_dense's bit for bit. Its top-k sees the rows in the same order too.
  auto run_batched = [&](Workspace& ws) {
    const auto n = static_cast<int64_t>(ws.group.size());
    auto& terms = ws.group_terms;
    terms.clear();
    for (int64_t i = 0; i < n; ++i) {
      for (const Term& t : ws.group[i]->terms) {
        terms.push_back({t.dim, static_cast<uint32_t>(i), t.weight, t.segments, t.table});
      }
    }
    std::sort(terms.begin(), terms.end(), [](const GroupTerm& a, const GroupTerm& b) {
      return a.dim < b.dim || (a.dim == b.dim && a.slot < b.slot);
    });
    auto& dims = ws.group_dims;
    dims.clear();
    for (size_t i = 0; i < terms.size();) {
      size_t j = i + 1;
      while (j < terms.size() && terms[j].dim == terms[i].dim) ++j;
      dims.push_back({terms[i].segments, 0, 0, static_cast<uint32_t>(i), static_cast<uint32_t>(j)});
      i = j;
    }
    // The largest power of two that keeps the group's scores within
    // kBatchScoreBytes (and no more than the rows of a segment block).
    int64_t span = kBlockRows;
    while (span > kMinBatchRows && span * n * static_cast<int64_t>(sizeof(float)) > kBatchScoreBytes) {
      span /= 2;
    }
    ws.group_scores.resize(static_cast<size_t>(n * span));
    float* buf = ws.group_scores.data();
    for (int64_t b = 0; b < blocks_; ++b) {
      const int64_t lo = b << kBlockBits;
      const int64_t size = std::min(rows_ - lo, kBlockRows);
      for (GroupDim& g : dims) {
        g.cursor = g.segments[b];
        g.end = g.segments[b + 1];
      }
      for (int64_t from = 0; from < size; from += span) {
        const int64_t len = std::min(span, size - from);
        for (int64_t i = 0; i < n; ++i) std::fill(buf + i * span, buf + i * span + len, 0.0f);
        const bool last_span = from + len >= size;
        for (GroupDim& g : dims) {
          // Positions within a segment increase: the span's postings are a prefix of the rest.
          const uint64_t stop =
              last_span ? g.end
                        : static_cast<uint64_t>(
                              std::lower_bound(post_rows_ + g.cursor, post_rows_ + g.end,
                                               static_cast<uint16_t>(from + len)) -
                              post_rows_);
          const GroupTerm* first = terms.data() + g.first;
          const GroupTerm* last = terms.data() + g.last;
          if (quantized) {
            scatter_group(buf, span, from, post_rows_, post_codes_, g.cursor, stop, first, last,
                          rows_end, codes_end);
          } else {
            scatter_group(buf, span, from, post_rows_, post_values_, g.cursor, stop, first, last,
                          rows_end, values_end);
          }
          g.cursor = stop;
        }
        for (int64_t i = 0; i < n; ++i) {
          Slot& slot = *ws.group[i];
          slot.candidates += scan(buf + i * span, len, lo + from, slot, order_ != nullptr);
        }
      }
    }
  };

  // |exact - quantized score| of any row is below E = sum |w| * scale over the
  // query's terms (a code is off by at most half a level, or a level for the
  // smallest codes) plus the float32 rounding of both sums, 2 (terms + 2) *
  // 2^-23 * sum |w| * (max |value| + scale).
  auto quantization_error = [&](const Slot& slot) {
    double error = 0.0;
    double magnitude = 0.0;
    for (const Term& t : slot.terms) {
      const double w = std::fabs(static_cast<double>(t.weight));
      error += w * dim_scale_[t.dim];
      magnitude += w * (static_cast<double>(dim_absmax_[t.dim]) + dim_scale_[t.dim]);
    }
    return error + 2.0 * static_cast<double>(slot.terms.size() + 2) * std::ldexp(magnitude, -23);
  };

  // Collects query q's terms into `slot` and resets its top-k and counters.
  auto prepare = [&](int64_t q, Slot& slot) {
    slot.query = q;
    slot.terms.clear();
    slot.increasing = true;
    slot.postings = 0;
    slot.entries = 0;
    slot.random_entries = 0.0;
    slot.candidates = 0;
    slot.blocks = num_blocks_;
    slot.scored = 0;
    queries.for_each(q, [&](int64_t d, float w) {
      const uint64_t* segments = segments_ + d * blocks_;
      const auto size = static_cast<int64_t>(segments[blocks_] - segments[0]);
      if (size > 0) {
        if (!slot.terms.empty() && slot.terms.back().dim >= d) slot.increasing = false;
        slot.terms.push_back({segments, w, d});
        slot.postings += size;
        slot.entries += static_cast<int64_t>(bm_offsets_[d + 1] - bm_offsets_[d]);
        // A block of R random rows holds d with probability 1 - (1 - p)^R.
        const double p = std::min(1.0, static_cast<double>(size) / static_cast<double>(rows_));
        slot.random_entries += static_cast<double>(num_blocks_) *
                               (p < 1.0 ? -std::expm1(static_cast<double>(block_rows_) * std::log1p(-p))
                                        : 1.0);
      }
    });
    if (quantized) {
      slot.tables.resize(slot.terms.size() * kCodes);
      float* table = slot.tables.data();
      for (Term& t : slot.terms) {
        fill_table(table, kCodeLevels.level[dim_signed_[t.dim]], dim_scale_[t.dim], t.weight);
        t.table = table;
        table += kCodes;
      }
    }
    slot.scored = slot.postings;
    slot.certified = 0;
    slot.top.reset(first_capacity);
    slot.pool.rows.clear();
    if (exact_rescore) {
      const double error = quantization_error(slot);
      slot.pool.widen = 2.0 * error;
      slot.pool.lower = error;
    }
  };

  // Answers the slot's query unless it is to be accumulated by blocks of
  // rows (run_dense or run_batched); returns whether it did.
  auto answer_alone = [&](Workspace& ws, Slot& slot) {
    if (rows_ == 0) return true;
    // Bounding costs about one posting per block-max entry: when the
    // query's lists are nearly as long as its postings (blocks as mixed as
    // the whole database), or when the seeds alone are a large part of the
    // rows (a small index), mode kAuto accumulates exhaustively.
    const bool bound = pruned && (params.mode != SearchMode::kAuto ||
                                  (slot.entries * kPruneEntryRatio <= slot.postings &&
                                   static_cast<double>(slot.entries) * kPruneCoherence <=
                                       slot.random_entries &&
                                   seed_blocks * block_rows_ * kPruneRowRatio <= rows_));
    if (bound && run_pruned(ws, slot)) return true;
    slot.blocks = num_blocks_;
    slot.scored = slot.postings;
    slot.candidates = 0;
    if (slot.postings * kSparseModeRatio < rows_) {
      run_touched(ws, slot);
      return true;
    }
    return false;
  };

  // Re-scores the rows of ws.ranked from the forward store and leaves the top
  // k by exact score (above the threshold) in it. Each score adds the
  // products w * x of the row's dimensions in the query's term order, from 0,
  // as every mode of a float32 index does: the same float32 result bit for bit.
  auto rescore_rows = [&](Workspace& ws, const Slot& slot) {
    TopK& top = ws.second;
    top.reset(final_capacity);
    // The row spread over a dense vector (zero elsewhere): a term the row
    // lacks adds w * 0, which leaves any float32 sum unchanged (the sums
    // never hold -0: they start at +0 and x + -x is +0).
    if (ws.row.empty()) ws.row.assign(static_cast<size_t>(dim_), 0.0f);
    float* row = ws.row.data();
    // The candidates' rows are scattered over the store: their positions,
    // offsets and entries are fetched in three rounds of independent loads
    // rather than one dependent chain per row.
    ws.positions.resize(ws.ranked.size());
    for (size_t j = 0; j < ws.ranked.size(); ++j) {
      const uint32_t id = ws.ranked[j].row;
      ws.positions[j] = position_ != nullptr ? position_[id] : id;
      __builtin_prefetch(fwd_offsets_ + ws.positions[j]);
    }
    for (const uint32_t i : ws.positions) {
      __builtin_prefetch(fwd_dims_ + fwd_offsets_[i]);
      __builtin_prefetch(fwd_values_ + fwd_offsets_[i]);
    }
    for (size_t j = 0; j < ws.ranked.size(); ++j) {
      const Candidate& c = ws.ranked[j];
      const uint32_t i = ws.positions[j];
      const uint64_t begin = fwd_offsets_[i], end = fwd_offsets_[i + 1];
      for (uint64_t p = begin; p < end; ++p) row[fwd_dims_[p]] = fwd_values_[p];
      float score = 0.0f;
      for (const Term& t : slot.terms) score += t.weight * row[t.dim];
      for (uint64_t p = begin; p < end; ++p) row[fwd_dims_[p]] = 0.0f;
      if (score > threshold) top.push({score, c.row});
    }
    top.take_sorted(ws.ranked);
  };

  // rescore_k: re-scores ws.ranked (the top rescore_k by quantized score,
  // best first). Returns whether the top-k is provably exact (`exact_mode`:
  // every row left out scored at most the last quantized score kept, or at
  // most the threshold when fewer qualified, so its exact score is below that
  // plus the quantization error, and a k-th exact score above it proves it).
  auto rescore_ranked = [&](Workspace& ws, const Slot& slot, bool exact_mode) -> uint8_t {
    const bool kept_all = static_cast<int64_t>(ws.ranked.size()) == first_capacity;
    const double left_out = kept_all ? static_cast<double>(ws.ranked.back().score) : threshold;
    rescore_rows(ws, slot);
    if (!exact_mode) return 0;
    // Every row was re-scored.
    if (kept_all ? first_capacity == rows_ : threshold == kNoThreshold) return 1;
    const double reach = left_out + quantization_error(slot);
    return static_cast<int64_t>(ws.ranked.size()) == final_capacity
               ? static_cast<double>(ws.ranked.back().score) > reach
               : static_cast<double>(threshold) >= reach;
  };

  // rescore_exact: the pool rows that still reach the final cut, re-scored.
  // A row left out scored below the k-th quantized score Q less 2E (or the
  // threshold less E): its exact score is below Q - E, itself at most the
  // k-th exact score among the k rows that scored Q or more (or below the
  // threshold), so it cannot enter the exact top-k.
  auto rescore_pool = [&](Workspace& ws, const Slot& slot) {
    const bool full = static_cast<int64_t>(ws.ranked.size()) == first_capacity;
    double cut = static_cast<double>(threshold) - slot.pool.lower;
    if (full) cut = std::max(cut, static_cast<double>(ws.ranked.back().score) - slot.pool.widen);
    ws.ranked.clear();
    for (const Candidate& c : slot.pool.rows) {
      if (static_cast<double>(c.score) >= cut) ws.ranked.push_back(c);
    }
    rescore_rows(ws, slot);
  };

  // Re-scores or re-ranks the slot's top-k if asked and writes its results.
  auto finish = [&](Workspace& ws, Slot& slot) {
    const int64_t q = slot.query;
    int64_t found = 0;
    if (rows_ > 0) {
      slot.top.take_sorted(ws.ranked);
      if (rescore) slot.certified = rescore_ranked(ws, slot, params.mode != SearchMode::kApprox);
      if (exact_rescore) {
        rescore_pool(ws, slot);
        slot.certified = params.mode != SearchMode::kApprox;
      }
      if (rerank) {
        const DenseView& db = params.rerank_database;
        const float* qv = params.rerank_queries.data + q * db.cols;
        ws.second.reset(final_capacity);
        for (const Candidate& c : ws.ranked) {
          ws.second.push({dot(db.data + int64_t{c.row} * db.cols, qv, db.cols), c.row});
        }
        ws.second.take_sorted(ws.ranked);
      }
      found = std::min<int64_t>(static_cast<int64_t>(ws.ranked.size()), k);
      for (int64_t i = 0; i < found; ++i) {
        out.ids[q * k + i] = ws.ranked[i].row;
        out.scores[q * k + i] = ws.ranked[i].score;
      }
    }
    for (int64_t i = found; i < k; ++i) {
      out.ids[q * k + i] = -1;
      out.scores[q * k + i] = -std::numeric_limits<float>::infinity();
    }
    if (out.postings != nullptr) out.postings[q] = slot.postings;
    if (out.blocks != nullptr) out.blocks[q] = slot.blocks;
    if (out.scored != nullptr) out.scored[q] = slot.scored;
    if (out.candidates != nullptr) out.candidates[q] = slot.candidates;
    if (out.certified != nullptr) out.certified[q] = slot.certified;
  };

  // The queries of group g ([g * batch, (g + 1) * batch) of `order`, or the
  // query g itself without one). Queries left for accumulation by blocks run
  // together when there are two or more of them whose terms increase in
  // dimension (the others run alone); the group's accumulation time is
  // split evenly among them.
  const int64_t batch = params.batch;
  if (batch < 1 || batch > kMaxBatch) {
    throw std::invalid_argument("batch must be in [1, " + std::to_string(kMaxBatch) +
                                "] (queries accumulated together), got " + std::to_string(batch));
  }
  std::vector<uint32_t> order;
  if (batch > 1 && params.group_by_support) order = similarity_order(queries);
  auto run_group = [&](int64_t g, Workspace& ws) {
    const int64_t first = g * batch;
    const int64_t n = std::min(batch, num_queries - first);
    if (ws.slots.size() < static_cast<size_t>(n)) ws.slots.resize(n);
    ws.group.clear();
    for (int64_t i = 0; i < n; ++i) {
      Slot& slot = ws.slots[i];
      const auto start = Clock::now();
      prepare(order.empty() ? first + i : order[first + i], slot);
      if (!answer_alone(ws, slot)) {
        if (batch > 1 && slot.increasing) {
          ws.group.push_back(&slot);
        } else {
          run_dense(ws, slot);
        }
      }
      slot.seconds = seconds_since(start);
    }
    if (ws.group.size() == 1) {
      const auto start = Clock::now();
      run_dense(ws, *ws.group[0]);
      ws.group[0]->seconds += seconds_since(start);
    } else if (!ws.group.empty()) {
      const auto start = Clock::now();
      run_batched(ws);
      const double share = seconds_since(start) / static_cast<double>(ws.group.size());
      for (Slot* slot : ws.group) slot->seconds += share;
    }
    for (int64_t i = 0; i < n; ++i) {
      Slot& slot = ws.slots[i];
      const auto start = Clock::now();
      finish(ws, slot);
      if (out.seconds != nullptr) out.seconds[slot.query] = slot.seconds + seconds_since(start);
    }
  };

  const int64_t groups = (num_queries + batch - 1) / batch;
  int64_t threads = params.num_threads > 0 ? params.num_threads : available_cores();
  threads = std::max<int64_t>(1, std::min(threads, groups));
  // Groups are handed out one at a time: their cost varies with their
  // postings, and one atomic increment is negligible next to a query.
  std::atomic<int64_t> next{0};
  std::exception_ptr error;
  std::mutex error_mutex;
  auto worker = [&]() {
    try {
      Workspace ws;
      for (int64_t g = next++; g < groups; g = next++) run_group(g, ws);
    } catch (...) {
      std::lock_guard<std::mutex> lock(error_mutex);
      if (!error) error = std::current_exception();
      next = groups;
    }
  };
  std::vector<std::thread> pool;
  pool.reserve(threads - 1);
  for (int64_t t = 1; t < threads; ++t) pool.emplace_back(worker);
  worker();
  for (std::thread& t : pool) t.join();
  if (error) std::rethrow_exception(error);
}

// ---------------------------------------------------------------------------
// Save / load.

void SparseIndex::save(const std::string& path) const {
  std::FILE* f = std::fopen(path.c_str(), "wb");
  if (f == nullptr) throw FormatError("cannot write " + path + ": " + std::strerror(errno));
  std::unique_ptr<std::FILE, int (*)(std::FILE*)> closer(f, std::fclose);

  uint8_t header[kHeaderSize] = {};
  // The header is written last, once the payload checksum is known.
  if (std::fseek(f, kHeaderSize, SEEK_SET) != 0) {
    throw FormatError("cannot write " + path + ": " + std::strerror(errno));
  }
  Xxh64 hash;
  auto section = [&](const void* data, uint64_t bytes) {
    write_all(f, data, bytes, &hash, path);
    write_padding(f, bytes, &hash, path);
  };
  const uint64_t nnz = static_cast<uint64_t>(nnz_);
  const uint64_t rows = rows_, dim = dim_, entries = bm_entries_;
  const bool quantized = values_ == ValueType::kInt8;
  section(segments_, 8 * (static_cast<uint64_t>(dim_ * blocks_) + 1));
  section(post_rows_, 2 * nnz);
  if (quantized) {
    section(post_codes_, nnz);
  } else {
    section(post_values_, 4 * nnz);
  }
  if (labels_ != nullptr) section(labels_, 4 * rows);
  if (order_ != nullptr) section(order_, 4 * rows);
  section(bm_offsets_, 8 * (dim + 1));
  section(bm_block_, 4 * entries);
  if (quantized) {
    section(bm_max_code_, entries);
    section(bm_min_code_, entries);
    section(bm_start16_, 2 * entries);
    section(dim_scale_, 4 * dim);
    section(dim_signed_, dim);
    if (fwd_offsets_ != nullptr) {
      section(fwd_offsets_, 8 * (rows + 1));
      section(fwd_dims_, 4 * nnz);
      section(fwd_values_, 4 * nnz);
    }
  } else {
    section(bm_max_, 4 * entries);
    section(bm_min_, 4 * entries);
    section(bm_start_, 4 * entries);
  }

  const uint32_t version = kIndexFormatVersion;
  const uint32_t header_size = kHeaderSize;
  const uint32_t flags = (labels_ != nullptr ? kFlagLabels : 0) | (order_ != nullptr ? kFlagOrder : 0) |
                         (fwd_offsets_ != nullptr ? kFlagForward : 0);
  const uint32_t stored = quantized ? kStoredInt8 : kStoredFloat32;
  const uint32_t block_bits = kBlockBits;
  const uint32_t block_rows = static_cast<uint32_t>(block_rows_);
  const uint64_t payload_hash = hash.digest();
  std::memcpy(header, kMagic, 8);
  std::memcpy(header + 8, &version, 4);
  std::memcpy(header + 12, &header_size, 4);
  std::memcpy(header + 16, &rows, 8);
  std::memcpy(header + 24, &dim, 8);
  std::memcpy(header + 32, &nnz, 8);
  std::memcpy(header + 40, &flags, 4);
  std::memcpy(header + 44, &block_bits, 4);
  std::memcpy(header + 48, &payload_hash, 8);
  std::memcpy(header + 56, &block_rows, 4);
  std::memcpy(header + 64, &entries, 8);
  std::memcpy(header + 72, &stored, 4);
  const uint64_t header_hash = xxh64(header, kHeaderSize - 8);
  std::memcpy(header + kHeaderSize - 8, &header_hash, 8);
  if (std::fseek(f, 0, SEEK_SET) != 0) {
    throw FormatError("cannot write " + path + ": " + std::strerror(errno));
  }
  write_all(f, header, kHeaderSize, nullptr, path);
  if (std::fflush(f) != 0) throw FormatError("cannot write " + path + ": " + std::strerror(errno));
  closer.reset();
}

SparseIndex SparseIndex::load(const std::string& path) {
  const auto start = Clock::now();
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) throw FormatError("cannot open index file " + path + ": " + std::strerror(errno));
  struct stat st;
  if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    ::close(fd);
    throw FormatError(path + " is not a regular file");
  }
  const uint64_t size = static_cast<uint64_t>(st.st_size);
  const std::string foreign = path + " is not a sparse-embed index (expected a file written by "
                                     "SparseIndex.save; a .bin embedding file loads with from_bin)";
  if (size < 8) {
    ::close(fd);
    throw FormatError(size == 0 ? path + " is empty" : foreign);
  }
  auto storage = std::make_shared<Storage>();
  storage->map = ::mmap(nullptr, size, PROT_READ, MAP_PRIVATE, fd, 0);
  ::close(fd);
  if (storage->map == MAP_FAILED) {
    storage->map = nullptr;
    throw FormatError("cannot map " + path + ": " + std::strerror(errno));
  }
  storage->map_size = size;
  const auto* base = static_cast<const uint8_t*>(storage->map);

  if (std::memcmp(base, kMagic, 8) != 0) throw FormatError(foreign);
  if (size < kHeaderSizeV1) {
    throw FormatError(path + " is truncated: " + std::to_string(size) +
                      " bytes, shorter than the 64-byte header");
  }
  uint32_t version;
  std::memcpy(&version, base + 8, 4);
  // Where the header checksum sits depends on the version (v1: a 64-byte
  // header, v2 and v3: 128 bytes); a flipped version bit fails both.
  auto header_ok = [&](uint64_t header_size) {
    uint64_t stored;
    if (size < header_size) return false;
    std::memcpy(&stored, base + header_size - 8, 8);
    return xxh64(base, header_size - 8) == stored;
  };
  if (version > 1 && version <= kIndexFormatVersion && size < kHeaderSize &&
      !header_ok(kHeaderSizeV1)) {
    throw FormatError(path + " is truncated: " + std::to_string(size) + " bytes, shorter than the " +
                      std::to_string(kHeaderSize) + "-byte header");
  }
  const bool v1 = header_ok(kHeaderSizeV1);
  const bool v2 = header_ok(kHeaderSize);
  if (!v1 && !v2) throw FormatError(path + " is corrupted: header checksum mismatch");
  if (!(version == 1 && v1) && !(version > 1 && version <= kIndexFormatVersion && v2)) {
    throw FormatError(path + " has index format version " + std::to_string(version) +
                      "; this build reads versions 1 to " + std::to_string(kIndexFormatVersion));
  }
  const uint64_t header_size = version == 1 ? kHeaderSizeV1 : kHeaderSize;
  uint32_t stored_header_size, flags, block_bits, block_rows = kDefaultBlockRows;
  uint32_t stored = kStoredFloat32;
  uint64_t rows, dim, nnz, payload_hash, entries = 0;
  std::memcpy(&stored_header_size, base + 12, 4);
  std::memcpy(&rows, base + 16, 8);
  std::memcpy(&dim, base + 24, 8);
  std::memcpy(&nnz, base + 32, 8);
  std::memcpy(&flags, base + 40, 4);
  std::memcpy(&block_bits, base + 44, 4);
  std::memcpy(&payload_hash, base + 48, 8);
  if (version != 1) {
    std::memcpy(&block_rows, base + 56, 4);
    std::memcpy(&entries, base + 64, 8);
  }
  if (version >= 3) std::memcpy(&stored, base + 72, 4);
  const bool quantized = stored == kStoredInt8;
  const uint32_t known_flags = version == 1   ? kFlagLabels
                               : quantized    ? kFlagLabels | kFlagOrder | kFlagForward
                                              : kFlagLabels | kFlagOrder;
  if (stored_header_size != header_size || (flags & ~known_flags) != 0 || block_bits != kBlockBits ||
      stored > kStoredInt8 ||
      rows >= uint64_t{kMaxRows} ||
      dim < 1 || dim > uint64_t{std::numeric_limits<int32_t>::max()} ||
      nnz > (uint64_t{1} << 48) || entries > nnz || block_rows < kMinBlockRows ||
      block_rows > kBlockRows || (block_rows & (block_rows - 1)) != 0) {
    throw FormatError(path + " is corrupted: implausible header fields");
  }
  const bool has_labels = (flags & kFlagLabels) != 0;
  const bool has_order = (flags & kFlagOrder) != 0;
  const bool has_forward = (flags & kFlagForward) != 0;
  // int8: one byte per value and per block max / min, two per block start.
  const uint64_t value_bytes = quantized ? 1 : 4;
  const uint64_t start_bytes = quantized ? 2 : 4;
  const uint64_t blocks = std::max<uint64_t>(1, (rows + kBlockRows - 1) / kBlockRows);
  const uint64_t keys = dim * blocks;
  const uint64_t segments_at = header_size;
  const uint64_t rows_at = segments_at + align_up(8 * (keys + 1));
  const uint64_t values_at = rows_at + align_up(2 * nnz);
  const uint64_t labels_at = values_at + align_up(value_bytes * nnz);
  const uint64_t order_at = labels_at + (has_labels ? align_up(4 * rows) : 0);
  const uint64_t bm_offsets_at = order_at + (has_order ? align_up(4 * rows) : 0);
  const uint64_t bm_block_at = bm_offsets_at + (version == 1 ? 0 : align_up(8 * (dim + 1)));
  const uint64_t bm_max_at = bm_block_at + align_up(4 * entries);
  const uint64_t bm_min_at = bm_max_at + align_up(value_bytes * entries);
  const uint64_t bm_start_at = bm_min_at + align_up(value_bytes * entries);
  const uint64_t scales_at = bm_start_at + align_up(start_bytes * entries);
  const uint64_t signed_at = scales_at + (quantized ? align_up(4 * dim) : 0);
  const uint64_t fwd_offsets_at = signed_at + (quantized ? align_up(dim) : 0);
  const uint64_t fwd_dims_at = fwd_offsets_at + (has_forward ? align_up(8 * (rows + 1)) : 0);
  const uint64_t fwd_values_at = fwd_dims_at + (has_forward ? align_up(4 * nnz) : 0);
  const uint64_t expected =
      version == 1 ? bm_offsets_at : fwd_values_at + (has_forward ? align_up(4 * nnz) : 0);
  if (size < expected) {
    throw FormatError(path + " is truncated: " + std::to_string(size) + " bytes, expected " +
                      std::to_string(expected));
  }
  if (size > expected) {
    throw FormatError(path + " is corrupted: " + std::to_string(size - expected) +
                      " unexpected trailing bytes");
  }
  if (xxh64(base + header_size, size - header_size) != payload_hash) {
    throw FormatError(path + " is corrupted: checksum mismatch");
  }

  // A file with valid checksums can still have been crafted: check the
  // invariants the search relies on, so no file can make it read out of
  // bounds.
  const auto* segments = reinterpret_cast<const uint64_t*>(base + segments_at);
  const auto* post_rows = reinterpret_cast<const uint16_t*>(base + rows_at);
  const auto* post_values = quantized ? nullptr : reinterpret_cast<const float*>(base + values_at);
  const std::string inconsistent = path + " is corrupted: inconsistent postings";
  if (segments[0] != 0 || segments[keys] != nnz) throw FormatError(inconsistent);
  for (uint64_t key = 0; key < keys; ++key) {
    if (segments[key + 1] < segments[key] || segments[key + 1] > nnz) {
      throw FormatError(inconsistent);
    }
    // Rows of the last block end at N.
    const uint64_t block = key % blocks;
    const uint64_t block_rows_here = std::min<uint64_t>(kBlockRows, rows - block * kBlockRows);
    for (uint64_t p = segments[key]; p < segments[key + 1]; ++p) {
      if (post_rows[p] >= block_rows_here ||
          (p > segments[key] && post_rows[p] < post_rows[p - 1]) ||
          (!quantized && !std::isfinite(post_values[p]))) {
        throw FormatError(inconsistent);
      }
    }
  }
  const auto* order = has_order ? reinterpret_cast<const uint32_t*>(base + order_at) : nullptr;
  if (order != nullptr) {
    std::vector<uint8_t> seen(rows, 0);
    for (uint64_t i = 0; i < rows; ++i) {
      if (order[i] >= rows || seen[order[i]]) {
        throw FormatError(path + " is corrupted: the row order is not a permutation");
      }
      seen[order[i]] = 1;
    }
  }

  SparseIndex index;
  index.rows_ = static_cast<int64_t>(rows);
  index.dim_ = static_cast<int64_t>(dim);
  index.nnz_ = static_cast<int64_t>(nnz);
  index.blocks_ = static_cast<int64_t>(blocks);
  index.segments_ = segments;
  index.post_rows_ = post_rows;
  index.post_values_ = post_values;
  if (quantized) {
    index.values_ = ValueType::kInt8;
    index.post_codes_ = base + values_at;
    const auto* scales = reinterpret_cast<const float*>(base + scales_at);
    const uint8_t* is_signed = base + signed_at;
    for (uint64_t d = 0; d < dim; ++d) {
      if (!(scales[d] > 0.0f) || !std::isfinite(scales[d] * 255.0f) || is_signed[d] > 1) {
        throw FormatError(path + " is corrupted: invalid value scales");
      }
    }
    // A code 0 (or -128 for int8) is never written: every non-zero is a level.
    for (uint64_t d = 0; d < dim; ++d) {
      for (uint64_t p = segments[d * blocks]; p < segments[(d + 1) * blocks]; ++p) {
        if (index.post_codes_[p] == 0 || (is_signed[d] && index.post_codes_[p] == 0x80)) {
          throw FormatError(inconsistent);
        }
      }
    }
    index.dim_scale_ = scales;
    index.dim_signed_ = is_signed;
  }
  if (has_forward) {
    const auto* offsets = reinterpret_cast<const uint64_t*>(base + fwd_offsets_at);
    const auto* dims = reinterpret_cast<const uint32_t*>(base + fwd_dims_at);
    const auto* values = reinterpret_cast<const float*>(base + fwd_values_at);
    const std::string bad_forward = path + " is corrupted: inconsistent forward store";
    if (offsets[0] != 0 || offsets[rows] != nnz) throw FormatError(bad_forward);
    for (uint64_t i = 0; i < rows; ++i) {
      if (offsets[i + 1] < offsets[i] || offsets[i + 1] > nnz) throw FormatError(bad_forward);
      for (uint64_t p = offsets[i]; p < offsets[i + 1]; ++p) {
        if (dims[p] >= dim || (p > offsets[i] && dims[p] <= dims[p - 1]) || !std::isfinite(values[p])) {
          throw FormatError(bad_forward);
        }
      }
    }
    index.fwd_offsets_ = offsets;
    index.fwd_dims_ = dims;
    index.fwd_values_ = values;
  }
  index.labels_ = has_labels ? reinterpret_cast<const int32_t*>(base + labels_at) : nullptr;
  index.order_ = order;
  // The block metadata is a function of the postings: version 1 files get
  // it computed here; version 2 files must match it exactly, which also
  // proves every block's posting ranges stay inside the block.
  index.compute_blocks(*storage, block_rows);
  if (version != 1) {
    const auto same = [&](const void* computed, uint64_t at, uint64_t bytes) {
      return bytes == 0 || std::memcmp(computed, base + at, bytes) == 0;
    };
    const void* computed_max = quantized ? static_cast<const void*>(index.bm_max_code_) : index.bm_max_;
    const void* computed_min = quantized ? static_cast<const void*>(index.bm_min_code_) : index.bm_min_;
    const void* computed_start =
        quantized ? static_cast<const void*>(index.bm_start16_) : index.bm_start_;
    if (static_cast<uint64_t>(index.bm_entries_) != entries ||
        !same(index.bm_offsets_, bm_offsets_at, 8 * (dim + 1)) ||
        !same(index.bm_block_, bm_block_at, 4 * entries) ||
        !same(computed_max, bm_max_at, value_bytes * entries) ||
        !same(computed_min, bm_min_at, value_bytes * entries) ||
        !same(computed_start, bm_start_at, start_bytes * entries)) {
      throw FormatError(path + " is corrupted: block metadata does not match the postings");
    }
    // Serve the mapped copy; the computed one was only the check.
    index.bm_offsets_ = reinterpret_cast<const uint64_t*>(base + bm_offsets_at);
    index.bm_block_ = reinterpret_cast<const uint32_t*>(base + bm_block_at);
    if (quantized) {
      index.bm_max_code_ = base + bm_max_at;
      index.bm_min_code_ = base + bm_min_at;
      index.bm_start16_ = reinterpret_cast<const uint16_t*>(base + bm_start_at);
    } else {
      index.bm_max_ = reinterpret_cast<const float*>(base + bm_max_at);
      index.bm_min_ = reinterpret_cast<const float*>(base + bm_min_at);
      index.bm_start_ = reinterpret_cast<const uint32_t*>(base + bm_start_at);
    }
    std::vector<uint64_t>().swap(storage->bm_offsets);
    std::vector<uint32_t>().swap(storage->bm_block);
    std::vector<float>().swap(storage->bm_max);
    std::vector<float>().swap(storage->bm_min);
    std::vector<uint32_t>().swap(storage->bm_start);
    std::vector<uint8_t>().swap(storage->bm_max_code);
    std::vector<uint8_t>().swap(storage->bm_min_code);
    std::vector<uint16_t>().swap(storage->bm_start16);
  }
  index.finish_derived(*storage);
  index.storage_ = std::move(storage);
  index.build_seconds_ = seconds_since(start);
  return index;
}

// ---------------------------------------------------------------------------
// The .bin format of the original code.

CsrMatrix read_bin(const std::string& path) {
  std::FILE* f = std::fopen(path.c_str(), "rb");
  if (f == nullptr) throw FormatError("cannot open " + path + ": " + std::strerror(errno));
  std::unique_ptr<std::FILE, int (*)(std::FILE*)> closer(f, std::fclose);
  std::setvbuf(f, nullptr, _IOFBF, 1 << 20);
  struct stat st;
  if (::fstat(::fileno(f), &st) != 0 || !S_ISREG(st.st_mode)) {
    throw FormatError(path + " is not a regular file");
  }
  const int64_t size = st.st_size;
  int64_t position = 0;
  auto read = [&](void* data, int64_t bytes, const char* what, int64_t row) {
    if (bytes > 0 && std::fread(data, 1, bytes, f) != static_cast<size_t>(bytes)) {
      throw FormatError(path + " is truncated: cannot read the " + what +
                        (row >= 0 ? " of row " + std::to_string(row) : std::string()) +
                        " (not a .bin embedding file?)");
    }
    position += bytes;
  };
  int32_t n;
  read(&n, 4, "row count", -1);
  // Every row takes at least 8 bytes (label, nnz).
  if (n < 0 || int64_t{n} * 8 > size - 4) {
    throw FormatError(path + " declares " + std::to_string(n) + " rows but holds " +
                      std::to_string(size) + " bytes (truncated, or not a .bin embedding file)");
  }
  CsrMatrix m;
  m.indptr.reserve(static_cast<size_t>(n) + 1);
  m.labels.resize(n);
  std::vector<int32_t> indices;
  std::vector<float> values;
  for (int32_t i = 0; i < n; ++i) {
    int32_t head[2];
    read(head, 8, "label and nnz", i);
    const int32_t nnz = head[1];
    if (nnz < 0 || int64_t{nnz} * 8 > size - position) {
      throw FormatError(path + ": row " + std::to_string(i) + " declares " + std::to_string(nnz) +
                        " non-zeros but only " + std::to_string(size - position) +
                        " bytes remain (truncated, or not a .bin embedding file)");
    }
    m.labels[i] = head[0];
    indices.resize(nnz);
    values.resize(nnz);
    read(indices.data(), int64_t{nnz} * 4, "indices", i);
    read(values.data(), int64_t{nnz} * 4, "values", i);
    for (int32_t j = 0; j < nnz; ++j) {
      if (indices[j] < 0 || indices[j] > kMaxBinIndex) {
        throw FormatError(path + ": row " + std::to_string(i) + " has index " +
                          std::to_string(indices[j]) + ", outside [0, 2^24) (corrupted file?)");
      }
      if (!std::isfinite(values[j])) {
        throw FormatError(path + ": row " + std::to_string(i) + " has a non-finite value");
      }
      if (values[j] == 0.0f) continue;
      m.indices.push_back(indices[j]);
      m.values.push_back(values[j]);
      m.cols = std::max<int64_t>(m.cols, int64_t{indices[j]} + 1);
    }
    m.indptr.push_back(static_cast<int64_t>(m.indices.size()));
  }
  if (position != size) {
    throw FormatError(path + " has " + std::to_string(size - position) + " trailing bytes after " +
                      std::to_string(n) + " rows (not a .bin embedding file?)");
  }
  return m;
}

}  // namespace sparse_embed
