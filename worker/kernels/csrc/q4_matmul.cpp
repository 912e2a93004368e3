// int4 weights for worker/quantized_weights.py (Int4Linear): the small-step matmul and the
// dequantization of row blocks for large steps.
//
// Layout (ours): packed [N, K / 2] uint8; in each run of 64 weights of a row, byte i holds weight
// i in its low nibble and weight i + 32 in its high one, so one 32-byte load unpacks to the two
// groups' 64 weights in order. scales, mins: [N, K / 32] fp16; weight = q * scale + min. mins
// empty: the symmetric form (GGUF's Q4_0), min = -8 * scale, 4.5 bits a weight instead of 5.
//
// Small steps (a few rows x, a stream of weights): x is quantized per group of 32 to int8 with
// one fp32 scale (as llama.cpp's Q8 activations), then each group's sum_j q_j * xq_j is an
// integer dot product: AVX-512 VNNI's vpdpbusd multiplies 64 unsigned weights by 64 signed
// activations and sums each 4 into 16 int32 lanes in one instruction. So
//   y = sum_g scale_g * dx_g * (sum_j q_j xq_j) + min_g * dx_g * (sum_j xq_j).
// Without VNNI a portable loop computes the same sums.
#include <torch/extension.h>

#include <omp.h>

#include "simd.h"

#include <cmath>
#include <cstdint>
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
};

void quantize_row(const c10::BFloat16* x, int64_t k, QuantizedRow& out) {
  const int64_t groups = k / kGroup;
  out.q.resize(k);
  out.scale.assign(groups + 16, 0.f);  // padded: the kernel reads groups 16 at a time
  out.sum.assign(groups + 16, 0.f);
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
  }
}

#if defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__AVX512VL__)
// lanes 0..7 <- factor 2r, lanes 8..15 <- factor 2r + 1: the two groups of run r
struct RunIndex {
  __m512i idx[8];
  RunIndex() {
    for (int r = 0; r < 8; ++r) {
      alignas(64) int32_t lanes[16];
      for (int l = 0; l < 16; ++l) lanes[l] = 2 * r + (l >= 8);
      idx[r] = _mm512_load_si512(lanes);
    }
  }
};
#endif

// sum over the row's groups of scale_g * dx_g * (sum_j q_j xq_j) + min_g * dx_g * (sum_j xq_j),
// one row at a time in portable C++ (rows_dot takes the VNNI path where the CPU has it)
[[maybe_unused]] float row_dot(const uint8_t* w, const c10::Half* scales, const c10::Half* mins,
              const QuantizedRow& x, int64_t k) {
  const int64_t groups = k / kGroup;
  float total = 0.f;
  for (int64_t r = 0; r < k / kRun; ++r) {
    int32_t dot0 = 0, dot1 = 0;
    for (int64_t i = 0; i < 32; ++i) {
      const uint8_t b = w[r * 32 + i];
      dot0 += static_cast<int32_t>(b & 0x0F) * x.q[r * kRun + i];
      dot1 += static_cast<int32_t>(b >> 4) * x.q[r * kRun + 32 + i];
    }
    total += half_to_float(scales[2 * r]) * x.scale[2 * r] * static_cast<float>(dot0) +
             half_to_float(scales[2 * r + 1]) * x.scale[2 * r + 1] * static_cast<float>(dot1);
  }
  for (int64_t g = 0; g < groups; ++g) total += min_of(scales, mins, g) * x.sum[g];
  return total;
}

