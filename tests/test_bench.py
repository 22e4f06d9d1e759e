"""src/bench.py, run small and fast, and the faster kernels of layers.py against the plain
forms they replaced (the plain form stays here as the reference; docs/performance.md says
why each kernel is written the way it is)."""
import json
import math

import numpy as np
import pytest

import bench
from transferlab.layers import (
    _softmax_lastdim_inplace,
    attention_backward,
    attention_forward,
    attention_mask,
    gelu_backward,
    gelu_forward,
    layernorm_backward,
    layernorm_forward,
)

torch = bench.import_torch()


@pytest.fixture
def restore_threads():
    """bench sets BLAS and torch thread counts process-wide: put them back afterwards."""
    funcs = bench._openblas_thread_funcs()
    blas_before = int(funcs[0]()) if funcs else None
    torch_before = torch.get_num_threads() if torch is not None else None
    yield
    if funcs:
        funcs[1](blas_before)
    if torch is not None:
        torch.set_num_threads(torch_before)


# ----------------------------------------------------------------------------------------
# the benchmark itself


@pytest.mark.slow
def test_benchmark_smoke_json(tmp_path, restore_threads):
    out = tmp_path / "bench.json"
    assert bench.main(["--sizes", "tiny", "--repeat", "1", "--threads", "1",
                       "--no-scaling", "--json", str(out)]) == 0
    result = json.loads(out.read_text())

    threads = result["machine"]["threads"]
    assert threads["requested"] == 1 and threads["cores"] >= 1
    assert result["machine"]["matmul_peak_gflops"] > 0
    tiny = result["sizes"]["tiny"]
    assert tiny["tokens"] == 32 * 32
    assert tiny["flops_per_step"] == bench.step_flops(32, 32, 2, 64, 32)
    assert tiny["numpy_step_peak_mb"] > 0
    for step in ("fwd_bwd", "train_step"):
        s = tiny[step]
        for key in ("numpy_ms", "numpy_tokens_per_s", "numpy_gflops", "numpy_peak_fraction"):
            assert math.isfinite(s[key]) and s[key] > 0, (step, key, s[key])
        assert 0 < s["peak_gflops"] <= s["peak_gflops_best"]
        assert s["numpy_peak_fraction"] < 2  # a fraction of a peak, not a unit mix-up
        assert s["numpy_gflops"] == pytest.approx(tiny["flops_per_step"] / s["numpy_ms"] / 1e6)
        if torch is not None:
            assert s["torch_ms"] > 0 and s["ratio"] == pytest.approx(s["numpy_ms"] / s["torch_ms"])
            assert s["ratio_best"] > 0
        else:
            assert "ratio" not in s
    if torch is not None:
        assert threads["torch"] == 1
        # same weights and batch in both frameworks: the timing compares like with like
        assert tiny["loss_torch"] == pytest.approx(tiny["loss_numpy"], abs=1e-4)

    cache = result["feature_cache"]["tiny"]
    for key in ("full_ms", "masks_ms", "cache_ms", "extract_ms"):
        assert cache[key] > 0, key
    assert cache["loss_abs_diff"] < 1e-6  # training on cached features = the uncached path
    assert cache["speedup_cache_vs_full"] == pytest.approx(cache["full_ms"] / cache["cache_ms"])
    assert result["max_rss_mb"] > 0


def test_scaling_rows_cover_each_length_and_batch(restore_threads):
    bench.set_threads(1, torch)  # one thread: fast and steady on a busy machine
    sc = bench.bench_scaling(1, torch, base="tiny", Ts=(8, 16), batches=(2, 4))
    assert [(r["T"], r["batch"]) for r in sc["T"]] == [(8, 32), (16, 32)]
    assert [(r["T"], r["batch"]) for r in sc["batch"]] == [(32, 2), (32, 4)]
    for row in sc["T"] + sc["batch"]:
        assert row["numpy_ms"] > 0 and row["numpy_us_per_token"] > 0
        assert ("ratio" in row) == (torch is not None)


def test_step_flops_counts_every_matmul_of_the_model():
    """The analytic formula against an explicit list of the products one forward makes."""
    V, T, L, C, B = 32, 16, 2, 64, 4
    N = B * T
    products = []  # (M, K, N) of each forward matmul
    for _ in range(L):
        products += [(N, C, 3 * C), (N, C, C), (N, C, 4 * C), (N, 4 * C, C)]  # weight GEMMs
        products += [(B * T, C, T), (B * T, T, C)]  # q k^T and att v over all heads
    products.append((N, C, V))  # the LM head
    forward = sum(2 * m * k * n for m, k, n in products)
    assert bench.step_flops(V, T, L, C, B) == 3 * forward  # backward = 2 x forward


