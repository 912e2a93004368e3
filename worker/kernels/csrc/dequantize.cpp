// Dequantizing a block of output rows of an int8 weight into bf16, one pass, for the large
// steps of worker/quantized_weights.py (which multiply the block in bf16 right after, while it
// is still in cache). torch's ops took 5-7 passes over float32 temporaries for the same work.
#include <torch/extension.h>

#include <omp.h>

#include <cstdint>

// out [n, K] bf16 = q[start:start + n] * scales[start:start + n, None]; q [N, K] int8.
void dequantize_int8_(torch::Tensor out, torch::Tensor q, torch::Tensor scales, int64_t start) {
  TORCH_CHECK(q.is_contiguous() && out.is_contiguous() && scales.is_contiguous());
  TORCH_CHECK(out.scalar_type() == torch::kBFloat16 && scales.scalar_type() == torch::kBFloat16);
  const int64_t n = out.size(0), k = out.size(1);
  TORCH_CHECK(q.size(1) == k && start >= 0 && start + n <= q.size(0));
  const int8_t* q_ptr = q.data_ptr<int8_t>() + start * k;
  const c10::BFloat16* s_ptr = scales.data_ptr<c10::BFloat16>() + start;
  c10::BFloat16* out_ptr = out.data_ptr<c10::BFloat16>();
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < n; ++r) {
    const float s = static_cast<float>(s_ptr[r]);
    const int8_t* src = q_ptr + r * k;
    c10::BFloat16* dst = out_ptr + r * k;
    for (int64_t i = 0; i < k; ++i) dst[i] = c10::BFloat16(static_cast<float>(src[i]) * s);
  }
}
