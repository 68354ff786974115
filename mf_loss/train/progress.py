"""Showing a run's progress: a live tqdm bar on a terminal, plain lines otherwise.

The main rank appends one JSON event per line to <run dir>/progress.jsonl (`EventLog`): a message, or a
step with its loss and counted tokens per second. Whoever shows the run (the single process itself, or the
`mf-loss train` parent following the file while msrun runs the ranks) feeds the events to a `ProgressView`.
"""
import json
import sys
from pathlib import Path
from typing import Optional

from tqdm import tqdm


class EventLog:
    """Appends events to progress.jsonl (flushed each time: the parent follows the file live)."""

    def __init__(self, path: Path):
        self.file = open(path, "a")

    def message(self, text: str) -> dict:
        return self._write({"message": text})

    def step(self, step: int, total: int, loss: float, tokens_per_s: float) -> dict:
        return self._write({"step": step, "total": total, "loss": loss, "tokens_per_s": tokens_per_s})

    def _write(self, event: dict) -> dict:
        self.file.write(json.dumps(event) + "\n")
        self.file.flush()
        return event

    def close(self):
        self.file.close()


class ProgressView:
    """Shows events: a tqdm bar (step, loss, tokens/s, ETA) when `out` is a terminal, else one plain line
    every `log_interval` steps (and at the first and last)."""

    def __init__(self, out=None, log_interval: int = 10):
        self.out = out or sys.stdout
        self.log_interval = max(1, log_interval)
        self.live = hasattr(self.out, "isatty") and self.out.isatty()
        self.bar: Optional[tqdm] = None
        self.first_step: Optional[int] = None

    def show(self, event: dict) -> None:
        if "message" in event:
            (self.bar.write if self.bar is not None else self._print)(event["message"])
            return
        step, total = event["step"], event["total"]
        if self.live:
            if self.bar is None:  # a resumed run starts its bar at the step it resumed from
                self.bar = tqdm(total=total, initial=step - 1, file=self.out, unit="step", dynamic_ncols=True)
            self.bar.set_postfix_str(f"loss {event['loss']:.4f}, {event['tokens_per_s']:,.0f} tok/s", refresh=False)
            self.bar.update(step - self.bar.n)
            return
        if self.first_step is None:
            self.first_step = step
        if step == self.first_step or step == total or step % self.log_interval == 0:
            self._print(f"step {step:>{len(str(total))}}/{total}  loss {event['loss']:.4f}  "
                        f"tok/s {event['tokens_per_s']:,.0f}")

    def _print(self, text: str) -> None:
        print(text, file=self.out, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
