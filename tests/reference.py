"""Independent references: a plain float64 NumPy loss with its gradient, and torch's F.cross_entropy."""
import numpy as np


def numpy_cross_entropy(logits, label, mask, *, weight=None, ignore_index=-100, label_smoothing=0.0,
                        z_loss_weight=0.0, logit_softcap=None, reduction="mean", per_token=False,
                        empty_mean="zero", probs=False, dout=None):
    """Float64 loss over the full vocabulary and d(output[0])/d(logits), written from the definitions:

    per class c: L_c = -log softmax(x)_c; soft target T_c = (1-eps) w_c t_c + (eps/V) w_c;
    token loss = sum_c T_c L_c + z lse^2; class-index t is one-hot; masks weight tokens.
    """
    x_raw = logits.astype(np.float64).reshape(-1, logits.shape[-1])
    rows, vocab = x_raw.shape
    x = x_raw if logit_softcap is None else logit_softcap * np.tanh(x_raw / logit_softcap)
    w = np.ones(vocab) if weight is None else weight.astype(np.float64)
    m = np.ones(rows) if mask is None else mask.astype(np.float64).reshape(-1)
    top = x.max(axis=1, keepdims=True)
    lse = (top + np.log(np.exp(x - top).sum(axis=1, keepdims=True)))[:, 0]
    p = np.exp(x - lse[:, None])
    if probs:
        t = label.astype(np.float64).reshape(rows, vocab)
        counted = m != 0
        denominator_terms = m
    else:
        y = label.reshape(-1).astype(np.int64)
        counted = (y != ignore_index) & (m != 0)
        t = np.zeros((rows, vocab))
        t[np.flatnonzero(counted), y[counted]] = 1.0
        denominator_terms = np.where(counted, w[np.where(counted, y, 0)], 0.0) * m
    soft = (1 - label_smoothing) * w * t + (label_smoothing / vocab) * w
    token = (soft * (lse[:, None] - x)).sum(axis=1) + z_loss_weight * lse ** 2
    token = np.where(counted, token * m, 0.0)
    denominator = np.where(counted, denominator_terms, 0.0).sum()
    # d token_n / d x_nk = p_k sum_c T_c - T_k + 2 z lse p_k, then the mask weight and softcap chain.
    token_grad = p * soft.sum(axis=1, keepdims=True) - soft + 2 * z_loss_weight * lse[:, None] * p
    token_grad = np.where(counted[:, None], token_grad * m[:, None], 0.0)
    if logit_softcap is not None:
        token_grad = token_grad * (1 - np.tanh(x_raw / logit_softcap) ** 2)
    z_tokens = np.where(counted, z_loss_weight * lse ** 2 * m, 0.0)
    if per_token:
        outputs = [token.sum(), denominator]
        grad = token_grad
        z_out = z_tokens.sum()
    elif reduction == "none":
        outputs = [token.reshape(logits.shape[:-1])]
        upstream = np.ones(rows) if dout is None else dout.reshape(-1)
        grad = token_grad * upstream[:, None]
        z_out = z_tokens.reshape(logits.shape[:-1])
    elif reduction == "sum":
        outputs, grad, z_out = [token.sum()], token_grad, z_tokens.sum()
    else:
        if denominator > 0:
            outputs, grad, z_out = [token.sum() / denominator], token_grad / denominator, z_tokens.sum() / denominator
        else:
            empty = np.nan if empty_mean == "nan" else 0.0
            outputs, grad, z_out = [np.float64(empty)], np.zeros_like(token_grad), np.float64(empty)
    return outputs, grad.reshape(logits.shape), z_out


def torch_cross_entropy(logits, label, mask, *, weight=None, ignore_index=-100, label_smoothing=0.0,
                        reduction="mean", probs=False, dout=None):
    """torch.nn.functional.cross_entropy in float64, with the token mask applied on its per-token losses
    (torch has no mask): mean divides by the masked sum of torch's own per-token denominators."""
    import torch
    import torch.nn.functional as F

    x = torch.tensor(logits.reshape(-1, logits.shape[-1]), dtype=torch.float64, requires_grad=True)
    w = None if weight is None else torch.tensor(weight, dtype=torch.float64)
    target = (torch.tensor(label.reshape(-1, logits.shape[-1]), dtype=torch.float64) if probs
              else torch.tensor(label.reshape(-1).astype(np.int64)))
    if mask is None:
        out = F.cross_entropy(x, target, weight=w, ignore_index=ignore_index, label_smoothing=label_smoothing,
                              reduction=reduction)
    else:
        m = torch.tensor(mask.reshape(-1).astype(np.float64))
        tokens = F.cross_entropy(x, target, weight=w, ignore_index=ignore_index, label_smoothing=label_smoothing,
                                 reduction="none") * m
        if reduction == "none":
            out = tokens
        elif reduction == "sum":
            out = tokens.sum()
        else:
            if probs:
                per_token_denominator = torch.ones_like(m)
            else:
                kept = target != ignore_index
                per_token_denominator = (kept.double() if w is None else
                                         torch.where(kept, w[target.clamp(min=0)], torch.zeros_like(m)))
            out = tokens.sum() / (per_token_denominator * m).sum()
    objective = out if out.ndim == 0 else (out * torch.tensor(dout.reshape(-1), dtype=torch.float64)).sum()
    objective.backward()
    value = out.detach().numpy()
    return (value.reshape(logits.shape[:-1]) if reduction == "none" else value), x.grad.numpy().reshape(logits.shape)
