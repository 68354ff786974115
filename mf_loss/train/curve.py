"""The loss curve file of a run (loss.csv), for both trainers: one row per step, written as the steps finish."""
import csv
from pathlib import Path


CSV_FIELDS = ("step", "loss", "counted_tokens", "learning_rate", "grad_norm", "step_time_s", "tokens_per_s")
_INTEGERS = ("step", "counted_tokens")


def read_curve(path) -> list:
    """The rows of a loss.csv (ints and floats); [] when there is none."""
    if not Path(path).exists():
        return []
    with open(path, newline="") as f:
        return [{k: (int(v) if k in _INTEGERS else float(v)) for k, v in row.items()} for row in csv.DictReader(f)]


def _csv_row(row: dict) -> dict:
    return {k: (f"{row[k]:.9g}" if isinstance(row[k], float) else row[k]) for k in CSV_FIELDS}


class CurveWriter:
    """Writes loss.csv (the rows kept from before a resume), then one row per step, flushed: a crash keeps
    every completed step."""

    def __init__(self, path: Path, rows: list):
        tmp = path.with_name(f".{path.name}.partial")
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
            writer.writeheader()
            writer.writerows(_csv_row(row) for row in rows)
        tmp.replace(path)
        self.file = open(path, "a", newline="")
        self.writer = csv.DictWriter(self.file, fieldnames=CSV_FIELDS)

    def append(self, row: dict) -> None:
        self.writer.writerow(_csv_row(row))
        self.file.flush()

    def close(self):
        self.file.close()


def resumed_curve(path, start_step: int, step_dir) -> list:
    """The rows a run resumed at `start_step` from the checkpoint in `step_dir` keeps: its own loss.csv's up to
    there, or, when it resumes another run's checkpoint, that run's (<run>/checkpoints/step_*/)."""
    rows = [row for row in read_curve(path) if row["step"] <= start_step]
    source = Path(step_dir).parent.parent / "loss.csv"
    if len(rows) < start_step and source.resolve() != Path(path).resolve():
        rows = [row for row in read_curve(source) if row["step"] <= start_step]
    return rows
