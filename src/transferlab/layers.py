"""The layers of GPT-2 as forward/backward function pairs.

Every layer follows one contract (CS231n style):

    out, cache = op_forward(x, *params)
    dx, *dparams = op_backward(dout, cache)     # in forward-argument order

No layer keeps state and no optimizer lives here: a layer only maps inputs to outputs and
upstream gradients to input gradients. Each backward sits directly under its forward and
its comments quote the forward line they invert (llm.c style).

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


def _sum_lastdim(x):
    """x.sum(axis=-1, keepdims=True): the same sums, ~3x faster on rows of 32-256 numbers.

    np.sum pays a fixed cost per row that dominates on rows this short; np.einsum's
    summing loop does not (NumPy 2.x; measured in docs/performance.md).
    """
    return np.einsum("...i->...", x)[..., None]  # (..., 1)


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


def embedding_backward(dout, cache):
    """dwte[v] = sum of dout at every (b, t) where idx == v;  dwpe[t] = sum_b dout[b, t].

    Returns (dwte, dwpe): the token ids themselves have no gradient. `np.add.at` is used
    because `dwte[idx] += dout` silently drops all but one update when a token repeats.
    See docs/embeddings.md#backward.
    """
    idx, wte_shape, wpe_shape = cache
    B, T, C = dout.shape
    dwte = np.zeros(wte_shape, dtype=dout.dtype)  # (V, C)
    np.add.at(dwte, idx.reshape(-1), dout.reshape(-1, C))
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
    as in PyTorch and GPT-2.
    """
    C = x.shape[-1]
    mean = _sum_lastdim(x) / C  # (..., 1)
    xc = x - mean  # (..., C)
    # np.vecdot sums xc * xc row by row without making that (..., C) product first
    var = np.vecdot(xc, xc)[..., None] / C  # (..., 1)
    rstd = 1.0 / np.sqrt(var + eps)  # (..., 1)
    xhat = np.multiply(xc, rstd, out=xc)  # (..., C), in xc's buffer
    out = xhat * w  # (..., C)
    out += b
    return out, (xhat, rstd, w)


def layernorm_backward(dout, cache):
    """dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)),  dxhat = dout * w.

    dw = sum(dout * xhat), db = sum(dout), both summed over every leading dimension.
    Returns (dx, dw, db). Derivation: docs/layernorm.md#backward.
    """
    xhat, rstd, w = cache
    C = xhat.shape[-1]
    dout2, xhat2 = dout.reshape(-1, C), xhat.reshape(-1, C)  # (N, C) views, N = all leading dims
    dw = np.einsum("nc,nc->c", dout2, xhat2)  # (C,) sum_n dout * xhat, no (N, C) temporary
    db = dout2.sum(axis=0)  # (C,)
    # in the forward pass this was: out = xhat * w + b, so:
    dxhat = dout * w  # (..., C)
    # xhat = (x - mean) * rstd; mean and rstd both depend on x, which gives the two
    # correction terms (the gradient flowing through the statistics).
    dx = dxhat - _sum_lastdim(dxhat) / C  # (..., C)  dxhat - mean(dxhat)
    dx -= xhat * (np.vecdot(dxhat, xhat)[..., None] / C)  # mean(dxhat * xhat), no temporary
    dx *= rstd
    return dx, dw, db


# ----------------------------------------------------------------------------------------
# GELU, tanh approximation (GPT-2's "gelu_new")


def gelu_forward(x):
    """out = 0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 * x^3))).

    Evaluated in place in two buffers: written as one expression, the formula makes six
    temporaries of x's size, and at (B, T, 4C) this layer is bound by memory traffic, not
    arithmetic (docs/performance.md). tests/test_bench.py checks it against the one-liner.
    """
    th = x * x  # (..., D)  x^2
    th *= 0.044715
    th += 1.0
    th *= x  # x + 0.044715 x^3, as x (1 + 0.044715 x^2)
    th *= GELU_COEF  # the tanh's argument
    np.tanh(th, out=th)  # (..., D)  th = tanh(sqrt(2/pi) (x + 0.044715 x^3))
    out = th + 1.0  # (..., D)
    out *= x
    out *= 0.5
    return out, (x, th)


