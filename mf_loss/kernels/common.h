// Shared by the kernel files: dtype conversion, blocks of a row as float32, stores, the row threads and the
// parameter checks. Part of the one translation unit cross_entropy.cc (which includes it first); everything
// here has internal linkage, so the library exports the extern "C" entry points and mf_kernel_abi_version only.
#pragma once

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

// ---- a block of a row as float32 ----

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

// ---- parameters ----

int64_t numel(int ndim, const int64_t *shape) {
  int64_t n = 1;
  for (int d = 0; d < ndim; ++d) n *= shape[d];
  return n;
}

int fail(const char *what) {
  std::fprintf(stderr, "mf_loss fused cross-entropy kernel: %s\n", what);
  return 1;
}

int fail_in(const char *kernel, const char *what) {
  std::string message = std::string(kernel) + ": " + what;
  return fail(message.c_str());
}

inline bool is_float_dtype(DType d) { return d == DType::kF32 || d == DType::kF16 || d == DType::kBF16; }

inline bool is_token(int ndim, const int64_t *shape, const char *dtype) {
  return std::strcmp(dtype, "int64") == 0 && numel(ndim, shape) == 1;
}

}  // namespace
