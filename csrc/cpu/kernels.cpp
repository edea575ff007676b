// CPU kernels: one pass per parameter, block by block (8-bit) or element by element
// (32-bit), threads over whole blocks with at::parallel_for.
//
// Invariance (DESIGN §3.1): blocks are cut from the row start, each element takes the
// same IEEE operations (no contraction, no approximations: see _build.py's flags), and
// reductions run in a fixed order inside a block or row, so results do not depend on
// the thread count or on where a row sits in memory.
#include "kernels.h"

#include "codebook.h"
#include "dtype.h"
#include "ieee_mode.h"
#include "simd_avx2.h"
#include "simd_avx512.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <memory>
#include <mutex>
#include <type_traits>
#include <vector>

namespace distopt::cpu {

// The vector helpers this build targets (simd_avx512.h or simd_avx2.h: one interface,
// 16 or 8 lanes); without them, the scalar loops below.
#if defined(DISTOPT_CPU_AVX512)
namespace simd = avx512;
#define DISTOPT_CPU_SIMD
#elif defined(DISTOPT_CPU_AVX2)
namespace simd = avx2;
#define DISTOPT_CPU_SIMD
#endif

namespace {

constexpr int64_t kBlockGrain = 16;     // blocks per parallel task
constexpr int64_t kElementGrain = 4096;  // elements per parallel task

// f(std::integral_constant<int, n>{}) for a state count n in [0, 3]: the loops take it
// as a template argument.
template <typename F>
decltype(auto) with_state_count(int n, F&& f) {
  switch (n) {
    case 1: return f(std::integral_constant<int, 1>{});
    case 2: return f(std::integral_constant<int, 2>{});
    case 3: return f(std::integral_constant<int, 3>{});
    default: return f(std::integral_constant<int, 0>{});
  }
}

// at::parallel_for, every task in the default IEEE mode (ieee_mode.h).
template <typename F>
void parallel_for(int64_t begin, int64_t end, int64_t grain, const F& f) {
  at::parallel_for(begin, end, grain, [&](int64_t lo, int64_t hi) {
    IeeeMode mode;
    f(lo, hi);
  });
}

bool all_finite(const float* x, int64_t n) {
  bool finite = true;
  for (int64_t i = 0; i < n; ++i) finite &= finite_bits(x[i]);
  return finite;
}

float max_abs(const float* x, int64_t n) {
  float m = 0.0f;
  for (int64_t i = 0; i < n; ++i) m = maximum(m, std::fabs(x[i]));
  return m;
}

// max_abs, vectorized where the build allows (the same result).
float block_max_abs(const float* x, int64_t n) {
#if defined(DISTOPT_CPU_SIMD)
  simd::AbsMax m;
  for (int64_t i = 0; i < n; i += simd::kLanes) m.add(simd::load(x + i, simd::lanes(n - i)), simd::lanes(n - i));
  return m.result(x, n, max_abs);
#else
  return max_abs(x, n);
#endif
}

// The codes of one block (n <= kBlockSize) of x scaled by 1 / absmax.
void encode_block(const float* x, int64_t n, float absmax, const FastCodebook& book, uint8_t* codes) {
#if defined(DISTOPT_CPU_SIMD)
  const FastCodebook* books = &book;
  return simd::encode_states<1>(&x, n, &absmax, &books, &codes);
#endif
  const float inv = inverse_absmax(absmax);
  if (!finite_bits(inv)) {  // a subnormal absmax has no finite reciprocal: divide instead
    for (int64_t i = 0; i < n; ++i) codes[i] = encode_fast(book, x[i] / absmax);
    return;
  }
  for (int64_t i = 0; i < n; ++i) codes[i] = encode_fast(book, x[i] * inv);
}

// Where block `b` of a parameter lies: its first element and its length.
struct BlockSpan {
  int64_t start;
  int64_t length;
};

BlockSpan block_span(int64_t b, int64_t row_length) {
  const int64_t per_row = ceil_div(row_length, kBlockSize);
  const int64_t row = b / per_row, j = b % per_row;
  return {row * row_length + j * kBlockSize, std::min(kBlockSize, row_length - j * kBlockSize)};
}

#if defined(DISTOPT_CPU_SIMD)
// f(i, mask) over [begin, end) in chunks of simd::kLanes: whole chunks with the full
// mask (the loads and stores then take no mask), the tail with its prefix mask.
template <typename F>
void for_each_chunk(int64_t begin, int64_t end, const F& f) {
  int64_t i = begin;
  for (; i + simd::kLanes <= end; i += simd::kLanes) f(i, simd::kAll);
  if (i < end) f(i, simd::lanes(end - i));
}

// Software prefetch of the block this far ahead of the one being updated (its param,
// gradient and codes; hints only, ignored past the end): the streams are short and many.
constexpr int64_t kPrefetchDistance = 2;

template <typename P>
void prefetch_ahead(const Blocked8bit<P>& a, int64_t at) {
  const int64_t numel = a.rows * a.row_length;
  if (at >= numel) return;
  const int64_t n = std::min(kBlockSize, numel - at);
  for (int64_t i = 0; i < n; i += 64 / static_cast<int64_t>(sizeof(P))) {
    _mm_prefetch(reinterpret_cast<const char*>(a.param + at + i), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(a.grad + at + i), _MM_HINT_T0);
  }
  for (int s = 0; s < a.nstates; ++s) {
    const char* codes = reinterpret_cast<const char*>(a.state[s].codes + at);
    for (int64_t i = 0; i < n; i += 64) _mm_prefetch(codes + i, _MM_HINT_T0);
  }
}

// One block of run_8bit's block-wise update pass, simd::kLanes lanes at a time (masked
// in a short last block), with the lane-exact vector helpers: each element takes the
// scalar loop's operations in its order. Returns false, having written nothing, when
// the block is skipped (a non-finite gradient, or an overflowing new state).
// Scaled: gnorm_scale is not 1 (g * 1 is g for the finite gradients that are used).
template <int NS, bool Scaled, typename P, typename Rule>
bool update_block_simd(const Blocked8bit<P>& a, const Rule& rule, const FastCodebook* const* books,
                       int64_t b, BlockSpan span, float* p, float (*st)[kBlockSize]) {
  namespace v = simd;
  const int64_t n = span.length, at = span.start;
  const Rule r = rule;  // a local copy: the stores below cannot alias its coefficients
  const float gnorm_scale = a.gnorm_scale;
  prefetch_ahead(a, at + kPrefetchDistance * kBlockSize);
  for (int s = 0; s < NS; ++s)
    v::decode(a.state[s].codes + at, n, *books[s], a.state[s].absmax[b], st[s]);
  // the update, computed even if a gradient turns out non-finite (nothing is written then)
  const P* const grad = a.grad + at;
  const P* const param = a.param + at;
  v::Mask bad = 0;
  v::AbsMax new_max[NS > 0 ? NS : 1];
  const auto chunk = [&](int64_t i, v::Mask m) {
    const auto g = v::load(grad + i, m);
    bad |= v::nonfinite(g, m);
    v::V pv{v::load(param + i, m)};
    v::V e[3] = {v::zero(), v::zero(), v::zero()};
    for (int s = 0; s < NS; ++s) e[s] = v::loadu(st[s] + i);
    r.template apply<NS>(pv, Scaled ? v::V{g} * gnorm_scale : v::V{g}, e);
    v::storeu(p + i, pv);
    for (int s = 0; s < NS; ++s) {
      v::storeu(st[s] + i, e[s]);
      new_max[s].add(e[s].v, m);
    }
  };
  for_each_chunk(0, n, chunk);
  if (bad != 0) return false;
  float absmax[3];
  for (int s = 0; s < NS; ++s) {
    absmax[s] = new_max[s].result(st[s], n, max_abs);
    if (!finite_bits(absmax[s])) return false;  // an overflowing state: skipped too
  }
  const float* values[3] = {st[0], st[1], st[2]};
  uint8_t* codes[3] = {a.state[0].codes + at, a.state[1].codes + at, a.state[2].codes + at};
  v::encode_states<NS>(values, n, absmax, books, codes);
  for (int s = 0; s < NS; ++s) a.state[s].absmax[b] = absmax[s];
  for_each_chunk(0, n, [&](int64_t i, v::Mask m) { v::store(a.param + at + i, m, v::loadu(p + i).v); });
  return true;
}

#endif

// The stack buffers of one block (a parallel task's).
struct BlockBuffers {
  float p[kBlockSize], g[kBlockSize], st[3][kBlockSize];
};

// Block b of `a` (n <= kBlockSize elements at span.start): dequantize the states, apply
// `rule` to each element if the block's gradient is finite, then requantize. With
// `max_out` (block_wise=false's first pass) it only folds the block's largest new
// magnitudes into max_out and writes nothing. Returns how many elements it skipped.
//
// Non-finite gradients (DESIGN §3.5): block-wise, the whole block is left untouched;
// with one absmax per tensor, its parameters are untouched and its states carry their
// old values forward, re-encoded with the new absmax.
template <int NS, typename P, typename Rule>
int64_t update_block(const Blocked8bit<P>& a, const Rule& rule, const FastCodebook* const* books, int64_t b,
                     BlockBuffers& buf, float* max_out) {
  const BlockSpan span = block_span(b, a.row_length);
  float* const p = buf.p;
  float* const g = buf.g;
  float(*const st)[kBlockSize] = buf.st;
#if defined(DISTOPT_CPU_SIMD)
  if (a.block_wise && max_out == nullptr) {
    const bool done = a.gnorm_scale != 1.0f ? update_block_simd<NS, true>(a, rule, books, b, span, p, st)
                                            : update_block_simd<NS, false>(a, rule, books, b, span, p, st);
    return done ? 0 : span.length;
  }
#endif
  const int64_t n = span.length, at = span.start, ai = a.block_wise ? b : 0;
  for (int64_t i = 0; i < n; ++i) g[i] = from_param(a.grad[at + i]);
  bool finite = all_finite(g, n);
  auto dequantize = [&] {
    for (int s = 0; s < NS; ++s) {
      const float scale = a.state[s].absmax[ai];
      const uint8_t* codes = a.state[s].codes + at;
      const float* value = books[s]->book.value;
      for (int64_t i = 0; i < n; ++i) st[s][i] = value[codes[i]] * scale;
    }
  };
  dequantize();
  if (finite) {
    for (int64_t i = 0; i < n; ++i) {
      p[i] = from_param(a.param[at + i]);
      float e[3] = {st[0][i], st[1][i], st[2][i]};
      rule.template apply<NS>(p[i], g[i] * a.gnorm_scale, e);
      for (int s = 0; s < NS; ++s) st[s][i] = e[s];
    }
    // a finite gradient so large that a new state overflows is skipped the same way
    for (int s = 0; s < NS; ++s) finite &= finite_bits(max_abs(st[s], n));
    if (!finite) dequantize();
  }
  const int64_t skipped = finite ? 0 : n;
  if (max_out != nullptr) {
    for (int s = 0; s < NS; ++s) max_out[s] = maximum(max_out[s], max_abs(st[s], n));
    return skipped;
  }
  if (!finite && a.block_wise) return skipped;
  for (int s = 0; s < NS; ++s) {
    const float absmax = a.block_wise ? max_abs(st[s], n) : a.new_absmax[s];
    encode_block(st[s], n, absmax, *books[s], a.state[s].codes + at);
    if (a.block_wise) a.state[s].absmax[b] = absmax;
  }
  if (finite) {
    for (int64_t i = 0; i < n; ++i) a.param[at + i] = to_param<P>(p[i]);
  }
  return skipped;
}

// Where the units (blocks, elements) of n parameters lie in one range [0, total): unit
// u is unit u - first[j] of parameter j for first[j] <= u < first[j + 1]. A task of
// parallel_for may span several parameters, so many small ones share the threads.
class Units {
 public:
  template <typename Count>
  Units(int64_t n, const Count& count) : first_(n + 1, 0) {
    for (int64_t j = 0; j < n; ++j) first_[j + 1] = first_[j] + count(j);
  }
  int64_t total() const { return first_.back(); }
  // The parameter that unit u belongs to (the last of any empty ones before it is skipped).
  int64_t owner(int64_t u) const {
    return std::upper_bound(first_.begin(), first_.end(), u) - first_.begin() - 1;
  }
  // f(j, begin, end) for the part of [lo, hi) that each parameter j holds, in its own units.
  template <typename F>
  void split(int64_t lo, int64_t hi, const F& f) const {
    for (int64_t j = owner(lo); lo < hi; ++j) {
      const int64_t end = std::min(hi, first_[j + 1]);
      if (end > lo) f(j, lo - first_[j], end - first_[j]);
      lo = std::max(lo, end);
    }
  }

