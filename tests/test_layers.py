"""The layers of src/transferlab/layers.py, checked four ways:

1. finite differences (float64, centred, random upstream gradient) for every backward;
2. a slow loop version of each vectorised kernel, written here from the equations;
3. PyTorch as an outside reference (skipped cleanly when torch is not installed);
4. dtype discipline: float32 in, float32 out and float32 gradients.

Tiny shapes throughout: B=2, T=5, C=8, NH=2. See docs/gradient_checking.md.
"""
import math

import numpy as np
import pytest

from gradcheck import check_layer
from reference import assert_matches, import_torch, torch_reference
from transferlab.layers import (
    attention_backward,
    attention_forward,
    attention_mask,
    dropout_backward,
    dropout_forward,
    embedding_backward,
    embedding_forward,
    gelu_backward,
    gelu_forward,
    layernorm_backward,
    layernorm_forward,
    linear_backward,
    linear_forward,
)

B, T, C, NH = 2, 5, 8, 2
HS = C // NH
V, BLOCK = 7, 8  # vocabulary and block size (block > T: some wpe rows are unused)
TOL = 1e-7  # per-op relative error of the gradient check

# True on real tokens. Row 0 has 3 real tokens then padding; row 1 is full.
PAD = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=bool)
# Row 1 has no real token at all: every query row of sequence 1 is fully masked.
FULLY_PADDED = np.array([[1, 1, 1, 1, 0], [0, 0, 0, 0, 0]], dtype=bool)


def assert_small(errors, tol=TOL):
    assert errors, "nothing was checked"
    assert all(e < tol for e in errors.values()), errors


def rng(seed=0):
    return np.random.default_rng(seed)


# ----------------------------------------------------------------------------------------
# embedding


def embedding_inputs(r):
    idx = np.array([[1, 3, 3, 0, 6], [3, 2, 1, 1, 5]])  # token 3 appears 3 times, 1 three times
    wte = r.standard_normal((V, C))
    wpe = r.standard_normal((BLOCK, C))
    return idx, wte, wpe


def test_embedding_gradcheck_with_repeated_tokens():
    r = rng(1)
    idx, wte, wpe = embedding_inputs(r)
    # backward returns (dwte, dwpe): the ids (position 0) have no gradient
    assert_small(check_layer(embedding_forward, embedding_backward, [idx, wte, wpe], r, wrt=[1, 2]))


