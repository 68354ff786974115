"""The kernel build (mf_loss.kernels.build): compiler discovery, instruction set, cache, lock, atomic rename.

Pure filesystem: none of it needs MindSpore, and a subprocess proves that the build imports none.
"""
import concurrent.futures
import os
import subprocess
import sys

import pytest

from mf_loss.kernels import build as kernel_build

pytestmark = [pytest.mark.unit, pytest.mark.kernel]

FAKE_COMPILER = """#!/bin/sh
# stands in for g++: answers --version, takes a second, then writes a prebuilt library to -o's path
if [ "$1" = "--version" ]; then echo "fake-cxx 1.0"; exit 0; fi
out=""; prev=""
for arg in "$@"; do if [ "$prev" = "-o" ]; then out="$arg"; fi; prev="$arg"; done
sleep 1
cp "$MF_TEST_PREBUILT" "$out"
"""


def test_build_needs_no_mindspore(tmp_path):
    # The module file alone, outside the package (whose __init__ imports the MindSpore cells): it builds.
    script = ("import importlib.util, sys; "
              f"spec = importlib.util.spec_from_file_location('kernel_build', {kernel_build.__file__!r}); "
              "build = importlib.util.module_from_spec(spec); spec.loader.exec_module(build); "
              "path = build.build(); assert build.library_is_valid(path); "
              "assert 'mindspore' not in sys.modules, 'mindspore imported'; print(path)")
    env = dict(os.environ, MF_LOSS_CACHE_DIR=str(tmp_path / "cache"))
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env,
                          cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().startswith(str(tmp_path / "cache"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache"]  # nothing in the working directory


def test_build_is_atomic_and_lands_in_the_cache_only(tmp_path, monkeypatch):
    """Two builders start at once on one empty cache (as msrun ranks do): both get the library, one file
    results, no temporary file is left, nothing is written to the working directory. A stand-in compiler
    copies the real library (the locking and the atomic rename are under test, not g++); the builders are
    threads, which flock excludes from each other exactly as it does processes."""
    compiler = tmp_path / "fake-cxx"
    compiler.write_text(FAKE_COMPILER)
    compiler.chmod(0o755)
    cache = tmp_path / "cache"
    monkeypatch.setenv("MF_TEST_PREBUILT", str(kernel_build.build()))
    monkeypatch.setenv("MF_LOSS_CACHE_DIR", str(cache))
    monkeypatch.setenv("CXX", str(compiler))
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        paths = set(pool.map(lambda _: kernel_build.build(), range(2)))
    assert len(paths) == 1
    library = paths.pop()
    assert library.is_file() and library.parent.parent == cache
    assert sorted(p.name for p in library.parent.iterdir() if p.name != ".lock") == [library.name]
    assert list(work.iterdir()) == []
    assert cache.stat().st_mode & 0o077 == 0
    stamp = library.stat().st_mtime_ns
    assert kernel_build.build() == library and library.stat().st_mtime_ns == stamp  # cached: not rebuilt


def test_cache_key_covers_every_included_source(tmp_path, monkeypatch):
    """The translation unit includes the other kernel files; a change in any of them builds a new library."""
    included = {kernel_build.SOURCE.name}
    pending = [kernel_build.SOURCE]
    while pending:
        for line in pending.pop().read_text().splitlines():
            if line.startswith('#include "') and line.split('"')[1] != "cblas.h":
                name = line.split('"')[1]
                if name not in included:
                    included.add(name)
                    pending.append(kernel_build.KERNEL_DIR / name)
    assert len(included) > 1
    assert {path.name for path in kernel_build.source_files()} == included
    sources = tmp_path / "kernels"
    sources.mkdir()
    for name in included:
        (sources / name).write_bytes((kernel_build.KERNEL_DIR / name).read_bytes())
    compiler = tmp_path / "fake-cxx"
    compiler.write_text(FAKE_COMPILER)
    compiler.chmod(0o755)
    monkeypatch.setenv("MF_TEST_PREBUILT", str(kernel_build.build()))
    monkeypatch.setenv("MF_LOSS_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("CXX", str(compiler))
    monkeypatch.setattr(kernel_build, "KERNEL_DIR", sources)
    monkeypatch.setattr(kernel_build, "SOURCE", sources / kernel_build.SOURCE.name)
    first = kernel_build.build()
    assert kernel_build.build() == first
    for name in sorted(included):
        with open(sources / name, "a") as source:
            source.write("\n// changed\n")
        changed = kernel_build.build()
        assert changed != first, f"a change in {name} did not change the cache key"
        first = changed


def test_failed_build_reports_the_compiler_error(monkeypatch, tmp_path):
    compiler = tmp_path / "broken-cxx"
    compiler.write_text('#!/bin/sh\nif [ "$1" = "--version" ]; then echo broken 1; exit 0; fi\n'
                        'echo "cross_entropy.cc:1: error: something is wrong" >&2\nexit 1\n')
    compiler.chmod(0o755)
    monkeypatch.setenv("CXX", str(compiler))
    monkeypatch.setenv("MF_LOSS_CACHE_DIR", str(tmp_path / "cache"))
    with pytest.raises(kernel_build.FusedKernelUnavailable,
                       match="(?s)compiling the fused kernel failed.*something is wrong"):
        kernel_build.build()
    leftovers = [p.name for p in (tmp_path / "cache").rglob("*") if p.is_file() and p.name != ".lock"]
    assert leftovers == []


def test_missing_compiler_names_what_to_install(monkeypatch):
    monkeypatch.setenv("CXX", "no-such-compiler-mf-loss")
    with pytest.raises(kernel_build.FusedKernelUnavailable, match="needs a C\\+\\+ compiler .*backend='composed'"):
        kernel_build.find_compiler()


def test_missing_openblas_names_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "scipy_openblas32", None)  # `import scipy_openblas32` raises ImportError
    with pytest.raises(kernel_build.FusedKernelUnavailable, match="pip install scipy-openblas32"):
        kernel_build.build_command("g++", "out.so")


def test_build_links_openblas_with_an_rpath():
    import scipy_openblas32
    command = kernel_build.build_command("g++", "out.so")
    library_dir = scipy_openblas32.get_lib_dir()
    assert f"-Wl,-rpath,{library_dir}" in command and f"-l{scipy_openblas32.get_library()}" in command
    assert command.index(str(kernel_build.SOURCE)) < command.index(f"-l{scipy_openblas32.get_library()}")


def test_cache_writable_by_others_is_refused(monkeypatch, tmp_path):
    cache = tmp_path / "shared-cache"
    cache.mkdir()
    cache.chmod(0o777)
    monkeypatch.setenv("MF_LOSS_CACHE_DIR", str(cache))
    with pytest.raises(kernel_build.FusedKernelUnavailable, match="writable by others"):
        kernel_build.build()


def test_isa_flags_follow_the_cpu_and_the_cap(monkeypatch):
    avx512 = {"avx512f", "avx512bw", "avx512vl", "avx512dq", "fma", "f16c", "avx2"}
    monkeypatch.delenv("MF_LOSS_ISA", raising=False)
    assert "-mavx512f" in kernel_build.isa_flags(avx512) and "-mfma" in kernel_build.isa_flags(avx512)
    assert kernel_build.isa_flags({"avx2", "fma", "f16c"}) == ("-mavx2", "-mfma", "-mf16c")
    assert kernel_build.isa_flags({"avx2", "f16c"}) == ()  # no FMA: baseline
    assert kernel_build.isa_flags({"sse2"}) == ()
    monkeypatch.setenv("MF_LOSS_ISA", "avx2")
    assert kernel_build.isa_flags(avx512) == ("-mavx2", "-mfma", "-mf16c")
    assert "-march=native" not in kernel_build.build_command("g++", "out.so")
