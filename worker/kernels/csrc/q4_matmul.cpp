// int4 weights for worker/kernels/quantized_weights.py (Int4Linear): the matmul of every step
// and the dequantization of row blocks (an embedding lookup, steps without these kernels' build).
//
// Layout (ours): the rows in tiles of 16 (the last tile padded with zero rows), and each tile's
// weights by group of 32 along the input: packed [N / 16, K / 32, 256] uint8, where byte
// 64 k + 4 l + i of block (tile t, group g) holds weight 32 g + 4 k + i of row 16 t + l in its
// low nibble and weight 32 g + 16 + 4 k + i in its high one. So a 64-byte load holds 4
// consecutive weights of each of 16 rows, one per 32-bit lane: AVX-512 VNNI's vpdpbusd
// multiplies them by 4 activations broadcast to every lane and adds each lane's 4 products
// into its int32, and 8 of them sum a group for 16 rows at once; the group's scale is applied
// once per 16 rows, not once per 8 lanes of one row. scales, mins: [N / 16, K / 32, 16] fp16,
// weight = q * scale + min; mins empty: the symmetric form (GGUF's Q4_0), min = -8 * scale,
// 4.5 bits a weight instead of 5.
//
// A step (rows x): x is quantized per group of 32 to int8 with one fp32 scale (as llama.cpp's
// Q8 activations; quantized_rows.h), then for each row and group the integer dot product
// sum_j q_j xq_j, so
//   y = sum_g scale_g * dx_g * (sum_j q_j xq_j) + min_g * dx_g * (sum_j xq_j).
// A tile's groups are unpacked once for up to 16 activation rows, laid out group by group
// (RowChunk). In the symmetric form the min term is an integer, -8 * sum_j xq_j, which starts
// the dot product's sum (one fma a row and group fewer). With the former row-major
// layout (a row's 64 weights per vpdpbusd, the scale applied per 8 lanes), a step of 8 rows
// took 5.5x one row's time on a 1B model's 8192 x 2048 weight, every row past the first paid in
// instructions, not bytes. Without VNNI a portable loop computes the same sums.
#include <torch/extension.h>

#include <omp.h>

#include "quantized_rows.h"

#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <utility>
#include <vector>


namespace {

using namespace edgelora;

constexpr int64_t kRun = 64;  // weights per packed run: two groups
inline float half_to_float(c10::Half h) { return static_cast<float>(h); }

// min / scale in the symmetric form (worker/kernels/quantized_weights.py, Q4_0_ZERO)
constexpr float kSymmetricMin = -8.f;

// group g's min: stored, or kSymmetricMin * scale in the symmetric form (mins == nullptr)
inline float min_of(const c10::Half* scales, const c10::Half* mins, int64_t g) {
  return mins ? half_to_float(mins[g]) : kSymmetricMin * half_to_float(scales[g]);
}

constexpr int64_t kBlock = kTile * kGroup / 2;  // bytes of one tile's group

// One tile: out[c][l] = sum over groups of row l's weights . activation row c of x (C rows).
template <int C, bool Symmetric>
void tile_dot(const uint8_t* w, const c10::Half* scales, const c10::Half* mins,
              const RowChunk& x, int64_t groups, float* out) {
#if defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__AVX512VL__)
  const __m512i nibble = _mm512_set1_epi8(0x0F);
  __m512 acc[C];
  for (int c = 0; c < C; ++c) acc[c] = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    const uint8_t* block = w + g * kBlock;
    __m512i lo[4], hi[4];
    for (int k = 0; k < 4; ++k) {
      prefetch(block + 64 * k);
      const __m512i v = _mm512_loadu_si512(block + 64 * k);
      lo[k] = _mm512_and_si512(v, nibble);
      hi[k] = _mm512_and_si512(_mm512_srli_epi16(v, 4), nibble);
    }
    const __m512 s = _mm512_cvtph_ps(
        _mm256_loadu_si256(reinterpret_cast<const __m256i*>(scales + g * kTile)));
    const int8_t* xq = x.q.data() + g * C * kGroup;
    const int64_t at = g * C;
    for (int c = 0; c < C; ++c) {
      const int8_t* xc = xq + c * kGroup;  // activations 4 k + i (lo) and 16 + 4 k + i (hi)
      __m512i dot_lo = Symmetric ? _mm512_set1_epi32(x.offset[at + c]) : _mm512_setzero_si512();
      __m512i dot_hi = _mm512_setzero_si512();
      for (int k = 0; k < 4; ++k) {
        dot_lo = _mm512_dpbusd_epi32(dot_lo, lo[k], broadcast4(xc + 4 * k));
        dot_hi = _mm512_dpbusd_epi32(dot_hi, hi[k], broadcast4(xc + 16 + 4 * k));
      }
      const __m512 dot = _mm512_cvtepi32_ps(_mm512_add_epi32(dot_lo, dot_hi));
      acc[c] = _mm512_fmadd_ps(_mm512_mul_ps(s, _mm512_set1_ps(x.scale[at + c])), dot, acc[c]);
      if constexpr (!Symmetric) {
        const __m512 m = _mm512_cvtph_ps(
            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(mins + g * kTile)));
        acc[c] = _mm512_fmadd_ps(m, _mm512_set1_ps(x.sum[at + c]), acc[c]);
      }
    }
  }
  for (int c = 0; c < C; ++c) _mm512_storeu_ps(out + c * kTile, acc[c]);
