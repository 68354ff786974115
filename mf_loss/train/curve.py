"""The loss curve of a run, for both trainers, written as the steps finish: loss.csv holds the run's numbers, the
same in every run of one command on one machine and layout (step, loss, counted tokens, learning rate, gradient
norm); step_times.csv beside it holds what the clock measured (seconds per step, counted tokens per second)."""
import csv
from pathlib import Path


CSV_FIELDS = ("step", "loss", "counted_tokens", "learning_rate", "grad_norm")
TIME_FIELDS = ("step", "step_time_s", "tokens_per_s")
TIMES_FILE = "step_times.csv"
_INTEGERS = ("step", "counted_tokens")


def _times_path(path) -> Path:
    return Path(path).with_name(TIMES_FILE)


def _read(path) -> list:
    if not Path(path).exists():
        return []
    with open(path, newline="") as f:
        return [{k: (int(v) if k in _INTEGERS else float(v)) for k, v in row.items()} for row in csv.DictReader(f)]


def read_curve(path) -> list:
    """The rows of a loss.csv (ints and floats), with the step's times from step_times.csv beside it where it has
    them; [] when there is no loss.csv."""
    times = {row["step"]: row for row in _read(_times_path(path))}
    return [{**row, **times.get(row["step"], {})} for row in _read(path)]


def _write_rows(path: Path, fields, rows) -> None:
    """`rows` -> path (through a temporary name and a rename)."""
    tmp = path.with_name(f".{path.name}.partial")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(_csv_row(row, fields) for row in rows if all(k in row for k in fields))
    tmp.replace(path)


def _csv_row(row: dict, fields) -> dict:
    return {k: (f"{row[k]:.9g}" if isinstance(row[k], float) else row[k]) for k in fields}


class CurveWriter:
    """Writes loss.csv and step_times.csv (the rows kept from before a resume), then one row per step to each,
    flushed: a crash keeps every completed step."""

    def __init__(self, path: Path, rows: list):
        self.files, self.writers = [], []
        for target, fields in ((Path(path), CSV_FIELDS), (_times_path(path), TIME_FIELDS)):
            _write_rows(target, fields, rows)
            self.files.append(open(target, "a", newline=""))
            self.writers.append((csv.DictWriter(self.files[-1], fieldnames=fields, extrasaction="ignore"), fields))

    def append(self, row: dict) -> None:
        for (writer, fields), file in zip(self.writers, self.files):
            writer.writerow(_csv_row(row, fields))
            file.flush()

    def close(self):
        for file in self.files:
            file.close()


def resumed_curve(path, start_step: int, step_dir) -> list:
    """The rows a run resumed at `start_step` from the checkpoint in `step_dir` keeps: its own loss.csv's up to
    there, or, when it resumes another run's checkpoint, that run's (<run>/checkpoints/step_*/)."""
    rows = [row for row in read_curve(path) if row["step"] <= start_step]
    source = Path(step_dir).parent.parent / "loss.csv"
    if len(rows) < start_step and source.resolve() != Path(path).resolve():
        rows = [row for row in read_curve(source) if row["step"] <= start_step]
    return rows
