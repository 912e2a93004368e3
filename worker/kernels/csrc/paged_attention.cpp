// Decode attention read straight from the paged KV cache on CPU (worker/paged_attention.py).
//
// One query token per row; row r attends to its first ctx_lens[r] positions, position t at cache
// slot block_tables[r, t / block_size] * block_size + t % block_size.
// torch's path gathers every row's K and V into padded tensors first and then runs SDPA: that
// copy cost as much as the attention itself. Here each (row, KV head) task reads its slots where
// they lie, once, for all the query heads that share the KV head (GQA).
#include <omp.h>
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "simd.h"

namespace {

using edgelora::FlushDenormals;
#if defined(__AVX512F__)
using edgelora::load16;
#endif

// One task: KV heads [head, head + num_kv) of one row, and the g query heads sharing each.
template <typename T>
struct Task {
  const float* q;       // [num_kv * g, hd] the task's query heads, pre-scaled, float
  const T* k_cache;     // [slots, kvh, hd]
  const T* v_cache;
  const int64_t* slots; // [len] cache slot of each position
  int64_t len, kvh, head, num_kv, g, hd;

  const T* at(const T* cache, int64_t t, int64_t kv) const {
    return cache + (slots[t] * kvh + head + kv) * hd;
  }
};

// Per-position inner loops, one set per instruction width: Ops::dot(q, k, hd) = q . k and
// Ops::accumulate(p, stride, v, acc, g, hd): acc[j, :] += p[j * stride] * v for the g query heads
// j sharing one KV head (v is read and converted once for all of them).
struct ScalarOps {
  template <typename T>
  static float dot(const float* q, const T* k, int64_t hd) {
    float s = 0.f;
    for (int64_t d = 0; d < hd; ++d) s += q[d] * static_cast<float>(k[d]);
    return s;
  }

  template <typename T>
  static void accumulate(const float* p, int64_t stride, const T* v, float* acc, int64_t g,
                         int64_t hd) {
    for (int64_t j = 0; j < g; ++j) {
      const float pj = p[j * stride];
      for (int64_t d = 0; d < hd; ++d) acc[j * hd + d] += pj * static_cast<float>(v[d]);
    }
  }

  static void softmax(float* s, int64_t len);
};

void ScalarOps::softmax(float* s, int64_t len) {
  const float m = *std::max_element(s, s + len);
  float sum = 0.f;
  for (int64_t t = 0; t < len; ++t) sum += (s[t] = std::exp(s[t] - m));
  for (int64_t t = 0; t < len; ++t) s[t] /= sum;
}

#if defined(__AVX512F__)
// exp(x) for x <= 0: 2^n * 2^f with n = round(x log2 e), |f| <= 1/2, 2^f = e^(f ln 2) by its
// degree-6 Taylor polynomial (relative error < 1e-6); scalef applies 2^n. The scalar expf of
// libm was a third of the kernel's time.
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

// Needs hd % 16 == 0.
struct Avx512Ops {
  template <typename T>
  static float dot(const float* q, const T* k, int64_t hd) {
    __m512 s = _mm512_setzero_ps();
    for (int64_t d = 0; d < hd; d += 16) s = _mm512_fmadd_ps(_mm512_loadu_ps(q + d), load16(k + d), s);
    return _mm512_reduce_add_ps(s);
  }

  template <typename T>
  static void accumulate(const float* p, int64_t stride, const T* v, float* acc, int64_t g,
                         int64_t hd) {
    for (int64_t d = 0; d < hd; d += 16) {
      const __m512 vd = load16(v + d);
      for (int64_t j = 0; j < g; ++j) {
        float* a = acc + j * hd + d;
        _mm512_storeu_ps(a, _mm512_fmadd_ps(_mm512_set1_ps(p[j * stride]), vd, _mm512_loadu_ps(a)));
      }
    }
  }

