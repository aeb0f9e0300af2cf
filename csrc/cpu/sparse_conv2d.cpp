// CPU kernels of the direct sparse convolution (fedspa::sparse_conv2d, sparse_conv2d_input_grad,
// sparse_conv2d_weight_grad).
//
// Activations are feature-major, (C, H, W, N): the batch is the fastest dimension, so each nonzero weight
// (c, ky, kx) meets, at each output position, a contiguous vector of N inputs. The forward keeps an output
// position's batch vector (up to 64 floats) in AVX2 registers while the output channel's nonzeros stream by: one
// fused multiply-add per 8 batch elements, no unfolded input. The input gradient does the same per input position
// through the transposed order (values gathered into it once); the weight gradient is, per nonzero, a dot product
// of batch vectors summed over the positions where the kernel tap lands inside the input (up to 8 nonzeros of an
// output channel together, so each grad_output vector is loaded once for all of them). Parallel over output
// channels (input channels for the input gradient) and batch blocks: no two threads write the same element.
// An fp32 batch wider than 64 runs as contiguous chunks of 64 (kBatchChunk).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "fedspa/avx2_sum.h"
#include "fedspa/conv_geometry.h"
#include "fedspa/cpu_features.h"
#include "fedspa/cpu_layout.h"
#include "fedspa/csr_checks.h"
#include "fedspa/csr_transpose.h"

