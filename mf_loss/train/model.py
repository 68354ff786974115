"""A small Llama-style decoder whose output layer is split over the model-parallel ranks.

The trunk (token embedding; blocks of RMSNorm, causal attention with rotary positions, RMSNorm, SwiGLU MLP;
final RMSNorm) is replicated on every rank, as in MindFormers' Llama at toy size. The output weight (V, H)
is split by rows: model-parallel rank r holds rows [r*V/mp, (r+1)*V/mp). The final hidden state reaches the
output layer through `CopyToModelParallel` (Megatron's "copy to tensor-parallel region"): identity forward,
a SUM all-reduce over the model-parallel group backward, since each rank's vocabulary slice contributes
only its part of d(loss)/d(hidden).

`hidden(tokens)` returns that hidden state (B*S, H); `construct(tokens)` this rank's logits slice
(B*S, V/mp), for the unfused loss. The fused loss takes `hidden(tokens)` and `head_weight()` itself.

Parameters are drawn in NumPy from the seed at their full shapes in a fixed order, then sliced, so every
layout starts from the same weights.
"""
import math

import numpy as np

import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops

from ..parallel.comm import RankLayout

HEAD = "head.weight"
_BLOCK_PARAMS = ("attention_norm", "attention.wq", "attention.wk", "attention.wv", "attention.wo", "ffn_norm",
                 "feed_forward.w1", "feed_forward.w3", "feed_forward.w2")


class CopyToModelParallel(nn.Cell):
    """Forward: identity. Backward: all-reduce (SUM) of the gradient over the model-parallel group."""

    def __init__(self, group: str):
        super().__init__()
        self.all_reduce = ops.AllReduce(ops.ReduceOp.SUM, group)

    def construct(self, x):
        return x

    def bprop(self, x, out, dout):
        return (self.all_reduce(dout),)