# ----------------------------------------------------------------------------------------
# fast kernels equal the plain forms


GELU_COEF = math.sqrt(2.0 / math.pi)


def gelu_plain(x):
    th = np.tanh(GELU_COEF * (x + 0.044715 * x**3))
    return 0.5 * x * (1.0 + th), th


def gelu_backward_plain(dout, x, th):
    dinner = GELU_COEF * (1.0 + 3.0 * 0.044715 * x**2)
    return dout * (0.5 * (1.0 + th) + 0.5 * x * (1.0 - th**2) * dinner)


@pytest.mark.parametrize("dtype, tol", [(np.float64, 1e-14), (np.float32, 1e-6)])
def test_gelu_in_place_equals_the_plain_formula(dtype, tol):
    r = np.random.default_rng(0)
    x = (3 * r.standard_normal((3, 5, 16))).astype(dtype)
    dout = r.standard_normal(x.shape).astype(dtype)
    out, cache = gelu_forward(x)
    ref, th = gelu_plain(x)
    np.testing.assert_allclose(out, ref, rtol=tol, atol=tol)
    (dx,) = gelu_backward(dout, cache)
    np.testing.assert_allclose(dx, gelu_backward_plain(dout, x, th), rtol=tol, atol=tol)
    assert out.dtype == dx.dtype == dtype


def layernorm_plain(x, w, b, eps=1e-5):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    xhat = (x - mean) / np.sqrt(var + eps)
    return xhat * w + b, xhat, var


def layernorm_backward_plain(dout, x, w, eps=1e-5):
    _, xhat, var = layernorm_plain(x, w, 0.0, eps)
    dxhat = dout * w
    dx = (dxhat - dxhat.mean(-1, keepdims=True) - xhat * (dxhat * xhat).mean(-1, keepdims=True))
    return dx / np.sqrt(var + eps), (dout * xhat).sum((0, 1)), dout.sum((0, 1))


def test_layernorm_with_vecdot_equals_the_plain_formula():
    r = np.random.default_rng(1)
    x, dout = r.standard_normal((2, 2, 3, 8))
    w, b = r.standard_normal((2, 8))
    out, cache = layernorm_forward(x, w, b)
    np.testing.assert_allclose(out, layernorm_plain(x, w, b)[0], rtol=1e-12, atol=1e-12)
    for got, want in zip(layernorm_backward(dout, cache), layernorm_backward_plain(dout, x, w)):
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def test_softmax_in_place_equals_the_plain_softmax():
    x = np.random.default_rng(2).standard_normal((2, 3, 4, 5))
    x[0, 0, 1, 2:] = -np.inf  # a partly masked row
    x[1, 2, 3, :] = -np.inf  # a fully masked row comes out as zeros
    finite = np.isfinite(x).any(-1, keepdims=True)
    shifted = np.where(finite, x - np.where(finite, x.max(-1, keepdims=True), 0.0), -np.inf)
    e = np.exp(shifted)
    want = e / np.maximum(e.sum(-1, keepdims=True), 1e-300)
    got = _softmax_lastdim_inplace(x.copy())
    np.testing.assert_allclose(got, want, rtol=1e-14, atol=1e-300)
    assert not got[1, 2, 3].any()


def attention_plain(qkv, n_head, allowed):
    """The first, plain version: np.where for the mask, q * scale in both passes, np.stack."""
    B, T, C3 = qkv.shape
    C = C3 // 3
    HS = C // n_head
    q, k, v = qkv.reshape(B, T, 3, n_head, HS).transpose(2, 0, 3, 1, 4)
    scale = 1.0 / math.sqrt(HS)
    preatt = (q * scale) @ k.transpose(0, 1, 3, 2)
    if allowed is not None:
        preatt = np.where(allowed, preatt, -np.inf)
    xmax = preatt.max(axis=-1, keepdims=True)
    xmax[~np.isfinite(xmax)] = 0.0
    att = np.exp(preatt - xmax)
    denom = att.sum(axis=-1, keepdims=True)
    att = att / np.where(denom == 0.0, 1.0, denom)
    y = (att @ v).transpose(0, 2, 1, 3).reshape(B, T, C)

    def backward(dy):
        dy = dy.reshape(B, T, n_head, HS).transpose(0, 2, 1, 3)
        datt = dy @ v.transpose(0, 1, 3, 2)
        dv = att.transpose(0, 1, 3, 2) @ dy
        dpreatt = att * (datt - (datt * att).sum(axis=-1, keepdims=True))
        dq = (dpreatt @ k) * scale
        dk = dpreatt.transpose(0, 1, 3, 2) @ (q * scale)
        return np.stack([dq, dk, dv]).transpose(1, 3, 0, 2, 4).reshape(B, T, 3 * C)

    return y, backward


