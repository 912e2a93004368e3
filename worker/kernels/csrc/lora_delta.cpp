// Segmented multi-LoRA delta on CPU (worker/lora.py, DeltaPath.KERNEL).
//
// For each segment (start, end, slot, rank), a run of tokens on one adapter slot, and each
// sub-module j of a fused projection:
//   y[t, off_j : off_j + out_j] += sum_{k < rank} (A[k, slot, j, :] . x[t, :]) * B_j[k, slot, :]
// One call per projection reads each used slot's weights once, whatever its number of tokens,
// and never touches the other slots. torch's paths either loop over segments in Python (a matmul
// pair each, ~20 us apiece for bf16 at these sizes) or multiply every token by every slot.
#include <omp.h>
#include <torch/extension.h>

#include <algorithm>
#include <vector>

#include "simd.h"

namespace {

using edgelora::FlushDenormals;

constexpr int64_t kColumns = 256;  // output columns per expand task: B's chunk stays in L1

template <typename T>
float dot(const T* a, const T* b, int64_t n) {
  int64_t d = 0;
  float s = 0.f;
#if defined(__AVX512F__)
  __m512 acc = _mm512_setzero_ps();
  for (; d + 16 <= n; d += 16) {
    acc = _mm512_fmadd_ps(edgelora::load16(a + d), edgelora::load16(b + d), acc);
  }
  s = _mm512_reduce_add_ps(acc);
#endif
  for (; d < n; ++d) s += static_cast<float>(a[d]) * static_cast<float>(b[d]);
  return s;
}

// y[0:n] += sum_k h[k * h_stride] * b[k * b_stride + 0:n], rounded once into y's dtype.
template <typename T>
void expand(T* y, const float* h, int64_t h_stride, const T* b, int64_t b_stride, int64_t rank,
            int64_t n) {
  int64_t c = 0;
#if defined(__AVX512F__)
  for (; c + 16 <= n; c += 16) {
    __m512 acc = edgelora::load16(y + c);
    for (int64_t k = 0; k < rank; ++k) {
      acc = _mm512_fmadd_ps(_mm512_set1_ps(h[k * h_stride]), edgelora::load16(b + k * b_stride + c),
                            acc);
    }
    edgelora::store16(y + c, acc);
  }
#endif
  for (; c < n; ++c) {
    float acc = static_cast<float>(y[c]);
    for (int64_t k = 0; k < rank; ++k) acc += h[k * h_stride] * static_cast<float>(b[k * b_stride + c]);
    y[c] = static_cast<T>(acc);
  }
}

struct Segment {
  int64_t start, end, slot, rank;
};

template <typename T>
void lora_delta(torch::Tensor& y, const torch::Tensor& x, const torch::Tensor& a,
                const std::vector<torch::Tensor>& bs, const std::vector<Segment>& segs) {
  const int64_t max_rank = a.size(0), num_slots = a.size(1), sub = a.size(2), in = a.size(3);
  const int64_t x_stride = x.stride(0), y_stride = y.stride(0);
  const T* x_ptr = x.data_ptr<T>();
  const T* a_ptr = a.data_ptr<T>();
  T* y_ptr = y.data_ptr<T>();
  const int64_t num_tokens = segs.empty() ? 0 : segs.back().end;
  std::vector<float> h(num_tokens * max_rank * sub);  // h[t, k, j]

  // Shrink, a task per (segment, rank): A[k, slot] is [sub, in], read once for the run's tokens.
  std::vector<std::pair<int64_t, int64_t>> shrink;
  for (int64_t i = 0; i < static_cast<int64_t>(segs.size()); ++i) {
    for (int64_t k = 0; k < segs[i].rank; ++k) shrink.emplace_back(i, k);
  }
#pragma omp parallel
  {
    FlushDenormals flush;  // once per thread and region, not per task
#pragma omp for schedule(static)
    for (int64_t task = 0; task < static_cast<int64_t>(shrink.size()); ++task) {
      const auto [i, k] = shrink[task];
      const Segment& s = segs[i];
      const T* rows = a_ptr + (k * num_slots + s.slot) * sub * in;
      for (int64_t t = s.start; t < s.end; ++t) {
        for (int64_t j = 0; j < sub; ++j) {
          h[(t * max_rank + k) * sub + j] = dot(rows + j * in, x_ptr + t * x_stride, in);
        }
      }
    }
  }

  // Expand, a task per (segment, sub-module, chunk of columns): B_j[:rank, slot, chunk].
  struct ExpandTask {
    int64_t seg, j, col, n, offset;
  };
  std::vector<ExpandTask> tasks;
  for (int64_t i = 0; i < static_cast<int64_t>(segs.size()); ++i) {
    int64_t offset = 0;
    for (int64_t j = 0; j < sub; ++j) {
      const int64_t out = bs[j].size(2);
      for (int64_t col = 0; col < out; col += kColumns) {
        tasks.push_back({i, j, col, std::min(kColumns, out - col), offset});
      }
      offset += out;
    }
  }
#pragma omp parallel
  {
    FlushDenormals flush;
#pragma omp for schedule(static)
    for (int64_t task = 0; task < static_cast<int64_t>(tasks.size()); ++task) {
      const ExpandTask& e = tasks[task];
      const Segment& s = segs[e.seg];
      const torch::Tensor& b = bs[e.j];
      const int64_t out = b.size(2);
      const T* b_ptr = b.data_ptr<T>() + s.slot * out + e.col;  // B_j[0, slot, col]
      for (int64_t t = s.start; t < s.end; ++t) {
        expand(y_ptr + t * y_stride + e.offset + e.col, h.data() + t * max_rank * sub + e.j, sub,
               b_ptr, num_slots * out, s.rank, e.n);
      }
    }
  }
}

}  // namespace

