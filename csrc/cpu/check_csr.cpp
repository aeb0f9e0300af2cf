// fedspa::check_csr: the pattern check every native kernel entry runs (csr_checks.h), as an op of its own, so that
// it can be called (and timed) alone. CPU: one parallel pass; CUDA: the exact check with ATen ops (no device code,
// so one registration file serves both).
#include <ATen/ATen.h>
#include <torch/library.h>

#include "fedspa/csr_checks.h"

namespace fedspa {
namespace {

void check_csr_op(const at::Tensor& crow, const at::Tensor& col, int64_t num_cols) {
  check_csr_metadata("check_csr", crow, col, crow.device());
  check_csr("check_csr", crow.contiguous(), col.contiguous(), num_cols);
}

}  // namespace

TORCH_LIBRARY_IMPL(fedspa, CPU, m) { m.impl("check_csr", &check_csr_op); }
TORCH_LIBRARY_IMPL(fedspa, CUDA, m) { m.impl("check_csr", &check_csr_op); }

}  // namespace fedspa
