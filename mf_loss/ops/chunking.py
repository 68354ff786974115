"""How rows are split into chunks, so that nothing (rows, vocabulary)-sized exists at once.

Pure Python on shapes: GRAPH mode unrolls the chunk loop at compile time from these static bounds.
"""

# What one chunk may hold of float32 (rows, V/mp) buffers when the caller does not say: the logits and the
# gradient of a chunk with the fused kernels, a few more temporaries with the composed ops. Small against
# the logits of a training step (0.5-2 GB at LLM shapes; at 32 MiB the fused head peaked at 0.154x the
# logits beyond its inputs and gradients, 4096 x 32000 GRAPH), large enough that each chunk's matmul runs
# at full speed (>= 48 rows for V/mp up to 128k).
DEFAULT_CHUNK_BYTES = 32 << 20
MIN_AUTO_ROWS = 16
# GRAPH mode unrolls the chunk loop: compile time grows with the number of chunks (95 chunks of the composed
# path took minutes to compile), so an automatic choice makes at most this many
MAX_AUTO_CHUNKS = 16


def auto_chunk_rows(rows: int, local_vocab: int, *, buffers: int, budget_bytes: int = DEFAULT_CHUNK_BYTES) -> int:
    """Rows per chunk so that `buffers` float32 (chunk, local_vocab) buffers fit in `budget_bytes`; at
    least MIN_AUTO_ROWS (a matmul of fewer rows wastes the machine) and rows / MAX_AUTO_CHUNKS, at most
    `rows` (one chunk). Plain statements, as in chunk_bounds."""
    per_row = local_vocab * 4 * buffers if local_vocab > 0 and buffers > 0 else 4
    chunk = budget_bytes // per_row
    if chunk < MIN_AUTO_ROWS:
        chunk = MIN_AUTO_ROWS
    return _within_auto_limits(chunk, rows)


def _within_auto_limits(size: int, total: int) -> int:
    """`size` raised to total / MAX_AUTO_CHUNKS, capped at `total`, at least 1."""
    fewest = (total + MAX_AUTO_CHUNKS - 1) // MAX_AUTO_CHUNKS
    if size < fewest:
        size = fewest
    if size > total:
        size = total
    return size if size > 0 else 1


def chunk_bounds(rows: int, chunk_rows: int) -> list:
    """[(start, stop), ...] covering [0, rows) in order; the last chunk holds the remainder; [] when empty.
    Plain statements only: MindSpore's GRAPH parser runs this at compile time, inside custom bprops too,
    where generator expressions and the builtin min() fail to compile."""
    bounds = []
    for start in range(0, rows, chunk_rows):
        stop = start + chunk_rows
        if stop > rows:
            stop = rows
        bounds.append((start, stop))
    return bounds
