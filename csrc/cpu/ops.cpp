// The CPU tensor boundary: checks every tensor, dispatches on the parameter dtype,
// fills the kernels' raw-pointer structs (csrc/cpu/kernels.h) and registers the CPU
// implementations of the schemas in csrc/registration.cpp.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <utility>
#include <vector>

#include "../common/host_tensor.h"
#include "ieee_mode.h"
#include "kernels.h"

namespace distopt::cpu {
namespace {

using at::Tensor;


void check_pair(const Tensor& param, const Tensor& grad) {
  TORCH_CHECK(param.is_contiguous() && grad.is_contiguous(), "distopt: param and grad must be contiguous");
  TORCH_CHECK(param.sizes() == grad.sizes(), "distopt: grad shape ", grad.sizes(), " != param shape ", param.sizes());
  TORCH_CHECK(param.scalar_type() == grad.scalar_type(), "distopt: grad dtype ", grad.scalar_type(),
              " != param dtype ", param.scalar_type());
}

void check_state32(const Tensor& param, const Tensor& state, const char* name) {
  TORCH_CHECK(state.scalar_type() == at::kFloat && state.is_contiguous() && state.sizes() == param.sizes(),
              "distopt: ", name, " must be a contiguous fp32 tensor shaped like the parameter");
}

// A quantization map: 256 contiguous fp32 values (the kernels read them from its data pointer).
void check_qmap(const Tensor& qmap) {
  TORCH_CHECK(qmap.scalar_type() == at::kFloat && qmap.numel() == 256 && qmap.is_contiguous(),
              "distopt: qmap must be 256 contiguous fp32 values");
}

QuantState quant_state(const Tensor& param, const Tensor& codes, const Tensor& absmax, const Tensor& qmap,
                       const char* name) {
  TORCH_CHECK(codes.scalar_type() == at::kByte && codes.is_contiguous() && codes.sizes() == param.sizes(),
              "distopt: ", name, " must be contiguous uint8 codes shaped like the parameter");
  const int64_t blocks = rows_of(param) * ceil_div(row_length_of(param), kBlockSize);
  TORCH_CHECK(absmax.scalar_type() == at::kFloat && absmax.is_contiguous() &&
                  (absmax.numel() == blocks || absmax.numel() == 1),
              "distopt: ", name, "_absmax must be contiguous fp32 with one value per block or one in all");
  check_qmap(qmap);
  return {codes.data_ptr<uint8_t>(), absmax.data_ptr<float>(), qmap.data_ptr<float>()};
}

float scalar_of(const Tensor& t, const char* name) {
  TORCH_CHECK(t.numel() == 1 && t.scalar_type() == at::kFloat, "distopt: ", name, " must be one fp32 value");
  return *t.data_ptr<float>();  // (a CPU tensor: no item(), a dispatched op per call)
}

int64_t* count_of(const Tensor& t) {
  TORCH_CHECK(t.numel() == 1 && t.scalar_type() == at::kLong, "distopt: nonfinite_count must be one int64 value");
  return t.data_ptr<int64_t>();
}

AdamWCoeffs adamw_coeffs(double decay, double lerp_weight, double beta2, double sq_weight, double eps,
                         double step_size, double bias_correction2_sqrt) {
  return {float(decay), float(lerp_weight), float(beta2), float(sq_weight), float(eps), float(step_size),
          float(bias_correction2_sqrt)};
}

SGDCoeffs sgd_coeffs(double lr, double weight_decay, double momentum, double dampening_weight, bool nesterov,
                     bool first_step) {
  return {float(lr), float(weight_decay), float(momentum), float(dampening_weight), nesterov, first_step};
}

// The coefficients of parameter j of a *_multi_ op, from its doubles in `coeffs` at k.
AdamWCoeffs adamw_coeffs_at(const double* k) { return adamw_coeffs(k[0], k[1], k[2], k[3], k[4], k[5], k[6]); }
SGDCoeffs sgd_coeffs_at(const double* k) { return sgd_coeffs(k[0], k[1], k[2], k[3], k[4] != 0.0, k[5] != 0.0); }

// Fills the 8-bit struct for dtype P from (codes, absmax, qmap) triples.
template <typename P>
Blocked8bit<P> blocked(const Tensor& param, const Tensor& grad, const std::vector<QuantState>& states,
                       bool block_wise, const c10::optional<Tensor>& new_absmax, const Tensor& gnorm_scale,
                       int64_t* count) {
  Blocked8bit<P> a{};
  a.param = param.data_ptr<P>();
  a.grad = grad.data_ptr<P>();
  a.rows = rows_of(param);
  a.row_length = row_length_of(param);
  a.block_wise = block_wise;
  a.nstates = static_cast<int>(states.size());
  for (size_t s = 0; s < states.size(); ++s) a.state[s] = states[s];
  a.new_absmax = new_absmax.has_value() ? new_absmax->data_ptr<float>() : nullptr;
  a.gnorm_scale = scalar_of(gnorm_scale, "gnorm_scale");
  a.nonfinite_count = count;
  return a;
}

// Whether the states use one absmax per tensor; then new_absmax must be given (updates).
bool block_wise_of(const Tensor& param, const Tensor& absmax, const c10::optional<Tensor>& new_absmax,
                   size_t nstates, bool need_new) {
  const bool block_wise = !new_absmax.has_value();
  if (!block_wise) {
    TORCH_CHECK(absmax.numel() == 1, "distopt: new_absmax is only for states with one absmax per tensor");
    TORCH_CHECK(new_absmax->scalar_type() == at::kFloat && new_absmax->is_contiguous() &&
                    new_absmax->numel() == static_cast<int64_t>(nstates),
                "distopt: new_absmax must hold one fp32 value per state");
  } else if (need_new) {
    const int64_t blocks = rows_of(param) * ceil_div(row_length_of(param), kBlockSize);
    TORCH_CHECK(absmax.numel() == blocks, "distopt: states with one absmax per tensor need new_absmax");
  }
  return block_wise;
}

std::vector<QuantState> adamw_states(const Tensor& param, const Tensor& m, const Tensor& m_absmax,
                                     const Tensor& v, const Tensor& v_absmax, const c10::optional<Tensor>& vmax,
                                     const c10::optional<Tensor>& vmax_absmax, const Tensor& signed_qmap,
                                     const Tensor& unsigned_qmap) {
  std::vector<QuantState> s{quant_state(param, m, m_absmax, signed_qmap, "exp_avg"),
                            quant_state(param, v, v_absmax, unsigned_qmap, "exp_avg_sq")};
  TORCH_CHECK(vmax.has_value() == vmax_absmax.has_value(), "distopt: max_exp_avg_sq needs its absmax");
  if (vmax.has_value()) s.push_back(quant_state(param, *vmax, *vmax_absmax, unsigned_qmap, "max_exp_avg_sq"));
  // one block layout for all: a smaller absmax of a later state would be read and written past its end
  for (const Tensor* absmax : {&v_absmax, vmax_absmax.has_value() ? &*vmax_absmax : &v_absmax}) {
    TORCH_CHECK(absmax->numel() == m_absmax.numel() && absmax->dim() == m_absmax.dim(),
                "distopt: all states must share one block layout (their absmax shapes differ)");
  }
  return s;
}

void adamw8bit_op(Tensor param, const Tensor& grad, Tensor m, Tensor m_absmax, Tensor v, Tensor v_absmax,
                c10::optional<Tensor> vmax, c10::optional<Tensor> vmax_absmax, const Tensor& signed_qmap,
                const Tensor& unsigned_qmap, const c10::optional<Tensor>& new_absmax, const Tensor& gnorm_scale,
                Tensor nonfinite_count, double decay, double lerp_weight, double beta2, double sq_weight,
                double eps, double step_size, double bias_correction2_sqrt) {
  IeeeMode mode;  // ieee_mode.h
  check_pair(param, grad);
  auto states = adamw_states(param, m, m_absmax, v, v_absmax, vmax, vmax_absmax, signed_qmap, unsigned_qmap);
  const bool block_wise = block_wise_of(param, m_absmax, new_absmax, states.size(), true);
  const auto c = adamw_coeffs(decay, lerp_weight, beta2, sq_weight, eps, step_size, bias_correction2_sqrt);
  dispatch_dtype(param, "adamw8bit_", [&](auto tag) {
    using scalar_t = decltype(tag);
    const auto a = blocked<scalar_t>(param, grad, states, block_wise, new_absmax, gnorm_scale, count_of(nonfinite_count));
    adamw8bit(&a, &c, 1);
  });
}

Tensor adamw8bit_new_absmax_op(const Tensor& param, const Tensor& grad, const Tensor& m, const Tensor& m_absmax,
                            const Tensor& v, const Tensor& v_absmax, const c10::optional<Tensor>& vmax,
                            const c10::optional<Tensor>& vmax_absmax, const Tensor& signed_qmap,
                            const Tensor& unsigned_qmap, const Tensor& gnorm_scale, double decay,
                            double lerp_weight, double beta2, double sq_weight, double eps, double step_size,
                            double bias_correction2_sqrt) {
  IeeeMode mode;  // ieee_mode.h
  check_pair(param, grad);
  auto states = adamw_states(param, m, m_absmax, v, v_absmax, vmax, vmax_absmax, signed_qmap, unsigned_qmap);
  TORCH_CHECK(m_absmax.numel() == 1, "distopt: adamw8bit_new_absmax is for states with one absmax per tensor");
  Tensor out = at::zeros({static_cast<int64_t>(states.size())}, param.options().dtype(at::kFloat));
  const auto c = adamw_coeffs(decay, lerp_weight, beta2, sq_weight, eps, step_size, bias_correction2_sqrt);
  dispatch_dtype(param, "adamw8bit_new_absmax", [&](auto tag) {
    using scalar_t = decltype(tag);
    adamw8bit_new_absmax(blocked<scalar_t>(param, grad, states, false, c10::nullopt, gnorm_scale, nullptr), c,
                         out.data_ptr<float>());
  });
  return out;
}

void sgd8bit_op(Tensor param, const Tensor& grad, Tensor buf, Tensor buf_absmax, const Tensor& signed_qmap,
              const c10::optional<Tensor>& new_absmax, const Tensor& gnorm_scale, Tensor nonfinite_count, double lr,
              double weight_decay, double momentum, double dampening_weight, bool nesterov, bool first_step) {
  IeeeMode mode;  // ieee_mode.h
  check_pair(param, grad);
  std::vector<QuantState> states{quant_state(param, buf, buf_absmax, signed_qmap, "momentum_buffer")};
  const bool block_wise = block_wise_of(param, buf_absmax, new_absmax, 1, true);
  const auto c = sgd_coeffs(lr, weight_decay, momentum, dampening_weight, nesterov, first_step);
  dispatch_dtype(param, "sgd8bit_", [&](auto tag) {
    using scalar_t = decltype(tag);
    const auto a = blocked<scalar_t>(param, grad, states, block_wise, new_absmax, gnorm_scale, count_of(nonfinite_count));
    sgd8bit(&a, &c, 1);
  });
}

Tensor sgd8bit_new_absmax_op(const Tensor& param, const Tensor& grad, const Tensor& buf, const Tensor& buf_absmax,
                          const Tensor& signed_qmap, const Tensor& gnorm_scale, double lr, double weight_decay,
                          double momentum, double dampening_weight, bool nesterov, bool first_step) {
  IeeeMode mode;  // ieee_mode.h
  check_pair(param, grad);
  std::vector<QuantState> states{quant_state(param, buf, buf_absmax, signed_qmap, "momentum_buffer")};
  TORCH_CHECK(buf_absmax.numel() == 1, "distopt: sgd8bit_new_absmax is for states with one absmax per tensor");
  Tensor out = at::zeros({1}, param.options().dtype(at::kFloat));
  const auto c = sgd_coeffs(lr, weight_decay, momentum, dampening_weight, nesterov, first_step);
  dispatch_dtype(param, "sgd8bit_new_absmax", [&](auto tag) {
    using scalar_t = decltype(tag);
    sgd8bit_new_absmax(blocked<scalar_t>(param, grad, states, false, c10::nullopt, gnorm_scale, nullptr), c,
                       out.data_ptr<float>());
  });
  return out;
}

// The bytes an update of parameter j writes: its parameter and its states.
struct Written {
  uintptr_t begin, end;
  size_t owner;
};

template <typename T>
void add_written(std::vector<Written>& out, const T* data, int64_t count, size_t owner) {
  if (count > 0) {
    const auto begin = reinterpret_cast<uintptr_t>(data);
    out.push_back({begin, begin + static_cast<uintptr_t>(count) * sizeof(T), owner});
  }
}

template <typename P>
void add_written(std::vector<Written>& out, const Blocked8bit<P>& a, size_t owner) {
  const int64_t numel = a.rows * a.row_length;
  add_written(out, a.param, numel, owner);
  for (int s = 0; s < a.nstates; ++s) {
    add_written(out, a.state[s].codes, numel, owner);
    add_written(out, a.state[s].absmax, a.block_wise ? a.rows * ceil_div(a.row_length, kBlockSize) : 1, owner);
  }
}

template <typename P>
void add_written(std::vector<Written>& out, const Elementwise32bit<P>& a, size_t owner) {
  add_written(out, a.param, a.numel, owner);
  for (int s = 0; s < a.nstates; ++s) add_written(out, a.state[s], a.numel, owner);
}

// Whether two of the parameters' updates write overlapping memory (a parameter listed
// twice, or two sharing storage). Sorted by start, a range overlaps an earlier one of
// another parameter iff it starts before the furthest end among the earlier ranges of
// parameters other than its own: the furthest end of all and the furthest of the other
// parameters than that one's are kept.
template <typename Struct>
bool updates_overlap(const std::vector<Struct>& structs) {
  std::vector<Written> ranges;
  for (size_t j = 0; j < structs.size(); ++j) add_written(ranges, structs[j], j);
  std::sort(ranges.begin(), ranges.end(), [](const Written& x, const Written& y) { return x.begin < y.begin; });
  uintptr_t best_end = 0, other_end = 0;  // other_end: the furthest end of a parameter other than best_owner
  size_t best_owner = SIZE_MAX;
  for (const Written& r : ranges) {
    if (r.begin < (r.owner == best_owner ? other_end : best_end)) return true;
    if (r.owner == best_owner) {
      best_end = std::max(best_end, r.end);
    } else if (r.end > best_end) {
      other_end = best_end;
      best_end = r.end;
      best_owner = r.owner;
    } else {
      other_end = std::max(other_end, r.end);
    }
  }
  return false;
}

// Builds (and so checks) the kernel struct and coefficients of every parameter 0..n-1
// with make(j), then runs update(structs, coefficients, n) once: a refused call changes
// nothing, and the kernel shares the work of all the parameters among its threads.
// Parameters whose updates write overlapping memory (a parameter listed twice) are
// updated one after another instead, as one call each would update them: shared
// among the threads, their blocks would race.
template <typename Make, typename Update>
void update_checked_first(size_t n, const Make& make, const Update& update) {
  using Pair = decltype(make(size_t{0}));
  std::vector<typename Pair::first_type> structs;
  std::vector<typename Pair::second_type> coeffs;
  structs.reserve(n);
  coeffs.reserve(n);
  for (size_t j = 0; j < n; ++j) {
    try {
      auto [a, c] = make(j);
      structs.push_back(a);
      coeffs.push_back(c);
    } catch (c10::Error& e) {
      if (n > 1) e.add_context(c10::str("distopt: (in parameter ", j, " of the ", n, " in this call)"));
      throw;
    }
  }
  if (n > 1 && updates_overlap(structs)) {
    for (size_t j = 0; j < n; ++j) update(&structs[j], &coeffs[j], 1);
    return;
  }
  update(structs.data(), coeffs.data(), static_cast<int64_t>(n));
}

// The 8-bit updates of many parameters with block-wise state in one call (the
// *8bit_multi_ schemas): each parameter exactly as adamw8bit_ / sgd8bit_ updates it
// with block-wise state, checked before the first is updated.
void check_block_wise(const Tensor& absmax, const char* op) {
  TORCH_CHECK(absmax.dim() == 2, "distopt::", op, " takes block-wise states (a 2-D absmax)");
}

void adamw8bit_multi_op(at::TensorList params, at::TensorList grads, at::TensorList m, at::TensorList m_absmax,
                        at::TensorList v, at::TensorList v_absmax, at::TensorList vmax, at::TensorList vmax_absmax,
                        const Tensor& signed_qmap, const Tensor& unsigned_qmap, at::TensorList gnorm_scales,
                        at::TensorList counts, at::ArrayRef<double> coeffs) {
  IeeeMode mode;  // ieee_mode.h
  check_lists(params, {grads, m, m_absmax, v, v_absmax, gnorm_scales, counts}, {vmax, vmax_absmax}, coeffs.size(), 7);
  TORCH_CHECK(vmax.size() == vmax_absmax.size(), "distopt: max_exp_avg_sqs need their absmaxes");
  if (params.empty()) return;
  dispatch_dtype(params[0], "adamw8bit_multi_", [&](auto tag) {
    using P = decltype(tag);
    auto make = [&](size_t j) {
      check_pair(params[j], grads[j]);
      const c10::optional<Tensor> none;
      const auto states = adamw_states(params[j], m[j], m_absmax[j], v[j], v_absmax[j],
                                       vmax.empty() ? none : vmax[j], vmax_absmax.empty() ? none : vmax_absmax[j],
                                       signed_qmap, unsigned_qmap);
      check_block_wise(m_absmax[j], "adamw8bit_multi_");
      block_wise_of(params[j], m_absmax[j], none, states.size(), true);
      const double* k = coeffs.data() + 7 * j;
      return std::make_pair(blocked<P>(params[j], grads[j], states, true, none, gnorm_scales[j], count_of(counts[j])),
                            adamw_coeffs_at(k));
    };
    update_checked_first(params.size(), make,
                         [](const auto* a, const AdamWCoeffs* c, int64_t n) { adamw8bit(a, c, n); });
  });
}

void sgd8bit_multi_op(at::TensorList params, at::TensorList grads, at::TensorList bufs, at::TensorList buf_absmax,
                      const Tensor& signed_qmap, at::TensorList gnorm_scales, at::TensorList counts,
                      at::ArrayRef<double> coeffs) {
  IeeeMode mode;  // ieee_mode.h
  check_lists(params, {grads, bufs, buf_absmax, gnorm_scales, counts}, {}, coeffs.size(), 6);
  if (params.empty()) return;
  dispatch_dtype(params[0], "sgd8bit_multi_", [&](auto tag) {
    using P = decltype(tag);
    auto make = [&](size_t j) {
      check_pair(params[j], grads[j]);
      const std::vector<QuantState> states{quant_state(params[j], bufs[j], buf_absmax[j], signed_qmap, "momentum_buffer")};
      check_block_wise(buf_absmax[j], "sgd8bit_multi_");
      block_wise_of(params[j], buf_absmax[j], c10::nullopt, 1, true);
      const double* k = coeffs.data() + 6 * j;
      return std::make_pair(
          blocked<P>(params[j], grads[j], states, true, c10::nullopt, gnorm_scales[j], count_of(counts[j])),
          sgd_coeffs_at(k));
    };
    update_checked_first(params.size(), make,
                         [](const auto* a, const SGDCoeffs* c, int64_t n) { sgd8bit(a, c, n); });
  });
}

void add_one_op(at::TensorList counters) {
  for (const auto& t : counters) {  // all checked first
    const auto type = t.scalar_type();
    // exactly the dtypes AT_DISPATCH_ALL_TYPES serves below (no unsigned type but uint8)
    const bool served = type == at::kFloat || type == at::kDouble || type == at::kByte || type == at::kChar ||
                        type == at::kShort || type == at::kInt || type == at::kLong;
    TORCH_CHECK(t.numel() == 1 && t.device().is_cpu() && served,
                "distopt::add_one_ takes one-element CPU tensors of dtype float32, float64, uint8 or a signed "
                "integer type, not ", t.scalar_type(), " on ", t.device(), " with ", t.numel(), " elements");
  }
  for (const auto& t : counters) {
    AT_DISPATCH_ALL_TYPES(t.scalar_type(), "add_one_", [&] { *t.data_ptr<scalar_t>() += scalar_t(1); });
  }
}

// The 32-bit struct for dtype P, every tensor checked (nothing is written here).
template <typename P>
Elementwise32bit<P> elementwise(const Tensor& param, const Tensor& grad, const std::vector<Tensor>& states,
                                const Tensor& gnorm_scale, const Tensor& nonfinite_count, const char* op) {
  check_pair(param, grad);
  for (const auto& s : states) check_state32(param, s, op);
  Elementwise32bit<P> a{};
  a.param = param.data_ptr<P>();
  a.grad = grad.data_ptr<P>();
  a.numel = param.numel();
  a.nstates = static_cast<int>(states.size());
  for (size_t s = 0; s < states.size(); ++s) a.state[s] = states[s].data_ptr<float>();
  a.gnorm_scale = scalar_of(gnorm_scale, "gnorm_scale");
  a.nonfinite_count = count_of(nonfinite_count);
  return a;
}

// The 32-bit updates of many parameters in one call (the *_multi_ schemas): each
// parameter exactly as adamw32_ / sgd32_ updates it, with its own coefficients (`per`
// doubles each in `coeffs`, turned into the kernel's by `coeffs_at`), gnorm scale and
// skip counter, without a call from Python per parameter.
template <typename CoeffsAt, typename Update>
void update32_multi(at::TensorList params, at::TensorList grads, const std::vector<at::TensorList>& states,
                    at::TensorList gnorm_scales, at::TensorList counts, at::ArrayRef<double> coeffs, size_t per,
                    const char* op, const CoeffsAt& coeffs_at, const Update& update) {
  IeeeMode mode;  // ieee_mode.h
  check_lists(params, {grads, gnorm_scales, counts}, states, coeffs.size(), per);
  if (params.empty()) return;
  dispatch_dtype(params[0], op, [&](auto tag) {
    using P = decltype(tag);
    update_checked_first(
        params.size(),
        [&](size_t j) {
          return std::make_pair(
              elementwise<P>(params[j], grads[j], states_of(states, j), gnorm_scales[j], counts[j], op),
              coeffs_at(coeffs.data() + per * j));
        },
        update);
  });
}

void adamw32_multi_op(at::TensorList params, at::TensorList grads, at::TensorList m, at::TensorList v,
                      at::TensorList vmax, at::TensorList gnorm_scales, at::TensorList counts,
                      at::ArrayRef<double> coeffs) {
  TORCH_CHECK(m.size() == params.size() && v.size() == params.size(),
              "distopt: every tensor list needs one entry per parameter");
  update32_multi(params, grads, {m, v, vmax}, gnorm_scales, counts, coeffs, 7, "adamw32_multi_", adamw_coeffs_at,
                 [](const auto* a, const AdamWCoeffs* c, int64_t n) { adamw32(a, c, n); });
}

void sgd32_multi_op(at::TensorList params, at::TensorList grads, at::TensorList bufs, at::TensorList gnorm_scales,
                    at::TensorList counts, at::ArrayRef<double> coeffs) {
  update32_multi(params, grads, {bufs}, gnorm_scales, counts, coeffs, 6, "sgd32_multi_", sgd_coeffs_at,
                 [](const auto* a, const SGDCoeffs* c, int64_t n) { sgd32(a, c, n); });
}

void adamw32_op(Tensor param, const Tensor& grad, Tensor m, Tensor v, c10::optional<Tensor> vmax,
              const Tensor& gnorm_scale, Tensor nonfinite_count, double decay, double lerp_weight, double beta2,
              double sq_weight, double eps, double step_size, double bias_correction2_sqrt) {
  std::vector<Tensor> vmaxes;
  if (vmax.has_value()) vmaxes.push_back(*vmax);
  adamw32_multi_op({param}, {grad}, {m}, {v}, vmaxes, {gnorm_scale}, {nonfinite_count},
                   {decay, lerp_weight, beta2, sq_weight, eps, step_size, bias_correction2_sqrt});
}

void sgd32_op(Tensor param, const Tensor& grad, c10::optional<Tensor> buf, const Tensor& gnorm_scale,
            Tensor nonfinite_count, double lr, double weight_decay, double momentum, double dampening_weight,
            bool nesterov, bool first_step) {
  std::vector<Tensor> bufs;
  if (buf.has_value()) bufs.push_back(*buf);
  sgd32_multi_op({param}, {grad}, bufs, {gnorm_scale}, {nonfinite_count},
                 {lr, weight_decay, momentum, dampening_weight, nesterov ? 1.0 : 0.0, first_step ? 1.0 : 0.0});
}

Tensor row_sumsq_op(const Tensor& grad) {
  IeeeMode mode;  // ieee_mode.h
  TORCH_CHECK(grad.is_contiguous(), "distopt: row_sumsq needs a contiguous gradient");
  Tensor out = at::zeros({rows_of(grad)}, grad.options().dtype(at::kDouble));
  if (grad.numel() == 0) return out;
  dispatch_dtype(grad, "row_sumsq", [&](auto tag) {
    using scalar_t = decltype(tag);
    row_sumsq(grad.data_ptr<scalar_t>(), rows_of(grad), row_length_of(grad), out.data_ptr<double>());
  });
  return out;
}

std::tuple<Tensor, Tensor> quantize_blockwise_op(const Tensor& x, const Tensor& qmap, bool block_wise) {
  IeeeMode mode;  // ieee_mode.h
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.is_contiguous(), "distopt: quantize_blockwise takes contiguous fp32");
  check_qmap(qmap);
  const int64_t rows = rows_of(x), blocks_per_row = ceil_div(row_length_of(x), kBlockSize);
  Tensor codes = at::empty(x.sizes(), x.options().dtype(at::kByte));
  Tensor absmax = block_wise ? at::zeros({rows, blocks_per_row}, x.options()) : at::zeros({1}, x.options());
  if (x.numel() > 0)
    quantize_blockwise(x.data_ptr<float>(), rows, row_length_of(x), block_wise, qmap.data_ptr<float>(),
                       codes.data_ptr<uint8_t>(), absmax.data_ptr<float>());
  return {codes, absmax};
}

Tensor dequantize_blockwise_op(const Tensor& codes, const Tensor& absmax, const Tensor& qmap) {
  IeeeMode mode;  // ieee_mode.h
  TORCH_CHECK(codes.scalar_type() == at::kByte && codes.is_contiguous(), "distopt: codes must be contiguous uint8");
  check_qmap(qmap);
  const int64_t blocks = rows_of(codes) * ceil_div(row_length_of(codes), kBlockSize);
  TORCH_CHECK(absmax.scalar_type() == at::kFloat && absmax.is_contiguous() &&
                  (absmax.numel() == blocks || absmax.numel() == 1),
              "distopt: absmax must be contiguous fp32 with one value per block or one in all");
  Tensor out = at::empty(codes.sizes(), codes.options().dtype(at::kFloat));
  const bool block_wise = absmax.numel() == blocks;
  if (codes.numel() > 0)
    dequantize_blockwise(codes.data_ptr<uint8_t>(), absmax.data_ptr<float>(), rows_of(codes), row_length_of(codes),
                         block_wise, qmap.data_ptr<float>(), out.data_ptr<float>());
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(distopt, CPU, m) {
  m.impl("adamw32_", &adamw32_op);
  m.impl("adamw8bit_", &adamw8bit_op);
  m.impl("adamw8bit_new_absmax", &adamw8bit_new_absmax_op);
  m.impl("sgd32_", &sgd32_op);
  m.impl("adamw32_multi_", &adamw32_multi_op);
  m.impl("sgd32_multi_", &sgd32_multi_op);
  m.impl("adamw8bit_multi_", &adamw8bit_multi_op);
  m.impl("sgd8bit_multi_", &sgd8bit_multi_op);
  m.impl("add_one_", &add_one_op);
  m.impl("sgd8bit_", &sgd8bit_op);
  m.impl("sgd8bit_new_absmax", &sgd8bit_new_absmax_op);
  m.impl("row_sumsq", &row_sumsq_op);
  m.impl("quantize_blockwise", &quantize_blockwise_op);
  m.impl("dequantize_blockwise", &dequantize_blockwise_op);
}

}  // namespace distopt::cpu
