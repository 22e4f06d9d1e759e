"""The losses of src/transferlab/losses.py: each returns (loss, dlogits).

Checked against finite differences (float64), values worked out by hand, PyTorch
(skipped cleanly without it), the edge cases training meets (every position ignored,
huge logits) and dtype discipline. See docs/losses.md.
"""
import math

import numpy as np
import pytest

from gradcheck import numerical_gradient, tensor_rel_error
from reference import assert_matches, import_torch, torch_reference
from transferlab.losses import (
    IGNORE_INDEX,
    binary_cross_entropy_with_logits,
    cross_entropy,
    log_softmax,
    sigmoid,
    sigmoid_mse,
)

B, T, K = 2, 5, 4
TOL = 1e-7


def rng(seed=0):
    return np.random.default_rng(seed)


def lm_batch(seed):
    """Logits (B, T, K) and targets (B, T) with a few ignored positions."""
    r = rng(seed)
    logits = r.standard_normal((B, T, K)) * 2.0
    targets = r.integers(0, K, (B, T))
    targets[0, 3:] = IGNORE_INDEX
    targets[1, 0] = IGNORE_INDEX
    return logits, targets


def check_loss_grad(loss_fn, z, *args, **kwargs):
    """Relative error (per tensor) of dlogits against centred differences of the loss."""
    _, dz = loss_fn(z, *args, **kwargs)
    numeric = numerical_gradient(lambda: loss_fn(z, *args, **kwargs)[0], z)
    return tensor_rel_error(dz, numeric)


# ----------------------------------------------------------------------------------------
# finite differences


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_cross_entropy_gradcheck(eps):
    logits, targets = lm_batch(1)
    assert check_loss_grad(cross_entropy, logits, targets, label_smoothing=eps) < TOL
    _, dz = cross_entropy(logits, targets, label_smoothing=eps)
    assert not dz[targets == IGNORE_INDEX].any()  # ignored positions get no gradient


def test_cross_entropy_custom_ignore_index():
    logits, targets = lm_batch(2)
    targets[targets == IGNORE_INDEX] = 0
    loss, dz = cross_entropy(logits, targets, ignore_index=0)
    assert not dz[targets == 0].any()
    kept = targets != 0
    ref = -log_softmax(logits[kept])[np.arange(kept.sum()), targets[kept]].mean()
    assert loss == pytest.approx(ref, rel=1e-12)


def test_sigmoid_mse_gradcheck():
    r = rng(3)
    assert check_loss_grad(sigmoid_mse, r.standard_normal(7) * 2.0, r.random(7)) < TOL


def test_binary_cross_entropy_gradcheck():
    r = rng(4)
    assert check_loss_grad(binary_cross_entropy_with_logits, r.standard_normal(7) * 2.0, r.random(7)) < TOL


# ----------------------------------------------------------------------------------------
# values worked out by hand


def test_cross_entropy_of_uniform_logits_is_log_k():
    logits = np.full((3, K), 0.7)
    targets = np.array([0, 2, 3])
    for eps in (0.0, 0.1):  # a uniform prediction costs log K against any target mix
        loss, dz = cross_entropy(logits, targets, label_smoothing=eps)
        assert loss == pytest.approx(math.log(K), rel=1e-12)
    loss, dz = cross_entropy(logits, targets)
    onehot = np.eye(K)[targets]
    np.testing.assert_allclose(dz, (1.0 / K - onehot) / 3, rtol=1e-12, atol=1e-15)  # (p - y) / N


def test_label_smoothing_by_hand_2x3():
    logits = np.array([[1.0, 2.0, 3.0], [0.5, -1.0, 0.0]])
    targets = np.array([2, 0])
    eps = 0.2
    total = 0.0
    for row, y in zip(logits.tolist(), targets.tolist()):
        lse = math.log(sum(math.exp(v) for v in row))
        nll = lse - row[y]
        mean_neg_logp = sum(lse - v for v in row) / 3
        total += (1 - eps) * nll + eps * mean_neg_logp
    loss, dz = cross_entropy(logits, targets, label_smoothing=eps)
    assert loss == pytest.approx(total / 2, rel=1e-12)
    # gradient p - q, q = (1 - eps) onehot + eps / K, averaged over the 2 rows
    p = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    q = (1 - eps) * np.eye(3)[targets] + eps / 3
    np.testing.assert_allclose(dz, (p - q) / 2, rtol=1e-12, atol=1e-15)