 private:
  std::vector<int64_t> first_;
};

// Skip counters of n parameters, added to from several tasks.
class SkipCounts {
 public:
  explicit SkipCounts(int64_t n) : counts_(new std::atomic<int64_t>[n]) {
    for (int64_t j = 0; j < n; ++j) counts_[j] = 0;
  }
  void add(int64_t j, int64_t count) {
    if (count != 0) counts_[j] += count;
  }
  int64_t operator[](int64_t j) const { return counts_[j].load(); }

 private:
  std::unique_ptr<std::atomic<int64_t>[]> counts_;
};

// The 8-bit driver for n parameters (their rules in `rule`): every block of every
// parameter through update_block, the blocks of all of them shared among the threads.
// With `max_out` (one parameter only) it computes the largest new magnitude of each
// state (for block_wise=false) and writes nothing.
template <int NS, typename P, typename Rule>
void run_8bit_n(const Blocked8bit<P>* a, const Rule* rule, int64_t n, float* max_out) {
  std::vector<std::array<const FastCodebook*, 3>> books(n, {nullptr, nullptr, nullptr});
  for (int64_t j = 0; j < n; ++j) {  // (a call's parameters share their maps, as a rule: looked up once)
    for (int s = 0; s < NS; ++s) {
      const bool same = j > 0 && a[j].state[s].qmap == a[j - 1].state[s].qmap;
      books[j][s] = same ? books[j - 1][s] : &fast_codebook(a[j].state[s].qmap);
    }
  }
  const Units blocks(n, [&](int64_t j) { return a[j].rows * ceil_div(a[j].row_length, kBlockSize); });
  SkipCounts skipped(n);
  std::mutex max_mutex;
  float max_all[3] = {0.0f, 0.0f, 0.0f};

  parallel_for(0, blocks.total(), kBlockGrain, [&](int64_t lo, int64_t hi) {
    BlockBuffers buf;
    float local_max[3] = {0.0f, 0.0f, 0.0f};
    blocks.split(lo, hi, [&](int64_t j, int64_t begin, int64_t end) {
      int64_t local_skipped = 0;
      for (int64_t b = begin; b < end; ++b)
        local_skipped += update_block<NS>(a[j], rule[j], books[j].data(), b, buf, max_out ? local_max : nullptr);
      skipped.add(j, local_skipped);
    });
    if (max_out != nullptr) {
      std::lock_guard<std::mutex> lock(max_mutex);
      for (int s = 0; s < NS; ++s) max_all[s] = maximum(max_all[s], local_max[s]);
    }
  });

  if (max_out != nullptr) {
    for (int s = 0; s < NS; ++s) max_out[s] = max_all[s];
    return;
  }
  for (int64_t j = 0; j < n; ++j) {
    if (!a[j].block_wise) {
      for (int s = 0; s < NS; ++s) a[j].state[s].absmax[0] = a[j].new_absmax[s];
    }
    *a[j].nonfinite_count += skipped[j];
  }
}

template <typename P, typename Rule>
void run_8bit(const Blocked8bit<P>* a, const Rule* rule, int64_t n, float* max_out) {
  if (n == 0) return;
  with_state_count(a[0].nstates, [&](auto ns) { run_8bit_n<decltype(ns)::value>(a, rule, n, max_out); });
}

#if defined(DISTOPT_CPU_SIMD)
// How far ahead the 32-bit loop prefetches each of its streams, in elements, once per
// kLine elements (64 bytes of fp32: every line of a stream once): hints only, which
// never fault, so the last groups prefetch past the tensor harmlessly. On Zen 3 (AVX2,
// 2 threads) this took SGD32bit from about 0.8 to 1.0x torch's fused SGD and AdamW32bit
// from about 0.8 to 0.9-1.0x its fused AdamW (interleaved runs); 256 and 1024 were no
// better.
constexpr int64_t kStreamAhead = 512;
constexpr int64_t kLine = 16;

// run_32bit_n's loop over [begin, end), simd::kLanes lanes at a time (masked at the
// end): each element takes the scalar loop's operations, so it gets the same bits
// wherever it sits. A lane with a non-finite gradient computes on it and is not
// stored. Scaled: gnorm_scale is not 1 (g * 1 is g for every finite g). Returns the
// count of skipped elements.
template <int NS, bool Scaled, typename P, typename Rule>
int64_t update_32bit_simd(const Elementwise32bit<P>& a, const Rule& rule, int64_t begin, int64_t end) {
  namespace v = simd;
  // local copies: the stores below cannot alias the coefficients or the pointers
  const Rule r = rule;
  const float gnorm_scale = a.gnorm_scale;
  P* const param = a.param;
  const P* const grad = a.grad;
  float* const state[3] = {a.state[0], a.state[1], a.state[2]};
  // the chunk at i, its lanes m; returns how many of them were skipped
  const auto chunk = [&](int64_t i, v::Mask m) {
    const auto g = v::load(grad + i, m);
    v::Mask finite = m & ~v::nonfinite(g, m);
    v::V p{v::load(param + i, m)};
    v::V e[3] = {v::zero(), v::zero(), v::zero()};
    for (int s = 0; s < NS; ++s) e[s] = v::V{v::load(state[s] + i, m)};
    r.template apply<NS>(p, Scaled ? v::V{g} * gnorm_scale : v::V{g}, e);
    for (int s = 0; s < NS; ++s) finite &= ~v::nonfinite(e[s].v, m);  // an overflowing state: skipped too
    v::store(param + i, finite, p.v);
    for (int s = 0; s < NS; ++s) v::store(state[s] + i, finite, e[s].v);
    return v::count(m & ~finite);
  };
  int64_t skipped = 0, i = begin;
  for (; i + kLine <= end; i += kLine) {
    _mm_prefetch(reinterpret_cast<const char*>(grad + i + kStreamAhead), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(param + i + kStreamAhead), _MM_HINT_T0);
    for (int s = 0; s < NS; ++s) _mm_prefetch(reinterpret_cast<const char*>(state[s] + i + kStreamAhead), _MM_HINT_T0);
    for (int64_t j = 0; j < kLine; j += v::kLanes) skipped += chunk(i + j, v::kAll);
  }
  for_each_chunk(i, end, [&](int64_t at, v::Mask m) { skipped += chunk(at, m); });
  return skipped;
}
#endif

// The 32-bit loop over [begin, end), element by element: branch-free over restrict
// pointers with the state count fixed at compile time (IEEE operations only: the same
// bits as the vector loop above). Returns the count of skipped elements.
template <int NS, typename P, typename Rule>
int64_t update_32bit_scalar(const Elementwise32bit<P>& a, const Rule& rule, int64_t begin, int64_t end) {
  P* __restrict__ param = a.param;
  const P* __restrict__ grad = a.grad;
  float* __restrict__ s0 = a.state[0];
  float* __restrict__ s1 = a.state[1];
  float* __restrict__ s2 = a.state[2];
  int64_t skipped = 0;
  for (int64_t i = begin; i < end; ++i) {
    const float g = from_param(grad[i]);
    bool finite = finite_bits(g);
    const float p0 = from_param(param[i]);
    float old[3] = {0.0f, 0.0f, 0.0f};
    if (NS > 0) old[0] = s0[i];
    if (NS > 1) old[1] = s1[i];
    if (NS > 2) old[2] = s2[i];
    float p = p0, e[3] = {old[0], old[1], old[2]};
    rule.template apply<NS>(p, finite ? g * a.gnorm_scale : 0.0f, e);
    for (int s = 0; s < NS; ++s) finite &= finite_bits(e[s]);  // an overflowing state: skipped too
    param[i] = finite ? to_param<P>(p) : param[i];
    if (NS > 0) s0[i] = finite ? e[0] : old[0];
    if (NS > 1) s1[i] = finite ? e[1] : old[1];
    if (NS > 2) s2[i] = finite ? e[2] : old[2];
    skipped += finite ? 0 : 1;
  }
  return skipped;
}

// The 32-bit driver for n parameters (their rules in `rule`): elementwise, the elements
// of all of them shared among the threads; a non-finite gradient leaves its element
// untouched.
template <int NS, typename P, typename Rule>
void run_32bit_n(const Elementwise32bit<P>* a, const Rule* rule, int64_t n) {
  const Units elements(n, [&](int64_t j) { return a[j].numel; });
  SkipCounts skipped(n);
  parallel_for(0, elements.total(), kElementGrain, [&](int64_t lo, int64_t hi) {
    elements.split(lo, hi, [&](int64_t j, int64_t begin, int64_t end) {
#if defined(DISTOPT_CPU_SIMD)
      skipped.add(j, a[j].gnorm_scale != 1.0f ? update_32bit_simd<NS, true>(a[j], rule[j], begin, end)
                                              : update_32bit_simd<NS, false>(a[j], rule[j], begin, end));
#else
      skipped.add(j, update_32bit_scalar<NS>(a[j], rule[j], begin, end));
#endif
    });
  });
  for (int64_t j = 0; j < n; ++j) *a[j].nonfinite_count += skipped[j];
}

template <typename P, typename Rule>
void run_32bit(const Elementwise32bit<P>* a, const Rule* rule, int64_t n) {
  if (n == 0) return;
  with_state_count(a[0].nstates, [&](auto ns) { run_32bit_n<decltype(ns)::value>(a, rule, n); });
}

// The update rules on one element (T = float) or one vector (T = simd::V) and its
// states e[0..2], with the state count NS at compile time (the states stay in
// registers). It says which states a rule has, as the ops pass them: AdamW 2, or 3
// with amsgrad (max_exp_avg_sq); SGD 1 with momentum, else 0.
struct AdamWRule {
  AdamWCoeffs c;
  template <int NS, typename T>
  void apply(T& p, T g, T* e) const {
    adamw_element(p, g, e[0], e[1], NS == 3 ? &e[2] : nullptr, c);
  }
};

struct SGDRule {
  SGDCoeffs c;
  template <int NS, typename T>
  void apply(T& p, T g, T* e) const {
    sgd_element(p, g, NS >= 1 ? &e[0] : nullptr, c);
  }
};

// The rules of n parameters from their coefficients.
template <typename Rule, typename Coeffs>
std::vector<Rule> rules(const Coeffs* c, int64_t n) {
  std::vector<Rule> out;
  out.reserve(n);
  for (int64_t j = 0; j < n; ++j) out.push_back(Rule{c[j]});
  return out;
}

}  // namespace

template <typename P>
void adamw8bit(const Blocked8bit<P>* a, const AdamWCoeffs* c, int64_t n) {
  run_8bit(a, rules<AdamWRule>(c, n).data(), n, nullptr);
}
template <typename P>
void adamw8bit_new_absmax(const Blocked8bit<P>& a, const AdamWCoeffs& c, float* out) {
  const AdamWRule rule{c};
  run_8bit(&a, &rule, 1, out);
}
template <typename P>
void sgd8bit(const Blocked8bit<P>* a, const SGDCoeffs* c, int64_t n) {
  run_8bit(a, rules<SGDRule>(c, n).data(), n, nullptr);
}
template <typename P>
void sgd8bit_new_absmax(const Blocked8bit<P>& a, const SGDCoeffs& c, float* out) {
  const SGDRule rule{c};
  run_8bit(&a, &rule, 1, out);
}
template <typename P>
void adamw32(const Elementwise32bit<P>* a, const AdamWCoeffs* c, int64_t n) {
  run_32bit(a, rules<AdamWRule>(c, n).data(), n);
}
template <typename P>
void sgd32(const Elementwise32bit<P>* a, const SGDCoeffs* c, int64_t n) {
  run_32bit(a, rules<SGDRule>(c, n).data(), n);
}

template <typename P>
void row_sumsq(const P* grad, int64_t rows, int64_t row_length, double* out) {
  constexpr int64_t kLanes = 8;
  parallel_for(0, rows, std::max<int64_t>(1, kElementGrain / std::max<int64_t>(row_length, 1)),
                   [&](int64_t begin, int64_t end) {
                     for (int64_t r = begin; r < end; ++r) {
                       const P* row = grad + r * row_length;
                       double lane[kLanes] = {};
#if defined(DISTOPT_CPU_SIMD)
                       simd::row_sumsq_lanes(row, row_length, lane);
#else
                       for (int64_t i = 0; i < row_length; ++i) {
                         const float x = from_param(row[i]);
                         lane[i % kLanes] += finite_bits(x) ? double(x) * double(x) : 0.0;
                       }
#endif
                       for (int64_t width = kLanes / 2; width >= 1; width /= 2) {
                         for (int64_t l = 0; l < width; ++l) lane[l] += lane[l + width];
                       }
                       out[r] = lane[0];
                     }
                   });
}

void quantize_blockwise(const float* x, int64_t rows, int64_t row_length, bool block_wise,
                        const float* qmap, uint8_t* codes, float* absmax) {
  const FastCodebook& book = fast_codebook(qmap);
  const int64_t nblocks = rows * ceil_div(row_length, kBlockSize);
  float global = 0.0f;
  if (!block_wise) {  // on the calling thread, in the mode ops.cpp set
    for (int64_t b = 0; b < nblocks; ++b) {
      const BlockSpan span = block_span(b, row_length);
      global = maximum(global, block_max_abs(x + span.start, span.length));
    }
    absmax[0] = global;
  }
  parallel_for(0, nblocks, kBlockGrain, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const BlockSpan span = block_span(b, row_length);
      const float scale = block_wise ? block_max_abs(x + span.start, span.length) : global;
      if (block_wise) absmax[b] = scale;
      encode_block(x + span.start, span.length, scale, book, codes + span.start);
    }
  });
}

