// Fused per-shard cross-entropy kernels for MindSpore's ops.Custom(func_type="aot") on CPU.
//
// The maths is `mf_loss/ops/shard_math.py` (its module docstring is the specification); these kernels
// compute the same statistics and gradient in one pass over the logits each:
//
//   mf_row_stats   (logits, target, [weight], config) -> stats (N, K) float32
//   mf_logits_grad (logits, target, [weight], row_max, log_sum_exp, a, b, q, config) -> grad (N, Vl)
//
// and the fused head's helpers (scale, zeros, rows in float32, and through OpenBLAS's sgemm the
// products with the head weight in any float dtype: a chunk's logits, its hidden-gradient part added in
// place, the weight gradient's running sum += grad^T @ hidden rows), and the fused head whole in two
// kernels that go through blocks of classes for all rows (mf_head_row_stats, mf_head_grads; see there).
//
// logits (N, Vl) float32 / float16 / bfloat16, read in place in their own dtype, maths in float32 (sums
// in double). target is either (N,) int32 class ids LOCAL to this slice (label - vocab_start; anything
// outside [0, Vl) is owned by another rank) or (N, Vl) float32 / float16 / bfloat16 probabilities.
// weight (Vl,) float32 is present when nparam says so. config (2,) float32 = [softcap (0: none),
// label smoothing on (1) or off (0): only then is b * w subtracted, as in the composed gradient].
// K (4 or 5) is read from the output shape; the gradient is written in the logits' dtype.
//
// Build: g++ -O3 -std=c++17 -shared -fPIC -ffp-contract=off -fno-trapping-math [-mavx2 -mfma -mf16c |
// -mavx512f ... -mfma] (never -ffast-math: the inf / NaN semantics of the loss depend on IEEE
// comparisons). Every loop that touches a whole row is written lane-wise with selects instead of
// branches so that gcc vectorises it at -O3. Results do not depend on the vector width (sums use fixed
// lanes; the only fused multiply-adds are the explicit ones of exp, present in every FMA build, so
// AVX2 and AVX-512 builds agree bit for bit; a baseline SSE2 build differs by at most an ulp there).
#include <sched.h>
#if defined(__SSE2__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "cblas.h"  // OpenBLAS from the scipy-openblas32 wheel: its symbols carry a scipy_ prefix

namespace {

constexpr int64_t kBlock = 1024;        // elements of a row processed together (buffers stay in L1)
constexpr int kLanes = 16;              // independent accumulators of the float reductions
constexpr int64_t kWorkPerThread = 1 << 16;  // elements below which another thread is not worth it

enum class DType { kF32, kF16, kBF16, kI32, kOther };

DType parse_dtype(const char *name) {
  if (std::strcmp(name, "float32") == 0) return DType::kF32;
  if (std::strcmp(name, "float16") == 0) return DType::kF16;
  if (std::strcmp(name, "bfloat16") == 0) return DType::kBF16;
  if (std::strcmp(name, "int32") == 0) return DType::kI32;
  return DType::kOther;
}

inline float as_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline uint32_t as_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

// ---- dtype conversions (exact widening, round-to-nearest-even narrowing, as MindSpore's Cast) ----

inline float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t em = h & 0x7fffu;
  const float normal = as_float((em << 13) + (112u << 23));
  const float subnormal = static_cast<float>(static_cast<int32_t>(em)) * 0x1p-24f;  // exact, no denormal input
  uint32_t u = as_bits(em < 0x400u ? subnormal : normal);
  u = em >= 0x7c00u ? ((em << 13) | 0x7f800000u) : u;  // inf and NaN keep their payload
  return as_float(u | sign);
}

inline uint16_t float_to_half(float f) {
  uint32_t u = as_bits(f);
  const uint32_t sign = u & 0x80000000u;
  u ^= sign;
  // >= 65536 or inf: inf; NaN: quiet NaN
  const uint32_t big = u > 0x7f800000u ? 0x7e00u : 0x7c00u;
  // below 2^-14: the FPU rounds (to nearest even) when the value is added to 0.5
  const uint32_t small = as_bits(as_float(u) + 0.5f) - 0x3f000000u;
  // normal: re-bias the exponent and round the 13 dropped bits to nearest even
  const uint32_t normal = (u + (static_cast<uint32_t>(15 - 127) << 23) + 0xfffu + ((u >> 13) & 1u)) >> 13;
  const uint32_t h = u >= 0x47800000u ? big : (u < 0x38800000u ? small : normal);
  return static_cast<uint16_t>(h | (sign >> 16));
}

inline float bf16_to_float(uint16_t h) { return as_float(static_cast<uint32_t>(h) << 16); }

inline uint16_t float_to_bf16(float f) {
  const uint32_t u = as_bits(f);
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  const uint32_t nan = (u >> 16) | 0x40u;
  return static_cast<uint16_t>((f != f) ? nan : rounded);
}

// ---- elementary functions, branch free, accurate to about 1-2 ulp ----

// exp(x) in float32 (Cephes expf: Cody-Waite reduction and a degree-6 polynomial, max error about
// 1 ulp). `exp_core` assumes x <= 88.72 and not NaN: x < -104 (and -inf) give 0, results below
// FLT_MIN are correctly rounded subnormals (2^k as two normal factors).
// a * b + c, fused (one rounding) where the target has FMA (AVX2 / AVX-512 builds), else two roundings
inline float fmadd(float a, float b, float c) {
#if defined(__FMA__)
  return __builtin_fmaf(a, b, c);
#else
  return a * b + c;
#endif
}

inline float exp_poly(float xc, float *kf_out) {
#if defined(__SSE4_1__)
  const float kf = __builtin_rintf(xc * 1.44269504088896341f);  // round to nearest even (roundps)
#else
  float kf = xc * 1.44269504088896341f;
  kf = (kf + 12582912.0f) - 12582912.0f;  // round to nearest even (|kf| < 2^22)
#endif
  float r = fmadd(kf, -0.693359375f, xc);  // exact: kf * 0.693359375 has few bits
  r = fmadd(kf, 2.12194440e-4f, r);
  const float r2 = r * r;
  float p = 1.9875691500e-4f;
  p = fmadd(p, r, 1.3981999507e-3f);
  p = fmadd(p, r, 8.3334519073e-3f);
  p = fmadd(p, r, 4.1665795894e-2f);
  p = fmadd(p, r, 1.6666665459e-1f);
  p = fmadd(p, r, 5.0000001201e-1f);
  *kf_out = kf;
  return fmadd(p, r2, r) + 1.0f;
}

inline float exp_core(float x) {
  const float xc = x > -104.0f ? x : -104.0f;  // maxps
  float kf;
  const float p = exp_poly(xc, &kf);
  const int32_t k = static_cast<int32_t>(kf);  // in [-150, 128]
  const int32_t k1 = k >> 1;                   // arithmetic shift: floor(k / 2)
  const int32_t k2 = k - k1;
  const float s1 = as_float(static_cast<uint32_t>(k1 + 127) << 23);
  const float s2 = as_float(static_cast<uint32_t>(k2 + 127) << 23);
  return (p * s1) * s2;
}

// exp(x) for x <= 87 and not NaN (the softmax arguments x - max, x - max - lse), one scaling: results
// below FLT_MIN (x < -87.34) are flushed to 0, as MindSpore's CPU Exp and MXCSR's flush-to-zero do.
// Equal to exp_core wherever the result is a normal float.
inline float exp_small(float x) {
  constexpr float kMinNormal = -87.33654475f;  // log(FLT_MIN)
  const float xc = x > kMinNormal ? x : kMinNormal;
  float kf;
  const float p = exp_poly(xc, &kf);
  const float s = as_float(static_cast<uint32_t>(static_cast<int32_t>(kf) + 127) << 23);
  const float y = p * s;
  return x > kMinNormal ? y : 0.0f;
}

// exp(x) for every x: inf above 88.72, NaN stays NaN
inline float exp_f(float x) {
  const float xc = x < 88.8f ? x : 88.8f;  // minps (a NaN becomes 88.8 here and is restored below)
  float y = exp_core(xc);
  y = x > 88.72283935546875f ? std::numeric_limits<float>::infinity() : y;
  return (x != x) ? x : y;
}

// tanh(x) in float32 (Cephes tanhf): odd polynomial below 0.625, 1 - 2 / (exp(2|x|) + 1) above.
inline float tanh_f(float x) {
  const float z = x < 0.0f ? -x : x;
  const float s = x * x;
  float p = -5.70498872745e-3f;
  p = p * s + 2.06390887954e-2f;
  p = p * s - 5.37397155531e-2f;
  p = p * s + 1.33314422036e-1f;
  p = p * s - 3.33332819422e-1f;
  const float small = p * s * x + x;
  float large = 1.0f - 2.0f / (exp_f(z + z) + 1.0f);
  large = x < 0.0f ? -large : large;
  return z >= 0.625f ? large : small;
}

// ---- loading a block of a row as float32 (with the soft cap applied) ----

