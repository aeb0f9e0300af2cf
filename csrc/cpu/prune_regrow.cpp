// CPU kernel of fedspa::prune_regrow: for every layer, prune the k smallest |w| among active positions and
// regrow the k largest scores among inactive ones (ties: lowest index first), without sorting.
//
// Every element is a candidate of exactly one selection (active -> prune, inactive -> regrow), so one
// order-preserving integer key per element serves both: the bits of |w| (ascending |w|), or the flipped bits of
// the score (ascending key = descending score; -0 is folded into +0, which compare equal). The k-th smallest
// key of each (layer, selection) is found by an MSB-first radix select over 11-bit digits. All layers' chunks go
// through one parallel loop per pass, so a 10-element bias next to a 2.4M-element convolution costs one chunk;
// ties at the threshold are taken lowest index first, exactly, from per-chunk counts.
//
// Three passes read the inputs: first-digit histograms (four sub-histograms per chunk, since consecutive |w|
// share exponents and one counter would serialize the increments), then a copy of the keys in each selection's
// chosen first-digit bin (a small fraction) into compact candidate lists on which the other digits are
// resolved, then a final pass that writes the new masks and, knowing each chunk's pick count in advance, the
// pruned/regrown positions. Keys are recomputed in each pass rather than stored (a fresh buffer of one key per
// weight cost more in page faults than the recomputation).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <tuple>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "fedspa/cpu_features.h"
#include "fedspa/prune_regrow_checks.h"


