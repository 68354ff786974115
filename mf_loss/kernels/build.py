"""Builds the fused cross-entropy kernel library: compiler, instruction set, cache, lock. No MindSpore.

The library is compiled on first use with the machine's C++ compiler (`$CXX`, else g++, c++, clang++)
into a cache directory the user owns: `$MF_LOSS_CACHE_DIR`, else `$XDG_CACHE_HOME/mf_loss`, else
`~/.cache/mf_loss`, in a sub-directory named by a hash of the sources, the compiler and its flags. The sources are
one translation unit: `cross_entropy.cc` includes the other files of this directory (one compiler run).
Builds are atomic (a temporary file renamed into place, under a file lock), so processes started
together (msrun ranks) never load a half-written library. Nothing is written to the current directory
(MindSpore, given a `.cc`, would compile it into `./custom_kernel_meta/`; it gets the built `.so`).
"""
import ctypes
import fcntl
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

KERNEL_DIR = Path(__file__).resolve().parent
SOURCE = KERNEL_DIR / "cross_entropy.cc"  # the translation unit; it includes the other .cc and .h files here
LIBRARY_NAME = "libmf_cross_entropy.so"
# The one place the ABI number is written: compiled in (-DMF_KERNEL_ABI_VERSION), returned by the library's
# mf_kernel_abi_version() and checked when it is loaded. Raise it when an entry point changes its parameters.
ABI_VERSION = 10
ENTRY_POINTS = ("mf_row_stats4", "mf_row_stats5", "mf_logits_grad", "mf_logits_grad_inplace", "mf_scale_inplace",
                "mf_rows_float32", "mf_zeros", "mf_zeros_float32", "mf_accumulate_transposed_product",
                "mf_product_transposed", "mf_accumulate_product", "mf_head_row_stats4", "mf_head_row_stats5",
                "mf_head_grads")
# -ffp-contract=off: no fused multiply-adds, so results do not depend on the instruction set;
# -fno-trapping-math: lets gcc vectorise the branch-free selects (FP exception flags are never read).
# Never -ffast-math: inf and NaN must behave as IEEE says.
BASE_FLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC", "-pthread", "-ffp-contract=off", "-fno-trapping-math")
_AVX512 = ("avx512f", "avx512bw", "avx512vl", "avx512dq", "fma", "f16c")


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


def isa_flags(flags=None) -> tuple:
    """Instruction-set flags for this machine's CPU, from a runtime check (/proc/cpuinfo), never
    -march=native: the flags are part of the cache key, so a library only ever runs on a CPU that has
    its instructions, and a cache shared by different machines holds one build per instruction set.
    AVX-512 when present (the exp-bound kernels' widest lanes), else AVX2 + FMA + F16C, else the x86-64
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


def openblas_flags() -> tuple:
    """Compiler and linker flags for OpenBLAS from the scipy-openblas32 wheel (a dependency of mf_loss; its
    symbols carry a scipy_ prefix, so it never clashes with another BLAS in the process): the header, the
    library, and an rpath to it, so that the built library finds it without $LD_LIBRARY_PATH."""
    try:
        import scipy_openblas32
    except ImportError as err:
        raise FusedKernelUnavailable("the fused kernels link OpenBLAS from the scipy-openblas32 package, which is "
                                     "not installed: `pip install scipy-openblas32`") from err
    library_dir = scipy_openblas32.get_lib_dir()
    return (f"-I{scipy_openblas32.get_include_dir()}", f"-L{library_dir}", f"-l{scipy_openblas32.get_library()}",
            f"-Wl,-rpath,{library_dir}")


def build_command(compiler: str, output: str) -> list:
    include, *link = openblas_flags()
    return [compiler, *BASE_FLAGS, f"-DMF_KERNEL_ABI_VERSION={ABI_VERSION}", *isa_flags(), include, "-o", output,
            str(SOURCE), *link]


def source_files() -> list:
    """Every kernel source file (the .cc and .h files beside this module), in a fixed order: the cache key hashes
    them all, so a change in any included file builds a new library."""
    return sorted(path for pattern in ("*.cc", "*.h") for path in KERNEL_DIR.glob(pattern))


def _compiler_identity(compiler: str) -> str:
    try:
        return subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError) as err:
        raise FusedKernelUnavailable(f"cannot run the C++ compiler {compiler}: {err}") from err


def _own_directory(path: Path) -> None:
    """Create `path` for this user only; refuse one that another user could have written code into."""
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


def library_is_valid(path: Path) -> bool:
    """True when `path` loads, has this source's ABI version and every entry point."""
    try:
        library = ctypes.CDLL(str(path))
        version = library.mf_kernel_abi_version
        version.restype = ctypes.c_int
        return version() == ABI_VERSION and all(hasattr(library, name) for name in ENTRY_POINTS)
    except (OSError, AttributeError):
        return False


def _compile(compiler: str, output: str) -> None:
    command = build_command(compiler, output)
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.SubprocessError) as err:
        raise FusedKernelUnavailable(f"compiling the fused kernel failed: {err}") from err
    if result.returncode != 0:
        raise FusedKernelUnavailable(f"compiling the fused kernel failed (exit {result.returncode}):\n  "
                                     f"{' '.join(command)}\n{result.stderr.strip()[-4000:]}")


def build(force: bool = False) -> Path:
    """Compile the kernel library if the cache does not hold it yet; returns its path."""
    if not SOURCE.is_file():
        raise FusedKernelUnavailable(f"the kernel source {SOURCE} is missing from this installation")
    compiler = find_compiler()
    key = hashlib.sha256()
    sources = [path.name.encode() + b"\0" + path.read_bytes() for path in source_files()]
    for part in (*sources, compiler.encode(), _compiler_identity(compiler).encode(),
                 " ".join(build_command("CXX", "OUT")).encode()):
        key.update(part)
        key.update(b"\0")
    root = cache_root()
    directory = root / key.hexdigest()[:20]
    _own_directory(root)
    _own_directory(directory)
    library = directory / LIBRARY_NAME
    if not force and library.is_file() and library_is_valid(library):
        return library
    with open(directory / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not force and library.is_file() and library_is_valid(library):
            return library  # another process built it while we waited
        fd, temporary = tempfile.mkstemp(prefix=".build-", suffix=".so", dir=directory)
        os.close(fd)
        try:
            _compile(compiler, temporary)
            os.chmod(temporary, 0o755)
            os.replace(temporary, library)  # atomic: readers see the old file or the whole new one
        finally:
            if os.path.exists(temporary):
                os.unlink(temporary)
    if not library_is_valid(library):
        raise FusedKernelUnavailable(f"the fused kernel library {library} was built but cannot be loaded")
    return library
