"""How rows are split into chunks, so that nothing (rows, vocabulary)-sized exists at once.

Pure Python on shapes: GRAPH mode unrolls the chunk loop at compile time from these static bounds.
"""

# What one chunk may hold of float32 (rows, V/mp) buffers when the caller does not say: the logits and the
# gradient of a chunk with the fused kernels, a few more temporaries with the composed ops. Small against
# the logits of a training step at LLM shapes, large enough that each chunk's matmul runs at full speed
# (>= 48 rows for V/mp up to 128k). Its measured peaks: docs/design.md.
DEFAULT_CHUNK_BYTES = 32 << 20
MIN_AUTO_ROWS = 16
# GRAPH mode unrolls the chunk loop: compile time grows with the number of chunks, so an automatic choice
# makes at most this many
MAX_AUTO_CHUNKS = 16


# The fused head's recomputing kernels (`fused.head_row_stats`, `fused.head_grads`) go through the classes in
# blocks, each block's float32 logits made for all rows at once inside one kernel call: no unrolled loop, so
# no limit on the number of blocks, and the block can be small. Without a chunk_size a block holds this much
# (its logits, and its weight rows and their gradient in float32).
HEAD_BLOCK_BYTES = 16 << 20
# fewer classes per block make the products with all rows slow (sgemm of a narrow matrix)
MIN_BLOCK_CLASSES = 64


def vocab_block(rows: int, width: int, local_vocab: int, elements: int, least: int) -> int:
    """Classes per block of the fused head's recomputing kernels: the block's float32 logits of all `rows` rows
    and its `width`-wide weight rows and their gradient hold about `elements` float32 values (as many as a
    chunk of a caller's chunk_size rows of logits would, else HEAD_BLOCK_BYTES' worth), at least `least`
    classes (MIN_BLOCK_CLASSES when chosen automatically) and 1, at most local_vocab. Plain statements, as in
    chunk_bounds: GRAPH mode broadens values joined from two branches and then fails to compile."""
    columns = elements // (rows + 2 * width + 1)
    if columns < least:
        columns = least
    if columns > local_vocab:
        columns = local_vocab
    if columns < 1:
        columns = 1
    return columns


def class_block(rows: int, width: int, local_vocab: int, chunk_size) -> int:
    """The fused recomputing kernels' classes per block (`vocab_block`): as many float32 values as a chunk of
    `chunk_size` rows of logits would hold, or HEAD_BLOCK_BYTES' worth when chunk_size is None."""
    if chunk_size is not None:
        return vocab_block(rows, width, local_vocab, chunk_size * local_vocab, 1)
    return vocab_block(rows, width, local_vocab, HEAD_BLOCK_BYTES // 4, MIN_BLOCK_CLASSES)


def chunk_rows(rows: int, local_vocab: int, chunk_size, buffers: int) -> int:
    """Rows per chunk of a chunk loop whose steps hold `buffers` float32 chunk-sized buffers at once:
    `chunk_size`, or `auto_chunk_rows` when it is None."""
    if chunk_size is not None:
        return chunk_size
    return auto_chunk_rows(rows, local_vocab, buffers)


def auto_chunk_rows(rows: int, local_vocab: int, buffers: int) -> int:
    """Rows per chunk so that `buffers` float32 (chunk, local_vocab) buffers fit in DEFAULT_CHUNK_BYTES; at
    least MIN_AUTO_ROWS (a matmul of fewer rows wastes the machine) and rows / MAX_AUTO_CHUNKS, at most
    `rows` (one chunk). Plain statements and positional arguments, as in chunk_bounds: a function with a
    keyword-only argument that both a forward and its custom bprop call fails to compile in GRAPH mode ("The
    func graph is empty")."""
    per_row = local_vocab * 4 * buffers
    if per_row < 4:
        per_row = 4
    chunk = DEFAULT_CHUNK_BYTES // per_row
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
