// The MLP's activation in one pass: silu(gate) * up from gate_up [rows, 2 I] (gate | up), as
// worker.model.MLP's torch ops compute it: silu(gate) = gate / (1 + exp(-gate)) in float32,
// rounded to the dtype, then times up, rounded again. torch dispatches split, silu and mul
// (three ops, ~25 us on a 1B model's 8192-wide row); exp here is simd.h's (relative error
// < 1e-6), so an element may differ from torch's by one rounding step, rarely.
#include <torch/extension.h>

#include <omp.h>

#include <cmath>

#include "simd.h"

namespace {

template <typename T>
void silu_mul_row(const T* gate, const T* up, T* out, int64_t n) {
  int64_t i = 0;
#if defined(__AVX512F__)
  const __m512 one = _mm512_set1_ps(1.f);
  for (; i + 16 <= n; i += 16) {
    const __m512 g = edgelora::load16(gate + i);
    const __m512 e = edgelora::exp16(_mm512_sub_ps(_mm512_setzero_ps(), g));
    alignas(64) T silu[16];
    edgelora::store16(silu, _mm512_div_ps(g, _mm512_add_ps(one, e)));
    edgelora::store16(out + i, _mm512_mul_ps(edgelora::load16(silu), edgelora::load16(up + i)));
  }
#endif
  for (; i < n; ++i) {
    const float g = static_cast<float>(gate[i]);
    const T silu = static_cast<T>(g / (1.f + std::exp(-g)));
    out[i] = static_cast<T>(static_cast<float>(silu) * static_cast<float>(up[i]));
  }
}

}  // namespace

// gate_up [rows, 2 I] -> [rows, I]
torch::Tensor silu_mul(torch::Tensor gate_up) {
  TORCH_CHECK(gate_up.dim() == 2 && gate_up.size(1) % 2 == 0, "gate_up: [rows, 2 I]");
  gate_up = gate_up.contiguous();
  const int64_t rows = gate_up.size(0), n = gate_up.size(1) / 2;
  auto out = torch::empty({rows, n}, gate_up.options());
  edgelora::by_dtype(gate_up.scalar_type(), "silu_mul", [&](auto element) {
    using T = decltype(element);
    const T* in = gate_up.data_ptr<T>();
    T* o = out.data_ptr<T>();
    // a thread per row once rows are many; a decode step's few rows are not worth waking them
#pragma omp parallel for schedule(static) if (rows > 8)
    for (int64_t r = 0; r < rows; ++r) silu_mul_row(in + r * 2 * n, in + r * 2 * n + n, o + r * n, n);
  });
  return out;
}