namespace fedspa {
namespace {

constexpr const char* kOp = "prune_regrow";
constexpr int kDigitBits = 11;
constexpr int kBins = 1 << kDigitBits;
constexpr int64_t kChunk = int64_t{1} << 16;

template <typename K>
constexpr int key_bits() {
  return static_cast<int>(sizeof(K) * 8);
}
template <typename K>
constexpr int num_digits() {
  return (key_bits<K>() + kDigitBits - 1) / kDigitBits;  // 3 for 32-bit keys, 6 for 64-bit
}
template <typename K>
inline int digit_shift(int pass) {
  return std::max(0, key_bits<K>() - kDigitBits * (pass + 1));
}
template <typename K>
inline K digit_mask(int pass) {
  const int width = std::min(kDigitBits, key_bits<K>() - kDigitBits * pass);
  return static_cast<K>((K{1} << width) - 1);
}

// Keys: fp16/bf16/fp32 values are compared as fp32 (exact), anything with fp64 as fp64.
inline uint32_t magnitude_key(float x) {
  uint32_t b;
  std::memcpy(&b, &x, sizeof b);
  return b & 0x7fffffffu;
}
inline uint64_t magnitude_key(double x) {
  uint64_t b;
  std::memcpy(&b, &x, sizeof b);
  return b & 0x7fffffffffffffffull;
}
inline uint32_t score_key(float x) {
  uint32_t b;
  std::memcpy(&b, &x, sizeof b);
  if (x == 0.f) b = 0;  // -0 ties with +0
  const uint32_t ascending = (b & 0x80000000u) ? ~b : (b | 0x80000000u);
  return ~ascending;
}
inline uint64_t score_key(double x) {
  uint64_t b;
  std::memcpy(&b, &x, sizeof b);
  if (x == 0.0) b = 0;
  const uint64_t ascending = (b & 0x8000000000000000ull) ? ~b : (b | 0x8000000000000000ull);
  return ~ascending;
}

struct Layer {
  at::Tensor weights, mask, scores;  // contiguous inputs
  int64_t n = 0;
  int64_t k = 0;
  at::Tensor new_mask, pruned, regrown;
};

struct Chunk {
  int64_t layer, begin, end;
};

template <typename K>
struct Candidate {
  int64_t index;  // flat position in the layer
  K key;
};

template <typename K>
struct Selection {
  int64_t k = 0;
  int first_bin = 0;      // the threshold key's first digit
  K threshold = 0;        // the k-th smallest key (complete after the last digit)
  int64_t need = 0;       // how many keys equal to the threshold are taken (the first ones by index)
  int64_t candidates = 0;  // [begin, begin + candidates) of the candidate array: keys in first_bin, by index
  int64_t begin = 0;
};

int choose_bin(const int64_t* hist, int64_t& need) {
  int64_t before = 0;
  for (int b = 0; b < kBins; ++b) {
    if (before + hist[b] >= need) {
      need -= before;
      return b;
    }
    before += hist[b];
  }
  TORCH_INTERNAL_ASSERT(false, "prune_regrow: radix select ran past the last bin");
  return kBins - 1;
}

constexpr int64_t kBlock = 1024;  // keys are computed a block at a time into an L1 buffer, then consumed

// keys[j] for block elements [b, b + len): |w|'s key where active, the score's key where not. Returns whether
// a NaN was seen among them (a NaN |w| at an active position or a NaN score at an inactive one).
template <typename K, typename W, typename S>
bool block_keys(const W* w, const S* s, const bool* m, int64_t b, int64_t len, K* keys) {
  using V = std::conditional_t<sizeof(K) == 4, float, double>;
  bool nan = false;
  for (int64_t j = 0; j < len; ++j) {
    const V wv = static_cast<V>(w[b + j]);
    const V sv = static_cast<V>(s[b + j]);
    const bool active = m[b + j];
    nan |= std::isnan(active ? wv : sv);
    keys[j] = active ? magnitude_key(wv) : score_key(sv);
  }
  return nan;
}

#if defined(FEDSPA_X86_DISPATCH)
// The common case, fp32 weights and scores with 32-bit keys, 8 elements at a time with AVX2 (SSE2 lacks the
// unsigned max and byte widening the compiler would need to vectorize the portable loops).

// The keys of elements [j, j + 8), the active lanes (all ones) and the mask bytes.
__attribute__((target("avx2"))) inline __m256i keys8(const float* w, const float* s, const bool* m, int64_t j,
                                                       __m256i& active, int64_t& mask_bytes, __m256i& magnitude) {
  const __m256i abs_mask = _mm256_set1_epi32(0x7fffffff);
  const __m256i zero = _mm256_setzero_si256();
  const __m256i wb = _mm256_castps_si256(_mm256_loadu_ps(w + j));
  const __m256i sb = _mm256_castps_si256(_mm256_loadu_ps(s + j));
  std::memcpy(&mask_bytes, m + j, sizeof mask_bytes);
  active = _mm256_cmpgt_epi32(_mm256_cvtepu8_epi32(_mm_cvtsi64_si128(mask_bytes)), zero);
  const __m256i w_mag = _mm256_and_si256(wb, abs_mask);
  const __m256i s_mag = _mm256_and_si256(sb, abs_mask);
  const __m256i s_bits = _mm256_andnot_si256(_mm256_cmpeq_epi32(s_mag, zero), sb);  // -0 ties with +0
  const __m256i flip = _mm256_or_si256(_mm256_srai_epi32(s_bits, 31), _mm256_set1_epi32(static_cast<int>(0x80000000u)));
  const __m256i grow_key = _mm256_xor_si256(_mm256_xor_si256(s_bits, flip), _mm256_set1_epi32(-1));  // descending
  magnitude = _mm256_blendv_epi8(s_mag, w_mag, active);  // for the NaN test: > +inf's bits means NaN
  return _mm256_blendv_epi8(grow_key, w_mag, active);
}

// Pass 0 over [0, len): the first digit's histograms (prune: hist[0..2047], regrow: hist[2048..4095]).
// Returns the number of active elements; sets nan if any candidate is NaN.
__attribute__((target("avx2"))) int64_t pass0_f32_avx2(const float* w, const float* s, const bool* m, int64_t len,
                                                        int shift, uint32_t* hist, bool& nan) {
  __m256i worst = _mm256_setzero_si256();
  const __m256i regrow_offset = _mm256_set1_epi32(kBins);
  int64_t active_count = 0;
  alignas(32) uint32_t bins[8];
  int64_t j = 0;
  for (; j + 8 <= len; j += 8) {
    __m256i active, magnitude;
    int64_t mask_bytes;
    const __m256i key = keys8(w, s, m, j, active, mask_bytes, magnitude);
    worst = _mm256_max_epu32(worst, magnitude);
    const __m256i bin = _mm256_add_epi32(_mm256_srli_epi32(key, shift), _mm256_andnot_si256(active, regrow_offset));
    _mm256_store_si256(reinterpret_cast<__m256i*>(bins), bin);
    for (int lane = 0; lane < 8; ++lane) hist[bins[lane]]++;
    active_count += __builtin_popcountll(static_cast<uint64_t>(mask_bytes));
  }
  alignas(32) uint32_t lanes[8];
  _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), worst);
  for (uint32_t lane : lanes) nan |= lane > 0x7f800000u;
  for (; j < len; ++j) {
    const bool is_active = m[j];
    nan |= std::isnan(is_active ? w[j] : s[j]);
    const uint32_t key = is_active ? magnitude_key(w[j]) : score_key(s[j]);
    hist[(key >> shift) + (is_active ? 0 : kBins)]++;
    active_count += is_active;
  }
  return active_count;
}

