"""The report: per-process results merged into one record per implementation and configuration, the
side-by-side ratios, the achieved fraction of the measured memory bandwidth, and the text table."""
import statistics

from .impls import ANCHOR, IMPLS

# A fused cross-entropy forward+backward moves about three logits-sized passes of memory: the forward reads
# the logits, the backward reads them again and writes the gradient.
LOGITS_PASSES = 3


def group_key(record):
    return (record["rows"], record["vocab"], record["dtype"], record.get("head", 0), record.get("lm_head", 0))


def group_title(key) -> str:
    rows, vocab, dtype, head, lm_head = key
    extra = f", head H={head}" if head else (f", lm-head H={lm_head}" if lm_head else "")
    return f"{rows}x{vocab} {dtype}{extra}"


def family(record) -> str:
    return IMPLS[record["impl"]].family if record["impl"] in IMPLS else "logits"


def is_failure(error: str) -> bool:
    """A real failure, not a run left out on purpose (memory)."""
    return not error.startswith("skipped")


def merge(results):
    """One record per (implementation, configuration): timings of every process and round pooled (median
    and minimum over every timed step), peak memory the median of the processes' first steps."""
    merged = {}
    for r in results:
        key = (r["impl"],) + group_key(r)
        record = merged.setdefault(key, dict(
            impl=r["impl"], label=IMPLS[r["impl"]].label if r["impl"] in IMPLS else r["impl"], rows=r["rows"],
            vocab=r["vocab"], dtype=r["dtype"], head=r.get("head", 0), lm_head=r.get("lm_head", 0),
            logits_bytes=r.get("logits_bytes"), excluded_bytes=r.get("excluded_bytes", 0), notes={}, passes={},
            errors=[], _pool={}))
        record["logits_bytes"] = record["logits_bytes"] or r.get("logits_bytes")
        record["notes"].update(r.get("notes") or {})
        if r.get("error") and r["error"] not in record["errors"]:
            record["errors"].append(r["error"])
        for name, p in r.get("paired", {}).items():
            paired = record.setdefault("paired", {}).setdefault(
                name, dict(anchor=p.get("anchor", "fused"), anchor_times_s=[], anchor_cpu_s=[], ratios=[],
                           cpu_ratios=[]))
            for field in ("anchor_times_s", "anchor_cpu_s", "ratios", "cpu_ratios"):
                paired[field] += p[field]
        for name, p in r.get("passes", {}).items():
            pool = record["_pool"].setdefault(name, dict(times=[], cpu=[], peaks=[], first=[]))
            pool["times"] += p["times_s"]
            pool["cpu"] += p.get("cpu_s", [])
            first = p["first_step_s"]
            pool["first"] += first if isinstance(first, list) else [first]
            if p.get("peak_bytes") is not None:
                pool["peaks"].append(p["peak_bytes"])
    for record in merged.values():
        for name, pool in record.pop("_pool").items():
            peak = statistics.median(pool["peaks"]) if pool["peaks"] else None
            size = record["logits_bytes"]
            record["passes"][name] = dict(
                median_s=statistics.median(pool["times"]), min_s=min(pool["times"]),
                cpu_median_s=statistics.median(pool["cpu"]) if pool["cpu"] else None,
                peak_bytes=peak, peak_over_logits=peak / size if peak is not None and size else None,
                rounds=len(pool["first"]), first_step_s=pool["first"], times_s=pool["times"], cpu_s=pool["cpu"])
        # a record that has measurements keeps no error of a failed partner process
        if record["passes"]:
            record["errors"] = [e for e in record["errors"] if e]
    return list(merged.values())


def add_bandwidth_fractions(records, bytes_per_s):
    """Each fwd+bwd record's achieved fraction of the measured bandwidth, counting the three logits-sized
    passes a fused cross entropy moves (for the head rows: the passes the logits would need)."""
    for r in records:
        fb = r["passes"].get("fwdbwd")
        if fb and bytes_per_s and r.get("logits_bytes"):
            fb["bandwidth_fraction"] = LOGITS_PASSES * r["logits_bytes"] / fb["median_s"] / bytes_per_s


def ratios(records):
    """Per configuration: the family anchor's fwd+bwd time over each other's (per-turn medians when
    measured in turns), and the peaks in logits sizes."""
    groups = {}
    for r in records:
        groups.setdefault(group_key(r), {})[r["impl"]] = r
    out = []
    for key, by_impl in groups.items():
        anchor_name = ANCHOR[family(next(iter(by_impl.values())))]
        anchor = by_impl.get(anchor_name)
        entry = dict(zip(("rows", "vocab", "dtype", "head", "lm_head"), key), anchor=anchor_name)
        for impl, r in by_impl.items():
            fb = r["passes"].get("fwdbwd")
            if fb and fb.get("peak_over_logits") is not None:
                entry[f"{impl}_fwdbwd_peak_over_logits"] = fb["peak_over_logits"]
            if impl == anchor_name or not fb:
                continue
            paired = r.get("paired", {}).get("fwdbwd")
            prefix = f"{anchor_name}_over_{impl}"
            if paired and paired["ratios"]:
                entry[f"{prefix}_median"] = statistics.median(paired["ratios"])
                entry[f"{prefix}_min"] = min(paired["anchor_times_s"]) / fb["min_s"]
                if paired["cpu_ratios"]:
                    entry[f"{prefix}_cpu_median"] = statistics.median(paired["cpu_ratios"])
            elif anchor and "fwdbwd" in anchor["passes"]:
                for stat in ("median_s", "min_s", "cpu_median_s"):
                    mine, theirs = anchor["passes"]["fwdbwd"].get(stat), fb.get(stat)
                    if mine is not None and theirs:
                        entry[f"{prefix}_{stat[:-2]}"] = mine / theirs
        out.append(entry)
    return out