// row_dot for C activation rows at once: each run of weights is unpacked once for all of them
// (a step of several streams costs less than that many single steps).
template <int C>
void rows_dot(const uint8_t* w, const c10::Half* scales, const c10::Half* mins,
              const QuantizedRow* x, int64_t k, float* result) {
#if defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__AVX512VL__)
  const int64_t groups = k / kGroup;
  static const RunIndex runs;
  const __m512i nibble = _mm512_set1_epi8(0x0F);
  // a run's 32 bytes in both halves, the upper half shifted right by 4: weights i, i + 32
  const __m512i shift = _mm512_inserti64x4(_mm512_setzero_si512(), _mm256_set1_epi16(4), 1);
  __m512 acc[C], acc_min[C], factor[C];
  for (int i = 0; i < C; ++i) acc[i] = acc_min[i] = _mm512_setzero_ps();
  for (int64_t g0 = 0; g0 < groups; g0 += 16) {
    const int64_t n = std::min<int64_t>(16, groups - g0);
    const __mmask16 mask = static_cast<__mmask16>((1u << n) - 1);
    const __m512 s = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, scales + g0));
    const __m512 m = mins ? _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, mins + g0))
                          : _mm512_mul_ps(s, _mm512_set1_ps(kSymmetricMin));
    for (int i = 0; i < C; ++i) {
      factor[i] = _mm512_mul_ps(s, _mm512_loadu_ps(x[i].scale.data() + g0));
      acc_min[i] = _mm512_fmadd_ps(m, _mm512_loadu_ps(x[i].sum.data() + g0), acc_min[i]);
    }
    for (int64_t r = 0; r < n / 2; ++r) {
      const int64_t run = g0 / 2 + r;
      if (r % 2 == 0) prefetch(w + run * 32);  // one 64-byte line per two runs
      const __m512i both = _mm512_broadcast_i64x4(
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + run * 32)));
      const __m512i weights = _mm512_and_si512(_mm512_srlv_epi16(both, shift), nibble);
      for (int i = 0; i < C; ++i) {
        const __m512i acts = _mm512_loadu_si512(x[i].q.data() + run * kRun);
        const __m512i dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), weights, acts);
        acc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot),
                                 _mm512_permutexvar_ps(runs.idx[r], factor[i]), acc[i]);
      }
    }
  }
  for (int i = 0; i < C; ++i) {
    result[i] = _mm512_reduce_add_ps(acc[i]) + _mm512_reduce_add_ps(acc_min[i]);
  }
#else
  for (int i = 0; i < C; ++i) result[i] = row_dot(w, scales, mins, x[i], k);
#endif
}

// int8 weights (one scale per row, applied by the caller): sum_g dx_g * sum_j q_j xq_j, one row
// at a time in portable C++ (rows_dot_q8 takes the VNNI path where the CPU has it)
[[maybe_unused]] float row_dot_q8(const int8_t* w, const QuantizedRow& x, int64_t k) {
  const int64_t groups = k / kGroup;
  float total = 0.f;
  for (int64_t g = 0; g < groups; ++g) {
    int32_t dot = 0;
    for (int64_t j = 0; j < kGroup; ++j) dot += int32_t(w[g * kGroup + j]) * x.q[g * kGroup + j];
    total += x.scale[g] * static_cast<float>(dot);
  }
  return total;
}

// row_dot_q8 for C activation rows at once (each run of weights loaded once for all of them).
// vpdpbusd takes unsigned weights: q ^ 0x80 = q + 128, and the 128 * sum_j xq_j it adds is taken
// off once per activation row (offsets[i] = 128 * sum_g dx_g * sum_j xq_j = 128 * sum of x.sum).
template <int C>
void rows_dot_q8(const int8_t* w, const QuantizedRow* x, int64_t k, const float* offsets,
                 float* result) {
#if defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__AVX512VL__)
  const int64_t groups = k / kGroup;
  static const RunIndex runs;
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  __m512 acc[C], factor[C];
  for (int i = 0; i < C; ++i) acc[i] = _mm512_setzero_ps();
  for (int64_t g0 = 0; g0 < groups; g0 += 16) {
    const int64_t n = std::min<int64_t>(16, groups - g0);
    for (int i = 0; i < C; ++i) factor[i] = _mm512_loadu_ps(x[i].scale.data() + g0);
    for (int64_t r = 0; r < n / 2; ++r) {
      const int64_t run = g0 / 2 + r;
      const __m512i weights = _mm512_xor_si512(_mm512_loadu_si512(w + run * kRun), flip);
      for (int i = 0; i < C; ++i) {
        const __m512i acts = _mm512_loadu_si512(x[i].q.data() + run * kRun);
        const __m512i dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), weights, acts);
        acc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot),
                                 _mm512_permutexvar_ps(runs.idx[r], factor[i]), acc[i]);
      }
    }
  }
  for (int i = 0; i < C; ++i) result[i] = _mm512_reduce_add_ps(acc[i]) - offsets[i];
