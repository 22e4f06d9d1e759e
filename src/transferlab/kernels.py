"""Fast forms of the layers, and the table through which the model picks its kernels.

layers.py holds the plain form of every layer: the equations of its docs page, written the
way a student reads them. Some of those plain forms make several temporaries the size of
their input, and at (B, T, 4C) or (B, NH, T, T) a layer is then bound by memory traffic,
not arithmetic. The fast forms here compute the same numbers with fewer passes over
memory (in-place updates, row reductions without a product temporary); each names the
plain form it equals, and tests/test_kernels.py holds every pair equal (float32 rounding,
1e-12 in float64). docs/performance.md gives each trick its measured gain.

Layers of fast forms: `*_fast` are the in-place forms of one whole-array pass each;
`*_chunked` (GELU, LayerNorm) run those same passes over chunks of rows that stay in the
L2 cache; `attention_forward_tiled` runs the in-place attention over tiles of queries
that skip the masked triangle of causal attention. The "fast" table uses the chunked and
tiled forms, which build on the in-place ones, and two forms equal to their plain ones
bit for bit: `cross_entropy_chunked` (the LM loss over chunks of rows) and
`embedding_backward_rows` (the tied embedding's gradient: np.add.at through a 1-D view,
and only the batch's tokens' rows).

The model never rebinds names to switch kernels: it calls them through a `KernelTable`,

    model = GPT(config, kernels="plain")     # or model.kernels = KERNELS["plain"]

and `src/bench.py` times one table against another the same way.
"""
from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import functools
import math
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, NamedTuple

import numpy as np

from . import layers as L
from . import losses
from .layers import GELU_COEF, LAYERNORM_EPS, dropout_backward, dropout_forward
from .losses import IGNORE_INDEX


def _sum_lastdim(x):
    """x.sum(axis=-1, keepdims=True): the same sums, ~3x faster on rows of 32-256 numbers.

    np.sum pays a fixed cost per row that dominates on rows this short; np.einsum's
    summing loop does not (NumPy 2.x; measured in docs/performance.md).
    """
    return np.einsum("...i->...", x)[..., None]  # (..., 1)


# chunks of rows that stay in the L2 cache

CHUNK_BYTES = 1 << 18  # one operand's chunk: 256 KB. A fast elementwise kernel makes 5-10
# passes over its arrays; over the whole (B, T, 4C) array each pass streams from main
# memory, over a chunk of rows the 3-4 operands (~1 MB) stay in L2 (1-2 MB per core on
# the machines measured) between passes. docs/performance.md#chunked-gelu-and-layernorm.


