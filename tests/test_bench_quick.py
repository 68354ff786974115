"""`python -m mf_loss.bench --quick` runs end to end: every implementation, finite numbers, JSON and PNG.

No timing is asserted (the numbers of a shared CI machine mean nothing); this proves the benchmark works.
"""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

from mf_loss import bench

REPO = Path(__file__).resolve().parents[1]


def test_quick_benchmark_reports_every_implementation(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "mf_loss.bench", "--quick", "--out", str(out)], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "[1/" in proc.stderr                          # progress lines
    assert "mf_loss fused (GRAPH)" in proc.stdout        # the table

    report = json.loads((out / "bench.json").read_text())
    expected = [impl for impl in bench.DEFAULT_IMPLS if impl != "torch" or bench._torch_available()]
    assert report["settings"]["impls"] == expected
    by_impl = {r["impl"]: r for r in report["results"]}
    assert sorted(by_impl) == sorted(expected)
    for impl, record in by_impl.items():
        assert record["errors"] == [], (impl, record["errors"])
        for pass_name in ("fwd", "fwdbwd"):
            measured = record["passes"][pass_name]
            for key in ("median_s", "min_s", "cpu_median_s"):
                assert math.isfinite(measured[key]) and measured[key] > 0, (impl, pass_name, key, measured[key])
        peak = record["passes"]["fwdbwd"]["peak_bytes"]
        assert peak is not None and math.isfinite(peak) and peak >= 0, (impl, peak)
    assert report["ratios"] and all(math.isfinite(v) for k, v in report["ratios"][0].items() if k.startswith("fused"))

    png = (out / "bench.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 1000
    # nothing left in the working directory by MindSpore (workers run in scratch directories)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_table_and_chart_from_a_hand_made_record(tmp_path):
    record = dict(impl="fused", label=bench.IMPLS["fused"], rows=4, vocab=8, dtype="float32", logits_bytes=128,
                  errors=[], passes={"fwdbwd": dict(median_s=0.002, min_s=0.001, cpu_median_s=0.002,
                                                    peak_bytes=128, peak_over_logits=1.0)})
    other = dict(record, impl="mint", label=bench.IMPLS["mint"],
                 passes={"fwdbwd": dict(median_s=0.004, min_s=0.003, cpu_median_s=0.004, peak_bytes=384,
                                        peak_over_logits=3.0)})
    table = bench.format_table([record, other])
    assert "2.00x" in table and "4x8" in table
    ratios = bench._ratios([record, other])
    assert ratios[0]["fused_over_mint_median"] == 0.5
    bench.write_chart(tmp_path / "chart.png", [record, other], {"cpu": "test cpu", "cpus": 2})
    assert (tmp_path / "chart.png").read_bytes()[:4] == b"\x89PNG"


def test_paired_turns_report_per_turn_ratios(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "-m", "mf_loss.bench", "--shapes", "64x512", "--impls", "fused,mint",
                           "--repeats", "2", "--json", str(out)], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["settings"]["paired_with_fused"]
    mint = next(r for r in report["results"] if r["impl"] == "mint")
    assert len(mint["paired"]["fwdbwd"]["ratios"]) == 2
    ratios = report["ratios"][0]
    for key in ("fused_over_mint_median", "fused_over_mint_min", "fused_over_mint_cpu_median"):
        assert math.isfinite(ratios[key]) and ratios[key] > 0


def test_inplace_variants_and_lm_head_run(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "-m", "mf_loss.bench", "--shapes", "64x512", "--impls",
                           "fused_inplace,fused_inplace_graph,torch" if bench._torch_available() else
                           "fused_inplace,fused_inplace_graph", "--lm-head", "16", "--repeats", "2",
                           "--passes", "fwdbwd", "--sequential", "--json", str(out)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["settings"]["lm_head"] == 16
    for record in report["results"]:
        assert record["errors"] == [], (record["impl"], record["errors"])
        measured = record["passes"]["fwdbwd"]
        assert math.isfinite(measured["median_s"]) and measured["median_s"] > 0, record["impl"]
