"""The run's charts (matplotlib, drawn off-screen): loss.png, and throughput.png with tokens/s and memory per rank."""
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def loss_chart(path: Path, steps, losses, *, title: str, label: str) -> Path:
    figure, axes = plt.subplots(figsize=(8, 4.5), layout="constrained")
    axes.plot(steps, losses, linewidth=1.2, label=label)
    axes.set_xlabel("step")
    axes.set_ylabel("loss (global token mean, nats)")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return Path(path)


def throughput_chart(path: Path, steps, tokens_per_s, memory_steps, memory_mib_per_rank: dict, *,
                     title: str) -> Path:
    """Counted tokens/s per step (all ranks together) and the resident memory of each rank over the run."""
    figure, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6.5), sharex=True, layout="constrained")
    top.plot(steps, tokens_per_s, linewidth=1.0, label="counted tokens/s (whole job)")
    top.set_ylabel("tokens / s")
    top.set_title(title)
    top.grid(alpha=0.3)
    top.legend()
    for rank, values in sorted(memory_mib_per_rank.items()):
        bottom.plot(memory_steps, values, marker=".", linewidth=1.0, label=f"rank {rank}")
    bottom.set_xlabel("step")
    bottom.set_ylabel("resident memory (MiB)")
    bottom.grid(alpha=0.3)
    bottom.legend(ncol=4, fontsize="small")
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return Path(path)
