// Inverted index over sparse embeddings: exact top-k inner-product search.
//
// The payoff of sparse embeddings (Paria et al., "Minimizing FLOPs to Learn
// Efficient Sparse Representations", ICLR 2020) is that a query only touches
// the postings of its own non-zero dimensions. This core stores, for every
// dimension, the contiguous list of (row id, value) postings of the database
// rows that are non-zero there, and answers query batches on all cores.
//
// This is the core's one public header. It knows nothing of Python;
// search/bindings.cpp adapts it and search/cli.cpp drives it from the command
// line. The core's sources and its private header are listed in
// search/index_internal.h.

#ifndef SPARSE_EMBED_SEARCH_SPARSE_INDEX_H_
#define SPARSE_EMBED_SEARCH_SPARSE_INDEX_H_

#include <chrono>
#include <cstdint>
#include <limits>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

namespace sparse_embed {

namespace internal {
class IndexLoader;
class QueryEngine;
}  // namespace internal

// Defaults shared by every interface (the Python binding and the CLI).
inline constexpr int64_t kDefaultRerankK = 1000;  // candidates re-ranked with dense vectors
inline constexpr int kDefaultNumThreads = 0;      // 0: every core the process may use
inline constexpr float kDefaultZeroThreshold = 0.0f;
// `threshold` value that keeps every row: all finite scores are above it.
inline constexpr float kNoThreshold = -std::numeric_limits<float>::infinity();

// Newest version of the file written by SparseIndex::save. Version 1 files
// (no row order, no block metadata) still load: their metadata is
// recomputed. Version 2 files load too (version 3 adds quantized values and
// the forward store; a float32 index is laid out as in version 2). Version 4
// is version 3 plus a per-row confidence section; save writes it only for an
// index with a confidence, so every other index stays a version 3 file that
// older builds read.
inline constexpr uint32_t kIndexFormatVersion = 4;
inline constexpr uint32_t kIndexFormatVersionNoConfidence = 3;

// Rows per pruning block (a power of two in [kMinBlockRows, 65536]).
inline constexpr int64_t kDefaultBlockRows = 128;
inline constexpr int64_t kMinBlockRows = 8;

// How a query is answered: exhaustive accumulation, pruned (row blocks in
// decreasing upper bound), approx (pruned, at most SearchParams::max_blocks
// blocks) or auto (pruned where the query's block lists say it pays, else
// exhaustive; the default). What each returns and guarantees (every mode but
// approx is exact: same ids, float32 scores and ties to the lower row id) is
// stated once, in docs/search.md ("What a search returns", "Search modes").
enum class SearchMode { kExhaustive, kPruned, kApprox, kAuto };
inline constexpr SearchMode kDefaultSearchMode = SearchMode::kAuto;
// Queries accumulated together (SearchParams::batch), at most kMaxBatch;
// results do not depend on it. One at a time is the default: see "Batched
// queries" in docs/search.md for what batching does and what it measured.
inline constexpr int64_t kDefaultBatch = 1;
inline constexpr int64_t kMaxBatch = 256;
// "exhaustive" / "pruned" / "approx" / "auto" <-> SearchMode; parse throws
// std::invalid_argument naming the valid modes.
SearchMode parse_search_mode(const std::string& name);
const char* search_mode_name(SearchMode mode);

// How posting values are stored. kFloat32: the values as given (6 bytes a
// posting). kInt8: one byte per posting and a float32 scale per dimension,
// as uint8 codes (scale = max / 255) for a dimension whose values are all
// non-negative (ReLU embeddings) and as int8 codes (scale = max |x| / 127)
// otherwise; a posting then costs 3 bytes. Every non-zero stays a posting (a
// value that would round to 0 keeps the smallest code of its sign), and the
// search ranks the dequantized values code * scale exactly.
enum class ValueType { kFloat32, kInt8 };
inline constexpr ValueType kDefaultValueType = ValueType::kFloat32;
// "float32" / "int8" <-> ValueType; parse throws std::invalid_argument naming
// the valid types.
ValueType parse_value_type(const std::string& name);
const char* value_type_name(ValueType type);

// How rows are laid out at build time.
struct BuildOptions {
  // Rows per pruning block.
  int64_t block_rows = kDefaultBlockRows;
  // Reorders rows so that similar ones share blocks (tighter block bounds);
  // results always use the caller's row ids.
  bool reorder = true;
  ValueType values = kDefaultValueType;
  // kInt8 only: also keep every row's float32 values in a forward store (read
  // only for the rows SearchParams::rescore_k re-scores, and by to_csr).
  bool keep_float = false;
};

// A file (index or .bin) is missing, truncated, corrupted or of another format.
class FormatError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// A row-major float32 matrix owned by the caller.
struct DenseView {
  const float* data = nullptr;
  int64_t rows = 0;
  int64_t cols = 0;
};

// CSR rows owned by the caller: row i holds entries [indptr[i], indptr[i+1])
// of `indices` / `values` (indptr need not start at 0, so a view can address
// a row range of a larger matrix).
struct CsrView {
  const int64_t* indptr = nullptr;
  const int32_t* indices = nullptr;
  const float* values = nullptr;
  int64_t rows = 0;
};

// An owned CSR matrix with one int32 label per row: the contents of a .bin file.
struct CsrMatrix {
  int64_t cols = 0;  // 1 + the largest index (0 when there are no entries)
  std::vector<int64_t> indptr{0};
  std::vector<int32_t> indices;
  std::vector<float> values;
  std::vector<int32_t> labels;

