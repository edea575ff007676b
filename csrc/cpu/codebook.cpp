// Building and caching the bucket tables of csrc/cpu/codebook.h.
#include "codebook.h"

#include <c10/util/Exception.h>

#include <algorithm>
#include <cfloat>
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
[[maybe_unused]] void build_entries(FastCodebook& fb) {
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
[[maybe_unused]] void build_compact(FastCodebook& fb) {
  constexpr uint32_t low = FastCodebook::kCompactLow, high = FastCodebook::kCompactHigh;
  constexpr uint32_t size = FastCodebook::kCompactSize;
  fb.compact_ok = true;
  for (uint32_t sign = 0; sign < 2; ++sign) {
    for (uint32_t m = low; m < high; ++m) fb.compact[sign * size + m - low] = fb.entry[sign << 15 | m];
    for (uint32_t m = 0; m < low; ++m) fb.compact_ok &= fb.entry[sign << 15 | m] == fb.entry[sign << 15 | low];
  }
}

// FastCodebook::entry16 from `entry` (see codebook.h), checked against encode_fast like
// build_entries: at both ends of every bucket and on both sides of its key.
[[maybe_unused]] void build_entry16(FastCodebook& fb) {
  fb.rank_free = true;
  for (uint32_t b = 0; b < (1u << 16); ++b) {
    const uint32_t code = fb.entry[b] & 0xFFu, key = fb.entry[b] >> 8;
    uint32_t base = key == 0x10000u ? (code - 1u) & 0xFFu : code, k16 = key == 0x10000u ? 0u : key;
    if (fb.positive_floor != 0 && b < 0x7F80u) {  // the finite positive buckets
      if (b == 0) {
        base = 0;
        k16 = 1;
      } else if (code == 0) {
        base = 0;
        k16 = 0;
      }
    }
    fb.entry16[b] = base << 16 | k16;
    if (b >= 0x8000u && k16 != 0) fb.rank_free = false;
    const bool negative = b >> 15;
    for (uint32_t rank : {0u, 0xFFFFu, k16, k16 == 0 ? 0u : k16 - 1, k16 == 0xFFFFu ? 0xFFFFu : k16 + 1}) {
      const float x = from_bits(b << 16 | (negative ? rank ^ 0xFFFFu : rank));
      const uint8_t code16 = static_cast<uint8_t>(base + (rank >= k16 ? 1u : 0u));
      TORCH_CHECK(code16 == encode_fast(fb, x), "distopt: the AVX2 encoder table disagrees with encode_fast");
    }
  }
}

// The binade of a magnitude (its biased exponent).
uint32_t binade_of(float magnitude) {
  uint32_t bits;
  std::memcpy(&bits, &magnitude, sizeof bits);
  return bits >> 23;
}

// A map's thresholds on one side of zero, cut into SegmentEncoder's segments: walking
// them by increasing magnitude, a threshold joins the current segment's grid unless
// its gap to the grid's last one differs from the grid's first gap by more than 1e-4
// of it; then it becomes the anchor that starts the next segment. A last, flat
// segment starts at the power of two above every threshold of the side, so that every
// segment with a grid is bounded. The positive side leaves out the thresholds below
// the positive floor (a positive value never takes a code under it).
struct Segment {
  float start;            // |x| >= start: x lies in this segment or beyond
  float edge;             // the x where it starts: its anchor threshold, or +-start
  std::vector<int> grid;  // the thresholds inside it, by increasing magnitude
};

std::vector<Segment> cut_segments(const float* t, bool negative, int positive_floor) {
  const float sign = negative ? -1.0f : 1.0f;
  std::vector<Segment> segments{Segment{0.0f, 0.0f, {}}};
  float largest = 0.0f;
  for (int k = 0; k < 255; ++k) {
    const int j = negative ? 254 - k : k;
    if (negative ? !(t[j] < 0.0f) : !(t[j] > 0.0f && j >= positive_floor)) continue;
    largest = std::fabs(t[j]);
    std::vector<int>& grid = segments.back().grid;
    if (grid.size() >= 2) {
      const double first_gap = std::fabs(double(t[grid[1]]) - double(t[grid[0]]));
      const double gap = std::fabs(double(t[j]) - double(t[grid.back()]));
      if (std::fabs(gap - first_gap) > 1e-4 * first_gap) {
        // x < t on the negative side (|x| > |t|), x >= t on the positive one
        segments.push_back(Segment{negative ? std::nextafter(largest, INFINITY) : largest, t[j], {}});
        continue;
      }
    }
    grid.push_back(j);
  }
  if (largest > 0.0f) {  // (a side without thresholds is one flat segment)
    const float beyond = from_bits((binade_of(largest) + 1) << 23);
    segments.push_back(Segment{beyond, sign * beyond, {}});
  }
  return segments;
}

// One segment's anchor, line and bounds (SegmentEncoder, slot `slot`), or false if the
// fma's result cannot be trusted at `margin` there, or the line could leave the
// segment's codes at its near end (toward zero on the positive side, away from it on
// the negative side, where no clamp is applied).
bool fit_segment(const FastCodebook& fb, const std::vector<Segment>& segments, size_t k, bool negative,
                 SegmentEncoder& se, int slot) {
  const float* t = fb.book.threshold;
  const bool outermost = k + 1 == segments.size();
  const float inner = segments[k].edge;  // x at the end toward zero, and at the far end
  const float outer = outermost ? (negative ? -INFINITY : INFINITY) : segments[k + 1].edge;
  se.anchor[slot] = outermost ? NAN : segments[k + 1].start;  // NaN: never compares, a lane stays in its side
  // The code at the segment's lowest x, which no grid threshold reaches.
  const float lowest = negative ? (outermost ? -INFINITY : outer) : (k == 0 ? 0.0f : inner);
  const int base = negative ? encode(t, lowest) : std::max<int>(encode(t, lowest), fb.positive_floor);
  std::vector<double> grid;  // by increasing x
  for (int j : segments[k].grid) grid.push_back(t[j]);
  if (negative) std::reverse(grid.begin(), grid.end());
  const int m = static_cast<int>(grid.size());
  se.limit[slot] = static_cast<int32_t>(SegmentEncoder::kFixedCode) + (negative ? base : base + m);
  if (m == 0) {  // one code: the line is flat at base + 1/2
    se.slope[slot] = 0.0f;
    se.offset[slot] = static_cast<float>(base) + 0.5f;
    return true;
  }
  if (outermost) return false;  // cannot happen: the last segment is flat
  const double slope = m == 1 ? 1.0 / std::fabs(grid[0]) : (m - 1) / (grid[m - 1] - grid[0]);
  se.slope[slot] = static_cast<float>(slope);
  se.offset[slot] = static_cast<float>(base + 1 - grid[0] * double(se.slope[slot]));
  auto line = [&](double x) { return x * double(se.slope[slot]) + double(se.offset[slot]); };
  double delta = 0.0;  // how far the line puts a grid threshold from its integer
  for (int i = 0; i < m; ++i) delta = std::max(delta, std::fabs(line(grid[i]) - (base + 1 + i)));
  // |f| over the segment bounds the fma's one rounding: |f - line(x)| <= reach * 2^-24
  // (counted twice, to be safe).
  const double reach = std::max(std::fabs(line(inner)), std::fabs(line(outer)));
  const double error = reach * 0x1p-23 + 1e-12;
  const double first = line(negative ? outer : inner), last = line(negative ? inner : outer);
  constexpr double margin = SegmentEncoder::kMargin;
  const bool near_end_inside = negative ? last + error < base + m + 1 + margin : first - error > base - margin;
  return near_end_inside && delta + error < margin && reach + error < 500.0;
}

// FastCodebook::segments: cut, fitted and placed by binade; then checked against
// encode_fast at every threshold and its neighbours, every map value, both zeros,
// infinities and NaN, and both ends of every binade. `ok` stays false for a map that
// does not fit (too many segments, two anchors in a binade, a line not trusted at the
// margin or leaving its codes at its near end, zeros referred); its lanes take the
// gather path.
[[maybe_unused]] void build_segments(FastCodebook& fb) {
  SegmentEncoder& se = fb.segments;
  se = SegmentEncoder{};
  se.ok = false;
  for (int j = 0; j < 255; ++j) {
    if (fb.book.threshold[j] == 0.0f) return;  // a threshold at zero: the sides would not meet there
  }
  constexpr int kSlots = SegmentEncoder::kSlots;
  for (int slot = 0; slot < 2 * kSlots; ++slot) {  // unused slots are never reached
    se.anchor[slot] = NAN;
    se.offset[slot] = 0.5f;
  }
  std::vector<float> anchors[2];  // the magnitudes that start a next segment, by side
  for (int side = 0; side < 2; ++side) {
    const std::vector<Segment> segments = cut_segments(fb.book.threshold, side == 1, fb.positive_floor);
    if (segments.size() > static_cast<size_t>(kSlots)) return;
    for (size_t k = 0; k < segments.size(); ++k) {
      if (!fit_segment(fb, segments, k, side == 1, se, side * kSlots + static_cast<int>(k))) return;
      if (k > 0) anchors[side].push_back(segments[k].start);
    }
  }
  uint32_t smallest = 255, largest = 0;
  for (const auto& side : anchors) {
    for (float a : side) {
      smallest = std::min(smallest, binade_of(a));
      largest = std::max(largest, binade_of(a));
    }
  }
  if (smallest != 255 && smallest < 2) return;  // an anchor among the subnormals
  se.exponent_low = smallest == 255 ? 1 : smallest - 1;  // below every anchor
  if (largest > se.exponent_low + 31) return;
  for (int side = 0; side < 2; ++side) {
    for (uint32_t e = se.exponent_low; e <= se.exponent_low + 31; ++e) {
      const float start = from_bits(e << 23), end = e == se.exponent_low + 31 ? INFINITY : from_bits((e + 1) << 23);
      int at_start = 0, inside = 0;
      for (float a : anchors[side]) {
        at_start += a <= start ? 1 : 0;
        inside += (a > start && a < end) ? 1 : 0;
      }
      if (inside > 1 || (e == se.exponent_low && at_start != 0)) return;
      se.first_slot[side][e % 32] = side * kSlots + at_start;
    }
  }
  std::vector<float> probes = {0.0f, -0.0f, INFINITY, -INFINITY, NAN, -NAN, FLT_MAX, -FLT_MAX, FLT_TRUE_MIN, -FLT_TRUE_MIN};
  for (int j = 0; j < 256; ++j) {
    probes.push_back(fb.book.value[j]);
    if (j == 255) break;
    float up = fb.book.threshold[j], down = up;
    for (int step = 0; step < 4; ++step, up = std::nextafter(up, INFINITY), down = std::nextafter(down, -INFINITY)) {
      probes.push_back(up);
      probes.push_back(down);
    }
  }
  for (uint32_t e = 1; e < 255; ++e) {
    for (uint32_t bits : {e << 23, (e << 23) - 1}) {
      probes.push_back(from_bits(bits));
      probes.push_back(-from_bits(bits));
    }
  }
  for (float x : probes) {
    const int code = encode_segments(se, x);
    TORCH_CHECK(code < 0 || code == encode_fast(fb, x), "distopt: the segment encoder disagrees with encode_fast at ", x);
  }
  se.ok = encode_segments(se, 0.0f) >= 0;  // (blocks of zeros are common: never referred)
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
#if defined(DISTOPT_CPU_AVX512) || defined(DISTOPT_CPU_AVX2)
  build_entries(*fb);  // (the vector encoders' tables; the scalar one reads `bucket`)
#endif
#if defined(DISTOPT_CPU_AVX512)
  build_compact(*fb);
#endif
#if defined(DISTOPT_CPU_AVX2)
  build_entry16(*fb);
#endif
#if defined(DISTOPT_CPU_AVX512)
  build_segments(*fb);  // (only the AVX-512 encoder uses it)
#else
  fb->segments = SegmentEncoder{};
#endif
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