namespace fedspa {
namespace {

using Geometry = ConvGeometry;

// A (C, H, W, N) activation as a contiguous tensor; a permuted NCHW tensor is transposed in parallel.
at::Tensor feature_major(const at::Tensor& t) {
  return row_major(t.reshape({t.size(0) * t.size(1) * t.size(2), t.size(3)})).view(t.sizes());
}

// One nonzero of a row, decoded: its value and where its tap lands relative to an output position.
template <typename T>
struct Tap {
  T w;
  int64_t c, ky, kx;
  int64_t base;  // input position offset (in positions) of the tap at output (0, 0), before padding
};

// Batch elements [n0, n0 + width) of one position, from V AVX2 vectors or a portable array.
#if defined(FEDSPA_X86_DISPATCH)
template <int V>
struct Acc8 {
  __m256 a[V];
  __attribute__((target("avx2,fma"), always_inline)) inline void zero() {
    for (int u = 0; u < V; ++u) a[u] = _mm256_setzero_ps();
  }
  __attribute__((target("avx2,fma"), always_inline)) inline void fma(float w, const float* src) {
    const __m256 v = _mm256_set1_ps(w);
    for (int u = 0; u < V; ++u) a[u] = _mm256_fmadd_ps(v, _mm256_loadu_ps(src + 8 * u), a[u]);
  }
  __attribute__((target("avx2,fma"), always_inline)) inline void store(float* dst) const {
    for (int u = 0; u < V; ++u) _mm256_storeu_ps(dst + 8 * u, a[u]);
  }
};
#endif

// ------------------------------------------------------------------------------------------------------------------
// Forward
// ------------------------------------------------------------------------------------------------------------------
template <typename T, typename I>
void decode_row(const T* values, const int64_t* crow, const I* col, int64_t o, const Geometry& g,
                std::vector<Tap<T>>& taps) {
  taps.clear();
  for (int64_t k = crow[o]; k < crow[o + 1]; ++k) {
    const int64_t j = col[k];
    const int64_t c = j / (g.kh * g.kw);
    const int64_t r = j % (g.kh * g.kw);
    const int64_t ky = r / g.kw;
    const int64_t kx = r % g.kw;
    taps.push_back({values[k], c, ky, kx, (c * g.H + ky * g.dh) * g.W + kx * g.dw});
  }
}

// Output positions of rows [oy0, oy1) for batch elements [n0, n1) of output channel o (portable path).
template <typename T>
void forward_generic(const std::vector<Tap<T>>& taps, const T* in, T* out, const Geometry& g, int64_t o, int64_t n0,
                     int64_t n1) {
  constexpr int64_t kWidth = 16;
  for (int64_t oy = 0; oy < g.OH; ++oy) {
    for (int64_t ox = 0; ox < g.OW; ++ox) {
      const int64_t y0 = oy * g.sh - g.ph;
      const int64_t x0 = ox * g.sw - g.pw;
      T* dst = out + ((o * g.OH + oy) * g.OW + ox) * g.out_ld;
      for (int64_t n = n0; n < n1; n += kWidth) {
        const int64_t width = std::min(kWidth, n1 - n);
        T acc[kWidth] = {};
        for (const Tap<T>& t : taps) {
          const int64_t iy = y0 + t.ky * g.dh;
          const int64_t ix = x0 + t.kx * g.dw;
          if (static_cast<uint64_t>(iy) >= static_cast<uint64_t>(g.H) ||
              static_cast<uint64_t>(ix) >= static_cast<uint64_t>(g.W)) {
            continue;
          }
          const T* src = in + (t.base + y0 * g.W + x0) * g.N + n;
          for (int64_t u = 0; u < width; ++u) acc[u] += t.w * src[u];
        }
        for (int64_t u = 0; u < width; ++u) dst[n + u] = acc[u];
      }
    }
  }
}

#if defined(FEDSPA_X86_DISPATCH)
template <int V, bool kCheck>
__attribute__((target("avx2,fma"))) inline void forward_position_avx2(const std::vector<Tap<float>>& taps,
                                                                      const float* in, float* dst, const Geometry& g,
                                                                      int64_t y0, int64_t x0, int64_t n) {
  Acc8<V> acc;
  acc.zero();
  const int64_t shift = (y0 * g.W + x0) * g.N + n;
  for (const Tap<float>& t : taps) {
    if (kCheck) {
      const int64_t iy = y0 + t.ky * g.dh;
      const int64_t ix = x0 + t.kx * g.dw;
      if (static_cast<uint64_t>(iy) >= static_cast<uint64_t>(g.H) ||
          static_cast<uint64_t>(ix) >= static_cast<uint64_t>(g.W)) {
        continue;
      }
    }
    acc.fma(t.w, in + t.base * g.N + shift);
  }
  acc.store(dst + n);
}

template <bool kCheck>
__attribute__((target("avx2,fma"))) void forward_position_all_avx2(const std::vector<Tap<float>>& taps,
                                                                   const float* in, float* dst, const Geometry& g,
                                                                   int64_t y0, int64_t x0, int64_t n0, int64_t n1) {
  int64_t n = n0;
  for (; n + 64 <= n1; n += 64) forward_position_avx2<8, kCheck>(taps, in, dst, g, y0, x0, n);
  if (n + 32 <= n1) {
    forward_position_avx2<4, kCheck>(taps, in, dst, g, y0, x0, n);
    n += 32;
  }
  if (n + 16 <= n1) {
    forward_position_avx2<2, kCheck>(taps, in, dst, g, y0, x0, n);
    n += 16;
  }
  if (n + 8 <= n1) {
    forward_position_avx2<1, kCheck>(taps, in, dst, g, y0, x0, n);
    n += 8;
  }
  for (; n < n1; ++n) {
    float acc = 0.f;
    for (const Tap<float>& t : taps) {
      const int64_t iy = y0 + t.ky * g.dh;
      const int64_t ix = x0 + t.kx * g.dw;
      if (static_cast<uint64_t>(iy) < static_cast<uint64_t>(g.H) &&
          static_cast<uint64_t>(ix) < static_cast<uint64_t>(g.W)) {
        acc += t.w * in[(t.base + y0 * g.W + x0) * g.N + n];
      }
    }
    dst[n] = acc;
  }
}

// Two neighbouring output positions (x0 and x0 + sw, both with every tap inside the input) at once, for batch blocks
// narrower than 64: one accumulator of V vectors per position is V chains of dependent fused multiply-adds, too few
// (V < 8) to hide the multiply-add's latency; two positions double them and share each tap's decode and broadcast.
// Batch 32, 1 thread, three alternating runs: 1.04-1.22x at d = 0.5 on ResNet-18's stages 1 and 3 (the input
// gradient's pairs 1.04-1.16x), nothing measurable at d <= 0.1 (benchmarks/results/conv_kernels_2026-12-07d.md).
template <int V>
__attribute__((target("avx2,fma"))) inline void forward_pair_avx2(const std::vector<Tap<float>>& taps,
                                                                  const float* in, float* dst, const Geometry& g,
                                                                  int64_t y0, int64_t x0, int64_t n) {
  Acc8<V> first, second;
  first.zero();
  second.zero();
  const int64_t shift = (y0 * g.W + x0) * g.N + n;
  const int64_t step = g.sw * g.N;
  for (const Tap<float>& t : taps) {
    const float* src = in + t.base * g.N + shift;
    first.fma(t.w, src);
    second.fma(t.w, src + step);
  }
  first.store(dst + n);
  second.store(dst + g.out_ld + n);
}

__attribute__((target("avx2,fma"))) void forward_pair_all_avx2(const std::vector<Tap<float>>& taps, const float* in,
                                                               float* dst, const Geometry& g, int64_t y0, int64_t x0,
                                                               int64_t n0, int64_t n1) {
  int64_t n = n0;
  for (; n + 64 <= n1; n += 64) {
    forward_position_avx2<8, false>(taps, in, dst, g, y0, x0, n);
    forward_position_avx2<8, false>(taps, in, dst + g.out_ld, g, y0, x0 + g.sw, n);
  }
  if (n + 32 <= n1) {
    forward_pair_avx2<4>(taps, in, dst, g, y0, x0, n);
    n += 32;
  }
  if (n + 16 <= n1) {
    forward_pair_avx2<2>(taps, in, dst, g, y0, x0, n);
    n += 16;
  }
  if (n + 8 <= n1) {
    forward_pair_avx2<1>(taps, in, dst, g, y0, x0, n);
    n += 8;
  }
  if (n < n1) {
    forward_position_all_avx2<false>(taps, in, dst, g, y0, x0, n, n1);
    forward_position_all_avx2<false>(taps, in, dst + g.out_ld, g, y0, x0 + g.sw, n, n1);
  }
}

void forward_avx2(const std::vector<Tap<float>>& taps, const float* in, float* out, const Geometry& g, int64_t o,
                  int64_t n0, int64_t n1, int64_t oy_begin, int64_t oy_end) {
  // Output rows/columns whose every tap lands inside the input need no bounds checks.
  const auto inside = [](int64_t pad, int64_t size, int64_t k, int64_t d, int64_t s, int64_t out_size,
                         int64_t& lo, int64_t& hi) {
    lo = (pad + s - 1) / s;                                  // o * s - pad >= 0
    const int64_t last = size - 1 - (k - 1) * d + pad;       // o * s - pad + (k - 1) d <= size - 1
    hi = last < 0 ? -1 : std::min(out_size - 1, last / s);
  };
  int64_t ylo, yhi, xlo, xhi;
  inside(g.ph, g.H, g.kh, g.dh, g.sh, g.OH, ylo, yhi);
  inside(g.pw, g.W, g.kw, g.dw, g.sw, g.OW, xlo, xhi);
  for (int64_t oy = oy_begin; oy < oy_end; ++oy) {
    const bool row_inside = oy >= ylo && oy <= yhi;
    for (int64_t ox = 0; ox < g.OW; ++ox) {
      float* dst = out + ((o * g.OH + oy) * g.OW + ox) * g.out_ld;
      const int64_t y0 = oy * g.sh - g.ph;
      const int64_t x0 = ox * g.sw - g.pw;
      if (row_inside && ox >= xlo && ox + 1 <= xhi && n1 - n0 < 64) {
        forward_pair_all_avx2(taps, in, dst, g, y0, x0, n0, n1);
        ++ox;
      } else if (row_inside && ox >= xlo && ox <= xhi) {
        forward_position_all_avx2<false>(taps, in, dst, g, y0, x0, n0, n1);
      } else {
        forward_position_all_avx2<true>(taps, in, dst, g, y0, x0, n0, n1);
      }
    }
  }
}
#endif

// Batch blocks of 64 (the widest register accumulator) so that small layers still split across threads.
constexpr int64_t kBatchBlock = 64;
// What a task's reads should fit in (a core's L2, with room for the output it writes).
constexpr int64_t kTileBytes = 512 * 1024;
// Tiles pay only when the operand read (per batch block) is far beyond the caches; below this, the channel-outermost
// order is as fast or faster (measured on ResNet-18's and the default CNN's layers: tiling helps 1.1-3.4x on 8 MB
// operands and costs up to 1.3x on 2 MB ones).
constexpr int64_t kTileAbove = 4 * 1024 * 1024;

bool worth_tiling(int64_t planes, int64_t rows, int64_t cols, int64_t width, int64_t elem_bytes) {
  return planes * rows * cols * width * elem_bytes > kTileAbove;
}

// Rows per spatial tile: a tile of `rows` output rows reads (rows - 1) * stride + span input rows of every one of
// `planes` channels; as many rows as keep that under kTileBytes, at least one, and enough tiles for the threads.
int64_t tile_rows(int64_t planes, int64_t row_elems, int64_t width, int64_t stride, int64_t span, int64_t out_rows,
                  int64_t batch_blocks, int64_t elem_bytes) {
  const int64_t per_row = std::max<int64_t>(1, planes * row_elems * width * elem_bytes);
  int64_t rows = (kTileBytes / per_row - span) / stride + 1;
  rows = std::clamp<int64_t>(rows, 1, out_rows);
  const int64_t want = 4 * at::get_num_threads();
  while (rows > 1 && ((out_rows + rows - 1) / rows) * batch_blocks < want) rows = (rows + 1) / 2;
  return rows;
}

#if defined(FEDSPA_X86_DISPATCH)
// Output-row tiles outermost, every output channel inside: the input rows a tile reads stay in L2 while all output
// channels' nonzeros stream over them (channel-outermost order re-reads the whole input from memory per channel).
template <typename I>
void forward_tiled_avx2(const float* values, const int64_t* crow, const I* col, const float* in, float* out,
                        const Geometry& g) {
  std::vector<std::vector<Tap<float>>> taps(g.O);
  at::parallel_for(0, g.O, 16, [&](int64_t o0, int64_t o1) {
    for (int64_t o = o0; o < o1; ++o) decode_row(values, crow, col, o, g, taps[o]);
  });
  const int64_t blocks = (g.N + kBatchBlock - 1) / kBatchBlock;
  const int64_t width = std::min(g.N, kBatchBlock);
  const int64_t rows = tile_rows(g.C, g.W, width, g.sh, (g.kh - 1) * g.dh + 1, g.OH, blocks, sizeof(float));
  const int64_t tiles = (g.OH + rows - 1) / rows;
  // tasks in (tile, batch block, output channel) order: a thread's contiguous share walks a tile's channels
  at::parallel_for(0, tiles * blocks * g.O, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t task = t0; task < t1; ++task) {
      const int64_t o = task % g.O;
      const int64_t oy0 = (task / (g.O * blocks)) * rows;
      const int64_t n0 = ((task / g.O) % blocks) * kBatchBlock;
      const int64_t n1 = std::min(g.N, n0 + kBatchBlock);
      forward_avx2(taps[o], in, out, g, o, n0, n1, oy0, std::min(g.OH, oy0 + rows));
    }
  });
}
#endif

