// The search: QueryEngine answers a batch of queries against a SparseIndex
// (validate the parameters, prepare each query's terms, answer it by pruned,
// exhaustive or batched accumulation, re-score or re-rank, write its results,
// spread over threads), with the kernels its loops call (top-k scans,
// posting scatters, product tables, the dense dot product) in this
// translation unit, where the compiler inlines the posting scatters into
// those loops (the scans, the product tables and the dot product keep their
// AVX2 clones, picked once at load time).

#include <sched.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <exception>
#include <limits>
#include <mutex>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "index_internal.h"
#include "sparse_index.h"

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

// Cores this process may run on (its affinity mask under taskset, cpusets
// or a container), which can be fewer than the machine has.
int64_t available_cores() {
#if defined(__linux__) && defined(CPU_COUNT)
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) == 0) return std::max(1, CPU_COUNT(&set));
#endif
  return std::max<int64_t>(1, std::thread::hardware_concurrency());
}

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
// and the threshold less `lower` (see QueryEngine::quantization_error). Such rows
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

// Bound table: blocks bounded together, every term over them, before the
// next tile (16 KiB of float bounds, in L1).
constexpr int64_t kBoundTile = 4096;

// bounds[b] += weight * codes[b] for b in [0, n): widened to float,
// vectorised.
// The codes of the same term's next tile are prefetched meanwhile: each
// term's tile is a page of its own stream, where hardware prefetchers stop.
SPARSE_EMBED_MULTIVERSION
void add_codes(float* __restrict bounds, const uint8_t* __restrict codes, float weight, int64_t n,
               const uint8_t* end) {
  for (int64_t b = 0; b < n; b += 64) {
    if (codes + b + kBoundTile < end) __builtin_prefetch(codes + b + kBoundTile);
  }
  for (int64_t b = 0; b < n; ++b) bounds[b] += weight * static_cast<float>(codes[b]);
}

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
  std::vector<std::pair<int64_t, float>> entries;  // the query being prepared: (dim, weight)
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

// The queries of one search call, whatever their matrix type: the engine
// reads each query's entries once, when it prepares the query.
class QuerySource {
 public:
  virtual ~QuerySource() = default;
  virtual int64_t size() const = 0;
  // Query q's non-zero (dimension, weight) entries, in the matrix's order.
  virtual void read(int64_t q, std::vector<std::pair<int64_t, float>>& entries) const = 0;
  // The queries sorted by the MinHash signature of their support.
  virtual std::vector<uint32_t> support_order() const = 0;
};

template <typename Rows>
class RowsSource final : public QuerySource {
 public:
  explicit RowsSource(const Rows& rows) : rows_(rows) {}
  int64_t size() const override { return rows_.size(); }
  void read(int64_t q, std::vector<std::pair<int64_t, float>>& entries) const override {
    entries.clear();
    rows_.for_each(q, [&](int64_t d, float w) { entries.emplace_back(d, w); });
  }
  std::vector<uint32_t> support_order() const override { return similarity_order(rows_); }

 private:
  Rows rows_;
};

// A pruning block's upper bound and its number.
using BlockBound = std::pair<double, uint32_t>;

// Higher bound first; among equal bounds the lower block. A function object,
// not a function, so that std::sort and the heap operations inline it.
struct HigherBound {
  bool operator()(const BlockBound& a, const BlockBound& b) const {
    return a.first > b.first || (a.first == b.first && a.second < b.second);
  }
};
constexpr HigherBound higher_bound{};

}  // namespace

namespace internal {

// Answers a batch of queries against an index. Every way of answering a
// query is a method; they share one arithmetic (a row's products added in
// the query's term order, from 0), so every exact mode returns the same
// float32 scores bit for bit.
class QueryEngine {
 public:
  // Throws std::invalid_argument on parameters that do not fit the index or
  // the queries.
  QueryEngine(const SparseIndex& index, const QuerySource& queries, const SearchParams& params,
              const SearchOutput& out);
  // Answers every query: groups of params.batch queries handed out to threads.
  void run() const;

 private:
  void validate() const;
  void validate_rerank() const;
  void validate_rescore() const;

  void run_group(int64_t g, Workspace& ws) const;
  void prepare(int64_t q, Slot& slot, Workspace& ws) const;
  void fill_tables(Slot& slot) const;
  bool answer_alone(Workspace& ws, Slot& slot) const;
  bool worth_bounding(const Slot& slot) const;

  bool pruned(Workspace& ws, Slot& slot) const;
  double bound_blocks(Workspace& ws, const Slot& slot) const;
  double bound_blocks_table(Workspace& ws, const Slot& slot) const;
  void select_seeds(Workspace& ws, const Slot& slot, double slack, int64_t seeds) const;
  void select_survivors(Workspace& ws, const Slot& slot, double slack) const;
  bool visit(Workspace& ws, Slot& slot, const std::vector<BlockBound>& list) const;
  void score_block(Workspace& ws, Slot& slot, uint32_t b) const;
  uint64_t entry_start(int64_t d, uint64_t e) const;

  void exhaustive_touched(Workspace& ws, Slot& slot) const;
  void push_zero_rows(Workspace& ws, Slot& slot) const;
  void exhaustive_dense(Workspace& ws, Slot& slot) const;
  Segment segment(const Term& t, int64_t b) const;
  void batched(Workspace& ws) const;
  void merge_group_terms(Workspace& ws) const;
  void accumulate_span(Workspace& ws, int64_t span, int64_t from, int64_t len, bool last_span) const;
  int64_t scan(const float* buf, int64_t size, int64_t lo, Slot& slot, bool any_order) const;

