"""The MindSpore cells the benchmark measures: each wraps one loss (or lm-head + loss) behind the same call,
`cell(x, label, mask)` for the logits rows and `cell(hidden, head_weight, label, mask)` for the head rows."""
import mindspore as ms
from mindspore import Tensor, nn, ops


class ValueAndGrad(nn.Cell):
    """(loss, gradients w.r.t. the inputs at `grad_position`) of `loss_cell`."""

    def __init__(self, loss_cell, grad_position=0):
        super().__init__()
        self.loss = loss_cell
        self.grad = ms.value_and_grad(self.loss, grad_position=grad_position)

    def construct(self, *inputs):
        return self.grad(*inputs)


class MaskedLoss(nn.Cell):
    """A loss called as loss(logits, label, mask): mf_loss.CrossEntropyLoss as it is."""

    def __init__(self, loss):
        super().__init__()
        self.loss = loss

    def construct(self, logits, label, mask):
        return self.loss(logits, label, mask)


class FrameworkLoss(nn.Cell):
    """A framework cross entropy called as loss(logits, label) (every token counts, so the mask is all
    ones); `upcast` feeds it float32 (MindSpore's CPU cross-entropy kernels refuse bfloat16)."""

    def __init__(self, loss, upcast):
        super().__init__()
        self.loss = loss
        self.upcast = upcast

    def construct(self, logits, label, mask):
        if self.upcast:
            logits = logits.astype(ms.float32)
        return self.loss(logits, label)


class SoftmaxNLL(nn.Cell):
    """MindFormers' per-token NLL: log-softmax with max subtraction and a dense one-hot, and its hand-written
    backward (softmax - one_hot) * dout that keeps the softmax and the one-hot from the forward."""

    def __init__(self, vocab):
        super().__init__()
        self.vocab = vocab
        self.max = ops.ReduceMax(keep_dims=True)
        self.sum_keep = ops.ReduceSum(keep_dims=True)
        self.sum = ops.ReduceSum()
        self.exp = ops.Exp()
        self.log = ops.Log()
        self.onehot = ops.OneHot()
        self.zeros_like = ops.ZerosLike()
        self.on = Tensor(1.0, ms.float32)
        self.off = Tensor(0.0, ms.float32)

    def construct(self, logits, label):
        shifted = logits - self.max(logits, -1)
        exps = self.exp(shifted)
        sums = self.sum_keep(exps, -1)
        log_softmax = shifted - self.log(sums)
        one_hot = self.onehot(label, self.vocab, self.on, self.off)
        loss = -self.sum(log_softmax * one_hot, -1)
        return loss, exps / sums, one_hot

    def bprop(self, logits, label, out, dout):
        _, softmax, one_hot = out
        return (softmax - one_hot) * dout[0].reshape(-1, 1), self.zeros_like(label)


class MindFormersStyle(nn.Cell):
    """MindFormers' CrossEntropyLoss recipe (mp = 1), written from its description: float32 logits, the
    NLL above, the masked mean sum(loss * mask) / (sum(mask) + 1e-8)."""

    def __init__(self, vocab):
        super().__init__()
        self.nll = SoftmaxNLL(vocab)
        self.cast = ops.Cast()
        self.sum = ops.ReduceSum()

    def construct(self, logits, label, mask):
        loss, _, _ = self.nll(self.cast(logits, ms.float32), label)
        return self.sum(loss * mask) / (self.sum(mask) + 1e-8)


class FixedHeadThenLoss(nn.Cell):
    """--lm-head: the logits made inside the step from the hidden state and a fixed (H, V) head."""

    def __init__(self, loss, head):
        super().__init__()
        self.loss = loss
        self.head = head

    def construct(self, hidden, label, mask):
        return self.loss(ops.matmul(hidden, self.head), label, mask)


class LinearThenLoss(nn.Cell):
    """The unfused lm head: logits = hidden @ head_weight.T materialised by MindSpore's matmul, then a loss
    on them; `upcast` makes the matmul float32 (MindSpore's CPU matmul refuses bfloat16)."""

    def __init__(self, loss, upcast):
        super().__init__()
        self.loss = loss
        self.upcast = upcast
        self.matmul = ops.MatMul(transpose_b=True)

    def construct(self, hidden, head_weight, label, mask):
        if self.upcast:
            hidden, head_weight = hidden.astype(ms.float32), head_weight.astype(ms.float32)
        return self.loss(self.matmul(hidden, head_weight), label, mask)


class FusedHeadLoss(nn.Cell):
    """mf_loss.LinearCrossEntropyLoss called as loss(hidden, head_weight, label, mask)."""

    def __init__(self, loss):
        super().__init__()
        self.loss = loss

    def construct(self, hidden, head_weight, label, mask):
        return self.loss(hidden, head_weight, label, mask)
