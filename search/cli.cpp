// Standalone search benchmark on .bin embedding files (the original calling
// convention of sparse-embed's search binary, plus named options).
//
//   search <db.bin>[,<db2.bin>,...] <rerank_topk> <threshold> [queries.bin] [options]
//
// Several database files, comma-separated, are shards holding consecutive row
// ranges in the order given (the rows of db2.bin come after those of db.bin):
// each is indexed and searched on its own and the per-shard top-k lists are
// merged by score, ties to the lower row, which is exactly the top-k of one
// index over all the rows. A database file not ending in .bin is an index
// file written by SparseIndex.save (python -m sparse_embed.search shard); all
// index files must share one dimension.
//
// Without a query file the first 10,000 rows of the database files are the
// queries and the rest the database (half of the rows when there are fewer
// than 20,000). Dense re-ranking reads float32 .npy matrices (numpy.save of a
// C-ordered float32 [rows, Dd] array): --db_dense has one row per database
// row, all files in order; --query_dense one per row of queries.bin (not
// needed without a query file, where the first rows of --db_dense belong to
// the queries). With several shards the global top rerank_topk by sparse
// score are re-ranked, as with one file: each shard scores its candidates
// with the dense vectors in a second pass. --value_type int8 builds the .bin
// shards with int8 postings; --rescore_k R (int8 only) re-scores each shard's
// top R by quantized score exactly in float (the .bin shards keep their float
// rows for it; index files need them saved) before the shards are merged, and
// --rescore_k exact returns the float index's results (SearchParams::rescore_exact).
//
// Options are spelled as in the Python command lines (--k, --num_threads,
// --value_type, --rescore_k, ...), as `--name value` or `--name=value`; the
// old spellings (--topk, --threads, --db-dense, ...) still work for one
// release with a one-line deprecation note on stderr.

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <limits>
#include <memory>
#include <new>
#include <string>
#include <utility>
#include <vector>

#include "sparse_index.h"

namespace se = sparse_embed;