def test_log_softmax_by_hand():
    z = np.array([[1.0, 2.0, 3.0]])
    lse = math.log(math.exp(1) + math.exp(2) + math.exp(3))
    np.testing.assert_allclose(log_softmax(z), [[1 - lse, 2 - lse, 3 - lse]], rtol=1e-14)


def test_sigmoid_mse_by_hand():
    z = np.array([-2.0, 0.0, 0.5, 3.0])
    y = np.array([0.1, 0.5, 1.0, 0.0])
    s = [1.0 / (1.0 + math.exp(-v)) for v in z]
    loss, dz = sigmoid_mse(z, y)
    assert loss == pytest.approx(sum((si - yi) ** 2 for si, yi in zip(s, y)) / 4, rel=1e-14)
    ref = [2 * (si - yi) * si * (1 - si) / 4 for si, yi in zip(s, y)]
    np.testing.assert_allclose(dz, ref, rtol=1e-13)


def test_binary_cross_entropy_by_hand():
    z = np.array([-2.0, 0.0, 0.5, 3.0])
    y = np.array([0.1, 0.5, 1.0, 0.0])
    s = [1.0 / (1.0 + math.exp(-v)) for v in z]
    ref = sum(-yi * math.log(si) - (1 - yi) * math.log(1 - si) for si, yi in zip(s, y)) / 4
    loss, dz = binary_cross_entropy_with_logits(z, y)
    assert loss == pytest.approx(ref, rel=1e-13)
    np.testing.assert_allclose(dz, [(si - yi) / 4 for si, yi in zip(s, y)], rtol=1e-13)


# ----------------------------------------------------------------------------------------
# edge cases


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_all_positions_ignored(eps):
    logits, _ = lm_batch(5)
    targets = np.full((B, T), IGNORE_INDEX)
    loss, dz = cross_entropy(logits, targets, label_smoothing=eps)
    assert loss == 0.0 and not math.isnan(loss)
    assert dz.shape == logits.shape and not dz.any()


def test_large_logits_do_not_overflow():
    # overflow, 0/0 or log(0) raise here; underflow (exp(-2e4) -> 0) is harmless and allowed
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        loss, dz = cross_entropy(np.array([[1e4, 0.0, -1e4]]), np.array([1]))
        assert loss == pytest.approx(1e4, rel=1e-12)  # log-sum-exp ~ 1e4, minus z_1 = 0
        np.testing.assert_allclose(dz, [[1.0, -1.0, 0.0]], atol=1e-12)  # p - onehot

        loss, dz = cross_entropy(np.array([[1e4, 0.0, -1e4]]), np.array([1]), label_smoothing=0.3)
        assert np.isfinite(loss) and np.isfinite(dz).all()

        z = np.array([1e4, -1e4, 1e4, -1e4])
        y = np.array([1.0, 1.0, 0.0, 0.0])
        loss, dz = binary_cross_entropy_with_logits(z, y)
        assert loss == pytest.approx(2e4 / 4, rel=1e-12)  # two confident mistakes of 1e4
        np.testing.assert_allclose(dz, [0.0, -0.25, 0.25, 0.0], atol=1e-12)

        loss, dz = sigmoid_mse(z, y)
        assert loss == pytest.approx(0.5, rel=1e-12) and np.isfinite(dz).all()
        np.testing.assert_array_equal(sigmoid(z), [1.0, 0.0, 1.0, 0.0])


# ----------------------------------------------------------------------------------------
# PyTorch


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3])
def test_cross_entropy_matches_torch(eps):
    torch = import_torch()
    logits, targets = lm_batch(6)
    ref, ref_grads = torch_reference(
        lambda z: torch.nn.functional.cross_entropy(
            z, torch.tensor(targets.reshape(-1)), ignore_index=-100, label_smoothing=eps),
        logits.reshape(-1, K))
    loss, dz = cross_entropy(logits, targets, label_smoothing=eps)
    assert loss == pytest.approx(float(ref), rel=1e-12)
    assert_matches([dz.reshape(-1, K)], ref_grads, rtol=1e-12, atol=1e-15)


