// Building an index: the row order (MinHash clusters, so similar rows share
// pruning blocks), the postings of every (dimension, segment block), the
// block-max metadata the pruned search bounds blocks with, and int8
// quantization with its float32 forward store. The loader (format.cpp)
// reuses compute_blocks to check or recompute a file's block metadata.

#include <algorithm>
#include <array>
#include <cmath>
#include <limits>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "index_internal.h"
#include "sparse_index.h"

namespace sparse_embed {
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
// Rows that agree on every value of some band are candidates; a candidate
// pair is joined (union-find) only when its supports are verified similar
// (kJoinJaccard). A pair of Jaccard similarity J agrees on a band with
// probability J^r (r = kBandHashes). Short bands catch pairs whose supports
// differ a lot: two images of an identity that each keep 75% of its 32
// dimensions and add 8 of their own (J ~ 0.39) agree on one of 24 bands of
// 4 with probability ~0.43, so the 45 pairs of an identity of 10 images
// leave it connected; bands of 6 (the previous order, without verification)
// joined such a pair with probability ~0.05. Chance agreements of unrelated
// rows are frequent with bands this short (about one candidate a row and
// band at 1M rows), hence the verification, which also keeps a chain of
// them from merging unrelated clusters.
constexpr int kBands = 24;
constexpr int kBandHashes = 4;
// Candidates are joined when |intersection| / |union| of their supports
// reaches 1 / kJoinJaccardInverse.
constexpr int64_t kJoinJaccardInverse = 4;
// Rows of one band bucket compared pairwise, at most this far apart in it (a
// bucket of many rows, e.g. rows of one popular dimension set, costs
// O(size * kBucketWindow) comparisons, not O(size^2)).
constexpr int64_t kBucketWindow = 16;
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

// Signature hashes of every dimension (kSignature each), or none when there
// are more than kTableDims dimensions.
std::vector<int16_t> signature_table(int64_t dim) {
  std::vector<int16_t> table;
  if (dim <= kTableDims) {
    table.resize(static_cast<size_t>(dim) * kSignature);
    for (int64_t d = 0; d < dim; ++d) {
      for (int j = 0; j < kSignature; ++j) table[d * kSignature + j] = signature_hash(d, j);
    }
  }
  return table;
}

// The band hashes of a row of dimensions `dims` into bands[b * n] (0: an
// empty row, in no band).
void row_bands(const std::vector<int64_t>& dims, const std::vector<int16_t>& table, int64_t n,
               uint32_t* bands) {
  // Minima in kLanes-wide groups the compiler keeps in vector registers (a
  // loop over the whole signature kept it in memory: 3-4x slower).
  int16_t sig[kSignature / kLanes][kLanes];
  for (auto& group : sig) std::fill(group, group + kLanes, std::numeric_limits<int16_t>::max());
  std::array<int16_t, kSignature> computed;
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
    bands[b * n] = dims.empty() ? 0 : static_cast<uint32_t>(h >> 32) | 1;
  }
}

// Every row's support, dimensions increasing: row i's are
// dims[offsets[i], offsets[i + 1]).
struct Supports {
  std::vector<uint64_t> offsets{0};
  std::vector<uint32_t> dims;

  // |intersection| * kJoinJaccardInverse >= |union| (merge of two sorted lists).
  bool similar(uint32_t a, uint32_t b) const {
    const uint32_t* x = dims.data() + offsets[a];
    const uint32_t* x_end = dims.data() + offsets[a + 1];
    const uint32_t* y = dims.data() + offsets[b];
    const uint32_t* y_end = dims.data() + offsets[b + 1];
    const int64_t total = (x_end - x) + (y_end - y);
    int64_t common = 0;
    while (x < x_end && y < y_end) {
      common += *x == *y;
      const uint32_t u = *x, v = *y;
      x += u <= v;
      y += v <= u;
    }
    return common > 0 && common * kJoinJaccardInverse >= total - common;
  }
};

// bands[b * n + i]: row i's hash of band b; fills `supports`.
template <typename Rows>
std::vector<uint32_t> band_hashes(const Rows& rows, int64_t dim, Supports& supports) {
  const int64_t n = rows.size();
  const std::vector<int16_t> table = signature_table(dim);
  std::vector<uint32_t> bands(static_cast<size_t>(n) * kBands);
  std::vector<int64_t> dims;
  supports.offsets.assign(1, 0);
  supports.offsets.reserve(static_cast<size_t>(n) + 1);
  for (int64_t i = 0; i < n; ++i) {
    dims.clear();
    rows.for_each(i, [&](int64_t d, float) { dims.push_back(d); });
    row_bands(dims, table, n, bands.data() + i);
    std::sort(dims.begin(), dims.end());
    supports.dims.insert(supports.dims.end(), dims.begin(), dims.end());
    supports.offsets.push_back(supports.dims.size());
  }
  return bands;
}

