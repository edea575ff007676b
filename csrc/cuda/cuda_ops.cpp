// The CUDA tensor boundary (cuda_ prefix: ninja names objects by file name, and csrc/cpu
// has ops.cpp and kernels.cpp): checks every tensor (device, dtype, layout), dispatches on
// the parameter dtype, fills the kernels' raw-pointer structs (csrc/cuda/*.h) and
// launches on the current stream of the parameter's device under a device guard. The
// scalars gnorm_scale and nonfinite_count stay on the device (no host synchronization
// per parameter). Registers the CUDA implementations of csrc/registration.cpp's schemas.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <vector>

#include "boundary.h"

namespace distopt::cuda {
namespace {

// Fills the 8-bit args; block_wise=false when the states hold one absmax each.
template <typename P>
Block8bitArgs<P> blocked(const Tensor& param, const Tensor& grad, const std::vector<Quant>& states,
                         const OptTensor& new_absmax, float* max_out, const Tensor& gnorm_scale, int64_t* count) {
  for (const auto& q : states) check_quant(param, q);
  Block8bitArgs<P> a{};
  a.param = param.data_ptr<P>();
  a.grad = grad.data_ptr<P>();
  a.rows = rows_of(param);
  a.row_length = row_length_of(param);
  a.block_wise = !new_absmax.has_value() && max_out == nullptr;
  TORCH_CHECK(!a.block_wise || states[0].absmax.numel() == blocks_of(a.rows, a.row_length),
              "distopt: states with one absmax per tensor need new_absmax");
  a.nstates = static_cast<int>(states.size());
  for (int s = 0; s < a.nstates; ++s) {
    TORCH_CHECK(states[s].absmax.numel() == states[0].absmax.numel(), "distopt: all states must share one layout");
    a.codes[s] = states[s].codes.data_ptr<uint8_t>();
    a.absmax[s] = states[s].absmax.data_ptr<float>();
    a.qmap[s] = states[s].qmap.data_ptr<float>();
  }
  if (!a.block_wise && max_out == nullptr) {
    check_on(*new_absmax, param, "new_absmax");
    TORCH_CHECK(new_absmax->scalar_type() == at::kFloat && new_absmax->is_contiguous() &&
                    new_absmax->numel() == a.nstates,
                "distopt: new_absmax must hold one fp32 value per state");
    a.new_absmax = new_absmax->data_ptr<float>();
  }
  TORCH_CHECK(a.block_wise || states[0].absmax.numel() == 1, "distopt: new_absmax is for one absmax per tensor");
  a.max_out = max_out;
  a.gnorm_scale = scale_of(gnorm_scale, param);
  a.nonfinite_count = count;
  return a;
}

std::vector<Quant> adamw_states(const Tensor& m, const Tensor& m_absmax, const Tensor& v, const Tensor& v_absmax,
                                const OptTensor& vmax, const OptTensor& vmax_absmax, const Tensor& signed_qmap,
                                const Tensor& unsigned_qmap) {
  std::vector<Quant> s{{m, m_absmax, signed_qmap}, {v, v_absmax, unsigned_qmap}};
  TORCH_CHECK(vmax.has_value() == vmax_absmax.has_value(), "distopt: max_exp_avg_sq needs its absmax");
  if (vmax.has_value()) s.push_back({*vmax, *vmax_absmax, unsigned_qmap});
  return s;
}

AdamWCoeffs adamw_coeffs(double d, double lw, double b2, double sw, double eps, double ss, double bc2) {
  return {float(d), float(lw), float(b2), float(sw), float(eps), float(ss), float(bc2)};
}

SGDCoeffs sgd_coeffs(double lr, double wd, double mom, double dw, bool nesterov, bool first_step) {
  return {float(lr), float(wd), float(mom), float(dw), nesterov, first_step};
}

void adamw8bit_op(Tensor param, const Tensor& grad, Tensor m, Tensor m_absmax, Tensor v, Tensor v_absmax,
                  OptTensor vmax, OptTensor vmax_absmax, const Tensor& signed_qmap, const Tensor& unsigned_qmap,
                  const OptTensor& new_absmax, const Tensor& gnorm_scale, Tensor nonfinite_count, double decay,
                  double lerp_weight, double beta2, double sq_weight, double eps, double step_size, double bc2) {
  check_pair(param, grad);
  const c10::cuda::CUDAGuard guard(param.device());
  const auto states = adamw_states(m, m_absmax, v, v_absmax, vmax, vmax_absmax, signed_qmap, unsigned_qmap);
  const auto c = adamw_coeffs(decay, lerp_weight, beta2, sq_weight, eps, step_size, bc2);
  int64_t* count = count_of(nonfinite_count, param);
  dispatch_dtype(param, "adamw8bit_", [&](auto tag) {
    using P = decltype(tag);
    launch_adamw8bit(blocked<P>(param, grad, states, new_absmax, nullptr, gnorm_scale, count), c, stream());
  });
}

Tensor adamw8bit_new_absmax_op(const Tensor& param, const Tensor& grad, const Tensor& m, const Tensor& m_absmax,
                               const Tensor& v, const Tensor& v_absmax, const OptTensor& vmax,
                               const OptTensor& vmax_absmax, const Tensor& signed_qmap, const Tensor& unsigned_qmap,
                               const Tensor& gnorm_scale, double decay, double lerp_weight, double beta2,
                               double sq_weight, double eps, double step_size, double bc2) {
  check_pair(param, grad);
  const c10::cuda::CUDAGuard guard(param.device());
  const auto states = adamw_states(m, m_absmax, v, v_absmax, vmax, vmax_absmax, signed_qmap, unsigned_qmap);
  TORCH_CHECK(m_absmax.numel() == 1, "distopt: adamw8bit_new_absmax is for states with one absmax per tensor");
  Tensor out = at::zeros({static_cast<int64_t>(states.size())}, param.options().dtype(at::kFloat));
  const auto c = adamw_coeffs(decay, lerp_weight, beta2, sq_weight, eps, step_size, bc2);
  dispatch_dtype(param, "adamw8bit_new_absmax", [&](auto tag) {
    using P = decltype(tag);
    auto a = blocked<P>(param, grad, states, c10::nullopt, out.data_ptr<float>(), gnorm_scale, nullptr);
    launch_adamw8bit(a, c, stream());
  });
  return out;
}

void sgd8bit_op(Tensor param, const Tensor& grad, Tensor buf, Tensor buf_absmax, const Tensor& signed_qmap,
                const OptTensor& new_absmax, const Tensor& gnorm_scale, Tensor nonfinite_count, double lr,
                double weight_decay, double momentum, double dampening_weight, bool nesterov, bool first_step) {
  check_pair(param, grad);
  const c10::cuda::CUDAGuard guard(param.device());
  const std::vector<Quant> states{{buf, buf_absmax, signed_qmap}};
  const auto c = sgd_coeffs(lr, weight_decay, momentum, dampening_weight, nesterov, first_step);
  int64_t* count = count_of(nonfinite_count, param);
  dispatch_dtype(param, "sgd8bit_", [&](auto tag) {
    using P = decltype(tag);
    launch_sgd8bit(blocked<P>(param, grad, states, new_absmax, nullptr, gnorm_scale, count), c, stream());
  });
}

Tensor sgd8bit_new_absmax_op(const Tensor& param, const Tensor& grad, const Tensor& buf, const Tensor& buf_absmax,
                             const Tensor& signed_qmap, const Tensor& gnorm_scale, double lr, double weight_decay,
                             double momentum, double dampening_weight, bool nesterov, bool first_step) {
  check_pair(param, grad);
  const c10::cuda::CUDAGuard guard(param.device());
  const std::vector<Quant> states{{buf, buf_absmax, signed_qmap}};
  TORCH_CHECK(buf_absmax.numel() == 1, "distopt: sgd8bit_new_absmax is for states with one absmax per tensor");
  Tensor out = at::zeros({1}, param.options().dtype(at::kFloat));
  const auto c = sgd_coeffs(lr, weight_decay, momentum, dampening_weight, nesterov, first_step);
  dispatch_dtype(param, "sgd8bit_new_absmax", [&](auto tag) {
    using P = decltype(tag);
    auto a = blocked<P>(param, grad, states, c10::nullopt, out.data_ptr<float>(), gnorm_scale, nullptr);
    launch_sgd8bit(a, c, stream());
  });
  return out;
}

}  // namespace

// The 32-bit and statistics ops (cuda_ops32.cpp) and the managed-memory ops (managed.cpp).
void register_ops32(torch::Library& m);

TORCH_LIBRARY_IMPL(distopt, CUDA, m) {
  m.impl("adamw8bit_", &adamw8bit_op);
  m.impl("adamw8bit_new_absmax", &adamw8bit_new_absmax_op);
  m.impl("sgd8bit_", &sgd8bit_op);
  m.impl("sgd8bit_new_absmax", &sgd8bit_new_absmax_op);
  register_ops32(m);
}

}  // namespace distopt::cuda