template <typename T>
inline float to_float(T v);
template <>
inline float to_float<float>(float v) { return v; }

struct Half { uint16_t bits; };
struct BF16 { uint16_t bits; };
template <>
inline float to_float<Half>(Half v) { return half_to_float(v.bits); }
template <>
inline float to_float<BF16>(BF16 v) { return bf16_to_float(v.bits); }

template <typename T>
inline T from_float(float v);
template <>
inline float from_float<float>(float v) { return v; }
template <>
inline Half from_float<Half>(float v) { return Half{float_to_half(v)}; }
template <>
inline BF16 from_float<BF16>(float v) { return BF16{float_to_bf16(v)}; }

template <typename T>
inline void load_block(const T *src, float *dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = to_float<T>(src[i]);
}

// x -> cap * tanh(x / cap), in the operation order of shard_math.softcapped
inline void softcap_block(float *x, int64_t n, float cap) {
  for (int64_t i = 0; i < n; ++i) x[i] = cap * tanh_f(x[i] / cap);
}

// ---- reductions over a block with fixed lanes (vectorisable without reassociation flags) ----

struct MaxNan {
  float max;
  bool nan;
};

// Native-width generic vectors for the max (its result does not depend on the order of the lanes).
#if defined(__AVX512F__)
constexpr int kMaxLanes = 16;
#elif defined(__AVX__)
constexpr int kMaxLanes = 8;
#else
constexpr int kMaxLanes = 4;
#endif
typedef float FVec __attribute__((vector_size(4 * kMaxLanes)));
typedef int32_t IVec __attribute__((vector_size(4 * kMaxLanes)));

inline MaxNan block_max(const float *x, int64_t n) {
  FVec lane0, lane1;
  IVec nan0, nan1;
  for (int j = 0; j < kMaxLanes; ++j) {
    lane0[j] = lane1[j] = -std::numeric_limits<float>::infinity();
    nan0[j] = nan1[j] = 0;
  }
  int64_t i = 0;
  for (; i + 2 * kMaxLanes <= n; i += 2 * kMaxLanes) {
    FVec v0, v1;
    std::memcpy(&v0, x + i, sizeof(v0));
    std::memcpy(&v1, x + i + kMaxLanes, sizeof(v1));
    lane0 = v0 > lane0 ? v0 : lane0;  // maxps semantics: NaN never replaces the running max
    lane1 = v1 > lane1 ? v1 : lane1;
    nan0 |= (v0 != v0);
    nan1 |= (v1 != v1);
  }
  MaxNan r{-std::numeric_limits<float>::infinity(), false};
  for (int j = 0; j < kMaxLanes; ++j) {
    r.max = lane0[j] > r.max ? lane0[j] : r.max;
    r.max = lane1[j] > r.max ? lane1[j] : r.max;
    r.nan = r.nan || nan0[j] != 0 || nan1[j] != 0;
  }
  for (; i < n; ++i) {
    const float v = x[i];
    r.max = v > r.max ? v : r.max;
    r.nan = r.nan || (v != v);
  }
  return r;
}

// sum of x[i] in double lanes
inline double block_sum(const float *x, int64_t n) {
  double lane[kLanes];
  for (int j = 0; j < kLanes; ++j) lane[j] = 0.0;
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int j = 0; j < kLanes; ++j) lane[j] += static_cast<double>(x[i + j]);
  for (; i < n; ++i) lane[0] += static_cast<double>(x[i]);
  double s = 0.0;
  for (int j = 0; j < kLanes; ++j) s += lane[j];
  return s;
}

// sum of x[i] * y[i] in double lanes (products of two floats are exact in double)
inline double block_dot(const float *x, const float *y, int64_t n) {
  double lane[kLanes];
  for (int j = 0; j < kLanes; ++j) lane[j] = 0.0;
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int j = 0; j < kLanes; ++j) lane[j] += static_cast<double>(x[i + j]) * static_cast<double>(y[i + j]);
  for (; i < n; ++i) lane[0] += static_cast<double>(x[i]) * static_cast<double>(y[i]);
  double s = 0.0;
  for (int j = 0; j < kLanes; ++j) s += lane[j];
  return s;
}

// ---- stores: non-temporal for outputs far larger than the caches (no read-for-ownership, no eviction of
// the logits being read), plain otherwise; the values written are the same ----

constexpr int64_t kStreamBytes = 16 << 20;

inline bool stream_output(int64_t rows, int64_t vocab, DType dtype) {
  const int64_t bytes = rows * vocab * (dtype == DType::kF32 ? 4 : 2);
  return bytes >= kStreamBytes;
}

inline void store_fence() {
#if defined(__SSE2__)
  _mm_sfence();
#endif
}

template <typename T>
inline void store_block(T *dst, const float *g, int64_t n, bool stream) {
  alignas(64) T converted[kBlock];
  T *target = stream ? converted : dst;
  for (int64_t i = 0; i < n; ++i) target[i] = from_float<T>(g[i]);
  if (!stream) return;
#if defined(__SSE2__)
  // head until 16-byte aligned, then 16-byte non-temporal stores, then the tail
  const int64_t per = 16 / static_cast<int64_t>(sizeof(T));
  int64_t i = 0;
  while (i < n && (reinterpret_cast<uintptr_t>(dst + i) & 15u) != 0) {
    dst[i] = converted[i];
    ++i;
  }
  for (; i + per <= n; i += per) {
    __m128i v;
    std::memcpy(&v, converted + i, 16);
    _mm_stream_si128(reinterpret_cast<__m128i *>(dst + i), v);
  }
  for (; i < n; ++i) dst[i] = converted[i];
#else
  std::memcpy(static_cast<void *>(dst), converted, sizeof(T) * n);
#endif
}

template <>
inline void store_block<float>(float *dst, const float *g, int64_t n, bool stream) {
  if (!stream) {
    std::memcpy(dst, g, sizeof(float) * n);
    return;
  }
#if defined(__SSE2__)
  int64_t i = 0;
  while (i < n && (reinterpret_cast<uintptr_t>(dst + i) & 15u) != 0) {
    dst[i] = g[i];
    ++i;
  }
#if defined(__AVX512F__)
  for (; i + 16 <= n && (reinterpret_cast<uintptr_t>(dst + i) & 63u) == 0; i += 16)
    _mm512_stream_ps(dst + i, _mm512_loadu_ps(g + i));
#endif
  for (; i + 4 <= n; i += 4) _mm_stream_ps(dst + i, _mm_loadu_ps(g + i));
  for (; i < n; ++i) dst[i] = g[i];
#else
  std::memcpy(dst, g, sizeof(float) * n);
#endif
}

// ---- threads ----

int thread_budget() {
  int n = 1;
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) == 0) {
    n = CPU_COUNT(&set);
  } else {
    n = static_cast<int>(std::thread::hardware_concurrency());
  }
  if (const char *env = std::getenv("MF_LOSS_NUM_THREADS")) {
    const int v = std::atoi(env);
    if (v > 0) n = v;
  }
  return std::max(1, n);
}

// Rows are handed out in chunks from a shared counter, the calling thread working too: on a busy machine
// a thread that is not scheduled holds up at most one chunk, never a fixed half of the rows. Each row is
// computed by one thread whatever the split, so results do not depend on the thread count.
template <typename F>
void parallel_rows(int64_t rows, int64_t row_len, F &&fn) {
  if (rows <= 0) return;
  const int64_t work = rows * std::max<int64_t>(row_len, 1);
  int64_t threads = std::min<int64_t>(thread_budget(), rows);
  threads = std::min<int64_t>(threads, std::max<int64_t>(1, work / kWorkPerThread));
  if (threads <= 1) {
    fn(0, rows);
    store_fence();
    return;
  }
  const int64_t min_chunk = std::max<int64_t>(1, (kWorkPerThread / 4) / std::max<int64_t>(row_len, 1));
  const int64_t chunk = std::max<int64_t>(min_chunk, rows / (threads * 16));
  std::atomic<int64_t> next{0};
  auto worker = [&fn, &next, rows, chunk] {
    for (;;) {
      const int64_t begin = next.fetch_add(chunk, std::memory_order_relaxed);
      if (begin >= rows) break;
      fn(begin, std::min(rows, begin + chunk));
    }
    store_fence();
  };
  std::vector<std::thread> pool;
  pool.reserve(threads - 1);
  for (int64_t t = 1; t < threads; ++t) pool.emplace_back(worker);
  worker();
  for (auto &th : pool) th.join();
}

// Runs fn(begin, end) over [0, n) in spans of 16k elements on the row threads (the element-wise in-place ops;
// each span's loop is over local restrict pointers, so that gcc vectorises it).
template <typename F>
void parallel_elements(int64_t n, F &&fn) {
  constexpr int64_t kSpan = 1 << 14;
  parallel_rows((n + kSpan - 1) / kSpan, kSpan, [&](int64_t b, int64_t e) { fn(b * kSpan, std::min(n, e * kSpan)); });
}