#else
  for (int c = 0; c < C; ++c) {
    for (int64_t l = 0; l < kTile; ++l) {
      float total = 0.f;
      for (int64_t g = 0; g < groups; ++g) {
        const uint8_t* block = w + g * kBlock;
        const int64_t at = g * C + c;
        const int8_t* xq = x.q.data() + at * kGroup;
        int32_t dot = Symmetric ? x.offset[at] : 0;
        for (int64_t k = 0; k < 4; ++k) {
          for (int64_t i = 0; i < 4; ++i) {
            const uint8_t b = block[64 * k + 4 * l + i];
            dot += static_cast<int32_t>(b & 0x0F) * xq[4 * k + i] +
                   static_cast<int32_t>(b >> 4) * xq[16 + 4 * k + i];
          }
        }
        const float s = half_to_float(scales[g * kTile + l]);
        total = std::fma(s * x.scale[at], static_cast<float>(dot), total);
        if constexpr (!Symmetric) {
          total = std::fma(half_to_float(mins[g * kTile + l]), x.sum[at], total);
        }
      }
      out[c * kTile + l] = total;
    }
  }
#endif
}

using TileDot = void (*)(const uint8_t*, const c10::Half*, const c10::Half*, const RowChunk&,
                         int64_t, float*);

template <bool Symmetric, int... C>
std::array<TileDot, sizeof...(C)> tile_dots(std::integer_sequence<int, C...>) {
  return {&tile_dot<C + 1, Symmetric>...};
}

void check(const torch::Tensor& packed, const torch::Tensor& scales, const torch::Tensor& mins,
           int64_t k, int64_t n) {
  TORCH_CHECK(packed.is_contiguous() && scales.is_contiguous() && mins.is_contiguous());
  TORCH_CHECK(packed.scalar_type() == torch::kUInt8 && scales.scalar_type() == torch::kHalf &&
              mins.scalar_type() == torch::kHalf);
  TORCH_CHECK(packed.dim() == 3 && scales.dim() == 3, "tiled int4 weights");
  TORCH_CHECK(k % kRun == 0 && packed.size(1) * kGroup == k && packed.size(2) == kBlock &&
              scales.size(0) == packed.size(0) && scales.size(1) == packed.size(1) &&
              scales.size(2) == kTile && (mins.numel() == 0 || mins.sizes() == scales.sizes()));
  TORCH_CHECK(n >= 0 && n <= packed.size(0) * kTile, "more rows than the tiles hold");
}

const c10::Half* mins_or_null(const torch::Tensor& mins) {
  return mins.numel() == 0 ? nullptr : mins.data_ptr<c10::Half>();
}

}  // namespace

