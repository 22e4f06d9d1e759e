"""The layers of GPT-2 as forward/backward function pairs.

Every layer follows one contract (CS231n style):

    out, cache = op_forward(x, *params)
    dx, *dparams = op_backward(dout, cache)     # in forward-argument order

No layer keeps state and no optimizer lives here: a layer only maps inputs to outputs and
upstream gradients to input gradients. Each backward sits directly under its forward and
its comments quote the forward line they invert (llm.c style).

These are the plain forms, the equations of the docs pages as a student reads them. Where
a plain form is slow, kernels.py holds a fast form that computes the same numbers (the
model runs those by default, through kernels.KernelTable); tests hold each pair equal.

Sizes: B batch, T time, C channels, NH heads, HS head size (C = NH * HS), V vocabulary.
dtype discipline: every constant is a Python float, so a float32 pass stays float32
(under NumPy 2 a NumPy float64 scalar would silently promote the whole array).

Docs: one page per layer, indexed in docs/layers.md: docs/embeddings.md, docs/linear.md,
docs/layernorm.md, docs/gelu.md, docs/dropout.md and docs/attention.md.
"""
from __future__ import annotations

import math

import numpy as np

LAYERNORM_EPS = 1e-5
GELU_COEF = math.sqrt(2.0 / math.pi)  # Python float: keeps float32 arrays float32


# ----------------------------------------------------------------------------------------
# token + position embedding


def embedding_forward(idx, wte, wpe):
    """out[b, t] = wte[idx[b, t]] + wpe[t].

    idx (B, T) int, wte (V, C), wpe (block_size, C) -> out (B, T, C).
    """
    B, T = idx.shape
    out = wte[idx] + wpe[:T]  # (B, T, C)
    cache = (idx, wte.shape, wpe.shape)
    return out, cache


def embedding_backward(dout, cache, head_dwte=None):
    """dwte[v] = sum of dout at every (b, t) where idx == v;  dwpe[t] = sum_b dout[b, t].

    Returns (dwte, dwpe): the token ids themselves have no gradient. `np.add.at` is used
    because `dwte[idx] += dout` silently drops all but one update when a token repeats.
    head_dwte: the tied LM head's gradient of the same wte (V, C), or None. When given,
    the token sums are added into it and it is returned as dwte: the two uses of one
    weight add up (docs/tied_weights.md). See docs/embeddings.md#backward.
    """
    idx, wte_shape, wpe_shape = cache
    B, T, C = dout.shape
    dwte = np.zeros(wte_shape, dtype=dout.dtype)  # (V, C)
    np.add.at(dwte, idx.reshape(-1), dout.reshape(-1, C))
    if head_dwte is not None:
        head_dwte += dwte  # tied: wte is also the LM head's weight
        dwte = head_dwte
    dwpe = np.zeros(wpe_shape, dtype=dout.dtype)  # (block_size, C)
    dwpe[:T] = dout.sum(axis=0)  # the same position row is used by every sequence
    return dwte, dwpe


# ----------------------------------------------------------------------------------------
# linear (GPT-2's Conv1D: weights stored [in, out] so that y = x @ w + b)


def linear_forward(x, w, b):
    """out = x @ w + b.   x (..., IN), w (IN, OUT), b (OUT,) or None -> out (..., OUT).

    The leading dimensions are flattened so the product is one 2-D GEMM.
    """
    x2 = x.reshape(-1, x.shape[-1])  # (B*T, IN): a view, no copy
    out = x2 @ w  # (B*T, OUT)
    if b is not None:
        out += b
    return out.reshape(*x.shape[:-1], w.shape[1]), (x, w)


def linear_backward(dout, cache, need_dx=True, need_dw=True):
    """dx = dout @ w.T,  dw = x.T @ dout,  db = dout summed over all leading dims.

    Returns (dx, dw, db). `need_dx` / `need_dw` let the model skip work a frozen part does
    not need (the product is simply not computed and None is returned in its place).
    See docs/linear.md#backward.
    """
    x, w = cache
    dout2 = dout.reshape(-1, dout.shape[-1])  # (B*T, OUT)
    dx = (dout2 @ w.T).reshape(x.shape) if need_dx else None  # (..., IN)
    dw = x.reshape(-1, x.shape[-1]).T @ dout2 if need_dw else None  # (IN, OUT)
    db = dout2.sum(axis=0)  # (OUT,)
    return dx, dw, db


