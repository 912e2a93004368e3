// Dequantizing a block of output rows of an int8 weight into bf16, one pass, for the large
// steps of worker/quantized_weights.py (which multiply the block in bf16 right after, while it
// is still in cache). torch's ops took 5-7 passes over float32 temporaries for the same work.
#include <torch/extension.h>

#include <omp.h>

#include <cstdint>
#include <cstring>

namespace {
constexpr int64_t kTile = 16, kGroup = 32;  // csrc/q4_matmul.cpp's int8 tiles
}  // namespace

// out [n, K] bf16 = rows [start, start + n) of W * scales[row]; W int8 in tiles, packed
// [N / 16, K / 32, 512]: byte 64 k + 4 l + i of block (tile, group g) is weight 32 g + 4 k + i
// of the tile's row l.
void dequantize_int8_(torch::Tensor out, torch::Tensor packed, torch::Tensor scales,
                      int64_t start) {
  TORCH_CHECK(packed.is_contiguous() && out.is_contiguous() && scales.is_contiguous());
  TORCH_CHECK(out.scalar_type() == torch::kBFloat16 && scales.scalar_type() == torch::kBFloat16 &&
              packed.scalar_type() == torch::kInt8 && packed.dim() == 3);
  const int64_t n = out.size(0), k = out.size(1), groups = k / kGroup;
  TORCH_CHECK(k % kGroup == 0 && packed.size(1) == groups && packed.size(2) == kTile * kGroup);
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
      const int8_t* block = w + (t * groups + g) * kTile * kGroup + 4 * l;
      int8_t q[kGroup];  // the row's 4 bytes of each of the group's 8 vectors, in order
      for (int64_t k = 0; k < kGroup / 4; ++k) std::memcpy(q + 4 * k, block + 64 * k, 4);
      for (int64_t j = 0; j < kGroup; ++j) {
        dst[g * kGroup + j] = c10::BFloat16(static_cast<float>(q[j]) * scale);
      }
    }
  }
}
