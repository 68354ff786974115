"""Fused CPU kernels for the two per-shard steps, through `ops.Custom(func_type="aot")`.

`local_row_stats` and `logits_grad` have the signatures and the results of `shard_math` (whose module
docstring defines them); each is ONE C++ kernel (`kernels/cross_entropy.cc`) that reads the logits once,
in their own dtype (float32, float16 or bfloat16, no float32 copy), does the maths in float32 with
double-precision sums, runs its rows on several threads, and (backward) writes the gradient once in
the logits' dtype.

The library is compiled on first use with the machine's C++ compiler (`$CXX`, else g++, c++, clang++)
into a cache directory the user owns: `$MF_LOSS_CACHE_DIR`, else `$XDG_CACHE_HOME/mf_loss`, else
`~/.cache/mf_loss`, in a sub-directory named by a hash of the source, the compiler and its flags.
Builds are atomic (a temporary file renamed into place, under a file lock), so processes started
together (msrun ranks) never load a half-written library. Nothing is written to the current directory:
MindSpore gets the prebuilt `.so` path, never the `.cc` (which it would compile into
`./custom_kernel_meta/`).

Threads: all CPUs of the process's affinity mask, or `$MF_LOSS_NUM_THREADS`. Instruction set: see
`isa_flags` (AVX-512 / AVX2 / baseline, chosen at run time from the CPU; the results do not depend on it).

Accuracy: the kernel's exp and tanh are within 1-2 ulp of the exact functions (probabilities below
FLT_MIN, exp(x) for x < -87.3, are flushed to 0, as MindSpore's Exp does) and its sums are taken in
double; MindSpore's CPU `Exp` is within about 3e-6 (relative, near 0; growing about 1e-6 per unit of |x|)
and its `Tanh` within 1e-4 for |x| in [3, 9], so the composed path, not this one, sets the size of the
differences between the two (tests/test_fused_kernels.py measures both against float64).

bfloat16 and float16 logits are passed to the kernels as they are (ops.Custom aot accepts them on CPU;
the kernel sees dtype strings "bfloat16" / "float16"), converted in registers, and the gradient is
rounded back to nearest-even exactly as MindSpore's Cast does.

`logits_grad_inplace` is the opt-in in-place backward (see `backends.select(..., inplace=True)`).
"""
import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import mindspore as ms
from mindspore import Tensor, ops

try:  # True while MindSpore compiles a graph (GRAPH mode, ms.jit), False when running eagerly
    from mindspore.graph.api import _run_in_jit
except ImportError:  # pragma: no cover - other MindSpore layouts
    def _run_in_jit():
        return False

SOURCE = Path(__file__).resolve().parent / "kernels" / "cross_entropy.cc"
LIBRARY_NAME = "libmf_cross_entropy.so"
ABI_VERSION = 1
# -ffp-contract=off: no fused multiply-adds, so results do not depend on the instruction set;
# -fno-trapping-math: lets gcc vectorise the branch-free selects (FP exception flags are never read).
# Never -ffast-math: inf and NaN must behave as IEEE says.
BASE_FLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC", "-pthread", "-ffp-contract=off", "-fno-trapping-math")

_cast = ops.Cast()


class FusedKernelUnavailable(RuntimeError):
    """The fused kernel cannot be built or loaded on this machine (no compiler, failed build, ...)."""