namespace {

constexpr int64_t kDefaultQueries = 10000;
constexpr int64_t kDefaultTopK = 10;

const char kUsage[] =
    "usage: search <db.bin>[,<db2.bin>,...] <rerank_topk> <threshold> [queries.bin] [--k K]\n"
    "              [--num_threads N] [--db_dense DB.npy [--query_dense QUERIES.npy]]\n"
    "              [--value_type float32|int8] [--rescore_k R|exact]\n"
    "              [--output_ids IDS.npy] [--output_scores SCORES.npy]\n"
    "  db.bin,...   database shards in row order: .bin files, or index files (other names)\n"
    "  rerank_topk  sparse candidates re-ranked with the dense vectors (0: no re-ranking)\n"
    "  threshold    only rows scoring above it are candidates ('none': every row)\n"
    "  queries.bin  query rows; default: the first 10000 database rows (half when there are\n"
    "               fewer than 20000 rows), searched against the rest\n"
    "  --k K        results per query (default 10)\n"
    "  --num_threads N  worker threads (default 0: every core)\n"
    "  --db_dense / --query_dense  float32 [rows, Dd] .npy files for re-ranking\n"
    "  --value_type T  posting values of the indexes built from .bin files (default float32)\n"
    "  --rescore_k R  int8: re-score the top R (>= K) by quantized score in float ('exact':\n"
    "               every row that may be in the float top-K); not with re-ranking\n"
    "  --output_ids IDS.npy / --output_scores SCORES.npy  write the results: int64 / float32\n"
    "               [queries, K], database row ids counted over all files (-1 / -inf where\n"
    "               fewer qualify)\n"
    "  Options take `--name value` or `--name=value`.\n";

// Old option spellings, kept for one release: each use prints one deprecation line.
const std::pair<const char*, const char*> kDeprecatedOptions[] = {
    {"--topk", "--k"},
    {"--threads", "--num_threads"},
    {"--db-dense", "--db_dense"},
    {"--query-dense", "--query_dense"},
    {"--values", "--value_type"},
    {"--rescore-k", "--rescore_k"},
    {"--ids", "--output_ids"},
    {"--scores", "--output_scores"},
};

// The current spelling of option `name`, noting an old one on stderr.
std::string current_option(const std::string& name) {
  for (const auto& [old_name, new_name] : kDeprecatedOptions) {
    if (name == old_name) {
      std::fprintf(stderr, "search: warning: %s is deprecated and goes in the next release; use %s\n",
                   old_name, new_name);
      return new_name;
    }
  }
  return name;
}

class UsageError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

struct Args {
  std::vector<std::string> db_paths;
  std::string query_path;
  int64_t rerank_topk = 0;
  float threshold = se::kNoThreshold;
  int64_t topk = kDefaultTopK;
  int threads = se::kDefaultNumThreads;
  std::string db_dense_path;
  std::string query_dense_path;
  std::string ids_path;
  std::string scores_path;
  se::ValueType values = se::kDefaultValueType;
  int64_t rescore_k = 0;
  bool rescore_exact = false;
};

int64_t parse_int(const std::string& text, const char* what, int64_t min) {
  char* end = nullptr;
  errno = 0;
  const long long v = std::strtoll(text.c_str(), &end, 10);
  if (text.empty() || *end != '\0' || errno != 0 || v < min) {
    throw UsageError(std::string(what) + " must be an integer >= " + std::to_string(min) +
                     ", got '" + text + "'");
  }
  return v;
}

float parse_threshold(const std::string& text) {
  if (text == "none") return se::kNoThreshold;
  char* end = nullptr;
  const float v = std::strtof(text.c_str(), &end);
  if (text.empty() || *end != '\0' || std::isnan(v)) {
    throw UsageError("threshold must be a number or 'none', got '" + text + "'");
  }
  return v;
}

Args parse_args(int argc, char** argv) {
  Args args;
  std::vector<std::string> positional;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "-h" || a == "--help") {
      std::fputs(kUsage, stdout);
      std::exit(0);
    }
    if (a.rfind("--", 0) == 0) {
      const size_t equals = a.find('=');
      const std::string name = current_option(a.substr(0, equals));
      std::string value;
      if (equals != std::string::npos) {
        value = a.substr(equals + 1);
      } else {
        if (i + 1 >= argc) throw UsageError(name + " needs a value");
        value = argv[++i];
      }
      if (name == "--k") {
        args.topk = parse_int(value, "--k", 1);
      } else if (name == "--num_threads") {
        args.threads = static_cast<int>(parse_int(value, "--num_threads", 0));
      } else if (name == "--db_dense") {
        args.db_dense_path = value;
      } else if (name == "--query_dense") {
        args.query_dense_path = value;
      } else if (name == "--output_ids") {
        args.ids_path = value;
      } else if (name == "--output_scores") {
        args.scores_path = value;
      } else if (name == "--value_type") {
        try {
          args.values = se::parse_value_type(value);
        } catch (const std::invalid_argument& e) {
          throw UsageError(std::string("--value_type: ") + e.what());
        }
      } else if (name == "--rescore_k") {
        args.rescore_exact = value == "exact";
        if (!args.rescore_exact) args.rescore_k = parse_int(value, "--rescore_k R (or 'exact')", 1);
      } else {
        throw UsageError("unknown option " + name);
      }
    } else {
      positional.push_back(a);
    }
  }
  if (positional.size() < 3 || positional.size() > 4) {
    throw UsageError("expected 3 or 4 positional arguments, got " +
                     std::to_string(positional.size()));
  }
  size_t from = 0;
  while (from <= positional[0].size()) {
    const size_t comma = std::min(positional[0].find(',', from), positional[0].size());
    args.db_paths.push_back(positional[0].substr(from, comma - from));
    if (args.db_paths.back().empty()) {
      throw UsageError("empty database file name in '" + positional[0] + "'");
    }
    from = comma + 1;
  }
  args.rerank_topk = parse_int(positional[1], "rerank_topk", 0);
  args.threshold = parse_threshold(positional[2]);
  if (positional.size() == 4) args.query_path = positional[3];
  if (!args.query_dense_path.empty() && args.db_dense_path.empty()) {
    throw UsageError("--query_dense needs --db_dense");
  }
  if (!args.db_dense_path.empty() && !args.query_path.empty() && args.query_dense_path.empty()) {
    throw UsageError("with a query file, --db_dense needs --query_dense");
  }
  if (args.rescore_k > 0 && args.rescore_k < args.topk) {
    throw UsageError("--rescore_k (" + std::to_string(args.rescore_k) + ") must be >= --k (" +
                     std::to_string(args.topk) + ")");
  }
  if ((args.rescore_k > 0 || args.rescore_exact) && !args.db_dense_path.empty() &&
      args.rerank_topk > 0) {
    throw UsageError("--rescore_k and re-ranking (rerank_topk with --db_dense) are exclusive");
  }
  if (!args.db_dense_path.empty() && args.rerank_topk > 0 && args.rerank_topk < args.topk) {
    throw UsageError("rerank_topk (" + std::to_string(args.rerank_topk) +
                     ") must be >= --k (" + std::to_string(args.topk) + ")");
  }
  return args;
}

