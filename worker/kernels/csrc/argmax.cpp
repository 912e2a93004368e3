// Greedy decoding's argmax over each row of the logits (worker/sampler.py), as torch's
// max(dim=-1).indices: the first index of the largest value, or of the first NaN. torch's CPU
// reduction walks a 128k vocabulary one element at a time (~110 us a row); this is two 16-lane
// passes over it (max, then where it first occurs).
#include <torch/extension.h>

#include <omp.h>

#include <cmath>

#include "simd.h"

namespace {

int64_t argmax_row(const float* x, int64_t n) {
  int64_t i = 0;
  float best = -INFINITY;
  bool nan = false;
#if defined(__AVX512F__)
  __m512 m = _mm512_set1_ps(-INFINITY);
  __mmask16 unordered = 0;
  for (; i + 16 <= n; i += 16) {
    const __m512 v = _mm512_loadu_ps(x + i);
    unordered |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    m = _mm512_max_ps(m, v);
  }
  best = _mm512_reduce_max_ps(m);
  nan = unordered != 0;
#endif
  for (; i < n; ++i) {
    if (std::isnan(x[i])) nan = true;
    else best = std::max(best, x[i]);
  }
  if (nan) {
    for (int64_t j = 0; j < n; ++j) if (std::isnan(x[j])) return j;
  }
  int64_t j = 0;
#if defined(__AVX512F__)
  const __m512 target = _mm512_set1_ps(best);
  for (; j + 16 <= n; j += 16) {
    const __mmask16 hit = _mm512_cmp_ps_mask(_mm512_loadu_ps(x + j), target, _CMP_EQ_OQ);
    if (hit) return j + __builtin_ctz(hit);
  }
#endif
  for (; j < n; ++j) if (x[j] == best) return j;
  return 0;  // every value -inf: the first, as torch
}

}  // namespace

// logits [rows, vocab] float32 -> [rows] int64
torch::Tensor argmax_rows(torch::Tensor logits) {
  TORCH_CHECK(logits.dim() == 2 && logits.scalar_type() == torch::kFloat && logits.size(1) > 0,
              "argmax_rows: float32 [rows, vocab]");
  logits = logits.contiguous();
  const int64_t rows = logits.size(0), n = logits.size(1);
  auto out = torch::empty({rows}, logits.options().dtype(torch::kLong));
  const float* x = logits.data_ptr<float>();
  int64_t* o = out.data_ptr<int64_t>();
#pragma omp parallel for schedule(static) if (rows > 8)
  for (int64_t r = 0; r < rows; ++r) o[r] = argmax_row(x + r * n, n);
  return out;
}
