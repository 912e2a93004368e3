// Shared by the CPU kernels: the dispatch on a tensor's dtype, 16-lane float loads and stores
// of fp32 / bf16 / fp16 data, exp, and a scope that flushes denormals.
#pragma once

#include <torch/extension.h>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace edgelora {

// run(T{}) with T the element type of `dtype` (fp32, bf16 or fp16); any other dtype: an error
// that names `what`.
template <typename F>
void by_dtype(torch::ScalarType dtype, const char* what, F&& run) {
  switch (dtype) {
    case torch::kFloat: run(float{}); break;
    case torch::kBFloat16: run(c10::BFloat16{}); break;
    case torch::kHalf: run(c10::Half{}); break;
    default: TORCH_CHECK(false, what, ": fp32, bf16 or fp16, not ", dtype);
  }
}

#if defined(__AVX512F__)
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const c10::BFloat16* p) {  // bf16 is the top half of a float
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}
inline __m512 load16(const c10::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

inline void store16(float* p, __m512 v) { _mm512_storeu_ps(p, v); }
inline void store16(c10::BFloat16* p, __m512 v) {
#if defined(__AVX512BF16__)
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), (__m256i)_mm512_cvtneps_pbh(v));
#else  // round to nearest even, as c10::BFloat16(float) does
  alignas(64) float f[16];
  _mm512_store_ps(f, v);
  for (int i = 0; i < 16; ++i) p[i] = c10::BFloat16(f[i]);
#endif
}
inline void store16(c10::Half* p, __m512 v) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p),
                      _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}

// exp(x), 16 lanes: 2^n * 2^f with n = round(x log2 e), |f| <= 1/2, 2^f = e^(f ln 2) by its
// degree-6 Taylor polynomial (relative error < 1e-6); scalef applies 2^n (inf past ~88.7; x is
// clamped at -100). libm's scalar expf was a third of the attention kernel's time.
inline __m512 exp16(__m512 x) {
  const __m512 t = _mm512_mul_ps(_mm512_max_ps(x, _mm512_set1_ps(-100.f)),
                                 _mm512_set1_ps(1.44269504f));
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_mul_ps(_mm512_sub_ps(t, n), _mm512_set1_ps(0.69314718f));
  __m512 p = _mm512_set1_ps(1.f / 720);
  for (const float c : {1.f / 120, 1.f / 24, 1.f / 6, 0.5f, 1.f, 1.f}) {
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(c));
  }
  return _mm512_scalef_ps(p, n);
}
#endif

// Flushes denormals (FTZ | DAZ) on this thread while in scope: tiny products (far-off attention
// probabilities, small LoRA terms) would otherwise run denormal arithmetic, many times slower.
class FlushDenormals {
 public:
#if defined(__x86_64__)
  FlushDenormals() : csr_(_mm_getcsr()) { _mm_setcsr(csr_ | 0x8040); }
  ~FlushDenormals() { _mm_setcsr(csr_); }

 private:
  unsigned int csr_;
#endif
};

}  // namespace edgelora