def speed_versus_anchor(record, records):
    """How many times the anchor's time this record's fwd+bwd takes (per-turn median when paired)."""
    fb = record["passes"].get("fwdbwd")
    paired = record.get("paired", {}).get("fwdbwd")
    if paired and paired["ratios"]:
        return 1.0 / statistics.median(paired["ratios"])
    anchor_name = ANCHOR[family(record)]
    anchor = next((r for r in records if r["impl"] == anchor_name and group_key(r) == group_key(record)), None)
    if fb and anchor and "fwdbwd" in anchor["passes"]:
        return fb["median_s"] / anchor["passes"]["fwdbwd"]["median_s"]
    return None


def format_table(records) -> str:
    header = (f"{'implementation':<50} {'configuration':>28} | {'fwd med':>9} {'fwd min':>9} | {'f+b med':>9} "
              f"{'f+b min':>9} {'f+b cpu':>9} | {'peak f+b':>10} {'x logits':>8} | {'x anchor':>8} | {'BW frac':>7}")
    lines = [header, "-" * len(header)]

    def seconds(p, key):
        return f"{p[key] * 1e3:8.1f}ms" if p and p.get(key) is not None else f"{'-':>10}"

    for r in records:
        fwd, fb = r["passes"].get("fwd"), r["passes"].get("fwdbwd")
        peak, multiple = (fb or {}).get("peak_bytes"), (fb or {}).get("peak_over_logits")
        speed = speed_versus_anchor(r, records)
        fraction = (fb or {}).get("bandwidth_fraction")
        lines.append(
            f"{r['label']:<50} {group_title(group_key(r)):>28} | {seconds(fwd, 'median_s')} {seconds(fwd, 'min_s')} | "
            f"{seconds(fb, 'median_s')} {seconds(fb, 'min_s')} {seconds(fb, 'cpu_median_s')} | "
            f"{(f'{peak / 2 ** 20:7.0f}MiB') if peak is not None else '-':>10} "
            f"{(f'{multiple:7.2f}x') if multiple is not None else '-':>8} | "
            f"{(f'{speed:7.2f}x') if speed is not None else '-':>8} | "
            f"{(f'{fraction:6.1%}') if fraction is not None else '-':>7}")
        lines += [f"    ! {error[:200]}" for error in r["errors"]]
    lines.append("peak: beyond the inputs (head rows: and beyond the gradients of hidden and head_weight), in "
                 "logits sizes; x anchor: time / that of fused (linear_fused for head rows), per-turn median; "
                 f"BW frac: {LOGITS_PASSES} logits-sized passes / f+b median / measured bandwidth")
    return "\n".join(lines)


def format_bandwidth(bandwidth) -> str:
    return (f"memory bandwidth (measured): {bandwidth['median_bytes_per_s'] / 1e9:.1f} GB/s median, "
            f"{bandwidth['best_bytes_per_s'] / 1e9:.1f} GB/s best ({bandwidth['method']}, "
            f"{bandwidth['array_bytes'] / 2 ** 20:.0f} MiB, {bandwidth['repeats']} copies)")


def format_ratios(entries) -> str:
    lines = []
    for entry in entries:
        anchor = entry["anchor"]
        parts = []
        for k, v in entry.items():
            if k.startswith(f"{anchor}_over_") and k.endswith("_median") and not k.endswith("cpu_median"):
                cpu = entry.get(k[:-len("_median")] + "_cpu_median")
                parts.append(f"{k[len(anchor) + 6:-7]}: {v:.3f}" + (f" (CPU time {cpu:.3f})" if cpu else ""))
        if parts:
            key = tuple(entry[k] for k in ("rows", "vocab", "dtype", "head", "lm_head"))
            lines.append(f"{anchor} / other, fwd+bwd ({group_title(key)}): " + ", ".join(parts))
    return "\n".join(lines)


def format_mp2(report) -> str:
    title = group_title((report["rows"], report["vocab"], report["dtype"], report.get("head", 0), 0))
    if not report["ok"]:
        return f"mp=2 run ({title}) failed: {report['message'][-1500:]}"
    lines = [f"mp=2 under msrun, {title} (each rank {report['vocab'] // 2} classes), GRAPH, fwd+bwd per rank:"]
    for rank in report["ranks"]:
        for design, d in rank["designs"].items():
            if "error" in d:
                lines.append(f"  rank {rank['rank']} {design:<24} {d['error']}")
                continue
            c = d["collectives"]
            counts = (", ".join(f"{n} x{k}" for n, k in c["counts"].items() if k) or "none") if "counts" in c \
                else "not counted"
            lines.append(f"  rank {rank['rank']} {design:<24} median {d['median_s'] * 1e3:8.1f} ms  min "
                         f"{d['min_s'] * 1e3:8.1f} ms  collectives per step: {counts}; "
                         f"{c.get('bytes_per_step', '?')} bytes all-reduced per step"
                         + (f" (the loss declares {d['notes']['declared_collectives']})"
                            if "declared_collectives" in d.get("notes", {}) else ""))
    return "\n".join(lines)
