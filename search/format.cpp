// The files of the index core: the index file (its layout, the XXH64
// checksum, save, one loader per format version) and the .bin embedding
// files of the original sparse-embed code (read_bin).
//
// The index file's layout (version 4, and how versions 1 to 3 differ), its
// sizes and the .bin format are described once, in docs/index-format.md:
// change that page with any change to the writer or the loaders here.

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <limits>
#include <memory>
#include <string>
#include <vector>

#include "index_internal.h"
#include "sparse_index.h"

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "the index and .bin formats are little-endian; this build targets a big-endian machine"
#endif

namespace sparse_embed {
namespace {

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
// Version 4: a float32 confidence per row, by caller row id, after every
// other section.
constexpr uint32_t kFlagConfidence = 8;
// Header field at byte 72 (version 3): how posting values are stored.
constexpr uint32_t kStoredFloat32 = 0;
constexpr uint32_t kStoredInt8 = 1;

uint64_t align_up(uint64_t n) { return (n + kAlign - 1) / kAlign * kAlign; }

// ---------------------------------------------------------------------------
// XXH64, streaming: the checksum of the index file is computed while it is
// written.

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
// Writing.

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

void seek(std::FILE* f, long offset, const std::string& path) {
  if (std::fseek(f, offset, SEEK_SET) != 0) {
    throw FormatError("cannot write " + path + ": " + std::strerror(errno));
  }
}

// ---------------------------------------------------------------------------
// The header's fields, as every version stores them (the ones a version lacks
// keep their defaults), and where the sections of a file start.

struct Header {
  uint32_t version = 0;
  uint64_t size = 0;  // the version's header size
  uint32_t stored_size = 0;
  uint32_t flags = 0;
  uint32_t known_flags = 0;
  uint32_t block_bits = 0;
  uint32_t block_rows = kDefaultBlockRows;
  uint32_t stored = kStoredFloat32;
  uint64_t rows = 0;
  uint64_t dim = 0;
  uint64_t nnz = 0;
  uint64_t payload_hash = 0;
  uint64_t entries = 0;

