// int4 weights for worker/quantized_weights.py (Int4Linear): the small-step matmul and the
// dequantization of row blocks for large steps.
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
// Small steps (a few rows x): x is quantized per group of 32 to int8 with one fp32 scale (as
// llama.cpp's Q8 activations), then for each row and group the integer dot product
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

#include "simd.h"

#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <utility>
#include <vector>


namespace {

constexpr int64_t kGroup = 32;
constexpr int64_t kRun = 64;  // weights per packed run: two groups
// Bytes ahead of the read at which each thread asks for its weights: the hardware prefetcher
// alone left a decode step's stream at 27 GB/s of this VM's ~33 (two threads, a 1B model's
// shapes); 4096 ahead read at 32 GB/s (1024: 28, 8192: 30). Not for int8 weights, whose
// stream (a line a run) the hardware prefetcher keeps at ~37 GB/s (prefetching: 34).
// Non-temporal: each weight is read once a step, and a decode step streams ~700 MB through
// the caches between its small ops, which then run cold; asking for the weights as
// non-temporal keeps some of the caches for them (1B at batch 1: 1-3% shorter steps, in each
// of three A/B runs of 5-10 rounds; 8192 ahead or a T1 hint: no better than T0 at 4096).
constexpr int64_t kPrefetchBytes = 4096;

inline void prefetch(const void* p) {
#if defined(__x86_64__)
  _mm_prefetch(static_cast<const char*>(p) + kPrefetchBytes, _MM_HINT_NTA);
#else
  (void)p;
#endif
}

inline float half_to_float(c10::Half h) { return static_cast<float>(h); }

// min / scale in the symmetric form (worker/quantized_weights.py, Q4_0_ZERO)
constexpr float kSymmetricMin = -8.f;

// group g's min: stored, or kSymmetricMin * scale in the symmetric form (mins == nullptr)
inline float min_of(const c10::Half* scales, const c10::Half* mins, int64_t g) {
  return mins ? half_to_float(mins[g]) : kSymmetricMin * half_to_float(scales[g]);
}

struct QuantizedRow {  // one activation row, quantized per group
  std::vector<int8_t> q;       // [K]
  std::vector<float> scale;    // [K / 32]
  std::vector<float> sum;      // [K / 32]: scale * sum of q, the min term's factor
  std::vector<int32_t> total;  // [K / 32]: sum of q
};

void quantize_row(const c10::BFloat16* x, int64_t k, QuantizedRow& out) {
  const int64_t groups = k / kGroup;
  out.q.resize(k);
  out.scale.assign(groups + 16, 0.f);  // padded: the kernel reads groups 16 at a time
  out.sum.assign(groups + 16, 0.f);
  out.total.assign(groups, 0);
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

constexpr int64_t kTile = 16;          // weight rows per tile: one per 32-bit lane
constexpr int64_t kBlock = kTile * kGroup / 2;  // bytes of one tile's group
constexpr int kMaxRows = 16;            // activation rows per pass over a tile

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
RowChunk chunk_of(const QuantizedRow* x, int rows, int64_t groups, int32_t zero) {
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
      // several fall behind it (16 rows: 0.7x the time with it)
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

// The activation rows x [M, K] bf16 quantized per group and laid out for the tile kernels.
std::vector<RowChunk> chunks_of(const torch::Tensor& x, int32_t zero) {
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