// y [T, sum(out_j)] (updated in place); x [T, in]; a [R, S, sub, in]; bs[j] [R, S, out_j];
// segments [n, 4] int64 rows (start, end, slot index, rank), ascending and disjoint. All
// floating tensors share one dtype, on CPU; a, bs contiguous; x, y rows contiguous.
void lora_delta_(torch::Tensor y, torch::Tensor x, torch::Tensor a, std::vector<torch::Tensor> bs,
                 torch::Tensor segments) {
  TORCH_CHECK(x.dim() == 2 && y.dim() == 2 && a.dim() == 4 && segments.dim() == 2 &&
              segments.size(1) == 4, "bad ranks");
  TORCH_CHECK(x.device().is_cpu() && y.device().is_cpu() && a.device().is_cpu(), "CPU tensors only");
  TORCH_CHECK(x.stride(1) == 1 && y.stride(1) == 1 && a.is_contiguous(), "rows must be contiguous");
  TORCH_CHECK(static_cast<int64_t>(bs.size()) == a.size(2), "one B per sub-module");
  TORCH_CHECK(x.size(1) == a.size(3) && x.size(0) == y.size(0), "x, y and A disagree");
  TORCH_CHECK(segments.scalar_type() == torch::kLong, "segments must be int64");
  int64_t width = 0;
  for (const auto& b : bs) {
    TORCH_CHECK(b.dim() == 3 && b.is_contiguous() && b.size(0) == a.size(0) &&
                b.size(1) == a.size(1) && b.scalar_type() == a.scalar_type(), "bad B");
    width += b.size(2);
  }
  TORCH_CHECK(width == y.size(1), "y's width is not the sum of the B widths");
  TORCH_CHECK(x.scalar_type() == a.scalar_type() && y.scalar_type() == a.scalar_type(),
              "x, y and the weights must share a dtype");
  segments = segments.contiguous();
  const int64_t* raw = segments.data_ptr<int64_t>();
  std::vector<Segment> segs;
  for (int64_t i = 0; i < segments.size(0); ++i) {
    const Segment s{raw[4 * i], raw[4 * i + 1], raw[4 * i + 2], raw[4 * i + 3]};
    const int64_t prev_end = segs.empty() ? 0 : segs.back().end;
    TORCH_CHECK(prev_end <= s.start && s.start <= s.end && s.end <= x.size(0),
                "segment ", i, " out of order or range");
    TORCH_CHECK(0 <= s.slot && s.slot < a.size(1) && 0 <= s.rank && s.rank <= a.size(0),
                "segment ", i, ": bad slot or rank");
    segs.push_back(s);
  }
  edgelora::by_dtype(a.scalar_type(), "lora_delta_", [&](auto element) {
    lora_delta<decltype(element)>(y, x, a, bs, segs);
  });
}
