// pybind11 adapter of the index core: converts arrays, checks shapes, releases
// the GIL around the work. sparse_embed/search/index.py is the documented Python API.

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <optional>
#include <string>
#include <utility>

#include "sparse_index.h"

namespace py = pybind11;
namespace se = sparse_embed;

namespace {

template <typename T>
using Array = py::array_t<T, py::array::c_style | py::array::forcecast>;

std::string shape_of(const py::array& a) {
  std::string s = "[";
  for (py::ssize_t i = 0; i < a.ndim(); ++i) s += (i ? ", " : "") + std::to_string(a.shape(i));
  return s + "]";
}

se::DenseView dense_view(const Array<float>& a, const std::string& name, const std::string& expected,
                         int64_t rows = -1, int64_t cols = -1) {
  if (a.ndim() != 2 || (rows >= 0 && a.shape(0) != rows) || (cols >= 0 && a.shape(1) != cols)) {
    throw py::value_error(name + " must have shape " + expected + ", got " + shape_of(a));
  }
  return {a.data(), a.shape(0), a.shape(1)};
}

// Validates CSR arrays: indptr [rows + 1], indices and values [nnz].
se::CsrView csr_view(const Array<int64_t>& indptr, const Array<int32_t>& indices,
                     const Array<float>& values, const std::string& name) {
  if (indptr.ndim() != 1 || indptr.shape(0) < 1) {
    throw py::value_error(name + " indptr must have shape [rows + 1], got " + shape_of(indptr));
  }
  if (indices.ndim() != 1 || values.ndim() != 1 || indices.shape(0) != values.shape(0)) {
    throw py::value_error(name + " indices and values must both have shape [nnz], got " +
                          shape_of(indices) + " and " + shape_of(values));
  }
  const int64_t rows = indptr.shape(0) - 1;
  const int64_t last = indptr.data()[rows];
  if (indptr.data()[0] < 0 || last < indptr.data()[0] || last > indices.shape(0)) {
    throw py::value_error(name + " indptr must run from 0 to at most nnz = " +
                          std::to_string(indices.shape(0)) + ", got " +
                          std::to_string(indptr.data()[0]) + " .. " + std::to_string(last));
  }
  return {indptr.data(), indices.data(), values.data(), rows};
}

// BuildOptions from the Python arguments; an unknown value type is a ValueError.
se::BuildOptions build_options(int64_t block_rows, bool reorder, const std::string& values,
                               bool keep_float) {
  se::BuildOptions options;
  options.block_rows = block_rows;
  options.reorder = reorder;
  try {
    options.values = se::parse_value_type(values);
  } catch (const std::invalid_argument& e) {
    throw py::value_error(e.what());
  }
  options.keep_float = keep_float;
  return options;
}

// Runs a search over `queries` (a DenseView or CsrView of `num_queries` rows)
// and returns (ids, scores, postings, candidates, seconds, blocks, scored,
// certified).
template <typename View>
py::tuple run_search(const se::SparseIndex& index, const View& queries, int64_t num_queries,
                        int64_t k, std::optional<float> threshold,
                        const std::optional<Array<float>>& rerank_database,
                        const std::optional<Array<float>>& rerank_queries, int64_t rerank_k,
                        int num_threads, const std::string& mode,
                        std::optional<int64_t> max_blocks, int64_t rescore_k, bool rescore_exact,
                        int64_t batch, bool group_by_support) {
  if (k < 1) throw py::value_error("k must be >= 1, got " + std::to_string(k));
  if (rerank_database.has_value() != rerank_queries.has_value()) {
    throw py::value_error("re-ranking needs both the database and the query dense vectors");
  }
  se::SearchParams params;
  params.k = k;
  params.threshold = threshold.value_or(se::kNoThreshold);
  params.rerank_k = rerank_k;
  params.num_threads = num_threads;
  try {
    params.mode = se::parse_search_mode(mode);
  } catch (const std::invalid_argument& e) {
    throw py::value_error(e.what());
  }
  params.max_blocks = max_blocks.value_or(0);
  params.rescore_k = rescore_k;
  params.rescore_exact = rescore_exact;
  params.batch = batch;
  params.group_by_support = group_by_support;
  if (rerank_database) {
    params.rerank_database =
        dense_view(*rerank_database, "rerank database", "[N, Dd] with N = " +
                   std::to_string(index.rows()) + " (one row per index row)", index.rows());
    params.rerank_queries = dense_view(
        *rerank_queries, "rerank queries",
        "[Q, Dd] = [" + std::to_string(num_queries) + ", " +
            std::to_string(params.rerank_database.cols) + "] (one row per query)",
        num_queries, params.rerank_database.cols);
  }
  Array<int64_t> ids({num_queries, k});
  Array<float> scores({num_queries, k});
  Array<int64_t> postings(num_queries);
  Array<int64_t> candidates(num_queries);
  Array<double> seconds(num_queries);
  Array<int64_t> blocks(num_queries);
  Array<int64_t> scored(num_queries);
  py::array_t<bool> certified(num_queries);
  se::SearchOutput out;
  out.ids = ids.mutable_data();
  out.scores = scores.mutable_data();
  out.postings = postings.mutable_data();
  out.candidates = candidates.mutable_data();
  out.seconds = seconds.mutable_data();
  out.blocks = blocks.mutable_data();
  out.scored = scored.mutable_data();
  static_assert(sizeof(bool) == sizeof(uint8_t), "certified flags are written as bytes");
  out.certified = reinterpret_cast<uint8_t*>(certified.mutable_data());
  {
    py::gil_scoped_release release;
    index.search(queries, params, out);
  }
  return py::make_tuple(ids, scores, postings, candidates, seconds, blocks, scored, certified);
}

}  // namespace

