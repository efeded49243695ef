// Standalone search benchmark on .bin embedding files (the original calling
// convention of sparse-embed's search binary, plus named options).
//
//   search <db.bin> <rerank_topk> <threshold> [queries.bin] [options]
//
// Without a query file the first 10,000 rows of db.bin are the queries and
// the rest the database (half of the rows when there are fewer than 20,000).
// Dense re-ranking reads float32 .npy matrices (numpy.save of a C-ordered
// float32 [rows, Dd] array): --db-dense has one row per row of db.bin, in the
// same order; --query-dense one per row of queries.bin (not needed without a
// query file, where the first rows of --db-dense belong to the queries).

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <memory>
#include <new>
#include <string>
#include <vector>

#include "sparse_index.h"

namespace se = sparse_embed;

namespace {

constexpr int64_t kDefaultQueries = 10000;
constexpr int64_t kDefaultTopK = 10;

const char kUsage[] =
    "usage: search <db.bin> <rerank_topk> <threshold> [queries.bin] [--topk K] [--threads N]\n"
    "              [--db-dense DB.npy [--query-dense QUERIES.npy]]\n"
    "  rerank_topk  sparse candidates re-ranked with the dense vectors (0: no re-ranking)\n"
    "  threshold    only rows scoring above it are candidates ('none': every row)\n"
    "  queries.bin  query rows; default: the first 10000 rows of db.bin (half when it has\n"
    "               fewer than 20000 rows), searched against the rest\n"
    "  --topk K     results per query (default 10)\n"
    "  --threads N  worker threads (default 0: every core)\n"
    "  --db-dense / --query-dense  float32 [rows, Dd] .npy files for re-ranking\n";

class UsageError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

struct Args {
  std::string db_path;
  std::string query_path;
  int64_t rerank_topk = 0;
  float threshold = se::kNoThreshold;
  int64_t topk = kDefaultTopK;
  int threads = se::kDefaultNumThreads;
  std::string db_dense_path;
  std::string query_dense_path;
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
      if (i + 1 >= argc) throw UsageError(a + " needs a value");
      const std::string value = argv[++i];
      if (a == "--topk") {
        args.topk = parse_int(value, "--topk", 1);
      } else if (a == "--threads") {
        args.threads = static_cast<int>(parse_int(value, "--threads", 0));
      } else if (a == "--db-dense") {
        args.db_dense_path = value;
      } else if (a == "--query-dense") {
        args.query_dense_path = value;
      } else {
        throw UsageError("unknown option " + a);
      }
    } else {
      positional.push_back(a);
    }
  }
  if (positional.size() < 3 || positional.size() > 4) {
    throw UsageError("expected 3 or 4 positional arguments, got " +
                     std::to_string(positional.size()));
  }
  args.db_path = positional[0];
  args.rerank_topk = parse_int(positional[1], "rerank_topk", 0);
  args.threshold = parse_threshold(positional[2]);
  if (positional.size() == 4) args.query_path = positional[3];
  if (!args.query_dense_path.empty() && args.db_dense_path.empty()) {
    throw UsageError("--query-dense needs --db-dense");
  }
  if (!args.db_dense_path.empty() && !args.query_path.empty() && args.query_dense_path.empty()) {
    throw UsageError("with a query file, --db-dense needs --query-dense");
  }
  if (!args.db_dense_path.empty() && args.rerank_topk > 0 && args.rerank_topk < args.topk) {
    throw UsageError("rerank_topk (" + std::to_string(args.rerank_topk) +
                     ") must be >= --topk (" + std::to_string(args.topk) + ")");
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

std::string format_number(double v) {
  char text[32];
  std::snprintf(text, sizeof(text), "%g", v);
  return text;
}

double seconds_since(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

int run(const Args& args) {
  se::CsrMatrix db = se::read_bin(args.db_path);
  se::CsrMatrix separate_queries;
  const bool split = args.query_path.empty();
  int64_t num_queries;
  if (split) {
    if (db.rows() < 2) {
      throw se::FormatError(args.db_path + " has " + std::to_string(db.rows()) +
                            " rows; need at least 2 to split it into queries and database");
    }
    num_queries = std::min(kDefaultQueries, db.rows() / 2);
    if (num_queries < kDefaultQueries) {
      std::printf("note: %s has only %lld rows; the first %lld are the queries\n",
                  args.db_path.c_str(), static_cast<long long>(db.rows()),
                  static_cast<long long>(num_queries));
    }
  } else {
    separate_queries = se::read_bin(args.query_path);
    num_queries = separate_queries.rows();
  }
  const se::CsrMatrix& qm = split ? db : separate_queries;
  const int64_t db_begin = split ? num_queries : 0;
  const int64_t db_rows = db.rows() - db_begin;
  const int64_t dim = std::max<int64_t>({db.cols, qm.cols, 1});

  se::SparseIndex index = se::SparseIndex::from_csr(db.view(db_begin, db.rows()), dim,
                                                    db.labels.data() + db_begin);
  const int64_t nnz = index.nnz();
  const int64_t q_nnz = qm.indptr[num_queries] - qm.indptr[0];
  std::printf("database   %s\n", args.db_path.c_str());
  std::printf("  N        %lld\n", static_cast<long long>(db_rows));
  std::printf("  D        %lld\n", static_cast<long long>(dim));
  std::printf("  NNZ      %.3f%% (%.2f per row)\n", 100.0 * nnz / std::max<double>(1, db_rows * dim),
              static_cast<double>(nnz) / std::max<int64_t>(1, db_rows));
  std::printf("queries    %lld from %s (%.2f non-zeros per row)\n",
              static_cast<long long>(num_queries), split ? "the first rows of the database file"
                                                         : args.query_path.c_str(),
              static_cast<double>(q_nnz) / std::max<int64_t>(1, num_queries));
  std::printf("index      built in %.3f s, %.1f MB, %.2f bytes per non-zero\n",
              index.build_seconds(), index.memory_bytes() / 1e6,
              static_cast<double>(index.memory_bytes()) / std::max<int64_t>(1, nnz));

  se::SearchParams params;
  params.k = args.topk;
  params.threshold = args.threshold;
  params.num_threads = args.threads;
  Matrix db_dense, query_dense;
  if (!args.db_dense_path.empty() && args.rerank_topk > 0) {
    db_dense = read_npy(args.db_dense_path);
    if (db_dense.rows != db.rows()) {
      throw se::FormatError(args.db_dense_path + " has " + std::to_string(db_dense.rows) +
                            " rows; " + args.db_path + " has " + std::to_string(db.rows()));
    }
    params.rerank_database = db_dense.view(db_begin, db.rows());
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
  const bool rerank = params.rerank_database.data != nullptr;
  std::printf("search     top-%lld, threshold %s, threads %s, re-rank %s\n",
              static_cast<long long>(args.topk),
              args.threshold == se::kNoThreshold ? "none" : format_number(args.threshold).c_str(),
              args.threads > 0 ? std::to_string(args.threads).c_str() : "all",
              rerank ? ("top " + std::to_string(args.rerank_topk) + " with " +
                        std::to_string(db_dense.cols) + "-d dense vectors").c_str()
                     : args.rerank_topk > 0 ? "off (no --db-dense given)" : "off");

  std::vector<int64_t> ids(num_queries * args.topk), postings(num_queries), candidates(num_queries);
  std::vector<float> scores(num_queries * args.topk);
  std::vector<double> seconds(num_queries);
  se::SearchOutput out{ids.data(), scores.data(), postings.data(), candidates.data(),
                       seconds.data()};
  const auto start = std::chrono::steady_clock::now();
  index.search(qm.view(0, num_queries), params, out);
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
      if (id >= 0 && db.labels[db_begin + id] == label) {
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
