"""The finite-difference gradient-check harness (CS231n's gradient_check, in float64).

    numeric = numerical_gradient(f, x)      # f() -> scalar, reading x in place
    assert rel_error(analytic, numeric) < 1e-7

Centred differences: df/dx_i ~ (f(x + h e_i) - f(x - h e_i)) / 2h, with error O(h^2).
A layer is checked through the scalar f = sum(out * dout) with a random upstream gradient
dout, so every output element gets a different weight (an all-ones dout would hide
mistakes that cancel in a plain sum). See docs/gradient_checking.md.
"""
from __future__ import annotations

import numpy as np


def rel_error(a, b) -> float:
    """max |a - b| / max(|a| + |b|, tiny): scale-free, 0 for identical arrays."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.max(np.abs(a - b) / np.maximum(np.abs(a) + np.abs(b), 1e-12)))


def tensor_rel_error(a, b) -> float:
    """||a - b|| / (||a|| + ||b||) over a whole tensor.

    The whole-model check uses this: a weight whose gradient is ~1e-9 has a finite
    difference dominated by float64 round-off (~1e-11 here), so the elementwise ratio of
    `rel_error` would flag correct code; the tensor norm weighs entries by their size.
    """
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    denom = np.linalg.norm(a) + np.linalg.norm(b)
    return 0.0 if denom == 0 else float(np.linalg.norm(a - b) / denom)


def numerical_gradient(f, x, h=1e-5, indices=None):
    """Centred-difference gradient of the scalar f() with respect to the array x.

    x is perturbed in place and restored. `indices` (an iterable of index tuples) checks a
    subset of entries; the rest of the returned array is left at 0.
    """
    grad = np.zeros_like(x, dtype=np.float64)
    it = indices if indices is not None else np.ndindex(x.shape)
    for i in it:
        old = x[i]
        x[i] = old + h
        f_plus = f()
        x[i] = old - h
        f_minus = f()
        x[i] = old
        grad[i] = (f_plus - f_minus) / (2 * h)
    return grad


def check_layer(forward, backward, inputs, rng, wrt=None, h=1e-5):
    """Compare `backward` with finite differences for each input array of `forward`.

    forward(*inputs) -> (out, cache); backward(dout, cache) -> gradients in the order of
    `inputs` (positions in `wrt`, default all). Returns {position: tensor relative error}.
    Scored per tensor: a correct entry of ~1e-9 (GELU at x = -6) against a finite
    difference with ~1e-11 round-off would fail an entry-by-entry ratio.
    """
    out, cache = forward(*inputs)
    dout = rng.standard_normal(out.shape)  # random, not ones: errors cannot cancel in a sum
    grads = backward(dout, cache)
    f = lambda: float(np.sum(forward(*inputs)[0] * dout))  # noqa: E731
    wrt = range(len(inputs)) if wrt is None else wrt
    return {pos: tensor_rel_error(g, numerical_gradient(f, inputs[pos], h=h)) for pos, g in zip(wrt, grads)}
