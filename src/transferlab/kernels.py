"""Fast forms of the layers, and the table through which the model picks its kernels.

layers.py holds the plain form of every layer: the equations of its docs page, written the
way a student reads them. Some of those plain forms make several temporaries the size of
their input, and at (B, T, 4C) or (B, NH, T, T) a layer is then bound by memory traffic,
not arithmetic. The fast forms here compute the same numbers with fewer passes over
memory (in-place updates, row reductions without a product temporary); each names the
plain form it equals, and tests/test_kernels.py holds every pair equal (float32 rounding,
1e-12 in float64). docs/performance.md gives each trick its measured gain.

The model never rebinds names to switch kernels: it calls them through a `KernelTable`,

    model = GPT(config, kernels="plain")     # or model.kernels = KERNELS["plain"]

and `src/bench.py` times one table against another the same way.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable

import numpy as np

from . import layers as L
from .layers import GELU_COEF, LAYERNORM_EPS, dropout_backward, dropout_forward


def _sum_lastdim(x):
    """x.sum(axis=-1, keepdims=True): the same sums, ~3x faster on rows of 32-256 numbers.

    np.sum pays a fixed cost per row that dominates on rows this short; np.einsum's
    summing loop does not (NumPy 2.x; measured in docs/performance.md).
    """
    return np.einsum("...i->...", x)[..., None]  # (..., 1)


# ----------------------------------------------------------------------------------------
# LayerNorm: equals layers.layernorm_forward / layers.layernorm_backward


def layernorm_forward_fast(x, w, b, eps=LAYERNORM_EPS):
    """layers.layernorm_forward, with the variance as a row dot product (no (..., C) square)."""
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


def layernorm_backward_fast(dout, cache):
    """layers.layernorm_backward, with both row means as reductions and the rest in place."""
    xhat, rstd, w = cache
    C = xhat.shape[-1]
    dout2, xhat2 = dout.reshape(-1, C), xhat.reshape(-1, C)  # (N, C) views, N = all leading dims
    dw = np.einsum("nc,nc->c", dout2, xhat2)  # (C,) sum_n dout * xhat, no (N, C) temporary
    db = dout2.sum(axis=0)  # (C,)
    dxhat = dout * w  # (..., C)
    dx = dxhat - _sum_lastdim(dxhat) / C  # (..., C)  dxhat - mean(dxhat)
    dx -= xhat * (np.vecdot(dxhat, xhat)[..., None] / C)  # mean(dxhat * xhat), no temporary
    dx *= rstd
    return dx, dw, db


# ----------------------------------------------------------------------------------------
# GELU: equals layers.gelu_forward / layers.gelu_backward


def gelu_forward_fast(x):
    """layers.gelu_forward in two buffers: written as one expression, the formula makes six
    temporaries of x's size."""
    th = x * x  # (..., D)  x^2
    th *= 0.044715
    th += 1.0
    th *= x  # x + 0.044715 x^3, as x (1 + 0.044715 x^2)
    th *= GELU_COEF  # the tanh's argument
    np.tanh(th, out=th)  # (..., D)
    out = th + 1.0  # (..., D)
    out *= x
    out *= 0.5
    return out, (x, th)


def gelu_backward_fast(dout, cache):
    """layers.gelu_backward in one buffer."""
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
    dx *= 0.5  # 0.5 (1 + th) + 0.5 x (1 - th^2) d(inner)/dx
    dx *= dout
    return (dx,)


# ----------------------------------------------------------------------------------------
# attention: equals layers.attention_forward / layers.attention_backward


def softmax_lastdim_inplace(x):
    """layers.softmax computed in x's own buffer (returns x).

    In place because x is a (B, NH, T, T) array: each extra temporary of that size costs as
    much as the exp.
    """
    # np.fmax (the max that skips NaN) has a vectorised reduction along the last axis
    # that np.max lacks in NumPy 2.x: the same row maxima, ~3x faster at T = 128
    xmax = np.fmax.reduce(x, axis=-1, keepdims=True)  # (..., 1)
    xmax[~np.isfinite(xmax)] = 0.0  # a fully masked row: exp(-inf - 0) = 0, no NaN
    x -= xmax
    np.exp(x, out=x)
    denom = _sum_lastdim(x)  # (..., 1)
    denom[denom == 0.0] = 1.0  # 0 / 1 = 0 for the fully masked rows
    x /= denom
    return x


