// The per-shard kernels: each row's statistics (mf_row_stats) and the gradient w.r.t. the logits
// (mf_logits_grad), one pass over the logits each, and the row state the fused head's kernels fold their
// blocks of classes into. Part of the translation unit cross_entropy.cc, after common.h.

namespace {

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
