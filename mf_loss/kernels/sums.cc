// The fused head's running sums (in place) and its weight-gradient product through OpenBLAS, with the threading
// every OpenBLAS product of the kernels uses (parallel_sgemm). Part of the translation unit cross_entropy.cc,
// after row_kernels.cc.

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
// and read back (a (Vt, H) share per chunk): sgemm with beta = 1 straight into the float32 total.
// OpenBLAS runs single-threaded on blocks of the total's rows spread over parallel_rows' threads: its own
// thread pool spins after each call (about 2^28 cycles by default) and takes a core from the MindSpore
// matmul that follows. The blocks are at least kMinProductRows rows (eight per thread at most, handed out as
// threads get free): each sgemm call packs the (n, H) rows anew, which at a large H costs more than a small
// block's product. Each element's sum over the n rows is the same whatever the blocks. (Figures:
// docs/design.md.)
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

// ---- products split over the threads, each part one single-threaded sgemm ----

namespace {

// C (m x n, row-major, ldc) = op(A) (m x k) @ op(B) (k x n) + beta * C on the threads, in a few sgemm calls of a
// part each. Each call packs its part of op(A) and of op(B) anew, so the work is split along m (every call packs
// all of op(B)) or along n (all of op(A)), whichever packs less (blocks of the classes handed out 8 per thread,
// as the chunk kernels do, would pack the (N, H) hidden again for each). The parts depend on the shapes alone (at most kSgemmParts, each at least 16 wide), never on
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

}  // namespace