// The (1,) int64 token of an in-place entry point: the address it wrote (PYNATIVE compares it with the
// tensor's own; in GRAPH mode it orders the write before the tensor's next use).
void write_address_token(void *token, const void *written) {
  static_cast<int64_t *>(token)[0] = static_cast<int64_t>(reinterpret_cast<intptr_t>(written));
}

// ---- the forward: per-row statistics ----

struct StatsArgs {
  const void *logits;
  const int32_t *label;   // local class ids, or nullptr
  const void *probs;      // (N, V) probabilities, or nullptr
  DType probs_dtype;
  const float *weight;    // (V,) or nullptr
  float cap;              // 0: no soft cap
  int64_t rows, vocab;
  int64_t cols;           // K
  float *out;
};

template <typename T>
inline void load_row_block(const T *row, int64_t start, int64_t n, float cap, float *x) {
  load_block<T>(row + start, x, n);
  if (cap != 0.0f) softcap_block(x, n, cap);
}

// The block as float32: the row itself for float32 logits without a soft cap, else converted into `buffer`.
template <typename T>
inline const float *block_as_float(const T *row, int64_t start, int64_t n, float cap, float *buffer) {
  load_row_block<T>(row, start, n, cap, buffer);
  return buffer;
}
template <>
inline const float *block_as_float<float>(const float *row, int64_t start, int64_t n, float cap, float *buffer) {
  if (cap == 0.0f) return row + start;
  load_row_block<float>(row, start, n, cap, buffer);
  return buffer;
}

inline void load_probs_block(const void *probs, DType dt, int64_t offset, int64_t n, float *t) {
  switch (dt) {
    case DType::kF16: load_block<Half>(static_cast<const Half *>(probs) + offset, t, n); break;
    case DType::kBF16: load_block<BF16>(static_cast<const BF16 *>(probs) + offset, t, n); break;
    default: load_block<float>(static_cast<const float *>(probs) + offset, t, n); break;
  }
}

// One row's statistics while its classes go by in segments (the whole row for the per-shard kernel, one
// vocabulary block at a time for the fused head's kernel): the same sums and the same re-basing whatever
// the segments (sums in double, so their order changes nothing beyond double rounding).
struct RowState {
  float max = -std::numeric_limits<float>::infinity();  // running max of the finite-or-inf values
  float base = 0.0f;        // the max the exp sum is relative to (0 while everything is -inf)
  bool nan = false;
  bool has_target = false;  // the label's logit went by (label rows)
  float target_x = 0.0f;    // that logit (soft-capped)
  double sum_exp = 0.0;     // sum exp(x - base)
  double probs_x = 0.0, probs_mass = 0.0;  // sum w t x, sum w t  (probabilities)
  double smooth_x = 0.0, weight_sum = 0.0;  // sum w x, sum w      (label smoothing)
};

// Columns [0, n) of `row`, which are the slice's classes [first_class, first_class + n): `label` is the row's
// class id in the slice's index space (anything outside the segment is skipped), `weight` and `probs` (the
// row's probabilities, element offset `probs_offset`) are indexed by the slice's classes.
template <typename T>
void accumulate_row(RowState &state, const T *row, int64_t n, int64_t first_class, int64_t label,
                    const StatsArgs &args, int64_t probs_offset, float *x, float *e, float *t) {
  // the state in locals: the loops below write float buffers, which could alias a float member of `state`
  // (the compiler would then reload it in every iteration instead of vectorising)
  RowState s = state;
  const bool smoothing = args.cols > 4;
  for (int64_t start = 0; start < n; start += kBlock) {
    const int64_t m = std::min(kBlock, n - start);
    const int64_t cls = first_class + start;
    const float *xs = block_as_float<T>(row, start, m, args.cap, x);
    const MaxNan bm = block_max(xs, m);
    s.nan = s.nan || bm.nan;
    if (bm.max > s.max) {
      // re-base the running sum on the new max; while everything was -inf the sum is exactly 0
      if (s.max != -std::numeric_limits<float>::infinity())
        s.sum_exp *= std::exp(static_cast<double>(s.max) - static_cast<double>(bm.max));
      s.max = bm.max;
      s.base = s.max;
    }
    const float base = s.base;
    for (int64_t i = 0; i < m; ++i) e[i] = exp_small(xs[i] - base);  // x - base <= 0 (NaN, +inf: below)
    s.sum_exp += block_sum(e, m);
    if (args.probs != nullptr) {
      load_probs_block(args.probs, args.probs_dtype, probs_offset + start, m, t);
      if (args.weight != nullptr) {
        const float *w = args.weight + cls;
        for (int64_t i = 0; i < m; ++i) t[i] = t[i] * w[i];
      }
      s.probs_x += block_dot(t, xs, m);
      s.probs_mass += block_sum(t, m);
    } else if (label >= cls && label < cls + m) {
      s.target_x = xs[label - cls];
      s.has_target = true;
    }
    if (smoothing) {
      if (args.weight != nullptr) {
        s.smooth_x += block_dot(args.weight + cls, xs, m);
        s.weight_sum += block_sum(args.weight + cls, m);
      } else {
        s.smooth_x += block_sum(xs, m);
        s.weight_sum += static_cast<double>(m);
      }
    }
  }
  state = s;
}

// The row's statistics (K columns) from its state once every class went by.
void finish_row(const RowState &s, const StatsArgs &args, int64_t label, float *out) {
  const double b = static_cast<double>(s.base);
  float target_dot = 0.0f, mass = 0.0f;
  bool reads_target = args.probs != nullptr;
  if (args.probs != nullptr) {
    // sum w t (x - base); products with x = -inf give -inf (or NaN where w t = 0), as the composed sum
    target_dot = static_cast<float>(s.probs_x - b * s.probs_mass);
    mass = static_cast<float>(s.probs_mass);
  } else if (s.has_target) {
    mass = args.weight != nullptr ? args.weight[label] : 1.0f;
    target_dot = mass * (s.target_x - s.base);
    reads_target = true;
  }
  float row_max = s.base;
  float sum = static_cast<float>(s.sum_exp);
  float smooth = static_cast<float>(s.smooth_x - b * s.weight_sum);
  const float qnan = std::numeric_limits<float>::quiet_NaN();
  if (s.nan) {  // a NaN logit makes the row max NaN, and with it every statistic relative to it
    row_max = sum = smooth = qnan;
    if (reads_target) target_dot = qnan;
  } else if (s.max == std::numeric_limits<float>::infinity()) {
    sum = qnan;  // exp(inf - inf), as in the composed sum
  }
  out[0] = row_max;
  out[1] = sum;
  out[2] = target_dot;
  out[3] = mass;
  if (args.cols > 4) out[4] = smooth;
}

inline int64_t row_label(const StatsArgs &args, int64_t r) {
  return args.label != nullptr ? static_cast<int64_t>(args.label[r]) : -1;
}

template <typename T>
void row_stats(const StatsArgs &args, int64_t begin, int64_t end) {
  alignas(64) float x[kBlock];
  alignas(64) float e[kBlock];
  alignas(64) float t[kBlock];
  for (int64_t r = begin; r < end; ++r) {
    RowState s;
    const int64_t label = row_label(args, r);
    accumulate_row<T>(s, static_cast<const T *>(args.logits) + r * args.vocab, args.vocab, 0, label, args,
                      r * args.vocab, x, e, t);
    finish_row(s, args, label, args.out + r * args.cols);
  }
}

// ---- the backward: gradient w.r.t. the logits ----

struct GradArgs {
  const void *logits;
  const int32_t *label;
  const void *probs;
  DType probs_dtype;
  const float *weight;
  const float *row_max, *log_sum_exp, *a, *b, *q;
  float cap;
  bool smoothing;         // subtract b * w (label smoothing on)
  bool stream;            // non-temporal stores (large outputs)
  int64_t rows, vocab;    // vocab: the row's length (columns)
  int64_t first_class;    // the class of column 0 in the label's index space (`weight` is indexed by column)
  void *out;
};

