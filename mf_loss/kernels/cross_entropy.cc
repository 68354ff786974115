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
//
// One translation unit made of the files below (internal linkage across them, one compiler run):
//   common.h         dtype conversion, blocks as float32, stores, row threads, parameter checks
//   row_kernels.cc   elementary functions, row statistics and the logits gradient (mf_row_stats, mf_logits_grad)
//   sums.cc          in-place running sums, rows in float32, zeros, OpenBLAS threading (parallel_sgemm)
//   head_kernels.cc  the products with a head weight of any dtype and the fused head whole (mf_head_*)
#include "common.h"
#include "row_kernels.cc"
#include "sums.cc"
#include "head_kernels.cc"

// Version tag, so that a stale library is never taken for the current source.
#ifndef MF_KERNEL_ABI_VERSION
#error "MF_KERNEL_ABI_VERSION is set by mf_loss/kernels/build.py (its ABI_VERSION)"
#endif
extern "C" int mf_kernel_abi_version() { return MF_KERNEL_ABI_VERSION; }
