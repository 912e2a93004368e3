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

  // Asks for position t's rows of the task's heads (when t < len) ahead of their use: in a
  // decode step the cache is cold (the weights streamed since evicted it) and positions lie a
  // slot apart, a stride the hardware prefetcher follows late. With the head runs below, a 1B
  // model's attention at batch 1 went from 1.5 to 0.7 ms a token.
  void prefetch(const T* cache, int64_t t) const {
#if defined(__x86_64__)
    if (t >= len) return;
    const char* p = reinterpret_cast<const char*>(at(cache, t, 0));
    for (int64_t b = 0; b < num_kv * hd * static_cast<int64_t>(sizeof(T)); b += 64) {
      _mm_prefetch(p + b, _MM_HINT_T0);
    }
#else
    (void)cache, (void)t;
#endif
  }
};

constexpr int64_t kPrefetchPositions = 8;  // how far ahead attend() asks for K and V rows

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
using edgelora::exp16;

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
    a.prefetch(a.k_cache, t + kPrefetchPositions);
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
    a.prefetch(a.v_cache, t + kPrefetchPositions);
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
    // A task per row, all its heads (each slot's heads are one contiguous read); with fewer
    // rows than threads, each row's heads in runs (a divisor of kvh) that give every thread
    // one: a thread then reads a contiguous part of each slot (a task a head: 1.3x slower).
    const int64_t workers = omp_get_num_threads();
    int64_t per_task = std::clamp<int64_t>(kvh * rows / workers, 1, kvh);
    while (kvh % per_task) --per_task;
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

// rope(x) = x * cos + roll(x, hd / 2) * sin_signed, rounded as worker.model.apply_rope's two
// torch ops round it: x * cos to T, then torch.addcmul's fused multiply-add, rounded to T. The
// compiler must not fuse x * cos into that add instead (float32 would then differ in the last
// bit from the prompt's keys, which torch ropes): contraction off here, the fma spelled out.
template <typename T>
__attribute__((optimize("fp-contract=off")))
void rope(const T* x, const T* cos, const T* sin, int64_t hd, T* out) {
  const int64_t half = hd / 2;
  for (int64_t d = 0; d < hd; ++d) {
    const T xc = static_cast<T>(static_cast<float>(x[d]) * static_cast<float>(cos[d]));
    const float rolled = static_cast<float>(x[(d + half) % hd]);
    out[d] = static_cast<T>(std::fma(rolled, static_cast<float>(sin[d]), static_cast<float>(xc)));
  }
}

// Token t of qkv [T, (nh + 2 kvh) hd]: its q heads roped into q [T, nh, hd], its k heads roped
// and its v heads copied into their cache slot.
template <typename T>
void rope_and_store(const torch::Tensor& qkv, const torch::Tensor& cos, const torch::Tensor& sin,
                    const torch::Tensor& slot_mapping, torch::Tensor& q, torch::Tensor& k_cache,
                    torch::Tensor& v_cache) {
  const int64_t tokens = qkv.size(0), nh = q.size(1), hd = q.size(2), kvh = k_cache.size(1);
  const T* src = qkv.data_ptr<T>();
  const T *c = cos.data_ptr<T>(), *s = sin.data_ptr<T>();
  const int64_t* slots = slot_mapping.data_ptr<int64_t>();
  T *qo = q.data_ptr<T>(), *ko = k_cache.data_ptr<T>(), *vo = v_cache.data_ptr<T>();
  for (int64_t t = 0; t < tokens; ++t) {
    const T* row = src + t * (nh + 2 * kvh) * hd;
    for (int64_t h = 0; h < nh; ++h) rope(row + h * hd, c + t * hd, s + t * hd, hd, qo + (t * nh + h) * hd);
    for (int64_t h = 0; h < kvh; ++h) {
      rope(row + (nh + h) * hd, c + t * hd, s + t * hd, hd, ko + (slots[t] * kvh + h) * hd);
    }
    std::copy(row + (nh + kvh) * hd, row + (nh + 2 * kvh) * hd, vo + slots[t] * kvh * hd);
  }
}