def test_embedding_matches_loop():
    r = rng(2)
    idx, wte, wpe = embedding_inputs(r)
    out, cache = embedding_forward(idx, wte, wpe)
    dout = r.standard_normal(out.shape)
    dwte, dwpe = embedding_backward(dout, cache)

    ref_out = np.zeros((B, T, C))
    ref_dwte, ref_dwpe = np.zeros_like(wte), np.zeros_like(wpe)
    for b in range(B):
        for t in range(T):
            ref_out[b, t] = wte[idx[b, t]] + wpe[t]
            ref_dwte[idx[b, t]] += dout[b, t]  # one row at a time: repeats accumulate
            ref_dwpe[t] += dout[b, t]
    np.testing.assert_allclose(out, ref_out, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(dwte, ref_dwte, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(dwpe, ref_dwpe, rtol=1e-12, atol=1e-12)
    # the rows never used get exactly zero gradient
    assert not dwte[4].any() and not dwpe[T:].any()


# ----------------------------------------------------------------------------------------
# linear


def test_linear_gradcheck_3d_input():
    r = rng(3)
    x = r.standard_normal((B, T, C))
    w = r.standard_normal((C, 6))  # [in, out] layout, in != out so a transpose would show
    b = r.standard_normal(6)
    assert_small(check_layer(linear_forward, linear_backward, [x, w, b], r))


def test_linear_layout_bias_none_and_skipped_products():
    r = rng(4)
    x = r.standard_normal((B, T, C))
    w = r.standard_normal((C, 6))
    out, cache = linear_forward(x, w, None)
    assert out.shape == (B, T, 6)
    np.testing.assert_allclose(out, np.einsum("btc,co->bto", x, w), rtol=1e-12, atol=1e-12)
    dout = r.standard_normal(out.shape)
    dx, dw, db = linear_backward(dout, cache, need_dx=False)
    assert dx is None and dw.shape == (C, 6) and db.shape == (6,)
    dx, dw, db = linear_backward(dout, cache, need_dw=False)
    assert dw is None and dx.shape == x.shape


def test_linear_matches_torch():
    torch = import_torch()
    r = rng(5)
    x, w, b = r.standard_normal((B, T, C)), r.standard_normal((C, 6)), r.standard_normal(6)
    dout = r.standard_normal((B, T, 6))
    # torch stores [out, in]; ours is [in, out]
    ref, ref_grads = torch_reference(lambda x, w, b: torch.nn.functional.linear(x, w.T, b),
                                     x, w, b, dout=dout)
    out, cache = linear_forward(x, w, b)
    assert_matches([out, *linear_backward(dout, cache)], [ref, *ref_grads], rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------------------
# LayerNorm


def layernorm_inputs(r):
    x = r.standard_normal((B, T, C)) * 2.0 + 0.5
    w = 1.0 + 0.3 * r.standard_normal(C)
    b = 0.3 * r.standard_normal(C)
    return x, w, b


def test_layernorm_gradcheck():
    r = rng(6)
    assert_small(check_layer(layernorm_forward, layernorm_backward, list(layernorm_inputs(r)), r))


def test_layernorm_matches_row_loop_forward_and_jacobian_backward():
    """Forward one row at a time; backward through each row's explicit C x C Jacobian."""
    r = rng(7)
    x, w, b = layernorm_inputs(r)
    out, cache = layernorm_forward(x, w, b)
    dout = r.standard_normal(out.shape)
    dx, dw, db = layernorm_backward(dout, cache)

    eps = 1e-5
    ref_out, ref_dx = np.zeros_like(x), np.zeros_like(x)
    ref_dw, ref_db = np.zeros(C), np.zeros(C)
    for row in np.ndindex(B, T):
        xr = x[row]
        mu = sum(xr) / C
        var = sum((xi - mu) ** 2 for xi in xr) / C  # biased variance
        rstd = 1.0 / math.sqrt(var + eps)
        xhat = (xr - mu) * rstd
        ref_out[row] = xhat * w + b
        # d xhat_i / d x_j = rstd * (delta_ij - 1/C - xhat_i xhat_j / C)
        jac = rstd * (np.eye(C) - 1.0 / C - np.outer(xhat, xhat) / C)  # (C, C)
        ref_dx[row] = jac.T @ (dout[row] * w)
        ref_dw += dout[row] * xhat
        ref_db += dout[row]
    np.testing.assert_allclose(out, ref_out, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(dx, ref_dx, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(dw, ref_dw, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(db, ref_db, rtol=1e-10, atol=1e-12)


def test_layernorm_normalises_rows():
    x = rng(8).standard_normal((B, T, C)) * 5.0 + 3.0
    out, _ = layernorm_forward(x, np.ones(C), np.zeros(C))
    np.testing.assert_allclose(out.mean(axis=-1), 0.0, atol=1e-12)
    var = x.var(axis=-1)
    np.testing.assert_allclose(out.var(axis=-1), var / (var + 1e-5), rtol=1e-12)


def test_layernorm_matches_torch():
    torch = import_torch()
    r = rng(9)
    x, w, b = layernorm_inputs(r)
    dout = r.standard_normal(x.shape)
    ref, ref_grads = torch_reference(lambda x, w, b: torch.nn.functional.layer_norm(x, (C,), w, b, eps=1e-5),
                                     x, w, b, dout=dout)
    out, cache = layernorm_forward(x, w, b)
    assert_matches([out, *layernorm_backward(dout, cache)], [ref, *ref_grads], rtol=1e-10, atol=1e-12)


# ----------------------------------------------------------------------------------------
# GELU


def test_gelu_gradcheck():
    r = rng(10)
    x = r.standard_normal((B, T, 4 * C)) * 2.0
    assert_small(check_layer(gelu_forward, gelu_backward, [x], r))


def test_gelu_hand_values():
    x = np.array([0.0, 1.0, 10.0, -10.0])
    out, _ = gelu_forward(x)
    assert out[0] == 0.0
    # the tanh formula evaluated by hand at x = 1
    k = math.sqrt(2.0 / math.pi)
    assert out[1] == pytest.approx(0.5 * (1.0 + math.tanh(k * (1.0 + 0.044715))), rel=1e-14)
    assert out[2] == pytest.approx(10.0, rel=1e-12)  # large x: gelu(x) ~ x
    assert abs(out[3]) < 1e-12  # large negative x: gelu(x) ~ 0


def test_gelu_approximates_exact_gelu():
    """The tanh form approximates x * Phi(x) (the erf GELU) to better than 1e-3."""
    x = np.linspace(-6, 6, 241)
    out, _ = gelu_forward(x)
    exact = np.array([xi * 0.5 * (1.0 + math.erf(xi / math.sqrt(2.0))) for xi in x])
    assert np.max(np.abs(out - exact)) < 1e-3


def test_gelu_matches_torch():
    torch = import_torch()
    r = rng(11)
    x = r.standard_normal((B, T, 4 * C)) * 3.0
    dout = r.standard_normal(x.shape)
    ref, ref_grads = torch_reference(lambda x: torch.nn.functional.gelu(x, approximate="tanh"), x, dout=dout)
    out, cache = gelu_forward(x)
    assert_matches([out, *gelu_backward(dout, cache)], [ref, *ref_grads], rtol=1e-12, atol=1e-14)


# ----------------------------------------------------------------------------------------
# dropout


def test_dropout_gradcheck_fixed_mask():
    r = rng(12)
    x = r.standard_normal((B, T, C))
    # a fresh generator with the same seed on every forward: the same mask every time
    fwd = lambda x: dropout_forward(x, 0.3, np.random.default_rng(0))  # noqa: E731
    assert_small(check_layer(fwd, dropout_backward, [x], r))


def test_dropout_is_inverted_and_reproducible():
    x = rng(13).standard_normal((200, 500)) + 3.0  # never exactly 0
    p = 0.25
    out, cache = dropout_forward(x, p, np.random.default_rng(42))
    again, _ = dropout_forward(x, p, np.random.default_rng(42))
    other, _ = dropout_forward(x, p, np.random.default_rng(43))
    np.testing.assert_array_equal(out, again)  # fixed rng -> fixed mask
    assert not np.array_equal(out, other)
    kept = out != 0
    np.testing.assert_allclose(out[kept], x[kept] / (1 - p), rtol=1e-15)  # scaled at train time
    frac = 1 - kept.mean()
    assert abs(frac - p) < 4 * math.sqrt(p * (1 - p) / x.size)  # ~p of the units dropped
    # backward reuses the very same mask from the cache
    dout = rng(14).standard_normal(x.shape)
    (dx,) = dropout_backward(dout, cache)
    assert not dx[~kept].any()
    np.testing.assert_allclose(dx[kept], dout[kept] / (1 - p), rtol=1e-15)


@pytest.mark.parametrize("p, make_rng", [(0.0, lambda: np.random.default_rng(0)), (0.5, lambda: None)])
def test_dropout_identity_when_off(p, make_rng):
    x = rng(15).standard_normal((B, T, C))
    out, cache = dropout_forward(x, p, make_rng())
    np.testing.assert_array_equal(out, x)
    dout = rng(16).standard_normal(x.shape)
    np.testing.assert_array_equal(dropout_backward(dout, cache)[0], dout)


# ----------------------------------------------------------------------------------------
# attention: finite differences


def qkv_input(seed):
    return rng(seed).standard_normal((B, T, 3 * C))


ATTENTION_CASES = {
    "causal": (True, None),
    "bidirectional": (False, None),
    "padding": (False, PAD),
    "causal_padding": (True, PAD),
    "fully_padded_row": (False, FULLY_PADDED),
    "causal_fully_padded_row": (True, FULLY_PADDED),
}


@pytest.mark.parametrize("case", ATTENTION_CASES)
def test_attention_gradcheck(case):
    causal, pad = ATTENTION_CASES[case]
    allowed = attention_mask(T, causal, pad)
    r = rng(17)
    fwd = lambda qkv: attention_forward(qkv, NH, allowed)  # noqa: E731
    assert_small(check_layer(fwd, attention_backward, [qkv_input(18)], r))


@pytest.mark.parametrize("causal", [False, True])
def test_attention_gradcheck_with_attention_dropout(causal):
    allowed = attention_mask(T, causal, PAD)
    qkv = qkv_input(19)
    fwd = lambda qkv: attention_forward(qkv, NH, allowed, 0.1, np.random.default_rng(0))  # noqa: E731
    # the dropout really is on: the output differs from the dropout-free one
    assert not np.allclose(fwd(qkv)[0], attention_forward(qkv, NH, allowed)[0])
    assert_small(check_layer(fwd, attention_backward, [qkv], rng(20)))


@pytest.mark.parametrize("causal", [False, True])
def test_attention_fully_padded_row_gives_zeros_not_nan(causal):
    qkv = qkv_input(21)
    y, cache = attention_forward(qkv, NH, attention_mask(T, causal, FULLY_PADDED))
    assert np.isfinite(y).all()
    assert not y[1].any()  # sequence 1 has nothing to attend to
    (dqkv,) = attention_backward(rng(22).standard_normal(y.shape), cache)
    assert np.isfinite(dqkv).all()
    assert not dqkv[1].any()
    assert dqkv[0].any()


def test_attention_mask_pattern():
    assert attention_mask(T, causal=False) is None
    causal = attention_mask(T, causal=True)
    both = attention_mask(T, causal=True, pad_mask=PAD)
    pad_only = attention_mask(T, causal=False, pad_mask=PAD)
    for b in range(B):
        for t in range(T):
            for s in range(T):
                assert np.broadcast_to(causal, (B, NH, T, T))[b, 1, t, s] == (s <= t)
                assert np.broadcast_to(pad_only, (B, NH, T, T))[b, 1, t, s] == PAD[b, s]
                assert np.broadcast_to(both, (B, NH, T, T))[b, 1, t, s] == (s <= t and PAD[b, s])


# ----------------------------------------------------------------------------------------
# attention: the slow loop reference


def split_heads(qkv, b, head):
    """q, k, v (T, HS) of one sequence and one head: [q | k | v], heads contiguous in each."""
    cols = slice(head * HS, (head + 1) * HS)
    return qkv[b, :, :C][:, cols], qkv[b, :, C : 2 * C][:, cols], qkv[b, :, 2 * C :][:, cols], cols


def visible_keys(b, t, causal, pad):
    return [s for s in range(T) if (not causal or s <= t) and (pad is None or pad[b, s])]


def attention_loop(qkv, causal, pad):
    """Loop over b, head, t with an explicit softmax in plain Python arithmetic."""
    y = np.zeros((B, T, C))
    for b in range(B):
        for head in range(NH):
            q, k, v, cols = split_heads(qkv, b, head)
            for t in range(T):
                keys = visible_keys(b, t, causal, pad)
                if not keys:
                    continue  # nothing to attend to: the output stays 0
                scores = [sum(q[t, i] * k[s, i] for i in range(HS)) / math.sqrt(HS) for s in keys]
                top = max(scores)
                e = [math.exp(sc - top) for sc in scores]
                for s, es in zip(keys, e):
                    y[b, t, cols] += es / sum(e) * v[s]
    return y


def attention_backward_loop(qkv, dy, causal, pad):
    """Row by row, through the explicit softmax Jacobian J = diag(p) - p p^T."""
    dqkv = np.zeros_like(qkv)
    scale = 1.0 / math.sqrt(HS)
    for b in range(B):
        for head in range(NH):
            q, k, v, cols = split_heads(qkv, b, head)
            dq, dk, dv = (dqkv[b, :, i * C : (i + 1) * C][:, cols] for i in range(3))  # views
            for t in range(T):
                keys = visible_keys(b, t, causal, pad)
                if not keys:
                    continue
                s = k[keys] @ q[t] * scale  # (n,)
                p = np.exp(s - s.max())
                p /= p.sum()
                dyt = dy[b, t, cols]  # (HS,)
                dp = v[keys] @ dyt  # y_t = sum_s p_s v_s
                jac = np.diag(p) - np.outer(p, p)  # dp_i / ds_j
                ds = jac.T @ dp
                dq[t] += ds @ k[keys] * scale
                dk[keys] += np.outer(ds, q[t]) * scale
                dv[keys] += np.outer(p, dyt)
    return dqkv


@pytest.mark.parametrize("case", ATTENTION_CASES)
def test_attention_matches_loop(case):
    causal, pad = ATTENTION_CASES[case]
    qkv = qkv_input(23)
    y, cache = attention_forward(qkv, NH, attention_mask(T, causal, pad))
    np.testing.assert_allclose(y, attention_loop(qkv, causal, pad), rtol=1e-10, atol=1e-12)
    dy = rng(24).standard_normal(y.shape)
    (dqkv,) = attention_backward(dy, cache)
    np.testing.assert_allclose(dqkv, attention_backward_loop(qkv, dy, causal, pad), rtol=1e-10, atol=1e-12)


def test_attention_equal_keys_average_the_values():
    """Identical keys give equal scores, so each query takes the plain mean of the values
    it may see: the running mean of v under a causal mask."""
    qkv = qkv_input(25)
    qkv[:, :, C : 2 * C] = qkv[:, :1, C : 2 * C]  # every position has the same key
    y, _ = attention_forward(qkv, NH, attention_mask(T, causal=True))
    v = qkv[:, :, 2 * C :]
    running_mean = np.cumsum(v, axis=1) / np.arange(1, T + 1)[None, :, None]
    np.testing.assert_allclose(y, running_mean, rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------------------
# attention: PyTorch


@pytest.mark.parametrize("case", ["causal", "bidirectional", "padding", "causal_padding"])
def test_attention_matches_torch_sdpa(case):
    torch = import_torch()
    causal, pad = ATTENTION_CASES[case]
    qkv = qkv_input(26)
    dy = rng(27).standard_normal((B, T, C))
    kwargs = {"is_causal": True} if causal and pad is None else {}
    if pad is not None:  # a bool attn_mask: True = may attend
        mask = torch.tensor(pad)[:, None, None, :].expand(B, NH, T, T)
        if causal:
            mask = mask & torch.ones(T, T, dtype=torch.bool).tril()
        kwargs = {"attn_mask": mask}

    def sdpa(qkvt):
        q, k, v = (a.reshape(B, T, NH, HS).transpose(1, 2) for a in qkvt.split(C, dim=2))
        yt = torch.nn.functional.scaled_dot_product_attention(q, k, v, **kwargs)  # (B, NH, T, HS)
        return yt.transpose(1, 2).reshape(B, T, C)

    ref, ref_grads = torch_reference(sdpa, qkv, dout=dy)
    y, cache = attention_forward(qkv, NH, attention_mask(T, causal, pad))
    assert_matches([y, *attention_backward(dy, cache)], [ref, *ref_grads], rtol=1e-10, atol=1e-12)


# ----------------------------------------------------------------------------------------
# dtype discipline: float32 in -> float32 out and float32 gradients


def float32_cases():
    r = rng(28)
    f = lambda *shape: r.standard_normal(shape).astype(np.float32)  # noqa: E731
    idx = np.array([[1, 3, 3, 0, 6], [3, 2, 1, 1, 5]])
    return {
        "embedding": (embedding_forward, embedding_backward, (idx, f(V, C), f(BLOCK, C))),
        "linear": (linear_forward, linear_backward, (f(B, T, C), f(C, 6), f(6))),
        "layernorm": (layernorm_forward, layernorm_backward, (f(B, T, C), f(C), f(C))),
        "gelu": (gelu_forward, gelu_backward, (f(B, T, C),)),
        "dropout": (lambda x: dropout_forward(x, 0.1, rng(0)), dropout_backward, (f(B, T, C),)),
        "attention_causal": (
            lambda qkv: attention_forward(qkv, NH, attention_mask(T, True)),
            attention_backward,
            (f(B, T, 3 * C),),
        ),
        "attention_padded_dropout": (
            lambda qkv: attention_forward(qkv, NH, attention_mask(T, True, FULLY_PADDED), 0.1, rng(0)),
            attention_backward,
            (f(B, T, 3 * C),),
        ),
    }


@pytest.mark.parametrize("name", float32_cases())
def test_float32_stays_float32(name):
    forward, backward, inputs = float32_cases()[name]
    out, cache = forward(*inputs)
    assert out.dtype == np.float32, name
    grads = backward(np.ones_like(out), cache)
    assert grads and all(g.dtype == np.float32 for g in grads), [g.dtype for g in grads]
