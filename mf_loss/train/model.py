"""A tiny causal language model whose output layer is split over the model-parallel ranks.

The trunk (embeddings, transformer blocks, final norm) is replicated on every rank. The output weight
(V, H) is split by rows: model-parallel rank r holds rows [r*V/mp, (r+1)*V/mp) and produces that slice
of the logits, which goes straight into the vocab-parallel CrossEntropyLoss. The hidden states reach the
output layer through `CopyToModelParallel` (Megatron's "copy to tensor-parallel region"): identity
forward, and a SUM all-reduce over the model-parallel group backward, since each rank's slice of the
logits contributes only its part of d(loss)/d(hidden).

Parameters are drawn in NumPy from the seed at their full shapes in a fixed order, then sliced, so every
layout starts from the same weights.
"""
import math

import numpy as np

import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops

from ..parallel.comm import RankLayout

HEAD = "head.weight"
_BLOCK_PARAMS = ("ln1.gamma", "ln1.beta", "attention.qkv", "attention.out", "ln2.gamma", "ln2.beta", "mlp.fc1",
                 "mlp.fc1_bias", "mlp.fc2", "mlp.fc2_bias")


class CopyToModelParallel(nn.Cell):
    """Forward: identity. Backward: all-reduce (SUM) of the gradient over the model-parallel group."""

    def __init__(self, group: str):
        super().__init__()
        self.all_reduce = ops.AllReduce(ops.ReduceOp.SUM, group)

    def construct(self, x):
        return x

    def bprop(self, x, out, dout):
        return (self.all_reduce(dout),)


def initial_parameters(model_config: dict, seed: int) -> dict:
    """name -> float32 array at its full shape, drawn in a fixed order from `seed`."""
    rng = np.random.default_rng(seed)
    vocab, hidden, seq = model_config["vocab_size"], model_config["hidden_size"], model_config["seq_length"]
    ffn = model_config["ffn_hidden_size"] or 4 * hidden
    std = model_config["init_std"]
    layers = model_config["num_layers"]
    out_std = std / math.sqrt(2 * max(layers, 1))

    def normal(shape, scale):
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    params = {"embedding.word": normal((vocab, hidden), std), "embedding.position": normal((seq, hidden), std)}
    for i in range(layers):
        p = f"blocks.{i}."
        params[p + "ln1.gamma"] = np.ones(hidden, np.float32)
        params[p + "ln1.beta"] = np.zeros(hidden, np.float32)
        params[p + "attention.qkv"] = normal((hidden, 3 * hidden), std)
        params[p + "attention.out"] = normal((hidden, hidden), out_std)
        params[p + "ln2.gamma"] = np.ones(hidden, np.float32)
        params[p + "ln2.beta"] = np.zeros(hidden, np.float32)
        params[p + "mlp.fc1"] = normal((hidden, ffn), std)
        params[p + "mlp.fc1_bias"] = np.zeros(ffn, np.float32)
        params[p + "mlp.fc2"] = normal((ffn, hidden), out_std)
        params[p + "mlp.fc2_bias"] = np.zeros(hidden, np.float32)
    params["final_ln.gamma"] = np.ones(hidden, np.float32)
    params["final_ln.beta"] = np.zeros(hidden, np.float32)
    params[HEAD] = normal((vocab, hidden), std)
    return params


def head_slice(full_head: np.ndarray, mp_rank: int, mp_size: int) -> np.ndarray:
    rows = full_head.shape[0] // mp_size
    return np.ascontiguousarray(full_head[mp_rank * rows:(mp_rank + 1) * rows])


def _layer_norm(x, gamma, beta, eps):
    mean = x.mean(axis=-1, keep_dims=True)
    centered = x - mean
    var = (centered * centered).mean(axis=-1, keep_dims=True)
    return centered * ops.rsqrt(var + eps) * gamma + beta


def _gelu(x):
    return 0.5 * x * (1.0 + ops.tanh(0.7978845608028654 * (x + 0.044715 * x * x * x)))


class TinyCausalLM(nn.Cell):
    """construct(tokens (B, S) int32) -> this rank's logits slice (B*S, V/mp) float32."""

    def __init__(self, model_config: dict, layout: RankLayout, seed: int):
        super().__init__()
        self.hidden = model_config["hidden_size"]
        self.heads = model_config["num_heads"]
        self.layers = model_config["num_layers"]
        self.seq_length = model_config["seq_length"]
        self.eps = model_config["layernorm_epsilon"]
        self.vocab = model_config["vocab_size"]
        self.local_vocab = self.vocab // layout.mp_size
        arrays = initial_parameters(model_config, seed)
        arrays[HEAD] = head_slice(arrays[HEAD], layout.mp_rank, layout.mp_size)
        # Parameters in a ParameterTuple keep their explicit names, identical on every layout.
        self.names = list(arrays)
        self.params = ms.ParameterTuple([Parameter(Tensor(arrays[n]), name=n) for n in self.names])
        index = {n: i for i, n in enumerate(self.names)}
        self.i_word, self.i_position = index["embedding.word"], index["embedding.position"]
        self.i_final = (index["final_ln.gamma"], index["final_ln.beta"])
        self.i_head = index[HEAD]
        self.i_blocks = tuple(tuple(index[f"blocks.{i}.{n}"] for n in _BLOCK_PARAMS) for i in range(self.layers))
        self.copy_to_mp = CopyToModelParallel(layout.group) if layout.mp_size > 1 else None
        causal = np.triu(np.full((self.seq_length, self.seq_length), -1e9, np.float32), k=1)
        self.causal_bias = Tensor(causal)
        self.head_matmul = ops.MatMul(transpose_b=True)

    def construct(self, tokens):
        batch, seq = tokens.shape
        p = self.params
        x = ops.gather(p[self.i_word], tokens, 0) + p[self.i_position][:seq]
        for indices in self.i_blocks:
            x = self._block(x, [p[i] for i in indices], batch, seq)
        x = _layer_norm(x, p[self.i_final[0]], p[self.i_final[1]], self.eps)
        x = x.reshape(batch * seq, self.hidden)
        if self.copy_to_mp is not None:
            x = self.copy_to_mp(x)
        return self.head_matmul(x, p[self.i_head])

    def _block(self, x, weights, batch, seq):
        ln1_gamma, ln1_beta, qkv_weight, out_weight, ln2_gamma, ln2_beta, fc1, fc1_bias, fc2, fc2_bias = weights
        heads, head_dim = self.heads, self.hidden // self.heads
        h = _layer_norm(x, ln1_gamma, ln1_beta, self.eps)
        qkv = ops.matmul(h, qkv_weight).reshape(batch, seq, 3, heads, head_dim)
        qkv = qkv.transpose(2, 0, 3, 1, 4)  # (3, B, heads, S, head_dim)
        q, k, v = qkv[0], qkv[1], qkv[2]
        scores = ops.matmul(q, k.transpose(0, 1, 3, 2)) * (1.0 / math.sqrt(head_dim))
        scores = scores + self.causal_bias[:seq, :seq]
        attention = ops.matmul(ops.softmax(scores, -1), v)  # (B, heads, S, head_dim)
        attention = attention.transpose(0, 2, 1, 3).reshape(batch, seq, self.hidden)
        x = x + ops.matmul(attention, out_weight)
        h = _layer_norm(x, ln2_gamma, ln2_beta, self.eps)
        h = _gelu(ops.matmul(h, fc1) + fc1_bias)
        return x + ops.matmul(h, fc2) + fc2_bias