# ----------------------------------------------------------------------------------------
# LayerNorm


def layernorm_forward(x, w, b, eps=LAYERNORM_EPS):
    """out = (x - mean) / sqrt(var + eps) * w + b, statistics over the last axis (C).

    x (..., C), w (C,), b (C,) -> out (..., C). The variance is the biased one (divide by C),
    as in PyTorch and GPT-2. Fast form: kernels.layernorm_forward_fast.
    """
    mean = x.mean(axis=-1, keepdims=True)  # (..., 1)
    xc = x - mean  # (..., C)
    var = (xc * xc).mean(axis=-1, keepdims=True)  # (..., 1)
    rstd = 1.0 / np.sqrt(var + eps)  # (..., 1)
    xhat = xc * rstd  # (..., C)
    out = xhat * w + b  # (..., C)
    return out, (xhat, rstd, w)


def layernorm_backward(dout, cache):
    """dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)),  dxhat = dout * w.

    dw = sum(dout * xhat), db = sum(dout), both summed over every leading dimension.
    Returns (dx, dw, db). Derivation: docs/layernorm.md#backward.
    """
    xhat, rstd, w = cache
    C = xhat.shape[-1]
    dw = (dout * xhat).reshape(-1, C).sum(axis=0)  # (C,)
    db = dout.reshape(-1, C).sum(axis=0)  # (C,)
    # in the forward pass this was: out = xhat * w + b, so:
    dxhat = dout * w  # (..., C)
    # xhat = (x - mean) * rstd; mean and rstd both depend on x, which gives the two
    # correction terms (the gradient flowing through the statistics)
    dx = rstd * (dxhat - dxhat.mean(axis=-1, keepdims=True)
                 - xhat * (dxhat * xhat).mean(axis=-1, keepdims=True))  # (..., C)
    return dx, dw, db


# ----------------------------------------------------------------------------------------
# GELU, tanh approximation (GPT-2's "gelu_new")


def gelu_forward(x):
    """out = 0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 * x^3))).

    Returns out and the cache (x, th) with th the tanh, which backward reuses.
    Fast form: kernels.gelu_forward_fast.
    """
    th = np.tanh(GELU_COEF * (x + 0.044715 * x * x * x))  # (..., D)
    out = 0.5 * x * (1.0 + th)  # (..., D)
    return out, (x, th)


def gelu_backward(dout, cache):
    """dx = dout * [0.5 (1 + th) + 0.5 x (1 - th^2) sqrt(2/pi) (1 + 3 * 0.044715 x^2)].

    Returns (dx,). See docs/gelu.md#backward.
    """
    x, th = cache
    # in the forward pass this was: out = 0.5 x (1 + th), th = tanh(inner(x)), so the
    # product rule gives one term through x and one through th
    dinner = GELU_COEF * (1.0 + 3.0 * 0.044715 * x * x)  # (..., D) d inner / dx
    dx = dout * (0.5 * (1.0 + th) + 0.5 * x * (1.0 - th * th) * dinner)  # (..., D)
    return (dx,)


# ----------------------------------------------------------------------------------------
# dropout (inverted: scale at train time so evaluation is the identity)


def dropout_forward(x, p, rng=None):
    """out = x * mask / (1 - p) with mask ~ Bernoulli(1 - p); identity when p == 0 or rng is None.

    Pass rng=None in evaluation mode. The cache holds the scaled mask so backward reuses the
    exact same dropped units.
    """
    if p == 0.0 or rng is None:
        return x, None
    keep = rng.random(x.shape, dtype=x.dtype) >= p  # (..., D) bool
    scaled_mask = keep * x.dtype.type(1.0 / (1.0 - p))  # (..., D)
    return x * scaled_mask, scaled_mask


def dropout_backward(dout, cache):
    """dx = dout * mask / (1 - p). Returns (dx,). See docs/dropout.md#backward."""
    scaled_mask = cache
    return (dout if scaled_mask is None else dout * scaled_mask,)


# ----------------------------------------------------------------------------------------
# multi-head self-attention from a fused QKV projection


