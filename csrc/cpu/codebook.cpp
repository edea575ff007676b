// Building and caching the bucket tables of csrc/cpu/codebook.h.
#include "codebook.h"

#include <c10/util/Exception.h>

#include <cmath>
#include <memory>
#include <mutex>
#include <vector>

namespace distopt::cpu {
namespace {

float from_bits(uint32_t bits) {
  float x;
  std::memcpy(&x, &bits, sizeof x);
  return x;
}

// FastCodebook::entry: within a bucket of finite values the value grows with
// bucket_rank, so `threshold[code] <= x` (code < 255) switches on at one rank, found by
// bisection. Each bucket is then checked against encode_fast at its first and last
// value and on both sides of that rank; buckets of infinities and NaNs never step up,
// as in encode_fast.
void build_entries(FastCodebook& fb) {
  constexpr uint32_t kNever = 0x10000u;
  for (uint32_t b = 0; b < (1u << 16); ++b) {
    const bool negative = b >> 15;
    auto value_at = [&](uint32_t rank) { return from_bits(b << 16 | (negative ? rank ^ 0xFFFFu : rank)); };
    const uint8_t code = fb.bucket[b];
    uint32_t key = kNever;
    if (code < 255 && std::isfinite(value_at(0)) && std::isfinite(value_at(0xFFFF)) &&
        fb.threshold[code] <= value_at(0xFFFF)) {
      uint32_t lo = 0, hi = 0xFFFF;  // the smallest rank whose value reaches the threshold
      while (lo < hi) {
        const uint32_t mid = (lo + hi) / 2;
        if (fb.threshold[code] <= value_at(mid)) hi = mid; else lo = mid + 1;
      }
      key = lo;
    }
    fb.entry[b] = code | key << 8;
    for (uint32_t rank : {0u, 0xFFFFu, key == kNever ? 0u : key, key == kNever || key == 0 ? 0u : key - 1}) {
      const float x = value_at(rank);
      const uint8_t stepped = static_cast<uint8_t>(code + (rank >= key ? 1 : 0));
      uint32_t bits;
      std::memcpy(&bits, &x, sizeof bits);
      TORCH_CHECK(bucket_rank(bits) == rank && (stepped == 0 && x > 0.0f ? fb.positive_floor : stepped) ==
                      encode_fast(fb, x), "distopt: the SIMD encoder table disagrees with encode_fast");
    }
  }
}

// FastCodebook::compact from `entry`, and whether it stands for every bucket it serves.
void build_compact(FastCodebook& fb) {
  constexpr uint32_t low = FastCodebook::kCompactLow, high = FastCodebook::kCompactHigh;
  constexpr uint32_t size = FastCodebook::kCompactSize;
  fb.compact_ok = true;
  for (uint32_t sign = 0; sign < 2; ++sign) {
    for (uint32_t m = low; m < high; ++m) fb.compact[sign * size + m - low] = fb.entry[sign << 15 | m];
    for (uint32_t m = 0; m < low; ++m) fb.compact_ok &= fb.entry[sign << 15 | m] == fb.entry[sign << 15 | low];
  }
}

std::unique_ptr<FastCodebook> build(const float* qmap) {
  auto fb = std::make_unique<FastCodebook>();
  make_codebook(qmap, fb->book);
  for (int i = 0; i < 255; ++i) fb->threshold[i] = fb->book.threshold[i];
  fb->threshold[255] = INFINITY;
  fb->positive_floor = qmap[0] == 0.0f ? 1 : 0;
  for (uint32_t b = 0; b < (1u << 16); ++b) {
    const bool negative = b >> 15;
    const float first = from_bits(negative ? (b << 16) | 0xFFFFu : b << 16);  // the bucket's smallest value
    const float last = from_bits(negative ? b << 16 : (b << 16) | 0xFFFFu);   // and its largest
    const uint8_t code = encode(fb->book.threshold, first);
    fb->bucket[b] = code;
    if (std::isfinite(first) && std::isfinite(last)) {
      TORCH_CHECK(encode(fb->book.threshold, last) - code <= 1,
                  "distopt: this quantization map has two thresholds within one bucket; the fast encoder "
                  "cannot serve it");
    }
  }
  build_entries(*fb);
  build_compact(*fb);
  for (int c = 0; c < 256; ++c) {
    uint32_t bits;
    std::memcpy(&bits, &fb->book.value[c], sizeof bits);
    for (int k = 0; k < 4; ++k) fb->plane[k][c] = static_cast<uint8_t>(bits >> (8 * k));
  }
  return fb;
}

}  // namespace

const FastCodebook& fast_codebook(const float* qmap) {
  static std::mutex mutex;
  static std::vector<std::unique_ptr<FastCodebook>> cache;
  std::lock_guard<std::mutex> lock(mutex);
  for (const auto& fb : cache) {
    if (std::memcmp(fb->book.value, qmap, sizeof fb->book.value) == 0) return *fb;
  }
  cache.push_back(build(qmap));
  return *cache.back();
}

}  // namespace distopt::cpu
