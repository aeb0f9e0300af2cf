// Argument checks for fedspa::scatter_add_aggregate / fedspa::scatter_add_average, shared by the CPU and
// CUDA kernels. Value-dependent checks (index range, finiteness) live in the kernels, which never write
// outside [0, n) and report the first offending client and position.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <limits>
#include <string>

namespace fedspa {

struct AggregateInputs {
  std::vector<at::Tensor> indices;  // contiguous, 1-D
  std::vector<at::Tensor> values;   // contiguous, 1-D
  at::ScalarType index_dtype = at::kLong;
  at::ScalarType value_dtype = at::kFloat;
};

inline bool is_float_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

// Checks everything that can be checked without reading the data, and returns contiguous 1-D views.
inline AggregateInputs check_aggregate_inputs(const char* op, at::TensorList indices, at::TensorList values,
                                              const at::Tensor& weights, int64_t n) {
  TORCH_CHECK_VALUE(n >= 0, op, ": n must be >= 0, got ", n);
  TORCH_CHECK_VALUE(indices.size() == values.size(), op, ": got ", indices.size(), " index tensors but ",
                    values.size(), " value tensors (one of each per client)");
  const int64_t num_clients = static_cast<int64_t>(indices.size());
  TORCH_CHECK_TYPE(weights.scalar_type() == at::kFloat || weights.scalar_type() == at::kDouble, op,
                   ": weights must be float32 or float64 (the accumulation dtype), got ", weights.scalar_type());
  TORCH_CHECK_VALUE(weights.dim() == 1 && weights.numel() == num_clients, op,
                    ": weights must be a 1-D tensor with one entry per client (", num_clients, "), got shape ",
                    weights.sizes());
  AggregateInputs out;
  out.indices.reserve(num_clients);
  out.values.reserve(num_clients);
  for (int64_t c = 0; c < num_clients; ++c) {
    const at::Tensor& idx = indices[c];
    const at::Tensor& val = values[c];
    TORCH_CHECK_VALUE(idx.device() == weights.device() && val.device() == weights.device(), op, ": client ", c,
                      " has indices on ", idx.device(), " and values on ", val.device(), ", but weights are on ",
                      weights.device(), "; all tensors must be on one device");
    TORCH_CHECK_TYPE(idx.scalar_type() == at::kInt || idx.scalar_type() == at::kLong, op, ": client ", c,
                     " indices must be int32 or int64, got ", idx.scalar_type());
    TORCH_CHECK_TYPE(is_float_dtype(val.scalar_type()), op, ": client ", c,
                     " values must be float16, bfloat16, float32 or float64, got ", val.scalar_type());
    if (c == 0) {
      out.index_dtype = idx.scalar_type();
      out.value_dtype = val.scalar_type();
    }
    TORCH_CHECK_TYPE(idx.scalar_type() == out.index_dtype, op, ": client ", c, " indices are ", idx.scalar_type(),
                     " but client 0's are ", out.index_dtype, "; use one index dtype for all clients");
    TORCH_CHECK_TYPE(val.scalar_type() == out.value_dtype, op, ": client ", c, " values are ", val.scalar_type(),
                     " but client 0's are ", out.value_dtype, "; use one value dtype for all clients");
    TORCH_CHECK_VALUE(idx.dim() == 1 && val.dim() == 1, op, ": client ", c,
                      " indices and values must be 1-D, got shapes ", idx.sizes(), " and ", val.sizes());
    TORCH_CHECK_VALUE(idx.numel() == val.numel(), op, ": client ", c, " has ", idx.numel(), " indices but ",
                      val.numel(), " values");
    out.indices.push_back(idx.contiguous());
    out.values.push_back(val.contiguous());
  }
  return out;
}

// Weights are read on the host (there is one per client): finite and non-negative.
inline void check_weights_host(const char* op, const at::Tensor& weights_cpu) {
  AT_DISPATCH_FLOATING_TYPES(weights_cpu.scalar_type(), "check_weights", [&] {
    const scalar_t* w = weights_cpu.data_ptr<scalar_t>();
    for (int64_t c = 0; c < weights_cpu.numel(); ++c) {
      TORCH_CHECK_VALUE(std::isfinite(static_cast<double>(w[c])) && w[c] >= 0, op, ": client ", c,
                        " has weight ", w[c], "; weights must be finite and >= 0");
    }
  });
}

inline void check_previous(const char* op, const at::Tensor& previous, const at::Tensor& weights) {
  TORCH_CHECK_TYPE(is_float_dtype(previous.scalar_type()), op,
                   ": previous must be a floating tensor, got ", previous.scalar_type());
  TORCH_CHECK_VALUE(previous.device() == weights.device(), op, ": previous is on ", previous.device(),
                    " but weights are on ", weights.device());
}

[[noreturn]] inline void throw_bad_index(const char* op, int64_t client, int64_t position, int64_t index,
                                         int64_t n) {
  TORCH_CHECK_VALUE(false, op, ": client ", client, " has index ", index, " at position ", position,
                    ", outside [0, ", n, ")");
  abort();  // unreachable
}

[[noreturn]] inline void throw_non_finite(const char* op, int64_t client, int64_t position, double value) {
  TORCH_CHECK_VALUE(false, op, ": client ", client, " has a non-finite value (", value, ") at position ",
                    position);
  abort();  // unreachable
}

}  // namespace fedspa