  int64_t rows() const { return static_cast<int64_t>(indptr.size()) - 1; }
  // View of rows [begin, end).
  CsrView view(int64_t begin, int64_t end) const;
};

// Reads the .bin format of the original sparse-embed code (little-endian):
// int32 N, then per row: int32 label, int32 nnz, int32 indices[nnz],
// float32 values[nnz]. Zero values are dropped; indices must be below 2^24.
// Throws FormatError on a missing, truncated or malformed file.
CsrMatrix read_bin(const std::string& path);

// What to search for and how.
struct SearchParams {
  int64_t k = 10;
  // Only rows whose score is strictly above it are returned.
  float threshold = kNoThreshold;
  // When both are set, the top `rerank_k` rows by sparse score are re-scored
  // with the inner product of these dense vectors (row i of `rerank_database`
  // belongs to database row i, row q of `rerank_queries` to query q), and the
  // top k by dense score are returned with their dense scores.
  DenseView rerank_database;
  DenseView rerank_queries;
  int64_t rerank_k = kDefaultRerankK;
  int num_threads = kDefaultNumThreads;
  SearchMode mode = kDefaultSearchMode;
  // kApprox only: blocks scored per query at most (>= 1).
  int64_t max_blocks = 0;
  // 0: off. Otherwise (>= k, an int8 index with its forward store, no dense
  // re-rank): the top rescore_k rows by quantized score are re-scored
  // exactly from their float32 values (the float index's arithmetic, so the
  // scores are bit-identical to it) and the top k by exact score returned.
  int64_t rescore_k = 0;
  // Exact float32 top-k from an int8 index with its forward store (not with
  // rescore_k or the dense re-rank): every row whose quantized score is
  // within twice the quantization error bound of the k-th quantized score is
  // re-scored from its float32 values, so the results (ids, scores, ties)
  // are those of the float32 index in every exact mode, and the pruned
  // modes still skip the blocks whose bound falls short by that margin.
  bool rescore_exact = false;
  // Queries per group in [1, kMaxBatch]: a thread accumulates the queries of
  // its group that are answered exhaustively (mode kExhaustive, and kAuto's
  // exhaustive fall-back) together, reading each posting of their dimensions
  // once per group. Results are bit-identical to batch 1, with rescore_k,
  // rescore_exact and the dense re-rank too: each query of a group keeps its
  // own top-k (and exact re-scoring pool), re-scored or re-ranked after the
  // group's accumulation. The pruned modes and queries with few postings are
  // answered one at a time regardless.
  int64_t batch = kDefaultBatch;
  // With batch > 1, groups are formed from the queries sorted by the MinHash
  // signature of their support (the build's row order), so queries that share
  // dimensions share a group; false keeps the caller's order.
  bool group_by_support = true;
};

// Caller-owned output buffers of a batch of Q queries.
struct SearchOutput {
  int64_t* ids = nullptr;        // [Q, k]; -1 where fewer than k rows qualify
  float* scores = nullptr;       // [Q, k]; -inf where fewer than k rows qualify
  int64_t* postings = nullptr;   // [Q] postings touched (the paper's FLOPs); may be null
  int64_t* candidates = nullptr; // [Q] rows with a non-zero score above threshold; may be null
  double* seconds = nullptr;     // [Q] time spent on each query (a group's shared
                                 // accumulation split evenly); may be null
  int64_t* blocks = nullptr;     // [Q] row blocks scored (all of them when accumulated
                                 // exhaustively); may be null
  int64_t* scored = nullptr;     // [Q] postings actually read; may be null
  // [Q] with rescore_k, in an exact mode: 1 when the quantization error bound
  // proves the re-scored top-k is the exact top-k of the float rows, else 0
  // (always 1 with rescore_exact in an exact mode); may be null.
  uint8_t* certified = nullptr;
};

class SparseIndex {
 public:
  // Keeps entries with |x| > zero_threshold. Throws std::invalid_argument on
  // non-finite values or a negative threshold.
  static SparseIndex from_dense(const DenseView& x, float zero_threshold = kDefaultZeroThreshold,
                                const BuildOptions& options = {});
  // Builds from CSR rows with indices in [0, dim); `labels` (one per row) may
  // be null. Explicit zeros are dropped.
  static SparseIndex from_csr(const CsrView& x, int64_t dim, const int32_t* labels = nullptr,
                              const BuildOptions& options = {});
  // Reads a .bin file; dim <= 0 infers it as 1 + the largest index.
  static SparseIndex from_bin(const std::string& path, int64_t dim = 0,
                              const BuildOptions& options = {});
  // Memory-maps a file written by save() after checking its size, header and
  // checksums. Throws FormatError if it is truncated, corrupted or foreign.
  static SparseIndex load(const std::string& path);

