"""The three heads that sit on the backbone's final hidden states h (B, T, C).

- lm:       next-token logits h @ W^T with W the token embedding wte (tied) or its own
            `lm_head.weight` (V, C), the layout Hugging Face uses for both.
- token:    a classifier applied at every position: logits (B, T, K).
- sequence: pool the T positions into one vector (cls / last / mean / attention), then a
            K-way classifier (K = 2 is the binary classifier) or a single logit squashed by a
            sigmoid into a score in [0, 1].

The classifiers are a linear layer `{prefix}.weight (C, K)`, `{prefix}.bias (K,)`, or, with
a hidden width H, an MLP: `{prefix}.fc.weight (C, H)` -> GELU -> `{prefix}.weight (H, K)`.
Like the layers, every piece is a forward/backward pair. See docs/heads.md.

Switching a model from one head to another (`set_head`) and growing its vocabulary for a
CLS token (`resize_vocab`) live here too: docs/head_switching.md.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np

from .layers import gelu_backward, gelu_forward, linear_backward, linear_forward
from .masks import read_only

HEADS = ("lm", "token", "sequence")
POOLINGS = ("cls", "last", "mean", "attention")
SEQUENCE_OUTPUTS = ("classify", "score")
HEAD_PREFIX = {"token": "token_head", "sequence": "seq_head"}
HEAD_PARAM_PREFIXES = ("lm_head.", "token_head.", "seq_head.")
NEW_HEAD_STD = 0.002  # a new linear head starts small so it barely disturbs the backbone


# ----------------------------------------------------------------------------------------
# LM head: logits over the vocabulary


def lm_head_forward(h, w):
    """logits = h @ w^T.  h (B, T, C), w (V, C) -> logits (B, T, V)."""
    B, T, C = h.shape
    logits = (h.reshape(B * T, C) @ w.T).reshape(B, T, -1)  # (B, T, V)
    return logits, (h, w)


def lm_head_backward(dlogits, cache, need_dw=True):
    """dh = dlogits @ w,  dw = dlogits^T @ h. Returns (dh, dw)."""
    h, w = cache
    B, T, C = h.shape
    dl2 = dlogits.reshape(B * T, -1)  # (B*T, V)
    dh = (dl2 @ w).reshape(B, T, C)  # (B, T, C)
    dw = dl2.T @ h.reshape(B * T, C) if need_dw else None  # (V, C)
    return dh, dw


# ----------------------------------------------------------------------------------------
# classifier: linear or one-hidden-layer MLP, applied to the last axis


def init_classifier(prefix, n_in, n_out, hidden, rng, dtype):
    """New classifier parameters: std 0.002 for a linear head, Xavier (Glorot) for an MLP."""
    def xavier(fan_in, fan_out):
        std = math.sqrt(2.0 / (fan_in + fan_out))
        return (rng.standard_normal((fan_in, fan_out)) * std).astype(dtype)

    if hidden:
        return {
            f"{prefix}.fc.weight": xavier(n_in, hidden),
            f"{prefix}.fc.bias": np.zeros(hidden, dtype=dtype),
            f"{prefix}.weight": xavier(hidden, n_out),
            f"{prefix}.bias": np.zeros(n_out, dtype=dtype),
        }
    return {
        f"{prefix}.weight": (rng.standard_normal((n_in, n_out)) * NEW_HEAD_STD).astype(dtype),
        f"{prefix}.bias": np.zeros(n_out, dtype=dtype),
    }


def classifier_forward(x, params, prefix):
    """logits = x @ W + b, or gelu(x @ W_fc + b_fc) @ W + b.  x (..., C) -> (..., K)."""
    caches = {}
    if f"{prefix}.fc.weight" in params:
        fch, caches["fc"] = linear_forward(x, params[f"{prefix}.fc.weight"], params[f"{prefix}.fc.bias"])
        x, caches["gelu"] = gelu_forward(fch)  # (..., H)
    logits, caches["out"] = linear_forward(x, params[f"{prefix}.weight"], params[f"{prefix}.bias"])
    return logits, caches


def classifier_backward(dlogits, caches, prefix):
    """Returns (dx, grads) with grads keyed by parameter name."""
    grads = {}
    dx, grads[f"{prefix}.weight"], grads[f"{prefix}.bias"] = linear_backward(dlogits, caches["out"])
    if "fc" in caches:
        (dfch,) = gelu_backward(dx, caches["gelu"])
        dx, grads[f"{prefix}.fc.weight"], grads[f"{prefix}.fc.bias"] = linear_backward(dfch, caches["fc"])
    return dx, grads


# ----------------------------------------------------------------------------------------
# sequence pooling: (B, T, C) -> (B, C)


def pool_forward(h, mode, mask=None, positions=None):
    """Pool the positions of each sequence into one vector.

    h (B, T, C); mask (B, T) bool, True on real tokens (None: all real).
    - cls / last: h at one position per row, given as `positions` (B,) int
      (the model finds the CLS token, or the last real token).
    - mean: sum_t m_t h_t / sum_t m_t.
    - attention: query q = the mean vector; s_t = h_t . q / sqrt(C) over real tokens;
      a = softmax(s); pooled = sum_t a_t h_t. No parameters: the weights come from h alone.
    """
    B, T, C = h.shape
    m = np.ones((B, T), dtype=h.dtype) if mask is None else mask.astype(h.dtype)  # (B, T)
    if mode in ("cls", "last"):
        pooled = h[np.arange(B), positions]  # (B, C)
        return pooled, (mode, h.shape, positions)
    n = np.maximum(m.sum(axis=1, keepdims=True), 1.0)  # (B, 1): a fully padded row pools to 0
    mean = (h * m[:, :, None]).sum(axis=1) / n  # (B, C)
    if mode == "mean":
        return mean, (mode, m, n)
    if mode == "attention":
        scale = 1.0 / math.sqrt(C)
        s = np.einsum("btc,bc->bt", h, mean) * scale  # (B, T)
        s = np.where(m > 0, s, -np.inf)
        smax = s.max(axis=1, keepdims=True)
        smax[~np.isfinite(smax)] = 0.0
        a = np.exp(s - smax)  # (B, T)
        a /= np.maximum(a.sum(axis=1, keepdims=True), np.finfo(h.dtype).tiny)
        pooled = np.einsum("bt,btc->bc", a, h)  # (B, C)
        return pooled, (mode, m, n, h, mean, a, scale)
    raise ValueError(f"pooling must be one of {POOLINGS}, got {mode!r}")


def pool_backward(dpooled, cache):
    """dh (B, T, C) from dpooled (B, C). Derivation in docs/heads.md#pooling."""
    mode = cache[0]
    if mode in ("cls", "last"):
        _, shape, positions = cache
        dh = np.zeros(shape, dtype=dpooled.dtype)
        dh[np.arange(shape[0]), positions] = dpooled
        return dh
    if mode == "mean":
        _, m, n = cache
        return m[:, :, None] * (dpooled / n)[:, None, :]  # (B, T, C)
    _, m, n, h, mean, a, scale = cache
    # in the forward pass this was: pooled = sum_t a_t h_t, so h_t gets a_t * dpooled ...
    dh = a[:, :, None] * dpooled[:, None, :]  # (B, T, C)
    # ... and the weights a = softmax(s) get da_t = h_t . dpooled
    da = np.einsum("btc,bc->bt", h, dpooled)  # (B, T)
    ds = a * (da - (da * a).sum(axis=1, keepdims=True))  # softmax backward identity
    # s_t = h_t . q * scale: h is used twice (as key and, through q, as query): gradients add
    dh += (ds * scale)[:, :, None] * mean[:, None, :]
    dmean = np.einsum("bt,btc->bc", ds, h) * scale  # (B, C)
    # q = sum_t m_t h_t / n
    dh += m[:, :, None] * (dmean / n)[:, None, :]
    return dh