// A float32 [rows, cols] matrix read from a .npy file.
struct Matrix {
  int64_t rows = 0;
  int64_t cols = 0;
  std::vector<float> data;
  se::DenseView view(int64_t begin, int64_t end) const {
    return {data.data() + begin * cols, end - begin, cols};
  }
};

// Reads a C-ordered little-endian float32 2-D .npy file (format versions 1-3).
Matrix read_npy(const std::string& path) {
  std::FILE* f = std::fopen(path.c_str(), "rb");
  if (f == nullptr) throw se::FormatError("cannot open " + path + ": " + std::strerror(errno));
  std::unique_ptr<std::FILE, int (*)(std::FILE*)> closer(f, std::fclose);
  const std::string bad = path + " is not a float32 [rows, cols] C-ordered .npy file";
  unsigned char magic[8];
  if (std::fread(magic, 1, 8, f) != 8 || std::memcmp(magic, "\x93NUMPY", 6) != 0) {
    throw se::FormatError(bad);
  }
  uint32_t header_len = 0;
  if (magic[6] == 1) {
    uint16_t len16;
    if (std::fread(&len16, 2, 1, f) != 1) throw se::FormatError(bad);
    header_len = len16;
  } else if (magic[6] == 2 || magic[6] == 3) {
    if (std::fread(&header_len, 4, 1, f) != 1) throw se::FormatError(bad);
  } else {
    throw se::FormatError(bad + " (unknown .npy version)");
  }
  if (header_len > (1u << 20)) throw se::FormatError(bad);
  std::string header(header_len, '\0');
  if (std::fread(header.data(), 1, header_len, f) != header_len) throw se::FormatError(bad);
  auto compact = [](std::string s) {
    s.erase(std::remove(s.begin(), s.end(), ' '), s.end());
    return s;
  };
  header = compact(header);
  if (header.find("'descr':'<f4'") == std::string::npos ||
      header.find("'fortran_order':False") == std::string::npos) {
    throw se::FormatError(bad + " (need dtype float32, C order)");
  }
  const size_t shape_at = header.find("'shape':(");
  if (shape_at == std::string::npos) throw se::FormatError(bad);
  long long rows = -1, cols = -1;
  if (std::sscanf(header.c_str() + shape_at, "'shape':(%lld,%lld)", &rows, &cols) != 2 ||
      rows < 0 || cols < 1) {
    throw se::FormatError(bad + " (need a 2-D shape)");
  }
  Matrix m;
  m.rows = rows;
  m.cols = cols;
  m.data.resize(static_cast<size_t>(rows * cols));
  if (std::fread(m.data.data(), 4, m.data.size(), f) != m.data.size()) {
    throw se::FormatError(path + " is truncated");
  }
  return m;
}

