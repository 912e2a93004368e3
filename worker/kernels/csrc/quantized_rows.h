// The activations of the quantized matmuls (q4_matmul.cpp, q8_matmul.cpp): each row quantized
// per group of 32 to int8 with one fp32 scale (as llama.cpp's Q8 activations), and up to
// kMaxRows rows laid out group by group for the kernels that multiply them by a tile of 16
// weight rows. Also what both kernels read their weights with.
#pragma once

#include <torch/extension.h>

#include "simd.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace edgelora {

constexpr int64_t kGroup = 32;  // activations (and int4 weights) per scale
constexpr int64_t kTile = 16;   // weight rows per tile: one per 32-bit lane
constexpr int kMaxRows = 16;    // activation rows per pass over a tile

// Bytes ahead of the read at which each thread asks for its weights: the hardware prefetcher
// alone left a decode step's stream at 27 GB/s of this VM's ~33 (two threads, a 1B model's
// shapes); 4096 ahead read at 32 GB/s (1024: 28, 8192: 30).
// Non-temporal: each weight is read once a step, and a decode step streams ~700 MB through
// the caches between its small ops, which then run cold; asking for the weights as
// non-temporal keeps some of the caches for them (1B at batch 1: 1-3% shorter steps, in each
// of three A/B runs of 5-10 rounds; 8192 ahead or a T1 hint: no better than T0 at 4096).
// That is AMD EPYC (Zen 4). On an Intel Xeon (AMX) the hardware prefetcher alone streamed faster
// at every step size, so whether to ask is set once at load, by CPU (worker/kernels/cpu.py).
constexpr int64_t kPrefetchBytes = 4096;
inline bool weight_prefetch = true;  // set_weight_prefetch

inline void prefetch(const void* p) {
#if defined(__x86_64__)
  if (weight_prefetch) _mm_prefetch(static_cast<const char*>(p) + kPrefetchBytes, _MM_HINT_NTA);
#else
  (void)p;
#endif
}

struct QuantizedRow {  // one activation row, quantized per group
  std::vector<int8_t> q;       // [K]
  std::vector<float> scale;    // [K / 32]
  std::vector<float> sum;      // [K / 32]: scale * sum of q, the min term's factor
  std::vector<int32_t> total;  // [K / 32]: sum of q
};

inline void quantize_row(const c10::BFloat16* x, int64_t k, QuantizedRow& out) {
  const int64_t groups = k / kGroup;
  out.q.resize(k);
  out.scale.resize(groups);
  out.sum.resize(groups);
  out.total.resize(groups);
  for (int64_t g = 0; g < groups; ++g) {
    const c10::BFloat16* xg = x + g * kGroup;
#if defined(__AVX512F__) && defined(__AVX512BW__)
    const __m512 a = edgelora::load16(xg), b = edgelora::load16(xg + 16);
    const float amax = _mm512_reduce_max_ps(
        _mm512_max_ps(_mm512_abs_ps(a), _mm512_abs_ps(b)));
    const __m512 inv = _mm512_set1_ps(amax > 0.f ? 127.f / amax : 0.f);
    // round to nearest even (the default rounding mode), as std::nearbyint below
    const __m512i qa = _mm512_cvtps_epi32(_mm512_mul_ps(a, inv));
    const __m512i qb = _mm512_cvtps_epi32(_mm512_mul_ps(b, inv));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out.q.data() + g * kGroup),
                     _mm512_cvtsepi32_epi8(qa));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out.q.data() + g * kGroup + 16),
                     _mm512_cvtsepi32_epi8(qb));
    const int32_t total = _mm512_reduce_add_epi32(_mm512_add_epi32(qa, qb));
#else
    float amax = 0.f;
    for (int64_t j = 0; j < kGroup; ++j) amax = std::max(amax, std::fabs(float(xg[j])));
    const float inv = amax > 0.f ? 127.f / amax : 0.f;
    int32_t total = 0;
    for (int64_t j = 0; j < kGroup; ++j) {
      const int32_t v = static_cast<int32_t>(std::nearbyint(float(xg[j]) * inv));
      out.q[g * kGroup + j] = static_cast<int8_t>(v);
      total += v;
    }
#endif
    out.scale[g] = amax / 127.f;
    out.sum[g] = out.scale[g] * static_cast<float>(total);
    out.total[g] = total;
  }
}

// Up to kMaxRows quantized activation rows laid out for tile_dot: by group, then row, so one
// pointer reaches every row's values of a group at fixed offsets (a pointer per row, and the
// scalar loads and shifts that fed vpdpbusd's broadcasts from them, were most of the kernel's
// instructions at 8 rows).
struct RowChunk {
  std::vector<int8_t> q;        // [groups][rows][32]
  std::vector<float> scale;     // [groups][rows]
  std::vector<float> sum;       // [groups][rows]: scale * sum of q, the min term's factor
  std::vector<int32_t> offset;  // [groups][rows]: -zero * sum of q (chunk_of)
  int rows = 0;
};

// zero: the weights' offset as the kernel reads them (q - zero is the weight), whose
// -zero * sum of q starts each row and group's integer dot product
inline RowChunk chunk_of(const QuantizedRow* x, int rows, int64_t groups, int32_t zero) {
  RowChunk c;
  c.rows = rows;
  c.q.resize(groups * rows * kGroup);
  c.scale.resize(groups * rows);
  c.sum.resize(groups * rows);
  c.offset.resize(groups * rows);
  for (int64_t g = 0; g < groups; ++g) {
    for (int r = 0; r < rows; ++r) {
      const int64_t at = g * rows + r;
      std::memcpy(c.q.data() + at * kGroup, x[r].q.data() + g * kGroup, kGroup);
      c.scale[at] = x[r].scale[g];
      c.sum[at] = x[r].sum[g];
      c.offset[at] = -zero * x[r].total[g];
    }
  }
  return c;
}

#if defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__AVX512VL__)
// 4 activations broadcast to every 32-bit lane, read from memory (an embedded broadcast)
inline __m512i broadcast4(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, sizeof(v));
  return _mm512_set1_epi32(v);
}
#endif

// The activation rows x [M, K] bf16 quantized per group and laid out for the tile kernels.
inline std::vector<RowChunk> chunks_of(const torch::Tensor& x, int32_t zero) {
  const int64_t m = x.size(0), k = x.size(1);
  std::vector<QuantizedRow> rows(m);
  for (int64_t i = 0; i < m; ++i) quantize_row(x.data_ptr<c10::BFloat16>() + i * k, k, rows[i]);
  std::vector<RowChunk> chunks;
  for (int64_t i = 0; i < m; i += kMaxRows) {
    chunks.push_back(
        chunk_of(rows.data() + i, std::min<int64_t>(kMaxRows, m - i), k / kGroup, zero));
  }
  return chunks;
}

}  // namespace edgelora