// Pass 1 over [0, len): appends (base + i, key) of elements whose first digit is their selection's bin.
__attribute__((target("avx2"))) void extract_f32_avx2(const float* w, const float* s, const bool* m, int64_t len,
                                                       int64_t base, int shift, const int bin[2],
                                                       Candidate<uint32_t>* out[2]) {
  const __m256i prune_bin = _mm256_set1_epi32(bin[0]);
  const __m256i grow_bin = _mm256_set1_epi32(bin[1]);
  alignas(32) uint32_t keys[8];
  int64_t j = 0;
  for (; j + 8 <= len; j += 8) {
    __m256i active, magnitude;
    int64_t mask_bytes;
    const __m256i key = keys8(w, s, m, j, active, mask_bytes, magnitude);
    const __m256i hit = _mm256_cmpeq_epi32(_mm256_srli_epi32(key, shift), _mm256_blendv_epi8(grow_bin, prune_bin, active));
    unsigned bits = static_cast<unsigned>(_mm256_movemask_ps(_mm256_castsi256_ps(hit)));
    if (bits == 0) continue;
    _mm256_store_si256(reinterpret_cast<__m256i*>(keys), key);
    while (bits != 0) {
      const int lane = __builtin_ctz(bits);
      bits &= bits - 1;
      *out[m[j + lane] ? 0 : 1]++ = {base + j + lane, keys[lane]};
    }
  }
  for (; j < len; ++j) {
    const bool is_active = m[j];
    const uint32_t key = is_active ? magnitude_key(w[j]) : score_key(s[j]);
    if (static_cast<int>(key >> shift) == bin[is_active ? 0 : 1]) *out[is_active ? 0 : 1]++ = {base + j, key};
  }
}

// The 8 mask bytes (0/1) of an 8-bit lane mask.
struct ByteSpread {
  uint64_t table[256];
  ByteSpread() {
    for (int bits = 0; bits < 256; ++bits) {
      uint64_t bytes = 0;
      for (int lane = 0; lane < 8; ++lane) bytes |= static_cast<uint64_t>((bits >> lane) & 1) << (8 * lane);
      table[bits] = bytes;
    }
  }
};
const ByteSpread kByteSpread;