// Writes a C-ordered little-endian [rows, cols] .npy file (format version 1)
// under a temporary name, then renames it into place.
void write_npy(const std::string& path, const char* descr, const void* data, size_t item_bytes,
               int64_t rows, int64_t cols) {
  std::string header = std::string("{'descr': '") + descr + "', 'fortran_order': False, 'shape': (" +
                       std::to_string(rows) + ", " + std::to_string(cols) + "), }";
  // Magic (6) + version (2) + length (2) + header padded with spaces to 64 bytes, ending in \n.
  header.append(63 - (10 + header.size()) % 64, ' ');
  header += '\n';
  const std::string tmp = path + ".tmp";
  std::FILE* f = std::fopen(tmp.c_str(), "wb");
  if (f == nullptr) throw se::FormatError("cannot write " + path + ": " + std::strerror(errno));
  const uint16_t len = static_cast<uint16_t>(header.size());
  const size_t count = static_cast<size_t>(rows * cols);
  const bool ok = std::fwrite("\x93NUMPY\x01\x00", 1, 8, f) == 8 && std::fwrite(&len, 2, 1, f) == 1 &&
                  std::fwrite(header.data(), 1, header.size(), f) == header.size() &&
                  std::fwrite(data, item_bytes, count, f) == count;
  if (std::fclose(f) != 0 || !ok || std::rename(tmp.c_str(), path.c_str()) != 0) {
    std::remove(tmp.c_str());
    throw se::FormatError("cannot write " + path + ": " + std::strerror(errno));
  }
}

std::string format_number(double v) {
  char text[32];
  std::snprintf(text, sizeof(text), "%g", v);
  return text;
}