  // Writes the versioned index file (see format.cpp for the layout).
  void save(const std::string& path) const;

  // This index (sharing its postings) with a confidence per row, by caller
  // row id: kept and saved with it, never read by the search. An empty
  // vector drops it (an index of no rows has none). Throws
  // std::invalid_argument unless it holds rows() finite values (or none).
  SparseIndex with_confidence(std::vector<float> confidence) const;

  // The rows in caller-id order, indices increasing within a row: the float32
  // values as given for a float32 index or an int8 one with its forward store,
  // the dequantized values otherwise. cols is dim().
  CsrMatrix to_csr() const;

  // Top-k of each query row (ties: lower row id first), exact unless
  // params.mode is kApprox. Query values
  // must be finite; CSR query indices must lie in [0, dim()).
  void search(const DenseView& queries, const SearchParams& params, const SearchOutput& out) const;
  void search(const CsrView& queries, const SearchParams& params, const SearchOutput& out) const;

  int64_t rows() const { return rows_; }
  int64_t dim() const { return dim_; }
  int64_t nnz() const { return nnz_; }
  ValueType value_type() const { return values_; }
  bool has_forward_store() const { return fwd_offsets_ != nullptr; }
  // Postings, segment bounds, labels and (int8) the per-dimension scales, in
  // bytes: what a query reads besides the block metadata.
  int64_t memory_bytes() const;
  // The forward store (0 without one): read only for re-scored rows.
  int64_t rescore_bytes() const;
  // Block metadata and the row order, in bytes.
  int64_t block_bytes() const;
  int64_t block_rows() const { return block_rows_; }
  int64_t num_blocks() const { return num_blocks_; }
  // Entries of the block-max lists (one per dimension present in a block).
  int64_t block_entries() const { return bm_entries_; }
  // Internal position -> caller row id, or null when rows keep their order.
  const uint32_t* row_order() const { return order_; }
  bool has_labels() const { return labels_ != nullptr; }
  const int32_t* labels() const { return labels_; }  // [rows] or null
  bool has_confidence() const { return confidence_ != nullptr; }
  const float* confidence() const { return confidence_; }  // [rows] or null, by caller row id
  bool memory_mapped() const;
  // Seconds spent building (or loading and verifying) the index.
  double build_seconds() const { return build_seconds_; }

 private:
  struct Storage;
  // The loader (format.cpp) points an index into a file mapping; the search
  // proper (query_engine.cpp) reads its postings and block metadata.
  friend class internal::IndexLoader;
  friend class internal::QueryEngine;
  template <typename Rows>
  static SparseIndex build(const Rows& rows, int64_t dim, const int32_t* labels,
                           const BuildOptions& options);
  template <typename Rows>
  static SparseIndex build_postings(const Rows& rows, int64_t dim, const int32_t* labels,
                                    std::vector<uint32_t> order);
  // Quantization, block metadata and derived arrays of a freshly built index;
  // sets build_seconds_.
  void finish_build(const BuildOptions& options, std::chrono::steady_clock::time_point start);
  // Fills the block-max lists from the postings (build, and version 1 files).
  void compute_blocks(Storage& storage, int64_t block_rows);
  // Stores the block-max entries' max / min levels and starts (compute_blocks).
  void store_block_extremes(Storage& storage, std::vector<float> hi, std::vector<float> lo,
                            std::vector<uint32_t> start);
  // Replaces the float32 values of a freshly built index by int8 codes
  // (keeping them as the forward store when keep_float).
  void quantize(Storage& storage, bool keep_float);
  // Copies the float32 postings into the forward store (quantize, keep_float).
  void keep_forward_store(Storage& storage);
  // Dequantized value of code c in dimension d (kInt8).
  float dequantize(int64_t d, uint8_t c) const {
    return (dim_signed_[d] ? static_cast<float>(static_cast<int8_t>(c)) : static_cast<float>(c)) *
           dim_scale_[d];
  }
  // Block-max entry e of dimension d: its max / min value (its first posting:
  // QueryEngine::entry_start).
  float entry_max(int64_t d, uint64_t e) const {
    return values_ == ValueType::kFloat32 ? bm_max_[e] : dequantize(d, bm_max_code_[e]);
  }
  float entry_min(int64_t d, uint64_t e) const {
    return values_ == ValueType::kFloat32 ? bm_min_[e] : dequantize(d, bm_min_code_[e]);
  }
  // Fills position_ (caller id -> position), dim_absmax_ and the bound
  // table into `storage`.
  void finish_derived(Storage& storage);
  // Fills the bound table (bound_hi_, bound_lo_, bound_unit_) from the
  // block-max lists, where it is small enough (finish_derived).
  void compute_bound_table(Storage& storage);