def attention_mask(T, causal, pad_mask=None):
    """Which keys each query may attend to: bool (1 or B, 1, T, T), True = allowed.

    causal: query t sees keys 0..t. pad_mask (B, T), True on real tokens: padded keys are
    never attended to. Returns None when everything is allowed.
    """
    allowed = None
    if causal:
        allowed = np.tril(np.ones((T, T), dtype=bool))[None, None]  # (1, 1, T, T)
    if pad_mask is not None:
        keys = pad_mask[:, None, None, :].astype(bool)  # (B, 1, 1, T)
        allowed = keys if allowed is None else (allowed & keys)  # (B, 1, T, T)
    return allowed


def attention_forward(qkv, n_head, allowed=None, attn_pdrop=0.0, rng=None):
    """Scaled dot-product attention for all heads and the whole batch at once.

    qkv (B, T, 3C) is the output of the fused c_attn projection, laid out [q | k | v].
    allowed: bool mask broadcastable to (B, NH, T, T) from `attention_mask`, or None.
    Returns y (B, T, C), the heads concatenated again (c_proj is applied by the caller).

        att = softmax(q k^T / sqrt(HS) + mask)      y = att v

    A query row with no allowed key at all (a fully padded sequence) gets att = 0 and so
    y = 0, not NaN. See docs/attention.md. Fast form: kernels.attention_forward_fast.
    """
    B, T, C3 = qkv.shape
    C = C3 // 3
    HS = C // n_head
    # (B, T, 3, NH, HS) -> (3, B, NH, T, HS): one transpose splits q, k, v and the heads
    q, k, v = qkv.reshape(B, T, 3, n_head, HS).transpose(2, 0, 3, 1, 4)  # each (B, NH, T, HS)
    scale = 1.0 / math.sqrt(HS)
    preatt = (q @ k.transpose(0, 1, 3, 2)) * scale  # (B, NH, T, T)
    if allowed is not None:
        preatt = np.where(allowed, preatt, -np.inf)  # exp(-inf) = 0: a masked key gets no weight
    att = softmax(preatt)  # (B, NH, T, T)
    att_used, drop_cache = dropout_forward(att, attn_pdrop, rng)  # (B, NH, T, T)
    y = att_used @ v  # (B, NH, T, HS)
    y = y.transpose(0, 2, 1, 3).reshape(B, T, C)  # (B, T, C) the heads side by side again
    return y, (q, k, v, att, att_used, drop_cache, scale)


def softmax(x):
    """Row-wise softmax over the last axis; a row of all -inf (fully masked) gives zeros."""
    xmax = x.max(axis=-1, keepdims=True)  # (..., 1)
    xmax = np.where(np.isfinite(xmax), xmax, 0.0)  # a fully masked row: exp(-inf - 0) = 0
    e = np.exp(x - xmax)  # the max subtracted: exp never overflows
    denom = e.sum(axis=-1, keepdims=True)  # (..., 1)
    return e / np.where(denom == 0.0, 1.0, denom)  # 0 / 1 = 0 for the fully masked rows


def attention_backward(dy, cache):
    """Backward of `attention_forward`. Returns (dqkv,), dqkv (B, T, 3C).

    The softmax backward uses the identity  dpreatt = att * (datt - sum_j datt_j att_j),
    never the (T x T) Jacobian per row. Masked entries have att = 0, so their gradient is 0.
    Derivation: docs/attention.md.
    """
    q, k, v, att, att_used, drop_cache, scale = cache
    B, NH, T, HS = q.shape
    C = NH * HS
    dy = dy.reshape(B, T, NH, HS).transpose(0, 2, 1, 3)  # (B, NH, T, HS)
    # in the forward pass this was: y = att_used @ v, so:
    datt = dy @ v.transpose(0, 1, 3, 2)  # (B, NH, T, T)
    dv = att_used.transpose(0, 1, 3, 2) @ dy  # (B, NH, T, HS)
    (datt,) = dropout_backward(datt, drop_cache)
    # att = softmax(preatt): the softmax backward identity
    dpreatt = att * (datt - (datt * att).sum(axis=-1, keepdims=True))  # (B, NH, T, T)
    # preatt = (q @ k^T) * scale
    dq = (dpreatt @ k) * scale  # (B, NH, T, HS)
    dk = (dpreatt.transpose(0, 1, 3, 2) @ q) * scale  # (B, NH, T, HS)
    # the inverse of the forward's split: (3, B, NH, T, HS) -> (B, T, 3, NH, HS)
    dqkv = np.stack([dq, dk, dv]).transpose(1, 3, 0, 2, 4)  # (B, T, 3, NH, HS)
    return (dqkv.reshape(B, T, 3 * C),)