  double quantization_error(const Slot& slot) const;
  void rescore_rows(Workspace& ws, const Slot& slot) const;
  uint8_t rescore_ranked(Workspace& ws, const Slot& slot, bool exact_mode) const;
  void rescore_pool(Workspace& ws, const Slot& slot) const;
  void rerank(Workspace& ws, const Slot& slot) const;
  void finish(Workspace& ws, Slot& slot) const;
  void write(const Workspace& ws, const Slot& slot) const;

  const SparseIndex& ix_;
  const QuerySource& queries_;
  const SearchParams& params_;
  const SearchOutput& out_;
  const int64_t num_queries_;
  const int64_t k_;
  const float threshold_;
  const bool quantized_;
  const bool rerank_;
  const bool rescore_;
  const bool exact_rescore_;
  int64_t max_blocks_ = 0;
  // Candidates the first top-k keeps (k, or the rows to re-rank or re-score),
  // and the results returned; neither above the rows.
  int64_t first_capacity_ = 0;
  int64_t final_capacity_ = 0;
  // Pruned modes: blocks scored before the others are filtered, at least
  // twice the blocks the first top-k fills.
  int64_t seed_blocks_ = 0;
  // The end of each posting array, where prefetching stops.
  const uint16_t* rows_end_ = nullptr;
  const float* values_end_ = nullptr;
  const uint8_t* codes_end_ = nullptr;
  // batch > 1 with group_by_support: the queries in the order groups take them.
  std::vector<uint32_t> order_;
};

QueryEngine::QueryEngine(const SparseIndex& index, const QuerySource& queries,
                         const SearchParams& params, const SearchOutput& out)
    : ix_(index),
      queries_(queries),
      params_(params),
      out_(out),
      num_queries_(queries.size()),
      k_(params.k),
      threshold_(params.threshold),
      quantized_(index.values_ == ValueType::kInt8),
      rerank_(params.rerank_database.data != nullptr || params.rerank_queries.data != nullptr),
      rescore_(params.rescore_k != 0),
      exact_rescore_(params.rescore_exact) {
  validate();
  max_blocks_ =
      params.mode == SearchMode::kApprox ? params.max_blocks : std::numeric_limits<int64_t>::max();
  first_capacity_ = std::min(rerank_ ? params.rerank_k : rescore_ ? params.rescore_k : k_, ix_.rows_);
  final_capacity_ = std::min(k_, ix_.rows_);
  seed_blocks_ = std::max<int64_t>(kSeedBlocks,
                                   2 * ((first_capacity_ + ix_.block_rows_ - 1) / ix_.block_rows_));
  rows_end_ = ix_.post_rows_ + ix_.nnz_;
  values_end_ = ix_.post_values_ + ix_.nnz_;
  codes_end_ = ix_.post_codes_ + ix_.nnz_;
  if (params.batch > 1 && params.group_by_support) order_ = queries.support_order();
}

// ---------------------------------------------------------------------------
// Validate.

void QueryEngine::validate() const {
  if (k_ < 1) throw std::invalid_argument("k must be >= 1, got " + std::to_string(k_));
  if (std::isnan(threshold_)) throw std::invalid_argument("threshold must not be NaN");
  if (params_.num_threads < 0) {
    throw std::invalid_argument("num_threads must be >= 0 (0: every core), got " +
                                std::to_string(params_.num_threads));
  }
  if (rerank_) validate_rerank();
  validate_rescore();
  if (params_.mode == SearchMode::kApprox ? params_.max_blocks < 1 : params_.max_blocks != 0) {
    throw std::invalid_argument(
        params_.mode == SearchMode::kApprox
            ? "approx search needs max_blocks >= 1 (blocks scored per query), got " +
                  std::to_string(params_.max_blocks)
            : std::string("max_blocks applies to mode approx only"));
  }
  if (params_.batch < 1 || params_.batch > kMaxBatch) {
    throw std::invalid_argument("batch must be in [1, " + std::to_string(kMaxBatch) +
                                "] (queries accumulated together), got " +
                                std::to_string(params_.batch));
  }
}

void QueryEngine::validate_rerank() const {
  const DenseView& db = params_.rerank_database;
  const DenseView& qd = params_.rerank_queries;
  if (db.data == nullptr || qd.data == nullptr) {
    throw std::invalid_argument("re-ranking needs both the database and the query dense vectors");
  }
  if (db.rows != ix_.rows_) {
    throw std::invalid_argument("rerank database must have one row per index row (" +
                                std::to_string(ix_.rows_) + "), got " + std::to_string(db.rows));
  }
  if (qd.rows != num_queries_ || qd.cols != db.cols) {
    throw std::invalid_argument("rerank queries must have shape [" + std::to_string(num_queries_) +
                                ", " + std::to_string(db.cols) + "], got [" +
                                std::to_string(qd.rows) + ", " + std::to_string(qd.cols) + "]");
  }
  if (params_.rerank_k < k_) {
    throw std::invalid_argument("rerank_k (" + std::to_string(params_.rerank_k) +
                                ") must be >= k (" + std::to_string(k_) + ")");
  }
  if (db.cols < 0 || (db.data == nullptr && db.rows * db.cols > 0)) {
    throw std::invalid_argument("rerank database: invalid dense matrix");
  }
  // The database is checked where the re-rank reads it (rerank): scanning all
  // of it here cost O(rows x cols) per call, most of a search at a million rows.
  check_dense(qd, "rerank queries");
}

void QueryEngine::validate_rescore() const {
  if (rescore_) {
    if (params_.rescore_k < k_) {
      throw std::invalid_argument("rescore_k (" + std::to_string(params_.rescore_k) +
                                  ") must be >= k (" + std::to_string(k_) + ")");
    }
    if (ix_.fwd_offsets_ == nullptr) {
      throw std::invalid_argument("rescore_k needs an int8 index built with keep_float (the float "
                                  "rows it re-scores from)");
    }
    if (rerank_) throw std::invalid_argument("rescore_k and the dense re-rank are exclusive");
  }
  if (exact_rescore_) {
    if (ix_.fwd_offsets_ == nullptr) {
      throw std::invalid_argument("exact re-scoring needs an int8 index built with keep_float (the "
                                  "float rows it re-scores from)");
    }
    if (rerank_ || rescore_) {
      throw std::invalid_argument("exact re-scoring excludes rescore_k and the dense re-rank");
    }
  }
}

// ---------------------------------------------------------------------------
// Run over threads.

void QueryEngine::run() const {
  const int64_t batch = params_.batch;
  const int64_t groups = (num_queries_ + batch - 1) / batch;
  int64_t threads = params_.num_threads > 0 ? params_.num_threads : available_cores();
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

// The queries of group g ([g * batch, (g + 1) * batch) of `order_`, or the
// query g itself without one). Queries left for accumulation by blocks run
// together when there are two or more of them whose terms increase in
// dimension (the others run alone); the group's accumulation time is split
// evenly among them.
void QueryEngine::run_group(int64_t g, Workspace& ws) const {
  const int64_t batch = params_.batch;
  const int64_t first = g * batch;
  const int64_t n = std::min(batch, num_queries_ - first);
  if (ws.slots.size() < static_cast<size_t>(n)) ws.slots.resize(n);
  ws.group.clear();
  for (int64_t i = 0; i < n; ++i) {
    Slot& slot = ws.slots[i];
    const auto start = Clock::now();
    prepare(order_.empty() ? first + i : order_[first + i], slot, ws);
    if (!answer_alone(ws, slot)) {
      if (batch > 1 && slot.increasing) {
        ws.group.push_back(&slot);
      } else {
        exhaustive_dense(ws, slot);
      }
    }
    slot.seconds = seconds_since(start);
  }
  if (ws.group.size() == 1) {
    const auto start = Clock::now();
    exhaustive_dense(ws, *ws.group[0]);
    ws.group[0]->seconds += seconds_since(start);
  } else if (!ws.group.empty()) {
    const auto start = Clock::now();
    batched(ws);
    const double share = seconds_since(start) / static_cast<double>(ws.group.size());
    for (Slot* slot : ws.group) slot->seconds += share;
  }
  for (int64_t i = 0; i < n; ++i) {
    Slot& slot = ws.slots[i];
    const auto start = Clock::now();
    finish(ws, slot);
    if (out_.seconds != nullptr) out_.seconds[slot.query] = slot.seconds + seconds_since(start);
  }
}

// ---------------------------------------------------------------------------
// Prepare.

// Collects query q's terms into `slot` and resets its top-k and counters.
void QueryEngine::prepare(int64_t q, Slot& slot, Workspace& ws) const {
  const SparseIndex& ix = ix_;
  slot.query = q;
  slot.terms.clear();
  slot.increasing = true;
  slot.postings = 0;
  slot.entries = 0;
  slot.random_entries = 0.0;
  slot.candidates = 0;
  slot.blocks = ix.num_blocks_;
  slot.scored = 0;
  queries_.read(q, ws.entries);
  for (const auto& [d, w] : ws.entries) {
    const uint64_t* segments = ix.segments_ + d * ix.blocks_;
    const auto size = static_cast<int64_t>(segments[ix.blocks_] - segments[0]);
    if (size == 0) continue;
    if (!slot.terms.empty() && slot.terms.back().dim >= d) slot.increasing = false;
    slot.terms.push_back({segments, w, d});
    slot.postings += size;
    slot.entries += static_cast<int64_t>(ix.bm_offsets_[d + 1] - ix.bm_offsets_[d]);
    // A block of R random rows holds d with probability 1 - (1 - p)^R.
    const double p = std::min(1.0, static_cast<double>(size) / static_cast<double>(ix.rows_));
    slot.random_entries += static_cast<double>(ix.num_blocks_) *
                           (p < 1.0 ? -std::expm1(static_cast<double>(ix.block_rows_) * std::log1p(-p))
                                    : 1.0);
  }
  if (quantized_) fill_tables(slot);
  slot.scored = slot.postings;
  slot.certified = 0;
  slot.top.reset(first_capacity_);
  slot.pool.rows.clear();
  if (exact_rescore_) {
    const double error = quantization_error(slot);
    slot.pool.widen = 2.0 * error;
    slot.pool.lower = error;
  }
}

// int8 index: each term's products with the 256 codes of its dimension.
void QueryEngine::fill_tables(Slot& slot) const {
  slot.tables.resize(slot.terms.size() * kCodes);
  float* table = slot.tables.data();
  for (Term& t : slot.terms) {
    fill_table(table, kCodeLevels.level[ix_.dim_signed_[t.dim]], ix_.dim_scale_[t.dim], t.weight);
    t.table = table;
    table += kCodes;
  }
}

// Answers the slot's query unless it is to be accumulated by blocks of rows
// (exhaustive_dense or batched); returns whether it did.
bool QueryEngine::answer_alone(Workspace& ws, Slot& slot) const {
  if (ix_.rows_ == 0) return true;
  if (worth_bounding(slot) && pruned(ws, slot)) return true;
  slot.blocks = ix_.num_blocks_;
  slot.scored = slot.postings;
  slot.candidates = 0;
  if (slot.postings * kSparseModeRatio < ix_.rows_) {
    exhaustive_touched(ws, slot);
    return true;
  }
  return false;
}

// Bounding costs about one posting per block-max entry: when the query's
// lists are nearly as long as its postings (blocks as mixed as the whole
// database), or when the seeds alone are a large part of the rows (a small
// index), mode kAuto accumulates exhaustively.
bool QueryEngine::worth_bounding(const Slot& slot) const {
  if (params_.mode == SearchMode::kExhaustive) return false;
  if (params_.mode != SearchMode::kAuto) return true;
  return slot.entries * kPruneEntryRatio <= slot.postings &&
         static_cast<double>(slot.entries) * kPruneCoherence <= slot.random_entries &&
         seed_blocks_ * ix_.block_rows_ * kPruneRowRatio <= ix_.rows_;
}

// ---------------------------------------------------------------------------
// Pruned.
//
// Block-max pruning over the query's terms (slot.terms), into slot.top.
//
// A block's bound adds, per query term of weight w, w * (the block's max of
// that dimension) for w > 0 and w * (its min) for w < 0, rows lacking the
// dimension counting as 0: no row of the block can score above it in exact
// arithmetic. The bounds are summed term at a time from the block-max lists
// (one float add per list entry, no search) and raised by twice the worst
// rounding error of a float32 sum of the query's products, 2 (terms + 2) *
// 2^-23 * sum |w| * max |value|: once for the bound's own float sum, once for
// the score as the exhaustive mode computes it. Blocks are scored in
// decreasing bound (equal bounds: the lower block first) while the bound
// reaches the k-th score (equal may still hold a tie with a lower caller id)
// and is above the threshold; each block is scored term by term in the
// query's order, the arithmetic of the exhaustive mode, so its scores are
// bit-identical. The kSeedBlocks highest bounds are found by one scan and
// scored first, so the k-th score is high before the other blocks are
// filtered against it; only the survivors are sorted. Returns false, with
// nothing kept, when mode kAuto finds that more than 1 / kPruneRowRatio of
// the rows would still have to be scored: exhaustive accumulation (identical
// results) is cheaper then.
bool QueryEngine::pruned(Workspace& ws, Slot& slot) const {
  const double slack = bound_blocks(ws, slot);
  if (ws.block.size() < static_cast<size_t>(ix_.block_rows_)) ws.block.resize(ix_.block_rows_);
  slot.blocks = 0;
  slot.scored = 0;
  slot.candidates = 0;
  const int64_t seeds = std::min<int64_t>(max_blocks_, seed_blocks_);
  select_seeds(ws, slot, slack, seeds);
  const bool more = static_cast<int64_t>(ws.order.size()) == seeds;
  if (!visit(ws, slot, ws.order) || !more) return true;
  select_survivors(ws, slot, slack);
  if (params_.mode == SearchMode::kAuto &&
      static_cast<int64_t>(ws.rest.size()) * ix_.block_rows_ * kPruneRowRatio > ix_.rows_) {
    slot.top.reset(first_capacity_);
    slot.pool.rows.clear();
    return false;
  }
  std::sort(ws.rest.begin(), ws.rest.end(), higher_bound);
  visit(ws, slot, ws.rest);
  return true;
}

// Sums every block's bound into ws.bounds; returns the slack to add to them.
double QueryEngine::bound_blocks(Workspace& ws, const Slot& slot) const {
  const SparseIndex& ix = ix_;
  if (ix.bound_hi_ != nullptr) return bound_blocks_table(ws, slot);
  ws.bounds.assign(static_cast<size_t>(ix.num_blocks_), 0.0f);
  float* bounds = ws.bounds.data();
  double magnitude = 0.0;
  for (const Term& t : slot.terms) {
    const float w = t.weight;
    const uint64_t end = ix.bm_offsets_[t.dim + 1];
    if (quantized_) {
      // The table's product of the extreme code is the float index's bound.
      const uint8_t* bound = w > 0 ? ix.bm_max_code_ : ix.bm_min_code_;
      for (uint64_t e = ix.bm_offsets_[t.dim]; e < end; ++e) bounds[ix.bm_block_[e]] += t.table[bound[e]];
    } else {
      const float* bound = w > 0 ? ix.bm_max_ : ix.bm_min_;
      for (uint64_t e = ix.bm_offsets_[t.dim]; e < end; ++e) bounds[ix.bm_block_[e]] += w * bound[e];
    }
    magnitude += std::fabs(static_cast<double>(w)) * ix.dim_absmax_[t.dim];
  }
  return 2.0 * static_cast<double>(slot.terms.size() + 2) * std::ldexp(magnitude, -23) + 1e-30;
}

// The same from the bound table: per term of weight w, |w| * unit times the
// block's code (of its max for w > 0, of minus its min for w < 0), which is
// at least the term's block-max bound. The table is read a tile of blocks at
// a time, every term over the tile, so the tile's bounds stay in L1; each
// term's codes are one sequential stream. The slack covers the float32
// rounding of these sums (of |w| * unit, of the products and of the sum, each
// below (terms + 2) 2^-24 of the magnitude) as well as the score's.
double QueryEngine::bound_blocks_table(Workspace& ws, const Slot& slot) const {
  const SparseIndex& ix = ix_;
  const int64_t blocks = ix.num_blocks_;
  ws.bounds.assign(static_cast<size_t>(blocks), 0.0f);
  float* bounds = ws.bounds.data();
  double magnitude = 0.0;
  for (const Term& t : slot.terms) {
    magnitude += std::fabs(static_cast<double>(t.weight)) * 255.0 * ix.bound_unit_[t.dim];
  }
  for (int64_t tile = 0; tile < blocks; tile += kBoundTile) {
    const int64_t len = std::min(kBoundTile, blocks - tile);
    for (const Term& t : slot.terms) {
      // A negative weight on a dimension without negative values adds at most 0.
      const uint8_t* table = t.weight > 0 ? ix.bound_hi_ : ix.bound_lo_;
      if (table == nullptr) continue;
      add_codes(bounds + tile, table + t.dim * blocks + tile, std::fabs(t.weight) * ix.bound_unit_[t.dim],
                len, table + (t.dim + 1) * blocks);
    }
  }
  return 3.0 * static_cast<double>(slot.terms.size() + 2) * std::ldexp(magnitude, -23) + 1e-30;
}

// Seeds: the `seeds` highest bounds above the threshold, into ws.order in
// decreasing bound, found by one scan with a heap whose front is the lowest.
void QueryEngine::select_seeds(Workspace& ws, const Slot& slot, double slack, int64_t seeds) const {
  const float* bounds = ws.bounds.data();
  auto& heap = ws.order;
  heap.clear();
  for (int64_t b = 0; b < ix_.num_blocks_; ++b) {
    const double hi = bounds[b] + slack;
    if (!(hi + slot.pool.lower > threshold_)) continue;
    const BlockBound entry{hi, static_cast<uint32_t>(b)};
    if (static_cast<int64_t>(heap.size()) < seeds) {
      heap.push_back(entry);
      std::push_heap(heap.begin(), heap.end(), higher_bound);
    } else if (higher_bound(entry, heap.front())) {
      std::pop_heap(heap.begin(), heap.end(), higher_bound);
      heap.back() = entry;
      std::push_heap(heap.begin(), heap.end(), higher_bound);
    }
  }
  std::sort_heap(heap.begin(), heap.end(), higher_bound);
}

// The rest: blocks other than the seeds that can still enter, into ws.rest
// (unsorted). A block's bound is below a seed's or equal with a higher
// block id, so sorting them keeps the global order.
void QueryEngine::select_survivors(Workspace& ws, const Slot& slot, double slack) const {
  float* bounds = ws.bounds.data();
  for (const BlockBound& s : ws.order) bounds[s.second] = -std::numeric_limits<float>::infinity();
  const TopK& top = slot.top;
  const double cut =
      top.full() ? static_cast<double>(top.worst()) : -std::numeric_limits<double>::infinity();
  auto& rest = ws.rest;
  rest.clear();
  for (int64_t b = 0; b < ix_.num_blocks_; ++b) {
    const double hi = bounds[b] + slack;
    if (hi + slot.pool.lower > threshold_ && hi + slot.pool.widen >= cut) {
      rest.push_back({hi, static_cast<uint32_t>(b)});
    }
  }
}

// Scores `list` (sorted by higher_bound) until no block can enter; false
// when the budget ran out or a block could not.
bool QueryEngine::visit(Workspace& ws, Slot& slot, const std::vector<BlockBound>& list) const {
  for (const auto& [hi, b] : list) {
    if (slot.blocks >= max_blocks_ || (slot.top.full() && hi + slot.pool.widen < slot.top.worst())) {
      return false;
    }
    score_block(ws, slot, b);
  }
  return true;
}

// Scores pruning block b term by term into ws.block, then scans it.
void QueryEngine::score_block(Workspace& ws, Slot& slot, uint32_t b) const {
  const SparseIndex& ix = ix_;
  float* buf = ws.block.data();
  const int64_t lo = int64_t{b} * ix.block_rows_;
  const int64_t size = std::min(ix.block_rows_, ix.rows_ - lo);
  // Blocks never straddle a 65536-row segment (block_rows divides it).
  const int64_t local = lo & (kBlockRows - 1);
  const uint16_t* post_rows = ix.post_rows_;
  std::fill(buf, buf + size, 0.0f);
  // Without negative values, a zero code in the bound table means the block
  // has no posting of the dimension: no search for it.
  const uint8_t* present = ix.bound_lo_ == nullptr ? ix.bound_hi_ : nullptr;
  for (const Term& t : slot.terms) {
    if (present != nullptr && present[t.dim * ix.num_blocks_ + b] == 0) continue;
    const uint32_t* first = ix.bm_block_ + ix.bm_offsets_[t.dim];
    const uint32_t* last = ix.bm_block_ + ix.bm_offsets_[t.dim + 1];
    const uint32_t* it = std::lower_bound(first, last, b);
    if (it == last || *it != b) continue;
    const uint64_t e = static_cast<uint64_t>(it - ix.bm_block_);
    const uint64_t begin = entry_start(t.dim, e);
    const uint64_t end = it + 1 < last ? entry_start(t.dim, e + 1) : t.segments[ix.blocks_];
    const float w = t.weight;
    if (quantized_) {
      const uint8_t* codes = ix.post_codes_;
      for (uint64_t p = begin; p < end; ++p) buf[post_rows[p] - local] += t.table[codes[p]];
    } else {
      const float* values = ix.post_values_;
      for (uint64_t p = begin; p < end; ++p) buf[post_rows[p] - local] += w * values[p];
    }
    slot.scored += static_cast<int64_t>(end - begin);
  }
  slot.candidates += scan(buf, size, lo, slot, true);
  ++slot.blocks;
}

// The first posting of block-max entry e of dimension d.
uint64_t QueryEngine::entry_start(int64_t d, uint64_t e) const {
  const uint64_t* seg = ix_.segments_ + d * ix_.blocks_;
  if (!quantized_) return seg[0] + ix_.bm_start_[e];
  return seg[(int64_t{ix_.bm_block_[e]} * ix_.block_rows_) >> kBlockBits] + ix_.bm_start16_[e];
}

// ---------------------------------------------------------------------------
// Exhaustive.

// A query with few postings: accumulated into the full score vector,
// remembering the rows touched and visiting only those.
void QueryEngine::exhaustive_touched(Workspace& ws, Slot& slot) const {
  const SparseIndex& ix = ix_;
  TopK& top = slot.top;
  if (ws.scores.empty()) {
    ws.scores.assign(ix.rows_, 0.0f);
    ws.seen.assign(ix.rows_, 0);
  }
  float* s = ws.scores.data();
  uint8_t* seen = ws.seen.data();
  ws.touched.clear();
  for (const Term& t : slot.terms) {
    for (int64_t b = 0; b < ix.blocks_; ++b) {
      const auto base = static_cast<uint32_t>(b << kBlockBits);
      for (uint64_t p = t.segments[b]; p < t.segments[b + 1]; ++p) {
        const uint32_t r = base + ix.post_rows_[p];
        if (!seen[r]) {
          seen[r] = 1;
          ws.touched.push_back(r);
        }
        s[r] += quantized_ ? t.table[ix.post_codes_[p]] : t.weight * ix.post_values_[p];
      }
    }
  }
  const uint32_t* order = ix.order_;
  for (const uint32_t r : ws.touched) {
    if (s[r] != 0.0f && s[r] > threshold_) {
      ++slot.candidates;
      top.push({s[r], order != nullptr ? order[r] : r});
    }
  }
  if (exact_rescore_) {
    // Touched rows may score 0 by cancellation, and not exactly in float.
    const float joins = slot.pool.cut(top, threshold_);
    for (const uint32_t r : ws.touched) {
      if (s[r] >= joins) slot.pool.rows.push_back({s[r], order != nullptr ? order[r] : r});
    }
  }
  if (0.0f > threshold_) push_zero_rows(ws, slot);
  for (const uint32_t r : ws.touched) {
    s[r] = 0.0f;
    seen[r] = 0;
  }
}

// Every row the query did not touch scores exactly 0; when 0 qualifies, the
// lowest caller ids among them compete too.
void QueryEngine::push_zero_rows(Workspace& ws, Slot& slot) const {
  const float* s = ws.scores.data();
  const uint8_t* seen = ws.seen.data();
  size_t taken = 0;
  for (int64_t c = 0; c < ix_.rows_ && taken < slot.top.capacity(); ++c) {
    const int64_t r = ix_.position_ != nullptr ? ix_.position_[c] : c;
    if (s[r] == 0.0f) {
      slot.top.push({0.0f, static_cast<uint32_t>(c)});
      ++taken;
      // An untouched row scores 0 in float too.
      if (exact_rescore_ && !seen[r]) slot.pool.rows.push_back({0.0f, static_cast<uint32_t>(c)});
    }
  }
}

// A query with many postings: one cache-resident block of rows at a time,
// then a scan of the block while it is hot.
void QueryEngine::exhaustive_dense(Workspace& ws, Slot& slot) const {
  const int64_t rows = ix_.rows_;
  if (ws.block.size() < static_cast<size_t>(std::min(rows, kBlockRows))) {
    ws.block.resize(std::min(rows, kBlockRows));
  }
  float* buf = ws.block.data();
  for (int64_t b = 0; b < ix_.blocks_; ++b) {
    const int64_t lo = b << kBlockBits;
    const int64_t size = std::min(rows - lo, kBlockRows);
    std::fill(buf, buf + size, 0.0f);
    // One term after the other, in the query's order: every mode adds a
    // row's products in that order, so their float32 scores agree bit for
    // bit (interleaving two terms' scatters would reorder them).
    for (const Term& t : slot.terms) {
      if (quantized_) {
        scatter_codes(buf, segment(t, b), rows_end_, codes_end_);
      } else {
        scatter(buf, segment(t, b), 0, rows_end_, values_end_);
      }
    }
    slot.candidates += scan(buf, size, lo, slot, ix_.order_ != nullptr);
  }
}

// Term t's postings in segment block b.
Segment QueryEngine::segment(const Term& t, int64_t b) const {
  const uint64_t begin = t.segments[b];
  return Segment{ix_.post_rows_ + begin, quantized_ ? nullptr : ix_.post_values_ + begin,
                 quantized_ ? ix_.post_codes_ + begin : nullptr, t.table,
                 static_cast<int64_t>(t.segments[b + 1] - begin), t.weight};
}

// ---------------------------------------------------------------------------
// Batched.
//
// The queries ws.group, accumulated exhaustively together. Their terms are
// merged by dimension; each segment block is cut into spans whose scores,
// one buffer of `span` rows per query, stay in L2 together, and each span
// reads the postings of every dimension of the group once, adding them into
// the buffer of each query that holds the dimension. A query's terms
// increase in dimension (Slot::increasing), so the merged order adds a row's
// products in the query's order: its scores equal exhaustive_dense's bit for
// bit. Its top-k sees the rows in the same order too.
void QueryEngine::batched(Workspace& ws) const {
  const auto n = static_cast<int64_t>(ws.group.size());
  merge_group_terms(ws);
  // The largest power of two that keeps the group's scores within
  // kBatchScoreBytes (and no more than the rows of a segment block).
  int64_t span = kBlockRows;
  while (span > kMinBatchRows && span * n * static_cast<int64_t>(sizeof(float)) > kBatchScoreBytes) {
    span /= 2;
  }
  ws.group_scores.resize(static_cast<size_t>(n * span));
  for (int64_t b = 0; b < ix_.blocks_; ++b) {
    const int64_t lo = b << kBlockBits;
    const int64_t size = std::min(ix_.rows_ - lo, kBlockRows);
    for (GroupDim& g : ws.group_dims) {
      g.cursor = g.segments[b];
      g.end = g.segments[b + 1];
    }
    for (int64_t from = 0; from < size; from += span) {
      const int64_t len = std::min(span, size - from);
      accumulate_span(ws, span, from, len, from + len >= size);
      for (int64_t i = 0; i < n; ++i) {
        Slot& slot = *ws.group[i];
        slot.candidates +=
            scan(ws.group_scores.data() + i * span, len, lo + from, slot, ix_.order_ != nullptr);
      }
    }
  }
}

// The group's terms by dimension, then slot (ws.group_terms), and its
// distinct dimensions (ws.group_dims).
void QueryEngine::merge_group_terms(Workspace& ws) const {
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
}

// Rows [from, from + len) of the current segment block: every group
// dimension's postings there, scattered into the group's score buffers.
void QueryEngine::accumulate_span(Workspace& ws, int64_t span, int64_t from, int64_t len,
                                  bool last_span) const {
  const uint16_t* post_rows = ix_.post_rows_;
  float* buf = ws.group_scores.data();
  const auto n = static_cast<int64_t>(ws.group.size());
  for (int64_t i = 0; i < n; ++i) std::fill(buf + i * span, buf + i * span + len, 0.0f);
  for (GroupDim& g : ws.group_dims) {
    // Positions within a segment increase: the span's postings are a prefix of the rest.
    const uint64_t stop =
        last_span ? g.end
                  : static_cast<uint64_t>(std::lower_bound(post_rows + g.cursor, post_rows + g.end,
                                                           static_cast<uint16_t>(from + len)) -
                                          post_rows);
    const GroupTerm* first = ws.group_terms.data() + g.first;
    const GroupTerm* last = ws.group_terms.data() + g.last;
    if (quantized_) {
      scatter_group(buf, span, from, post_rows, ix_.post_codes_, g.cursor, stop, first, last,
                    rows_end_, codes_end_);
    } else {
      scatter_group(buf, span, from, post_rows, ix_.post_values_, g.cursor, stop, first, last,
                    rows_end_, values_end_);
    }
    g.cursor = stop;
  }
}

// Exact re-scoring: rows of the slot's pool (scan_block_pool) rather than the heap.
int64_t QueryEngine::scan(const float* buf, int64_t size, int64_t lo, Slot& slot,
                          bool any_order) const {
  return exact_rescore_
             ? scan_block_pool(buf, size, lo, threshold_, slot.top, ix_.order_, any_order, slot.pool)
             : scan_block(buf, size, lo, threshold_, slot.top, ix_.order_, any_order);
}

// ---------------------------------------------------------------------------
// Rescore.

// |exact - quantized score| of any row is below E = sum |w| * scale over the
// query's terms (a code is off by at most half a level, or a level for the
// smallest codes) plus the float32 rounding of both sums, 2 (terms + 2) *
// 2^-23 * sum |w| * (max |value| + scale).
double QueryEngine::quantization_error(const Slot& slot) const {
  double error = 0.0;
  double magnitude = 0.0;
  for (const Term& t : slot.terms) {
    const double w = std::fabs(static_cast<double>(t.weight));
    error += w * ix_.dim_scale_[t.dim];
    magnitude += w * (static_cast<double>(ix_.dim_absmax_[t.dim]) + ix_.dim_scale_[t.dim]);
  }
  return error + 2.0 * static_cast<double>(slot.terms.size() + 2) * std::ldexp(magnitude, -23);
}

// Re-scores the rows of ws.ranked from the forward store and leaves the top
// k by exact score (above the threshold) in it. Each score adds the products
// w * x of the row's dimensions in the query's term order, from 0, as every
// mode of a float32 index does: the same float32 result bit for bit.
void QueryEngine::rescore_rows(Workspace& ws, const Slot& slot) const {
  const SparseIndex& ix = ix_;
  TopK& top = ws.second;
  top.reset(final_capacity_);
  // The row spread over a dense vector (zero elsewhere): a term the row
  // lacks adds w * 0, which leaves any float32 sum unchanged (the sums never
  // hold -0: they start at +0 and x + -x is +0).
  if (ws.row.empty()) ws.row.assign(static_cast<size_t>(ix.dim_), 0.0f);
  float* row = ws.row.data();
  // The candidates' rows are scattered over the store: their positions,
  // offsets and entries are fetched in three rounds of independent loads
  // rather than one dependent chain per row.
  ws.positions.resize(ws.ranked.size());
  for (size_t j = 0; j < ws.ranked.size(); ++j) {
    const uint32_t id = ws.ranked[j].row;
    ws.positions[j] = ix.position_ != nullptr ? ix.position_[id] : id;
    __builtin_prefetch(ix.fwd_offsets_ + ws.positions[j]);
  }
  for (const uint32_t i : ws.positions) {
    __builtin_prefetch(ix.fwd_dims_ + ix.fwd_offsets_[i]);
    __builtin_prefetch(ix.fwd_values_ + ix.fwd_offsets_[i]);
  }
  for (size_t j = 0; j < ws.ranked.size(); ++j) {
    const Candidate& c = ws.ranked[j];
    const uint32_t i = ws.positions[j];
    const uint64_t begin = ix.fwd_offsets_[i], end = ix.fwd_offsets_[i + 1];
    for (uint64_t p = begin; p < end; ++p) row[ix.fwd_dims_[p]] = ix.fwd_values_[p];
    float score = 0.0f;
    for (const Term& t : slot.terms) score += t.weight * row[t.dim];
    for (uint64_t p = begin; p < end; ++p) row[ix.fwd_dims_[p]] = 0.0f;
    if (score > threshold_) top.push({score, c.row});
  }
  top.take_sorted(ws.ranked);
}

// rescore_k: re-scores ws.ranked (the top rescore_k by quantized score, best
// first). Returns whether the top-k is provably exact (`exact_mode`: every
// row left out scored at most the last quantized score kept, or at most the
// threshold when fewer qualified, so its exact score is below that plus the
// quantization error, and a k-th exact score above it proves it).
uint8_t QueryEngine::rescore_ranked(Workspace& ws, const Slot& slot, bool exact_mode) const {
  const bool kept_all = static_cast<int64_t>(ws.ranked.size()) == first_capacity_;
  const double left_out = kept_all ? static_cast<double>(ws.ranked.back().score) : threshold_;
  rescore_rows(ws, slot);
  if (!exact_mode) return 0;
  // Every row was re-scored.
  if (kept_all ? first_capacity_ == ix_.rows_ : threshold_ == kNoThreshold) return 1;
  const double reach = left_out + quantization_error(slot);
  return static_cast<int64_t>(ws.ranked.size()) == final_capacity_
             ? static_cast<double>(ws.ranked.back().score) > reach
             : static_cast<double>(threshold_) >= reach;
}

// rescore_exact: the pool rows that still reach the final cut, re-scored. A
// row left out scored below the k-th quantized score Q less 2E (or the
// threshold less E): its exact score is below Q - E, itself at most the k-th
// exact score among the k rows that scored Q or more (or below the
// threshold), so it cannot enter the exact top-k.
void QueryEngine::rescore_pool(Workspace& ws, const Slot& slot) const {
  const bool full = static_cast<int64_t>(ws.ranked.size()) == first_capacity_;
  double cut = static_cast<double>(threshold_) - slot.pool.lower;
  if (full) cut = std::max(cut, static_cast<double>(ws.ranked.back().score) - slot.pool.widen);
  ws.ranked.clear();
  for (const Candidate& c : slot.pool.rows) {
    if (static_cast<double>(c.score) >= cut) ws.ranked.push_back(c);
  }
  rescore_rows(ws, slot);
}

// The dense re-rank: ws.ranked re-scored by the inner product of the dense
// vectors, the top k kept.
void QueryEngine::rerank(Workspace& ws, const Slot& slot) const {
  const DenseView& db = params_.rerank_database;
  const float* qv = params_.rerank_queries.data + slot.query * db.cols;
  ws.second.reset(final_capacity_);
  for (const Candidate& c : ws.ranked) {
    const float* row = db.data + int64_t{c.row} * db.cols;
    const float score = dot(row, qv, db.cols);
    // The queries are finite (validate_rerank), so a non-finite product has a
    // non-finite value in the row, or overflowed.
    if (!std::isfinite(score)) {
      for (int64_t j = 0; j < db.cols; ++j) {
        if (!std::isfinite(row[j])) {
          throw std::invalid_argument("rerank database must be finite; row " + std::to_string(c.row) +
                                      " column " + std::to_string(j) + " is " + std::to_string(row[j]));
        }
      }
    }
    ws.second.push({score, c.row});
  }
  ws.second.take_sorted(ws.ranked);
}

// ---------------------------------------------------------------------------
// Finish.

// Re-scores or re-ranks the slot's top-k if asked and writes its results.
void QueryEngine::finish(Workspace& ws, Slot& slot) const {
  ws.ranked.clear();
  if (ix_.rows_ > 0) {
    const bool exact_mode = params_.mode != SearchMode::kApprox;
    slot.top.take_sorted(ws.ranked);
    if (rescore_) slot.certified = rescore_ranked(ws, slot, exact_mode);
    if (exact_rescore_) {
      rescore_pool(ws, slot);
      slot.certified = exact_mode;
    }
    if (rerank_) rerank(ws, slot);
  }
  write(ws, slot);
}

// The slot's results (ws.ranked, best first) and counters into the output.
void QueryEngine::write(const Workspace& ws, const Slot& slot) const {
  const int64_t q = slot.query;
  const int64_t found = std::min<int64_t>(static_cast<int64_t>(ws.ranked.size()), k_);
  for (int64_t i = 0; i < found; ++i) {
    out_.ids[q * k_ + i] = ws.ranked[i].row;
    out_.scores[q * k_ + i] = ws.ranked[i].score;
  }
  for (int64_t i = found; i < k_; ++i) {
    out_.ids[q * k_ + i] = -1;
    out_.scores[q * k_ + i] = -std::numeric_limits<float>::infinity();
  }
  if (out_.postings != nullptr) out_.postings[q] = slot.postings;
  if (out_.blocks != nullptr) out_.blocks[q] = slot.blocks;
  if (out_.scored != nullptr) out_.scored[q] = slot.scored;
  if (out_.candidates != nullptr) out_.candidates[q] = slot.candidates;
  if (out_.certified != nullptr) out_.certified[q] = slot.certified;
}

}  // namespace internal

// ---------------------------------------------------------------------------
// The public entry points: check the queries, then run the engine.

void SparseIndex::search(const DenseView& queries, const SearchParams& params,
                         const SearchOutput& out) const {
  if (queries.cols != dim_) {
    throw std::invalid_argument("queries must have shape [Q, " + std::to_string(dim_) +
                                "] (the index dim), got [" + std::to_string(queries.rows) + ", " +
                                std::to_string(queries.cols) + "]");
  }
  check_dense(queries, "queries");
  const RowsSource<DenseRows> source(DenseRows{queries, 0.0f});
  internal::QueryEngine(*this, source, params, out).run();
}

void SparseIndex::search(const CsrView& queries, const SearchParams& params,
                         const SearchOutput& out) const {
  check_csr(queries, dim_, "queries");
  const RowsSource<CsrRows> source(CsrRows{queries});
  internal::QueryEngine(*this, source, params, out).run();
}

}  // namespace sparse_embed
