// The per-element update rules, written once for every backend.
//
// Templated on the value type T (float in the scalar CPU path and in CUDA; a SIMD
// vector type works too as long as it has +, -, *, / and sqrt). The formulas and their
// order are those of distopt.functional's reference (torch.optim's single-tensor
// order); no fused multiply-add is written here, and backends build without
// contraction, so each element takes the same IEEE operations wherever it sits.
#pragma once

#include <cmath>

#include "macros.h"

namespace distopt {

// AdamW coefficients for one step, computed in double by the caller, used in fp32.
struct AdamWCoeffs {
  float decay;                  // 1 - lr * weight_decay
  float lerp_weight;            // 1 - beta1
  float beta2;
  float sq_weight;              // 1 - beta2
  float eps;
  float step_size;              // lr / (1 - beta1^t)
  float bias_correction2_sqrt;  // sqrt(1 - beta2^t)
};

struct SGDCoeffs {
  float lr;
  float weight_decay;
  float momentum;
  float dampening_weight;  // 1 - dampening
  bool nesterov;
  bool first_step;  // the momentum buffer starts as the (decayed) gradient
};

template <typename T>
DISTOPT_HD T maximum(T a, T b) {
  return a > b ? a : b;
}

// One AdamW element: p, m, v (and vmax when amsgrad) are updated in place.
template <typename T>
DISTOPT_HD void adamw_element(T& p, T g, T& m, T& v, T* vmax, const AdamWCoeffs& c) {
  using std::sqrt;
  p = p * c.decay;
  m = m + c.lerp_weight * (g - m);
  v = v * c.beta2 + (c.sq_weight * g) * g;
  T second = v;
  if (vmax != nullptr) {
    *vmax = maximum(*vmax, v);
    second = *vmax;
  }
  T denom = sqrt(second) / c.bias_correction2_sqrt + c.eps;
  p = p - c.step_size * (m / denom);
}

// One SGD element (torch.optim.SGD semantics); `buf` is null without momentum.
template <typename T>
DISTOPT_HD void sgd_element(T& p, T g, T* buf, const SGDCoeffs& c) {
  if (c.weight_decay != 0.0f) g = g + c.weight_decay * p;
  T direction = g;
  if (buf != nullptr) {
    T b = c.first_step ? g : *buf * c.momentum + c.dampening_weight * g;
    *buf = b;
    direction = c.nesterov ? g + c.momentum * b : b;
  }
  p = p - c.lr * direction;
}

}  // namespace distopt
