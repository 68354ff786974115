"""`mf-loss bench` / `python -m mf_loss.bench`: the command line, the plan of processes, and the outputs.

Every implementation runs in a FRESH process per configuration (peak memory is only visible in a process's
first step). By default each implementation runs beside a fresh process of its family's anchor (fused, or
linear_fused for the head rows), both set up and warmed up, and the two take steps in turns (A B B A ...):
the anchor / other ratio is taken per turn and its median reported, with the ratio of the minima and of
the CPU times. `--sequential` runs one process after the other instead; `--quick` (CI) runs tiny shapes,
two processes at a time, and proves that everything runs. See mf_loss/bench/impls.py for the rows."""
import argparse
import json
import os
import sys
import time
from pathlib import Path

from . import measure, report
from .impls import ANCHOR, DEFAULT_HEAD_IMPLS, DEFAULT_IMPLS, DTYPE_BYTES, IMPLS
from .runner import memory_skip, run_configs, run_pair, run_worker, serve_worker, spawn_worker, RESULT_MARK

QUICK_SHAPE, QUICK_HEAD = (256, 2048), 32


def _parse_shape(text: str):
    try:
        rows, vocab = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"shape must look like 4096x32000, got {text!r}") from None
    return rows, vocab


def _csv(kind):
    def parse(text):
        return [kind(v.strip()) for v in text.split(",") if v.strip()]
    return parse


