"""Deterministic training batches: the same global batch for a step whatever the layout.

A step's global batch (G rows of S tokens) depends only on (seed, step); data-parallel rank d takes rows
[d*G/dp, (d+1)*G/dp) and runs them as `micro_batch_num` micro-batches. Some rows are cut short and
padded (input_mask 0) and some label spans are set to ignore_index, on purpose: the data-parallel ranks
then hold different numbers of counted tokens, which the exact global token mean must get right. Row 0
is always cut to a quarter of its length, so dp rank 0 always counts fewer tokens than the others.
"""
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class BatchSpec:
    global_batch_size: int
    seq_length: int
    pad_probability: float
    ignore_probability: float
    ignore_index: int
    pad_id: int


@dataclass
class Batch:
    tokens: np.ndarray   # (..., S) int32 inputs
    labels: np.ndarray   # (..., S) int32 next tokens; ignore_index in ignored spans
    mask: np.ndarray     # (..., S) float32, 0 on padding

    def counted(self, ignore_index: int) -> int:
        return int(((self.mask != 0) & (self.labels != ignore_index)).sum())


def global_batch(corpus_ids: np.ndarray, spec: BatchSpec, seed: int, step: int) -> Batch:
    rows, length = spec.global_batch_size, spec.seq_length
    if len(corpus_ids) < length + 2:
        raise ValueError(f"the corpus has {len(corpus_ids)} tokens, fewer than seq_length + 2 = {length + 2}")
    rng = np.random.default_rng([seed, step])
    # Every draw has a fixed size, so the stream never depends on earlier outcomes.
    starts = rng.integers(0, len(corpus_ids) - length - 1, size=rows)
    cut = rng.random(rows) < spec.pad_probability
    cut_at = rng.integers(max(1, length // 4), length, size=rows)
    ignored = rng.random(rows) < spec.ignore_probability
    span_start = rng.integers(0, length, size=rows)
    span_length = rng.integers(1, max(2, length // 4), size=rows)
    cut[0], cut_at[0] = True, max(1, length // 4)

    window = starts[:, None] + np.arange(length + 1)[None, :]
    sequence = corpus_ids[window].astype(np.int32)
    tokens, labels = sequence[:, :-1].copy(), sequence[:, 1:].copy()
    mask = np.ones((rows, length), np.float32)
    position = np.arange(length)[None, :]
    padded = cut[:, None] & (position >= cut_at[:, None])
    tokens[padded] = spec.pad_id
    labels[padded] = spec.pad_id
    mask[padded] = 0.0
    in_span = ignored[:, None] & (position >= span_start[:, None]) & (position < (span_start + span_length)[:, None])
    labels[in_span] = spec.ignore_index
    return Batch(tokens, labels, mask)


def rank_micro_batches(batch: Batch, data_parallel: int, dp_rank: int, micro_batch_num: int) -> Batch:
    """This data-parallel rank's rows, shaped (micro_batch_num, rows per micro-batch, S)."""
    rows = batch.tokens.shape[0] // data_parallel
    part = slice(dp_rank * rows, (dp_rank + 1) * rows)

    def shape(array):
        return np.ascontiguousarray(array[part].reshape(micro_batch_num, rows // micro_batch_num, -1))

    return Batch(shape(batch.tokens), shape(batch.labels), shape(batch.mask))