def gelu_backward(dout, cache):
    """dx = dout * [0.5 (1 + th) + 0.5 x (1 - th^2) sqrt(2/pi) (1 + 3 * 0.044715 x^2)].

    Returns (dx,). Evaluated in place like the forward. See docs/gelu.md#backward.
    """
    x, th = cache
    dx = x * x  # (..., D)  x^2
    dx *= 3.0 * 0.044715
    dx += 1.0
    dx *= GELU_COEF  # d(inner)/dx = sqrt(2/pi) (1 + 3 * 0.044715 x^2)
    dx *= x
    sech2 = th * th  # (..., D)
    np.subtract(1.0, sech2, out=sech2)  # d tanh(u)/du = 1 - tanh(u)^2
    dx *= sech2  # x (1 - th^2) d(inner)/dx
    dx += th
    dx += 1.0
    dx *= 0.5  # 0.5 (1 + th) + 0.5 x (1 - th^2) d(inner)/dx  = d out / dx
    dx *= dout
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
    y = 0, not NaN. See docs/attention.md; why each step is written the way it is:
    docs/performance.md#attention.
    """
    B, T, C3 = qkv.shape
    C = C3 // 3
    HS = C // n_head
    # (B, T, 3, NH, HS) -> (3, B, NH, T, HS): one transpose splits q, k, v and the heads
    q, k, v = qkv.reshape(B, T, 3, n_head, HS).transpose(2, 0, 3, 1, 4)  # each (B, NH, T, HS)
    scale = 1.0 / math.sqrt(HS)
    # scale q (T*HS numbers) rather than preatt (T*T); backward reuses this scaled copy
    qs = q * scale  # (B, NH, T, HS)
    preatt = qs @ k.transpose(0, 1, 3, 2)  # (B, NH, T, T)
    if allowed is not None:
        # an additive mask, 0 where allowed and -inf where not: exp(-inf) = 0, so those
        # keys get exactly zero weight. One broadcast add in place; np.where(allowed,
        # preatt, -inf) would allocate a new (B, NH, T, T) array and is ~16x slower.
        preatt += np.where(allowed, 0.0, -np.inf).astype(preatt.dtype)  # (B or 1, 1, T, T)
    att = _softmax_lastdim_inplace(preatt)  # (B, NH, T, T), preatt's buffer
    att_used, drop_cache = dropout_forward(att, attn_pdrop, rng)  # (B, NH, T, T)
    # y = att_used @ v, written straight into the (B, T, NH, HS) layout of the output, so
    # re-assembling the heads needs no transpose copy afterwards
    y = np.empty((B, T, C), dtype=qkv.dtype)  # (B, T, C)
    np.matmul(att_used, v, out=y.reshape(B, T, n_head, HS).transpose(0, 2, 1, 3))  # (B, NH, T, HS) view
    cache = (qs, k, v, att, att_used, drop_cache, scale)
    return y, cache


def _softmax_lastdim_inplace(x):
    """Row-wise softmax over the last axis, computed in x's own buffer (returns x).

    Rows of all -inf (fully masked) come out as all zeros. In place because x is a
    (B, NH, T, T) array: each extra temporary of that size costs as much as the exp.
    """
    # np.fmax (the max that skips NaN) has a vectorised reduction along the last axis
    # that np.max lacks in NumPy 2.x: the same row maxima, ~3x faster at T = 128
    xmax = np.fmax.reduce(x, axis=-1, keepdims=True)  # (..., 1)
    xmax[~np.isfinite(xmax)] = 0.0  # a fully masked row: exp(-inf - 0) = 0, no NaN
    x -= xmax  # the max subtracted: exp never overflows
    np.exp(x, out=x)
    denom = _sum_lastdim(x)  # (..., 1)
    denom[denom == 0.0] = 1.0  # 0 / 1 = 0 for the fully masked rows
    x /= denom
    return x


def attention_backward(dy, cache):
    """Backward of `attention_forward`. Returns (dqkv,), dqkv (B, T, 3C).

    The softmax backward uses the identity  dpreatt = att * (datt - sum_j datt_j att_j),
    never the (T x T) Jacobian per row. Masked entries have att = 0, so their gradient is 0.
    Derivation: docs/attention.md.
    """
    qs, k, v, att, att_used, drop_cache, scale = cache
    B, NH, T, HS = qs.shape
    C = NH * HS
    dy = dy.reshape(B, T, NH, HS).transpose(0, 2, 1, 3)  # (B, NH, T, HS) view
    # dq, dk, dv are views into one (B, T, 3, NH, HS) buffer, the layout of qkv: the
    # matmuls below write straight into it (the inverse of the forward's split, no copy)
    dqkv = np.empty((B, T, 3, NH, HS), dtype=dy.dtype)
    dq, dk, dv = dqkv.transpose(2, 0, 3, 1, 4)  # each (B, NH, T, HS)
    # in the forward pass this was: y = att_used @ v, so:
    datt = dy @ v.transpose(0, 1, 3, 2)  # (B, NH, T, T)
    np.matmul(att_used.transpose(0, 1, 3, 2), dy, out=dv)  # dv = att_used^T @ dy
    (datt,) = dropout_backward(datt, drop_cache)
    # softmax backward identity, in datt's buffer; np.vecdot forms the row sums without a
    # (B, NH, T, T) temporary for the product datt * att
    datt -= np.vecdot(datt, att)[..., None]  # datt - sum_j datt_j att_j
    dpreatt = np.multiply(datt, att, out=datt)  # (B, NH, T, T)
    # preatt = qs @ k^T with qs = q * scale
    np.matmul(dpreatt, k, out=dq)
    dq *= scale  # dq = (dpreatt @ k) * scale
    np.matmul(dpreatt.transpose(0, 1, 3, 2), qs, out=dk)  # dk = dpreatt^T @ qs
    return (dqkv.reshape(B, T, 3 * C),)