template <typename T, typename I>
void forward_impl(const T* values, const int64_t* crow, const I* col, const T* in, T* out, const Geometry& g) {
#if defined(FEDSPA_X86_DISPATCH)
  if constexpr (std::is_same_v<T, float>) {
    if (cpu_has_avx2_fma() && worth_tiling(g.C, g.H, g.W, std::min(g.N, kBatchBlock), sizeof(float))) {
      forward_tiled_avx2(values, crow, col, in, out, g);
      return;
    }
  }
#endif
  const int64_t blocks = (g.N + kBatchBlock - 1) / kBatchBlock;
  at::parallel_for(0, g.O * blocks, 1, [&](int64_t t0, int64_t t1) {
    std::vector<Tap<T>> taps;
    int64_t decoded = -1;
    for (int64_t task = t0; task < t1; ++task) {
      const int64_t o = task / blocks;
      const int64_t n0 = (task % blocks) * kBatchBlock;
      const int64_t n1 = std::min(g.N, n0 + kBatchBlock);
      if (o != decoded) {
        decode_row(values, crow, col, o, g, taps);
        decoded = o;
      }
#if defined(FEDSPA_X86_DISPATCH)
      if constexpr (std::is_same_v<T, float>) {
        if (cpu_has_avx2_fma()) {
          forward_avx2(taps, in, out, g, o, n0, n1, 0, g.OH);
          continue;
        }
      }
#endif
      forward_generic(taps, in, out, g, o, n0, n1);
    }
  });
}

// ------------------------------------------------------------------------------------------------------------------
// Input gradient (gather through the transposed order: rows j = (c * kh + ky) * kw + kx, entries (o, w))
// ------------------------------------------------------------------------------------------------------------------
template <typename T>
void input_grad_impl(const T* values_t, const int64_t* tcrow, const int32_t* tcol, const T* gout, T* gin,
                     const Geometry& g) {
  const int64_t blocks = (g.N + kBatchBlock - 1) / kBatchBlock;
  at::parallel_for(0, g.C * blocks, 1, [&](int64_t t0, int64_t t1) {
    T acc[kBatchBlock];
    for (int64_t task = t0; task < t1; ++task) {
      const int64_t c = task / blocks;
      const int64_t n0 = (task % blocks) * kBatchBlock;
      const int64_t width = std::min(g.N - n0, kBatchBlock);
      for (int64_t iy = 0; iy < g.H; ++iy) {
        for (int64_t ix = 0; ix < g.W; ++ix) {
          std::fill(acc, acc + width, T(0));
          for (int64_t ky = 0; ky < g.kh; ++ky) {
            const int64_t ty = iy + g.ph - ky * g.dh;
            if (ty < 0 || ty % g.sh != 0 || ty / g.sh >= g.OH) continue;
            const int64_t oy = ty / g.sh;
            for (int64_t kx = 0; kx < g.kw; ++kx) {
              const int64_t tx = ix + g.pw - kx * g.dw;
              if (tx < 0 || tx % g.sw != 0 || tx / g.sw >= g.OW) continue;
              const int64_t ox = tx / g.sw;
              const int64_t j = (c * g.kh + ky) * g.kw + kx;
              for (int64_t t = tcrow[j]; t < tcrow[j + 1]; ++t) {
                const T w = values_t[t];
                const T* src = gout + ((static_cast<int64_t>(tcol[t]) * g.OH + oy) * g.OW + ox) * g.N + n0;
                for (int64_t u = 0; u < width; ++u) acc[u] += w * src[u];
              }
            }
          }
          std::copy(acc, acc + width, gin + ((c * g.H + iy) * g.W + ix) * g.out_ld + n0);
        }
      }
    }
  });
}