// Rows joined when they share the hash of some band and their supports are
// similar (Supports::similar).
Clusters join_bands(const std::vector<uint32_t>& bands, const Supports& supports, int64_t n) {
  Clusters clusters(n);
  std::vector<uint64_t> run(n);
  std::vector<uint64_t> tmp;
  for (int b = 0; b < kBands; ++b) {
    for (int64_t i = 0; i < n; ++i) run[i] = uint64_t{bands[b * n + i]} << 32 | static_cast<uint64_t>(i);
    sort_by_high_word(run, tmp);
    for (int64_t i = 1; i < n; ++i) {
      const uint32_t h = static_cast<uint32_t>(run[i] >> 32);
      if (h == 0) continue;
      const auto row = static_cast<uint32_t>(run[i]);
      for (int64_t j = i - 1; j >= std::max<int64_t>(0, i - kBucketWindow); --j) {
        if (static_cast<uint32_t>(run[j] >> 32) != h) break;
        const auto other = static_cast<uint32_t>(run[j]);
        if (clusters.find(other) != clusters.find(row) && supports.similar(other, row)) {
          clusters.join(other, row);
        }
      }
    }
  }
  return clusters;
}

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
  const std::vector<uint32_t> order = similarity_order(rows);
  Supports supports;
  const std::vector<uint32_t> bands = band_hashes(rows, dim, supports);
  Clusters clusters = join_bands(bands, supports, n);
  // A cluster's place: the first position of its rows in `order`.
  std::vector<uint32_t> first(n, std::numeric_limits<uint32_t>::max());
  for (int64_t p = 0; p < n; ++p) {
    uint32_t& f = first[clusters.find(order[p])];
    if (f > p) f = static_cast<uint32_t>(p);
  }
  std::vector<uint64_t> run(n);
  std::vector<uint64_t> tmp;
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

std::vector<uint32_t> similarity_order(const DenseRows& rows) { return similarity_order<DenseRows>(rows); }
std::vector<uint32_t> similarity_order(const CsrRows& rows) { return similarity_order<CsrRows>(rows); }

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

// The float32 values as the forward store: rows by position, dimensions
// increasing (a counting sort of the postings).
void SparseIndex::keep_forward_store(Storage& storage) {
  const uint64_t nnz = static_cast<uint64_t>(nnz_);
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

// Codes round to the nearest level; a value too small for the smallest level
// of its sign takes it anyway, so support, postings and candidate counts stay
// those of the float index (the per-value error is below scale / 2, and below
// scale for those smallest values).
void SparseIndex::quantize(Storage& storage, bool keep_float) {
  const uint64_t nnz = static_cast<uint64_t>(nnz_);
  if (keep_float) keep_forward_store(storage);
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
  store_block_extremes(storage, std::move(hi), std::move(lo), std::move(start));
}

// The block-max lists' max, min and start of every entry: codes and 16-bit
// starts on an int8 index, float32 values and 32-bit starts otherwise.
void SparseIndex::store_block_extremes(Storage& storage, std::vector<float> hi, std::vector<float> lo,
                                       std::vector<uint32_t> start) {
  if (values_ == ValueType::kInt8) {
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
  compute_bound_table(storage);
  if (order_ != nullptr) {
    storage.position.assign(static_cast<size_t>(rows_), 0);
    for (int64_t i = 0; i < rows_; ++i) storage.position[order_[i]] = static_cast<uint32_t>(i);
    position_ = storage.position.data();
  }
}

// Codes round each block's extreme up, in units of a 255th of the dimension's
// largest |value| (a hair more, so that the largest stays within code 255).
void SparseIndex::compute_bound_table(Storage& storage) {
  if (dim_ * num_blocks_ > kBoundTableRatio * std::max<int64_t>(nnz_, 1)) return;
  // Units of subnormal size would round codes too coarsely to stay above.
  for (int64_t d = 0; d < dim_; ++d) {
    if (dim_absmax_[d] > 0.0f && dim_absmax_[d] < std::numeric_limits<float>::min() * 512.0f) return;
  }
  const auto cells = static_cast<size_t>(dim_ * num_blocks_);
  storage.bound_unit.assign(static_cast<size_t>(dim_), 0.0f);
  storage.bound_hi.assign(cells, 0);
  bool negative = false;
  for (int64_t d = 0; d < dim_ && !negative; ++d) {
    for (uint64_t e = bm_offsets_[d]; e < bm_offsets_[d + 1]; ++e) negative |= entry_min(d, e) < 0.0f;
  }
  if (negative) storage.bound_lo.assign(cells, 0);
  // The smallest code c with c * unit >= x (x >= 0), in the arithmetic the
  // query bounds with (a float unit, products in float).
  const auto code = [](float x, float unit) {
    if (!(x > 0.0f)) return uint8_t{0};
    double c = std::ceil(static_cast<double>(x) / static_cast<double>(unit));
    while (c * static_cast<double>(unit) < static_cast<double>(x)) c += 1.0;
    return static_cast<uint8_t>(std::min(c, 255.0));
  };
  for (int64_t d = 0; d < dim_; ++d) {
    const float unit = dim_absmax_[d] / 255.0f * (1.0f + 0x1p-16f);
    storage.bound_unit[d] = unit;
    uint8_t* hi = storage.bound_hi.data() + d * num_blocks_;
    uint8_t* lo = negative ? storage.bound_lo.data() + d * num_blocks_ : nullptr;
    for (uint64_t e = bm_offsets_[d]; e < bm_offsets_[d + 1]; ++e) {
      hi[bm_block_[e]] = code(entry_max(d, e), unit);
      if (lo != nullptr) lo[bm_block_[e]] = code(-entry_min(d, e), unit);
    }
  }
  bound_unit_ = storage.bound_unit.data();
  bound_hi_ = storage.bound_hi.data();
  bound_lo_ = negative ? storage.bound_lo.data() : nullptr;
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

}  // namespace sparse_embed