def row_chunks(n_rows: int, row_bytes: int, chunk_bytes: int | None = None) -> list[slice]:
    """Slices of consecutive rows, each about `chunk_bytes` (default CHUNK_BYTES) long."""
    step = max(1, (chunk_bytes or CHUNK_BYTES) // max(1, row_bytes))
    return [slice(i, min(i + step, n_rows)) for i in range(0, n_rows, step)]


def _rows(x):
    """x as (N, D) rows, N = all leading dims (a view for the contiguous arrays layers make)."""
    return x.reshape(-1, x.shape[-1])


# ----------------------------------------------------------------------------------------
# token embedding: equals layers.embedding_backward


def add_rows_at(target, rows, values):
    """np.add.at(target, rows, values) for a C-contiguous 2-D target: target[rows[i]] +=
    values[i] for i in order, the same additions in the same order (bit for bit).

    NumPy's ufunc.at has a fast loop for one-dimensional operands only; on rows it walks
    the index an element at a time, 3-6x slower at the bench's sizes. Here each row i is
    spread into its C flat positions rows[i] * C + c of target's 1-D view, a chunk of rows
    at a time (row_chunks) so the flat index stays small.
    """
    if not target.flags.c_contiguous:
        raise ValueError("add_rows_at needs a C-contiguous target (its 1-D view is written)")
    C = target.shape[1]
    flat = target.reshape(-1)  # (R * C,) a view of target
    rows = np.asarray(rows, dtype=np.intp)  # rows * C in the platform's index type
    values = values.reshape(len(rows), C)  # (N, C)
    columns = np.arange(C)  # (C,)
    for part in row_chunks(len(rows), C * columns.itemsize):
        where = rows[part, None] * C + columns  # (n, C) flat positions of the chunk's rows
        np.add.at(flat, where.reshape(-1), values[part].reshape(-1))


def embedding_backward_rows(dout, cache, head_dwte=None):
    """layers.embedding_backward with its np.add.at done as add_rows_at (the same additions
    in the same order, 3-6x faster), summing over the tokens the batch holds only: when
    the batch has fewer positions than the vocabulary has rows, each token's rows are
    summed in a (tokens, C) array, then written into dwte or added into the tied head's
    gradient without a zero (V, C) array and a pass over all of it (at GPT-2's vocabulary
    of 50257: 154 MB, for the 1024 tokens of a batch). With no fewer positions than rows
    there is nothing to skip (np.unique's sort would cost more): all V rows are summed."""
    idx, wte_shape, wpe_shape = cache
    B, T, C = dout.shape
    if idx.size >= wte_shape[0]:
        dwte = np.zeros(wte_shape, dtype=dout.dtype)  # (V, C)
        add_rows_at(dwte, idx.reshape(-1), dout)
        if head_dwte is not None:
            head_dwte += dwte  # as the plain form: the zero rows of absent tokens too
            dwte = head_dwte
    else:
        tokens, where = np.unique(idx.reshape(-1), return_inverse=True)  # (U,) sorted, (B*T,)
        sums = np.zeros((tokens.size, C), dtype=dout.dtype)  # (U, C)
        add_rows_at(sums, where.reshape(-1), dout)
        if head_dwte is None:
            dwte = np.zeros(wte_shape, dtype=dout.dtype)  # (V, C)
            dwte[tokens] = sums
        else:
            dwte = head_dwte
            dwte[tokens] += sums  # rows of absent tokens: head + 0, unchanged
    dwpe = np.zeros(wpe_shape, dtype=dout.dtype)  # (block_size, C)
    dwpe[:T] = dout.sum(axis=0)
    return dwte, dwpe


# ----------------------------------------------------------------------------------------
# cross-entropy: equals losses.cross_entropy


def cross_entropy_chunked(logits, targets, ignore_index=IGNORE_INDEX, label_smoothing=0.0,
                          count=None):
    """losses.cross_entropy a chunk of rows at a time (row_chunks), with the same operations
    in the same order, so the same numbers bit for bit; the max is np.fmax.reduce (the same
    maxima, faster, see softmax_lastdim_inplace). At the LM head a row is the whole
    vocabulary: GPT-2's (1024, 50257) logits are 206 MB, and the plain form's eight passes
    and four temporaries of that size stream from memory; here each chunk's stay in L2 and
    dlogits is the only full-size array made."""
    K = logits.shape[-1]
    z, y_safe, valid, n = losses.counted_rows(logits, targets, ignore_index, count)
    if n == 0:
        return 0.0, np.zeros_like(logits)
    eps = float(label_smoothing)
    weight = (valid / n).astype(z.dtype)[:, None]  # (N_all, 1) ignored positions get no gradient
    dz = np.empty_like(z)  # (N_all, K)
    per_pos = np.empty(len(y_safe), dtype=z.dtype)  # (N_all,)
    for rows in row_chunks(z.shape[0], K * z.itemsize):
        zs, p, ys = z[rows], dz[rows], y_safe[rows]
        at = np.arange(len(ys))
        logp = zs - np.fmax.reduce(zs, axis=-1, keepdims=True)  # shifted
        np.exp(logp, out=p)
        logp -= np.log(p.sum(axis=-1, keepdims=True))  # log_softmax
        nll = -logp[at, ys]
        per_pos[rows] = (1.0 - eps) * nll + eps * (-logp.mean(axis=-1)) if eps else nll
        np.exp(logp, out=p)  # p
        p[at, ys] -= 1.0 - eps
        if eps:
            p -= eps / K
        p *= weight[rows]
    loss = float(per_pos[valid].sum() / n)
    return loss, dz.reshape(logits.shape)


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


def layernorm_forward_chunked(x, w, b, eps=LAYERNORM_EPS):
    """layernorm_forward_fast, a chunk of rows at a time (row_chunks): the same operations
    on each chunk while it is in cache."""
    C = x.shape[-1]
    x2 = _rows(x)  # (N, C)
    xhat = np.empty_like(x2)  # (N, C)
    out = np.empty_like(x2)  # (N, C)
    rstd = np.empty((x2.shape[0], 1), dtype=x.dtype)  # (N, 1)
    for rows in row_chunks(x2.shape[0], C * x.itemsize):
        xs, xh, o, r = x2[rows], xhat[rows], out[rows], rstd[rows]
        np.subtract(xs, _sum_lastdim(xs) / C, out=xh)  # xc = x - mean
        np.divide(np.vecdot(xh, xh)[:, None], C, out=r)  # var
        r += eps
        np.sqrt(r, out=r)
        np.divide(1.0, r, out=r)  # rstd = 1 / sqrt(var + eps)
        xh *= r  # xhat
        np.multiply(xh, w, out=o)
        o += b
    shape = x.shape
    return out.reshape(shape), (xhat.reshape(shape), rstd.reshape(*shape[:-1], 1), w)


def layernorm_backward_chunked(dout, cache):
    """layernorm_backward_fast, dx a chunk of rows at a time (dw and db stay whole-array
    reductions: chunking them would only change their summation order)."""
    xhat, rstd, w = cache
    C = xhat.shape[-1]
    dout2, xhat2, rstd2 = _rows(dout), _rows(xhat), rstd.reshape(-1, 1)  # (N, C), (N, C), (N, 1)
    dw = np.einsum("nc,nc->c", dout2, xhat2)  # (C,)
    db = dout2.sum(axis=0)  # (C,)
    dx = np.empty_like(dout2)  # (N, C)
    for rows in row_chunks(dout2.shape[0], C * dout.itemsize):
        d, xh, dxs = dout2[rows], xhat2[rows], dx[rows]
        np.multiply(d, w, out=dxs)  # dxhat
        proj = np.vecdot(dxs, xh)[:, None] / C  # mean(dxhat * xhat)
        dxs -= _sum_lastdim(dxs) / C  # dxhat - mean(dxhat)
        dxs -= xh * proj
        dxs *= rstd2[rows]
    return dx.reshape(dout.shape), dw, db


# ----------------------------------------------------------------------------------------
# GELU: equals layers.gelu_forward / layers.gelu_backward


def _gelu_tanh_into(x, t):
    """t = tanh(sqrt(2/pi) (x + 0.044715 x^3)), the tanh of the GELU, in t's buffer
    (x (1 + 0.044715 x^2): the cube from products, never x ** 3)."""
    np.multiply(x, x, out=t)  # x^2
    t *= 0.044715
    t += 1.0
    t *= x  # x + 0.044715 x^3
    t *= GELU_COEF
    np.tanh(t, out=t)
    return t


def gelu_forward_fast(x):
    """layers.gelu_forward in two buffers: written as one expression, the formula makes six
    temporaries of x's size."""
    th = _gelu_tanh_into(x, np.empty_like(x))  # (..., D)
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


def gelu_forward_chunked(x):
    """gelu_forward_fast, a chunk of rows at a time (row_chunks). Keeps only x for
    backward, which recomputes the tanh chunk by chunk (as llm.c and PyTorch do): one
    (N, D) array less alive from forward to backward."""
    x2 = _rows(x)  # (N, D)
    out = np.empty_like(x2)  # (N, D)
    for rows in row_chunks(x2.shape[0], x2.shape[1] * x.itemsize):
        xs, o = x2[rows], out[rows]
        _gelu_tanh_into(xs, o)  # th, in out's chunk
        o += 1.0
        o *= xs
        o *= 0.5  # 0.5 x (1 + th)
    return out.reshape(x.shape), (x,)


def gelu_backward_chunked(dout, cache):
    """gelu_backward_fast, a chunk of rows at a time (row_chunks), the tanh recomputed from
    x in a chunk-sized scratch (the same operations as the forward, so the same numbers)."""
    (x,) = cache
    x2, dout2 = _rows(x), _rows(dout)  # (N, D)
    dx = np.empty_like(x2)  # (N, D)
    chunks = row_chunks(x2.shape[0], x2.shape[1] * x.itemsize)
    n = max((c.stop - c.start for c in chunks), default=0)  # rows of the largest chunk
    th, sech2 = np.empty((2, n, x2.shape[1]), dtype=x.dtype)  # one chunk's scratch each, reused
    for rows in chunks:
        m = rows.stop - rows.start
        xs, d, t, s = x2[rows], dx[rows], th[:m], sech2[:m]
        _gelu_tanh_into(xs, t)
        np.multiply(xs, xs, out=d)  # x^2
        d *= 3.0 * 0.044715
        d += 1.0
        d *= GELU_COEF  # d(inner)/dx
        d *= xs
        np.multiply(t, t, out=s)
        np.subtract(1.0, s, out=s)  # 1 - th^2
        d *= s
        d += t
        d += 1.0
        d *= 0.5
        d *= dout2[rows]
    return (dx.reshape(x.shape),)


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


ATTENTION_TILE = 32  # queries per tile of the causal attention (32 and 64 measured alike at T = 256;
# 32 skips more of the triangle at T = 64 and 128)


def only_past_keys(allowed) -> bool:
    """True when no query may attend to a later key (causal, with or without padding):
    then a tile of queries needs only the keys up to its own end."""
    return allowed is not None and not np.triu(allowed, 1).any()


def dropout_mask(shape, dtype, p, rng):
    """The scaled mask layers.dropout_forward draws for an array of `shape` (the same RNG
    call, so the same numbers), or None when dropout is off."""
    if p == 0.0 or rng is None:
        return None
    keep = rng.random(shape, dtype=dtype) >= p
    return keep * np.dtype(dtype).type(1.0 / (1.0 - p))


class TiledAttentionCache(NamedTuple):
    qs: np.ndarray  # (B, NH, T, HS) q * scale
    k: np.ndarray
    v: np.ndarray
    tiles: list  # (batch slice, query slice, att, att_used) per tile
    drop: object  # the full (B, NH, T, T) scaled dropout mask, or None
    scale: float


def attention_forward_tiled(qkv, n_head, allowed=None, attn_pdrop=0.0, rng=None, tile=None):
    """attention_forward_fast over tiles of `tile` queries (ATTENTION_TILE) that skip the
    masked triangle: when no query may see a later key (`only_past_keys`), the tile of
    queries i0..i1-1 needs the keys 0..i1-1 only. At T = 8 tiles that is 56% of the T x T
    scores, and each tile's scores are small enough to stay in cache through the softmax
    (the batch is split too, so one tile's scores are about 2 * CHUNK_BYTES).

    Any other mask (bidirectional, or T <= tile) runs attention_forward_fast unchanged.
    """
    B, T, C3 = qkv.shape
    tile = tile or ATTENTION_TILE
    if T <= tile or not only_past_keys(allowed):
        return attention_forward_fast(qkv, n_head, allowed, attn_pdrop, rng)
    C = C3 // 3
    HS = C // n_head
    q, k, v = qkv.reshape(B, T, 3, n_head, HS).transpose(2, 0, 3, 1, 4)  # each (B, NH, T, HS)
    scale = 1.0 / math.sqrt(HS)
    qs = q * scale  # (B, NH, T, HS)
    bias = np.where(allowed, 0.0, -np.inf).astype(qkv.dtype)  # (B or 1, 1, T, T)
    drop = dropout_mask((B, n_head, T, T), qkv.dtype, attn_pdrop, rng)  # drawn as the plain form does
    y = np.empty((B, T, C), dtype=qkv.dtype)  # (B, T, C)
    yh = y.reshape(B, T, n_head, HS).transpose(0, 2, 1, 3)  # (B, NH, T, HS) view
    # batch rows per tile: the largest tile of scores (tile x T per head) ~ 2 CHUNK_BYTES
    per_b = n_head * tile * T * qkv.itemsize
    tiles = []
    for bs in row_chunks(B, per_b, 2 * CHUNK_BYTES):
        bb = bias[bs] if bias.shape[0] > 1 else bias
        for i0 in range(0, T, tile):
            qt = slice(i0, min(i0 + tile, T))
            kt = slice(0, qt.stop)  # the keys this tile of queries may see
            att = qs[bs, :, qt] @ k[bs, :, kt].transpose(0, 1, 3, 2)  # (b, NH, tq, i1)
            att += bb[:, :, qt, kt]
            softmax_lastdim_inplace(att)
            att_used = att if drop is None else att * drop[bs, :, qt, kt]
            np.matmul(att_used, v[bs, :, kt], out=yh[bs, :, qt])
            tiles.append((bs, qt, att, att_used))
    return y, TiledAttentionCache(qs, k, v, tiles, drop, scale)


def attention_backward_tiled(dy, cache):
    """attention_backward_fast, tile by tile (attention_forward_tiled): dq of a tile is
    written once, dk and dv of the keys it saw are summed over the tiles."""
    if not isinstance(cache, TiledAttentionCache):
        return attention_backward_fast(dy, cache)
    qs, k, v, tiles, drop, scale = cache
    B, NH, T, HS = qs.shape
    C = NH * HS
    dy = dy.reshape(B, T, NH, HS).transpose(0, 2, 1, 3)  # (B, NH, T, HS) view
    dqkv = np.empty((B, T, 3, NH, HS), dtype=dy.dtype)
    dq, dk, dv = dqkv.transpose(2, 0, 3, 1, 4)  # each (B, NH, T, HS)
    dk[...] = 0.0
    dv[...] = 0.0
    for bs, qt, att, att_used in tiles:
        kt = slice(0, qt.stop)
        dyt = dy[bs, :, qt]  # (b, NH, tq, HS)
        datt = dyt @ v[bs, :, kt].transpose(0, 1, 3, 2)  # (b, NH, tq, i1)
        dv[bs, :, kt] += att_used.transpose(0, 1, 3, 2) @ dyt
        if drop is not None:
            datt *= drop[bs, :, qt, kt]
        datt -= np.vecdot(datt, att)[..., None]
        datt *= att  # dpreatt
        np.matmul(datt, k[bs, :, kt], out=dq[bs, :, qt])
        dq[bs, :, qt] *= scale
        dk[bs, :, kt] += datt.transpose(0, 1, 3, 2) @ qs[bs, :, qt]
    return (dqkv.reshape(B, T, 3 * C),)


# ----------------------------------------------------------------------------------------
# threads: BLAS's pool, and ours (model.batch_threads runs parts of the batch in threads,
# BLAS at one each; the optimizers update chunks of their parameters in threads)

# numpy's wheels bundle OpenBLAS with renamed symbols; the plain names cover other builds
_OPENBLAS_THREAD_FUNCS = [
    ("scipy_openblas_get_num_threads64_", "scipy_openblas_set_num_threads64_"),
    ("openblas_get_num_threads64_", "openblas_set_num_threads64_"),
    ("openblas_get_num_threads", "openblas_set_num_threads"),
]


@functools.lru_cache(maxsize=None)
def openblas_thread_funcs():
    """(get, set) ctypes functions of the OpenBLAS NumPy loaded, or None if not found."""
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "openblas" in line.lower()}
    except OSError:  # not Linux
        return None
    for path in sorted(paths):
        lib = ctypes.CDLL(path)  # already loaded by numpy: this only returns a handle
        for get_name, set_name in _OPENBLAS_THREAD_FUNCS:
            if hasattr(lib, get_name) and hasattr(lib, set_name):
                return getattr(lib, get_name), getattr(lib, set_name)
    return None