  bool quantized() const { return stored == kStoredInt8; }
  bool has_labels() const { return (flags & kFlagLabels) != 0; }
  bool has_order() const { return (flags & kFlagOrder) != 0; }
  bool has_forward() const { return (flags & kFlagForward) != 0; }
  bool has_confidence() const { return (flags & kFlagConfidence) != 0; }
  // Segment blocks of 65536 rows.
  uint64_t blocks() const { return std::max<uint64_t>(1, (rows + kBlockRows - 1) / kBlockRows); }
  // int8: one byte per value and per block max / min, two per block start.
  uint64_t value_bytes() const { return quantized() ? 1 : 4; }
  uint64_t start_bytes() const { return quantized() ? 2 : 4; }
};

struct Layout {
  uint64_t segments, rows, values, labels, order, bm_offsets, bm_block, bm_max, bm_min, bm_start,
      scales, is_signed, fwd_offsets, fwd_dims, fwd_values, confidence, end;
};

// A version 1 file ends after the row order (which it never has).
Layout layout_of(const Header& h) {
  Layout at;
  const uint64_t keys = h.dim * h.blocks();
  const bool quantized = h.quantized();
  at.segments = h.size;
  at.rows = at.segments + align_up(8 * (keys + 1));
  at.values = at.rows + align_up(2 * h.nnz);
  at.labels = at.values + align_up(h.value_bytes() * h.nnz);
  at.order = at.labels + (h.has_labels() ? align_up(4 * h.rows) : 0);
  at.bm_offsets = at.order + (h.has_order() ? align_up(4 * h.rows) : 0);
  at.bm_block = at.bm_offsets + (h.version == 1 ? 0 : align_up(8 * (h.dim + 1)));
  at.bm_max = at.bm_block + align_up(4 * h.entries);
  at.bm_min = at.bm_max + align_up(h.value_bytes() * h.entries);
  at.bm_start = at.bm_min + align_up(h.value_bytes() * h.entries);
  at.scales = at.bm_start + align_up(h.start_bytes() * h.entries);
  at.is_signed = at.scales + (quantized ? align_up(4 * h.dim) : 0);
  at.fwd_offsets = at.is_signed + (quantized ? align_up(h.dim) : 0);
  at.fwd_dims = at.fwd_offsets + (h.has_forward() ? align_up(8 * (h.rows + 1)) : 0);
  at.fwd_values = at.fwd_dims + (h.has_forward() ? align_up(4 * h.nnz) : 0);
  at.confidence = at.fwd_values + (h.has_forward() ? align_up(4 * h.nnz) : 0);
  at.end = h.version == 1 ? at.bm_offsets
                          : at.confidence + (h.has_confidence() ? align_up(4 * h.rows) : 0);
  return at;
}

// The current version's header bytes of `h`, its checksum in the last 8.
void encode_header(const Header& h, uint8_t (&header)[kHeaderSize]) {
  std::memset(header, 0, kHeaderSize);
  std::memcpy(header, kMagic, 8);
  std::memcpy(header + 8, &h.version, 4);
  std::memcpy(header + 12, &h.stored_size, 4);
  std::memcpy(header + 16, &h.rows, 8);
  std::memcpy(header + 24, &h.dim, 8);
  std::memcpy(header + 32, &h.nnz, 8);
  std::memcpy(header + 40, &h.flags, 4);
  std::memcpy(header + 44, &h.block_bits, 4);
  std::memcpy(header + 48, &h.payload_hash, 8);
  std::memcpy(header + 56, &h.block_rows, 4);
  std::memcpy(header + 64, &h.entries, 8);
  std::memcpy(header + 72, &h.stored, 4);
  const uint64_t header_hash = xxh64(header, kHeaderSize - 8);
  std::memcpy(header + kHeaderSize - 8, &header_hash, 8);
}

}  // namespace

SparseIndex::Storage::~Storage() {
  if (map != nullptr) munmap(map, map_size);
}

// ---------------------------------------------------------------------------
// Save.

void SparseIndex::save(const std::string& path) const {
  std::FILE* f = std::fopen(path.c_str(), "wb");
  if (f == nullptr) throw FormatError("cannot write " + path + ": " + std::strerror(errno));
  std::unique_ptr<std::FILE, int (*)(std::FILE*)> closer(f, std::fclose);

  // The header is written last, once the payload checksum is known.
  seek(f, kHeaderSize, path);
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
  if (confidence_ != nullptr) section(confidence_, 4 * rows);

  Header h;
  // Without a confidence the file is version 3, which older builds read.
  h.version = confidence_ != nullptr ? kIndexFormatVersion : kIndexFormatVersionNoConfidence;
  h.stored_size = kHeaderSize;
  h.rows = rows;
  h.dim = dim;
  h.nnz = nnz;
  h.flags = (labels_ != nullptr ? kFlagLabels : 0) | (order_ != nullptr ? kFlagOrder : 0) |
            (fwd_offsets_ != nullptr ? kFlagForward : 0) |
            (confidence_ != nullptr ? kFlagConfidence : 0);
  h.block_bits = kBlockBits;
  h.payload_hash = hash.digest();
  h.block_rows = static_cast<uint32_t>(block_rows_);
  h.entries = entries;
  h.stored = quantized ? kStoredInt8 : kStoredFloat32;
  uint8_t header[kHeaderSize];
  encode_header(h, header);
  seek(f, 0, path);
  write_all(f, header, kHeaderSize, nullptr, path);
  if (std::fflush(f) != 0) throw FormatError("cannot write " + path + ": " + std::strerror(errno));
  closer.reset();
}

// ---------------------------------------------------------------------------
// Load.

namespace internal {

// Maps an index file, checks it, and points a SparseIndex into the mapping:
// the header and the sections every version shares are checked first, then
// one loader per format version reads what that version stores. A file with
// valid checksums can still have been crafted, so each loader checks the
// invariants the search relies on: no file can make it read out of bounds.
class IndexLoader {
 public:
  explicit IndexLoader(const std::string& path) : path_(path) {}