PYBIND11_MODULE(_search, m) {
  m.doc() = "C++ inverted index over sparse embeddings (use sparse_embed.search).";
  m.attr("DEFAULT_RERANK_K") = se::kDefaultRerankK;
  m.attr("DEFAULT_NUM_THREADS") = se::kDefaultNumThreads;
  m.attr("DEFAULT_ZERO_THRESHOLD") = se::kDefaultZeroThreshold;
  m.attr("INDEX_FORMAT_VERSION") = se::kIndexFormatVersion;
  m.attr("DEFAULT_BLOCK_ROWS") = se::kDefaultBlockRows;
  m.attr("DEFAULT_BATCH") = se::kDefaultBatch;
  m.attr("MAX_BATCH") = se::kMaxBatch;
  m.attr("DEFAULT_SEARCH_MODE") = se::search_mode_name(se::kDefaultSearchMode);
  m.attr("SEARCH_MODES") = py::make_tuple(se::search_mode_name(se::SearchMode::kExhaustive),
                                          se::search_mode_name(se::SearchMode::kPruned),
                                          se::search_mode_name(se::SearchMode::kApprox),
                                          se::search_mode_name(se::SearchMode::kAuto));
  m.attr("DEFAULT_VALUE_TYPE") = se::value_type_name(se::kDefaultValueType);
  m.attr("VALUE_TYPES") = py::make_tuple(se::value_type_name(se::ValueType::kFloat32),
                                         se::value_type_name(se::ValueType::kInt8));
  py::register_exception<se::FormatError>(m, "FormatError", PyExc_ValueError);

  py::class_<se::SparseIndex>(m, "Index")
      .def_static(
          "from_dense",
          [](const Array<float>& x, float zero_threshold, int64_t block_rows, bool reorder,
             const std::string& value_type, bool keep_float) {
            const se::DenseView view = dense_view(x, "database", "[N, D]");
            const se::BuildOptions options = build_options(block_rows, reorder, value_type, keep_float);
            py::gil_scoped_release release;
            return se::SparseIndex::from_dense(view, zero_threshold, options);
          },
          py::arg("x"), py::arg("zero_threshold") = se::kDefaultZeroThreshold,
          py::arg("block_rows") = se::kDefaultBlockRows, py::arg("reorder") = true,
          py::arg("value_type") = se::value_type_name(se::kDefaultValueType),
          py::arg("keep_float") = false)
      .def_static(
          "from_csr",
          [](const Array<int64_t>& indptr, const Array<int32_t>& indices, const Array<float>& values,
             int64_t dim, const std::optional<Array<int32_t>>& labels, int64_t block_rows,
             bool reorder, const std::string& value_type, bool keep_float) {
            const se::CsrView view = csr_view(indptr, indices, values, "database");
            const int32_t* label_data = nullptr;
            if (labels) {
              if (labels->ndim() != 1 || labels->shape(0) != view.rows) {
                throw py::value_error("labels must have shape [" + std::to_string(view.rows) +
                                      "], got " + shape_of(*labels));
              }
              label_data = labels->data();
            }
            const se::BuildOptions options = build_options(block_rows, reorder, value_type, keep_float);
            py::gil_scoped_release release;
            return se::SparseIndex::from_csr(view, dim, label_data, options);
          },
          py::arg("indptr"), py::arg("indices"), py::arg("values"), py::arg("dim"),
          py::arg("labels") = py::none(), py::arg("block_rows") = se::kDefaultBlockRows,
          py::arg("reorder") = true, py::arg("value_type") = se::value_type_name(se::kDefaultValueType),
          py::arg("keep_float") = false)
      .def_static(
          "from_bin",
          [](const std::string& path, int64_t dim, int64_t block_rows, bool reorder,
             const std::string& value_type, bool keep_float) {
            const se::BuildOptions options = build_options(block_rows, reorder, value_type, keep_float);
            py::gil_scoped_release release;
            return se::SparseIndex::from_bin(path, dim, options);
          },
          py::arg("path"), py::arg("dim") = 0, py::arg("block_rows") = se::kDefaultBlockRows,
          py::arg("reorder") = true, py::arg("value_type") = se::value_type_name(se::kDefaultValueType),
          py::arg("keep_float") = false)
      .def_static(
          "load",
          [](const std::string& path) {
            py::gil_scoped_release release;
            return se::SparseIndex::load(path);
          },
          py::arg("path"))
      .def(
          "save",
          [](const se::SparseIndex& index, const std::string& path) {
            py::gil_scoped_release release;
            index.save(path);
          },
          py::arg("path"))
      .def(
          "search_dense",
          [](const se::SparseIndex& index, const Array<float>& queries, int64_t k,
             std::optional<float> threshold, const std::optional<Array<float>>& rerank_database,
             const std::optional<Array<float>>& rerank_queries, int64_t rerank_k, int num_threads,
             const std::string& mode, std::optional<int64_t> max_blocks, int64_t rescore_k,
             bool rescore_exact, int64_t batch, bool group_by_support) {
            const se::DenseView view = dense_view(
                queries, "queries", "[Q, " + std::to_string(index.dim()) + "]", -1, index.dim());
            return run_search(index, view, view.rows, k, threshold, rerank_database,
                              rerank_queries, rerank_k, num_threads, mode, max_blocks, rescore_k,
                              rescore_exact, batch, group_by_support);
          },
          py::arg("queries"), py::arg("k"), py::arg("threshold") = py::none(),
          py::arg("rerank_database") = py::none(), py::arg("rerank_queries") = py::none(),
          py::arg("rerank_k") = se::kDefaultRerankK, py::arg("num_threads") = se::kDefaultNumThreads,
          py::arg("mode") = se::search_mode_name(se::kDefaultSearchMode),
          py::arg("max_blocks") = py::none(), py::arg("rescore_k") = 0,
          py::arg("rescore_exact") = false, py::arg("batch") = se::kDefaultBatch,
          py::arg("group_by_support") = true)
      .def(
          "search_csr",
          [](const se::SparseIndex& index, const Array<int64_t>& indptr, const Array<int32_t>& indices,
             const Array<float>& values, int64_t k, std::optional<float> threshold,
             const std::optional<Array<float>>& rerank_database,
             const std::optional<Array<float>>& rerank_queries, int64_t rerank_k, int num_threads,
             const std::string& mode, std::optional<int64_t> max_blocks, int64_t rescore_k,
             bool rescore_exact, int64_t batch, bool group_by_support) {
            const se::CsrView view = csr_view(indptr, indices, values, "queries");
            return run_search(index, view, view.rows, k, threshold, rerank_database,
                              rerank_queries, rerank_k, num_threads, mode, max_blocks, rescore_k,
                              rescore_exact, batch, group_by_support);
          },
          py::arg("indptr"), py::arg("indices"), py::arg("values"), py::arg("k"),
          py::arg("threshold") = py::none(), py::arg("rerank_database") = py::none(),
          py::arg("rerank_queries") = py::none(), py::arg("rerank_k") = se::kDefaultRerankK,
          py::arg("num_threads") = se::kDefaultNumThreads,
          py::arg("mode") = se::search_mode_name(se::kDefaultSearchMode),
          py::arg("max_blocks") = py::none(), py::arg("rescore_k") = 0,
          py::arg("rescore_exact") = false, py::arg("batch") = se::kDefaultBatch,
          py::arg("group_by_support") = true)
      .def(
          "to_csr",
          [](const se::SparseIndex& index) {
            se::CsrMatrix m;
            {
              py::gil_scoped_release release;
              m = index.to_csr();
            }
            auto array = [](const auto& v) {
              using T = typename std::decay_t<decltype(v)>::value_type;
              return Array<T>(static_cast<py::ssize_t>(v.size()), v.data());
            };
            return py::make_tuple(array(m.indptr), array(m.indices), array(m.values));
          })
      .def_property_readonly("value_type",
                             [](const se::SparseIndex& index) { return se::value_type_name(index.value_type()); })
      .def_property_readonly("keeps_float", &se::SparseIndex::has_forward_store)
      .def_property_readonly("rescore_nbytes", &se::SparseIndex::rescore_bytes)
      .def_property_readonly("rows", &se::SparseIndex::rows)
      .def_property_readonly("block_rows", &se::SparseIndex::block_rows)
      .def_property_readonly("num_blocks", &se::SparseIndex::num_blocks)
      .def_property_readonly("block_entries", &se::SparseIndex::block_entries)
      .def_property_readonly("block_nbytes", &se::SparseIndex::block_bytes)
      .def_property_readonly("row_order", [](const se::SparseIndex& index) -> py::object {
        if (index.row_order() == nullptr) return py::none();
        return Array<uint32_t>(index.rows(), index.row_order());
      })
      .def_property_readonly("dim", &se::SparseIndex::dim)
      .def_property_readonly("nnz", &se::SparseIndex::nnz)
      .def_property_readonly("nbytes", &se::SparseIndex::memory_bytes)
      .def_property_readonly("memory_mapped", &se::SparseIndex::memory_mapped)
      .def_property_readonly("build_seconds", &se::SparseIndex::build_seconds)
      .def_property_readonly("labels", [](const se::SparseIndex& index) -> py::object {
        if (!index.has_labels()) return py::none();
        return Array<int32_t>(index.rows(), index.labels());
      })
      .def(
          "with_confidence",
          [](const se::SparseIndex& index, const std::optional<Array<float>>& confidence) {
            if (!confidence) return index.with_confidence({});
            if (confidence->ndim() != 1 || confidence->shape(0) != index.rows()) {
              throw py::value_error("confidence must have shape [" + std::to_string(index.rows()) +
                                    "], one per row, got " + shape_of(*confidence));
            }
            const float* data = confidence->data();
            return index.with_confidence(std::vector<float>(data, data + index.rows()));
          },
          py::arg("confidence"))
      .def_property_readonly("confidence", [](const se::SparseIndex& index) -> py::object {
        if (!index.has_confidence()) return py::none();
        return Array<float>(index.rows(), index.confidence());
      });
}