#if defined(FEDSPA_X86_DISPATCH)
// One input channel's nonzeros as flat lists, each entry with the grad_output offset it reads. Input row iy reads the
// taps ky with ky * dh = (iy + ph) (mod sh), at output row (iy + ph) / sh - (ky * dh) / sh: the taps split into sh
// residue classes per axis (one for stride 1), and within a class an entry's offset from the position's base
// ((iy + ph) / sh, (ix + pw) / sw) is fixed. At an input position whose every tap of its class lands inside
// grad_output the loop over them is one run of known length; the nested loop's short inner runs (about 3 nonzeros
// per tap at d = 0.05) cost a mispredicted exit each. Stride 1, ResNet-18 stage 1, 1 thread, three alternating runs:
// 1.26-1.39x faster at d = 0.05 (batch 32), 1.10-1.20x at d <= 0.1 (batch 128), 1.02-1.06x at 0.5
// (benchmarks/results/conv_backward_kernels_2026-12-07.md); the strided classes: conv_backward_kernels_2026-12-07c.md.
// Each list is sorted by offset, i.e. by output channel and then tap: consecutive entries read neighbouring positions
// of one grad_output plane, as the forward's taps (sorted by input channel) read one input plane. In the (ky, kx, o)
// order each entry jumped to another plane; at batch 32 (1 thread, three alternating runs) the sorted list made the
// input gradient 1.6-2.0x faster at d = 0.5 and 1.3-1.7x at d = 0.2 on stage 1 and stage 3
// (benchmarks/results/conv_backward_kernels_2026-12-07b.md). Border positions keep the nested loop's order, so a
// position's sum is ordered differently inside and at the border (both are the same sum up to rounding).
struct FlatEntry {
  float w;
  int64_t offset;
};

// The taps of one residue class along one axis: their output-row (or column) steps back from the base, lo..hi
// (hi < lo: the class has no tap, and its positions receive no gradient).
struct ResidueSteps {
  int64_t lo = 0, hi = -1;
};

struct FlatLists {
  std::vector<ResidueSteps> rows, cols;       // by (iy + ph) % sh, by (ix + pw) % sw
  std::vector<std::vector<FlatEntry>> lists;  // [c * sh * sw + row class * sw + column class]
};

std::vector<ResidueSteps> residue_steps(int64_t k, int64_t d, int64_t s) {
  std::vector<ResidueSteps> steps(s);
  for (int64_t t = 0; t < k; ++t) {
    ResidueSteps& r = steps[(t * d) % s];
    const int64_t step = (t * d) / s;
    if (r.hi < r.lo) {
      r.lo = r.hi = step;
    } else {
      r.lo = std::min(r.lo, step);
      r.hi = std::max(r.hi, step);
    }
  }
  return steps;
}

FlatLists flat_lists(const float* values_t, const int64_t* tcrow, const int32_t* tcol, const Geometry& g) {
  FlatLists flat{residue_steps(g.kh, g.dh, g.sh), residue_steps(g.kw, g.dw, g.sw),
                 std::vector<std::vector<FlatEntry>>(g.C * g.sh * g.sw)};
  const int64_t plane = g.OH * g.OW * g.N;
  for (int64_t c = 0; c < g.C; ++c) {
    for (int64_t ky = 0; ky < g.kh; ++ky) {
      for (int64_t kx = 0; kx < g.kw; ++kx) {
        const int64_t j = (c * g.kh + ky) * g.kw + kx;
        std::vector<FlatEntry>& list =
            flat.lists[(c * g.sh + (ky * g.dh) % g.sh) * g.sw + (kx * g.dw) % g.sw];
        const int64_t shift = -(((ky * g.dh) / g.sh) * g.OW + (kx * g.dw) / g.sw) * g.N;
        for (int64_t t = tcrow[j]; t < tcrow[j + 1]; ++t) {
          list.push_back({values_t[t], static_cast<int64_t>(tcol[t]) * plane + shift});
        }
      }
    }
  }
  for (std::vector<FlatEntry>& list : flat.lists) {
    std::stable_sort(list.begin(), list.end(), [](const FlatEntry& a, const FlatEntry& b) {
      return a.offset < b.offset;
    });
  }
  return flat;
}

// The same loop with the batch block in AVX2 registers (the portable loop above is the reference shape).
template <int V>
__attribute__((target("avx2,fma"))) void input_grad_block_avx2(const float* values_t, const int64_t* tcrow,
                                                               const int32_t* tcol, const float* gout, float* gin,
                                                               const Geometry& g, const FlatLists& flat, int64_t c,
                                                               int64_t n0, int64_t iy_begin, int64_t iy_end) {
  // inside: every tap of the position's class lands inside grad_output (a class without taps counts as inside)
  const auto inside = [](const ResidueSteps& r, int64_t base, int64_t size) {
    return r.hi < r.lo || (base - r.hi >= 0 && base - r.lo <= size - 1);
  };
  // the base and class of (iy + ph) and (ix + pw), stepped along (no division per position)
  int64_t qy = (iy_begin + g.ph) / g.sh, ry = (iy_begin + g.ph) % g.sh;
  for (int64_t iy = iy_begin; iy < iy_end; ++iy, ry = ry + 1 == g.sh ? (++qy, 0) : ry + 1) {
    const bool row_inside = inside(flat.rows[ry], qy, g.OH);
    int64_t qx = g.pw / g.sw, rx = g.pw % g.sw;
    for (int64_t ix = 0; ix < g.W; ++ix, rx = rx + 1 == g.sw ? (++qx, 0) : rx + 1) {
      // V < 8: two neighbouring positions of one class at once (stride-1 columns), as the forward's pairs
      if (V < 8 && g.sw == 1 && row_inside && ix + 1 < g.W && inside(flat.cols[0], qx, g.OW) &&
          inside(flat.cols[0], qx + 1, g.OW)) {
        Acc8<V> first, second;
        first.zero();
        second.zero();
        const float* at = gout + (qy * g.OW + qx) * g.N + n0;
        for (const FlatEntry& e : flat.lists[c * g.sh + ry]) {
          first.fma(e.w, at + e.offset);
          second.fma(e.w, at + g.N + e.offset);
        }
        float* dst = gin + ((c * g.H + iy) * g.W + ix) * g.out_ld + n0;
        first.store(dst);
        second.store(dst + g.out_ld);
        ++ix;
        ++qx;
        continue;
      }
      Acc8<V> acc;
      acc.zero();
      if (row_inside && inside(flat.cols[rx], qx, g.OW)) {
        const std::vector<FlatEntry>& list = flat.lists[(c * g.sh + ry) * g.sw + rx];
        if (!list.empty()) {
          const float* at = gout + (qy * g.OW + qx) * g.N + n0;
          for (const FlatEntry& e : list) acc.fma(e.w, at + e.offset);
        }
        acc.store(gin + ((c * g.H + iy) * g.W + ix) * g.out_ld + n0);
        continue;
      }
      for (int64_t ky = 0; ky < g.kh; ++ky) {
        const int64_t ty = iy + g.ph - ky * g.dh;
        if (ty < 0 || ty % g.sh != 0 || ty / g.sh >= g.OH) continue;
        const int64_t oy = ty / g.sh;
        for (int64_t kx = 0; kx < g.kw; ++kx) {
          const int64_t tx = ix + g.pw - kx * g.dw;
          if (tx < 0 || tx % g.sw != 0 || tx / g.sw >= g.OW) continue;
          const int64_t ox = tx / g.sw;
          const int64_t j = (c * g.kh + ky) * g.kw + kx;
          for (int64_t t = tcrow[j]; t < tcrow[j + 1]; ++t) {
            acc.fma(values_t[t], gout + ((static_cast<int64_t>(tcol[t]) * g.OH + oy) * g.OW + ox) * g.N + n0);
          }
        }
      }
      acc.store(gin + ((c * g.H + iy) * g.W + ix) * g.out_ld + n0);
    }
  }
}
#endif