template <typename T>
void logits_grad_rows(const GradArgs &args, int64_t begin, int64_t end) {
  alignas(64) float x[kBlock];
  alignas(64) float g[kBlock];
  alignas(64) float t[kBlock];
  const int64_t vocab = args.vocab;
  const float cap = args.cap;
  const float *weight = args.weight;
  for (int64_t r = begin; r < end; ++r) {
    const T *row = static_cast<const T *>(args.logits) + r * vocab;
    T *out = static_cast<T *>(args.out) + r * vocab;
    const float a = args.a[r], b = args.b[r], q = args.q[r];
    if (!(a != 0.0f || b != 0.0f || q != 0.0f)) {  // masked / ignored / zero upstream: exact zeros
      std::memset(static_cast<void *>(out), 0, sizeof(T) * vocab);
      continue;
    }
    const float m = args.row_max[r], lse = args.log_sum_exp[r];
    for (int64_t start = 0; start < vocab; start += kBlock) {
      const int64_t n = std::min(kBlock, vocab - start);
      load_row_block<T>(row, start, n, cap, x);
      int32_t unusual = 0;  // NaN or a positive argument (inconsistent statistics): take the exact path
      for (int64_t i = 0; i < n; ++i) {
        const float arg = (x[i] - m) - lse;
        g[i] = exp_small(arg) * a;
        unusual |= (arg != arg || arg > 80.0f) ? 1 : 0;
      }
      if (unusual) {
        for (int64_t i = 0; i < n; ++i) g[i] = exp_f((x[i] - m) - lse) * a;
      }
      if (args.smoothing) {
        if (weight != nullptr) {
          const float *w = weight + start;
          for (int64_t i = 0; i < n; ++i) g[i] = g[i] - b * w[i];
        } else {
          for (int64_t i = 0; i < n; ++i) g[i] = g[i] - b;
        }
      }
      if (args.probs != nullptr) {
        load_probs_block(args.probs, args.probs_dtype, r * vocab + start, n, t);
        if (weight != nullptr) {
          const float *w = weight + start;
          for (int64_t i = 0; i < n; ++i) g[i] = g[i] - (q * t[i]) * w[i];
        } else {
          for (int64_t i = 0; i < n; ++i) g[i] = g[i] - q * t[i];
        }
      } else {
        const int64_t y = static_cast<int64_t>(args.label[r]) - args.first_class;
        if (y >= start && y < start + n) {
          const float at_target = weight != nullptr ? q * weight[y] : q;
          g[y - start] = g[y - start] + (-at_target);
        }
      }
      if (cap != 0.0f) {
        for (int64_t i = 0; i < n; ++i) {
          const float u = x[i] / cap;
          g[i] = g[i] * (1.0f - u * u);
        }
      }
      store_block<T>(out + start, g, n, args.stream);
    }
  }
}

int64_t numel(int ndim, const int64_t *shape) {
  int64_t n = 1;
  for (int d = 0; d < ndim; ++d) n *= shape[d];
  return n;
}

int fail(const char *what) {
  std::fprintf(stderr, "mf_loss fused cross-entropy kernel: %s\n", what);
  return 1;
}

// Inputs shared by both kernels: logits, target, optional weight. Returns the index after them.
int parse_common(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, int fixed_after,
                 DType *logits_dtype, int64_t *rows, int64_t *vocab, const int32_t **label, const void **probs,
                 DType *probs_dtype, const float **weight) {
  // nparam = logits, target, [weight], fixed_after inputs, 1 output
  const int with_weight = nparam - 3 - fixed_after;
  if (with_weight != 0 && with_weight != 1) return -1;
  if (ndims[0] != 2) return -1;
  *logits_dtype = parse_dtype(dtypes[0]);
  if (*logits_dtype != DType::kF32 && *logits_dtype != DType::kF16 && *logits_dtype != DType::kBF16) return -1;
  *rows = shapes[0][0];
  *vocab = shapes[0][1];
  const DType target_dtype = parse_dtype(dtypes[1]);
  *label = nullptr;
  *probs = nullptr;
  if (target_dtype == DType::kI32) {
    if (numel(ndims[1], shapes[1]) != *rows) return -1;
    *label = static_cast<const int32_t *>(params[1]);
  } else if (target_dtype == DType::kF32 || target_dtype == DType::kF16 || target_dtype == DType::kBF16) {
    if (numel(ndims[1], shapes[1]) != *rows * *vocab) return -1;
    *probs = params[1];
    *probs_dtype = target_dtype;
  } else {
    return -1;
  }
  *weight = nullptr;
  if (with_weight) {
    if (parse_dtype(dtypes[2]) != DType::kF32 || numel(ndims[2], shapes[2]) != *vocab) return -1;
    *weight = static_cast<const float *>(params[2]);
  }
  return 2 + with_weight;
}

// config: float32 [softcap or 0, label smoothing flag]; returns false when malformed
bool read_config(void *config, int ndim, const int64_t *shape, const char *dtype, float *cap, bool *smoothing) {
  if (parse_dtype(dtype) != DType::kF32 || numel(ndim, shape) != 2) return false;
  const float *c = static_cast<const float *>(config);
  *cap = c[0];
  *smoothing = c[1] != 0.0f;
  return c[0] == c[0];
}

// Runs `rows_fn<T>` over every row, T the logits' element type.
template <typename Args>
using RowsFn = void (*)(const Args &, int64_t, int64_t);

template <typename Args>
void run_rows(DType logits_dtype, const Args &args, RowsFn<Args> half, RowsFn<Args> bf16, RowsFn<Args> f32) {
  const RowsFn<Args> rows_fn = logits_dtype == DType::kF16 ? half : logits_dtype == DType::kBF16 ? bf16 : f32;
  parallel_rows(args.rows, args.vocab, [&](int64_t b, int64_t e) { rows_fn(args, b, e); });
}

int fail_in(const char *kernel, const char *what) {
  std::string message = std::string(kernel) + ": " + what;
  return fail(message.c_str());
}

// The backward, out of place (the gradient goes to the last parameter, shaped like the logits) or in place
// (over the logits, params[0]; the last parameter is a (1,) int64 token that receives the address written:
// PYNATIVE checks it, as MindSpore hands views to a kernel as private copies, and it orders the write before
// whatever uses the logits next). Each block of a row is read before it is written, so in place is exact.
int logits_grad(const char *kernel, bool in_place, int nparam, void **params, int *ndims, int64_t **shapes,
                const char **dtypes) {
  GradArgs args{};
  DType logits_dtype;
  const int next = parse_common(nparam, params, ndims, shapes, dtypes, 6, &logits_dtype, &args.rows, &args.vocab,
                                &args.label, &args.probs, &args.probs_dtype, &args.weight);
  if (next < 0) return fail_in(kernel, "unexpected inputs (shapes or dtypes)");
  const float **row_inputs[5] = {&args.row_max, &args.log_sum_exp, &args.a, &args.b, &args.q};
  for (int i = 0; i < 5; ++i) {
    if (parse_dtype(dtypes[next + i]) != DType::kF32 || numel(ndims[next + i], shapes[next + i]) != args.rows)
      return fail_in(kernel, "row_max, log_sum_exp, a, b, q must be (N,) float32");
    *row_inputs[i] = static_cast<const float *>(params[next + i]);
  }
  if (!read_config(params[next + 5], ndims[next + 5], shapes[next + 5], dtypes[next + 5], &args.cap,
                   &args.smoothing))
    return fail_in(kernel, "config must be (2,) float32");
  const int out = nparam - 1;
  if (in_place) {
    if (std::strcmp(dtypes[out], "int64") != 0 || numel(ndims[out], shapes[out]) != 1)
      return fail_in(kernel, "output must be a (1,) int64 token");
  } else if (parse_dtype(dtypes[out]) != logits_dtype || numel(ndims[out], shapes[out]) != args.rows * args.vocab) {
    return fail_in(kernel, "output must have the logits' shape and dtype");
  }
  args.logits = params[0];
  args.out = in_place ? params[0] : params[out];
  args.stream = stream_output(args.rows, args.vocab, logits_dtype);
  run_rows<GradArgs>(logits_dtype, args, logits_grad_rows<Half>, logits_grad_rows<BF16>, logits_grad_rows<float>);
  if (in_place) write_address_token(params[out], params[0]);
  return 0;
}

}  // namespace

extern "C" int mf_row_stats(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                            void *stream, void *extra) {
  (void)stream;
  (void)extra;
  StatsArgs args{};
  DType logits_dtype;
  const int next = parse_common(nparam, params, ndims, shapes, dtypes, 1, &logits_dtype, &args.rows, &args.vocab,
                                &args.label, &args.probs, &args.probs_dtype, &args.weight);
  if (next < 0) return fail("mf_row_stats: unexpected inputs (shapes or dtypes)");
  bool smoothing_unused;
  if (!read_config(params[next], ndims[next], shapes[next], dtypes[next], &args.cap, &smoothing_unused))
    return fail("mf_row_stats: config must be (2,) float32");
  const int out = nparam - 1;
  if (ndims[out] != 2 || shapes[out][0] != args.rows || (shapes[out][1] != 4 && shapes[out][1] != 5) ||
      parse_dtype(dtypes[out]) != DType::kF32)
    return fail("mf_row_stats: output must be (N, 4 or 5) float32");
  args.cols = shapes[out][1];
  args.logits = params[0];
  args.out = static_cast<float *>(params[out]);
  run_rows<StatsArgs>(logits_dtype, args, row_stats<Half>, row_stats<BF16>, row_stats<float>);
  return 0;
}

extern "C" int mf_logits_grad(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                              void *stream, void *extra) {
  (void)stream;
  (void)extra;
  return logits_grad("mf_logits_grad", false, nparam, params, ndims, shapes, dtypes);
}

extern "C" int mf_logits_grad_inplace(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                                      void *stream, void *extra) {
  (void)stream;
  (void)extra;
  return logits_grad("mf_logits_grad_inplace", true, nparam, params, ndims, shapes, dtypes);
}

