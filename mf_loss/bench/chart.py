"""The chart: per configuration, fwd+bwd median time (with the ratio to the family's anchor) and peak memory
beyond the inputs in logits sizes, as horizontal bars (matplotlib, Agg backend: no display needed)."""
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)

from .report import group_key, group_title, speed_versus_anchor  # noqa: E402

_COLORS = {"fused": "#1f77b4", "fused_pynative": "#78aadc", "fused_inplace": "#17becf",
           "fused_inplace_graph": "#9edae5", "composed": "#ff7f0e", "mint": "#2ca02c", "ops": "#9467bd",
           "mindformers": "#d62728", "torch": "#8c564b", "linear_fused": "#1f77b4",
           "linear_fused_pynative": "#78aadc", "linear_unfused": "#ff7f0e", "linear_mint": "#2ca02c",
           "torch_linear": "#8c564b", "torch_linear_unchunked": "#c49c94"}


def _missing_reason(record) -> str:
    if any("non-finite" in e for e in record["errors"]):
        return "failed: non-finite loss"
    if any(e.startswith("skipped") for e in record["errors"]):
        return "skipped: not enough memory"
    return "failed" if record["errors"] else "-"


def write_chart(path, records, machine, bandwidth=None):
    groups = {}
    for r in records:
        groups.setdefault(group_key(r), []).append(r)
    heights = [0.45 * len(rs) + 0.9 for rs in groups.values()] or [1.0]
    figure, axes = plt.subplots(len(heights) or 1, 2, figsize=(15, sum(heights) + 1.4), squeeze=False,
                                gridspec_kw=dict(height_ratios=heights))
    subtitle = f"{machine.get('cpu', '?')}, {machine.get('cpus_usable', machine.get('cpus'))} CPUs"
    if bandwidth:
        subtitle += f", memory bandwidth {bandwidth['median_bytes_per_s'] / 1e9:.1f} GB/s (NumPy copy)"
    figure.suptitle("mf_loss bench: cross entropy on CPU, forward + backward\n" + subtitle, fontsize=11)
    for (time_axis, memory_axis), (key, rs) in zip(axes, groups.items()):
        labels = [r["label"] for r in rs]
        positions = range(len(rs))
        times, peaks = [], []
        for r in rs:
            fb = r["passes"].get("fwdbwd") or {}
            times.append(fb.get("median_s", 0.0) * 1e3)
            peaks.append(fb.get("peak_over_logits") or 0.0)
        colors = [_COLORS.get(r["impl"], "#777777") for r in rs]
        time_axis.barh(positions, times, color=colors)
        memory_axis.barh(positions, peaks, color=colors)
        for index, r in enumerate(rs):
            fb = r["passes"].get("fwdbwd")
            if not fb:
                time_axis.text(0, index, " " + _missing_reason(r), va="center", color="#c00000", fontsize=8)
                continue
            speed = speed_versus_anchor(r, records)
            time_axis.text(times[index], index, f" {times[index]:.0f} ms" + (f" ({speed:.2f}x)" if speed else ""),
                           va="center", fontsize=8)
            if fb.get("peak_over_logits") is not None:
                memory_axis.text(peaks[index], index, f" {peaks[index]:.2f}x", va="center", fontsize=8)
        for axis in (time_axis, memory_axis):
            axis.set_yticks(list(positions))
            axis.invert_yaxis()
            axis.margins(x=0.25)
        time_axis.set_yticklabels(labels, fontsize=8)
        memory_axis.set_yticklabels([])
        time_axis.set_title(f"{group_title(key)}: median ms (x the fused anchor, in turns)", fontsize=9, loc="left")
        memory_axis.set_title("peak beyond inputs (and input gradients), x logits size", fontsize=9, loc="left")
    figure.tight_layout(rect=(0, 0, 1, 1 - 0.75 / figure.get_figheight()))  # room for the two-line title
    figure.savefig(path, dpi=100)
    plt.close(figure)