template <typename T>
void input_grad_dispatch(const T* values_t, const int64_t* tcrow, const int32_t* tcol, const T* gout, T* gin,
                         const Geometry& g) {
#if defined(FEDSPA_X86_DISPATCH)
  if constexpr (std::is_same_v<T, float>) {
    if (cpu_has_avx2_fma() && g.N % 8 == 0) {
      // input-row tiles outermost, every input channel inside: the grad_output rows a tile reads stay in L2
      const int64_t blocks = (g.N + kBatchBlock - 1) / kBatchBlock;
      const int64_t width = std::min(g.N, kBatchBlock);
      const int64_t span = ((g.kh - 1) * g.dh) / g.sh + 1;  // output rows one input row reads
      // small grad_outputs: one tile (every input row), the channel-outermost order
      const int64_t rows = worth_tiling(g.O, g.OH, g.OW, width, sizeof(float))
                               ? tile_rows(g.O, g.OW, width, 1, span, g.H, blocks, sizeof(float)) : g.H;
      const int64_t tiles = (g.H + rows - 1) / rows;
      const FlatLists flat = flat_lists(values_t, tcrow, tcol, g);
      // tasks in (tile, batch block, channel) order: a thread's contiguous share walks a tile's channels
      at::parallel_for(0, tiles * blocks * g.C, 1, [&](int64_t t0, int64_t t1) {
        for (int64_t task = t0; task < t1; ++task) {
          const int64_t c = task % g.C;
          const int64_t iy0 = (task / (g.C * blocks)) * rows;
          const int64_t iy1 = std::min(g.H, iy0 + rows);
          const int64_t n0 = ((task / g.C) % blocks) * kBatchBlock;
          const int64_t here = std::min(g.N - n0, kBatchBlock);
          {
            int64_t n = n0;
            const auto run = [&](auto vectors) {
              constexpr int V = decltype(vectors)::value;
              input_grad_block_avx2<V>(values_t, tcrow, tcol, gout, gin, g, flat, c, n, iy0, iy1);
              n += 8 * V;
            };
            if (here == 64) {
              run(std::integral_constant<int, 8>{});
              continue;
            }
            if (n + 32 <= n0 + here) run(std::integral_constant<int, 4>{});
            if (n + 16 <= n0 + here) run(std::integral_constant<int, 2>{});
            if (n + 8 <= n0 + here) run(std::integral_constant<int, 1>{});
          }
        }
      });
      return;
    }
  }
#endif
  input_grad_impl(values_t, tcrow, tcol, gout, gin, g);
}

// ------------------------------------------------------------------------------------------------------------------
// Weight gradient: per nonzero, sum over valid positions of dot(grad_out[o, oy, ox, :], input[c, iy, ix, :])
// ------------------------------------------------------------------------------------------------------------------
// The output positions where tap (ky, kx) lands inside the input: oy in [ylo, yhi], ox in [xlo, xhi] (inclusive;
// empty when hi < lo).
struct TapRange {
  int64_t ylo, yhi, xlo, xhi;
};

inline TapRange tap_range(const Geometry& g, int64_t ky, int64_t kx) {
  const auto range = [](int64_t pad, int64_t k, int64_t d, int64_t s, int64_t size, int64_t out_size, int64_t& lo,
                        int64_t& hi) {
    const int64_t start = pad - k * d;  // valid: 0 <= o * s - pad + k * d < size, i.e. o * s >= start ...
    lo = start <= 0 ? 0 : (start + s - 1) / s;
    const int64_t end = size - 1 + pad - k * d;  // ... and o * s <= end
    hi = end < 0 ? -1 : std::min(out_size - 1, end / s);
  };
  TapRange t;
  range(g.ph, ky, g.dh, g.sh, g.H, g.OH, t.ylo, t.yhi);
  range(g.pw, kx, g.dw, g.sw, g.W, g.OW, t.xlo, t.xhi);
  return t;
}

template <typename T>
T tap_dot(const T* gout, const T* in, const Geometry& g, int64_t o, int64_t c, int64_t ky, int64_t kx) {
  const TapRange v = tap_range(g, ky, kx);
  T lanes[8] = {};
  T tail = 0;
  for (int64_t oy = v.ylo; oy <= v.yhi; ++oy) {
    const int64_t iy = oy * g.sh - g.ph + ky * g.dh;
    for (int64_t ox = v.xlo; ox <= v.xhi; ++ox) {
      const int64_t ix = ox * g.sw - g.pw + kx * g.dw;
      const T* a = gout + ((o * g.OH + oy) * g.OW + ox) * g.N;
      const T* b = in + ((c * g.H + iy) * g.W + ix) * g.N;
      int64_t n = 0;
      for (; n + 8 <= g.N; n += 8) {
        for (int u = 0; u < 8; ++u) lanes[u] += a[n + u] * b[n + u];
      }
      for (; n < g.N; ++n) tail += a[n] * b[n];
    }
  }
  return ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7])) + tail;
}

