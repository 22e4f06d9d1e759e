"""The heads of src/transferlab/heads.py: LM head, classifier (linear / MLP), pooling.

Finite differences in float64 (with a padding mask for pooling), the behaviour a user
relies on (padding never leaks into a pooled vector, attention-pooling weights form a
distribution over the real tokens), the initialisation statistics and dtype discipline.
See docs/heads.md.
"""
import math

import numpy as np
import pytest

from gradcheck import numerical_gradient, tensor_rel_error
from transferlab.heads import (
    NEW_HEAD_STD,
    POOLINGS,
    classifier_backward,
    classifier_forward,
    init_classifier,
    lm_head_backward,
    lm_head_forward,
    pool_backward,
    pool_forward,
)

B, T, C, V, K, H = 2, 5, 8, 11, 3, 6  # H: hidden width of the MLP head
TOL = 1e-7
PAD = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=bool)  # True on real tokens
FULLY_PADDED = np.array([[1, 1, 1, 1, 0], [0, 0, 0, 0, 0]], dtype=bool)
LAST_REAL = np.array([2, 4])  # where "last" pooling reads each row of PAD
CLS_AT = np.array([0, 3])  # where "cls" pooling reads (the model finds the CLS token)


def rng(seed=0):
    return np.random.default_rng(seed)


def hidden(seed):
    return rng(seed).standard_normal((B, T, C))


def grad_errors(forward, grads, dout, arrays):
    """tensor_rel_error of each analytic gradient against centred differences of
    f = sum(forward() * dout), perturbing each array of `arrays` in place."""
    f = lambda: float(np.sum(forward() * dout))  # noqa: E731
    return {name: tensor_rel_error(grads[name], numerical_gradient(f, a)) for name, a in arrays.items()}


# ----------------------------------------------------------------------------------------
# LM head


def test_lm_head_gradcheck():
    r = rng(1)
    h, w = hidden(2), r.standard_normal((V, C))
    logits, cache = lm_head_forward(h, w)
    dlogits = r.standard_normal(logits.shape)
    dh, dw = lm_head_backward(dlogits, cache)
    errors = grad_errors(lambda: lm_head_forward(h, w)[0], {"h": dh, "w": dw}, dlogits, {"h": h, "w": w})
    assert all(e < TOL for e in errors.values()), errors


def test_lm_head_is_a_dot_product_with_each_embedding_row():
    r = rng(3)
    h, w = hidden(4), r.standard_normal((V, C))  # w has wte's (V, C) layout
    logits, cache = lm_head_forward(h, w)
    assert logits.shape == (B, T, V)
    for b, t, v in [(0, 0, 0), (1, 4, 10), (0, 2, 5)]:
        assert logits[b, t, v] == pytest.approx(float(h[b, t] @ w[v]), rel=1e-12)
    dh, dw = lm_head_backward(r.standard_normal(logits.shape), cache, need_dw=False)
    assert dw is None and dh.shape == h.shape


# ----------------------------------------------------------------------------------------
# classifier


def random_classifier(hidden_width, seed):
    """init_classifier's names and shapes, filled with O(1) values so every path matters."""
    r = rng(seed)
    params = init_classifier("head", C, K, hidden_width, r, np.float64)
    return {name: r.standard_normal(p.shape) for name, p in params.items()}


@pytest.mark.parametrize("hidden_width", [0, H], ids=["linear", "mlp"])
@pytest.mark.parametrize("shape", [(B, T, C), (B, C)], ids=["token", "sequence"])
def test_classifier_gradcheck(hidden_width, shape):
    params = random_classifier(hidden_width, 5)
    x = rng(6).standard_normal(shape)
    logits, caches = classifier_forward(x, params, "head")
    assert logits.shape == shape[:-1] + (K,)
    dlogits = rng(7).standard_normal(logits.shape)
    dx, grads = classifier_backward(dlogits, caches, "head")
    assert set(grads) == set(params)
    errors = grad_errors(
        lambda: classifier_forward(x, params, "head")[0], {"x": dx, **grads}, dlogits, {"x": x, **params}
    )
    assert all(e < TOL for e in errors.values()), errors