@contextlib.contextmanager
def blas_threads(n: int):
    """OpenBLAS at n threads inside the block, as before after it (no-op for another BLAS)."""
    funcs = openblas_thread_funcs()
    before = int(funcs[0]()) if funcs else n
    if before != n:
        funcs[1](ctypes.c_int(n))
    try:
        yield
    finally:
        if before != n:
            funcs[1](ctypes.c_int(before))


def blas_thread_count() -> int:
    """How many threads OpenBLAS runs a call on now (1 if NumPy's BLAS is another one)."""
    funcs = openblas_thread_funcs()
    return max(1, int(funcs[0]())) if funcs else 1


_POOLS: dict[int, ThreadPoolExecutor] = {}


def in_threads(fn, items) -> list:
    """[fn(item) for item in items], each call in its own thread, with BLAS at one thread
    each meanwhile (two threads each asking OpenBLAS for two would oversubscribe). The
    calls release the GIL in NumPy's loops and BLAS, so they run at the same time."""
    items = list(items)
    pool = _POOLS.get(len(items))
    if pool is None:
        pool = _POOLS[len(items)] = ThreadPoolExecutor(len(items), thread_name_prefix="transferlab")
    with blas_threads(1):
        futures = [pool.submit(fn, item) for item in items]
        return [f.result() for f in futures]