#if defined(FEDSPA_X86_DISPATCH)
// G nonzeros (input channel c[t], tap ky[t], kx[t]) of output channel o over the output positions [y0, y1] x [x0, x1],
// where every one of them lands inside the input: sums[t] += their dot products. Each batch vector of grad_output is
// loaded once for all G, and the G accumulators are independent chains of fused multiply-adds (one accumulator per
// tap would leave the FMA units waiting on its latency).
template <int G>
__attribute__((target("avx2,fma"))) void fused_taps_avx2(const float* gout, const float* in, const Geometry& g,
                                                         int64_t o, const int64_t* c, const int64_t* ky,
                                                         const int64_t* kx, int64_t y0, int64_t y1, int64_t x0,
                                                         int64_t x1, float* sums) {
  constexpr int U = G == 2 ? 2 : 1;  // vectors per tap per step: at least 3 independent chains (G = 1: below)
  int64_t offset[G];  // each nonzero's input offset from channel 0's tap (0, 0), in floats
  for (int t = 0; t < G; ++t) offset[t] = ((c[t] * g.H + ky[t] * g.dh) * g.W + kx[t] * g.dw) * g.N;
  __m256 acc[G][U];
  for (int t = 0; t < G; ++t) {
    for (int u = 0; u < U; ++u) acc[t][u] = _mm256_setzero_ps();
  }
  float tail[G] = {};
  const int64_t wide = g.N - g.N % (8 * U);
  const int64_t full = g.N - g.N % 8;
  for (int64_t oy = y0; oy <= y1; ++oy) {
    for (int64_t ox = x0; ox <= x1; ++ox) {
      const float* a = gout + ((o * g.OH + oy) * g.OW + ox) * g.N;
      // where channel 0's tap (0, 0) would land (maybe in the padding: only the offsets from it are read)
      const int64_t origin = ((oy * g.sh - g.ph) * g.W + ox * g.sw - g.pw) * g.N;
      const float* b[G];
      for (int t = 0; t < G; ++t) b[t] = in + (origin + offset[t]);
      int64_t n = 0;
      for (; n < wide; n += 8 * U) {
        for (int u = 0; u < U; ++u) {
          const __m256 av = _mm256_loadu_ps(a + n + 8 * u);
          for (int t = 0; t < G; ++t) {
            acc[t][u] = _mm256_fmadd_ps(av, _mm256_loadu_ps(b[t] + n + 8 * u), acc[t][u]);
          }
        }
      }
      for (; n < full; n += 8) {
        const __m256 av = _mm256_loadu_ps(a + n);
        for (int t = 0; t < G; ++t) acc[t][0] = _mm256_fmadd_ps(av, _mm256_loadu_ps(b[t] + n), acc[t][0]);
      }
      for (; n < g.N; ++n) {
        for (int t = 0; t < G; ++t) tail[t] += a[n] * b[t][n];
      }
    }
  }
  for (int t = 0; t < G; ++t) {
    __m256 total = acc[t][0];
    for (int u = 1; u < U; ++u) total = _mm256_add_ps(total, acc[t][u]);
    sums[t] += horizontal_sum(total) + tail[t];
  }
}

// One tap over the output positions [y0, y1] x [x0, x1] (all landing inside the input). Two accumulators: four
// (32-wide steps) measured 4-9% slower on the ResNet-18 downsample (1x1, stride 2, batch 32).
__attribute__((target("avx2,fma"), always_inline)) inline float single_tap_avx2(
    const float* gout, const float* in, const Geometry& g, int64_t o, int64_t c, int64_t ky, int64_t kx, int64_t y0,
    int64_t y1, int64_t x0, int64_t x1) {
  __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
  float tail = 0.f;
  for (int64_t oy = y0; oy <= y1; ++oy) {
    const int64_t iy = oy * g.sh - g.ph + ky * g.dh;
    for (int64_t ox = x0; ox <= x1; ++ox) {
      const int64_t ix = ox * g.sw - g.pw + kx * g.dw;
      const float* a = gout + ((o * g.OH + oy) * g.OW + ox) * g.N;
      const float* b = in + ((c * g.H + iy) * g.W + ix) * g.N;
      int64_t n = 0;
      for (; n + 16 <= g.N; n += 16) {
        s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + n), _mm256_loadu_ps(b + n), s0);
        s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + n + 8), _mm256_loadu_ps(b + n + 8), s1);
      }
      for (; n + 8 <= g.N; n += 8) s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + n), _mm256_loadu_ps(b + n), s0);
      for (; n < g.N; ++n) tail += a[n] * b[n];
    }
  }
  return horizontal_sum(_mm256_add_ps(s0, s1)) + tail;
}

__attribute__((target("avx2,fma"))) void fused_taps_dispatch(int count, const float* gout, const float* in,
                                                             const Geometry& g, int64_t o, const int64_t* c,
                                                             const int64_t* ky, const int64_t* kx, int64_t y0,
                                                             int64_t y1, int64_t x0, int64_t x1, float* sums) {
  switch (count) {
    case 1: sums[0] += single_tap_avx2(gout, in, g, o, c[0], ky[0], kx[0], y0, y1, x0, x1); break;
    case 2: fused_taps_avx2<2>(gout, in, g, o, c, ky, kx, y0, y1, x0, x1, sums); break;
    case 3: fused_taps_avx2<3>(gout, in, g, o, c, ky, kx, y0, y1, x0, x1, sums); break;
    case 4: fused_taps_avx2<4>(gout, in, g, o, c, ky, kx, y0, y1, x0, x1, sums); break;
    case 5: fused_taps_avx2<5>(gout, in, g, o, c, ky, kx, y0, y1, x0, x1, sums); break;
    case 6: fused_taps_avx2<6>(gout, in, g, o, c, ky, kx, y0, y1, x0, x1, sums); break;
    case 7: fused_taps_avx2<7>(gout, in, g, o, c, ky, kx, y0, y1, x0, x1, sums); break;
    default: fused_taps_avx2<8>(gout, in, g, o, c, ky, kx, y0, y1, x0, x1, sums); break;
  }
}

// A tap alone (a group of one: every tap of a 1x1 convolution, most at low density), over all its positions.
__attribute__((target("avx2,fma"))) float tap_dot_avx2(const float* gout, const float* in, const Geometry& g,
                                                       int64_t o, int64_t c, int64_t ky, int64_t kx) {
  const TapRange v = tap_range(g, ky, kx);
  return v.ylo <= v.yhi && v.xlo <= v.xhi ? single_tap_avx2(gout, in, g, o, c, ky, kx, v.ylo, v.yhi, v.xlo, v.xhi)
                                          : 0.f;
}

constexpr int kMaxFusedTaps = 8;