  SparseIndex load() {
    const auto start = Clock::now();
    map();
    const Header h = read_header();
    const Layout at = layout_of(h);
    check_size(h, at);
    SparseIndex index =
        h.version == 1 ? load_v1(h, at) : h.version == 2 ? load_v2(h, at) : load_v3(h, at);
    if (h.has_confidence()) index.confidence_ = confidence(h, at);
    index.finish_derived(*storage_);
    index.storage_ = std::move(storage_);
    index.build_seconds_ = seconds_since(start);
    return index;
  }

 private:
  using Storage = SparseIndex::Storage;

  // Version 1: float32 postings and labels; the block metadata, which it
  // lacks, is computed.
  SparseIndex load_v1(const Header& h, const Layout& at) {
    SparseIndex index = postings(h, at);
    index.labels_ = labels(h, at);
    index.compute_blocks(*storage_, h.block_rows);
    return index;
  }

  // Version 2: float32 postings, labels, the row order and block metadata.
  SparseIndex load_v2(const Header& h, const Layout& at) {
    SparseIndex index = postings(h, at);
    index.order_ = order(h, at);
    index.labels_ = labels(h, at);
    blocks(index, h, at);
    return index;
  }

  // Version 3: version 2, whose layout a float32 index keeps, or int8 codes
  // with their per-dimension scales and, optionally, the float32 forward store.
  SparseIndex load_v3(const Header& h, const Layout& at) {
    SparseIndex index = postings(h, at);
    index.order_ = order(h, at);
    if (h.quantized()) codes(index, h, at);
    if (h.has_forward()) forward(index, h, at);
    index.labels_ = labels(h, at);
    blocks(index, h, at);
    return index;
  }

  void map() {
    const int fd = ::open(path_.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) throw FormatError("cannot open index file " + path_ + ": " + std::strerror(errno));
    struct stat st;
    if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
      ::close(fd);
      throw FormatError(path_ + " is not a regular file");
    }
    size_ = static_cast<uint64_t>(st.st_size);
    if (size_ < 8) {
      ::close(fd);
      throw FormatError(size_ == 0 ? path_ + " is empty" : foreign());
    }
    storage_ = std::make_shared<Storage>();
    storage_->map = ::mmap(nullptr, size_, PROT_READ, MAP_PRIVATE, fd, 0);
    ::close(fd);
    if (storage_->map == MAP_FAILED) {
      storage_->map = nullptr;
      throw FormatError("cannot map " + path_ + ": " + std::strerror(errno));
    }
    storage_->map_size = size_;
    base_ = static_cast<const uint8_t*>(storage_->map);
  }

  std::string foreign() const {
    return path_ + " is not a sparse-embed index (expected a file written by "
                   "SparseIndex.save; a .bin embedding file loads with from_bin)";
  }

  // Where the header checksum sits depends on the version (v1: a 64-byte
  // header, v2 to v4: 128 bytes); a flipped version bit fails both.
  bool header_ok(uint64_t header_size) const {
    uint64_t stored;
    if (size_ < header_size) return false;
    std::memcpy(&stored, base_ + header_size - 8, 8);
    return xxh64(base_, header_size - 8) == stored;
  }

  // The magic, the header checksum and the version, then the fields.
  Header read_header() const {
    if (std::memcmp(base_, kMagic, 8) != 0) throw FormatError(foreign());
    if (size_ < kHeaderSizeV1) {
      throw FormatError(path_ + " is truncated: " + std::to_string(size_) +
                        " bytes, shorter than the 64-byte header");
    }
    uint32_t version;
    std::memcpy(&version, base_ + 8, 4);
    if (version > 1 && version <= kIndexFormatVersion && size_ < kHeaderSize &&
        !header_ok(kHeaderSizeV1)) {
      throw FormatError(path_ + " is truncated: " + std::to_string(size_) +
                        " bytes, shorter than the " + std::to_string(kHeaderSize) + "-byte header");
    }
    const bool v1 = header_ok(kHeaderSizeV1);
    const bool v2 = header_ok(kHeaderSize);
    if (!v1 && !v2) throw FormatError(path_ + " is corrupted: header checksum mismatch");
    if (!(version == 1 && v1) && !(version > 1 && version <= kIndexFormatVersion && v2)) {
      throw FormatError(path_ + " has index format version " + std::to_string(version) +
                        "; this build reads versions 1 to " + std::to_string(kIndexFormatVersion));
    }
    const Header h = version == 1   ? header_v1()
                     : version == 2 ? header_v2()
                     : version == 3 ? header_v3()
                                    : header_v4();
    check_fields(h);
    return h;
  }

