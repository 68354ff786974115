"""Peak memory of the lean paths, measured by the benchmark (`mf_loss.bench`: a fresh process per row, the
kernel's high-water mark over the first step after compilation, beyond the inputs and, for the head rows,
beyond the gradients of hidden and head_weight), in multiples of the size the logits have (in the inputs' dtype).

What is asserted is structure, not a machine's speed: the composed CrossEntropyLoss goes through its rows in
chunks, and the fused lm head never holds the logits, nor a (V, H) share of its weight gradient per chunk
(each chunk's share is added inside the sgemm that makes it). Each bound sits between what the lean structure
takes and what the structure it rules out would take, with room for the allocator's rounding; the measured
peaks are in docs/bench/README.md ("Memory tests").
"""
import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow
BENCH_TIMEOUT_S = 900


def bench_rows(tmp_path, *args, dtype="float32"):
    """{impl: peak over the logits' size} of one `mf_loss.bench` run (sequential, the memory step only)."""
    out = tmp_path / "bench.json"
    command = [sys.executable, "-m", "mf_loss.bench", "--dtypes", dtype, "--passes", "fwdbwd", "--repeats", "1",
               "--warmup", "0", "--sequential", "--json", str(out), *args]
    run = subprocess.run(command, capture_output=True, text=True, timeout=BENCH_TIMEOUT_S)
    assert run.returncode == 0, f"{' '.join(command)} failed:\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}"
    rows = {}
    for record in json.loads(out.read_text())["results"]:
        assert not record["errors"], record["errors"]
        rows[record["impl"]] = record["passes"]["fwdbwd"]["peak_over_logits"]
    return rows


def test_composed_cross_entropy_holds_the_gradient_and_chunks_not_its_temporaries(tmp_path):
    # 1024 x 32000 float32, 16 chunks of 64 rows: the chunks' gradients and their concatenation (2x), not
    # logits-sized temporaries per op (many times the logits).
    rows = bench_rows(tmp_path, "--impls", "composed,composed_pynative", "--shapes", "1024x32000")
    assert rows["composed"] < 2.6, rows
    assert rows["composed_pynative"] < 2.6, rows


def test_fused_head_never_holds_the_logits(tmp_path):
    # 1024 x 128256 x 256, automatic chunks: each chunk's (128256, 256) weight-gradient share would be 2x its
    # logits; it is added into the running sum inside the sgemm that makes it.
    rows = bench_rows(tmp_path, "--head", "256", "--impls", "linear_fused,linear_unfused", "--shapes", "1024x128256")
    assert rows["linear_fused"] < 0.12, rows
    assert rows["linear_unfused"] > 1.5, rows  # the same measurement sees the unfused step's logits + gradient


def test_half_precision_head_keeps_no_float32_copy_of_the_weight(tmp_path):
    # 2048 x 32000 x 1024 bfloat16: a float32 copy of the weight and a float32 sum of its gradient would be 2x
    # the logits on their own; the kernels read the weight in its dtype. The default for a half-precision
    # weight (the recomputing kernels) holds one block of classes and hidden and its gradient in float32;
    # grad_mode="forward" adds one float32 running sum of the weight gradient (1.0x these logits at H 1024).
    rows = bench_rows(tmp_path, "--head", "1024", "--impls", "linear_fused", "--shapes", "2048x32000",
                      dtype="bfloat16")
    assert rows["linear_fused"] < 0.4, rows
    forward = bench_rows(tmp_path, "--head", "1024", "--impls", "linear_fused", "--shapes", "2048x32000",
                         "--linear-option", "grad_mode=forward", dtype="bfloat16")
    assert forward["linear_fused"] < 1.6, forward


def test_fused_head_adds_the_hidden_gradient_in_place(tmp_path):
    # 1024 x 8000 x 2048 float32, 16 chunks of 64 rows: the hidden gradient is one buffer that each chunk's
    # rows are added into (per-chunk hidden parts and their concatenation would add N x H float32, 0.26x).
    rows = bench_rows(tmp_path, "--head", "2048", "--impls", "linear_fused", "--shapes", "1024x8000",
                      "--chunk-size", "64")
    assert rows["linear_fused"] < 0.95, rows
