// Private to the index core (never installed, never included by the binding
// or the CLI): the storage behind a SparseIndex, the segment layout of its
// postings, the row sources the build and the search read, the hash
// primitives the checksum and the row order share, and the constants more
// than one source file relies on.
//
//   sparse_index.cpp   the public class's small pieces: names, sizes, to_csr, input checks
//   format.cpp         the index file (layout, checksum, save, one loader per version), .bin
//   build.cpp          row order, postings, block metadata, quantization
//   query_engine.cpp   the search: QueryEngine and the kernels its loops call

#ifndef SPARSE_EMBED_SEARCH_INDEX_INTERNAL_H_
#define SPARSE_EMBED_SEARCH_INDEX_INTERNAL_H_

#include <chrono>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <utility>
#include <vector>

#include "sparse_index.h"

namespace sparse_embed {

using Clock = std::chrono::steady_clock;

inline double seconds_since(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

// Rows of one segment block. In the dense accumulation mode a block's 256
// KiB of float scores stays in L2 while a query's postings for those rows
// are added into it and then scanned for the top-k, so the full score vector
// never goes through memory. Postings store a row as its uint16 offset in its
// block: 6 bytes a posting instead of 8, and no search for where a block
// starts.
inline constexpr int kBlockBits = 16;
inline constexpr int64_t kBlockRows = int64_t{1} << kBlockBits;
// Row ids are uint32 (result ids, the touched-row list of the sparse mode).
inline constexpr int64_t kMaxRows = int64_t{1} << 32;
// The bound table (SparseIndex::bound_hi_) is kept where its dim * blocks
// bytes are at most the non-zeros (0.25 for 1024 dimensions, 32 non-zeros a
// row and blocks of 128 rows; 4 in blocks of 8, where it measured no faster
// than the block-max lists on noisy identity groups at 200k rows).
inline constexpr int64_t kBoundTableRatio = 1;
// Codes per dimension of an int8 index: the size of a query term's product table.
inline constexpr int64_t kCodes = 256;

// ---------------------------------------------------------------------------
// XXH64 primitives (https://github.com/Cyan4973/xxHash/blob/dev/doc/xxhash_spec.md):
// the file checksum (format.cpp) and the row order's hashes (build.cpp).

inline constexpr uint64_t kP1 = 0x9E3779B185EBCA87ULL;
inline constexpr uint64_t kP2 = 0xC2B2AE3D27D4EB4FULL;
inline constexpr uint64_t kP3 = 0x165667B19E3779F9ULL;
inline constexpr uint64_t kP4 = 0x85EBCA77C2B2AE63ULL;
inline constexpr uint64_t kP5 = 0x27D4EB2F165667C5ULL;

inline uint64_t rotl(uint64_t x, int r) { return (x << r) | (x >> (64 - r)); }
inline uint64_t xxh_round(uint64_t acc, uint64_t input) { return rotl(acc + input * kP2, 31) * kP1; }

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

// Throw std::invalid_argument naming `what` on a malformed matrix, a
// non-finite value or (CSR) an index outside [0, dim).
void check_dense(const DenseView& x, const char* what);
void check_csr(const CsrView& x, int64_t dim, const char* what);

// Rows sorted by the MinHash signature of their support, then by caller id
// (build.cpp): the order in which the search groups a batch's queries.
std::vector<uint32_t> similarity_order(const DenseRows& rows);
std::vector<uint32_t> similarity_order(const CsrRows& rows);

// ---------------------------------------------------------------------------
// Storage: owned vectors (built in memory) or a read-only file mapping
// (unmapped by the destructor, in format.cpp). The SparseIndex's pointers
// address one or the other.

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
  std::vector<uint8_t> bound_hi;
  std::vector<uint8_t> bound_lo;
  std::vector<float> bound_unit;
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
  ~Storage();
};

// ---------------------------------------------------------------------------
// A query's view of the postings (query_engine.cpp).

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

}  // namespace sparse_embed

#endif  // SPARSE_EMBED_SEARCH_INDEX_INTERNAL_H_