// Final pass over [0, len): new mask bytes and the picked positions. A lane picks when its key is below its
// selection's threshold, or equal to it while that selection still takes ties (in index order).
__attribute__((target("avx2"))) void final_f32_avx2(const float* w, const float* s, const bool* m, int64_t len,
                                                     int64_t base, const uint32_t threshold[2], const int64_t need[2],
                                                     int64_t ties_seen[2], bool* out, int64_t*& pruned,
                                                     int64_t*& regrown) {
  const __m256i sign = _mm256_set1_epi32(static_cast<int>(0x80000000u));
  const __m256i prune_t = _mm256_set1_epi32(static_cast<int>(threshold[0]));
  const __m256i grow_t = _mm256_set1_epi32(static_cast<int>(threshold[1]));
  alignas(32) uint32_t keys[8];
  const auto scalar = [&](int64_t i, uint32_t key, bool is_active) {
    const int sel = is_active ? 0 : 1;
    bool pick = key < threshold[sel];
    if (key == threshold[sel]) pick = ties_seen[sel]++ < need[sel];
    out[i] = is_active != pick;
    if (pick) *(is_active ? pruned++ : regrown++) = base + i;
  };
  int64_t j = 0;
  for (; j + 8 <= len; j += 8) {
    __m256i active, magnitude;
    int64_t mask_bytes;
    const __m256i key = keys8(w, s, m, j, active, mask_bytes, magnitude);
    const __m256i t = _mm256_blendv_epi8(grow_t, prune_t, active);
    const __m256i below = _mm256_cmpgt_epi32(_mm256_xor_si256(t, sign), _mm256_xor_si256(key, sign));  // unsigned
    const unsigned ties = static_cast<unsigned>(_mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpeq_epi32(key, t))));
    if (C10_UNLIKELY(ties != 0)) {  // lanes in order, so ties are taken by lowest index
      _mm256_store_si256(reinterpret_cast<__m256i*>(keys), key);
      for (int lane = 0; lane < 8; ++lane) scalar(j + lane, keys[lane], m[j + lane]);
      continue;
    }
    unsigned picks = static_cast<unsigned>(_mm256_movemask_ps(_mm256_castsi256_ps(below)));
    const uint64_t new_bytes = static_cast<uint64_t>(mask_bytes) ^ kByteSpread.table[picks];
    std::memcpy(out + j, &new_bytes, sizeof new_bytes);
    while (picks != 0) {
      const int lane = __builtin_ctz(picks);
      picks &= picks - 1;
      *(m[j + lane] ? pruned++ : regrown++) = base + j + lane;
    }
  }
  for (; j < len; ++j) {
    const bool is_active = m[j];
    scalar(j, is_active ? magnitude_key(w[j]) : score_key(s[j]), is_active);
  }
}
#endif

// Whether a chunk can take the AVX2 fp32 paths.
template <typename K>
bool use_f32_avx2(const Layer& layer) {
#if defined(FEDSPA_X86_DISPATCH)
  return sizeof(K) == 4 && layer.weights.scalar_type() == at::kFloat && layer.scores.scalar_type() == at::kFloat &&
         cpu_has_avx2_fma();
#else
  (void)layer;
  return false;
#endif
}

// Calls fn(i, key, active) for every element of a chunk, a block of keys at a time; on a NaN, calls
// on_nan(i, active) for the first offending element of the block (in index order) before continuing.
template <typename K, typename Fn, typename NanFn>
void for_each_key(const Layer& layer, const Chunk& chunk, const Fn& fn, const NanFn& on_nan) {
  using V = std::conditional_t<sizeof(K) == 4, float, double>;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, layer.weights.scalar_type(), "prune_regrow_w", [&] {
    using W = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, layer.scores.scalar_type(), "prune_regrow_s", [&] {
      const W* w = layer.weights.data_ptr<W>();
      const scalar_t* s = layer.scores.data_ptr<scalar_t>();
      const bool* m = layer.mask.data_ptr<bool>();
      K keys[kBlock];
      for (int64_t b = chunk.begin; b < chunk.end; b += kBlock) {
        const int64_t len = std::min(kBlock, chunk.end - b);
        const bool nan = block_keys<K, W, scalar_t>(w, s, m, b, len, keys);
        if (C10_UNLIKELY(nan)) {
          for (int64_t j = 0; j < len; ++j) {
            const bool active = m[b + j];
            if (std::isnan(active ? static_cast<V>(w[b + j]) : static_cast<V>(s[b + j]))) on_nan(b + j, active);
          }
        }
        for (int64_t j = 0; j < len; ++j) fn(b + j, keys[j], m[b + j]);
      }
    });
  });
}

