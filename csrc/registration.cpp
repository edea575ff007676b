// Every distopt op schema, written once. Backends add implementations with
// TORCH_LIBRARY_IMPL(distopt, <Key>, m) in csrc/<backend>/ops.*.
//
// Conventions: updates are in place (`_` suffix) on the parameter and its state; a
// 0-d int64 `nonfinite_count` accumulates the elements whose update was skipped
// because their gradient (or its block's) was not finite; `gnorm_scale` is a 0-d fp32
// tensor multiplying the gradient (percentile clipping). Scalars are the update's
// coefficients computed by distopt.functional in double and used in fp32.
#include <torch/library.h>

TORCH_LIBRARY(distopt, m) {
  m.def(
      "adamw32_(Tensor(a!) param, Tensor grad, Tensor(b!) exp_avg, Tensor(c!) exp_avg_sq, "
      "Tensor(d!)? max_exp_avg_sq, Tensor gnorm_scale, Tensor(e!) nonfinite_count, "
      "float decay, float lerp_weight, float beta2, float sq_weight, float eps, "
      "float step_size, float bias_correction2_sqrt) -> ()");
  m.def(
      "adamw8bit_(Tensor(a!) param, Tensor grad, Tensor(b!) exp_avg, Tensor(c!) exp_avg_absmax, "
      "Tensor(d!) exp_avg_sq, Tensor(e!) exp_avg_sq_absmax, Tensor(f!)? max_exp_avg_sq, "
      "Tensor(g!)? max_exp_avg_sq_absmax, Tensor signed_qmap, Tensor unsigned_qmap, "
      "Tensor? new_absmax, Tensor gnorm_scale, Tensor(h!) nonfinite_count, "
      "float decay, float lerp_weight, float beta2, float sq_weight, float eps, "
      "float step_size, float bias_correction2_sqrt) -> ()");
  m.def(
      "adamw8bit_new_absmax(Tensor param, Tensor grad, Tensor exp_avg, Tensor exp_avg_absmax, "
      "Tensor exp_avg_sq, Tensor exp_avg_sq_absmax, Tensor? max_exp_avg_sq, "
      "Tensor? max_exp_avg_sq_absmax, Tensor signed_qmap, Tensor unsigned_qmap, "
      "Tensor gnorm_scale, float decay, float lerp_weight, float beta2, float sq_weight, "
      "float eps, float step_size, float bias_correction2_sqrt) -> Tensor");
  m.def(
      "sgd32_(Tensor(a!) param, Tensor grad, Tensor(b!)? momentum_buffer, Tensor gnorm_scale, "
      "Tensor(c!) nonfinite_count, float lr, float weight_decay, float momentum, "
      "float dampening_weight, bool nesterov, bool first_step) -> ()");
  m.def(
      "sgd8bit_(Tensor(a!) param, Tensor grad, Tensor(b!) momentum_buffer, "
      "Tensor(c!) momentum_buffer_absmax, Tensor signed_qmap, Tensor? new_absmax, "
      "Tensor gnorm_scale, Tensor(d!) nonfinite_count, float lr, float weight_decay, "
      "float momentum, float dampening_weight, bool nesterov, bool first_step) -> ()");
  m.def(
      "sgd8bit_new_absmax(Tensor param, Tensor grad, Tensor momentum_buffer, "
      "Tensor momentum_buffer_absmax, Tensor signed_qmap, Tensor gnorm_scale, float lr, "
      "float weight_decay, float momentum, float dampening_weight, bool nesterov, "
      "bool first_step) -> Tensor");
  // 32-bit updates of many parameters in one call (CPU: their elements shared among the
  // threads; CUDA: in few launches): per-parameter lists (an empty list: no such state)
  // and `coeffs`, the scalars above per parameter, flattened (7 for AdamW; 6 for SGD,
  // nesterov and first_step as 0/1).
  m.def(
      "adamw32_multi_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
      "Tensor(d!)[] max_exp_avg_sqs, Tensor[] gnorm_scales, Tensor(e!)[] nonfinite_counts, float[] coeffs) -> ()");
  m.def(
      "sgd32_multi_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] momentum_buffers, Tensor[] gnorm_scales, "
      "Tensor(c!)[] nonfinite_counts, float[] coeffs) -> ()");
  // 8-bit updates of many parameters with block-wise state (a 2-D absmax) in one call
  // (CPU): per-parameter lists as above, one pair of maps for all.
  m.def(
      "adamw8bit_multi_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_absmaxes, "
      "Tensor(d!)[] exp_avg_sqs, Tensor(e!)[] exp_avg_sq_absmaxes, Tensor(f!)[] max_exp_avg_sqs, "
      "Tensor(g!)[] max_exp_avg_sq_absmaxes, Tensor signed_qmap, Tensor unsigned_qmap, Tensor[] gnorm_scales, "
      "Tensor(h!)[] nonfinite_counts, float[] coeffs) -> ()");
  m.def(
      "sgd8bit_multi_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] momentum_buffers, "
      "Tensor(c!)[] momentum_buffer_absmaxes, Tensor signed_qmap, Tensor[] gnorm_scales, "
      "Tensor(d!)[] nonfinite_counts, float[] coeffs) -> ()");
  // Adds one to each of many one-element CPU counters (a step's `step` tensors, in one call).
  m.def("add_one_(Tensor(a!)[] counters) -> ()");
  m.def("row_sumsq(Tensor grad) -> Tensor");
  m.def("quantize_blockwise(Tensor x, Tensor qmap, bool block_wise) -> (Tensor, Tensor)");
  m.def("dequantize_blockwise(Tensor codes, Tensor absmax, Tensor qmap) -> Tensor");
  // CUDA unified memory for paged state: a tensor on cuda:<device> owning managed memory,
  // and an asynchronous prefetch of its bytes to a GPU (device >= 0) or the host (-1).
  m.def("managed_empty(int[] size, ScalarType dtype, int device) -> Tensor");
  m.def("managed_prefetch_(Tensor(a!) t, int device) -> ()");
}