// Output channel o's weight gradient, kMaxFusedTaps nonzeros at a time (in CSR order, across input channels: they all
// read the same grad_output vectors): fused over the positions where all of them land inside the input, then each
// alone over the rest of its own positions (the padding border). Grouping only the taps of one input channel left
// most nonzeros alone at low density and on 1x1 kernels, each loading both operands per multiply-add; across channels,
// 1 thread, three alternating runs: ResNet-18 stage 1 1.17-1.32x faster at d <= 0.1 (batch 32), 1.11-1.50x (batch
// 128), the 1x1 downsample 1.14-1.20x at d = 0.5 (batch 128) (benchmarks/results/conv_backward_kernels_2026-12-07.md).
template <typename I>
__attribute__((target("avx2,fma"))) void weight_grad_row_avx2(const float* gout, const float* in, const int64_t* crow,
                                                              const I* col, float* out, const Geometry& g,
                                                              int64_t o) {
  const int64_t taps = g.kh * g.kw;
  const int64_t e = crow[o + 1];
  int64_t k = crow[o];
  while (k < e) {
    int count = 0;
    int64_t c[kMaxFusedTaps], ky[kMaxFusedTaps], kx[kMaxFusedTaps];
    TapRange ranges[kMaxFusedTaps];
    TapRange inner{0, g.OH - 1, 0, g.OW - 1};
    if (k + 1 == e) {  // the last one alone skips the grouping's bookkeeping
      const int64_t r = col[k] % taps;
      out[k] = tap_dot_avx2(gout, in, g, o, col[k] / taps, r / g.kw, r % g.kw);
      ++k;
      continue;
    }
    while (k + count < e && count < kMaxFusedTaps) {
      const int64_t r = col[k + count] % taps;
      c[count] = col[k + count] / taps;
      ky[count] = r / g.kw;
      kx[count] = r % g.kw;
      ranges[count] = tap_range(g, ky[count], kx[count]);
      inner = {std::max(inner.ylo, ranges[count].ylo), std::min(inner.yhi, ranges[count].yhi),
               std::max(inner.xlo, ranges[count].xlo), std::min(inner.xhi, ranges[count].xhi)};
      ++count;
    }
    float sums[kMaxFusedTaps] = {};
    const bool fused = inner.ylo <= inner.yhi && inner.xlo <= inner.xhi;
    if (fused) {
      fused_taps_dispatch(count, gout, in, g, o, c, ky, kx, inner.ylo, inner.yhi, inner.xlo, inner.xhi, sums);
    }
    for (int t = 0; t < count; ++t) {
      const TapRange& v = ranges[t];
      if (v.ylo > v.yhi || v.xlo > v.xhi) continue;  // the tap never lands inside the input: its gradient is 0
      // the tap's own rectangle minus the fused inner one (which it contains): bands above and below, then the
      // strips left and right of the inner rows; without an inner one, the whole rectangle
      const TapRange rest[4] = {fused ? TapRange{v.ylo, inner.ylo - 1, v.xlo, v.xhi} : v,
                                {inner.yhi + 1, v.yhi, v.xlo, v.xhi},
                                {inner.ylo, inner.yhi, v.xlo, inner.xlo - 1},
                                {inner.ylo, inner.yhi, inner.xhi + 1, v.xhi}};
      for (int part = 0; part < (fused ? 4 : 1); ++part) {
        const TapRange& p = rest[part];
        if (p.ylo <= p.yhi && p.xlo <= p.xhi) {
          sums[t] += single_tap_avx2(gout, in, g, o, c[t], ky[t], kx[t], p.ylo, p.yhi, p.xlo, p.xhi);
        }
      }
    }
    for (int t = 0; t < count; ++t) out[k + t] = sums[t];
    k += count;
  }
}
#endif

template <typename T, typename I>
void weight_grad_impl(const T* gout, const T* in, const int64_t* crow, const I* col, T* out,
                      const Geometry& g) {
  at::parallel_for(0, g.O, 1, [&](int64_t o0, int64_t o1) {
    for (int64_t o = o0; o < o1; ++o) {
#if defined(FEDSPA_X86_DISPATCH)
      if constexpr (std::is_same_v<T, float>) {
        if (cpu_has_avx2_fma()) {
          // the whole batch at once: 32-wide blocks of it (strided slices of the (C, H, W, N) layout) measured
          // 2.0-2.5x slower at batch 128
          weight_grad_row_avx2(gout, in, crow, col, out, g, o);
          continue;
        }
      }
#endif
      for (int64_t k = crow[o]; k < crow[o + 1]; ++k) {
        const int64_t j = col[k];
        const int64_t c = j / (g.kh * g.kw);
        const int64_t r = j % (g.kh * g.kw);
        out[k] = tap_dot(gout, in, g, o, c, r / g.kw, r % g.kw);
      }
    }
  });
}

// ------------------------------------------------------------------------------------------------------------------
// The ops
// ------------------------------------------------------------------------------------------------------------------
// A wider fp32 batch runs as contiguous (C, H, W, 64) chunks, each written into its slice of the result (the weight
// gradient sums them): a kernel that reads 64-wide blocks out of longer position vectors uses part of every cache
// line group and page it crosses. ResNet-18 stage 1, 1 thread, ms per sample at batch 128 vs 64: forward, input and
// weight gradient each 1.3-2x slower; in chunks, the stage-1 training step at batch 128 went 1.2-1.4x faster. An NCHW
// input is transposed chunk by chunk (the same single pass as the whole); a (C, H, W, N) one pays a copy per chunk.
constexpr int64_t kBatchChunk = 64;

int64_t chunk_width(const at::Tensor& t, int64_t batch) {
  return batch > kBatchChunk && t.scalar_type() == at::kFloat && cpu_has_avx2_fma() ? kBatchChunk : batch;
}

// Batch elements [n0, n0 + width) of a (C, H, W, N) activation as a contiguous (C, H, W, width) tensor.
at::Tensor batch_chunk(const at::Tensor& t, int64_t n0, int64_t width) {
  return feature_major(t.narrow(3, n0, width));
}

// body(n0, gc) for each chunk [n0, n0 + gc.N) of the batch, `chunk` wide: gc is g with the chunk's batch (its
// out_ld still g's, so the kernel writes the chunk's slice of the whole result).
template <typename F>
void for_each_batch_chunk(const Geometry& g, int64_t chunk, F&& body) {
  for (int64_t n0 = 0; n0 < g.N; n0 += chunk) {
    Geometry gc = g;
    gc.N = std::min(chunk, g.N - n0);
    body(n0, gc);
  }
}

at::Tensor sparse_conv2d_cpu(const at::Tensor& values, const at::Tensor& crow, const at::Tensor& col,
                             const at::Tensor& input_t, at::IntArrayRef kernel, at::IntArrayRef stride,
                             at::IntArrayRef padding, at::IntArrayRef dilation) {
  constexpr const char* op = "sparse_conv2d";
  check_conv_values(op, values, false);
  check_conv_activation(op, "input_t", input_t, values);
  check_csr_metadata(op, crow, col, values.device());
  TORCH_CHECK_VALUE(values.numel() == col.numel(), op, ": ", values.numel(), " values for ", col.numel(),
                    " nonzeros");
  const Geometry g = make_conv_geometry(op, input_t.size(0), input_t.size(1), input_t.size(2), input_t.size(3),
                                        crow.numel() - 1, kernel, stride, padding, dilation);
  const at::Tensor crow_c = crow.contiguous();
  const at::Tensor col_c = col.contiguous();
  check_csr(op, crow_c, col_c, g.C * g.kh * g.kw);
  const at::Tensor v = values.contiguous();
  at::Tensor out = at::empty({g.O, g.OH, g.OW, g.N}, input_t.options());
  for_each_batch_chunk(g, chunk_width(input_t, g.N), [&](int64_t n0, const Geometry& gc) {
    const at::Tensor in = batch_chunk(input_t, n0, gc.N);
    dispatch_col_index(col_c, [&](auto index) {
      using I = decltype(index);
      AT_DISPATCH_FLOATING_TYPES(values.scalar_type(), "sparse_conv2d_cpu", [&] {
        forward_impl<scalar_t>(v.data_ptr<scalar_t>(), crow_c.data_ptr<int64_t>(), col_c.data_ptr<I>(),
                               in.data_ptr<scalar_t>(), out.data_ptr<scalar_t>() + n0, gc);
      });
    });
  });
  return out;
}