// The same kernel under the names the (N, 4) and (N, 5) operators use: MindSpore's PyNative op cache
// tells operators apart by their function, so each output shape needs its own name.
extern "C" int mf_row_stats4(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                             void *stream, void *extra) {
  return mf_row_stats(nparam, params, ndims, shapes, dtypes, stream, extra);
}

extern "C" int mf_row_stats5(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                             void *stream, void *extra) {
  return mf_row_stats(nparam, params, ndims, shapes, dtypes, stream, extra);
}

namespace {

// ---- the fused head's running sums (element-wise, in place) ----
//
// The gradients are summed over row chunks in float32 buffers, in place, so that no second (V/mp, H) or (N, H)
// buffer exists next to the running total. Every in-place entry point's last parameter is a (1,) int64 token
// that receives the address written (PYNATIVE checks it; in GRAPH mode it orders the write before the
// buffer's next use).

template <typename T>
void scale_span(T *__restrict__ total, float factor, int64_t n) {
  for (int64_t i = 0; i < n; ++i) total[i] = from_float<T>(to_float(total[i]) * factor);
}

template <typename T>
void scale_by(void *total_ptr, float factor, int64_t n) {
  T *total = static_cast<T *>(total_ptr);
  parallel_elements(n, [=](int64_t b, int64_t e) { scale_span(total + b, factor, e - b); });
}

inline bool is_float_dtype(DType d) { return d == DType::kF32 || d == DType::kF16 || d == DType::kBF16; }

inline bool is_token(int ndim, const int64_t *shape, const char *dtype) {
  return std::strcmp(dtype, "int64") == 0 && numel(ndim, shape) == 1;
}

// params: total, factor (1,) float32, token.
int scale_entry(const char *kernel, int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes) {
  const DType total_dtype = nparam == 3 ? parse_dtype(dtypes[0]) : DType::kOther;
  if (nparam != 3 || !is_float_dtype(total_dtype) || parse_dtype(dtypes[1]) != DType::kF32 ||
      numel(ndims[1], shapes[1]) != 1 || !is_token(ndims[2], shapes[2], dtypes[2]))
    return fail_in(kernel, "expects a float total, (1,) float32 factor, (1,) int64 token");
  const int64_t n = numel(ndims[0], shapes[0]);
  const float factor = static_cast<const float *>(params[1])[0];
  if (total_dtype == DType::kF32) {
    scale_by<float>(params[0], factor, n);
  } else if (total_dtype == DType::kF16) {
    scale_by<Half>(params[0], factor, n);
  } else {
    scale_by<BF16>(params[0], factor, n);
  }
  write_address_token(params[2], params[0]);
  return 0;
}

template <typename T>
void rows_to_float(const void *matrix, const int64_t *row_ids, int64_t rows, int64_t cols, float *out) {
  const T *src = static_cast<const T *>(matrix);
  parallel_rows(rows, cols, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) load_block(src + row_ids[r] * cols, out + r * cols, cols);
  });
}

}  // namespace

// total *= factor[0] in place: the fused head's gradients, made in the forward
// for an upstream gradient of 1, is scaled by the real one in the backward without a second buffer.
extern "C" int mf_scale_inplace(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                                void *stream, void *extra) {
  (void)stream;
  (void)extra;
  return scale_entry("mf_scale_inplace", nparam, params, ndims, shapes, dtypes);
}

// out (R, H) float32 = matrix[row_ids] (matrix (N, H) float32 / float16 / bfloat16, row_ids (R,) int64 in
// [0, N)): a chunk of a half-precision hidden in float32 for the fused head's products, without a float32
// copy of the whole input (GRAPH mode on CPU slices no bfloat16 tensor).
extern "C" int mf_rows_float32(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                               void *stream, void *extra) {
  (void)stream;
  (void)extra;
  const DType dtype = nparam == 3 ? parse_dtype(dtypes[0]) : DType::kOther;
  if (nparam != 3 || !is_float_dtype(dtype) || ndims[0] != 2 || std::strcmp(dtypes[1], "int64") != 0 ||
      ndims[1] != 1 || parse_dtype(dtypes[2]) != DType::kF32 || ndims[2] != 2 || shapes[2][0] != shapes[1][0] ||
      shapes[2][1] != shapes[0][1])
    return fail("mf_rows_float32: expects matrix (V, H) float, row_ids (R,) int64, output (R, H) float32");
  const int64_t rows = shapes[1][0], cols = shapes[0][1];
  const int64_t *row_ids = static_cast<const int64_t *>(params[1]);
  for (int64_t r = 0; r < rows; ++r)
    if (row_ids[r] < 0 || row_ids[r] >= shapes[0][0]) return fail("mf_rows_float32: a row id is outside [0, V)");
  float *out = static_cast<float *>(params[2]);
  if (dtype == DType::kF32) {
    rows_to_float<float>(params[0], row_ids, rows, cols, out);
  } else if (dtype == DType::kF16) {
    rows_to_float<Half>(params[0], row_ids, rows, cols, out);
  } else {
    rows_to_float<BF16>(params[0], row_ids, rows, cols, out);
  }
  return 0;
}

// out = zeros with params[0]'s number of elements (params[0] is not read; the output's dtype is the
// operator's: float32, float16 or bfloat16): a fresh buffer for a running sum that is then written in place.
// A constant (ops.zeros) would be folded by GRAPH mode into one buffer that keeps its sum from call to call.
namespace {

int zeros_entry(const char *kernel, int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes) {
  const DType dtype = nparam == 2 ? parse_dtype(dtypes[1]) : DType::kOther;
  if (nparam != 2 || !is_float_dtype(dtype) || numel(ndims[0], shapes[0]) != numel(ndims[1], shapes[1]))
    return fail_in(kernel, "the output must be float and as large as the input");
  char *out = static_cast<char *>(params[1]);
  parallel_elements(numel(ndims[1], shapes[1]) * (dtype == DType::kF32 ? 4 : 2),
                    [=](int64_t b, int64_t e) { std::memset(out + b, 0, e - b); });
  return 0;
}

}  // namespace

extern "C" int mf_zeros(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *stream,
                        void *extra) {
  (void)stream;
  (void)extra;
  return zeros_entry("mf_zeros", nparam, params, ndims, shapes, dtypes);
}

// The same with a float32 output whatever the input's dtype. An entry point of its own: PYNATIVE caches a Custom
// operator's kernel by its function and its inputs, so one function behind two output dtypes gave a float32
// buffer to a bfloat16 weight's running sum once the float32 form had run on a tensor of the same shape.
extern "C" int mf_zeros_float32(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                                void *stream, void *extra) {
  (void)stream;
  (void)extra;
  return zeros_entry("mf_zeros_float32", nparam, params, ndims, shapes, dtypes);
}

// total[offset : offset + Vt] (rows of a (V, H) running sum) += grad^T @ rows, grad (n, Vt) and rows (n, H)
// float32, in place, so that the fused head's per-chunk share of the weight gradient is never written out
// and read back: at 2048 x 128256 x 256 in 128-row chunks each share and its addition moved about 0.5 GB
// per chunk: sgemm with beta = 1 straight into the float32 total.
// OpenBLAS runs single-threaded on blocks of the total's rows spread over parallel_rows' threads: its own
// thread pool spins after each call (about 2^28 cycles by default) and took a core from the MindSpore
// matmul that follows (1.46x the unfused step's time against 1.04x without the spin). The blocks are at least
// kMinProductRows rows (eight per thread at most, handed out as threads get free): each sgemm call packs the
// (n, H) rows anew, which at H 4096 cost more than the product itself in blocks of 64 rows. Each element's sum
// over the n rows is the same whatever the blocks.
namespace {

constexpr int64_t kMinProductRows = 256;
constexpr int64_t kProductBlockBytes = 4 << 20;

bool fits_openblas(int64_t a, int64_t b, int64_t c) { return a <= INT32_MAX && b <= INT32_MAX && c <= INT32_MAX; }

void openblas_single_threaded() {
  static std::once_flag once;
  std::call_once(once, [] { scipy_openblas_set_num_threads(1); });
}

int transposed_product_entry(const char *kernel, int nparam, void **params, int *ndims, int64_t **shapes,
                             const char **dtypes) {
  // params: total, grad, rows, offset (1,) int64 (total's first row), token
  if (nparam != 5 || parse_dtype(dtypes[0]) != DType::kF32 || ndims[0] != 2 || ndims[1] != 2 || ndims[2] != 2 ||
      parse_dtype(dtypes[1]) != DType::kF32 || parse_dtype(dtypes[2]) != DType::kF32 ||
      shapes[1][0] != shapes[2][0] || shapes[2][1] != shapes[0][1] || !is_token(ndims[3], shapes[3], dtypes[3]) ||
      !is_token(ndims[4], shapes[4], dtypes[4]))
    return fail_in(kernel, "expects total (V, H) float32, grad (n, Vt) and rows (n, H) float32, (1,) int64 offset, "
                           "(1,) int64 token");
  const int64_t vocab = shapes[0][0], hidden = shapes[0][1], rows = shapes[1][0], tile = shapes[1][1];
  const int64_t offset = static_cast<const int64_t *>(params[3])[0];
  if (offset < 0 || offset > vocab - tile)
    return fail_in(kernel, "the grad's columns do not fit in total at this offset");
  if (!fits_openblas(tile, hidden, rows)) return fail_in(kernel, "a dimension exceeds OpenBLAS's 32-bit sizes");
  openblas_single_threaded();
  const float *grad = static_cast<const float *>(params[1]), *rows_in = static_cast<const float *>(params[2]);
  if (rows > 0 && hidden > 0 && tile > 0) {
    const int64_t threads = thread_budget();
    const int64_t per_block = std::max(kMinProductRows, (tile + 8 * threads - 1) / (8 * threads));
    const int64_t blocks = (tile + per_block - 1) / per_block;
    float *total = static_cast<float *>(params[0]) + offset * hidden;
    // rows [b, e) of the share (rows of grad^T) added into the total's, one block per hand-out
    parallel_rows(blocks, per_block * rows * hidden, [&](int64_t first_block, int64_t end_block) {
      for (int64_t block = first_block; block < end_block; ++block) {
        const int64_t b = block * per_block, e = std::min(tile, b + per_block);
        scipy_cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, static_cast<int>(e - b), static_cast<int>(hidden),
                          static_cast<int>(rows), 1.0f, grad + b, static_cast<int>(tile), rows_in,
                          static_cast<int>(hidden), 1.0f, total + b * hidden, static_cast<int>(hidden));
      }
    });
  }
  write_address_token(params[4], params[0]);
  return 0;
}

}  // namespace