def test_binary_cross_entropy_matches_torch():
    torch = import_torch()
    r = rng(7)
    z, y = r.standard_normal(9) * 3.0, r.random(9)
    ref, ref_grads = torch_reference(
        lambda z: torch.nn.functional.binary_cross_entropy_with_logits(z, torch.tensor(y)), z)
    loss, dz = binary_cross_entropy_with_logits(z, y)
    assert loss == pytest.approx(float(ref), rel=1e-12)
    assert_matches([dz], ref_grads, rtol=1e-12, atol=1e-15)


def test_sigmoid_mse_matches_torch():
    torch = import_torch()
    r = rng(8)
    z, y = r.standard_normal(9) * 3.0, r.random(9)
    ref, ref_grads = torch_reference(
        lambda z: torch.nn.functional.mse_loss(torch.sigmoid(z), torch.tensor(y)), z)
    loss, dz = sigmoid_mse(z, y)
    assert loss == pytest.approx(float(ref), rel=1e-12)
    assert_matches([dz], ref_grads, rtol=1e-12, atol=1e-15)


# ----------------------------------------------------------------------------------------
# dtype discipline


def float32_cases():
    r = rng(9)
    logits, targets = lm_batch(10)
    z = r.standard_normal(6).astype(np.float32)
    y = r.random(6)  # float64 targets must not promote the float32 gradient
    return {
        "cross_entropy": lambda: cross_entropy(logits.astype(np.float32), targets),
        "cross_entropy_smoothed": lambda: cross_entropy(logits.astype(np.float32), targets, label_smoothing=0.1),
        "cross_entropy_all_ignored": lambda: cross_entropy(
            logits.astype(np.float32), np.full((B, T), IGNORE_INDEX)
        ),
        "sigmoid_mse": lambda: sigmoid_mse(z, y),
        "binary_cross_entropy_with_logits": lambda: binary_cross_entropy_with_logits(z, y),
    }


@pytest.mark.parametrize("name", float32_cases())
def test_float32_gradients_stay_float32(name):
    loss, dz = float32_cases()[name]()
    assert dz.dtype == np.float32
    assert math.isfinite(loss)


def test_float32_helpers_stay_float32():
    z = rng(11).standard_normal((3, K)).astype(np.float32)
    assert log_softmax(z).dtype == np.float32
    assert sigmoid(z).dtype == np.float32


@pytest.mark.parametrize("smoothing", [0.0, 0.2])
def test_parts_that_divide_by_the_whole_count_add_up_to_the_whole_batch(smoothing):
    """cross_entropy(..., count=N) and sigmoid_mse(..., count=N) on parts of a batch: the
    losses sum, and the gradients stack, to the whole batch's (float64), also when the
    parts count different numbers of positions."""
    r = np.random.default_rng(3)
    z, y = r.standard_normal((6, 5, 7)), r.integers(0, 7, (6, 5))
    y[:2, 1:] = -100  # the first part counts 2 positions, the second 20
    whole, dwhole = cross_entropy(z, y, label_smoothing=smoothing)
    n = int((y != -100).sum())
    parts = [cross_entropy(z[s], y[s], label_smoothing=smoothing, count=n) for s in (slice(0, 2), slice(2, 6))]
    assert parts[0][0] + parts[1][0] == pytest.approx(whole, rel=1e-13)
    np.testing.assert_allclose(np.concatenate([p[1] for p in parts]), dwhole, rtol=1e-13, atol=1e-16)
    s, t = r.standard_normal(6), r.random(6)
    whole, dwhole = sigmoid_mse(s, t)
    parts = [sigmoid_mse(s[k], t[k], count=6) for k in (slice(0, 1), slice(1, 6))]
    assert parts[0][0] + parts[1][0] == pytest.approx(whole, rel=1e-13)
    np.testing.assert_allclose(np.concatenate([p[1] for p in parts]), dwhole, rtol=1e-13)