  static void softmax(float* s, int64_t len);
};

void Avx512Ops::softmax(float* s, int64_t len) {
  const float m = *std::max_element(s, s + len);
  const __m512 vm = _mm512_set1_ps(m);
  __m512 vsum = _mm512_setzero_ps();
  int64_t t = 0;
  for (; t + 16 <= len; t += 16) {
    const __m512 e = exp16(_mm512_sub_ps(_mm512_loadu_ps(s + t), vm));
    _mm512_storeu_ps(s + t, e);
    vsum = _mm512_add_ps(vsum, e);
  }
  float sum = _mm512_reduce_add_ps(vsum);
  for (; t < len; ++t) sum += (s[t] = std::exp(s[t] - m));
  const __m512 inv = _mm512_set1_ps(1.f / sum);
  for (t = 0; t + 16 <= len; t += 16) {
    _mm512_storeu_ps(s + t, _mm512_mul_ps(_mm512_loadu_ps(s + t), inv));
  }
  for (; t < len; ++t) s[t] /= sum;
}
#endif

// One task: scores q_i . k_t for every query head i and position t (all heads of a position
// read together: a slot's heads are adjacent in memory), a softmax per head, then
// acc[i, :] = sum_t p[i, t] v_t.
template <typename Ops, typename T>
void attend(const Task<T>& a, float* scores, float* acc) {
  for (int64_t t = 0; t < a.len; ++t) {
    for (int64_t kv = 0; kv < a.num_kv; ++kv) {
      const T* k = a.at(a.k_cache, t, kv);
      for (int64_t i = kv * a.g; i < (kv + 1) * a.g; ++i) {
        scores[i * a.len + t] = Ops::dot(a.q + i * a.hd, k, a.hd);
      }
    }
  }
  for (int64_t i = 0; i < a.num_kv * a.g; ++i) Ops::softmax(scores + i * a.len, a.len);
  std::fill(acc, acc + a.num_kv * a.g * a.hd, 0.f);
  for (int64_t t = 0; t < a.len; ++t) {
    for (int64_t kv = 0; kv < a.num_kv; ++kv) {
      const int64_t i = kv * a.g;
      Ops::accumulate(scores + i * a.len + t, a.len, a.at(a.v_cache, t, kv), acc + i * a.hd,
                      a.g, a.hd);
    }
  }
}

template <typename T>
void decode_attention(const torch::Tensor& q, const torch::Tensor& k_cache,
                      const torch::Tensor& v_cache, const torch::Tensor& block_tables,
                      const torch::Tensor& ctx_lens, double scale, int64_t block_size,
                      torch::Tensor& out) {
  const int64_t rows = q.size(0), nh = q.size(1), hd = q.size(2), kvh = k_cache.size(1);
  const int64_t g = nh / kvh, max_blocks = block_tables.size(1);
  const T* q_ptr = q.data_ptr<T>();
  const int64_t* lens = ctx_lens.data_ptr<int64_t>();
  T* out_ptr = out.data_ptr<T>();
#if defined(__AVX512F__)
  const bool wide = hd % 16 == 0;
#endif
  // Plain OpenMP on the caller's thread count: at::parallel_for's lazy init, compiled into an
  // extension, re-reads torch's global thread count (1 after the adapter loader thread set it)
  // and imposes it on the calling thread, halving every later op of the engine thread.
#pragma omp parallel
  {
    // A task per row, all its heads (each slot's heads are one contiguous read); a task per
    // (row, KV head) when there are fewer rows than threads.
    const int64_t workers = omp_get_num_threads();
    const int64_t per_task = rows >= workers ? kvh : 1;
    const int64_t num_tasks = rows * (kvh / per_task);
    const int64_t chunk = (num_tasks + workers - 1) / workers;
    const int64_t begin = std::min(num_tasks, omp_get_thread_num() * chunk);
    const int64_t end = std::min(num_tasks, begin + chunk);
    FlushDenormals flush;  // far-off positions' probabilities underflow
    const int64_t nq = per_task * g;  // query heads per task
    std::vector<float> qf(nq * hd), acc(nq * hd), scores;
    std::vector<int64_t> slots;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t r = task / (kvh / per_task), head = task % (kvh / per_task) * per_task;
      const T* qr = q_ptr + (r * nh + head * g) * hd;
      for (int64_t i = 0; i < nq * hd; ++i) qf[i] = static_cast<float>(qr[i]) * scale;
      // The row's slots spelled out once: the loops below read each one per KV head.
      const int64_t* table = block_tables.data_ptr<int64_t>() + r * max_blocks;
      slots.resize(lens[r]);
      for (int64_t t = 0; t < lens[r]; ++t) {
        slots[t] = table[t / block_size] * block_size + t % block_size;
      }
      const Task<T> a{qf.data(), k_cache.data_ptr<T>(), v_cache.data_ptr<T>(), slots.data(),
                      lens[r], kvh, head, per_task, g, hd};
      scores.resize(nq * a.len);
#if defined(__AVX512F__)
      if (wide) {
        attend<Avx512Ops>(a, scores.data(), acc.data());
      } else
#endif
      {
        attend<ScalarOps>(a, scores.data(), acc.data());
      }
      T* o = out_ptr + (r * nh + head * g) * hd;
      for (int64_t i = 0; i < nq * hd; ++i) o[i] = static_cast<T>(acc[i]);
    }
  }
}

}  // namespace