def cpu_flags() -> frozenset:
    """The instruction-set flags of this machine's CPU (Linux /proc/cpuinfo), empty when unknown."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as info:
            for line in info:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


_AVX512 = ("avx512f", "avx512bw", "avx512vl", "avx512dq", "fma", "f16c")


def isa_flags(flags=None) -> tuple:
    """Instruction-set flags for this machine's CPU, from a runtime check (/proc/cpuinfo), never
    -march=native: the flags are part of the cache key, so a library only ever runs on a CPU that has
    its instructions, and a cache shared by different machines holds one build per instruction set.
    AVX-512 when present (2x AVX2 for the exp-bound kernels), else AVX2 + FMA + F16C, else the x86-64
    baseline. `$MF_LOSS_ISA` = "avx512", "avx2" or "baseline" caps it. AVX-512 and AVX2 builds give the
    same bits (fixed summation lanes, no FMA contraction, the same explicit FMAs in exp); the baseline
    build differs from them by at most an ulp in exp."""
    flags = cpu_flags() if flags is None else frozenset(flags)
    cap = os.environ.get("MF_LOSS_ISA", "avx512")
    if cap == "avx512" and set(_AVX512) <= flags:
        return ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c",
                "-mprefer-vector-width=512")
    if cap in ("avx512", "avx2") and {"avx2", "fma", "f16c"} <= flags:
        return ("-mavx2", "-mfma", "-mf16c")
    return ()


def find_compiler() -> str:
    """Path of the C++ compiler to use: `$CXX`, else g++, c++, clang++ on PATH."""
    candidates = [os.environ["CXX"]] if os.environ.get("CXX") else ["g++", "c++", "clang++"]
    for name in candidates:
        path = shutil.which(name)
        if path:
            return path
    raise FusedKernelUnavailable(
        f"the fused cross-entropy kernel needs a C++ compiler and none was found (looked for "
        f"{', '.join(candidates)} on PATH). Install g++ (e.g. `apt-get install g++`), set $CXX, or use "
        "backend='composed'")


def cache_root() -> Path:
    if os.environ.get("MF_LOSS_CACHE_DIR"):
        return Path(os.environ["MF_LOSS_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "mf_loss"


def _compiler_identity(compiler: str) -> str:
    try:
        out = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=60)
        return out.stdout
    except (OSError, subprocess.SubprocessError) as err:
        raise FusedKernelUnavailable(f"cannot run the C++ compiler {compiler}: {err}") from err


def build_command(compiler: str, output: str) -> list:
    return [compiler, *BASE_FLAGS, *isa_flags(), "-o", output, str(SOURCE)]


def _own_directory(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
        info = path.stat()
    except OSError as err:
        raise FusedKernelUnavailable(f"cannot create the kernel cache {path}: {err}. Set $MF_LOSS_CACHE_DIR to a "
                                     "writable directory of your own") from err
    if hasattr(os, "getuid") and info.st_uid != os.getuid():
        raise FusedKernelUnavailable(
            f"the kernel cache {path} belongs to another user; refusing to load code from it. Set "
            "$MF_LOSS_CACHE_DIR to a directory of your own")
    if info.st_mode & 0o022:
        raise FusedKernelUnavailable(
            f"the kernel cache {path} is writable by others; refusing to load code from it. Set "
            "$MF_LOSS_CACHE_DIR to a directory only you can write, or `chmod go-w` it")


def _library_is_valid(path: Path) -> bool:
    try:
        lib = ctypes.CDLL(str(path))
        version = lib.mf_kernel_abi_version
        version.restype = ctypes.c_int
        return version() == ABI_VERSION and hasattr(lib, "mf_row_stats4") and hasattr(lib, "mf_row_stats5") and hasattr(lib, "mf_logits_grad")
    except (OSError, AttributeError):
        return False


def build(force: bool = False) -> Path:
    """Compile the kernel library if the cache does not hold it yet; returns its path."""
    if not SOURCE.is_file():
        raise FusedKernelUnavailable(f"the kernel source {SOURCE} is missing from this installation")
    compiler = find_compiler()
    source = SOURCE.read_bytes()
    key = hashlib.sha256()
    for part in (source, compiler.encode(), _compiler_identity(compiler).encode(),
                 " ".join(build_command("CXX", "OUT")).encode()):
        key.update(part)
        key.update(b"\0")
    root = cache_root()
    directory = root / key.hexdigest()[:20]
    _own_directory(root)
    _own_directory(directory)
    library = directory / LIBRARY_NAME
    if not force and library.is_file() and _library_is_valid(library):
        return library
    with open(directory / ".lock", "w") as lock:
        try:
            import fcntl
            fcntl.flock(lock, fcntl.LOCK_EX)
        except (ImportError, OSError):
            pass  # the rename below keeps concurrent builds safe without the lock, only wasteful
        if not force and library.is_file() and _library_is_valid(library):
            return library  # another process built it while we waited
        fd, temporary = tempfile.mkstemp(prefix=".build-", suffix=".so", dir=directory)
        os.close(fd)
        try:
            command = build_command(compiler, temporary)
            try:
                result = subprocess.run(command, capture_output=True, text=True, timeout=600)
            except (OSError, subprocess.SubprocessError) as err:
                raise FusedKernelUnavailable(f"compiling the fused kernel failed: {err}") from err
            if result.returncode != 0:
                raise FusedKernelUnavailable(
                    f"compiling the fused kernel failed (exit {result.returncode}):\n  {' '.join(command)}\n"
                    f"{result.stderr.strip()[-4000:]}")
            os.chmod(temporary, 0o755)
            os.replace(temporary, library)  # atomic: readers see the old file or the whole new one
        finally:
            if os.path.exists(temporary):
                os.unlink(temporary)
    if not _library_is_valid(library):
        raise FusedKernelUnavailable(f"the fused kernel library {library} was built but cannot be loaded")
    return library


# ---- the MindSpore operators (created by `load()`) ----

_lock = threading.Lock()
_library = None
_row_stats_4 = None
_row_stats_5 = None
_logits_grad = None
_logits_grad_inplace = None
_depend = ops.Depend()


def _stats_shape_4(logits_shape, *other_shapes):
    return (logits_shape[0], 4)


def _stats_shape_5(logits_shape, *other_shapes):
    return (logits_shape[0], 5)


def _float32(*dtypes):
    return ms.float32


def _int64(*dtypes):
    return ms.int64


def _same_as_logits(first, *others):
    return first


def _token_shape(*shapes):
    return (1,)


def load() -> Path:
    """Build (once per machine) and load the kernels; raises FusedKernelUnavailable when impossible."""
    global _library, _row_stats_4, _row_stats_5, _logits_grad, _logits_grad_inplace
    with _lock:
        if _library is None:
            library = build()
            try:
                stats_4 = ops.Custom(f"{library}:mf_row_stats4", out_shape=_stats_shape_4, out_dtype=_float32,
                                     func_type="aot")
                stats_5 = ops.Custom(f"{library}:mf_row_stats5", out_shape=_stats_shape_5, out_dtype=_float32,
                                     func_type="aot")
                grad = ops.Custom(f"{library}:mf_logits_grad", out_shape=_same_as_logits,
                                  out_dtype=_same_as_logits, func_type="aot")
                grad_inplace = ops.Custom(f"{library}:mf_logits_grad_inplace", out_shape=_token_shape,
                                          out_dtype=_int64, func_type="aot")
            except (TypeError, ValueError, RuntimeError) as err:
                # e.g. $MS_CUSTOM_AOT_WHITE_LIST set to a directory that does not hold the cache
                raise FusedKernelUnavailable(
                    f"MindSpore refused the fused kernel library {library}: {err}. If "
                    "$MS_CUSTOM_AOT_WHITE_LIST is set, point $MF_LOSS_CACHE_DIR inside it") from err
            _row_stats_4, _row_stats_5, _logits_grad, _logits_grad_inplace = stats_4, stats_5, grad, grad_inplace
            _library = library
    return _library


def is_loaded() -> bool:
    return _library is not None


# ---- the two per-shard steps (signatures of shard_math) ----
# Plain functions over module-level primitives, as in shard_math: MindSpore parses them into GRAPH-mode
# graphs (custom bprops included) and runs them eagerly in PYNATIVE.

def _kernel_target(label, target_probs, vocab_start: int):
    """Class ids in this slice's index space (the kernels' view), or the slice's target probabilities."""
    if target_probs is not None:
        return target_probs
    target = _cast(label, ms.int32)
    if vocab_start != 0:
        target = target - vocab_start
    return target


