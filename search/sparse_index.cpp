// The public class's small pieces: the names of search modes and value types,
// input checks shared by the build and the search, the index's sizes and
// to_csr. The rest of the core lives in format.cpp, build.cpp and
// query_engine.cpp (see index_internal.h).

#include "sparse_index.h"

#include <cmath>
#include <string>
#include <utility>
#include <vector>

#include "index_internal.h"

namespace sparse_embed {

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

CsrView CsrMatrix::view(int64_t begin, int64_t end) const {
  CsrView v;
  v.indptr = indptr.data() + begin;
  v.indices = indices.data();
  v.values = values.data();
  v.rows = end - begin;
  return v;
}

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

int64_t SparseIndex::memory_bytes() const {
  const bool quantized = values_ == ValueType::kInt8;
  return 8 * (dim_ * blocks_ + 1) + (quantized ? 3 * nnz_ + 5 * dim_ : 6 * nnz_) +
         (labels_ != nullptr ? 4 * rows_ : 0);
}

SparseIndex SparseIndex::with_confidence(std::vector<float> confidence) const {
  SparseIndex index = *this;
  index.confidence_ = nullptr;
  index.owned_confidence_.reset();
  if (confidence.empty()) return index;
  if (static_cast<int64_t>(confidence.size()) != rows_) {
    throw std::invalid_argument("confidence must have shape [" + std::to_string(rows_) +
                                "], one per row, got [" + std::to_string(confidence.size()) + "]");
  }
  for (size_t i = 0; i < confidence.size(); ++i) {
    if (!std::isfinite(confidence[i])) {
      throw std::invalid_argument("confidence must be finite; row " + std::to_string(i) + " has " +
                                  std::to_string(confidence[i]));
    }
  }
  auto owned = std::make_shared<const std::vector<float>>(std::move(confidence));
  index.confidence_ = owned->data();
  index.owned_confidence_ = std::move(owned);
  return index;
}

int64_t SparseIndex::rescore_bytes() const {
  return fwd_offsets_ != nullptr ? 8 * (rows_ + 1) + 8 * nnz_ : 0;
}

int64_t SparseIndex::block_bytes() const {
  // Block-max lists (block, max, min, start: 16 bytes an entry, 8 with int8
  // values), their per-dimension bounds, the per-dimension |max|, and the
  // order with its inverse.
  // The bound table, where kept: a byte per dimension and block (two with
  // negative values) and a unit per dimension.
  const int64_t entry = values_ == ValueType::kInt8 ? 8 : 16;
  const int64_t table = bound_hi_ == nullptr ? 0
                        : dim_ * num_blocks_ * (bound_lo_ != nullptr ? 2 : 1) + 4 * dim_;
  return entry * bm_entries_ + 8 * (dim_ + 1) + 4 * dim_ + (order_ != nullptr ? 8 * rows_ : 0) +
         table;
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

}  // namespace sparse_embed