void check_attention_args(const torch::Tensor& q, const torch::Tensor& k_cache,
                          const torch::Tensor& v_cache, const torch::Tensor& block_tables,
                          const torch::Tensor& ctx_lens, int64_t block_size) {
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 3 && v_cache.dim() == 3, "bad ranks");
  TORCH_CHECK(q.device().is_cpu() && k_cache.device().is_cpu(), "CPU tensors only");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "caches must be contiguous");
  TORCH_CHECK(q.scalar_type() == k_cache.scalar_type() &&
              q.scalar_type() == v_cache.scalar_type(), "q, k and v dtypes differ");
  TORCH_CHECK(k_cache.sizes() == v_cache.sizes(), "k and v caches differ in shape");
  TORCH_CHECK(q.size(1) % k_cache.size(1) == 0 && q.size(2) == k_cache.size(2), "bad heads");
  TORCH_CHECK(block_tables.scalar_type() == torch::kLong &&
              ctx_lens.scalar_type() == torch::kLong, "block_tables and ctx_lens must be int64");
  TORCH_CHECK(block_tables.dim() == 2 && block_tables.size(0) == q.size(0) &&
              ctx_lens.dim() == 1 && ctx_lens.size(0) == q.size(0), "bad rows");
  TORCH_CHECK(block_size >= 1, "block_size must be at least 1");
  TORCH_CHECK(block_tables.is_contiguous() && ctx_lens.is_contiguous(),
              "block_tables and ctx_lens must be contiguous");
  const int64_t* lens = ctx_lens.data_ptr<int64_t>();
  for (int64_t r = 0; r < q.size(0); ++r) {
    TORCH_CHECK(lens[r] >= 1 && lens[r] <= block_tables.size(1) * block_size, "ctx_lens[", r,
                "] out of range");
  }
}

}  // namespace

// q [rows, nh, hd]; k_cache, v_cache [slots, kvh, hd] (same dtype, CPU, contiguous);
// block_tables [rows, B] int64; ctx_lens [rows] int64 in [1, B * block_size]. -> [rows, nh, hd].
torch::Tensor paged_decode_attention(torch::Tensor q, torch::Tensor k_cache,
                                     torch::Tensor v_cache, torch::Tensor block_tables,
                                     torch::Tensor ctx_lens, double scale, int64_t block_size) {
  q = q.contiguous();
  block_tables = block_tables.contiguous();
  ctx_lens = ctx_lens.contiguous();
  check_attention_args(q, k_cache, v_cache, block_tables, ctx_lens, block_size);
  auto out = torch::empty_like(q);
  edgelora::by_dtype(q.scalar_type(), "paged_decode_attention", [&](auto element) {
    decode_attention<decltype(element)>(q, k_cache, v_cache, block_tables, ctx_lens, scale,
                                        block_size, out);
  });
  return out;
}

// A step whose every token is a decode row of the paged cache, row t = token t (worker.model
// Attention.forward), in one call instead of ~15 dispatched ops: rope on the q and k heads of
// qkv [T, (nh + 2 kvh) hd], k and v written to slot_mapping's slots, then the attention above.
// cos, sin [T, hd] (sin signed, as worker.model.apply_rope takes it) -> [T, nh * hd].
torch::Tensor paged_decode_step(torch::Tensor qkv, torch::Tensor cos, torch::Tensor sin,
                                torch::Tensor k_cache, torch::Tensor v_cache,
                                torch::Tensor slot_mapping, torch::Tensor block_tables,
                                torch::Tensor ctx_lens, int64_t num_heads, double scale,
                                int64_t block_size) {
  TORCH_CHECK(k_cache.dim() == 3 && qkv.dim() == 2 && num_heads >= 1, "bad ranks");
  const int64_t tokens = qkv.size(0), kvh = k_cache.size(1), hd = k_cache.size(2);
  TORCH_CHECK(hd % 2 == 0 && qkv.size(1) == (num_heads + 2 * kvh) * hd, "qkv's width");
  qkv = qkv.contiguous();
  cos = cos.reshape({tokens, hd}).contiguous();
  sin = sin.reshape({tokens, hd}).contiguous();
  slot_mapping = slot_mapping.contiguous();
  block_tables = block_tables.contiguous();
  ctx_lens = ctx_lens.contiguous();
  TORCH_CHECK(cos.scalar_type() == qkv.scalar_type() && sin.scalar_type() == qkv.scalar_type(),
              "cos and sin in qkv's dtype");
  TORCH_CHECK(slot_mapping.scalar_type() == torch::kLong && slot_mapping.dim() == 1 &&
              slot_mapping.size(0) == tokens, "one int64 slot per token");
  const int64_t* slots = slot_mapping.data_ptr<int64_t>();
  for (int64_t t = 0; t < tokens; ++t) {
    TORCH_CHECK(slots[t] >= 0 && slots[t] < k_cache.size(0), "slot_mapping[", t, "] out of range");
  }
  auto q = torch::empty({tokens, num_heads, hd}, qkv.options());
  check_attention_args(q, k_cache, v_cache, block_tables, ctx_lens, block_size);
  auto out = torch::empty_like(q);
  edgelora::by_dtype(q.scalar_type(), "paged_decode_step", [&](auto element) {
    using T = decltype(element);
    rope_and_store<T>(qkv, cos, sin, slot_mapping, q, k_cache, v_cache);
    decode_attention<T>(q, k_cache, v_cache, block_tables, ctx_lens, scale, block_size, out);
  });
  return out.view({tokens, num_heads * hd});
}