void dequantize_blockwise(const uint8_t* codes, const float* absmax, int64_t rows,
                          int64_t row_length, bool block_wise, const float* qmap, float* out) {
  const int64_t nblocks = rows * ceil_div(row_length, kBlockSize);
  parallel_for(0, nblocks, kBlockGrain, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const BlockSpan span = block_span(b, row_length);
      const float scale = absmax[block_wise ? b : 0];
      for (int64_t i = 0; i < span.length; ++i)
        out[span.start + i] = qmap[codes[span.start + i]] * scale;
    }
  });
}

#define DISTOPT_INSTANTIATE(P)                                                              \
  template void adamw8bit<P>(const Blocked8bit<P>*, const AdamWCoeffs*, int64_t);           \
  template void adamw8bit_new_absmax<P>(const Blocked8bit<P>&, const AdamWCoeffs&, float*); \
  template void sgd8bit<P>(const Blocked8bit<P>*, const SGDCoeffs*, int64_t);               \
  template void sgd8bit_new_absmax<P>(const Blocked8bit<P>&, const SGDCoeffs&, float*);     \
  template void adamw32<P>(const Elementwise32bit<P>*, const AdamWCoeffs*, int64_t);        \
  template void sgd32<P>(const Elementwise32bit<P>*, const SGDCoeffs*, int64_t);            \
  template void row_sumsq<P>(const P*, int64_t, int64_t, double*);

DISTOPT_INSTANTIATE(float)
DISTOPT_INSTANTIATE(c10::BFloat16)
DISTOPT_INSTANTIATE(c10::Half)

}  // namespace distopt::cpu
