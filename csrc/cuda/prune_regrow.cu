// CUDA kernel of fedspa::prune_regrow: the segmented radix select of every layer at once.
//
// Same algorithm as the Triton twin (fedspa_kernels/triton_kernels/prune_regrow.py): the layers are concatenated
// into flat buffers and cut into blocks of kBlock elements that never cross a layer; every element gets one
// order-preserving key (|w| where active, the negated score where inactive; 64-bit keys for fp64 inputs).
// Per 11-bit digit, blocks build shared-memory histograms of the keys matching each selection's prefix and add
// them per layer; the bin holding the k-th key is chosen for all layers with a few ATen ops. A count pass gives
// each block's keys below/equal to the thresholds; the write pass places picks with per-layer scans and in-block
// ballot scans (index order, so ties go lowest index first). One host synchronization raises input errors.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <tuple>
#include <vector>

#include "fedspa/prune_regrow_checks.h"

namespace fedspa {
namespace {

constexpr const char* kOp = "prune_regrow";
constexpr int kDigitBits = 11;
constexpr int kBins = 1 << kDigitBits;
constexpr int kBlock = 1024;   // elements per block-table entry
constexpr int kThreads = 256;  // threads per CUDA block: 4 rounds of 256 consecutive elements
constexpr int kWarps = kThreads / 32;
constexpr long long kNone = 1ll << 62;

template <typename V>
struct KeyOf;
template <>
struct KeyOf<float> {
  using type = uint32_t;
  static __device__ uint32_t bits(float x) { return __float_as_uint(x); }
};
template <>
struct KeyOf<double> {
  using type = unsigned long long;
  static __device__ unsigned long long bits(double x) { return static_cast<unsigned long long>(__double_as_longlong(x)); }
};

// |w| where active; the descending-score key where not (-0 ties with +0).
template <typename V>
__device__ inline typename KeyOf<V>::type make_key(V w, V s, bool active) {
  using K = typename KeyOf<V>::type;
  constexpr K sign = K{1} << (sizeof(K) * 8 - 1);
  if (active) return KeyOf<V>::bits(w) & (sign - 1);
  const K b = s == V(0) ? K{0} : KeyOf<V>::bits(s);
  const K ascending = (b & sign) ? ~b : (b | sign);
  return ~ascending;
}

struct Table {
  const int64_t* block_seg;
  const int64_t* block_start;
  const int64_t* seg_start;
  const int64_t* seg_end;
};

template <typename V>
__global__ void first_digit_kernel(const V* __restrict__ w, const V* __restrict__ s, const uint8_t* __restrict__ m,
                                   Table table, int shift, int* __restrict__ hist,
                                   unsigned long long* __restrict__ active_count,
                                   unsigned long long* __restrict__ first_nan) {
  __shared__ int local[2 * kBins];
  for (int b = threadIdx.x; b < 2 * kBins; b += blockDim.x) local[b] = 0;
  __syncthreads();
  const int64_t seg = table.block_seg[blockIdx.x];
  const int64_t start = table.block_start[blockIdx.x];
  const int64_t end = min(start + kBlock, table.seg_end[seg]);
  unsigned long long active = 0, nan_w = kNone, nan_s = kNone;
  for (int64_t i = start + threadIdx.x; i < end; i += blockDim.x) {
    const bool a = m[i] != 0;
    const V wv = w[i];
    const V sv = s[i];
    const auto key = make_key(wv, sv, a);
    atomicAdd(&local[static_cast<int>(key >> shift) + (a ? 0 : kBins)], 1);
    active += a;
    const unsigned long long position = static_cast<unsigned long long>(i - table.seg_start[seg]);
    if (a && isnan(wv)) nan_w = min(nan_w, position);
    if (!a && isnan(sv)) nan_s = min(nan_s, position);
  }
  __syncthreads();
  for (int b = threadIdx.x; b < 2 * kBins; b += blockDim.x) {
    if (local[b] != 0) atomicAdd(&hist[seg * 2 * kBins + b], local[b]);
  }
  if (active != 0) atomicAdd(&active_count[seg], active);
  if (nan_w != kNone) atomicMin(&first_nan[seg * 2], nan_w);
  if (nan_s != kNone) atomicMin(&first_nan[seg * 2 + 1], nan_s);
}

template <typename V>
__global__ void digit_kernel(const V* __restrict__ w, const V* __restrict__ s, const uint8_t* __restrict__ m,
                             Table table, const typename KeyOf<V>::type* __restrict__ prefix, int shift, int high,
                             int* __restrict__ hist) {
  using K = typename KeyOf<V>::type;
  __shared__ int local[2 * kBins];
  for (int b = threadIdx.x; b < 2 * kBins; b += blockDim.x) local[b] = 0;
  __syncthreads();
  const int64_t seg = table.block_seg[blockIdx.x];
  const int64_t start = table.block_start[blockIdx.x];
  const int64_t end = min(start + kBlock, table.seg_end[seg]);
  const K prefix_prune = prefix[seg * 2] >> high;
  const K prefix_grow = prefix[seg * 2 + 1] >> high;
  for (int64_t i = start + threadIdx.x; i < end; i += blockDim.x) {
    const bool a = m[i] != 0;
    const K key = make_key(w[i], s[i], a);
    if ((key >> high) == (a ? prefix_prune : prefix_grow)) {
      atomicAdd(&local[static_cast<int>((key >> shift) & (kBins - 1)) + (a ? 0 : kBins)], 1);
    }
  }
  __syncthreads();
  for (int b = threadIdx.x; b < 2 * kBins; b += blockDim.x) {
    if (local[b] != 0) atomicAdd(&hist[seg * 2 * kBins + b], local[b]);
  }
}

// Per block: [0] active keys below the prune threshold, [1] inactive below the regrow threshold, [2] and [3] equal.
template <typename V>
__global__ void count_kernel(const V* __restrict__ w, const V* __restrict__ s, const uint8_t* __restrict__ m,
                             Table table, const typename KeyOf<V>::type* __restrict__ threshold,
                             long long* __restrict__ counts) {
  using K = typename KeyOf<V>::type;
  __shared__ unsigned long long totals[4];
  if (threadIdx.x < 4) totals[threadIdx.x] = 0;
  __syncthreads();
  const int64_t seg = table.block_seg[blockIdx.x];
  const int64_t start = table.block_start[blockIdx.x];
  const int64_t end = min(start + kBlock, table.seg_end[seg]);
  unsigned long long mine[4] = {0, 0, 0, 0};
  for (int64_t i = start + threadIdx.x; i < end; i += blockDim.x) {
    const bool a = m[i] != 0;
    const K key = make_key(w[i], s[i], a);
    const K t = threshold[seg * 2 + (a ? 0 : 1)];
    mine[(a ? 0 : 1)] += key < t;
    mine[(a ? 2 : 3)] += key == t;
  }
  for (int c = 0; c < 4; ++c) {
    if (mine[c] != 0) atomicAdd(&totals[c], mine[c]);
  }
  __syncthreads();
  if (threadIdx.x < 4) counts[blockIdx.x * 4 + threadIdx.x] = static_cast<long long>(totals[threadIdx.x]);
}

// Exclusive rank of `flag` among the block's threads (in thread order) and the block's total.
__device__ inline int block_rank(bool flag, int* warp_totals, int& total) {
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  const unsigned ballot = __ballot_sync(0xffffffffu, flag);
  const int in_warp = __popc(ballot & ((1u << lane) - 1u));
  __syncthreads();  // warp_totals is free
  if (lane == 0) warp_totals[warp] = __popc(ballot);
  __syncthreads();
  int before = 0;
  total = 0;
  for (int v = 0; v < kWarps; ++v) {
    if (v < warp) before += warp_totals[v];
    total += warp_totals[v];
  }
  return before + in_warp;
}

// take[block * 4 + {0, 1}]: ties of each selection in earlier blocks of the layer; [2, 3]: where this block's
// picks of each selection start in the flat outputs.
template <typename V>
__global__ void write_kernel(const V* __restrict__ w, const V* __restrict__ s, const uint8_t* __restrict__ m,
                             Table table, const typename KeyOf<V>::type* __restrict__ threshold,
                             const long long* __restrict__ need, const long long* __restrict__ take,
                             uint8_t* __restrict__ out_mask, long long* __restrict__ pruned,
                             long long* __restrict__ regrown) {
  using K = typename KeyOf<V>::type;
  __shared__ int warp_totals[kWarps];
  const int64_t seg = table.block_seg[blockIdx.x];
  const int64_t start = table.block_start[blockIdx.x];
  const int64_t end = min(start + kBlock, table.seg_end[seg]);
  long long ties_seen[2] = {take[blockIdx.x * 4], take[blockIdx.x * 4 + 1]};
  long long write_at[2] = {take[blockIdx.x * 4 + 2], take[blockIdx.x * 4 + 3]};
  for (int64_t round = start; round < start + kBlock; round += kThreads) {  // uniform trip count for the block
    const int64_t i = round + threadIdx.x;
    const bool live = i < end;
    const bool a = live && m[i] != 0;
    K key = 0;
    K t = 0;
    if (live) {
      key = make_key(w[i], s[i], a);
      t = threshold[seg * 2 + (a ? 0 : 1)];
    }
    const bool tie = live && key == t;
    int tie_total[2];
    const int tie_rank_p = block_rank(tie && a, warp_totals, tie_total[0]);
    const int tie_rank_g = block_rank(tie && !a, warp_totals, tie_total[1]);
    const int sel = a ? 0 : 1;
    const long long tie_rank = ties_seen[sel] + (a ? tie_rank_p : tie_rank_g);
    const bool pick = live && (key < t || (tie && tie_rank < need[seg * 2 + sel]));
    int pick_total[2];
    const int pick_rank_p = block_rank(pick && a, warp_totals, pick_total[0]);
    const int pick_rank_g = block_rank(pick && !a, warp_totals, pick_total[1]);
    if (live) {
      out_mask[i] = static_cast<uint8_t>(a != pick);
      if (pick) {
        const long long local = static_cast<long long>(i - table.seg_start[seg]);
        if (a) {
          pruned[write_at[0] + pick_rank_p] = local;
        } else {
          regrown[write_at[1] + pick_rank_g] = local;
        }
      }
    }
    ties_seen[0] += tie_total[0];
    ties_seen[1] += tie_total[1];
    write_at[0] += pick_total[0];
    write_at[1] += pick_total[1];
  }
}

at::Tensor segment_exclusive_cumsum(const at::Tensor& values, const at::Tensor& first_block,
                                    const at::Tensor& block_seg) {
  const at::Tensor exclusive = values.cumsum(0) - values;
  return exclusive - exclusive.index_select(0, first_block.index_select(0, block_seg));
}

template <typename V>
std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>> run(
    at::TensorList weights, at::TensorList masks, at::TensorList scores, at::IntArrayRef drop_counts) {
  using K = typename KeyOf<V>::type;
  constexpr int key_bits = sizeof(K) * 8;
  const at::Device device = weights[0].device();
  const int64_t layers = static_cast<int64_t>(weights.size());
  const auto value_dtype = c10::CppTypeToScalarType<V>::value;
  const auto key_dtype = sizeof(K) == 4 ? at::kInt : at::kLong;  // bit patterns of the keys
  std::vector<at::Tensor> w_parts, s_parts, m_parts;
  std::vector<int64_t> sizes, seg_start_host(layers + 1, 0), blocks_per_seg(layers);
  int64_t num_blocks = 0;
  for (int64_t l = 0; l < layers; ++l) {
    w_parts.push_back(weights[l].reshape(-1).to(value_dtype));
    s_parts.push_back(scores[l].reshape(-1).to(value_dtype));
    m_parts.push_back(masks[l].reshape(-1));
    sizes.push_back(weights[l].numel());
    seg_start_host[l + 1] = seg_start_host[l] + sizes[l];
    blocks_per_seg[l] = (sizes[l] + kBlock - 1) / kBlock;
    num_blocks += blocks_per_seg[l];
  }
  const at::Tensor flat_w = at::cat(w_parts);
  const at::Tensor flat_s = at::cat(s_parts);
  const at::Tensor flat_m = at::cat(m_parts).view(at::kByte);
  std::vector<int64_t> block_seg_host, block_start_host, first_block_host(layers, 0);
  for (int64_t l = 0, b = 0; l < layers; ++l) {
    first_block_host[l] = b;
    for (int64_t j = 0; j < blocks_per_seg[l]; ++j, ++b) {
      block_seg_host.push_back(l);
      block_start_host.push_back(seg_start_host[l] + j * kBlock);
    }
  }
  const auto long_options = at::TensorOptions().dtype(at::kLong);
  const auto to_device = [&](const std::vector<int64_t>& v) {
    return at::tensor(v, long_options).to(device);
  };
  const at::Tensor block_seg = to_device(block_seg_host);
  const at::Tensor block_start = to_device(block_start_host);
  const at::Tensor seg_start = to_device(std::vector<int64_t>(seg_start_host.begin(), seg_start_host.end() - 1));
  const at::Tensor seg_end = to_device(std::vector<int64_t>(seg_start_host.begin() + 1, seg_start_host.end()));
  const at::Tensor first_block = to_device(first_block_host);
  const Table table{block_seg.data_ptr<int64_t>(), block_start.data_ptr<int64_t>(), seg_start.data_ptr<int64_t>(),
                    seg_end.data_ptr<int64_t>()};
  auto stream = c10::cuda::getCurrentCUDAStream();
  const auto dev_long = at::TensorOptions().dtype(at::kLong).device(device);

  at::Tensor hist = at::zeros({layers, 2, kBins}, at::TensorOptions().dtype(at::kInt).device(device));
  at::Tensor active = at::zeros({layers}, dev_long);
  at::Tensor first_nan = at::full({layers, 2}, kNone, dev_long);
  if (num_blocks > 0) {
    first_digit_kernel<V><<<num_blocks, kThreads, 0, stream>>>(
        flat_w.data_ptr<V>(), flat_s.data_ptr<V>(), flat_m.data_ptr<uint8_t>(), table, key_bits - kDigitBits,
        hist.data_ptr<int>(), reinterpret_cast<unsigned long long*>(active.data_ptr<int64_t>()),
        reinterpret_cast<unsigned long long*>(first_nan.data_ptr<int64_t>()));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  const at::Tensor active_host = active.cpu();  // the one synchronization: input errors are raised here
  const at::Tensor nan_host = first_nan.cpu();
  for (int64_t l = 0; l < layers; ++l) {
    const int64_t n_active = active_host[l].item<int64_t>();
    const int64_t k = drop_counts[l];
    TORCH_CHECK_VALUE(k <= n_active, kOp, ": layer ", l, " drops ", k, " weights but has only ", n_active, " active");
    TORCH_CHECK_VALUE(k <= sizes[l] - n_active, kOp, ": layer ", l, " regrows ", k, " weights but has only ",
                      sizes[l] - n_active, " inactive positions");
    TORCH_CHECK_VALUE(nan_host[l][0].item<int64_t>() == kNone, kOp, ": layer ", l,
                      " has a NaN weight at active position ", nan_host[l][0].item<int64_t>());
    TORCH_CHECK_VALUE(nan_host[l][1].item<int64_t>() == kNone, kOp, ": layer ", l,
                      " has a NaN score at inactive position ", nan_host[l][1].item<int64_t>());
  }

  at::Tensor need = at::tensor(std::vector<int64_t>(drop_counts.begin(), drop_counts.end()), long_options)
                        .to(device).unsqueeze(1).repeat({1, 2});
  at::Tensor prefix = at::zeros({layers, 2}, dev_long);
  const int digits = (key_bits + kDigitBits - 1) / kDigitBits;
  for (int digit = 0; digit < digits; ++digit) {
    const int shift = std::max(0, key_bits - kDigitBits * (digit + 1));
    if (digit > 0 && num_blocks > 0) {
      hist.zero_();
      const at::Tensor prefix_keys = prefix.to(key_dtype);
      digit_kernel<V><<<num_blocks, kThreads, 0, stream>>>(
          flat_w.data_ptr<V>(), flat_s.data_ptr<V>(), flat_m.data_ptr<uint8_t>(), table,
          reinterpret_cast<const K*>(prefix_keys.data_ptr()), shift, key_bits - kDigitBits * digit,
          hist.data_ptr<int>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    const at::Tensor cumulative = hist.to(at::kLong).cumsum(-1);
    const at::Tensor chosen = cumulative.lt(need.unsqueeze(-1)).sum(-1).clamp_max(kBins - 1);
    const at::Tensor before =
        at::where(chosen.gt(0), cumulative.gather(-1, (chosen - 1).clamp_min(0).unsqueeze(-1)).squeeze(-1),
                  at::zeros_like(chosen));
    need = at::where(need.gt(0), need - before, need);
    prefix = prefix.bitwise_or(chosen.bitwise_left_shift(shift));
  }
  const at::Tensor threshold = prefix.to(key_dtype);

  at::Tensor counts = at::zeros({num_blocks, 4}, dev_long);
  if (num_blocks > 0) {
    count_kernel<V><<<num_blocks, kThreads, 0, stream>>>(
        flat_w.data_ptr<V>(), flat_s.data_ptr<V>(), flat_m.data_ptr<uint8_t>(), table,
        reinterpret_cast<const K*>(threshold.data_ptr()), reinterpret_cast<long long*>(counts.data_ptr<int64_t>()));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  const at::Tensor below = counts.narrow(1, 0, 2);
  const at::Tensor ties = counts.narrow(1, 2, 2);
  const at::Tensor ties_before = segment_exclusive_cumsum(ties, first_block, block_seg);
  const at::Tensor taken = at::minimum((need.index_select(0, block_seg) - ties_before).clamp_min(0), ties);
  std::vector<int64_t> k_offset_host(layers, 0);
  for (int64_t l = 1; l < layers; ++l) k_offset_host[l] = k_offset_host[l - 1] + drop_counts[l - 1];
  const at::Tensor pick_at = segment_exclusive_cumsum(below + taken, first_block, block_seg) +
                             to_device(k_offset_host).index_select(0, block_seg).unsqueeze(1);
  const at::Tensor take = at::cat({ties_before, pick_at}, 1).contiguous();
  const int64_t total_k = layers > 0 ? k_offset_host[layers - 1] + drop_counts[layers - 1] : 0;
  at::Tensor out_mask = at::empty_like(flat_m);
  at::Tensor pruned = at::empty({total_k}, dev_long);
  at::Tensor regrown = at::empty({total_k}, dev_long);
  if (num_blocks > 0) {
    write_kernel<V><<<num_blocks, kThreads, 0, stream>>>(
        flat_w.data_ptr<V>(), flat_s.data_ptr<V>(), flat_m.data_ptr<uint8_t>(), table,
        reinterpret_cast<const K*>(threshold.data_ptr()), reinterpret_cast<const long long*>(need.data_ptr<int64_t>()),
        reinterpret_cast<const long long*>(take.data_ptr<int64_t>()), out_mask.data_ptr<uint8_t>(),
        reinterpret_cast<long long*>(pruned.data_ptr<int64_t>()),
        reinterpret_cast<long long*>(regrown.data_ptr<int64_t>()));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  const at::Tensor out_bool = out_mask.view(at::kBool);
  std::vector<at::Tensor> new_masks, pruned_parts, regrown_parts;
  for (int64_t l = 0, k_at = 0; l < layers; ++l) {  // separate tensors: an op's outputs must not alias
    new_masks.push_back(out_bool.narrow(0, seg_start_host[l], sizes[l]).reshape(masks[l].sizes()).clone());
    pruned_parts.push_back(pruned.narrow(0, k_at, drop_counts[l]).clone());
    regrown_parts.push_back(regrown.narrow(0, k_at, drop_counts[l]).clone());
    k_at += drop_counts[l];
  }
  return {new_masks, pruned_parts, regrown_parts};
}

std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>> prune_regrow_cuda(
    at::TensorList weights, at::TensorList masks, at::TensorList scores, at::IntArrayRef drop_counts) {
  const bool wide = check_prune_regrow_inputs(kOp, weights, masks, scores, drop_counts);
  if (weights.empty()) return {};
  const c10::cuda::CUDAGuard guard(weights[0].device());
  return wide ? run<double>(weights, masks, scores, drop_counts) : run<float>(weights, masks, scores, drop_counts);
}

}  // namespace

TORCH_LIBRARY_IMPL(fedspa, CUDA, m) { m.impl("prune_regrow", &prune_regrow_cuda); }

}  // namespace fedspa