at::Tensor sparse_conv2d_input_grad_cpu(const at::Tensor& values, const at::Tensor& crow, const at::Tensor& col,
                                        const at::Tensor& grad_out_t, at::IntArrayRef input_chw,
                                        at::IntArrayRef kernel, at::IntArrayRef stride, at::IntArrayRef padding,
                                        at::IntArrayRef dilation) {
  constexpr const char* op = "sparse_conv2d_input_grad";
  check_conv_values(op, values, false);
  check_conv_activation(op, "grad_out_t", grad_out_t, values);
  check_csr_metadata(op, crow, col, values.device());
  TORCH_CHECK_VALUE(values.numel() == col.numel(), op, ": ", values.numel(), " values for ", col.numel(),
                    " nonzeros");
  const Geometry g = input_grad_geometry(op, crow, grad_out_t, input_chw, kernel, stride, padding, dilation);
  const at::Tensor crow_c = crow.contiguous();
  const at::Tensor col_c = col.contiguous();
  check_csr(op, crow_c, col_c, g.C * g.kh * g.kw);
  const at::Tensor v = values.contiguous();
  at::Tensor gin = at::empty({g.C, g.H, g.W, g.N}, grad_out_t.options());
  const int64_t chunk = chunk_width(grad_out_t, g.N);
  dispatch_col_index(col_c, [&](auto index) {
    using I = decltype(index);
    AT_DISPATCH_FLOATING_TYPES(values.scalar_type(), "sparse_conv2d_input_grad_cpu", [&] {
      // the gather below reads the weight column by column: its transposed order, built here for this call
      const CscOf<scalar_t> t = csr_transpose_cpu(v.data_ptr<scalar_t>(), crow_c.data_ptr<int64_t>(),
                                                  col_c.data_ptr<I>(), g.O, g.C * g.kh * g.kw);
      for_each_batch_chunk(g, chunk, [&](int64_t n0, const Geometry& gc) {
        const at::Tensor gout = batch_chunk(grad_out_t, n0, gc.N);
        input_grad_dispatch<scalar_t>(t.values.get(), t.ccol.data(), t.row.get(), gout.data_ptr<scalar_t>(),
                                      gin.data_ptr<scalar_t>() + n0, gc);
      });
    });
  });
  return gin;
}

at::Tensor sparse_conv2d_weight_grad_cpu(const at::Tensor& grad_out_t, const at::Tensor& input_t,
                                         const at::Tensor& crow, const at::Tensor& col, at::IntArrayRef kernel,
                                         at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation) {
  constexpr const char* op = "sparse_conv2d_weight_grad";
  TORCH_CHECK_TYPE(input_t.scalar_type() == at::kFloat || input_t.scalar_type() == at::kDouble, op,
                   " (cpp): input_t must be float32 or float64, got ", input_t.scalar_type());
  check_conv_activation(op, "input_t", input_t, input_t);
  check_conv_activation(op, "grad_out_t", grad_out_t, input_t);
  check_csr_metadata(op, crow, col, input_t.device());
  const Geometry g = make_conv_geometry(op, input_t.size(0), input_t.size(1), input_t.size(2), input_t.size(3),
                                        crow.numel() - 1, kernel, stride, padding, dilation);
  check_weight_grad_shape(op, grad_out_t, g);
  const at::Tensor crow_c = crow.contiguous();
  const at::Tensor col_c = col.contiguous();
  check_csr(op, crow_c, col_c, g.C * g.kh * g.kw);
  at::Tensor out = at::empty({col.numel()}, input_t.options());
  // This kernel reads whole batch vectors; its chunks pay where they cost no copy (a chunk of an NCHW view is
  // transposed out of it, as the whole would be) or the planes it walks are large. The default CNN's second
  // convolution (14x14 planes of 128, (C, H, W, N) operands from the pool), 1 thread: 6.5 ms whole, 7.2-7.8 ms in
  // copied chunks; ResNet-18 stage 1 (32x32 planes): 0.65 -> 0.47-0.52 ms per sample in chunks.
  constexpr int64_t kLargePlaneBytes = 256 * 1024;
  const bool copied_chunks = input_t.is_contiguous() && grad_out_t.is_contiguous();
  const int64_t chunk = copied_chunks && g.H * g.W * g.N * input_t.element_size() <= kLargePlaneBytes
                            ? g.N : chunk_width(input_t, g.N);
  at::Tensor part = chunk < g.N ? at::empty_like(out) : out;  // a later chunk's sums, added to the first's
  // a batch of 0 has no chunk: its weight gradient is zero
  if (g.N == 0) out.zero_();
  for_each_batch_chunk(g, chunk, [&](int64_t n0, const Geometry& gc) {
    const at::Tensor gout = batch_chunk(grad_out_t, n0, gc.N);
    const at::Tensor in = batch_chunk(input_t, n0, gc.N);
    at::Tensor& sums = n0 == 0 ? out : part;
    dispatch_col_index(col_c, [&](auto index) {
      using I = decltype(index);
      AT_DISPATCH_FLOATING_TYPES(input_t.scalar_type(), "sparse_conv2d_weight_grad_cpu", [&] {
        weight_grad_impl<scalar_t>(gout.data_ptr<scalar_t>(), in.data_ptr<scalar_t>(), crow_c.data_ptr<int64_t>(),
                                   col_c.data_ptr<I>(), sums.data_ptr<scalar_t>(), gc);
      });
    });
    if (n0 > 0) out.add_(part);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(FEDSPA_NAMESPACE, CPU, m) {
  m.impl("sparse_conv2d", &sparse_conv2d_cpu);
  m.impl("sparse_conv2d_input_grad", &sparse_conv2d_input_grad_cpu);
  m.impl("sparse_conv2d_weight_grad", &sparse_conv2d_weight_grad_cpu);
}

}  // namespace fedspa
