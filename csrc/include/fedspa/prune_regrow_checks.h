// Input checks of fedspa::prune_regrow shared by the CPU and CUDA kernels, with the messages of the Python
// checks (fedspa_kernels/_checks.py). Everything here is checked before any output is allocated.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <cstdint>

namespace fedspa {

inline bool prune_regrow_is_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

// Returns whether any layer is float64 (the kernels then use 64-bit keys).
inline bool check_prune_regrow_inputs(const char* op, at::TensorList weights, at::TensorList masks,
                                      at::TensorList scores, at::IntArrayRef drop_counts) {
  const size_t num = weights.size();
  TORCH_CHECK_VALUE(masks.size() == num && scores.size() == num && drop_counts.size() == num, op, ": got ", num,
                    " weights, ", masks.size(), " masks, ", scores.size(), " scores and ", drop_counts.size(),
                    " drop counts; one of each per layer");
  bool wide = false;
  for (size_t l = 0; l < num; ++l) {
    const at::Tensor& w = weights[l];
    const at::Tensor& m = masks[l];
    const at::Tensor& s = scores[l];
    TORCH_CHECK_TYPE(prune_regrow_is_float(w.scalar_type()), op, ": layer ", l, " weights must be floating, got ",
                     w.scalar_type());
    TORCH_CHECK_TYPE(prune_regrow_is_float(s.scalar_type()), op, ": layer ", l, " scores must be floating, got ",
                     s.scalar_type());
    TORCH_CHECK_TYPE(m.scalar_type() == at::kBool, op, ": layer ", l, " mask must be bool, got ", m.scalar_type());
    TORCH_CHECK_VALUE(m.sizes() == w.sizes() && s.sizes() == w.sizes(), op, ": layer ", l, " has weights ",
                      w.sizes(), ", mask ", m.sizes(), " and scores ", s.sizes(), "; they must have one shape");
    TORCH_CHECK_VALUE(w.device() == weights[0].device() && m.device() == weights[0].device() &&
                          s.device() == weights[0].device(),
                      op, ": layer ", l, " has tensors on ", w.device(), ", ", m.device(), " and ", s.device(),
                      "; all must be on ", weights[0].device());
    TORCH_CHECK_VALUE(drop_counts[l] >= 0, op, ": layer ", l, " drop count must be >= 0, got ", drop_counts[l]);
    // k <= active and k <= inactive need the masks counted; k <= numel bounds the allocations before that
    TORCH_CHECK_VALUE(drop_counts[l] <= w.numel(), op, ": layer ", l, " drop count ", drop_counts[l],
                      " exceeds its ", w.numel(), " positions");
    wide |= w.scalar_type() == at::kDouble || s.scalar_type() == at::kDouble;
  }
  return wide;
}

}  // namespace fedspa