@pytest.mark.parametrize("causal, padded", [(True, False), (False, True), (True, True), (False, False)])
@pytest.mark.parametrize("dtype, tol", [(np.float64, 1e-12), (np.float32, 2e-5)])
def test_attention_fast_path_equals_the_plain_version(causal, padded, dtype, tol):
    r = np.random.default_rng(3)
    B, T, C, NH = 3, 6, 8, 2
    qkv = r.standard_normal((B, T, 3 * C)).astype(dtype)
    dy = r.standard_normal((B, T, C)).astype(dtype)
    pad = None
    if padded:
        pad = np.ones((B, T), dtype=bool)
        pad[0, 4:] = False
        pad[2, :] = False  # a fully padded row
    allowed = attention_mask(T, causal, pad)
    y, cache = attention_forward(qkv, NH, allowed)
    y_ref, backward_ref = attention_plain(qkv, NH, allowed)
    np.testing.assert_allclose(y, y_ref, rtol=tol, atol=tol)
    (dqkv,) = attention_backward(dy, cache)
    np.testing.assert_allclose(dqkv, backward_ref(dy), rtol=tol, atol=tol)
    assert y.dtype == dqkv.dtype == dtype


# ----------------------------------------------------------------------------------------
# a frozen backbone costs less memory, not only less time


def test_frozen_backbone_step_keeps_no_activations_for_frozen_blocks():
    """With everything below the head masked out, backward never reaches the blocks, so
    the forward does not keep their activations: one training step allocates far less."""
    spec = dict(bench.SIZES["tiny"], batch=8, n_layer=4)
    cfg = bench.GPTConfig(vocab_size=spec["vocab_size"], block_size=spec["block_size"],
                          n_layer=spec["n_layer"], n_head=spec["n_head"], n_embd=spec["n_embd"],
                          head="sequence", pooling="mean", n_classes=4)
    idx = np.random.default_rng(0).integers(0, cfg.vocab_size, (spec["batch"], cfg.block_size))
    y = np.arange(spec["batch"]) % 4
    full, frozen = bench.GPT(cfg, seed=0), bench.GPT(cfg, seed=0)
    frozen.masks = bench.frozen_masks(frozen)

    def step(model):
        model(idx, y)
        return model.backward()

    step(full), step(frozen)  # the previous step's caches exist in both: like for like
    assert bench.peak_traced_mb(lambda: step(frozen)) < 0.5 * bench.peak_traced_mb(lambda: step(full))
    g_full, g_frozen = step(full), step(frozen)
    for name in ("seq_head.weight", "seq_head.bias"):  # the head still gets its gradient
        np.testing.assert_allclose(g_frozen[name], g_full[name], rtol=1e-6, atol=1e-9)
    assert not g_frozen["h.0.mlp.c_fc.weight"].any()


def test_compare_layers_swaps_the_kernels_and_puts_them_back():
    """--compare-layers REV runs the model on layers.py as it was at REV, then restores."""
    import subprocess

    import transferlab.model as model_mod

    if subprocess.run(["git", "-C", str(bench.Path(bench.__file__).parent), "rev-parse", "HEAD"],
                      capture_output=True).returncode != 0:
        pytest.skip("not a git checkout")
    current = model_mod.attention_forward
    old = bench.layers_from_git("HEAD")
    with bench.using_layers(old):
        assert model_mod.attention_forward is old.attention_forward
    assert model_mod.attention_forward is current
    result = bench.compare_layers("HEAD", ["tiny"], repeat=1, rounds=1)["tiny"]
    assert result["before_ms"] > 0 and result["after_ms"] > 0
    assert result["kernels_before_ms"]["attention_forward"] > 0
    assert model_mod.attention_forward is current