  std::shared_ptr<const Storage> storage_;
  // Postings of dimension d in row block b (rows [65536 b, 65536 (b + 1))):
  // [segments_[d * blocks_ + b], segments_[d * blocks_ + b + 1]).
  const uint64_t* segments_ = nullptr;  // [dim * blocks + 1]
  const uint16_t* post_rows_ = nullptr;  // [nnz] row - 65536 b, increasing within a segment
  const float* post_values_ = nullptr;   // [nnz], kFloat32
  const uint8_t* post_codes_ = nullptr;  // [nnz], kInt8: int8 or uint8 by dimension
  const float* dim_scale_ = nullptr;     // [dim], kInt8
  const uint8_t* dim_signed_ = nullptr;  // [dim], kInt8: 1 for int8 codes, 0 for uint8
  // Forward store (kInt8 with keep_float): the float32 entries of the row at
  // position i are [fwd_offsets_[i], fwd_offsets_[i + 1]) of fwd_dims_ /
  // fwd_values_, dimensions increasing.
  const uint64_t* fwd_offsets_ = nullptr;  // [rows + 1] or null
  const uint32_t* fwd_dims_ = nullptr;     // [nnz]
  const float* fwd_values_ = nullptr;      // [nnz]
  ValueType values_ = ValueType::kFloat32;
  const int32_t* labels_ = nullptr;      // [rows] or null, by caller row id
  // Per-row confidence by caller row id (with_confidence or a version 4
  // file), or null; owned_confidence_ holds it when it is not in the mapping.
  const float* confidence_ = nullptr;
  std::shared_ptr<const std::vector<float>> owned_confidence_;
  // Rows are stored in a build-time order: order_[position] is the caller id.
  const uint32_t* order_ = nullptr;      // [rows] or null (identity)
  const uint32_t* position_ = nullptr;   // [rows] inverse of order_, or null
  // Block-max lists: for dimension d, entries [bm_offsets_[d], bm_offsets_[d+1])
  // name the blocks (increasing) holding d, the max and min of d over the
  // block's rows (absent rows count as 0), and where the block's postings start
  // relative to d's first posting. An int8 index keeps the max and min as
  // codes (exact: the dequantized values are code * scale) and the start
  // relative to the first posting of d in the block's 65536-row segment
  // (below 65536): 8 bytes an entry instead of 16.
  const uint64_t* bm_offsets_ = nullptr;  // [dim + 1]
  const uint32_t* bm_block_ = nullptr;    // [E]
  const float* bm_max_ = nullptr;         // [E], kFloat32
  const float* bm_min_ = nullptr;         // [E], kFloat32
  const uint32_t* bm_start_ = nullptr;    // [E], kFloat32
  const uint8_t* bm_max_code_ = nullptr;  // [E], kInt8
  const uint8_t* bm_min_code_ = nullptr;  // [E], kInt8
  const uint16_t* bm_start16_ = nullptr;  // [E], kInt8
  const float* dim_absmax_ = nullptr;     // [dim] largest |value| of each dimension
  // Bound table, derived in memory (never stored in the file), where
  // dim * num_blocks is at most kBoundTableRatio * nnz: for dimension d and
  // block b, bound_hi_[d * num_blocks + b] * bound_unit_[d] >= the block's max
  // of d and >= 0, bound_lo_[...] * bound_unit_[d] >= -(its min) and >= 0
  // (bound_lo_ null when no value is negative). Codes round up, so the pruned
  // search bounds every block of a query by one streamed pass over its
  // terms' rows of the table (QueryEngine::bound_blocks_table), whatever the
  // blocks' entries.
  const uint8_t* bound_hi_ = nullptr;  // [dim * num_blocks] or null
  const uint8_t* bound_lo_ = nullptr;  // [dim * num_blocks] or null
  const float* bound_unit_ = nullptr;  // [dim]
  int64_t bm_entries_ = 0;
  int64_t block_rows_ = kDefaultBlockRows;
  int64_t num_blocks_ = 0;
  int64_t rows_ = 0;
  int64_t dim_ = 0;
  int64_t nnz_ = 0;
  int64_t blocks_ = 1;
  double build_seconds_ = 0.0;
};

}  // namespace sparse_embed

#endif  // SPARSE_EMBED_SEARCH_SPARSE_INDEX_H_
