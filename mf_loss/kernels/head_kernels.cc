// The fused head's products with a head weight of any float dtype (a chunk's logits, its hidden-gradient part)
// and the fused head whole, a block of classes at a time (mf_head_row_stats, mf_head_grads). Part of the
// translation unit cross_entropy.cc, after sums.cc.

// ---- the fused head's other two products, with a head weight of any float dtype ----
//
// A float16 / bfloat16 head weight is read in its own dtype: MindSpore's CPU matmul takes no bfloat16, and a
// float32 copy of the weight (or of vocabulary tiles of it, made by MindSpore kernels for each chunk) would be
// the largest buffer of the fused head. Each thread converts a block of the weight (at most kProductBlockBytes of float32) and hands it to sgemm.
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
    // sum over V is what parallelises (columns alone give each thread one sgemm over all of V, slower than
    // MindSpore's matmul at a large V): each span's product goes into its own float32 partial, and the
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
