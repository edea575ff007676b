// Host build of the CUDA kernel bodies, for the CPU test suite (DESIGN §7): the bodies of
// blockwise8bit.h, multi_tensor.h and rowwise.h run with HostExec, every CUDA block of a
// grid in turn and, inside it, every thread phase by phase, so their indexing, tails,
// boundary blocks, grid-stride loops, tree reductions and launch packing are checked
// against the reference on every CI run. Built by tests/test_cuda_host.py as its own
// library (ops in namespace distopt_host, CPU tensors); never part of distopt's library.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "../common/host_tensor.h"
#include "blockwise8bit.h"
#include "multi_tensor.h"
#include "rowwise.h"

namespace distopt::cuda::host {
namespace {

using at::Tensor;

// Runs `body(exec, shared)` for each CUDA block of a grid of `grid` (shared memory is
// fresh garbage per block, as on the device: filled with NaN bits so stale reads show).
template <typename Shared, typename Body>
void run_grid(int64_t grid, Body&& body) {
  for (int64_t cta = 0; cta < grid; ++cta) {
    auto shared = std::make_unique<Shared>();
    std::memset(static_cast<void*>(shared.get()), 0xff, sizeof(Shared));
    body(HostExec{cta, grid}, *shared);
  }
}

AdamWCoeffs adamw_coeffs(at::ArrayRef<double> k, size_t j = 0) {
  k = k.slice(7 * j, 7);
  return {float(k[0]), float(k[1]), float(k[2]), float(k[3]), float(k[4]), float(k[5]), float(k[6])};
}

SGDCoeffs sgd_coeffs(at::ArrayRef<double> k, size_t j = 0) {
  k = k.slice(6 * j, 6);
  return {float(k[0]), float(k[1]), float(k[2]), float(k[3]), k[4] != 0.0, k[5] != 0.0};
}

template <int NS, typename P, typename Rule>
void run_8bit(const Block8bitArgs<P>& a, const Rule& rule, int64_t grid) {
  run_grid<Block8bitShared>(grid,
                            [&](const HostExec& x, Block8bitShared& sh) { blockwise8bit_body<NS>(x, a, rule, sh); });
}

Tensor blockwise8bit(Tensor param, const Tensor& grad, at::TensorList codes, at::TensorList absmax,
                     at::TensorList qmaps, const c10::optional<Tensor>& new_absmax, const Tensor& gnorm_scale,
                     Tensor count, const std::string& rule, at::ArrayRef<double> coeffs, bool max_pass, int64_t grid) {
  const int ns = static_cast<int>(codes.size());
  Tensor max_out = at::zeros({ns}, param.options().dtype(at::kFloat));
  dispatch_dtype(param, "host", [&](auto tag) {
    using P = decltype(tag);
    Block8bitArgs<P> a{};
    a.param = param.data_ptr<P>();
    a.grad = grad.data_ptr<P>();
    a.rows = rows_of(param);
    a.row_length = row_length_of(param);
    a.block_wise = !max_pass && !new_absmax.has_value();
    a.nstates = ns;
    for (int s = 0; s < ns; ++s) {
      a.codes[s] = codes[s].data_ptr<uint8_t>();
      a.absmax[s] = absmax[s].data_ptr<float>();
      a.qmap[s] = qmaps[s].data_ptr<float>();
    }
    a.new_absmax = new_absmax.has_value() ? new_absmax->data_ptr<float>() : nullptr;
    a.max_out = max_pass ? max_out.data_ptr<float>() : nullptr;
    a.gnorm_scale = gnorm_scale.data_ptr<float>();
    a.nonfinite_count = count.data_ptr<int64_t>();
    if (rule == "adamw") {
      const AdamWRule r{adamw_coeffs(coeffs), ns == 3};
      ns == 3 ? run_8bit<3>(a, r, grid) : run_8bit<2>(a, r, grid);
    } else {
      TORCH_CHECK(rule == "sgd" && ns == 1, "distopt_host: rule must be adamw (2-3 states) or sgd (1)");
      run_8bit<1>(a, SGDRule{sgd_coeffs(coeffs), true}, grid);
    }
    if (!a.block_wise && !max_pass)  // as launch_8bit: the new absmax once every block has read the old
      for (int s = 0; s < ns; ++s) a.absmax[s][0] = a.new_absmax[s];
  });
  return max_out;
}

template <int NS, typename P, typename C>
int64_t run_multi(const std::vector<Tensor32<P, C>>& ts) {
  int64_t launches = 0;
  pack_launches(ts.data(), static_cast<int64_t>(ts.size()), NS, [&](const Multi32bitArgs<P, C>& a) {
    ++launches;
    for (int64_t cta = 0; cta < a.nblocks; ++cta) multi32_body<NS>(HostExec{cta, a.nblocks}, a);
  });
  return launches;
}

// states: nstates per parameter, in order; returns the number of launches.
int64_t multi32(at::TensorList params, at::TensorList grads, at::TensorList states, int64_t nstates,
                at::TensorList gnorm_scales, at::TensorList counts, const std::string& rule,
                at::ArrayRef<double> coeffs) {
  int64_t launches = 0;
  if (params.empty()) return 0;
  dispatch_dtype(params[0], "host", [&](auto tag) {
    using P = decltype(tag);
    auto fill = [&](auto& t, size_t j) {
      t.param = params[j].data_ptr<P>();
      t.grad = grads[j].data_ptr<P>();
      for (int64_t s = 0; s < nstates; ++s) t.state[s] = states[j * nstates + s].data_ptr<float>();
      t.numel = params[j].numel();
      t.gnorm_scale = gnorm_scales[j].data_ptr<float>();
      t.nonfinite_count = counts[j].data_ptr<int64_t>();
    };
    if (rule == "adamw") {
      std::vector<Tensor32<P, AdamWCoeffs>> ts;
      for (size_t j = 0; j < params.size(); ++j) {
        if (params[j].numel() == 0) continue;
        ts.emplace_back();
        fill(ts.back(), j);
        ts.back().coeffs = adamw_coeffs(coeffs, j);
      }
      launches = nstates == 3 ? run_multi<3>(ts) : run_multi<2>(ts);
    } else {
      std::vector<Tensor32<P, SGDCoeffs>> ts;
      for (size_t j = 0; j < params.size(); ++j) {
        if (params[j].numel() == 0) continue;
        ts.emplace_back();
        fill(ts.back(), j);
        ts.back().coeffs = sgd_coeffs(coeffs, j);
      }
      launches = nstates == 1 ? run_multi<1>(ts) : run_multi<0>(ts);
    }
  });
  return launches;
}

Tensor row_sumsq(const Tensor& grad, int64_t grid) {
  Tensor out = at::zeros({rows_of(grad)}, grad.options().dtype(at::kDouble));
  if (grad.numel() == 0) return out;
  dispatch_dtype(grad, "host", [&](auto tag) {
    using P = decltype(tag);
    const RowSumsqArgs<P> a{grad.data_ptr<P>(), rows_of(grad), row_length_of(grad), out.data_ptr<double>()};
    run_grid<RowSumsqShared>(grid, [&](const HostExec& x, RowSumsqShared& sh) { row_sumsq_body(x, a, sh); });
  });
  return out;
}

std::tuple<Tensor, Tensor> quantize_blockwise(const Tensor& x, const Tensor& qmap, bool block_wise, int64_t grid) {
  const int64_t rows = rows_of(x), length = row_length_of(x);
  Tensor codes = at::empty(x.sizes(), x.options().dtype(at::kByte));
  const int64_t per_row = ceil_div(length, kBlockSize);
  Tensor absmax = block_wise ? at::zeros({rows, per_row}, x.options()) : at::zeros({1}, x.options());
  QuantizeArgs a{x.data_ptr<float>(), rows,   length, block_wise, qmap.data_ptr<float>(), codes.data_ptr<uint8_t>(),
                 absmax.data_ptr<float>(), nullptr};
  auto run = [&](const QuantizeArgs& args) {
    run_grid<QuantizeShared>(grid, [&](const HostExec& e, QuantizeShared& sh) { quantize_body(e, args, sh); });
  };
  if (!block_wise) {  // as launch_quantize: the tensor's max first
    QuantizeArgs first = a;
    first.max_out = a.absmax;
    run(first);
  }
  run(a);
  return {codes, absmax};
}

Tensor dequantize_blockwise(const Tensor& codes, const Tensor& absmax, const Tensor& qmap, int64_t grid) {
  const int64_t rows = rows_of(codes), length = row_length_of(codes);
  Tensor out = at::full(codes.sizes(), NAN, codes.options().dtype(at::kFloat));
  const DequantizeArgs a{codes.data_ptr<uint8_t>(), absmax.data_ptr<float>(), rows, length,
                         absmax.numel() == rows * ceil_div(length, kBlockSize), qmap.data_ptr<float>(),
                         out.data_ptr<float>()};
  for (int64_t cta = 0; cta < grid; ++cta) dequantize_body(HostExec{cta, grid}, a);
  return out;
}

}  // namespace

TORCH_LIBRARY(distopt_host, m) {
  m.def(
      "blockwise8bit(Tensor(a!) param, Tensor grad, Tensor(b!)[] codes, Tensor(c!)[] absmax, Tensor[] qmaps, "
      "Tensor? new_absmax, Tensor gnorm_scale, Tensor(d!) count, str rule, float[] coeffs, bool max_pass, "
      "int grid) -> Tensor",
      &blockwise8bit);
  m.def(
      "multi32(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] states, int nstates, Tensor[] gnorm_scales, "
      "Tensor(c!)[] counts, str rule, float[] coeffs) -> int",
      &multi32);
  m.def("row_sumsq(Tensor grad, int grid) -> Tensor", &row_sumsq);
  m.def("quantize_blockwise(Tensor x, Tensor qmap, bool block_wise, int grid) -> (Tensor, Tensor)",
        &quantize_blockwise);
  m.def("dequantize_blockwise(Tensor codes, Tensor absmax, Tensor qmap, int grid) -> Tensor", &dequantize_blockwise);
}

}  // namespace distopt::cuda::host
