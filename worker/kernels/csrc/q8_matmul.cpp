// int8 weights for worker/kernels/quantized_weights.py (Int8Linear): the matmul of every step
// and the dequantization of row blocks (an embedding lookup, steps without these kernels' build).
//
// Layout: int4's tiles (q4_matmul.cpp) with whole bytes, the rows in tiles of 16 (the last
// padded with zero rows) and each tile's weights by group of 32 along the input: packed
// [N / 16, K / 32, 512] int8, byte 64 k + 4 l + i of block (tile t, group g) holding weight
// 32 g + 4 k + i of row 16 t + l; one scale per row, bf16 [N]. A 64-byte load holds 4
// consecutive weights of 16 rows, one vpdpbusd multiplies them by 4 activations broadcast to
// every lane, 8 of them a group. Row by row (a row's 64 weights a vpdpbusd, the activation
// scales permuted onto its lanes), 16 rows took 2.3-2.6x the tiles' time.
#include <torch/extension.h>

#include <omp.h>

#include "quantized_rows.h"

#include <array>
#include <cstdint>
#include <cstring>
#include <utility>
#include <vector>

namespace {

using namespace edgelora;

constexpr int64_t kBlock8 = kTile * kGroup;  // bytes of one tile's group of int8 weights
constexpr int32_t kInt8Zero = 128;  // vpdpbusd reads unsigned weights: q ^ 0x80 = q + 128

// int8 weights in tiles (the int4 layout with whole bytes): one tile's group is 8 vectors of
// 64 bytes, byte 64 k + 4 l + i holding weight 32 g + 4 k + i of row l.
// out[c][l] = sum over groups of dx_g * (row l's weights . activation row c), the rows' scales
// applied by the caller.
template <int C>
void tile_dot8(const int8_t* w, const RowChunk& x, int64_t groups, float* out) {
#if defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__AVX512VL__)
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  __m512 acc[C];
  for (int c = 0; c < C; ++c) acc[c] = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    const int8_t* block = w + g * kBlock8;
    __m512i v[8];
    for (int k = 0; k < 8; ++k) {
      // one row streams faster on the hardware prefetcher alone (0.8x the time on 8192 x 2048),
      // several fall behind it (16 rows: 0.6x the time with it)
      if constexpr (C > 1) prefetch(block + 64 * k);
      v[k] = _mm512_xor_si512(_mm512_loadu_si512(block + 64 * k), flip);
    }
    const int8_t* xq = x.q.data() + g * C * kGroup;
    const int64_t at = g * C;
    for (int c = 0; c < C; ++c) {
      const int8_t* xc = xq + c * kGroup;
      __m512i dot = _mm512_set1_epi32(x.offset[at + c]);  // -128 * sum of xq: q . xq, exact
      for (int k = 0; k < 8; ++k) dot = _mm512_dpbusd_epi32(dot, v[k], broadcast4(xc + 4 * k));
      acc[c] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_set1_ps(x.scale[at + c]), acc[c]);
    }
  }
  for (int c = 0; c < C; ++c) _mm512_storeu_ps(out + c * kTile, acc[c]);
#else
  for (int c = 0; c < C; ++c) {
    for (int64_t l = 0; l < kTile; ++l) {
      float total = 0.f;
      for (int64_t g = 0; g < groups; ++g) {
        const int8_t* block = w + g * kBlock8;
        const int64_t at = g * C + c;
        const int8_t* xq = x.q.data() + at * kGroup;
        int32_t dot = 0;
        for (int64_t k = 0; k < 8; ++k) {
          for (int64_t i = 0; i < 4; ++i) dot += int32_t(block[64 * k + 4 * l + i]) * xq[4 * k + i];
        }
        total = std::fma(static_cast<float>(dot), x.scale[at], total);
      }
      out[c * kTile + l] = total;
    }
  }
#endif
}

using TileDot8 = void (*)(const int8_t*, const RowChunk&, int64_t, float*);

template <int... C>
std::array<TileDot8, sizeof...(C)> tile_dots8(std::integer_sequence<int, C...>) {
  return {&tile_dot8<C + 1>...};
}

}  // namespace