  // Version 1: a 64-byte header, labels the only flag.
  Header header_v1() const {
    Header h;
    h.version = 1;
    h.size = kHeaderSizeV1;
    std::memcpy(&h.stored_size, base_ + 12, 4);
    std::memcpy(&h.rows, base_ + 16, 8);
    std::memcpy(&h.dim, base_ + 24, 8);
    std::memcpy(&h.nnz, base_ + 32, 8);
    std::memcpy(&h.flags, base_ + 40, 4);
    std::memcpy(&h.block_bits, base_ + 44, 4);
    std::memcpy(&h.payload_hash, base_ + 48, 8);
    h.known_flags = kFlagLabels;
    return h;
  }

  // Version 2: 128 bytes, adding the pruning block size, the block-max
  // entries and the row order flag.
  Header header_v2() const {
    Header h = header_v1();
    h.version = 2;
    h.size = kHeaderSize;
    std::memcpy(&h.block_rows, base_ + 56, 4);
    std::memcpy(&h.entries, base_ + 64, 8);
    h.known_flags = kFlagLabels | kFlagOrder;
    return h;
  }

  // Version 3: adding the value type and, for int8, the forward store flag.
  Header header_v3() const {
    Header h = header_v2();
    h.version = 3;
    std::memcpy(&h.stored, base_ + 72, 4);
    if (h.quantized()) h.known_flags |= kFlagForward;
    return h;
  }

  // Version 4: version 3 and the per-row confidence flag.
  Header header_v4() const {
    Header h = header_v3();
    h.version = 4;
    h.known_flags |= kFlagConfidence;
    return h;
  }

  void check_fields(const Header& h) const {
    if (h.stored_size != h.size || (h.flags & ~h.known_flags) != 0 || h.block_bits != kBlockBits ||
        h.stored > kStoredInt8 ||
        h.rows >= uint64_t{kMaxRows} ||
        h.dim < 1 || h.dim > uint64_t{std::numeric_limits<int32_t>::max()} ||
        h.nnz > (uint64_t{1} << 48) || h.entries > h.nnz || h.block_rows < kMinBlockRows ||
        h.block_rows > kBlockRows || (h.block_rows & (h.block_rows - 1)) != 0) {
      throw FormatError(path_ + " is corrupted: implausible header fields");
    }
  }

  // The file's size against its layout, then the payload checksum.
  void check_size(const Header& h, const Layout& at) const {
    if (size_ < at.end) {
      throw FormatError(path_ + " is truncated: " + std::to_string(size_) + " bytes, expected " +
                        std::to_string(at.end));
    }
    if (size_ > at.end) {
      throw FormatError(path_ + " is corrupted: " + std::to_string(size_ - at.end) +
                        " unexpected trailing bytes");
    }
    if (xxh64(base_ + h.size, size_ - h.size) != h.payload_hash) {
      throw FormatError(path_ + " is corrupted: checksum mismatch");
    }
  }

  std::string inconsistent() const { return path_ + " is corrupted: inconsistent postings"; }