extern "C" int mf_accumulate_transposed_product(int nparam, void **params, int *ndims, int64_t **shapes,
                                                const char **dtypes, void *stream, void *extra) {
  (void)stream;
  (void)extra;
  return transposed_product_entry("mf_accumulate_transposed_product", nparam, params, ndims, shapes, dtypes);
}

// ---- the fused head's other two products, with a head weight of any float dtype ----
//
// A float16 / bfloat16 head weight is read in its own dtype: MindSpore's CPU matmul takes no bfloat16, and a
// float32 copy of the weight (or of vocabulary tiles of it, made by MindSpore kernels for each chunk) was the
// largest buffer of the fused head (4096 x 32000 x 256 bfloat16: 0.35x the logits with the copy). Each thread
// converts a block of the weight (at most kProductBlockBytes of float32) and hands it to sgemm.
//
//   mf_product_transposed   (a (n, H) float32, weight (V, H)) -> out (n, V) float32 = a @ weight^T
//                           (a chunk's logits; blocks of the weight's rows, one sgemm each: every element is
//                           one sgemm dot product over H, whatever the blocks)
//   mf_accumulate_product   (total (N, H) float32, a (n, V) float32, weight (V, H), offset (1,) int64, token)
//                           total[offset : offset + n] += a @ weight, in place (a chunk's part of the hidden
//                           gradient): spans of V x blocks of H's columns over the threads, each span into a
//                           float32 partial added in order at the end (see there).
namespace {

constexpr int64_t kWeightBlockRows = 512;  // rows of a half-precision weight converted for one sgemm
constexpr int64_t kColumnBlock = 256;       // columns of H per work item of mf_accumulate_product
constexpr int64_t kMaxSpans = 16;           // spans of V per work item of mf_accumulate_product, at most,
constexpr int64_t kPartialBytes = 8 << 20;  // and their float32 partials, at most

// rows [r0, r1) x columns [c0, c1) of a (rows, ld) matrix as float32: the matrix itself when float32 (its
// leading dimension in *block_ld), else converted into `buffer` (leading dimension c1 - c0)
const float *block_as_float32(const void *matrix, DType dtype, int64_t ld, int64_t r0, int64_t r1, int64_t c0,
                              int64_t c1, std::vector<float> &buffer, int64_t *block_ld) {
  if (dtype == DType::kF32) {
    *block_ld = ld;
    return static_cast<const float *>(matrix) + r0 * ld + c0;
  }
  const int64_t width = c1 - c0;
  buffer.resize(static_cast<size_t>((r1 - r0) * width));
  for (int64_t r = r0; r < r1; ++r) {
    float *dst = buffer.data() + (r - r0) * width;
    if (dtype == DType::kF16) {
      load_block(static_cast<const Half *>(matrix) + r * ld + c0, dst, width);
    } else {
      load_block(static_cast<const BF16 *>(matrix) + r * ld + c0, dst, width);
    }
  }
  *block_ld = width;
  return buffer.data();
}

int product_transposed_entry(const char *kernel, int nparam, void **params, int *ndims, int64_t **shapes,
                             const char **dtypes) {
  const DType weight_dtype = nparam == 3 ? parse_dtype(dtypes[1]) : DType::kOther;
  if (nparam != 3 || parse_dtype(dtypes[0]) != DType::kF32 || ndims[0] != 2 || !is_float_dtype(weight_dtype) ||
      ndims[1] != 2 || shapes[1][1] != shapes[0][1] || parse_dtype(dtypes[2]) != DType::kF32 || ndims[2] != 2 ||
      shapes[2][0] != shapes[0][0] || shapes[2][1] != shapes[1][0])
    return fail_in(kernel, "expects a (n, H) float32, weight (V, H) float, output (n, V) float32");
  const int64_t rows = shapes[0][0], hidden = shapes[0][1], vocab = shapes[1][0];
  if (!fits_openblas(rows, hidden, vocab)) return fail_in(kernel, "a dimension exceeds OpenBLAS's 32-bit sizes");
  float *out = static_cast<float *>(params[2]);
  if (rows == 0 || vocab == 0) return 0;
  if (hidden == 0) {
    std::memset(out, 0, static_cast<size_t>(rows * vocab) * sizeof(float));
    return 0;
  }
  openblas_single_threaded();
  const float *a = static_cast<const float *>(params[0]);
  const int64_t threads = thread_budget();
  const int64_t per_block = std::max<int64_t>(
      16, std::min((vocab + 8 * threads - 1) / (8 * threads), kProductBlockBytes / (4 * hidden)));
  const int64_t blocks = (vocab + per_block - 1) / per_block;
  parallel_rows(blocks, per_block * rows * hidden, [&](int64_t first_block, int64_t end_block) {
    std::vector<float> buffer;
    for (int64_t block = first_block; block < end_block; ++block) {
      const int64_t v0 = block * per_block, v1 = std::min(vocab, v0 + per_block);
      int64_t ld = 0;
      const float *w = block_as_float32(params[1], weight_dtype, hidden, v0, v1, 0, hidden, buffer, &ld);
      scipy_cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, static_cast<int>(rows), static_cast<int>(v1 - v0),
                        static_cast<int>(hidden), 1.0f, a, static_cast<int>(hidden), w, static_cast<int>(ld), 0.0f,
                        out + v0, static_cast<int>(vocab));
    }
  });
  return 0;
}

