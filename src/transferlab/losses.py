"""Losses as (loss, dlogits) pairs.

Each function returns the scalar loss and its gradient with respect to the logits in one
go, because the combined gradient of softmax + cross-entropy (p - y) is both simpler and
more stable than chaining two backward passes. See docs/losses.md.

IGNORE_INDEX (-100, PyTorch's convention) marks target positions that do not count:
padding, or tokens a loss should skip. The mean is over the positions that do count.
"""
from __future__ import annotations

import numpy as np

IGNORE_INDEX = -100


def log_softmax(logits):
    """log p_k = z_k - logsumexp(z), computed with the max subtracted (no overflow)."""
    zmax = logits.max(axis=-1, keepdims=True)
    shifted = logits - zmax
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def counted_rows(logits, targets, ignore_index=IGNORE_INDEX, count=None):
    """The logits as rows z (N_all, K), and what the mean counts: (z, y_safe, valid, n).

    valid (N_all,) marks the counted positions; n is their number, or `count` when given;
    y_safe is the targets with ignored positions set to class 0, so they can index z
    (their rows are then weighted 0).
    """
    z = logits.reshape(-1, logits.shape[-1])  # (N_all, K)
    y = targets.reshape(-1)  # (N_all,)
    valid = y != ignore_index  # (N_all,)
    n = int(valid.sum()) if count is None else int(count)
    return z, np.where(valid, y, 0), valid, n


def cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, label_smoothing=0.0, count=None):
    """Mean cross-entropy over the positions whose target is not `ignore_index`.

    logits (..., K) float, targets (...) int -> (loss, dlogits (..., K)).

        loss_i = (1 - eps) * (-log p_{y_i}) + eps * mean_k(-log p_k)      (label smoothing)
        dlogits_i = (p_i - q_i) / N,   q_i = (1 - eps) * onehot(y_i) + eps / K

    N is the number of counted positions, or `count` when given: a part of a batch divides
    by the whole batch's count, so the parts' losses and gradients add up to the whole
    batch's. With N = 0 the loss is 0 (not NaN).
    """
    K = logits.shape[-1]
    z, y_safe, valid, n = counted_rows(logits, targets, ignore_index, count)
    if n == 0:
        return 0.0, np.zeros_like(logits)
    logp = log_softmax(z)  # (N_all, K)
    rows = np.arange(len(y_safe))
    nll = -logp[rows, y_safe]  # (N_all,)
    eps = float(label_smoothing)
    per_pos = (1.0 - eps) * nll + eps * (-logp.mean(axis=-1)) if eps else nll
    loss = float(per_pos[valid].sum() / n)
    # d/dz of the above: p - q, with q the (smoothed) target distribution
    dz = np.exp(logp)  # (N_all, K) = p
    dz[rows, y_safe] -= 1.0 - eps
    if eps:
        dz -= eps / K
    dz *= (valid / n).astype(dz.dtype)[:, None]  # ignored positions get no gradient
    return loss, dz.reshape(logits.shape)


def sigmoid(z):
    """Numerically stable logistic function 1 / (1 + exp(-z))."""
    ez = np.exp(-np.abs(z))
    return np.where(z >= 0, 1.0 / (1.0 + ez), ez / (1.0 + ez)).astype(z.dtype)


def sigmoid_mse(z, targets, count=None):
    """Score in [0, 1] = sigmoid(z), loss = mean((sigmoid(z) - y)^2).

    z (N,), targets (N,) float in [0, 1] -> (loss, dz), dz = 2 (s - y) s (1 - s) / N;
    N = `count` when given (a part of a batch: the whole batch's N).
    """
    s = sigmoid(z)
    diff = s - targets.astype(z.dtype)
    n = diff.size if count is None else int(count)
    loss = float((diff * diff).sum() / n)
    dz = (2.0 / n) * diff * s * (1.0 - s)
    return loss, dz.astype(z.dtype)


def binary_cross_entropy_with_logits(z, targets):
    """loss = mean(softplus(z) - y z) = mean(-y log s - (1 - y) log(1 - s)), s = sigmoid(z).

    Written as max(z, 0) - y z + log(1 + exp(-|z|)) so large |z| never overflows.
    z (N,), targets (N,) in [0, 1] -> (loss, dz), dz = (s - y) / N.
    """
    y = targets.astype(z.dtype)
    n = z.size
    per = np.maximum(z, 0.0) - y * z + np.log1p(np.exp(-np.abs(z)))
    loss = float(per.sum() / n)
    dz = (sigmoid(z) - y) / n
    return loss, dz.astype(z.dtype)