def _keyword(text: str):
    key, separator, value = text.partition("=")
    if not separator or not key.isidentifier():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE with KEY a keyword name, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def torch_available() -> bool:
    import importlib.util
    return importlib.util.find_spec("torch") is not None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mf-loss bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", type=_csv(_parse_shape), default=None,
                        help="rows x vocabulary, comma separated (default 4096x32000,2048x128256)")
    parser.add_argument("--dtypes", type=_csv(str), default=None, help="float32, float16, bfloat16 (default float32)")
    parser.add_argument("--impls", type=_csv(str), default=None,
                        help=f"comma separated, of: {', '.join(IMPLS)} (default {', '.join(DEFAULT_IMPLS)}; "
                             f"with --head: {', '.join(DEFAULT_HEAD_IMPLS)})")
    parser.add_argument("--head", type=int, default=0, metavar="H",
                        help="the fused lm-head rows: hidden (rows, H), head_weight (vocab, H), labels; gradients "
                             "w.r.t. hidden and head_weight; peak beyond the inputs and those gradients")
    parser.add_argument("--chunk-size", type=int, default=None,
                        help="LinearCrossEntropyLoss(chunk_size=...) for the linear_fused rows (default: its own)")
    parser.add_argument("--linear-option", action="append", default=[], type=_keyword, metavar="KEY=VALUE",
                        help="another LinearCrossEntropyLoss keyword for the linear_fused rows (repeatable; the "
                             "value is read as JSON when it parses, else as a string), e.g. backend=composed")
    parser.add_argument("--passes", type=_csv(str), default=None, help="fwdbwd and/or fwd (default both)")
    parser.add_argument("--repeats", type=int, default=None, help="timed steps (turns) after warm-up (default 5)")
    parser.add_argument("--warmup", type=int, default=None,
                        help="untimed steps after the first (memory) step (default 1)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="repeat every process this many times and pool the timings")
    parser.add_argument("--out", type=Path, default=None, help="write bench.json and bench.png into this directory")
    parser.add_argument("--json", type=Path, default=None, help="write the JSON here")
    parser.add_argument("--png", type=Path, default=None, help="write the PNG chart here")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per worker process (default 900)")
    parser.add_argument("--jobs", type=int, default=None,
                        help="processes at once with --sequential (default 1: timings need a quiet machine)")
    parser.add_argument("--quick", action="store_true",
                        help="tiny shapes, 2 repeats, both passes in one process, every default row of both "
                             "families: proves it runs (CI)")
    parser.add_argument("--lm-head", type=int, default=0, metavar="H",
                        help="logits rows: make the logits inside the measured step from a (rows, H) hidden state "
                             "and a fixed (H, vocab) head (the peak then includes the logits themselves)")
    parser.add_argument("--mp2", action="store_true",
                        help="also run mp=2 under msrun on the first shape and dtype: per-rank time, collectives "
                             "and bytes exchanged per step")
    parser.add_argument("--mp2-timeout", type=float, default=600.0)
    parser.add_argument("--merge", type=Path, nargs="+", default=None, metavar="JSON",
                        help="combine earlier reports (bench.json files) into one table, JSON and chart")
    parser.add_argument("--sequential", action="store_true",
                        help="one process after the other instead of paired turns with the anchor")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--serve", help=argparse.SUPPRESS)
    parser.add_argument("--mp2-rank", help=argparse.SUPPRESS)
    return parser


def _settle(args):
    """Fills the defaults and checks the choices; raises SystemExit with the reason."""
    quick = args.quick
    args.shapes = args.shapes or ([QUICK_SHAPE] if quick else [(4096, 32000), (2048, 128256)])
    args.dtypes = args.dtypes or ["float32"]
    if quick and not args.head:
        args.head = QUICK_HEAD
    if args.impls is None:
        logits_rows = list(DEFAULT_IMPLS) if quick or not args.head else []
        head_rows = list(DEFAULT_HEAD_IMPLS) if args.head else []
        args.impls = [i for i in logits_rows + head_rows if IMPLS[i].framework != "torch" or torch_available()]
    args.passes = args.passes or ["fwdbwd", "fwd"]
    args.repeats = args.repeats if args.repeats is not None else (2 if quick else 5)
    args.warmup = args.warmup if args.warmup is not None else 1
    args.jobs = args.jobs or (2 if quick else 1)
    for impl in args.impls:
        if impl not in IMPLS:
            raise SystemExit(f"--impls: unknown implementation {impl!r}; choose from {', '.join(IMPLS)}")
        if IMPLS[impl].framework == "torch" and not torch_available():
            raise SystemExit(f"--impls: {impl} needs torch, which is not installed")
        if IMPLS[impl].family == "head" and not args.head:
            raise SystemExit(f"--impls: {impl} is a fused lm-head row and needs --head H (e.g. --head 256)")
    for dtype in args.dtypes:
        if dtype not in DTYPE_BYTES:
            raise SystemExit(f"--dtypes: unknown dtype {dtype!r}; choose from {', '.join(DTYPE_BYTES)}")
    for pass_name in args.passes:
        if pass_name not in ("fwdbwd", "fwd"):
            raise SystemExit(f"--passes: unknown pass {pass_name!r}; choose from fwdbwd, fwd")
    # fwd+bwd first: the first pass of a process is the one whose memory is measured
    args.passes = sorted(set(args.passes), key=["fwdbwd", "fwd"].index)
    args.linear_options = dict(args.linear_option, **({} if args.chunk_size is None else
                                                       dict(chunk_size=args.chunk_size)))
    args.paired = not (args.sequential or quick) and any(
        ANCHOR[IMPLS[i].family] in args.impls and i != ANCHOR[IMPLS[i].family] for i in args.impls)


def _config(args, impl, rows, vocab, dtype, round_index, passes):
    head_row = IMPLS[impl].family == "head"
    config = dict(impl=impl, rows=rows, vocab=vocab, dtype=dtype, passes=list(passes), warmup=args.warmup,
                  repeats=args.repeats, seed=0, round=round_index, head=args.head if head_row else 0,
                  lm_head=0 if head_row else args.lm_head)
    if head_row and args.linear_options:
        config["linear_options"] = args.linear_options
    return config


def _progress(result, done, total):
    if result.get("error"):
        print(f"    {result['impl']}: FAILED {result['error'][:300]}", file=sys.stderr, flush=True)
        return
    parts = []
    for name, p in result["passes"].items():
        peak = p.get("peak_over_logits")
        parts.append(f"{name} median {p['median_s'] * 1e3:.1f} ms, min {p['min_s'] * 1e3:.1f} ms"
                     + (f", peak {peak:.2f}x logits" if peak is not None else ""))
    print(f"    {result['impl']}: " + "; ".join(parts) + f"  ({done}/{total} done)", file=sys.stderr, flush=True)


def _run_sequential(args):
    configs = []
    for round_index in range(args.rounds):
        for rows, vocab in args.shapes:
            for dtype in args.dtypes:
                for impl in args.impls:
                    groups = [args.passes] if args.quick else [[p] for p in args.passes]
                    configs += [_config(args, impl, rows, vocab, dtype, round_index, g) for g in groups]
    print(f"mf_loss bench: {len(configs)} worker processes ({', '.join(args.impls)}; "
          f"{', '.join(f'{r}x{v}' for r, v in args.shapes)}; {', '.join(args.dtypes)}), "
          f"{args.repeats} repeats after {args.warmup}+1 warm-up", file=sys.stderr, flush=True)
    done = []

    def on_result(result):
        done.append(result)
        print(f"[{len(done)}/{len(configs)}] {result['impl']} {result['rows']}x{result['vocab']} {result['dtype']} "
              f"{'+'.join(result['passes'])}", file=sys.stderr, flush=True)
        _progress(result, len(done), len(configs))

    return run_configs(configs, args.timeout, args.jobs, on_result)


def _run_paired(args):
    print(f"mf_loss bench, paired turns with the anchor: {', '.join(args.impls)}; "
          f"{', '.join(f'{r}x{v}' for r, v in args.shapes)}; {', '.join(args.dtypes)}; {args.rounds} round(s) "
          f"of {args.repeats} turns after {args.warmup}+1 warm-up", file=sys.stderr, flush=True)
    plan = []
    for rows, vocab in args.shapes:
        for dtype in args.dtypes:
            for round_index in range(args.rounds):
                for impl in args.impls:
                    anchor = ANCHOR[IMPLS[impl].family]
                    partners = [i for i in args.impls if IMPLS[i].family == IMPLS[impl].family and i != anchor]
                    if impl == anchor and partners:
                        continue  # measured beside each partner
                    plan.append((anchor if anchor in args.impls and impl != anchor else None, impl,
                                 rows, vocab, dtype, round_index))
    results = []
    for step, (anchor, impl, rows, vocab, dtype, round_index) in enumerate(plan, 1):
        other = _config(args, impl, rows, vocab, dtype, round_index, args.passes)
        print(f"[{step}/{len(plan)}] {(anchor + ' vs ') if anchor else ''}{impl} {rows}x{vocab} {dtype}"
              + (f" (round {round_index + 1})" if args.rounds > 1 else "") + " ...", file=sys.stderr, flush=True)
        if anchor is None:
            pair = [spawn_worker(other, args.timeout)]
        else:
            anchor_config = _config(args, anchor, rows, vocab, dtype, round_index, args.passes)
            skipped = memory_skip([anchor_config, other])
            pair = ([dict(other, error=skipped, passes={}, logits_bytes=rows * vocab * DTYPE_BYTES[dtype])]
                    if skipped else run_pair(anchor_config, other, args.timeout))
        for result in pair:
            _progress(result, step, len(plan))
        results += pair
    return results


def _print_report(full):
    print(report.format_bandwidth(full["memory_bandwidth"]) if full.get("memory_bandwidth") else
          "memory bandwidth: not measured")
    print(report.format_table(full["results"]))
    text = report.format_ratios(full["ratios"])
    if text:
        print(text)
    for entry in full.get("mp2", []):
        print(report.format_mp2(entry))


def _write_outputs(args, full):
    from .chart import write_chart

    json_path = args.json or (args.out / "bench.json" if args.out else None)
    png_path = args.png or (args.out / "bench.png" if args.out else None)
    if json_path:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(full, indent=1) + "\n")
        print(f"wrote {json_path}", file=sys.stderr)
    if png_path:
        png_path.parent.mkdir(parents=True, exist_ok=True)
        write_chart(png_path, full["results"], full["machine"], full.get("memory_bandwidth"))
        print(f"wrote {png_path}", file=sys.stderr)


