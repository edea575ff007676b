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