int accumulate_product_entry(const char *kernel, int nparam, void **params, int *ndims, int64_t **shapes,
                             const char **dtypes) {
  // params: total (N, H) float32, a (n, V) float32, weight (V, H), offset (1,) int64 (total's first row), token
  const DType weight_dtype = nparam == 5 ? parse_dtype(dtypes[2]) : DType::kOther;
  if (nparam != 5 || parse_dtype(dtypes[0]) != DType::kF32 || ndims[0] != 2 || parse_dtype(dtypes[1]) != DType::kF32 ||
      ndims[1] != 2 || !is_float_dtype(weight_dtype) || ndims[2] != 2 || shapes[2][0] != shapes[1][1] ||
      shapes[2][1] != shapes[0][1] || !is_token(ndims[3], shapes[3], dtypes[3]) ||
      !is_token(ndims[4], shapes[4], dtypes[4]))
    return fail_in(kernel, "expects total (N, H) float32, a (n, V) float32, weight (V, H) float, (1,) int64 offset, "
                           "(1,) int64 token");
  const int64_t total_rows = shapes[0][0], hidden = shapes[0][1], rows = shapes[1][0], vocab = shapes[1][1];
  const int64_t offset = static_cast<const int64_t *>(params[3])[0];
  if (offset < 0 || offset > total_rows - rows) return fail_in(kernel, "a's rows do not fit in total at this offset");
  if (!fits_openblas(rows, hidden, vocab)) return fail_in(kernel, "a dimension exceeds OpenBLAS's 32-bit sizes");
  if (rows > 0 && hidden > 0 && vocab > 0) {
    openblas_single_threaded();
    const float *a = static_cast<const float *>(params[1]);
    float *total = static_cast<float *>(params[0]) + offset * hidden;
    // Work items: spans of V x blocks of H's columns, both sized from the shapes alone. With a narrow (n, H) the
    // sum over V is what parallelises (columns alone gave each thread one sgemm over all of V, which at V 128k
    // was 10% slower than MindSpore's matmul): each span's product goes into its own float32 partial, and the
    // partials are added to total in span order afterwards, so the result does not depend on the threads.
    const int64_t partial_size = rows * hidden;
    // the partials' memory: at most kPartialBytes and an eighth of a's (the chunk's logits gradient)
    const int64_t partial_bytes = std::min<int64_t>(kPartialBytes, rows * vocab * 4 / 8);
    int64_t spans = std::max<int64_t>(1, std::min<int64_t>(kMaxSpans, partial_bytes / (4 * partial_size)));
    spans = std::min(spans, (vocab + kWeightBlockRows - 1) / kWeightBlockRows);
    const int64_t span_rows = (vocab + spans - 1) / spans;
    spans = (vocab + span_rows - 1) / span_rows;
    const int64_t width = std::min(hidden, kColumnBlock);
    const int64_t column_blocks = (hidden + width - 1) / width;
    // a float32 weight needs no conversion: one sgemm per item
    const int64_t weight_block_rows = weight_dtype == DType::kF32 ? span_rows : kWeightBlockRows;
    std::vector<float> partials(static_cast<size_t>(spans > 1 ? spans * partial_size : 0));
    parallel_rows(spans * column_blocks, rows * span_rows * width, [&](int64_t first_item, int64_t end_item) {
      std::vector<float> buffer;
      for (int64_t item = first_item; item < end_item; ++item) {
        const int64_t span = item / column_blocks, c0 = (item % column_blocks) * width;
        const int64_t c1 = std::min(hidden, c0 + width);
        const int64_t v_end = std::min(vocab, (span + 1) * span_rows);
        float *out = (spans > 1 ? partials.data() + span * partial_size : total) + c0;
        float beta = spans > 1 ? 0.0f : 1.0f;
        for (int64_t v0 = span * span_rows; v0 < v_end; v0 += weight_block_rows) {
          const int64_t v1 = std::min(v_end, v0 + weight_block_rows);
          int64_t ld = 0;
          const float *w = block_as_float32(params[2], weight_dtype, hidden, v0, v1, c0, c1, buffer, &ld);
          scipy_cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, static_cast<int>(rows),
                            static_cast<int>(c1 - c0), static_cast<int>(v1 - v0), 1.0f, a + v0,
                            static_cast<int>(vocab), w, static_cast<int>(ld), beta, out, static_cast<int>(hidden));
          beta = 1.0f;
        }
      }
    });
    if (spans > 1) {
      const float *p = partials.data();
      parallel_elements(partial_size, [=](int64_t b, int64_t e) {
        for (int64_t i = b; i < e; ++i) {
          float sum = total[i];
          for (int64_t span = 0; span < spans; ++span) sum += p[span * partial_size + i];
          total[i] = sum;
        }
      });
    }
  }
  write_address_token(params[4], params[0]);
  return 0;
}

}  // namespace

extern "C" int mf_product_transposed(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                                     void *stream, void *extra) {
  (void)stream;
  (void)extra;
  return product_transposed_entry("mf_product_transposed", nparam, params, ndims, shapes, dtypes);
}

extern "C" int mf_accumulate_product(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                                     void *stream, void *extra) {
  (void)stream;
  (void)extra;
  return accumulate_product_entry("mf_accumulate_product", nparam, params, ndims, shapes, dtypes);
}

// ---- the fused head whole: its statistics and gradients a vocabulary block at a time ----
//
//   mf_head_row_stats4/5 (hidden (N, H), weight (V, H), target (N,) int32, [class weight (V,) float32],
//                         config (2,) float32, block (1,) int64) -> stats (N, 4 or 5) float32
//   mf_head_grads        (hidden, weight, target, [class weight], row_max, log_sum_exp, a, b, q (N,) float32,
//                         config, block) -> hidden_grad (N, H) float32, weight_grad (V, H) in weight's dtype
//                         (two outputs, every element written)
//
// Cut Cross-Entropy's order, on the CPU: the classes go by in blocks of `block`; each block's logits are made
// for ALL rows (hidden and weight of any float dtype, one sgemm per block of rows). The forward folds them
// into every row's running statistics (`accumulate_row`, the per-shard kernel's own step). The backward
// writes their gradient over them (`logits_grad_rows`); its product with all rows is the block's rows of the
// weight gradient, complete in one sgemm and rounded once to the weight's dtype (no running sum over chunks
// of rows: a half-precision weight needs no compensation buffer), and its product with the block's weight
// rows is added to the float32 hidden gradient. The weight is read, and a half-precision one converted, once
// per call. What exists beside the inputs and outputs is one block: its logits (N x block float32), its
// weight rows and their gradient in float32, and hidden in float32 when it is half precision.
namespace {

struct HeadCall {
  const void *hidden, *weight;
  DType hidden_dtype, weight_dtype;
  const int32_t *label;       // (N,) class ids local to the slice
  const float *class_weight;  // (V,) or nullptr
  int64_t rows, vocab, width, block;
};

// hidden, weight, target, [class weight], then `fixed` parameters; returns the index after the class weight, or -1
int parse_head(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, int fixed,
               HeadCall *head) {
  const int with_weight = nparam - 3 - fixed;
  if (with_weight != 0 && with_weight != 1) return -1;
  head->hidden_dtype = parse_dtype(dtypes[0]);
  head->weight_dtype = parse_dtype(dtypes[1]);
  if (ndims[0] != 2 || ndims[1] != 2 || !is_float_dtype(head->hidden_dtype) || !is_float_dtype(head->weight_dtype) ||
      shapes[0][1] != shapes[1][1])
    return -1;
  head->rows = shapes[0][0];
  head->width = shapes[0][1];
  head->vocab = shapes[1][0];
  if (parse_dtype(dtypes[2]) != DType::kI32 || numel(ndims[2], shapes[2]) != head->rows) return -1;
  head->hidden = params[0];
  head->weight = params[1];
  head->label = static_cast<const int32_t *>(params[2]);
  head->class_weight = nullptr;
  if (with_weight) {
    if (parse_dtype(dtypes[3]) != DType::kF32 || numel(ndims[3], shapes[3]) != head->vocab) return -1;
    head->class_weight = static_cast<const float *>(params[3]);
  }
  return 3 + with_weight;
}

// C (m x n, row-major, ldc) = op(A) (m x k) @ op(B) (k x n) + beta * C on the threads, in a few sgemm calls of a
// part each. Each call packs its part of op(A) and of op(B) anew, so the work is split along m (every call packs
// all of op(B)) or along n (all of op(A)), whichever packs less (blocks of the classes handed out 8 per thread,
// as the chunk kernels do, packed the (N, H) hidden again for each: 1.46x the forward design's time at 2048 x
// 32000 x 4096). The parts depend on the shapes alone (at most kSgemmParts, each at least 16 wide), never on
// the threads: OpenBLAS takes other kernels for small products, whose sums round differently.
constexpr int64_t kSgemmParts = 8;

void parallel_sgemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, const float *a, int64_t lda,
                    const float *b, int64_t ldb, float beta, float *c, int64_t ldc) {
  if (m <= 0 || n <= 0) return;
  const bool split_m = n <= m;  // packing all of op(B) per call costs k * n, all of op(A) k * m
  const int64_t extent = split_m ? m : n;
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(kSgemmParts, extent / 16));
  const int64_t per = (extent + parts - 1) / parts;
  parallel_rows(parts, per * (split_m ? n : m) * std::max<int64_t>(k, 1), [&](int64_t first, int64_t end) {
    for (int64_t part = first; part < end; ++part) {
      const int64_t lo = part * per, hi = std::min(extent, lo + per);
      if (lo >= hi) continue;
      const float *a_part = a, *b_part = b;
      float *c_part = c;
      int64_t rows = m, cols = n;
      if (split_m) {
        a_part = trans_a ? a + lo : a + lo * lda;
        c_part = c + lo * ldc;
        rows = hi - lo;
      } else {
        b_part = trans_b ? b + lo * ldb : b + lo;
        c_part = c + lo;
        cols = hi - lo;
      }
      scipy_cblas_sgemm(CblasRowMajor, trans_a ? CblasTrans : CblasNoTrans, trans_b ? CblasTrans : CblasNoTrans,
                        static_cast<int>(rows), static_cast<int>(cols), static_cast<int>(k), 1.0f, a_part,
                        static_cast<int>(lda), b_part, static_cast<int>(ldb), beta, c_part, static_cast<int>(ldc));
    }
  });
}

// fn(v0, columns, logits, w, w_ld) for each block of classes [v0, v0 + columns) in order: `logits` (N, columns)
// float32 = hidden @ weight[v0 : v0 + columns]^T (fn may write over it), `w` those weight rows in float32
// (leading dimension w_ld); `h32` is hidden in float32 (leading dimension h_ld). rows > 0.
template <typename F>
void for_each_block(const HeadCall &head, const float *h32, int64_t h_ld, F &&fn) {
  const int64_t rows = head.rows, width = head.width;
  std::vector<float> logits(static_cast<size_t>(rows * std::min(head.block, head.vocab))), weight_buffer;
  for (int64_t v0 = 0; v0 < head.vocab; v0 += head.block) {
    const int64_t columns = std::min(head.block, head.vocab - v0);
    int64_t w_ld = 0;
    const float *w = block_as_float32(head.weight, head.weight_dtype, width, v0, v0 + columns, 0, width,
                                      weight_buffer, &w_ld);
    float *x = logits.data();
    if (width == 0) {
      std::memset(x, 0, static_cast<size_t>(rows * columns) * sizeof(float));
    } else {
      parallel_sgemm(false, true, rows, columns, width, h32, h_ld, w, w_ld, 0.0f, x, columns);
    }
    fn(v0, columns, x, w, w_ld);
  }
}