template <typename K>
void run(std::vector<Layer>& layers) {
  constexpr int kCopies = 4;  // sub-histograms: consecutive keys often share a bin (similar exponents)
  const int shift0 = digit_shift<K>(0);
  std::vector<Chunk> chunks;
  std::vector<int64_t> first_chunk(layers.size() + 1);
  for (size_t l = 0; l < layers.size(); ++l) {
    first_chunk[l] = static_cast<int64_t>(chunks.size());
    for (int64_t b = 0; b < layers[l].n; b += kChunk) {
      chunks.push_back({static_cast<int64_t>(l), b, std::min(layers[l].n, b + kChunk)});
    }
  }
  const int64_t num_chunks = static_cast<int64_t>(chunks.size());
  first_chunk[layers.size()] = num_chunks;

  // Pass 0: first-digit histograms per chunk and selection (0: prune among active, 1: regrow among inactive),
  // active counts, first NaNs.
  std::vector<int64_t> hist(num_chunks * 2 * kBins);
  std::vector<int64_t> active(num_chunks, 0), nan_w(num_chunks, -1), nan_s(num_chunks, -1);
  at::parallel_for(0, num_chunks, 1, [&](int64_t c0, int64_t c1) {
    std::vector<uint32_t> local(kCopies * 2 * kBins);
    for (int64_t c = c0; c < c1; ++c) {
      std::fill(local.begin(), local.end(), 0u);
      int64_t count = 0;
      int64_t first_w = -1;
      int64_t first_s = -1;
      const Layer& layer = layers[chunks[c].layer];
#if defined(FEDSPA_X86_DISPATCH)
      if (use_f32_avx2<K>(layer)) {
        const int64_t b = chunks[c].begin;
        const bool* m = layer.mask.data_ptr<bool>() + b;
        const float* w = layer.weights.data_ptr<float>() + b;
        const float* sc = layer.scores.data_ptr<float>() + b;
        bool nan = false;
        count = pass0_f32_avx2(w, sc, m, chunks[c].end - b, shift0, local.data(), nan);
        if (C10_UNLIKELY(nan)) {
          for (int64_t i = 0; i < chunks[c].end - b; ++i) {
            if (std::isnan(m[i] ? w[i] : sc[i])) {
              int64_t& first = m[i] ? first_w : first_s;
              if (first < 0) first = b + i;
            }
          }
        }
      } else
#endif
      for_each_key<K>(
          layers[chunks[c].layer], chunks[c],
          [&](int64_t i, K key, bool is_active) {
            local[((i & (kCopies - 1)) * 2 + (is_active ? 0 : 1)) * kBins + (key >> shift0)]++;
            count += is_active;
          },
          [&](int64_t i, bool is_active) {
            int64_t& first = is_active ? first_w : first_s;
            if (first < 0) first = i;
          });
      int64_t* h = hist.data() + c * 2 * kBins;
      for (int b = 0; b < 2 * kBins; ++b) {
        int64_t sum = 0;
        for (int copy = 0; copy < kCopies; ++copy) sum += local[copy * 2 * kBins + b];
        h[b] = sum;
      }
      active[c] = count;
      nan_w[c] = first_w;
      nan_s[c] = first_s;
    }
  });

  // Per layer, in order: the counts, then NaNs (as the reference checks them), then the first digit.
  std::vector<Selection<K>> sel(2 * layers.size());
  std::vector<int64_t> merged(kBins);
  int64_t total_candidates = 0;
  for (size_t l = 0; l < layers.size(); ++l) {
    int64_t n_active = 0;
    int64_t bad_w = -1;
    int64_t bad_s = -1;
    for (int64_t c = first_chunk[l]; c < first_chunk[l + 1]; ++c) {
      n_active += active[c];
      if (bad_w < 0) bad_w = nan_w[c];
      if (bad_s < 0) bad_s = nan_s[c];
    }
    const int64_t k = layers[l].k;
    TORCH_CHECK_VALUE(k <= n_active, kOp, ": layer ", l, " drops ", k, " weights but has only ", n_active, " active");
    TORCH_CHECK_VALUE(k <= layers[l].n - n_active, kOp, ": layer ", l, " regrows ", k, " weights but has only ",
                      layers[l].n - n_active, " inactive positions");
    TORCH_CHECK_VALUE(bad_w < 0, kOp, ": layer ", l, " has a NaN weight at active position ", bad_w);
    TORCH_CHECK_VALUE(bad_s < 0, kOp, ": layer ", l, " has a NaN score at inactive position ", bad_s);
    for (int s = 0; s < 2; ++s) {
      Selection<K>& st = sel[2 * l + s];
      st.k = st.need = k;
      if (k == 0) continue;
      std::fill(merged.begin(), merged.end(), 0);
      for (int64_t c = first_chunk[l]; c < first_chunk[l + 1]; ++c) {
        const int64_t* h = hist.data() + (c * 2 + s) * kBins;
        for (int b = 0; b < kBins; ++b) merged[b] += h[b];
      }
      st.first_bin = choose_bin(merged.data(), st.need);
      st.begin = total_candidates;
      st.candidates = merged[st.first_bin];
      total_candidates += st.candidates;
    }
  }

  // Pass 1: copy the keys in each selection's first bin, with their positions, into one array: per selection
  // a contiguous range, in index order (chunk offsets come from the pass-0 histograms).
  std::vector<int64_t> cand_at(num_chunks * 2, 0);
  for (size_t l = 0; l < layers.size(); ++l) {
    for (int s = 0; s < 2; ++s) {
      const Selection<K>& st = sel[2 * l + s];
      int64_t at = st.begin;
      for (int64_t c = first_chunk[l]; c < first_chunk[l + 1]; ++c) {
        cand_at[c * 2 + s] = at;
        if (st.k > 0) at += hist[(c * 2 + s) * kBins + st.first_bin];
      }
    }
  }
  std::vector<Candidate<K>> cand(total_candidates + 1);  // +1: the branch-free append writes one past
  at::parallel_for(0, num_chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const Selection<K>& prune = sel[2 * chunks[c].layer];
      const Selection<K>& grow = sel[2 * chunks[c].layer + 1];
      if (prune.k == 0) continue;  // both selections share k
      Candidate<K>* out[2] = {cand.data() + cand_at[c * 2], cand.data() + cand_at[c * 2 + 1]};
      Candidate<K>* scratch = cand.data() + total_candidates;
      const int bin[2] = {prune.first_bin, grow.first_bin};
#if defined(FEDSPA_X86_DISPATCH)
      if constexpr (sizeof(K) == 4) {
        const Layer& layer = layers[chunks[c].layer];
        if (use_f32_avx2<K>(layer)) {
          const int64_t b = chunks[c].begin;
          extract_f32_avx2(layer.weights.data_ptr<float>() + b, layer.scores.data_ptr<float>() + b,
                           layer.mask.data_ptr<bool>() + b, chunks[c].end - b, b, shift0, bin, out);
          continue;
        }
      }
#endif
      for_each_key<K>(
          layers[chunks[c].layer], chunks[c],
          [&](int64_t i, K key, bool is_active) {
            const int s = is_active ? 0 : 1;
            const bool hit = static_cast<int>(key >> shift0) == bin[s];
            Candidate<K>*& dst = out[s];
            *(hit ? dst : scratch) = {i, key};
            dst += hit;
          },
          [](int64_t, bool) {});
    }
  });

  // The remaining digits, on each selection's candidates.
  at::parallel_for(0, static_cast<int64_t>(sel.size()), 1, [&](int64_t s0, int64_t s1) {
    std::vector<int64_t> h(kBins);
    for (int64_t si = s0; si < s1; ++si) {
      Selection<K>& st = sel[si];
      if (st.k == 0) continue;
      const Candidate<K>* first = cand.data() + st.begin;
      K prefix = static_cast<K>(static_cast<K>(st.first_bin) << shift0);
      for (int pass = 1; pass < num_digits<K>(); ++pass) {
        const int high = digit_shift<K>(pass - 1);
        const int shift = digit_shift<K>(pass);
        const K dmask = digit_mask<K>(pass);
        std::fill(h.begin(), h.end(), 0);
        for (int64_t j = 0; j < st.candidates; ++j) {
          const K key = first[j].key;
          if ((key >> high) == (prefix >> high)) h[(key >> shift) & dmask]++;
        }
        prefix |= static_cast<K>(static_cast<K>(choose_bin(h.data(), st.need)) << shift);
      }
      st.threshold = prefix;
    }
  });

  // How many each chunk picks, and where its picks go: keys in lower first-digit bins, candidates below the
  // threshold, and its share of the first `need` ties (in index order).
  std::vector<int64_t> write_at(num_chunks * 2, 0), ties_before(num_chunks * 2, 0);
  for (size_t l = 0; l < layers.size(); ++l) {
    for (int s = 0; s < 2; ++s) {
      const Selection<K>& st = sel[2 * l + s];
      if (st.k == 0) continue;
      int64_t written = 0;
      int64_t ties = 0;
      for (int64_t c = first_chunk[l]; c < first_chunk[l + 1]; ++c) {
        const int64_t* h = hist.data() + (c * 2 + s) * kBins;
        int64_t picks = 0;
        for (int b = 0; b < st.first_bin; ++b) picks += h[b];
        int64_t chunk_ties = 0;
        const Candidate<K>* first = cand.data() + cand_at[c * 2 + s];
        for (int64_t j = 0; j < h[st.first_bin]; ++j) {
          picks += first[j].key < st.threshold;
          chunk_ties += first[j].key == st.threshold;
        }
        picks += std::min(std::max<int64_t>(st.need - ties, 0), chunk_ties);
        write_at[c * 2 + s] = written;
        ties_before[c * 2 + s] = ties;
        written += picks;
        ties += chunk_ties;
      }
      TORCH_INTERNAL_ASSERT(written == st.k, "prune_regrow: selected ", written, " instead of ", st.k);
    }
  }

  // Final pass: the new masks and the pruned/regrown positions (ascending).
  at::parallel_for(0, num_chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      Layer& layer = layers[chunks[c].layer];
      const Selection<K>& prune = sel[2 * chunks[c].layer];
      const Selection<K>& grow = sel[2 * chunks[c].layer + 1];
      const bool* m = layer.mask.data_ptr<bool>();
      bool* out = layer.new_mask.data_ptr<bool>();
      if (prune.k == 0) {
        std::copy(m + chunks[c].begin, m + chunks[c].end, out + chunks[c].begin);
        continue;
      }
      int64_t* pruned = layer.pruned.data_ptr<int64_t>() + write_at[c * 2];
      int64_t* regrown = layer.regrown.data_ptr<int64_t>() + write_at[c * 2 + 1];
      int64_t ties_seen[2] = {ties_before[c * 2], ties_before[c * 2 + 1]};
      const K threshold[2] = {prune.threshold, grow.threshold};
      const int64_t need[2] = {prune.need, grow.need};
#if defined(FEDSPA_X86_DISPATCH)
      if constexpr (sizeof(K) == 4) {
        if (use_f32_avx2<K>(layer)) {
          const int64_t b = chunks[c].begin;
          final_f32_avx2(layer.weights.data_ptr<float>() + b, layer.scores.data_ptr<float>() + b,
                         layer.mask.data_ptr<bool>() + b, chunks[c].end - b, b, threshold, need, ties_seen,
                         out + b, pruned, regrown);
          continue;
        }
      }
#endif
      for_each_key<K>(
          layer, chunks[c],
          [&](int64_t i, K key, bool is_active) {
            const int s = is_active ? 0 : 1;
            bool pick = key < threshold[s];
            if (C10_UNLIKELY(key == threshold[s])) pick = ties_seen[s]++ < need[s];
            out[i] = is_active != pick;  // active: kept unless pruned; inactive: set if regrown
            if (pick) *(is_active ? pruned++ : regrown++) = i;
          },
          [](int64_t, bool) {});
    }
  });
}