def _current_format(record):
    """A record of a report written before the lm-head rows (paired times named fused_*) as today's."""
    record.setdefault("head", 0)
    record.setdefault("lm_head", 0)
    for paired in record.get("paired", {}).values():
        paired.setdefault("anchor", "fused")
        for old, new in (("fused_times_s", "anchor_times_s"), ("fused_cpu_s", "anchor_cpu_s")):
            if old in paired:
                paired[new] = paired.pop(old)
    return record


def _current_mp2_format(entry):
    """An mp=2 entry written before the IR count (per-rank "backends", bytes from mf_loss's bookkeeping)."""
    for rank in entry.get("ranks", []):
        if "backends" in rank:
            rank["designs"] = {name: dict(b, collectives=dict(bytes_per_step=b.get("bytes_exchanged_per_step"),
                                                              source="mf_loss's own count (no IR count then)"))
                               for name, b in rank.pop("backends").items()}
    return entry


def _merge_reports(args) -> int:
    reports = [json.loads(Path(path).read_text()) for path in args.merge]
    records = [_current_format(r) for one in reports for r in one["results"]]
    bandwidth = next((one["memory_bandwidth"] for one in reports if one.get("memory_bandwidth")), None)
    if bandwidth:
        report.add_bandwidth_fractions(records, bandwidth["median_bytes_per_s"])
    mp2 = []
    for one in reports:
        entries = one.get("mp2", [])
        mp2 += [_current_mp2_format(e) for e in ([entries] if isinstance(entries, dict) else entries)]
    runs, merged_from = [], []
    for path, one in zip(args.merge, reports):  # a merged report brings the runs it was merged from
        runs += one.get("runs") or [dict(started=one.get("started"), seconds=one.get("seconds"),
                                         settings=one.get("settings"), load_average_end=one.get("load_average_end"),
                                         memory_bandwidth=one.get("memory_bandwidth"))]
        merged_from += one.get("merged_from") or [str(path)]
    merged = dict(machine=reports[0]["machine"], memory_bandwidth=bandwidth, merged_from=merged_from, runs=runs,
                  results=records, ratios=report.ratios(records), mp2=mp2)
    _print_report(merged)
    _write_outputs(args, merged)
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.worker:
        print(RESULT_MARK + json.dumps(run_worker(json.loads(args.worker))), flush=True)
        return 0
    if args.serve:
        serve_worker(json.loads(args.serve))
        return 0
    if args.mp2_rank:
        from .mp2 import run_rank
        run_rank(json.loads(args.mp2_rank))
        return 0
    if args.merge:
        return _merge_reports(args)
    _settle(args)
    started = time.time()
    machine = measure.machine_info()
    print("measuring the memory bandwidth ...", file=sys.stderr, flush=True)
    bandwidth = measure.memory_bandwidth(64 if args.quick else 512)
    results = _run_paired(args) if args.paired else _run_sequential(args)
    records = report.merge(results)
    report.add_bandwidth_fractions(records, bandwidth["median_bytes_per_s"])
    full = dict(machine=machine, memory_bandwidth=bandwidth,
                started=time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)),
                settings=dict(shapes=[f"{r}x{v}" for r, v in args.shapes], dtypes=args.dtypes, impls=args.impls,
                              passes=args.passes, repeats=args.repeats, warmup=args.warmup, rounds=args.rounds,
                              quick=args.quick, paired_with_anchor=args.paired, lm_head=args.lm_head, head=args.head,
                              linear_options=args.linear_options, separate_processes_per_pass=not (args.paired or args.quick)),
                results=records, ratios=report.ratios(records), mp2=[])
    if args.mp2:
        (rows, vocab), dtype = args.shapes[0], args.dtypes[0]
        families = {IMPLS[i].family for i in args.impls}
        for head in ([0] if "logits" in families else []) + ([args.head] if "head" in families else []):
            print(f"[mp2] 2 ranks under msrun, {rows}x{vocab} {dtype}" + (f", head H={head}" if head else "")
                  + " ...", file=sys.stderr, flush=True)
            from .mp2 import run_mp2
            full["mp2"].append(run_mp2((rows, vocab), dtype, head, args.warmup, args.repeats, args.mp2_timeout,
                                       args.linear_options))
    full["seconds"] = round(time.time() - started, 1)
    full["load_average_end"] = list(os.getloadavg())
    _print_report(full)
    _write_outputs(args, full)
    failed = [r for r in records if any(report.is_failure(e) for e in r["errors"])]
    failed_mp2 = [m for m in full["mp2"] if not m["ok"]]
    return 1 if failed or failed_mp2 else 0