// config and block of a head kernel at params[at], params[at + 1]; false when malformed
bool read_head_options(void **params, int *ndims, int64_t **shapes, const char **dtypes, int at, float *cap,
                       bool *smoothing, HeadCall *head) {
  if (!read_config(params[at], ndims[at], shapes[at], dtypes[at], cap, smoothing) ||
      !is_token(ndims[at + 1], shapes[at + 1], dtypes[at + 1]))
    return false;
  head->block = static_cast<const int64_t *>(params[at + 1])[0];
  return head->block >= 1;
}

int head_row_stats_entry(const char *kernel, int nparam, void **params, int *ndims, int64_t **shapes,
                         const char **dtypes) {
  HeadCall head{};
  StatsArgs args{};
  bool smoothing_unused = false;
  const int next = parse_head(nparam, params, ndims, shapes, dtypes, 3, &head);
  const int out = nparam - 1;
  if (next < 0 || !read_head_options(params, ndims, shapes, dtypes, next, &args.cap, &smoothing_unused, &head) ||
      ndims[out] != 2 || shapes[out][0] != head.rows || (shapes[out][1] != 4 && shapes[out][1] != 5) ||
      parse_dtype(dtypes[out]) != DType::kF32)
    return fail_in(kernel, "expects hidden (N, H) float, weight (V, H) float, target (N,) int32, [class weight (V,) "
                           "float32], config (2,) float32, block (1,) int64 >= 1, stats (N, 4 or 5) float32");
  if (!fits_openblas(head.rows, head.vocab, head.width))
    return fail_in(kernel, "a dimension exceeds OpenBLAS's 32-bit sizes");
  args.label = head.label;
  args.weight = head.class_weight;
  args.rows = head.rows;
  args.vocab = head.vocab;
  args.cols = shapes[out][1];
  args.out = static_cast<float *>(params[out]);
  std::vector<RowState> states(static_cast<size_t>(head.rows));
  if (head.rows > 0) {
    openblas_single_threaded();
    std::vector<float> hidden_buffer;
    int64_t h_ld = 0;
    const float *h32 = block_as_float32(head.hidden, head.hidden_dtype, head.width, 0, head.rows, 0, head.width,
                                        hidden_buffer, &h_ld);
    for_each_block(head, h32, h_ld, [&](int64_t v0, int64_t columns, const float *logits, const float *, int64_t) {
      parallel_rows(head.rows, columns, [&](int64_t b, int64_t e) {
        alignas(64) float x[kBlock];
        alignas(64) float ex[kBlock];
        for (int64_t r = b; r < e; ++r)
          accumulate_row<float>(states[r], logits + r * columns, columns, v0, row_label(args, r), args, 0, x, ex,
                                nullptr);
      });
    });
  }
  parallel_rows(head.rows, head.vocab, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) finish_row(states[r], args, row_label(args, r), args.out + r * args.cols);
  });
  return 0;
}

template <typename T>
void store_rows(void *total, int64_t first, const float *values, int64_t n) {
  store_block<T>(static_cast<T *>(total) + first, values, n, false);
}

int head_grads_entry(const char *kernel, int nparam, void **params, int *ndims, int64_t **shapes,
                     const char **dtypes) {
  HeadCall head{};
  GradArgs args{};
  const int next = parse_head(nparam, params, ndims, shapes, dtypes, 9, &head);
  const int hg = nparam - 2, wg = nparam - 1;
  bool ok = next >= 0;
  for (int i = 0; ok && i < 5; ++i)
    ok = parse_dtype(dtypes[next + i]) == DType::kF32 && numel(ndims[next + i], shapes[next + i]) == head.rows;
  ok = ok && read_head_options(params, ndims, shapes, dtypes, next + 5, &args.cap, &args.smoothing, &head) &&
       parse_dtype(dtypes[hg]) == DType::kF32 && ndims[hg] == 2 && shapes[hg][0] == head.rows &&
       shapes[hg][1] == head.width && parse_dtype(dtypes[wg]) == head.weight_dtype && ndims[wg] == 2 &&
       shapes[wg][0] == head.vocab && shapes[wg][1] == head.width;
  if (!ok)
    return fail_in(kernel, "expects hidden (N, H) float, weight (V, H) float, target (N,) int32, [class weight (V,) "
                           "float32], row_max, log_sum_exp, a, b, q (N,) float32, config (2,) float32, block (1,) "
                           "int64 >= 1; outputs hidden_grad (N, H) float32, weight_grad (V, H) of weight's dtype");
  if (!fits_openblas(head.rows, head.vocab, head.width))
    return fail_in(kernel, "a dimension exceeds OpenBLAS's 32-bit sizes");
  const float **row_inputs[5] = {&args.row_max, &args.log_sum_exp, &args.a, &args.b, &args.q};
  for (int i = 0; i < 5; ++i) *row_inputs[i] = static_cast<const float *>(params[next + i]);
  float *hidden_grad = static_cast<float *>(params[hg]);
  void *weight_grad = params[wg];
  const int64_t rows = head.rows, width = head.width;
  const size_t weight_bytes = head.weight_dtype == DType::kF32 ? 4 : 2;
  std::memset(hidden_grad, 0, static_cast<size_t>(rows * width) * sizeof(float));
  if (rows == 0 || width == 0) {  // no rows: a zero weight gradient (H = 0: both are empty)
    std::memset(weight_grad, 0, static_cast<size_t>(head.vocab * width) * weight_bytes);
  } else {
    openblas_single_threaded();
    std::vector<float> hidden_buffer;
    int64_t h_ld = 0;
    const float *h32 = block_as_float32(head.hidden, head.hidden_dtype, width, 0, rows, 0, width, hidden_buffer,
                                        &h_ld);
    args.label = head.label;
    args.rows = rows;
    // the block's weight-gradient rows in float32 before they are rounded (a half-precision weight)
    std::vector<float> grad_buffer(
        static_cast<size_t>(head.weight_dtype == DType::kF32 ? 0 : std::min(head.block, head.vocab) * width));
    for_each_block(head, h32, h_ld, [&](int64_t v0, int64_t columns, float *logits, const float *w, int64_t w_ld) {
      args.logits = logits;
      args.out = logits;
      args.vocab = columns;
      args.first_class = v0;
      args.weight = head.class_weight != nullptr ? head.class_weight + v0 : nullptr;
      parallel_rows(rows, columns, [&](int64_t b, int64_t e) { logits_grad_rows<float>(args, b, e); });
      // the block's rows of the weight gradient: their sum over all rows in one product, rounded once
      float *block_grad = head.weight_dtype == DType::kF32 ? static_cast<float *>(weight_grad) + v0 * width
                                                           : grad_buffer.data();
      parallel_sgemm(true, false, columns, width, rows, logits, columns, h32, h_ld, 0.0f, block_grad, width);
      if (head.weight_dtype != DType::kF32) {
        const bool half = head.weight_dtype == DType::kF16;
        parallel_elements(columns * width, [&](int64_t b, int64_t e) {
          half ? store_rows<Half>(weight_grad, v0 * width + b, block_grad + b, e - b)
               : store_rows<BF16>(weight_grad, v0 * width + b, block_grad + b, e - b);
        });
      }
      // the block's part of the hidden gradient, added in block order
      parallel_sgemm(false, false, rows, width, columns, logits, columns, w, w_ld, 1.0f, hidden_grad, width);
    });
  }
  return 0;
}

}  // namespace

extern "C" int mf_head_row_stats4(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                                  void *stream, void *extra) {
  (void)stream;
  (void)extra;
  return head_row_stats_entry("mf_head_row_stats4", nparam, params, ndims, shapes, dtypes);
}

// the same under the name the (N, 5) operator uses (see mf_row_stats5)
extern "C" int mf_head_row_stats5(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                                  void *stream, void *extra) {
  (void)stream;
  (void)extra;
  return head_row_stats_entry("mf_head_row_stats5", nparam, params, ndims, shapes, dtypes);
}

extern "C" int mf_head_grads(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                             void *stream, void *extra) {
  (void)stream;
  (void)extra;
  return head_grads_entry("mf_head_grads", nparam, params, ndims, shapes, dtypes);
}

// Version tag, so that a stale library is never taken for the current source.
#ifndef MF_KERNEL_ABI_VERSION
#error "MF_KERNEL_ABI_VERSION is set by mf_loss/kernels/build.py (its ABI_VERSION)"
#endif
extern "C" int mf_kernel_abi_version() { return MF_KERNEL_ABI_VERSION; }