def local_row_stats(logits, label, target_probs, weight, vocab_start: int, softcap, label_smoothing: float):
    """This rank's (N, K) row statistics; see `shard_math.local_row_stats`."""
    config = Tensor([0.0 if softcap is None else softcap, 0.0], ms.float32)
    target = _kernel_target(label, target_probs, vocab_start)
    if label_smoothing > 0:
        if weight is None:
            return _row_stats_5(logits, target, config)
        return _row_stats_5(logits, target, weight, config)
    if weight is None:
        return _row_stats_4(logits, target, config)
    return _row_stats_4(logits, target, weight, config)


def _run_grad_kernel(kernel, logits, label, target_probs, weight, vocab_start: int, softcap, row_max, log_sum_exp,
                     a, b, q, label_smoothing: float):
    """One of the two backward kernels (out of place or in place) on the shard_math arguments."""
    config = Tensor([0.0 if softcap is None else softcap, 1.0 if label_smoothing > 0 else 0.0], ms.float32)
    target = _kernel_target(label, target_probs, vocab_start)
    if weight is None:
        return kernel(logits, target, row_max, log_sum_exp, a, b, q, config)
    return kernel(logits, target, weight, row_max, log_sum_exp, a, b, q, config)


def logits_grad(logits, label, target_probs, weight, vocab_start: int, softcap, row_max, log_sum_exp, a, b, q,
                label_smoothing: float):
    """Gradient w.r.t. this rank's logits slice (N, Vl) in the logits' dtype; see `shard_math.logits_grad`."""
    return _run_grad_kernel(_logits_grad, logits, label, target_probs, weight, vocab_start, softcap, row_max,
                            log_sum_exp, a, b, q, label_smoothing)


def logits_grad_inplace(logits, label, target_probs, weight, vocab_start: int, softcap, row_max, log_sum_exp, a, b,
                        q, label_smoothing: float):
    """`logits_grad` written over the logits' own buffer; returns the tensor that holds the gradient.

    The logits are destroyed (they hold the gradient afterwards). GRAPH mode / ms.jit: the gradient is
    the logits' graph value, ordered after the kernel by a Depend. PYNATIVE: MindSpore hands a view (a
    reshape, a slice) to a kernel as a private copy, so the kernel reports the address it wrote; when that
    is not the logits' own, the logits are intact and the gradient is computed out of place instead
    (correct, without the saving: pass 2-D logits that are not a view to get it). A non-contiguous view
    is first made contiguous (a copy, written over instead).
    """
    logits = logits.contiguous()
    token = _run_grad_kernel(_logits_grad_inplace, logits, label, target_probs, weight, vocab_start, softcap,
                             row_max, log_sum_exp, a, b, q, label_smoothing)
    if _run_in_jit() or ms.get_context("mode") == ms.GRAPH_MODE:  # @jit.cond: True
        return _depend(logits, token)
    if int(token.asnumpy()[0]) == logits.data_ptr():
        return logits
    return logits_grad(logits, label, target_probs, weight, vocab_start, softcap, row_max, log_sum_exp, a, b, q,
                       label_smoothing)
