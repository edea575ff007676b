// The CUDA boundary of the 32-bit updates (one parameter, or many per launch: the
// *_multi_ ops), the per-row squared norms and the standalone (de)quantization ops.
#include <torch/library.h>

#include <vector>

#include "boundary.h"

namespace distopt::cuda {
namespace {

template <typename P, typename C>
Tensor32<P, C> tensor32(const Tensor& param, const Tensor& grad, const std::vector<Tensor>& states,
                        const Tensor& gnorm_scale, const Tensor& count, const C& coeffs) {
  check_pair(param, grad);
  for (const auto& s : states) check_state32(param, s);
  Tensor32<P, C> t{};
  t.param = param.data_ptr<P>();
  t.grad = grad.data_ptr<P>();
  for (size_t s = 0; s < states.size(); ++s) t.state[s] = states[s].data_ptr<float>();
  t.numel = param.numel();
  t.gnorm_scale = scale_of(gnorm_scale, param);
  t.nonfinite_count = count_of(count, param);
  t.coeffs = coeffs;
  return t;
}

void adamw32_multi_op(at::TensorList params, at::TensorList grads, at::TensorList m, at::TensorList v,
                      at::TensorList vmax, at::TensorList gnorm_scales, at::TensorList counts,
                      at::ArrayRef<double> coeffs) {
  if (params.empty()) return;
  check_lists(params, {grads, m, v, gnorm_scales, counts}, {vmax}, coeffs.size(), 7);
  const c10::cuda::CUDAGuard guard(params[0].device());
  const int nstates = vmax.empty() ? 2 : 3;
  dispatch_dtype(params[0], "adamw32_multi_", [&](auto tag) {
    using P = decltype(tag);
    std::vector<Tensor32<P, AdamWCoeffs>> ts;
    for (size_t j = 0; j < params.size(); ++j) {
      const double* k = coeffs.data() + 7 * j;
      const AdamWCoeffs c{float(k[0]), float(k[1]), float(k[2]), float(k[3]), float(k[4]), float(k[5]), float(k[6])};
      if (params[j].numel() == 0) continue;
      ts.push_back(tensor32<P>(params[j], grads[j], states_of({m, v, vmax}, j), gnorm_scales[j], counts[j], c));
    }
    launch_adamw32(ts.data(), static_cast<int64_t>(ts.size()), nstates, stream());
  });
}

void sgd32_multi_op(at::TensorList params, at::TensorList grads, at::TensorList bufs, at::TensorList gnorm_scales,
                    at::TensorList counts, at::ArrayRef<double> coeffs) {
  if (params.empty()) return;
  check_lists(params, {grads, gnorm_scales, counts}, {bufs}, coeffs.size(), 6);
  const c10::cuda::CUDAGuard guard(params[0].device());
  dispatch_dtype(params[0], "sgd32_multi_", [&](auto tag) {
    using P = decltype(tag);
    std::vector<Tensor32<P, SGDCoeffs>> ts;
    for (size_t j = 0; j < params.size(); ++j) {
      const double* k = coeffs.data() + 6 * j;
      const SGDCoeffs c{float(k[0]), float(k[1]), float(k[2]), float(k[3]), k[4] != 0.0, k[5] != 0.0};
      if (params[j].numel() == 0) continue;
      ts.push_back(tensor32<P>(params[j], grads[j], states_of({bufs}, j), gnorm_scales[j], counts[j], c));
    }
    launch_sgd32(ts.data(), static_cast<int64_t>(ts.size()), bufs.empty() ? 0 : 1, stream());
  });
}

void adamw32_op(Tensor param, const Tensor& grad, Tensor m, Tensor v, c10::optional<Tensor> vmax,
                const Tensor& gnorm_scale, Tensor count, double decay, double lerp_weight, double beta2,
                double sq_weight, double eps, double step_size, double bc2) {
  std::vector<Tensor> none;
  std::vector<Tensor> vmaxes = vmax.has_value() ? std::vector<Tensor>{*vmax} : none;
  adamw32_multi_op({param}, {grad}, {m}, {v}, vmaxes, {gnorm_scale}, {count},
                   {decay, lerp_weight, beta2, sq_weight, eps, step_size, bc2});
}

void sgd32_op(Tensor param, const Tensor& grad, c10::optional<Tensor> buf, const Tensor& gnorm_scale, Tensor count,
              double lr, double weight_decay, double momentum, double dampening_weight, bool nesterov,
              bool first_step) {
  std::vector<Tensor> bufs;
  if (buf.has_value()) bufs.push_back(*buf);
  sgd32_multi_op({param}, {grad}, bufs, {gnorm_scale}, {count},
                 {lr, weight_decay, momentum, dampening_weight, nesterov ? 1.0 : 0.0, first_step ? 1.0 : 0.0});
}

Tensor row_sumsq_op(const Tensor& grad) {
  TORCH_CHECK(grad.is_cuda() && grad.is_contiguous(), "distopt: row_sumsq needs a contiguous CUDA gradient");
  const c10::cuda::CUDAGuard guard(grad.device());
  Tensor out = at::zeros({rows_of(grad)}, grad.options().dtype(at::kDouble));
  dispatch_dtype(grad, "row_sumsq", [&](auto tag) {
    using P = decltype(tag);
    if (grad.numel() > 0)
      launch_row_sumsq(RowSumsqArgs<P>{grad.data_ptr<P>(), rows_of(grad), row_length_of(grad), out.data_ptr<double>()},
                       stream());
  });
  return out;
}

void check_qmap(const Tensor& qmap, const Tensor& like) {
  check_on(qmap, like, "qmap");
  TORCH_CHECK(qmap.scalar_type() == at::kFloat && qmap.is_contiguous() && qmap.numel() == 256,
              "distopt: qmap must be 256 contiguous fp32 values");
}

std::tuple<Tensor, Tensor> quantize_blockwise_op(const Tensor& x, const Tensor& qmap, bool block_wise) {
  TORCH_CHECK(x.is_cuda() && x.scalar_type() == at::kFloat && x.is_contiguous(),
              "distopt: quantize_blockwise takes contiguous fp32");
  check_qmap(qmap, x);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t rows = rows_of(x), length = row_length_of(x), per_row = ceil_div(length, kBlockSize);
  Tensor codes = at::empty(x.sizes(), x.options().dtype(at::kByte));
  Tensor absmax = block_wise ? at::zeros({rows, per_row}, x.options()) : at::zeros({1}, x.options());
  launch_quantize({x.data_ptr<float>(), rows, length, block_wise, qmap.data_ptr<float>(), codes.data_ptr<uint8_t>(),
                   absmax.data_ptr<float>(), nullptr},
                  stream());
  return {codes, absmax};
}

Tensor dequantize_blockwise_op(const Tensor& codes, const Tensor& absmax, const Tensor& qmap) {
  TORCH_CHECK(codes.is_cuda() && codes.scalar_type() == at::kByte && codes.is_contiguous(),
              "distopt: codes must be contiguous uint8");
  check_qmap(qmap, codes);
  check_on(absmax, codes, "absmax");
  const c10::cuda::CUDAGuard guard(codes.device());
  const int64_t rows = rows_of(codes), length = row_length_of(codes), blocks = blocks_of(rows, length);
  TORCH_CHECK(absmax.scalar_type() == at::kFloat && absmax.is_contiguous() &&
                  (absmax.numel() == blocks || absmax.numel() == 1),
              "distopt: absmax must be contiguous fp32 with one value per block or one in all");
  Tensor out = at::empty(codes.sizes(), codes.options().dtype(at::kFloat));
  launch_dequantize({codes.data_ptr<uint8_t>(), absmax.data_ptr<float>(), rows, length, absmax.numel() == blocks,
                     qmap.data_ptr<float>(), out.data_ptr<float>()},
                    stream());
  return out;
}

}  // namespace

void register_ops32(torch::Library& m) {
  m.impl("adamw32_", &adamw32_op);
  m.impl("sgd32_", &sgd32_op);
  m.impl("adamw32_multi_", &adamw32_multi_op);
  m.impl("sgd32_multi_", &sgd32_multi_op);
  m.impl("row_sumsq", &row_sumsq_op);
  m.impl("quantize_blockwise", &quantize_blockwise_op);
  m.impl("dequantize_blockwise", &dequantize_blockwise_op);
}

}  // namespace distopt::cuda
