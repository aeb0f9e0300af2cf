// Checks of CSR operands shared by the spmm/sddmm kernels (CPU and CUDA), with the messages of the Python
// references (fedspa_kernels/ops/_csr.py). Value checks use ATen ops, so they run on the operands' device.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>

namespace fedspa {

inline void check_structure_metadata(const char* op, const at::Tensor& crow, const at::Tensor& col,
                                     const c10::optional<at::Tensor>& perm, const at::Device& device) {
  TORCH_CHECK_TYPE(crow.scalar_type() == at::kLong && crow.dim() == 1 && crow.numel() >= 1, op,
                   ": crow_indices must be a non-empty 1-D int64 tensor, got ", crow.scalar_type(), " of shape ",
                   crow.sizes());
  TORCH_CHECK_TYPE(col.scalar_type() == at::kInt && col.dim() == 1, op,
                   ": col_indices must be a 1-D int32 tensor, got ", col.scalar_type(), " of shape ", col.sizes());
  if (perm.has_value()) {
    TORCH_CHECK_TYPE(perm->scalar_type() == at::kInt && perm->dim() == 1 && perm->numel() == col.numel(), op,
                     ": perm must be a 1-D int32 tensor with one entry per nonzero (", col.numel(), "), got ",
                     perm->scalar_type(), " of shape ", perm->sizes());
    TORCH_CHECK_VALUE(perm->device() == device, op, ": perm is on ", perm->device(), " but the operands are on ",
                      device);
  }
  TORCH_CHECK_VALUE(crow.device() == device, op, ": crow_indices is on ", crow.device(), " but the operands are on ",
                    device);
  TORCH_CHECK_VALUE(col.device() == device, op, ": col_indices is on ", col.device(), " but the operands are on ",
                    device);
}

// Reads the structure: pointers start at 0, never decrease and end at nnz; columns in [0, num_cols); perm a
// permutation of [0, num_values). Raises ValueError naming the first offender.
inline void check_structure_values(const char* op, const at::Tensor& crow, const at::Tensor& col,
                                   const c10::optional<at::Tensor>& perm, int64_t num_cols, int64_t num_values) {
  const int64_t nnz = col.numel();
  const int64_t first = crow[0].item<int64_t>();
  const int64_t last = crow[-1].item<int64_t>();
  TORCH_CHECK_VALUE(first == 0 && last == nnz, op, ": crow_indices must start at 0 and end at nnz=", nnz, ", got ",
                    first, " and ", last);
  if (crow.numel() > 1) {
    const at::Tensor drops = (crow.slice(0, 1) < crow.slice(0, 0, -1)).nonzero();
    if (drops.numel() > 0) {
      const int64_t r = drops[0][0].item<int64_t>();
      TORCH_CHECK_VALUE(false, op, ": crow_indices decreases at row ", r, ": ", crow[r].item<int64_t>(), " -> ",
                        crow[r + 1].item<int64_t>());
    }
  }
  if (nnz > 0) {
    const at::Tensor bad = (col < 0).logical_or(col >= num_cols).nonzero();
    if (bad.numel() > 0) {
      const int64_t k = bad[0][0].item<int64_t>();
      TORCH_CHECK_VALUE(false, op, ": col_indices[", k, "] = ", col[k].item<int64_t>(), " is outside [0, ", num_cols,
                        ")");
    }
  }
  if (!perm.has_value()) {
    TORCH_CHECK_VALUE(num_values == nnz, op, ": ", num_values, " values for ", nnz, " nonzeros");
    return;
  }
  TORCH_CHECK_VALUE(num_values == nnz, op, ": perm needs as many values as nonzeros, got ", num_values,
                    " values for ", nnz, " nonzeros");
  if (nnz == 0) return;
  const at::Tensor bad = (*perm < 0).logical_or(*perm >= num_values).nonzero();
  if (bad.numel() > 0) {
    const int64_t k = bad[0][0].item<int64_t>();
    TORCH_CHECK_VALUE(false, op, ": perm[", k, "] = ", (*perm)[k].item<int64_t>(), " is outside [0, ", num_values,
                      ")");
  }
  TORCH_CHECK_VALUE(at::bincount(perm->to(at::kLong), {}, num_values).max().item<int64_t>() == 1, op,
                    ": perm is not a permutation of [0, ", num_values, ")");
}

}  // namespace fedspa