SPLIT_FROM = 1 << 24  # entries: fewer run whole in the calling thread. GPT-2 124M's 124M
# weights are copied into shared memory in 79 ms on one thread and 43 in two, and its step
# gains 1-3%; split at 0, medium's step took 1.5-2% longer and small's 6-8%
# (docs/performance.md#batch-parts-in-processes)


def split_in_threads(fn, groups, threads: int, split_from: int | None = None) -> None:
    """fn(*group) for every group of same-shape arrays, where fn is elementwise (a copy,
    an in-place sum): each group's entries are cut into `threads` equal shares and share k
    of every group runs in thread k, which gives the whole calls' numbers bit for bit.

    For the passes over every parameter that batch parts in processes make while the other
    processes wait (workers.py). Runs whole in the calling thread for one thread or fewer
    than `split_from` (default SPLIT_FROM) entries; a group that is not contiguous runs whole
    in the first share.
    """
    groups = [tuple(g) for g in groups]
    split_from = SPLIT_FROM if split_from is None else split_from
    if threads <= 1 or sum(g[0].size for g in groups) < split_from:
        for g in groups:
            fn(*g)
        return
    shares: list[list] = [[] for _ in range(threads)]
    for g in groups:
        if not all(a.flags.c_contiguous for a in g):
            shares[0].append(g)
            continue
        flat = [a.reshape(-1) for a in g]  # views
        n = flat[0].size
        for k in range(threads):
            s = slice(n * k // threads, n * (k + 1) // threads)
            shares[k].append([a[s] for a in flat])
    in_threads(lambda share: [fn(*g) for g in share], shares)


# ----------------------------------------------------------------------------------------
# memory: keep what NumPy frees for its next arrays (docs/performance.md#reuse-freed-memory)

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt's parameter numbers (malloc.h)
KEEP_BLOCKS_UP_TO = 1 << 30  # bytes: blocks up to this size come from the reused heap


@functools.lru_cache(maxsize=None)
def reuse_freed_memory() -> bool:
    """Ask glibc's malloc to keep the memory NumPy frees for its next arrays: True if set.

    A training step allocates and frees the same temporaries every time. By default glibc
    serves each block over 128 KB with fresh pages from the kernel (mmap) and returns them
    at free, so every step page-faults its working set in again (17,355 faults, 71 MB, a
    training step at the bench's small size: python src/bench.py --malloc). With a higher mmap threshold freed blocks go back to
    malloc's heap, and with a higher trim threshold the heap is not shrunk, so the next
    step reuses pages that are already mapped. Once per process (GPT() calls it); Linux
    with glibc only, elsewhere nothing happens and the answer is False.
    """
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    return (mallopt(M_MMAP_THRESHOLD, KEEP_BLOCKS_UP_TO) == 1
            and mallopt(M_TRIM_THRESHOLD, 2 * KEEP_BLOCKS_UP_TO - 1) == 1)


# ----------------------------------------------------------------------------------------
# the table


@dataclasses.dataclass(frozen=True)
class KernelTable:
    """The layer functions one forward/backward pass calls, as forward/backward pairs, and
    the LM loss, which gives the loss and its gradient in one call (losses.cross_entropy).

    The embedding's forward, linear and dropout have one form only (they are plain and
    already cheap, or one matrix product), so both tables share them.
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
    cross_entropy: Callable = losses.cross_entropy  # (loss, dlogits) in one call

    def functions(self) -> dict[str, Callable]:
        """name -> function, every kernel of the table (for profilers and tests)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "name"}


PLAIN = KernelTable("plain")
FAST = KernelTable(
    "fast",
    layernorm_forward=layernorm_forward_chunked, layernorm_backward=layernorm_backward_chunked,
    gelu_forward=gelu_forward_chunked, gelu_backward=gelu_backward_chunked,
    attention_forward=attention_forward_tiled, attention_backward=attention_backward_tiled,
    embedding_backward=embedding_backward_rows, cross_entropy=cross_entropy_chunked,
)
KERNELS = {"plain": PLAIN, "fast": FAST}


def kernel_table(kernels) -> KernelTable:
    """A KernelTable from a name in KERNELS or a table itself."""
    if isinstance(kernels, KernelTable):
        return kernels
    if kernels not in KERNELS:
        raise ValueError(f"kernels must be one of {', '.join(KERNELS)}, got {kernels!r}")
    return KERNELS[kernels]