double seconds_since(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

bool ends_with(const std::string& text, const std::string& suffix) {
  return text.size() >= suffix.size() &&
         text.compare(text.size() - suffix.size(), suffix.size(), suffix) == 0;
}

// One database file: its rows (a .bin file) or its loaded index (an index file).
struct Shard {
  std::string path;
  bool is_bin = true;
  se::CsrMatrix rows;                    // .bin only
  std::unique_ptr<se::SparseIndex> index;  // index files: loaded; .bin: built in run()
  int64_t size = 0;                      // rows in the file
  int64_t offset = 0;                    // global row of its first row (all files in order)
  int64_t begin = 0;                     // first row that belongs to the database
  std::vector<int32_t> labels;           // [size], -1 where unknown
};

Shard open_shard(const std::string& path) {
  Shard shard;
  shard.path = path;
  shard.is_bin = ends_with(path, ".bin");
  if (shard.is_bin) {
    shard.rows = se::read_bin(path);
    shard.size = shard.rows.rows();
    shard.labels = shard.rows.labels;
  } else {
    shard.index = std::make_unique<se::SparseIndex>(se::SparseIndex::load(path));
    shard.size = shard.index->rows();
    shard.labels.assign(shard.size, -1);
    if (shard.index->has_labels()) {
      std::copy(shard.index->labels(), shard.index->labels() + shard.size, shard.labels.begin());
    }
  }
  return shard;
}

// The dimension every file must fit: that of the index files (all equal), else
// the largest one the .bin files and the queries need.
int64_t common_dim(const std::vector<Shard>& shards, const se::CsrMatrix& queries) {
  const Shard* fixed = nullptr;
  for (const Shard& s : shards) {
    if (s.is_bin) continue;
    if (fixed != nullptr && s.index->dim() != fixed->index->dim()) {
      throw se::FormatError("database files of different dimensions: " + fixed->path + " has " +
                            std::to_string(fixed->index->dim()) + ", " + s.path + " has " +
                            std::to_string(s.index->dim()) + "; shards must come from one gallery");
    }
    if (fixed == nullptr) fixed = &s;
  }
  int64_t dim = std::max<int64_t>(queries.cols, 1);
  for (const Shard& s : shards) {
    if (s.is_bin) dim = std::max(dim, s.rows.cols);
  }
  if (fixed == nullptr) return dim;
  const int64_t fixed_dim = fixed->index->dim();
  for (const Shard& s : shards) {
    if (s.is_bin && s.rows.cols > fixed_dim) {
      throw se::FormatError(s.path + " has index " + std::to_string(s.rows.cols - 1) +
                            ", outside the dimension " + std::to_string(fixed_dim) + " of " +
                            fixed->path + "; shards must come from one gallery");
    }
  }
  if (queries.cols > fixed_dim) {
    throw se::FormatError("the queries have index " + std::to_string(queries.cols - 1) +
                          ", outside the dimension " + std::to_string(fixed_dim) + " of " +
                          fixed->path);
  }
  return fixed_dim;
}

// Rows [0, count) of the concatenated .bin shards, copied into one matrix.
se::CsrMatrix leading_rows(const std::vector<Shard>& shards, int64_t count) {
  se::CsrMatrix out;
  for (const Shard& s : shards) {
    out.cols = std::max(out.cols, s.rows.cols);
    for (int64_t r = 0; r < s.size && out.rows() < count; ++r) {
      for (int64_t p = s.rows.indptr[r]; p < s.rows.indptr[r + 1]; ++p) {
        out.indices.push_back(s.rows.indices[p]);
        out.values.push_back(s.rows.values[p]);
      }
      out.indptr.push_back(static_cast<int64_t>(out.indices.size()));
      out.labels.push_back(s.rows.labels[r]);
    }
  }
  return out;
}

// Per query, the best `keep` of `lists` (each [Q, width] ids and scores, ids
// already global) by score, ties to the lower id; -1 / -inf padding.
void merge_top(const std::vector<std::vector<int64_t>>& ids, const std::vector<std::vector<float>>& scores,
               int64_t width, int64_t num_queries, int64_t keep, std::vector<int64_t>& out_ids,
               std::vector<float>& out_scores) {
  out_ids.assign(num_queries * keep, -1);
  out_scores.assign(num_queries * keep, -std::numeric_limits<float>::infinity());
  std::vector<std::pair<float, int64_t>> merged;
  for (int64_t q = 0; q < num_queries; ++q) {
    merged.clear();
    for (size_t s = 0; s < ids.size(); ++s) {
      for (int64_t i = 0; i < width; ++i) {
        const int64_t id = ids[s][q * width + i];
        if (id >= 0) merged.emplace_back(scores[s][q * width + i], id);
      }
    }
    const auto better = [](const std::pair<float, int64_t>& a, const std::pair<float, int64_t>& b) {
      return a.first > b.first || (a.first == b.first && a.second < b.second);
    };
    const int64_t n = std::min<int64_t>(keep, static_cast<int64_t>(merged.size()));
    std::partial_sort(merged.begin(), merged.begin() + n, merged.end(), better);
    for (int64_t i = 0; i < n; ++i) {
      out_ids[q * keep + i] = merged[i].second;
      out_scores[q * keep + i] = merged[i].first;
    }
  }
}

int run(const Args& args) {
  std::vector<Shard> shards;
  for (const std::string& path : args.db_paths) shards.push_back(open_shard(path));
  int64_t total_rows = 0;
  for (Shard& s : shards) {
    s.offset = total_rows;
    total_rows += s.size;
  }
  const bool split = args.query_path.empty();
  std::string db_name = args.db_paths[0];
  for (size_t i = 1; i < args.db_paths.size(); ++i) db_name += ", " + args.db_paths[i];
  se::CsrMatrix qm;
  int64_t num_queries;
  if (split) {
    for (const Shard& s : shards) {
      if (!s.is_bin) {
        throw UsageError("without a query file the queries are the first database rows, which needs "
                         ".bin database files; " + s.path + " is an index file");
      }
    }
    if (total_rows < 2) {
      throw se::FormatError(db_name + " has " + std::to_string(total_rows) +
                            " rows; need at least 2 to split it into queries and database");
    }
    num_queries = std::min(kDefaultQueries, total_rows / 2);
    if (num_queries < kDefaultQueries) {
      std::printf("note: %s has only %lld rows; the first %lld are the queries\n", db_name.c_str(),
                  static_cast<long long>(total_rows), static_cast<long long>(num_queries));
    }
    qm = leading_rows(shards, num_queries);
  } else {
    qm = se::read_bin(args.query_path);
    num_queries = qm.rows();
  }
  const int64_t db_begin = split ? num_queries : 0;  // global row of database id 0
  const int64_t db_rows = total_rows - db_begin;
  const int64_t dim = common_dim(shards, qm);

  int64_t nnz = 0, bytes = 0;
  double build_seconds = 0;
  std::vector<int32_t> db_labels(db_rows, -1);
  se::BuildOptions options;
  options.values = args.values;
  const bool rescore = args.rescore_k > 0 || args.rescore_exact;
  options.keep_float = rescore && args.values == se::ValueType::kInt8;
  for (Shard& s : shards) {
    s.begin = std::clamp<int64_t>(db_begin - s.offset, 0, s.size);
    if (s.is_bin) {
      if (rescore && args.values != se::ValueType::kInt8) {
        throw UsageError("--rescore_k re-scores int8 postings; add --value_type int8");
      }
      s.index = std::make_unique<se::SparseIndex>(se::SparseIndex::from_csr(
          s.rows.view(s.begin, s.size), dim, s.rows.labels.data() + s.begin, options));
    }
    if (s.begin < s.size) {
      std::copy(s.labels.begin() + s.begin, s.labels.end(),
                db_labels.begin() + (s.offset + s.begin - db_begin));
    }
    nnz += s.index->nnz();
    bytes += s.index->memory_bytes();
    build_seconds += s.index->build_seconds();
  }
  const int64_t q_nnz = qm.indptr[num_queries] - qm.indptr[0];
  std::printf("database   %s\n", db_name.c_str());
  if (shards.size() > 1) std::printf("  shards   %zu\n", shards.size());
  std::printf("  N        %lld\n", static_cast<long long>(db_rows));
  std::printf("  D        %lld\n", static_cast<long long>(dim));
  std::printf("  NNZ      %.3f%% (%.2f per row)\n", 100.0 * nnz / std::max<double>(1, db_rows * dim),
              static_cast<double>(nnz) / std::max<int64_t>(1, db_rows));
  std::printf("queries    %lld from %s (%.2f non-zeros per row)\n",
              static_cast<long long>(num_queries), split ? "the first rows of the database file"
                                                         : args.query_path.c_str(),
              static_cast<double>(q_nnz) / std::max<int64_t>(1, num_queries));
  std::printf("index      built in %.3f s, %.1f MB, %.2f bytes per non-zero (%s values)\n",
              build_seconds, bytes / 1e6, static_cast<double>(bytes) / std::max<int64_t>(1, nnz),
              se::value_type_name(shards[0].index->value_type()));

  se::SearchParams params;
  params.k = args.topk;
  params.threshold = args.threshold;
  params.num_threads = args.threads;
  params.rescore_k = args.rescore_k;
  params.rescore_exact = args.rescore_exact;
  Matrix db_dense, query_dense;
  if (!args.db_dense_path.empty() && args.rerank_topk > 0) {
    db_dense = read_npy(args.db_dense_path);
    if (db_dense.rows != total_rows) {
      throw se::FormatError(args.db_dense_path + " has " + std::to_string(db_dense.rows) +
                            " rows; " + db_name + " has " + std::to_string(total_rows));
    }
    if (split) {
      params.rerank_queries = db_dense.view(0, num_queries);
    } else {
      query_dense = read_npy(args.query_dense_path);
      if (query_dense.rows != num_queries || query_dense.cols != db_dense.cols) {
        throw se::FormatError(args.query_dense_path + " must be [" + std::to_string(num_queries) +
                              ", " + std::to_string(db_dense.cols) + "]");
      }
      params.rerank_queries = query_dense.view(0, num_queries);
    }
    params.rerank_k = args.rerank_topk;
  }
  const bool rerank = params.rerank_queries.data != nullptr;
  if (args.rescore_k > 0) {
    std::printf("rescore    top %lld by quantized score, in float\n",
                static_cast<long long>(args.rescore_k));
  } else if (args.rescore_exact) {
    std::printf("rescore    exact (every row that may be in the float top-k)\n");
  }
  std::printf("search     top-%lld, threshold %s, threads %s, re-rank %s\n",
              static_cast<long long>(args.topk),
              args.threshold == se::kNoThreshold ? "none" : format_number(args.threshold).c_str(),
              args.threads > 0 ? std::to_string(args.threads).c_str() : "all",
              rerank ? ("top " + std::to_string(args.rerank_topk) + " with " +
                        std::to_string(db_dense.cols) + "-d dense vectors").c_str()
                     : args.rerank_topk > 0 ? "off (no --db_dense given)" : "off");

  std::vector<int64_t> ids, postings(num_queries), candidates(num_queries);
  std::vector<float> scores;
  std::vector<double> seconds(num_queries);
  std::vector<int64_t> shard_postings(num_queries), shard_candidates(num_queries);
  std::vector<double> shard_seconds(num_queries);
  const auto dense_of = [&](const Shard& s) {
    return db_dense.view(s.offset + s.begin, s.offset + s.size);
  };
  const auto start = std::chrono::steady_clock::now();
  if (shards.size() == 1) {
    // One file: the core's own search, re-rank included.
    if (rerank) params.rerank_database = dense_of(shards[0]);
    ids.resize(num_queries * args.topk);
    scores.resize(num_queries * args.topk);
    shards[0].index->search(qm.view(0, num_queries), params,
                            {ids.data(), scores.data(), postings.data(), candidates.data(), seconds.data()});
  } else {
    // Each shard's exact top `width` by sparse score, merged: the global top `width`.
    const int64_t width = rerank ? args.rerank_topk : args.topk;
    se::SearchParams sparse = params;
    sparse.k = width;
    sparse.rerank_queries = {};
    std::vector<std::vector<int64_t>> shard_ids(shards.size(), std::vector<int64_t>(num_queries * width));
    std::vector<std::vector<float>> shard_scores(shards.size(), std::vector<float>(num_queries * width));
    for (size_t i = 0; i < shards.size(); ++i) {
      const Shard& s = shards[i];
      s.index->search(qm.view(0, num_queries), sparse,
                      {shard_ids[i].data(), shard_scores[i].data(), shard_postings.data(),
                       shard_candidates.data(), shard_seconds.data()});
      const int64_t to_global = s.offset + s.begin - db_begin;
      for (int64_t& id : shard_ids[i]) id = id < 0 ? -1 : id + to_global;
      for (int64_t q = 0; q < num_queries; ++q) {
        postings[q] += shard_postings[q];
        candidates[q] += shard_candidates[q];
        seconds[q] += shard_seconds[q];
      }
    }
    merge_top(shard_ids, shard_scores, width, num_queries, rerank ? width : args.topk, ids, scores);
    if (rerank) {
      // Dense scores of the global candidates: the same candidates of every
      // shard again, scored by the core's dense dot product.
      std::vector<int64_t> global_ids = ids;
      std::vector<std::vector<int64_t>> dense_ids(shards.size(), std::vector<int64_t>(num_queries * width));
      std::vector<std::vector<float>> dense_scores(shards.size(), std::vector<float>(num_queries * width));
      se::SearchParams second = params;
      second.k = width;
      second.rerank_k = width;
      for (size_t i = 0; i < shards.size(); ++i) {
        const Shard& s = shards[i];
        second.rerank_database = dense_of(s);
        s.index->search(qm.view(0, num_queries), second,
                        {dense_ids[i].data(), dense_scores[i].data(), nullptr, nullptr,
                         shard_seconds.data()});
        const int64_t to_global = s.offset + s.begin - db_begin;
        for (int64_t q = 0; q < num_queries; ++q) seconds[q] += shard_seconds[q];
        for (int64_t& id : dense_ids[i]) id = id < 0 ? -1 : id + to_global;
      }
      // Keep, per query, only the global candidates with their dense scores.
      for (int64_t q = 0; q < num_queries; ++q) {
        std::vector<int64_t> wanted(global_ids.begin() + q * width, global_ids.begin() + (q + 1) * width);
        std::sort(wanted.begin(), wanted.end());
        for (size_t i = 0; i < shards.size(); ++i) {
          for (int64_t j = 0; j < width; ++j) {
            int64_t& id = dense_ids[i][q * width + j];
            if (id >= 0 && !std::binary_search(wanted.begin(), wanted.end(), id)) id = -1;
          }
        }
      }
      merge_top(dense_ids, dense_scores, width, num_queries, args.topk, ids, scores);
    }
  }
  const double wall = seconds_since(start);

  double total_postings = 0, total_candidates = 0, total_seconds = 0;
  for (int64_t q = 0; q < num_queries; ++q) {
    total_postings += postings[q];
    total_candidates += candidates[q];
    total_seconds += seconds[q];
  }
  const double nq = std::max<int64_t>(1, num_queries);
  std::printf("  ms/query          %.4f (wall time / queries, all threads)\n", 1e3 * wall / nq);
  std::printf("  ms/query/thread   %.4f\n", 1e3 * total_seconds / nq);
  std::printf("  postings/query    %.1f\n", total_postings / nq);
  std::printf("  candidates/query  %.1f\n", total_candidates / nq);

  // Identification-style hits: does a result carry the query's label?
  int64_t labelled = 0, rank1 = 0, in_topk = 0;
  for (int64_t q = 0; q < num_queries; ++q) {
    const int32_t label = qm.labels[q];
    if (label < 0) continue;
    ++labelled;
    for (int64_t i = 0; i < args.topk; ++i) {
      const int64_t id = ids[q * args.topk + i];
      if (id >= 0 && db_labels[id] == label) {
        rank1 += i == 0;
        ++in_topk;
        break;
      }
    }
  }
  if (labelled > 0) {
    std::printf("  rank-1 label agreement  %.4f (%lld labelled queries)\n",
                static_cast<double>(rank1) / labelled, static_cast<long long>(labelled));
    std::printf("  label in top-%lld        %.4f\n", static_cast<long long>(args.topk),
                static_cast<double>(in_topk) / labelled);
  }
  if (!args.ids_path.empty()) {
    write_npy(args.ids_path, "<i8", ids.data(), sizeof(int64_t), num_queries, args.topk);
    std::printf("wrote %s\n", args.ids_path.c_str());
  }
  if (!args.scores_path.empty()) {
    write_npy(args.scores_path, "<f4", scores.data(), sizeof(float), num_queries, args.topk);
    std::printf("wrote %s\n", args.scores_path.c_str());
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(parse_args(argc, argv));
  } catch (const UsageError& e) {
    std::fprintf(stderr, "%ssearch: error: %s\n", kUsage, e.what());
    return 2;
  } catch (const std::bad_alloc&) {
    std::fprintf(stderr, "search: error: out of memory\n");
    return 1;
  } catch (const std::exception& e) {
    // Everything else is thrown while reading the inputs (missing, truncated
    // or not a .bin file): bad input, exit status 2 like every entry point.
    std::fprintf(stderr, "search: error: %s\n", e.what());
    return 2;
  }
}