  // The segments and their postings (float32 values must be finite): an
  // index pointing at them.
  SparseIndex postings(const Header& h, const Layout& at) const {
    const uint64_t blocks = h.blocks();
    const uint64_t keys = h.dim * blocks;
    const auto* segments = reinterpret_cast<const uint64_t*>(base_ + at.segments);
    const auto* post_rows = reinterpret_cast<const uint16_t*>(base_ + at.rows);
    const auto* post_values =
        h.quantized() ? nullptr : reinterpret_cast<const float*>(base_ + at.values);
    if (segments[0] != 0 || segments[keys] != h.nnz) throw FormatError(inconsistent());
    for (uint64_t key = 0; key < keys; ++key) {
      if (segments[key + 1] < segments[key] || segments[key + 1] > h.nnz) {
        throw FormatError(inconsistent());
      }
      // Rows of the last block end at N.
      const uint64_t block = key % blocks;
      const uint64_t block_rows_here = std::min<uint64_t>(kBlockRows, h.rows - block * kBlockRows);
      for (uint64_t p = segments[key]; p < segments[key + 1]; ++p) {
        if (post_rows[p] >= block_rows_here ||
            (p > segments[key] && post_rows[p] < post_rows[p - 1]) ||
            (post_values != nullptr && !std::isfinite(post_values[p]))) {
          throw FormatError(inconsistent());
        }
      }
    }
    SparseIndex index;
    index.rows_ = static_cast<int64_t>(h.rows);
    index.dim_ = static_cast<int64_t>(h.dim);
    index.nnz_ = static_cast<int64_t>(h.nnz);
    index.blocks_ = static_cast<int64_t>(blocks);
    index.segments_ = segments;
    index.post_rows_ = post_rows;
    index.post_values_ = post_values;
    return index;
  }

  // The per-row confidence, which must be finite.
  const float* confidence(const Header& h, const Layout& at) const {
    const auto* values = reinterpret_cast<const float*>(base_ + at.confidence);
    for (uint64_t i = 0; i < h.rows; ++i) {
      if (!std::isfinite(values[i])) {
        throw FormatError(path_ + " is corrupted: a non-finite row confidence");
      }
    }
    return values;
  }

  const int32_t* labels(const Header& h, const Layout& at) const {
    return h.has_labels() ? reinterpret_cast<const int32_t*>(base_ + at.labels) : nullptr;
  }

  // The row order, which must be a permutation.
  const uint32_t* order(const Header& h, const Layout& at) const {
    if (!h.has_order()) return nullptr;
    const auto* order = reinterpret_cast<const uint32_t*>(base_ + at.order);
    std::vector<uint8_t> seen(h.rows, 0);
    for (uint64_t i = 0; i < h.rows; ++i) {
      if (order[i] >= h.rows || seen[order[i]]) {
        throw FormatError(path_ + " is corrupted: the row order is not a permutation");
      }
      seen[order[i]] = 1;
    }
    return order;
  }

  // int8 codes and their per-dimension scales and signs.
  void codes(SparseIndex& index, const Header& h, const Layout& at) const {
    index.values_ = ValueType::kInt8;
    index.post_codes_ = base_ + at.values;
    const auto* scales = reinterpret_cast<const float*>(base_ + at.scales);
    const uint8_t* is_signed = base_ + at.is_signed;
    for (uint64_t d = 0; d < h.dim; ++d) {
      if (!(scales[d] > 0.0f) || !std::isfinite(scales[d] * 255.0f) || is_signed[d] > 1) {
        throw FormatError(path_ + " is corrupted: invalid value scales");
      }
    }
    // A code 0 (or -128 for int8) is never written: every non-zero is a level.
    const uint64_t blocks = h.blocks();
    for (uint64_t d = 0; d < h.dim; ++d) {
      for (uint64_t p = index.segments_[d * blocks]; p < index.segments_[(d + 1) * blocks]; ++p) {
        if (index.post_codes_[p] == 0 || (is_signed[d] && index.post_codes_[p] == 0x80)) {
          throw FormatError(inconsistent());
        }
      }
    }
    index.dim_scale_ = scales;
    index.dim_signed_ = is_signed;
  }

