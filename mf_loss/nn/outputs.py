"""The positions of the cores' outputs, named once here: the cores return plain tuples, and GRAPH-mode code
reads them by these positions. Not NamedTuples: in GRAPH mode MindSpore 2.10 silently gives zero gradients
through NamedTuple fields (tests/test_modes_and_errors.py keeps GRAPH gradients checked against NumPy).

A core's per-token tuple (`VocabParallelCrossEntropy`, `SemiAutoCrossEntropy`), each (N,) float32 unless said:
    TOKEN_LOSS       loss of each token, 0 where not active; NaN if the ranks' widths disagree
    ROW_MAX          max logit of the row over the full vocabulary
    LOG_SUM_EXP      log sum exp(x - row_max) over the full vocabulary
    TARGET_MASS      w[y] (class ids; 0 for a label no rank owns) or sum_c w_c t_c (probabilities)
    LOCAL_NONFINITE  1.0 where this rank's own statistics of the row are not finite
    RANK_WIDTHS      (mp,) every model-parallel rank's logits width, as exchanged
Only TOKEN_LOSS is differentiable; the rest are statistics for reductions and checks (callers stop their
gradients).

The fused head's core (`LinearVocabParallel`): OBJECTIVE (the scalar sum_n row_scale_n token_loss_n), then the
per-token tuple at [PER_TOKEN_START, PER_TOKEN_STOP), then HIDDEN_GRAD and WEIGHT_GRAD (the gradients made in the forward, or empty).
"""
TOKEN_LOSS, ROW_MAX, LOG_SUM_EXP, TARGET_MASS, LOCAL_NONFINITE, RANK_WIDTHS = range(6)
PER_TOKEN_FIELDS = 6

OBJECTIVE = 0
PER_TOKEN_START, PER_TOKEN_STOP = 1, 1 + PER_TOKEN_FIELDS
HIDDEN_GRAD, WEIGHT_GRAD = PER_TOKEN_STOP, PER_TOKEN_STOP + 1


def in_head_output(position: int) -> int:
    """Where a per-token field (TOKEN_LOSS, ...) sits in the fused head core's output."""
    return PER_TOKEN_START + position