// q [rows, nh, hd]; k_cache, v_cache [slots, kvh, hd] (same dtype, CPU, contiguous);
// block_tables [rows, B] int64; ctx_lens [rows] int64 in [1, B * block_size]. -> [rows, nh, hd].
torch::Tensor paged_decode_attention(torch::Tensor q, torch::Tensor k_cache,
                                     torch::Tensor v_cache, torch::Tensor block_tables,
                                     torch::Tensor ctx_lens, double scale, int64_t block_size) {
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 3 && v_cache.dim() == 3, "bad ranks");
  TORCH_CHECK(q.device().is_cpu() && k_cache.device().is_cpu(), "CPU tensors only");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "caches must be contiguous");
  TORCH_CHECK(q.scalar_type() == k_cache.scalar_type() &&
              q.scalar_type() == v_cache.scalar_type(), "q, k and v dtypes differ");
  TORCH_CHECK(q.size(1) % k_cache.size(1) == 0 && q.size(2) == k_cache.size(2), "bad heads");
  TORCH_CHECK(block_tables.scalar_type() == torch::kLong &&
              ctx_lens.scalar_type() == torch::kLong, "block_tables and ctx_lens must be int64");
  TORCH_CHECK(block_tables.size(0) == q.size(0) && ctx_lens.size(0) == q.size(0), "bad rows");
  TORCH_CHECK(block_size >= 1, "block_size must be at least 1");
  q = q.contiguous();
  block_tables = block_tables.contiguous();
  ctx_lens = ctx_lens.contiguous();
  const int64_t* lens = ctx_lens.data_ptr<int64_t>();
  for (int64_t r = 0; r < q.size(0); ++r) {
    TORCH_CHECK(lens[r] >= 1 && lens[r] <= block_tables.size(1) * block_size, "ctx_lens[", r,
                "] out of range");
  }
  auto out = torch::empty_like(q);
  const auto run = [&](auto element) {
    decode_attention<decltype(element)>(q, k_cache, v_cache, block_tables, ctx_lens, scale,
                                        block_size, out);
  };
  switch (q.scalar_type()) {
    case torch::kFloat: run(float{}); break;
    case torch::kBFloat16: run(c10::BFloat16{}); break;
    case torch::kHalf: run(c10::Half{}); break;
    default: TORCH_CHECK(false, "unsupported dtype ", q.scalar_type());
  }
  return out;
}