std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>> prune_regrow_cpu(
    at::TensorList weights, at::TensorList masks, at::TensorList scores, at::IntArrayRef drop_counts) {
  const bool wide = check_prune_regrow_inputs(kOp, weights, masks, scores, drop_counts);
  const size_t num = weights.size();
  std::vector<Layer> layers(num);
  for (size_t l = 0; l < num; ++l) {
    const at::Tensor& w = weights[l];
    const at::Tensor& m = masks[l];
    const at::Tensor& s = scores[l];
    Layer& layer = layers[l];
    layer.weights = w.contiguous();
    layer.mask = m.contiguous();
    layer.scores = s.contiguous();
    layer.n = w.numel();
    layer.k = drop_counts[l];
    layer.new_mask = at::empty_like(m, at::MemoryFormat::Contiguous);
    layer.pruned = at::empty({layer.k}, m.options().dtype(at::kLong));
    layer.regrown = at::empty({layer.k}, m.options().dtype(at::kLong));
  }
  if (wide) {
    run<uint64_t>(layers);
  } else {
    run<uint32_t>(layers);
  }
  std::vector<at::Tensor> new_masks, pruned, regrown;
  for (Layer& layer : layers) {
    new_masks.push_back(layer.new_mask);
    pruned.push_back(layer.pruned);
    regrown.push_back(layer.regrown);
  }
  return {new_masks, pruned, regrown};
}

}  // namespace

TORCH_LIBRARY_IMPL(fedspa, CPU, m) { m.impl("prune_regrow", &prune_regrow_cpu); }

}  // namespace fedspa