  // The float32 forward store: per row, increasing dimensions and finite values.
  void forward(SparseIndex& index, const Header& h, const Layout& at) const {
    const auto* offsets = reinterpret_cast<const uint64_t*>(base_ + at.fwd_offsets);
    const auto* dims = reinterpret_cast<const uint32_t*>(base_ + at.fwd_dims);
    const auto* values = reinterpret_cast<const float*>(base_ + at.fwd_values);
    const std::string bad_forward = path_ + " is corrupted: inconsistent forward store";
    if (offsets[0] != 0 || offsets[h.rows] != h.nnz) throw FormatError(bad_forward);
    for (uint64_t i = 0; i < h.rows; ++i) {
      if (offsets[i + 1] < offsets[i] || offsets[i + 1] > h.nnz) throw FormatError(bad_forward);
      for (uint64_t p = offsets[i]; p < offsets[i + 1]; ++p) {
        if (dims[p] >= h.dim || (p > offsets[i] && dims[p] <= dims[p - 1]) || !std::isfinite(values[p])) {
          throw FormatError(bad_forward);
        }
      }
    }
    index.fwd_offsets_ = offsets;
    index.fwd_dims_ = dims;
    index.fwd_values_ = values;
  }

  // The block metadata is a function of the postings: the stored copy must
  // match it exactly, which also proves every block's posting ranges stay
  // inside the block. The index then serves the mapped copy; the computed
  // one was only the check.
  void blocks(SparseIndex& index, const Header& h, const Layout& at) const {
    index.compute_blocks(*storage_, h.block_rows);
    const bool quantized = h.quantized();
    const uint64_t entries = h.entries;
    const auto same = [&](const void* computed, uint64_t offset, uint64_t bytes) {
      return bytes == 0 || std::memcmp(computed, base_ + offset, bytes) == 0;
    };
    const void* computed_max = quantized ? static_cast<const void*>(index.bm_max_code_) : index.bm_max_;
    const void* computed_min = quantized ? static_cast<const void*>(index.bm_min_code_) : index.bm_min_;
    const void* computed_start =
        quantized ? static_cast<const void*>(index.bm_start16_) : index.bm_start_;
    if (static_cast<uint64_t>(index.bm_entries_) != entries ||
        !same(index.bm_offsets_, at.bm_offsets, 8 * (h.dim + 1)) ||
        !same(index.bm_block_, at.bm_block, 4 * entries) ||
        !same(computed_max, at.bm_max, h.value_bytes() * entries) ||
        !same(computed_min, at.bm_min, h.value_bytes() * entries) ||
        !same(computed_start, at.bm_start, h.start_bytes() * entries)) {
      throw FormatError(path_ + " is corrupted: block metadata does not match the postings");
    }
    index.bm_offsets_ = reinterpret_cast<const uint64_t*>(base_ + at.bm_offsets);
    index.bm_block_ = reinterpret_cast<const uint32_t*>(base_ + at.bm_block);
    if (quantized) {
      index.bm_max_code_ = base_ + at.bm_max;
      index.bm_min_code_ = base_ + at.bm_min;
      index.bm_start16_ = reinterpret_cast<const uint16_t*>(base_ + at.bm_start);
    } else {
      index.bm_max_ = reinterpret_cast<const float*>(base_ + at.bm_max);
      index.bm_min_ = reinterpret_cast<const float*>(base_ + at.bm_min);
      index.bm_start_ = reinterpret_cast<const uint32_t*>(base_ + at.bm_start);
    }
    Storage& s = *storage_;
    std::vector<uint64_t>().swap(s.bm_offsets);
    std::vector<uint32_t>().swap(s.bm_block);
    std::vector<float>().swap(s.bm_max);
    std::vector<float>().swap(s.bm_min);
    std::vector<uint32_t>().swap(s.bm_start);
    std::vector<uint8_t>().swap(s.bm_max_code);
    std::vector<uint8_t>().swap(s.bm_min_code);
    std::vector<uint16_t>().swap(s.bm_start16);
  }

  std::string path_;
  std::shared_ptr<Storage> storage_;
  const uint8_t* base_ = nullptr;
  uint64_t size_ = 0;
};

}  // namespace internal

SparseIndex SparseIndex::load(const std::string& path) { return internal::IndexLoader(path).load(); }

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