#else
  (void)offsets;  // the portable loop reads signed weights: no offset to take off
  for (int i = 0; i < C; ++i) result[i] = row_dot_q8(w, x[i], k);
#endif
}

void check(const torch::Tensor& packed, const torch::Tensor& scales, const torch::Tensor& mins,
           int64_t k) {
  TORCH_CHECK(packed.is_contiguous() && scales.is_contiguous() && mins.is_contiguous());
  TORCH_CHECK(packed.scalar_type() == torch::kUInt8 && scales.scalar_type() == torch::kHalf &&
              mins.scalar_type() == torch::kHalf);
  TORCH_CHECK(k % kRun == 0 && packed.size(1) * 2 == k && scales.size(1) * kGroup == k &&
              (mins.numel() == 0 || mins.sizes() == scales.sizes()) &&
              scales.size(0) == packed.size(0));
}

const c10::Half* mins_or_null(const torch::Tensor& mins) {
  return mins.numel() == 0 ? nullptr : mins.data_ptr<c10::Half>();
}

}  // namespace

// y [M, N] bf16 = x [M, K] bf16 @ W^T, W in our int4 layout (above), x quantized per group.
torch::Tensor q4_matmul(torch::Tensor x, torch::Tensor packed, torch::Tensor scales,
                        torch::Tensor mins) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.scalar_type() == torch::kBFloat16);
  const int64_t m = x.size(0), k = x.size(1), n = packed.size(0);
  check(packed, scales, mins, k);
  std::vector<QuantizedRow> rows(m);
  for (int64_t i = 0; i < m; ++i) quantize_row(x.data_ptr<c10::BFloat16>() + i * k, k, rows[i]);
  auto y = torch::empty({m, n}, x.options());
  const uint8_t* w = packed.data_ptr<uint8_t>();
  const c10::Half* s = scales.data_ptr<c10::Half>();
  const c10::Half* mn = mins_or_null(mins);
  c10::BFloat16* out = y.data_ptr<c10::BFloat16>();
  const int64_t groups = k / kGroup;
  // Rows of W split across threads: each thread streams its share of the weights once, for
  // every activation row (a row of W, k / 2 bytes, stays in L1 across them).
#pragma omp parallel for schedule(static)
  for (int64_t row = 0; row < n; ++row) {
    const uint8_t* wr = w + row * (k / 2);
    const c10::Half *sr = s + row * groups, *mr = mn ? mn + row * groups : nullptr;
    float dots[4];
    for (int64_t i = 0; i < m; i += 4) {  // up to 4 activation rows per pass over the row
      const int64_t count = std::min<int64_t>(4, m - i);
      switch (count) {
        case 4: rows_dot<4>(wr, sr, mr, rows.data() + i, k, dots); break;
        case 3: rows_dot<3>(wr, sr, mr, rows.data() + i, k, dots); break;
        case 2: rows_dot<2>(wr, sr, mr, rows.data() + i, k, dots); break;
        default: rows_dot<1>(wr, sr, mr, rows.data() + i, k, dots);
      }
      for (int64_t j = 0; j < count; ++j) out[(i + j) * n + row] = c10::BFloat16(dots[j]);
    }
  }
  return y;
}