def pool_positions(pooling, idx, pad_mask, cls_id, B, T):
    """The one position per row that cls / last pooling reads, (B,) int; None otherwise.

    cls: the first CLS token of each row (every row must have one). last: the last real
    token (the last position when there is no padding mask).
    """
    if pooling == "cls":
        if idx is None:
            raise ValueError("CLS pooling needs the token ids (pass idx=...)")
        is_cls = idx == cls_id  # (B, T)
        missing = ~is_cls.any(axis=1)
        if missing.any():
            raise ValueError(f"CLS pooling: row {int(np.argmax(missing))} has no CLS token (id {cls_id})")
        return is_cls.argmax(axis=1)  # the first CLS of each row
    if pooling == "last":
        if pad_mask is None:
            return np.full(B, T - 1)
        return T - 1 - pad_mask[:, ::-1].argmax(axis=1)  # last real token
    return None


# ----------------------------------------------------------------------------------------
# head switching: one backbone, another head


def head_param_names(model) -> list[str]:
    """Names of the model's head parameters (empty for a tied LM head)."""
    return [n for n in model.params if n.startswith(HEAD_PARAM_PREFIXES)]


def init_head(model) -> dict:
    """Fresh parameters for the head model.config names (none for a tied LM head)."""
    cfg = model.config
    if cfg.head == "lm":
        return {} if cfg.tie_weights else {"lm_head.weight": model.params["wte.weight"].copy()}
    return init_classifier(HEAD_PREFIX[cfg.head], cfg.n_embd, cfg.n_outputs, cfg.head_hidden,
                           model.init_rng, model.dtype)