def test_mlp_classifier_is_gelu_between_two_linears():
    params = random_classifier(H, 8)
    x = rng(9).standard_normal((B, C))
    fch = x @ params["head.fc.weight"] + params["head.fc.bias"]
    gelu = 0.5 * fch * (1 + np.tanh(math.sqrt(2 / math.pi) * (fch + 0.044715 * fch**3)))
    expected = gelu @ params["head.weight"] + params["head.bias"]
    np.testing.assert_allclose(classifier_forward(x, params, "head")[0], expected, rtol=1e-12)


# ----------------------------------------------------------------------------------------
# pooling


def positions_for(mode):
    return {"cls": CLS_AT, "last": LAST_REAL}.get(mode)


def pool_grad_error(mode, mask, seed):
    h = hidden(seed)
    positions = positions_for(mode)
    pooled, cache = pool_forward(h, mode, mask, positions)
    dpooled = rng(seed + 1).standard_normal(pooled.shape)
    dh = pool_backward(dpooled, cache)
    forward = lambda: pool_forward(h, mode, mask, positions)[0]  # noqa: E731
    return grad_errors(forward, {"h": dh}, dpooled, {"h": h})["h"]


@pytest.mark.parametrize("mode", POOLINGS)
def test_pool_gradcheck_with_padding(mode):
    assert pool_grad_error(mode, PAD, 10) < TOL


@pytest.mark.parametrize("mode", ["mean", "attention"])
@pytest.mark.parametrize("mask", [None, FULLY_PADDED], ids=["no_mask", "fully_padded_row"])
def test_pool_gradcheck_other_masks(mode, mask):
    assert pool_grad_error(mode, mask, 12) < TOL


@pytest.mark.parametrize("mode, positions", [("cls", CLS_AT), ("last", LAST_REAL)])
def test_cls_and_last_read_one_position(mode, positions):
    h = hidden(14)
    pooled, cache = pool_forward(h, mode, PAD, positions)
    np.testing.assert_array_equal(pooled, h[[0, 1], positions])
    dpooled = rng(15).standard_normal(pooled.shape)
    dh = pool_backward(dpooled, cache)
    expected = np.zeros_like(h)
    for b in range(B):
        expected[b, positions[b]] = dpooled[b]
    np.testing.assert_array_equal(dh, expected)


@pytest.mark.parametrize("mode", ["mean", "attention"])
def test_pooling_ignores_padded_positions(mode):
    h = hidden(16)
    pooled, _ = pool_forward(h, mode, PAD)
    changed = h.copy()
    changed[~PAD] = 1e3 * rng(17).standard_normal(((~PAD).sum(), C))  # garbage at the pads
    np.testing.assert_array_equal(pool_forward(changed, mode, PAD)[0], pooled)
    if mode == "mean":
        for b in range(B):
            np.testing.assert_allclose(pooled[b], h[b, PAD[b]].mean(axis=0), rtol=1e-12)


def test_mean_pooling_without_mask_is_the_plain_mean():
    h = hidden(18)
    np.testing.assert_allclose(pool_forward(h, "mean")[0], h.mean(axis=1), rtol=1e-12)