// out [n, K] bf16 = rows [start, start + n) of W dequantized: q * scale + min, rounded once.
void dequantize_q4_(torch::Tensor out, torch::Tensor packed, torch::Tensor scales,
                    torch::Tensor mins, int64_t start) {
  TORCH_CHECK(out.is_contiguous() && out.scalar_type() == torch::kBFloat16);
  const int64_t n = out.size(0), k = out.size(1);
  check(packed, scales, mins, k);
  TORCH_CHECK(start >= 0 && start + n <= packed.size(0));
  const int64_t groups = k / kGroup;
  const uint8_t* w = packed.data_ptr<uint8_t>() + start * (k / 2);
  const c10::Half* s = scales.data_ptr<c10::Half>();
  const c10::Half* mn = mins_or_null(mins);
  c10::BFloat16* o = out.data_ptr<c10::BFloat16>();
#pragma omp parallel for schedule(static)
  for (int64_t row = 0; row < n; ++row) {
    for (int64_t r = 0; r < k / kRun; ++r) {
      const uint8_t* bytes = w + row * (k / 2) + r * 32;
      const int64_t g = (start + row) * groups + 2 * r;
      const float s0 = half_to_float(s[g]), s1 = half_to_float(s[g + 1]);
      const float m0 = min_of(s, mn, g), m1 = min_of(s, mn, g + 1);
      c10::BFloat16* dst = o + row * k + r * kRun;
      for (int64_t i = 0; i < 32; ++i) {
        dst[i] = c10::BFloat16(static_cast<float>(bytes[i] & 0x0F) * s0 + m0);
        dst[32 + i] = c10::BFloat16(static_cast<float>(bytes[i] >> 4) * s1 + m1);
      }
    }
  }
}

// y [M, N] bf16 = x [M, K] bf16 @ (q [N, K] int8 * scales [N])^T, x quantized per group of 32.
torch::Tensor q8_matmul(torch::Tensor x, torch::Tensor q, torch::Tensor scales) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.scalar_type() == torch::kBFloat16);
  TORCH_CHECK(q.is_contiguous() && q.scalar_type() == torch::kInt8 && scales.is_contiguous() &&
              scales.scalar_type() == torch::kBFloat16);
  const int64_t m = x.size(0), k = x.size(1), n = q.size(0);
  TORCH_CHECK(k % kRun == 0 && q.size(1) == k && scales.size(0) == n);
  std::vector<QuantizedRow> rows(m);
  std::vector<float> offsets(m, 0.f);
  for (int64_t i = 0; i < m; ++i) {
    quantize_row(x.data_ptr<c10::BFloat16>() + i * k, k, rows[i]);
    for (int64_t g = 0; g < k / kGroup; ++g) offsets[i] += 128.f * rows[i].sum[g];
  }
  auto y = torch::empty({m, n}, x.options());
  const int8_t* w = q.data_ptr<int8_t>();
  const c10::BFloat16* s = scales.data_ptr<c10::BFloat16>();
  c10::BFloat16* out = y.data_ptr<c10::BFloat16>();
#pragma omp parallel for schedule(static)
  for (int64_t row = 0; row < n; ++row) {
    const float scale = static_cast<float>(s[row]);
    const int8_t* wr = w + row * k;
    float dots[4];
    for (int64_t i = 0; i < m; i += 4) {  // up to 4 activation rows per pass over the row
      const int64_t count = std::min<int64_t>(4, m - i);
      switch (count) {
        case 4: rows_dot_q8<4>(wr, rows.data() + i, k, offsets.data() + i, dots); break;
        case 3: rows_dot_q8<3>(wr, rows.data() + i, k, offsets.data() + i, dots); break;
        case 2: rows_dot_q8<2>(wr, rows.data() + i, k, offsets.data() + i, dots); break;
        default: rows_dot_q8<1>(wr, rows.data() + i, k, offsets.data() + i, dots);
      }
      for (int64_t j = 0; j < count; ++j) out[(i + j) * n + row] = c10::BFloat16(scale * dots[j]);
    }
  }
  return y;
}
