// Column panels of a CSR pattern, for the CPU kernels that keep one panel of a dense operand (or of their output)
// in L2: the nonzeros of row r whose columns fall in panel p = [p * panel, (p + 1) * panel).
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace fedspa {

// The nonzeros of row r in the current panel are [begin[r * stride], end[r * stride]).
struct RowRanges {
  const int64_t* begin;
  const int64_t* end;
  int64_t stride;
};

// bounds[r * (panels + 1) + p]: the first nonzero of row r with column >= p * panel (the last entry: the row's end),
// by binary search within each row, in parallel over rows. crow must be checked (its ranges lie within col); the
// columns need not be: a search reads only within a row's range.
template <typename I>
inline std::vector<int64_t> panel_bounds(const int64_t* crow, const I* col, int64_t rows, int64_t panel,
                                         int64_t panels) {
  std::vector<int64_t> bounds(rows * (panels + 1));
  at::parallel_for(0, rows, 256, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      int64_t k = crow[r];
      const int64_t e = crow[r + 1];
      for (int64_t p = 0; p < panels; ++p) {
        k = std::lower_bound(col + k, col + e, p * panel) - col;
        bounds[r * (panels + 1) + p] = k;
      }
      bounds[r * (panels + 1) + panels] = e;
    }
  });
  return bounds;
}

// The ranges of panel p (the whole rows when there is one panel).
inline RowRanges panel_ranges(const int64_t* crow, const std::vector<int64_t>& bounds, int64_t panels, int64_t p) {
  return panels == 1 ? RowRanges{crow, crow + 1, 1} : RowRanges{bounds.data() + p, bounds.data() + p + 1, panels + 1};
}

}  // namespace fedspa