def test_attention_pooling_weights():
    """Recover the weights a from pooled = sum_t a_t h_t (h[b] has independent rows, T < C),
    then compare them with the softmax of h_t . mean / sqrt(C) over the real tokens."""
    h = hidden(19)
    pooled, _ = pool_forward(h, "attention", PAD)
    for b in range(B):
        a, *_ = np.linalg.lstsq(h[b].T, pooled[b], rcond=None)  # (T,)
        real = PAD[b]
        assert a[real].sum() == pytest.approx(1.0, abs=1e-12)
        np.testing.assert_allclose(a[~real], 0.0, atol=1e-12)
        assert (a[real] > 0).all()
        q = h[b, real].mean(axis=0)
        s = h[b, real] @ q / math.sqrt(C)
        expected = np.exp(s - s.max()) / np.exp(s - s.max()).sum()
        np.testing.assert_allclose(a[real], expected, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("mode", ["mean", "attention"])
def test_fully_padded_row_pools_to_zero(mode):
    h = hidden(20)
    pooled, cache = pool_forward(h, mode, FULLY_PADDED)
    assert np.isfinite(pooled).all() and not pooled[1].any()
    dh = pool_backward(rng(21).standard_normal(pooled.shape), cache)
    assert np.isfinite(dh).all() and not dh[1].any()


def test_unknown_pooling_is_refused_by_name():
    with pytest.raises(ValueError, match="'max'"):
        pool_forward(hidden(22), "max", PAD)


# ----------------------------------------------------------------------------------------
# initialisation


def test_init_linear_classifier_is_small():
    params = init_classifier("seq_head", 400, 500, 0, rng(23), np.float64)
    assert set(params) == {"seq_head.weight", "seq_head.bias"}
    w, b = params["seq_head.weight"], params["seq_head.bias"]
    assert w.shape == (400, 500) and b.shape == (500,)
    assert NEW_HEAD_STD == 0.002
    assert w.std() == pytest.approx(0.002, rel=0.02)  # 200k samples: ~0.2% sampling error
    assert abs(w.mean()) < 0.002 * 0.02
    assert not b.any()


def test_init_mlp_classifier_is_xavier():
    n_in, hid, n_out = 300, 500, 200
    params = init_classifier("token_head", n_in, n_out, hid, rng(24), np.float64)
    assert set(params) == {"token_head.fc.weight", "token_head.fc.bias", "token_head.weight", "token_head.bias"}
    for name, (fan_in, fan_out) in {"token_head.fc.weight": (n_in, hid), "token_head.weight": (hid, n_out)}.items():
        w = params[name]
        assert w.shape == (fan_in, fan_out)
        xavier = math.sqrt(2.0 / (fan_in + fan_out))  # Glorot normal
        assert w.std() == pytest.approx(xavier, rel=0.02), name
        assert abs(w.mean()) < xavier * 0.02
    assert not params["token_head.fc.bias"].any() and not params["token_head.bias"].any()


@pytest.mark.parametrize("hidden_width", [0, H], ids=["linear", "mlp"])
def test_init_classifier_dtype(hidden_width):
    params = init_classifier("head", C, K, hidden_width, rng(25), np.float32)
    assert all(p.dtype == np.float32 for p in params.values())


# ----------------------------------------------------------------------------------------
# dtype discipline: float32 in -> float32 out and float32 gradients


def test_float32_lm_head():
    h, w = hidden(26).astype(np.float32), rng(27).standard_normal((V, C)).astype(np.float32)
    logits, cache = lm_head_forward(h, w)
    dh, dw = lm_head_backward(np.ones_like(logits), cache)
    assert logits.dtype == dh.dtype == dw.dtype == np.float32


@pytest.mark.parametrize("hidden_width", [0, H], ids=["linear", "mlp"])
def test_float32_classifier(hidden_width):
    params = init_classifier("head", C, K, hidden_width, rng(28), np.float32)
    x = hidden(29).astype(np.float32)
    logits, caches = classifier_forward(x, params, "head")
    dx, grads = classifier_backward(np.ones_like(logits), caches, "head")
    assert logits.dtype == dx.dtype == np.float32
    assert all(g.dtype == np.float32 for g in grads.values())


@pytest.mark.parametrize("mode", POOLINGS)
@pytest.mark.parametrize("mask", [PAD, FULLY_PADDED], ids=["padded", "fully_padded_row"])
def test_float32_pooling(mode, mask):
    h = hidden(30).astype(np.float32)
    pooled, cache = pool_forward(h, mode, mask, positions_for(mode))
    dh = pool_backward(np.ones_like(pooled), cache)
    assert pooled.dtype == dh.dtype == np.float32
