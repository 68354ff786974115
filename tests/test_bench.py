"""The benchmark runs end to end and reports sane records; its report formatting from hand-made records.

No timing is asserted (a shared CI machine's numbers mean nothing): these prove the benchmark works and
that its table, chart, ratios and collective counting say what the records hold."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mf_loss import bench
from mf_loss.bench import mp2, report
from mf_loss.bench.chart import write_chart

REPO = Path(__file__).resolve().parents[1]


def _run_bench(tmp_path, *args, timeout=600):
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               PATH=str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""))
    proc = subprocess.run([sys.executable, "-m", "mf_loss.bench", *args], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _check_measured(record, passes=("fwd", "fwdbwd")):
    assert record["errors"] == [], (record["impl"], record["errors"])
    for pass_name in passes:
        measured = record["passes"][pass_name]
        for key in ("median_s", "min_s", "cpu_median_s"):
            assert math.isfinite(measured[key]) and measured[key] > 0, (record["impl"], pass_name, key, measured)
    fwdbwd = record["passes"]["fwdbwd"]
    assert fwdbwd["peak_bytes"] is not None and math.isfinite(fwdbwd["peak_bytes"]) and fwdbwd["peak_bytes"] >= 0
    assert 0 < fwdbwd["bandwidth_fraction"] < math.inf, record["impl"]


@pytest.mark.slow
def test_quick_benchmark_reports_every_implementation(tmp_path):
    out = tmp_path / "out"
    proc = _run_bench(tmp_path, "--quick", "--out", str(out))
    assert "[1/" in proc.stderr                                   # progress lines
    assert "mf_loss fused (GRAPH)" in proc.stdout                 # the table
    assert "memory bandwidth (measured):" in proc.stdout

    result = json.loads((out / "bench.json").read_text())
    expected = [i for i in bench.DEFAULT_IMPLS + bench.DEFAULT_HEAD_IMPLS
                if bench.IMPLS[i].framework != "torch" or bench.torch_available()]
    assert result["settings"]["impls"] == expected
    bandwidth = result["memory_bandwidth"]["median_bytes_per_s"]
    assert math.isfinite(bandwidth) and bandwidth > 1e8, result["memory_bandwidth"]  # > 0.1 GB/s: a real copy
    by_impl = {r["impl"]: r for r in result["results"]}
    assert sorted(by_impl) == sorted(expected)
    for impl, record in by_impl.items():
        assert record["head"] == (bench.cli.QUICK_HEAD if bench.IMPLS[impl].family == "head" else 0), record
        _check_measured(record)
    if bench.torch_available():
        options = by_impl["torch_linear"]["notes"]["torch_options"]
        assert options["requested"].startswith("LinearCrossEntropyOptions") and "batch_chunk_size" in options
    anchors = {entry["anchor"] for entry in result["ratios"]}
    assert anchors == {"fused", "linear_fused"}
    logits_ratios = next(e for e in result["ratios"] if e["anchor"] == "fused")
    assert all(math.isfinite(logits_ratios[f"fused_over_{i}_median"]) for i in expected
               if bench.IMPLS[i].family == "logits" and i != "fused")

    from PIL import Image
    with Image.open(out / "bench.png") as image:
        image.verify()
    with Image.open(out / "bench.png") as image:
        assert image.format == "PNG" and image.size[0] >= 800 and image.size[1] >= 400, image.size
    # nothing left in the working directory by MindSpore (workers run in scratch directories)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.slow
def test_paired_turns_report_per_turn_ratios_for_both_families(tmp_path):
    out = tmp_path / "bench.json"
    _run_bench(tmp_path, "--shapes", "64x512", "--head", "16", "--impls", "fused,mint,linear_fused,linear_unfused",
               "--repeats", "2", "--json", str(out))
    result = json.loads(out.read_text())
    assert result["settings"]["paired_with_anchor"]
    by_impl = {r["impl"]: r for r in result["results"]}
    mint = by_impl["mint"]
    _check_measured(mint)
    assert mint["paired"]["fwdbwd"]["anchor"] == "fused" and len(mint["paired"]["fwdbwd"]["ratios"]) == 2
    logits_ratios = next(e for e in result["ratios"] if e["anchor"] == "fused")
    for key in ("fused_over_mint_median", "fused_over_mint_min", "fused_over_mint_cpu_median"):
        assert math.isfinite(logits_ratios[key]) and logits_ratios[key] > 0
    _check_measured(by_impl["linear_unfused"])
    _check_measured(by_impl["linear_fused"])
    assert len(by_impl["linear_unfused"]["paired"]["fwdbwd"]["ratios"]) == 2


@pytest.mark.slow
def test_inplace_variants_lm_head_and_pynative_head_run(tmp_path):
    out = tmp_path / "bench.json"
    impls = ["fused_inplace", "fused_inplace_graph", "linear_fused_pynative"] + (["torch"] if bench.torch_available()
                                                                                  else [])
    _run_bench(tmp_path, "--shapes", "64x512", "--impls", ",".join(impls), "--lm-head", "16", "--head", "16",
               "--repeats", "2", "--passes", "fwdbwd", "--sequential", "--json", str(out))
    result = json.loads(out.read_text())
    assert result["settings"]["lm_head"] == 16
    assert sorted(r["impl"] for r in result["results"]) == sorted(impls)
    for record in result["results"]:
        if record["impl"] != "linear_fused_pynative":
            assert record["lm_head"] == 16
        _check_measured(record, passes=("fwdbwd",))


@pytest.mark.slow
@pytest.mark.distributed
def test_mp2_counts_the_collectives_of_the_compiled_step(tmp_path):
    out = tmp_path / "bench.json"
    _run_bench(tmp_path, "--shapes", "64x512", "--impls", "fused", "--repeats", "2", "--passes", "fwdbwd",
               "--mp2", "--json", str(out), timeout=900)
    (entry,) = json.loads(out.read_text())["mp2"]
    assert entry["ok"] and len(entry["ranks"]) == 2
    for rank in entry["ranks"]:
        for design in ("fused", "composed"):
            measured = rank["designs"][design]
            assert math.isfinite(measured["median_s"]) and measured["median_s"] > 0
            # one all-reduce of the (mp, N + 1, K) statistics block: 2 ranks x 65 rows x 4 floats x 4 bytes
            assert measured["collectives"]["counts"]["AllReduce"] == 1, measured["collectives"]
            assert measured["collectives"]["bytes_per_step"] == 2 * 65 * 4 * 4, measured["collectives"]


def _record(impl, median_s, peak_over_logits, head=0, errors=()):
    logits = 4 * 8 * 4
    passes = {} if errors else {"fwdbwd": dict(median_s=median_s, min_s=median_s / 2, cpu_median_s=median_s,
                                               peak_bytes=peak_over_logits * logits,
                                               peak_over_logits=peak_over_logits)}
    return dict(impl=impl, label=bench.IMPLS[impl].label, rows=4, vocab=8, dtype="float32", head=head, lm_head=0,
                logits_bytes=logits, errors=list(errors), passes=passes)


@pytest.mark.unit
def test_table_ratios_and_chart_from_hand_made_records(tmp_path):
    records = [_record("fused", 0.002, 1.0), _record("mint", 0.004, 3.0),
               _record("linear_fused", 0.001, 0.1, head=2, errors=["skipped: needs about 30.0 GiB, 20.0 GiB available"]),
               _record("linear_unfused", 0.003, 2.0, head=2)]
    report.add_bandwidth_fractions(records, bytes_per_s=1e6)
    assert records[0]["passes"]["fwdbwd"]["bandwidth_fraction"] == pytest.approx(3 * 128 / 0.002 / 1e6)
    table = report.format_table(records)
    assert "2.00x" in table and "3.00x" in table and "4x8 float32" in table and "head H=2" in table
    assert "! skipped: needs about 30.0 GiB" in table
    assert "19.2%" in table  # 3 x 128 bytes / 2 ms / 1 MB/s
    entries = report.ratios(records)
    logits_entry = next(e for e in entries if e["anchor"] == "fused")
    assert logits_entry["fused_over_mint_median"] == 0.5 and logits_entry["mint_fwdbwd_peak_over_logits"] == 3.0
    head_entry = next(e for e in entries if e["anchor"] == "linear_fused")
    assert not any(k.startswith("linear_fused_over_") for k in head_entry)  # no anchor measurement, no ratio
    assert not report.is_failure(records[2]["errors"][0]) and report.is_failure("worker exited 1: ValueError")

    path = tmp_path / "chart.png"
    write_chart(path, records, {"cpu": "test cpu", "cpus": 2},
                dict(median_bytes_per_s=1e10, best_bytes_per_s=1.1e10, array_bytes=1, repeats=1, method="test"))
    from PIL import Image
    with Image.open(path) as image:
        # 15 in wide; 1.4 in of title plus 0.9 in + 0.45 in a row for each of the two groups; 100 dpi
        assert image.format == "PNG" and image.size == (1500, 500), image.size


@pytest.mark.unit
def test_collectives_are_counted_from_the_last_ir_file(tmp_path):
    (tmp_path / "a_0001.ir").write_text("%1(x) = AllReduce(%0)\n    : (<Tensor[Float32], (2, 3)>) -> "
                                        "(<Tensor[Float32], (2, 3)>)\n")
    (tmp_path / "b_0002.ir").write_text(
        "%1(x) = MatMul(%0, %2)\n    : (<Tensor[Float32], (4, 4)>) -> (<Tensor[Float32], (4, 4)>)\n"
        "%3(y) = AllReduce(%1) {group: mp}\n    : (<Tensor[Float32], (2, 65, 4)>) -> (<Tensor[Float32], (2, 65, 4)>)\n"
        "%4(z) = PrimFunc_AllReduce(%3)\n    : (<Tensor[BFloat16], (16, 8)>) -> (<Tensor[BFloat16], (16, 8)>)\n")
    found = mp2.collectives_in_ir(tmp_path)
    assert found["ir_file"] == "b_0002.ir"
    assert found["counts"]["AllReduce"] == 2 and found["counts"]["AllGather"] == 0
    assert [c["shape"] for c in found["calls"]] == [[2, 65, 4], [16, 8]]
    assert found["bytes_per_step"] == 2 * 65 * 4 * 4 + 16 * 8 * 2


@pytest.mark.unit
def test_mp2_report_names_each_design_and_its_exchange():
    entry = dict(ok=True, rows=64, vocab=512, dtype="float32", head=16, mp=2, ranks=[dict(rank=0, designs=dict(
        linear_unfused=dict(median_s=0.01, min_s=0.008, collectives=dict(counts=dict(AllReduce=1, AllGather=0),
                                                                         bytes_per_step=2080)),
        linear_fused=dict(error="worker exited 1: ValueError")))])
    text = report.format_mp2(entry)
    assert "head H=16" in text and "AllReduce x1; 2080 bytes" in text and "linear_fused" in text
    assert "worker exited 1: ValueError" in text
    failed = report.format_mp2(dict(entry, ok=False, message="rank 1 failed: boom"))
    assert "failed" in failed and "rank 1 failed: boom" in failed


@pytest.mark.unit
def test_a_head_row_without_head_width_is_refused():
    args = bench.build_parser().parse_args(["--impls", "linear_unfused"])
    with pytest.raises(SystemExit, match="needs --head H"):
        bench.cli._settle(args)
    args = bench.build_parser().parse_args(["--impls", "fused,nonsense"])
    with pytest.raises(SystemExit, match="unknown implementation 'nonsense'"):
        bench.cli._settle(args)


@pytest.mark.unit
def test_linear_options_are_keywords_with_json_values():
    args = bench.build_parser().parse_args(["--head", "8", "--impls", "linear_fused", "--chunk-size", "128",
                                            "--linear-option", "backend=composed",
                                            "--linear-option", "complete_hidden_grad=false"])
    bench.cli._settle(args)
    assert args.linear_options == dict(backend="composed", complete_hidden_grad=False, chunk_size=128)
    with pytest.raises(SystemExit):
        bench.build_parser().parse_args(["--linear-option", "no-equals-sign"])


@pytest.mark.unit
def test_merge_reads_a_report_written_before_the_head_rows(tmp_path, capsys):
    fused, mint = _record("fused", 0.002, 1.0), _record("mint", 0.004, 3.0)
    for record in (fused, mint):
        del record["head"], record["lm_head"]
    mint["paired"] = {"fwdbwd": dict(fused_times_s=[0.002, 0.0021], fused_cpu_s=[0.002, 0.002],
                                     ratios=[0.5, 0.4], cpu_ratios=[0.5, 0.5])}
    old = dict(machine={"cpu": "test cpu", "cpus": 2}, results=[fused, mint],
               mp2=dict(ok=True, rows=4, vocab=8, dtype="float32", ranks=[dict(rank=0, backends=dict(
                   fused=dict(median_s=0.01, min_s=0.009, bytes_exchanged_per_step=160)))]))
    (tmp_path / "old.json").write_text(json.dumps(old))
    assert bench.main(["--merge", str(tmp_path / "old.json"), "--out", str(tmp_path / "merged")]) == 0
    merged = json.loads((tmp_path / "merged" / "bench.json").read_text())
    assert merged["ratios"][0]["fused_over_mint_median"] == pytest.approx(0.45)
    assert merged["ratios"][0]["fused_over_mint_min"] == pytest.approx(0.002 / 0.002)
    printed = capsys.readouterr().out
    assert "collectives per step: not counted; 160 bytes" in printed and "memory bandwidth: not measured" in printed
    assert (tmp_path / "merged" / "bench.png").exists()


@pytest.mark.unit
def test_a_worker_error_is_summarised_by_its_exception_and_message():
    from mf_loss.bench.runner import error_summary
    assert error_summary("[WARNING] noise\nTraceback (most recent call last):\n  x\nValueError: bad shape (3,)\n") \
        == "ValueError: bad shape (3,)"
    mindspore_style = ("Traceback (most recent call last):\n  x\nTypeError: \n-----\n- Kernel select failed:\n-----\n"
                       "Select CPU operator[StridedSlice] fail! Unsupported data type!\n")
    assert error_summary(mindspore_style) == ("TypeError: - Kernel select failed: Select CPU operator[StridedSlice] "
                                              "fail! Unsupported data type!")