def set_head(model, head: str, **changes):
    """Switch to another head on the same backbone, e.g. LM -> sequence classifier.

    LM -> classifier breaks the wte tie first: the classifier never touches wte, so
    freezing the backbone then really freezes the embedding. A new classifier starts
    small (std 0.002; Xavier for an MLP head). Classifier -> LM restores the tied head
    (unless tie_weights=False is passed, which copies wte into its own lm_head.weight).
    `changes` are other GPTConfig fields (n_classes, pooling, ...). Returns the model.
    See docs/head_switching.md.
    """
    old_head_names = head_param_names(model)
    model.config = dataclasses.replace(model.config, head=head, **changes)
    for name in old_head_names:
        del model.params[name]
        model.masks.pop(name, None)
    model.params.update(init_head(model))
    model.clear_caches()
    return model


def resize_vocab(model, new_vocab_size: int, std: float | None = None):
    """Grow (or shrink) the vocabulary: old wte rows are kept, new rows drawn N(0, std).

    Used to add a CLS token for CLS pooling. A tied LM head follows automatically; an
    untied lm_head.weight is resized the same way. Any mask on wte is resized too (new
    rows trainable, old rows as they were). Returns the model.
    """
    old = model.config.vocab_size
    std = model.config.init_std if std is None else std
    # validate first (e.g. a pad_id or cls_id beyond the new size), before changing params
    new_config = dataclasses.replace(model.config, vocab_size=new_vocab_size)
    for name in ("wte.weight", "lm_head.weight"):
        if name not in model.params:
            continue
        w = model.params[name]
        keep = min(old, new_vocab_size)
        new = np.empty((new_vocab_size, w.shape[1]), dtype=model.dtype)  # (V', C)
        new[:keep] = w[:keep]
        new[keep:] = (model.init_rng.standard_normal((max(new_vocab_size - old, 0), w.shape[1]))
                      * std).astype(model.dtype)
        model.params[name] = new
        if name in model.masks:
            mask = np.broadcast_to(model.masks[name], w.shape)
            grown = np.ones((new_vocab_size, w.shape[1]), dtype=mask.dtype)
            grown[:keep] = mask[:keep]
            model.masks[name] = read_only(grown)  # as every mask: read once, kept (masks.py)
    model.config = new_config
    return model