def attention_forward_fast(qkv, n_head, allowed=None, attn_pdrop=0.0, rng=None):
    """layers.attention_forward with the mask added in place, q scaled once (T*HS numbers,
    not T*T), the softmax in preatt's buffer, and y written straight into (B, T, NH, HS)."""
    B, T, C3 = qkv.shape
    C = C3 // 3
    HS = C // n_head
    q, k, v = qkv.reshape(B, T, 3, n_head, HS).transpose(2, 0, 3, 1, 4)  # each (B, NH, T, HS)
    scale = 1.0 / math.sqrt(HS)
    qs = q * scale  # (B, NH, T, HS); backward reuses this scaled copy
    preatt = qs @ k.transpose(0, 1, 3, 2)  # (B, NH, T, T)
    if allowed is not None:
        # an additive mask, 0 where allowed and -inf where not: one broadcast add in place;
        # np.where(allowed, preatt, -inf) would allocate a new (B, NH, T, T) array
        preatt += np.where(allowed, 0.0, -np.inf).astype(preatt.dtype)  # (B or 1, 1, T, T)
    att = softmax_lastdim_inplace(preatt)  # (B, NH, T, T), preatt's buffer
    att_used, drop_cache = dropout_forward(att, attn_pdrop, rng)  # (B, NH, T, T)
    y = np.empty((B, T, C), dtype=qkv.dtype)  # (B, T, C)
    np.matmul(att_used, v, out=y.reshape(B, T, n_head, HS).transpose(0, 2, 1, 3))  # (B, NH, T, HS) view
    return y, (qs, k, v, att, att_used, drop_cache, scale)


def attention_backward_fast(dy, cache):
    """layers.attention_backward writing dq, dk, dv straight into one (B, T, 3C) buffer and
    forming the softmax's row sums without a (B, NH, T, T) product temporary."""
    qs, k, v, att, att_used, drop_cache, scale = cache
    B, NH, T, HS = qs.shape
    C = NH * HS
    dy = dy.reshape(B, T, NH, HS).transpose(0, 2, 1, 3)  # (B, NH, T, HS) view
    # dq, dk, dv are views into one (B, T, 3, NH, HS) buffer, the layout of qkv
    dqkv = np.empty((B, T, 3, NH, HS), dtype=dy.dtype)
    dq, dk, dv = dqkv.transpose(2, 0, 3, 1, 4)  # each (B, NH, T, HS)
    datt = dy @ v.transpose(0, 1, 3, 2)  # (B, NH, T, T)
    np.matmul(att_used.transpose(0, 1, 3, 2), dy, out=dv)  # dv = att_used^T @ dy
    (datt,) = dropout_backward(datt, drop_cache)
    datt -= np.vecdot(datt, att)[..., None]  # datt - sum_j datt_j att_j
    dpreatt = np.multiply(datt, att, out=datt)  # (B, NH, T, T)
    np.matmul(dpreatt, k, out=dq)
    dq *= scale  # dq = (dpreatt @ k) * scale
    np.matmul(dpreatt.transpose(0, 1, 3, 2), qs, out=dk)  # dk = dpreatt^T @ qs
    return (dqkv.reshape(B, T, 3 * C),)


# ----------------------------------------------------------------------------------------
# the table


@dataclasses.dataclass(frozen=True)
class KernelTable:
    """The layer functions one forward/backward pass calls, as forward/backward pairs.

    Embedding, linear and dropout have one form only (they are plain and already cheap),
    so both tables share them.
    """

    name: str
    embedding_forward: Callable = L.embedding_forward
    embedding_backward: Callable = L.embedding_backward
    linear_forward: Callable = L.linear_forward
    linear_backward: Callable = L.linear_backward
    dropout_forward: Callable = L.dropout_forward
    dropout_backward: Callable = L.dropout_backward
    layernorm_forward: Callable = L.layernorm_forward
    layernorm_backward: Callable = L.layernorm_backward
    gelu_forward: Callable = L.gelu_forward
    gelu_backward: Callable = L.gelu_backward
    attention_forward: Callable = L.attention_forward
    attention_backward: Callable = L.attention_backward

    def functions(self) -> dict[str, Callable]:
        """name -> function, every kernel of the table (for profilers and tests)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "name"}


PLAIN = KernelTable("plain")
FAST = KernelTable(
    "fast",
    layernorm_forward=layernorm_forward_fast, layernorm_backward=layernorm_backward_fast,
    gelu_forward=gelu_forward_fast, gelu_backward=gelu_backward_fast,
    attention_forward=attention_forward_fast, attention_backward=attention_backward_fast,
)
KERNELS = {"plain": PLAIN, "fast": FAST}


def kernel_table(kernels) -> KernelTable:
    """A KernelTable from a name in KERNELS or a table itself."""
    if isinstance(kernels, KernelTable):
        return kernels
    if kernels not in KERNELS:
        raise ValueError(f"kernels must be one of {', '.join(KERNELS)}, got {kernels!r}")
    return KERNELS[kernels]