def ffn_size(model_config: dict) -> int:
    """Llama's SwiGLU width: 2/3 of 4H, rounded up to a multiple of 32, unless set."""
    hidden = model_config["hidden_size"]
    return model_config["ffn_hidden_size"] or 32 * -(-(8 * hidden // 3) // 32)


def initial_parameters(model_config: dict, seed: int) -> dict:
    """name -> float32 array at its full shape, drawn in a fixed order from `seed`."""
    rng = np.random.default_rng(seed)
    vocab, hidden = model_config["vocab_size"], model_config["hidden_size"]
    ffn, layers, std = ffn_size(model_config), model_config["num_layers"], model_config["init_std"]
    out_std = std / math.sqrt(2 * max(layers, 1))  # GPT-2's scaling of the residual projections

    def normal(shape, scale):
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    params = {"tok_embeddings": normal((vocab, hidden), std)}
    for i in range(layers):
        p = f"layers.{i}."
        params[p + "attention_norm"] = np.ones(hidden, np.float32)
        for name in ("wq", "wk", "wv"):
            params[p + "attention." + name] = normal((hidden, hidden), std)
        params[p + "attention.wo"] = normal((hidden, hidden), out_std)
        params[p + "ffn_norm"] = np.ones(hidden, np.float32)
        params[p + "feed_forward.w1"] = normal((hidden, ffn), std)
        params[p + "feed_forward.w3"] = normal((hidden, ffn), std)
        params[p + "feed_forward.w2"] = normal((ffn, hidden), out_std)
    params["norm_out"] = np.ones(hidden, np.float32)
    params[HEAD] = normal((vocab, hidden), std)
    return params


def head_slice(full_head: np.ndarray, mp_rank: int, mp_size: int) -> np.ndarray:
    rows = full_head.shape[0] // mp_size
    return np.ascontiguousarray(full_head[mp_rank * rows:(mp_rank + 1) * rows])


def rotary_tables(seq_length: int, head_dim: int, theta: float):
    """cos and sin (S, head_dim) of Llama's rotary embedding, in the rotate-half layout."""
    inverse_frequency = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    angles = np.outer(np.arange(seq_length, dtype=np.float64), inverse_frequency)
    angles = np.concatenate([angles, angles], axis=-1)
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def _rms_norm(x, gamma, eps):
    return x * ops.rsqrt((x * x).mean(axis=-1, keep_dims=True) + eps) * gamma


class LlamaLM(nn.Cell):
    """construct(tokens (B, S) int32) -> this rank's logits slice (B*S, V/mp) float32."""

    def __init__(self, model_config: dict, layout: RankLayout, seed: int):
        super().__init__()
        self.hidden_size = model_config["hidden_size"]
        self.heads = model_config["num_heads"]
        self.head_dim = self.hidden_size // self.heads
        self.layers = model_config["num_layers"]
        self.eps = model_config["rms_norm_eps"]
        self.vocab = model_config["vocab_size"]
        self.local_vocab = self.vocab // layout.mp_size
        arrays = initial_parameters(model_config, seed)
        arrays[HEAD] = head_slice(arrays[HEAD], layout.mp_rank, layout.mp_size)
        # Parameters in a ParameterTuple keep their explicit names, identical on every layout.
        self.names = list(arrays)
        self.params = ms.ParameterTuple([Parameter(Tensor(arrays[n]), name=n) for n in self.names])
        index = {n: i for i, n in enumerate(self.names)}
        self.i_embedding, self.i_norm_out, self.i_head = index["tok_embeddings"], index["norm_out"], index[HEAD]
        self.i_blocks = tuple(tuple(index[f"layers.{i}.{n}"] for n in _BLOCK_PARAMS) for i in range(self.layers))
        self.copy_to_mp = CopyToModelParallel(layout.group) if layout.mp_size > 1 else None
        seq = model_config["seq_length"]
        self.causal_bias = Tensor(np.triu(np.full((seq, seq), -1e9, np.float32), k=1))
        cos, sin = rotary_tables(seq, self.head_dim, model_config["rope_theta"])
        self.rope_cos, self.rope_sin = Tensor(cos), Tensor(sin)
        self.head_matmul = ops.MatMul(transpose_b=True)

    def head_weight(self):
        return self.params[self.i_head]

    def hidden(self, tokens):
        """The final hidden state (B*S, H), identical on every model-parallel rank."""
        batch, seq = tokens.shape
        p = self.params
        x = ops.gather(p[self.i_embedding], tokens, 0)
        cos, sin = self.rope_cos[:seq], self.rope_sin[:seq]
        for indices in self.i_blocks:
            x = self._block(x, [p[i] for i in indices], batch, seq, cos, sin)
        x = _rms_norm(x, p[self.i_norm_out], self.eps).reshape(batch * seq, self.hidden_size)
        if self.copy_to_mp is not None:
            x = self.copy_to_mp(x)
        return x

    def construct(self, tokens):
        return self.head_matmul(self.hidden(tokens), self.params[self.i_head])

    def _rotate(self, x, cos, sin):
        half = self.head_dim // 2
        rotated = ops.concat([-x[..., half:], x[..., :half]], -1)
        return x * cos + rotated * sin

    def _block(self, x, weights, batch, seq, cos, sin):
        attention_norm, wq, wk, wv, wo, ffn_norm, w1, w3, w2 = weights
        h = _rms_norm(x, attention_norm, self.eps)

        def heads(projection):  # (B, S, H) -> (B, heads, S, head_dim)
            return ops.matmul(h, projection).reshape(batch, seq, self.heads, self.head_dim).transpose(0, 2, 1, 3)

        q, k, v = self._rotate(heads(wq), cos, sin), self._rotate(heads(wk), cos, sin), heads(wv)
        scores = ops.matmul(q, k.transpose(0, 1, 3, 2)) * (1.0 / math.sqrt(self.head_dim))
        scores = scores + self.causal_bias[:seq, :seq]
        attention = ops.matmul(ops.softmax(scores, -1), v)  # (B, heads, S, head_dim)
        x = x + ops.matmul(attention.transpose(0, 2, 1, 3).reshape(batch, seq, self.hidden_size), wo)
        h = _rms_norm(x, ffn_norm, self.eps)
        return x + ops.matmul(ops.silu(ops.matmul(h, w1)) * ops.matmul(h, w3), w2)