// y [M, n] bf16 = x [M, K] bf16 @ (W * scales [n])^T, W's n rows int8 in tiles (tile_dot8:
// packed [N / 16, K / 32, 512]), x quantized per group of 32.
torch::Tensor q8_matmul(torch::Tensor x, torch::Tensor packed, torch::Tensor scales) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.scalar_type() == torch::kBFloat16);
  TORCH_CHECK(packed.is_contiguous() && packed.scalar_type() == torch::kInt8 &&
              packed.dim() == 3 && scales.is_contiguous() &&
              scales.scalar_type() == torch::kBFloat16, "tiled int8 weights, bf16 scales");
  const int64_t m = x.size(0), k = x.size(1), n = scales.size(0), groups = k / kGroup;
  TORCH_CHECK(k % kGroup == 0 && packed.size(1) * kGroup == k && packed.size(2) == kBlock8 &&
              n <= packed.size(0) * kTile, "int8 tiles that do not match x or the scales");
  const std::vector<RowChunk> chunks = chunks_of(x, kInt8Zero);
  static const auto dots_of = tile_dots8(std::make_integer_sequence<int, kMaxRows>{});
  auto y = torch::empty({m, n}, x.options());
  const int8_t* w = packed.data_ptr<int8_t>();
  const c10::BFloat16* s = scales.data_ptr<c10::BFloat16>();
  c10::BFloat16* out = y.data_ptr<c10::BFloat16>();
  const int64_t tiles = (n + kTile - 1) / kTile;
#pragma omp parallel for schedule(static)
  for (int64_t t = 0; t < tiles; ++t) {
    const int64_t valid = std::min(kTile, n - t * kTile);
    float dots[kMaxRows * kTile];
    for (size_t ci = 0; ci < chunks.size(); ++ci) {
      const RowChunk& chunk = chunks[ci];
      dots_of[chunk.rows - 1](w + t * groups * kBlock8, chunk, groups, dots);
      for (int j = 0; j < chunk.rows; ++j) {
        c10::BFloat16* row = out + (ci * kMaxRows + j) * n + t * kTile;
        for (int64_t l = 0; l < valid; ++l) {
          row[l] = c10::BFloat16(dots[j * kTile + l] * static_cast<float>(s[t * kTile + l]));
        }
      }
    }
  }
  return y;
}

// out [n, K] bf16 = rows [start, start + n) of W * scales[row]; W int8 in tiles, packed
// [N / 16, K / 32, 512]: byte 64 k + 4 l + i of block (tile, group g) is weight 32 g + 4 k + i
// of the tile's row l.
void dequantize_int8_(torch::Tensor out, torch::Tensor packed, torch::Tensor scales,
                      int64_t start) {
  TORCH_CHECK(packed.is_contiguous() && out.is_contiguous() && scales.is_contiguous());
  TORCH_CHECK(out.scalar_type() == torch::kBFloat16 && scales.scalar_type() == torch::kBFloat16 &&
              packed.scalar_type() == torch::kInt8 && packed.dim() == 3);
  const int64_t n = out.size(0), k = out.size(1), groups = k / kGroup;
  TORCH_CHECK(k % kGroup == 0 && packed.size(1) == groups && packed.size(2) == kBlock8);
  TORCH_CHECK(start >= 0 && start + n <= scales.size(0) &&
              scales.size(0) <= packed.size(0) * kTile);
  const int8_t* w = packed.data_ptr<int8_t>();
  const c10::BFloat16* s = scales.data_ptr<c10::BFloat16>();
  c10::BFloat16* o = out.data_ptr<c10::BFloat16>();
#pragma omp parallel for schedule(static) if (n > 1)
  for (int64_t r = 0; r < n; ++r) {
    const int64_t row = start + r, t = row / kTile, l = row % kTile;
    const float scale = static_cast<float>(s[row]);
    c10::BFloat16* dst = o + r * k;
    for (int64_t g = 0; g < groups; ++g) {
      const int8_t* block = w + (t * groups + g) * kBlock8 + 4 * l;
      int8_t q[kGroup];  // the row's 4 bytes of each of the group's 8 vectors, in order
      for (int64_t v = 0; v < kGroup / 4; ++v) std::memcpy(q + 4 * v, block + 64 * v, 4);
      for (int64_t j = 0; j < kGroup; ++j) {
        dst[g * kGroup + j] = c10::BFloat16(static_cast<float>(q[j]) * scale);
      }
    }
  }
}