// y [M, n] bf16 = x [M, K] bf16 @ W^T, W's n rows in our tiled int4 layout (above), x quantized
// per group.
torch::Tensor q4_matmul(torch::Tensor x, torch::Tensor packed, torch::Tensor scales,
                        torch::Tensor mins, int64_t n) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.scalar_type() == torch::kBFloat16);
  const int64_t m = x.size(0), k = x.size(1), groups = k / kGroup;
  check(packed, scales, mins, k, n);
  auto y = torch::empty({m, n}, x.options());
  const uint8_t* w = packed.data_ptr<uint8_t>();
  const c10::Half* s = scales.data_ptr<c10::Half>();
  const c10::Half* mn = mins_or_null(mins);
  c10::BFloat16* out = y.data_ptr<c10::BFloat16>();
  const int64_t tiles = (n + kTile - 1) / kTile;
  const std::vector<RowChunk> chunks = chunks_of(x, -static_cast<int32_t>(kSymmetricMin));
  static const auto symmetric = tile_dots<true>(std::make_integer_sequence<int, kMaxRows>{});
  static const auto asymmetric = tile_dots<false>(std::make_integer_sequence<int, kMaxRows>{});
  const auto& dots_of = mn ? asymmetric : symmetric;
  // Tiles split across threads: each thread streams its share of the weights once, for every
  // activation row (a tile's group, 256 bytes, stays in L1 across them).
#pragma omp parallel for schedule(static)
  for (int64_t t = 0; t < tiles; ++t) {
    const uint8_t* wt = w + t * groups * kBlock;
    const c10::Half *st = s + t * groups * kTile, *mt = mn ? mn + t * groups * kTile : nullptr;
    const int64_t valid = std::min(kTile, n - t * kTile);
    float dots[kMaxRows * kTile];
    for (size_t ci = 0; ci < chunks.size(); ++ci) {
      const RowChunk& chunk = chunks[ci];
      dots_of[chunk.rows - 1](wt, st, mt, chunk, groups, dots);
      for (int j = 0; j < chunk.rows; ++j) {
        c10::BFloat16* row = out + (ci * kMaxRows + j) * n + t * kTile;
        for (int64_t l = 0; l < valid; ++l) row[l] = c10::BFloat16(dots[j * kTile + l]);
      }
    }
  }
  return y;
}

// out [r, K] bf16 = rows [start, start + r) of W dequantized: q * scale + min, rounded once.
void dequantize_q4_(torch::Tensor out, torch::Tensor packed, torch::Tensor scales,
                    torch::Tensor mins, int64_t start) {
  TORCH_CHECK(out.is_contiguous() && out.scalar_type() == torch::kBFloat16);
  const int64_t r = out.size(0), k = out.size(1), groups = k / kGroup;
  check(packed, scales, mins, k, 0);
  TORCH_CHECK(start >= 0 && start + r <= packed.size(0) * kTile);
  const uint8_t* w = packed.data_ptr<uint8_t>();
  const c10::Half* s = scales.data_ptr<c10::Half>();
  const c10::Half* mn = mins_or_null(mins);
  c10::BFloat16* o = out.data_ptr<c10::BFloat16>();
#pragma omp parallel for schedule(static) if (r > 1)
  for (int64_t row = 0; row < r; ++row) {
    const int64_t t = (start + row) / kTile, l = (start + row) % kTile;
    for (int64_t g = 0; g < groups; ++g) {
      const uint8_t* block = w + (t * groups + g) * kBlock + 4 * l;
      const int64_t at = (t * groups + g) * kTile + l;
      const float sg = half_to_float(s[at]), mg = min_of(s, mn, at);
      c10::BFloat16* dst = o + row * k + g * kGroup;
#if defined(__AVX512F__)
      // the row's 4 bytes of each of the block's 4 vectors: its weights 0-15 in the low
      // nibbles, 16-31 in the high ones
      int32_t four[4];
      for (int64_t kk = 0; kk < 4; ++kk) std::memcpy(four + kk, block + 64 * kk, 4);
      const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(four));
      const __m128i nibble = _mm_set1_epi8(0x0F);
      const __m512 vs = _mm512_set1_ps(sg), vm = _mm512_set1_ps(mg);
      for (int half = 0; half < 2; ++half) {
        const __m128i q = _mm_and_si128(half ? _mm_srli_epi16(bytes, 4) : bytes, nibble);
        edgelora::store16(dst + 16 * half, _mm512_fmadd_ps(
            _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(q)), vs, vm));
      }
#else
      for (int64_t kk = 0; kk < 4; ++kk) {
        for (int64_t i = 0; i < 4; ++i) {
          const uint8_t b = block[64 * kk + i];
          dst[4 * kk + i] = c10::BFloat16(static_cast<float>(b & 0x0F) * sg + mg);
          dst[16 + 4 * kk + i] = c10::BFloat16(static_cast<float>(b >> 4) * sg + mg);
        }
      }
#endif
    }
  }
}
