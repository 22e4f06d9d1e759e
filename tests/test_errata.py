"""Checks for the statements corrected by the errata of issue 14.

- docs/layernorm.md#backward: every Jacobian entry the page states (d mu / d x_j,
  d var / d x_j, d rstd / d x_j, d xhat_i / d x_j) against centred finite differences in
  float64, on a row whose rstd is far from 1 (so a missing power of rstd is visible).
- requirements.txt: the numpy minimum is >= 2.0, because the code calls np.vecdot and the
  docs (docs/gelu.md, docs/model.md) state NumPy 2's promotion rule; and that rule holds.

Run: python -m pytest tests/test_errata.py -q -p no:cacheprovider --no-cov
"""
import math
import re
from pathlib import Path

import numpy as np
import pytest

from transferlab.layers import layernorm_forward

ROOT = Path(__file__).resolve().parents[1]
C = 6
H = 1e-6  # finite-difference step (float64)
EPS = 1e-5  # GPT-2's LayerNorm eps, as docs/layernorm.md states


def stats(x):
    """mu, var, rstd, xhat of one row x (C,), rstd and xhat as layernorm_forward computes them."""
    out, (xhat, rstd, _w) = layernorm_forward(x[None], np.ones(C), np.zeros(C))
    assert np.array_equal(out, xhat)  # w = 1, b = 0: the output is xhat itself
    mu = x.mean()
    var = ((x - mu) ** 2).mean()
    return mu, var, float(rstd[0, 0]), xhat[0]


def numeric_jacobian(f, x):
    """J[i, j] = d f(x)_i / d x_j by centred differences; f returns a scalar or a (C,) array."""
    cols = []
    for j in range(C):
        e = np.zeros(C)
        e[j] = H
        cols.append((np.atleast_1d(f(x + e)) - np.atleast_1d(f(x - e))) / (2 * H))
    return np.stack(cols, axis=-1)  # (outputs, C)


@pytest.fixture
def row():
    # std ~3, so rstd ~1/3: rstd, rstd^2 and rstd^3 differ by factors of ~3
    return 3.0 * np.random.default_rng(14).standard_normal(C) + 1.5


def test_layernorm_row_is_a_useful_probe(row):
    _mu, _var, rstd, _xhat = stats(row)
    assert rstd < 0.5  # far enough from 1 that the powers of rstd are told apart


def test_dmean_dx(row):
    numeric = numeric_jacobian(lambda x: stats(x)[0], row)[0]
    np.testing.assert_allclose(numeric, np.full(C, 1 / C), rtol=1e-7)


def test_dvar_dx(row):
    mu = row.mean()
    numeric = numeric_jacobian(lambda x: stats(x)[1], row)[0]
    np.testing.assert_allclose(numeric, (2 / C) * (row - mu), rtol=1e-6, atol=1e-9)


def test_drstd_dx_both_forms(row):
    mu, var, rstd, xhat = stats(row)
    assert math.isclose(rstd, 1 / math.sqrt(var + EPS), rel_tol=1e-12)
    numeric = numeric_jacobian(lambda x: stats(x)[2], row)[0]
    np.testing.assert_allclose(numeric, -rstd**3 * (row - mu) / C, rtol=1e-6, atol=1e-10)
    np.testing.assert_allclose(numeric, -rstd**2 * xhat / C, rtol=1e-6, atol=1e-10)
    # the formula the page used to state is off by a factor rstd, and this check sees it
    assert not np.allclose(numeric, -rstd * xhat / C, rtol=1e-2)


def test_dxhat_dx_both_forms(row):
    mu, _var, rstd, xhat = stats(row)
    numeric = numeric_jacobian(lambda x: stats(x)[3], row)  # (C, C): [i, j] = d xhat_i / d x_j
    eye = np.eye(C)
    drstd = -rstd**2 * xhat / C  # (C,) indexed by j
    first = rstd * (eye - 1 / C) + np.outer(row - mu, drstd)
    second = rstd * (eye - 1 / C - np.outer(xhat, xhat) / C)
    np.testing.assert_allclose(numeric, first, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(numeric, second, rtol=1e-6, atol=1e-9)


def test_layernorm_dx_formula_matches_jacobian(row):
    """The page's summed result dx_j = rstd (g_j - mean(g) - xhat_j mean(g xhat))."""
    _mu, _var, rstd, xhat = stats(row)
    g = np.random.default_rng(1).standard_normal(C)
    numeric = numeric_jacobian(lambda x: stats(x)[3] @ g, row)[0]
    np.testing.assert_allclose(numeric, rstd * (g - g.mean() - xhat * (g * xhat).mean()), rtol=1e-6, atol=1e-9)


# ---------------------------------------------------------------------------- NumPy 2


def numpy_minimum() -> tuple[int, ...]:
    lines = (ROOT / "requirements.txt").read_text(encoding="utf-8").splitlines()
    found = [m for line in lines if (m := re.match(r"\s*numpy\s*>=\s*([0-9][0-9.]*)\s*(?:[,#;]|$)", line))]
    assert len(found) == 1, "requirements.txt must state exactly one numpy>=X minimum"
    return tuple(int(part) for part in found[0].group(1).split("."))


def test_requirements_ask_for_numpy_2():
    """np.vecdot (layers.py) and NEP 50 promotion (docs/gelu.md, docs/model.md) need NumPy 2."""
    assert numpy_minimum() >= (2, 0)


def test_installed_numpy_meets_the_minimum_and_has_vecdot():
    installed = tuple(int(p) for p in re.findall(r"\d+", np.__version__)[:2])
    assert installed >= numpy_minimum()[:2]
    a = np.arange(6.0).reshape(2, 3)
    np.testing.assert_array_equal(np.vecdot(a, a), (a * a).sum(-1))


def test_numpy_2_promotion_rule_the_docs_state():
    x32 = np.ones(3, dtype=np.float32)
    assert (x32 * np.float64(2.0)).dtype == np.float64  # a NumPy float64 scalar promotes
    assert (x32 * np.sqrt(2 / np.pi)).dtype == np.float64
    assert (x32 * 2.0).dtype == np.float32  # a Python float adapts to the array
    assert (x32 * np.float32(2.0)).dtype == np.float32  # dtype.type(...) keeps float32
