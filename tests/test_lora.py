"""LoRA (src/transferlab/lora.py), checked against finite differences, PyTorch and itself.

- the layer pair: float64 gradient check of dx, dA, dB with and without dropout (a fixed
  mask), and PyTorch autograd in float64 with PEFT's (out, in) layout as the reference;
- the semantics a user relies on: B = 0 at init gives the pretrained function exactly,
  merged == unmerged forward, merge then unmerge restores W, PEFT's init bound;
- counting, files (exact round trip, refusal of foreign or malformed files), PEFT names;
- every refusal message.

Tiny shapes: B=2, T=5, C=8 (IN), OUT=6, r=3. See docs/lora.md.
"""
import json
import math

import numpy as np
import pytest

from gradcheck import check_layer
from transferlab import GPT, GPTConfig
from transferlab.layers import linear_forward
from transferlab.lora import (
    PEFT_PREFIX,
    TARGETS,
    adapter_names,
    add_lora,
    attach,
    from_peft,
    load_adapters,
    lora_linear_backward,
    lora_linear_forward,
    lora_scale,
    merge,
    save_adapters,
    to_peft,
    trainable_count,
    unmerge,
)

B, T, IN, OUT, R = 2, 5, 8, 6, 3
TOL = 1e-7
ALPHA = 6.0
META = {"r": R, "alpha": ALPHA, "dropout": 0.1, "targets": ["attn.c_attn"]}


def rng(seed=0):
    return np.random.default_rng(seed)


def layer_inputs(seed, dtype=np.float64):
    """x, w, b, A, B with a nonzero B (a trained adapter), so the LoRA branch matters."""
    r = rng(seed)
    x = r.standard_normal((B, T, IN))
    w, b = r.standard_normal((IN, OUT)), r.standard_normal(OUT)
    A, Bm = r.standard_normal((IN, R)), r.standard_normal((R, OUT))
    return [a.astype(dtype) for a in (x, w, b, A, Bm)]


def tiny_gpt(dtype="float64", n_layer=2):
    return GPT(GPTConfig(vocab_size=11, block_size=8, n_layer=n_layer, n_head=2, n_embd=8, dtype=dtype), seed=0)


# ----------------------------------------------------------------------------------------
# the layer pair


@pytest.mark.parametrize("p", [0.0, 0.4])
def test_gradcheck_dx_dA_dB(p):
    inputs = layer_inputs(1)
    scale = lora_scale(R, ALPHA)

    def fwd(x, w, b, A, Bm):  # a fresh generator with one seed: the same mask every call
        return lora_linear_forward(x, w, b, A, Bm, scale, p=p, rng=np.random.default_rng(7))

    errors = check_layer(fwd, lora_linear_backward, inputs, rng(2), wrt=[0, 3, 4])
    assert set(errors) == {0, 3, 4}
    assert all(e < TOL for e in errors.values()), errors


def test_dropout_only_touches_the_lora_branch():
    x, w, b, A, Bm = layer_inputs(3)
    out, cache = lora_linear_forward(x, w, b, A, Bm, 2.0, p=0.5, rng=rng(4))
    plain, _ = lora_linear_forward(x, w, b, A, Bm, 2.0)
    assert not np.allclose(out, plain)  # the dropout really is on
    # with B = 0 the branch contributes nothing: dropout can no longer change the output
    zero_b = np.zeros_like(Bm)
    dropped, _ = lora_linear_forward(x, w, b, A, zero_b, 2.0, p=0.5, rng=rng(4))
    np.testing.assert_array_equal(dropped, linear_forward(x, w, b)[0])
    # evaluation mode (rng=None) is the identity even with p > 0
    evaluated, _ = lora_linear_forward(x, w, b, A, Bm, 2.0, p=0.5, rng=None)
    np.testing.assert_array_equal(evaluated, plain)


def test_need_dx_false_skips_dx_only():
    x, w, b, A, Bm = layer_inputs(5)
    out, cache = lora_linear_forward(x, w, b, A, Bm, 0.5)
    dout = rng(6).standard_normal(out.shape)
    dx, dA, dB = lora_linear_backward(dout, cache, need_dx=False)
    assert dx is None
    full = lora_linear_backward(dout, cache)
    np.testing.assert_array_equal(dA, full[1])
    np.testing.assert_array_equal(dB, full[2])
    assert full[0].shape == x.shape and dA.shape == A.shape and dB.shape == Bm.shape


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_matches_torch_in_peft_layout(p):
    """PyTorch autograd as the outside reference, written the way PEFT stores the weights:
    base (OUT, IN), lora_A.weight (r, IN), lora_B.weight (OUT, r), scaling alpha / r."""
    torch = pytest.importorskip("torch")
    x, w, b, A, Bm = layer_inputs(7)
    scale = lora_scale(R, ALPHA)
    out, cache = lora_linear_forward(x, w, b, A, Bm, scale, p=p, rng=rng(8))
    dout = rng(9).standard_normal(out.shape)
    dx, dA, dB = lora_linear_backward(dout, cache)
    # the same inverted-dropout mask, drawn again from the same seed (rows are B*T positions)
    keep = np.ones((B * T, IN)) if p == 0 else (rng(8).random((B * T, IN)) >= p) / (1.0 - p)

    xt = torch.tensor(x, requires_grad=True)
    base_w, base_b = torch.tensor(w.T.copy()), torch.tensor(b)  # frozen: no requires_grad
    lora_a = torch.tensor(A.T.copy(), requires_grad=True)  # (r, IN)
    lora_b = torch.tensor(Bm.T.copy(), requires_grad=True)  # (OUT, r)
    x_d = xt * torch.tensor(keep.reshape(x.shape))
    F = torch.nn.functional
    yt = F.linear(xt, base_w, base_b) + F.linear(F.linear(x_d, lora_a), lora_b) * scale
    (yt * torch.tensor(dout)).sum().backward()
    np.testing.assert_allclose(out, yt.detach().numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(dx, xt.grad.numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(dA, lora_a.grad.numpy().T, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(dB, lora_b.grad.numpy().T, rtol=1e-12, atol=1e-12)


def test_float32_stays_float32():
    x, w, b, A, Bm = layer_inputs(10, np.float32)
    scale = np.float64(ALPHA) / R  # a NumPy float64 scale must not promote the pass
    out, cache = lora_linear_forward(x, w, b, A, Bm, scale, p=0.2, rng=rng(11))
    grads = lora_linear_backward(rng(12).standard_normal(out.shape).astype(np.float32), cache)
    assert out.dtype == np.float32 and all(g.dtype == np.float32 for g in grads)


# ----------------------------------------------------------------------------------------
# adapters on a GPT-2 params dict


def test_b_zero_at_init_gives_the_plain_linear_exactly():
    model = tiny_gpt()
    adapters = add_lora(model.params, 2, R, ALPHA, targets=TARGETS, rng=rng(13))
    for name in adapter_names(adapters):
        if name.endswith("lora_A"):
            module = name[: -len(".lora_A")]
            w, b = model.params[module + ".weight"], model.params[module + ".bias"]
            xin = rng(15).standard_normal((B, T, w.shape[0]))
            out, _ = lora_linear_forward(xin, w, b, adapters[name], adapters[module + ".lora_B"],
                                         lora_scale(R, ALPHA), p=0.5, rng=rng(16))
            np.testing.assert_array_equal(out, linear_forward(xin, w, b)[0])


def test_init_bound_and_std_as_peft():
    """kaiming_uniform_(a=sqrt(5)) on PEFT's (r, IN) matrix: U(-1/sqrt(IN), 1/sqrt(IN))."""
    C = 64  # c_fc's lora_A is (C, r), mlp.c_proj's is (4C, r): two different bounds
    model = GPT(GPTConfig(vocab_size=11, block_size=8, n_layer=1, n_head=2, n_embd=C), seed=0)
    adapters = add_lora(model.params, 1, 64, 16, targets=("mlp.c_fc", "mlp.c_proj"), rng=rng(17))
    for module, fan_in in (("h.0.mlp.c_fc", C), ("h.0.mlp.c_proj", 4 * C)):
        A = adapters[module + ".lora_A"].astype(np.float64)
        bound = 1.0 / math.sqrt(fan_in)
        assert np.abs(A).max() <= bound
        assert np.abs(A).max() > 0.95 * bound  # it fills the interval, not a narrower one
        assert A.std() == pytest.approx(bound / math.sqrt(3.0), rel=0.05)  # uniform's std
        assert not adapters[module + ".lora_B"].any()
        assert adapters[module + ".lora_A"].dtype == model.params[module + ".weight"].dtype


def test_add_lora_is_reproducible_and_leaves_params_alone():
    model = tiny_gpt()
    before = set(model.params)
    a1 = add_lora(model.params, 2, R, ALPHA, rng=rng(18))
    a2 = add_lora(model.params, 2, R, ALPHA, rng=rng(18))
    assert set(model.params) == before
    assert list(a1) == ["h.0.attn.c_attn.lora_A", "h.0.attn.c_attn.lora_B",
                        "h.1.attn.c_attn.lora_A", "h.1.attn.c_attn.lora_B"]
    assert all(np.array_equal(a1[k], a2[k]) for k in a1)
    model.params.update(a1)
    assert adapter_names(model.params) == list(a1)


@pytest.mark.parametrize("dtype, rtol", [("float32", 1e-5), ("float64", 1e-12)])
def test_merged_forward_equals_unmerged(dtype, rtol):
    model = tiny_gpt(dtype)
    dt = np.dtype(dtype)
    adapters = add_lora(model.params, 2, R, ALPHA, targets=TARGETS, rng=rng(19))
    for name in adapters:  # a trained adapter: B no longer zero
        if name.endswith("lora_B"):
            adapters[name] = (0.1 * rng(20).standard_normal(adapters[name].shape)).astype(dt)
    scale = lora_scale(R, ALPHA)
    module = "h.1.mlp.c_proj"
    w, b = model.params[module + ".weight"], model.params[module + ".bias"]
    pretrained_w = w.copy()
    x = rng(21).standard_normal((B, T, w.shape[0])).astype(dt)
    unmerged, _ = lora_linear_forward(x, w, b, adapters[module + ".lora_A"], adapters[module + ".lora_B"], scale)
    assert merge(model.params, adapters, scale) is model.params
    merged, _ = linear_forward(x, model.params[module + ".weight"], b)
    assert merged.dtype == dt
    assert np.abs(merged - unmerged).max() <= rtol * np.abs(unmerged).max()
    # the adapter matters: the merged layer is not the pretrained one
    assert not np.allclose(merged, linear_forward(x, pretrained_w, b)[0], rtol=1e-3, atol=0)


@pytest.mark.parametrize("dtype, tol", [("float32", 1e-6), ("float64", 1e-14)])
def test_merge_then_unmerge_restores_w(dtype, tol):
    model = tiny_gpt(dtype)
    original = {k: v.copy() for k, v in model.params.items()}
    adapters = add_lora(model.params, 2, R, ALPHA, targets=TARGETS, rng=rng(22))
    for name in adapters:
        if name.endswith("lora_B"):
            adapters[name] = rng(23).standard_normal(adapters[name].shape).astype(dtype)
    scale = lora_scale(R, ALPHA)
    merge(model.params, adapters, scale)
    w = "h.0.attn.c_attn.weight"
    assert not np.allclose(model.params[w], original[w])  # merge really changed W
    unmerge(model.params, adapters, scale)
    for name, value in original.items():
        err = np.abs(model.params[name] - value).max()
        assert err <= tol * max(1.0, np.abs(value).max()), (name, err)


def test_trainable_count_on_a_gpt2_shaped_model():
    C, L = 16, 3
    model = GPT(GPTConfig(vocab_size=11, block_size=8, n_layer=L, n_head=2, n_embd=C), seed=0)
    r = 4
    assert trainable_count(model.params, ("attn.c_attn",), L, r) == L * r * (C + 3 * C)
    want_all = L * r * ((C + 3 * C) + (C + C) + (C + 4 * C) + (4 * C + C))
    assert trainable_count(model.params, TARGETS, L, r) == want_all
    # and it is exactly the number of entries add_lora creates
    adapters = add_lora(model.params, L, 4, 8, targets=TARGETS, rng=rng(24))
    assert sum(a.size for a in adapters.values()) == want_all


def test_gpt2_small_numbers_from_the_docs():
    """r = 8 on c_attn of GPT-2 124M (C = 768, 12 blocks): 294,912 trainable numbers."""
    params = {f"h.{i}.attn.c_attn.weight": np.empty((768, 2304), np.float32) for i in range(12)}
    assert trainable_count(params, "attn.c_attn", 12, 8) == 294_912


# ----------------------------------------------------------------------------------------
# files and PEFT names


def trained_adapters(seed=25):
    model = tiny_gpt("float32")
    adapters = add_lora(model.params, 2, R, ALPHA, rng=rng(seed))
    for name in adapters:
        adapters[name] = rng(seed + 1).standard_normal(adapters[name].shape).astype(np.float32)
    return model, adapters


def test_save_load_round_trip_is_exact(tmp_path):
    model, adapters = trained_adapters()
    path = tmp_path / "adapters.npz"
    save_adapters(path, adapters, META)
    loaded, meta = load_adapters(path, params=model.params)
    assert meta == META
    assert list(loaded) == list(adapters)
    for name in adapters:
        assert loaded[name].dtype == adapters[name].dtype
        np.testing.assert_array_equal(loaded[name], adapters[name])
    assert [p.name for p in tmp_path.iterdir()] == ["adapters.npz"]  # no temporary file left


def test_failed_save_keeps_the_earlier_file(tmp_path):
    _, adapters = trained_adapters()
    path = tmp_path / "adapters.npz"
    save_adapters(path, adapters, META)
    before = path.read_bytes()
    with pytest.raises(ValueError, match="JSON-able"):
        save_adapters(path, adapters, dict(META, note=object()))
    assert path.read_bytes() == before


def test_peft_round_trip_names_and_layout():
    _, adapters = trained_adapters()
    peft = to_peft(adapters)
    key = PEFT_PREFIX + "h.0.attn.c_attn.lora_A.weight"
    assert key == "base_model.model.transformer.h.0.attn.c_attn.lora_A.weight"
    assert peft[key].shape == (R, 8)  # (r, IN)
    assert peft[PEFT_PREFIX + "h.1.attn.c_attn.lora_B.weight"].shape == (24, R)  # (OUT, r)
    # PEFT's delta, B.weight @ A.weight, is ours transposed
    np.testing.assert_allclose(peft[PEFT_PREFIX + "h.0.attn.c_attn.lora_B.weight"] @ peft[key],
                               (adapters["h.0.attn.c_attn.lora_A"] @ adapters["h.0.attn.c_attn.lora_B"]).T,
                               rtol=1e-6)
    back = from_peft(peft)
    assert list(back) == list(adapters)
    assert all(np.array_equal(back[k], adapters[k]) for k in adapters)
    # a live PeftModel's state_dict carries the adapter name; a bare GPT2Model no transformer.
    live = {k.replace(".weight", ".default.weight"): v for k, v in to_peft(adapters, "base_model.model.").items()}
    assert all(np.array_equal(from_peft(live)[k], adapters[k]) for k in adapters)


def test_from_peft_accepts_torch_tensors():
    torch = pytest.importorskip("torch")
    _, adapters = trained_adapters()
    state = {k: torch.from_numpy(v) for k, v in to_peft(adapters).items()}
    assert all(np.array_equal(from_peft(state)[k], adapters[k]) for k in adapters)


# ----------------------------------------------------------------------------------------
# refusals: each names what is wrong


def test_bad_target_is_refused_with_the_choices():
    model = tiny_gpt()
    with pytest.raises(ValueError) as caught:
        add_lora(model.params, 2, R, ALPHA, targets=("attn.c_attn", "attn.q_proj"), rng=rng())
    msg = str(caught.value)
    assert "\n" not in msg and "'attn.q_proj'" in msg
    assert all(t in msg for t in TARGETS)
    with pytest.raises(ValueError, match="not one of"):
        trainable_count(model.params, (), 2, R)


@pytest.mark.parametrize("r, alpha, match", [(0, 8, "rank r"), (2.0, 8, "rank r"), (True, 8, "rank r"),
                                             (4, 0, "alpha"), (4, float("nan"), "alpha")])
def test_bad_rank_or_alpha(r, alpha, match):
    with pytest.raises(ValueError, match=match):
        lora_scale(r, alpha)


def test_rank_and_scale_values():
    assert lora_scale(8, 16) == 2.0 and type(lora_scale(8, 16)) is float
    assert lora_scale(4, 1) == 0.25


def test_too_many_layers_names_the_missing_weight():
    with pytest.raises(ValueError, match=r"'h\.2\.attn\.c_attn\.weight'"):
        add_lora(tiny_gpt().params, 3, R, ALPHA, rng=rng())


def test_merge_refuses_unpaired_or_misshapen_adapters():
    model, adapters = trained_adapters()
    lonely = {"h.0.attn.c_attn.lora_A": adapters["h.0.attn.c_attn.lora_A"]}
    with pytest.raises(ValueError, match=r"h\.0\.attn\.c_attn\.lora_B is missing"):
        merge(model.params, lonely, 1.0)
    wrong = dict(adapters, **{"h.1.attn.c_attn.lora_B": np.zeros((R, 7), np.float32)})
    w_before = model.params["h.0.attn.c_attn.weight"].copy()
    with pytest.raises(ValueError, match=r"h\.1\.attn\.c_attn.*\(3, 7\)"):
        merge(model.params, wrong, 1.0)
    with pytest.raises(ValueError, match="'h.0.attn.c_attn.weight_A' is not an adapter name"):
        merge(model.params, {"h.0.attn.c_attn.weight_A": w_before}, 1.0)


def test_load_refuses_foreign_and_corrupt_files(tmp_path):
    missing = tmp_path / "nope.npz"
    with pytest.raises(ValueError, match="nope.npz do not exist"):
        load_adapters(missing)
    text = tmp_path / "notes.npz"
    text.write_text("hello")
    with pytest.raises(ValueError, match="notes.npz is not a LoRA adapter file"):
        load_adapters(text)
    foreign = tmp_path / "foreign.npz"
    np.savez(foreign, w=np.zeros(3))
    with pytest.raises(ValueError, match="foreign.npz is not a LoRA adapter file: no '__meta__'"):
        load_adapters(foreign)
    other = tmp_path / "other.npz"
    np.savez(other, __meta__=np.array(json.dumps({"format": "transferlab-checkpoint", "version": 1})))
    with pytest.raises(ValueError, match="other.npz is not a LoRA adapter file"):
        load_adapters(other)
    pickled = tmp_path / "pickled.npz"
    np.savez(pickled, x=np.array([{"a": 1}], dtype=object))
    with pytest.raises(ValueError, match="pickled.npz is not a LoRA adapter file"):
        load_adapters(pickled)
    _, adapters = trained_adapters()
    good = tmp_path / "good.npz"
    save_adapters(good, adapters, META)
    cut = tmp_path / "cut.npz"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ValueError, match="cut.npz"):
        load_adapters(cut)


def test_load_refuses_wrong_shapes_naming_the_tensor(tmp_path):
    model, adapters = trained_adapters()
    path = tmp_path / "a.npz"
    # rank 2 on disk where the metadata says 3
    bad = dict(adapters, **{"h.1.attn.c_attn.lora_A": np.zeros((8, 2), np.float32)})
    entries = {k: v for k, v in bad.items()}
    entries["__meta__"] = np.array(json.dumps(dict(META, format="transferlab-lora", version=1)))
    np.savez(path, **entries)
    with pytest.raises(ValueError, match=r"a\.npz: h\.1\.attn\.c_attn\.lora_A has shape \(8, 2\)"):
        load_adapters(path)
    # right rank, but not the size of this model's weight
    other = GPT(GPTConfig(vocab_size=11, block_size=8, n_layer=2, n_head=2, n_embd=16), seed=0)
    save_adapters(path, adapters, META)
    with pytest.raises(ValueError, match=r"h\.0\.attn\.c_attn\.lora_A \(8, 3\).*\(16, 48\)"):
        load_adapters(path, params=other.params)
    # an adapter for a module the metadata does not list
    with pytest.raises(ValueError, match="h.0.attn.c_attn is not among the targets"):
        save_adapters(path, adapters, dict(META, targets=["mlp.c_fc"]))


@pytest.mark.parametrize("meta, match", [
    ({"r": R, "alpha": ALPHA, "targets": ["attn.c_attn"]}, "lacks dropout"),
    (dict(META, dropout=1.0), r"dropout must be in \[0, 1\)"),
    (dict(META, targets=["c_attn"]), "'c_attn' is not one of"),
])
def test_save_refuses_bad_metadata(tmp_path, meta, match):
    _, adapters = trained_adapters()
    with pytest.raises(ValueError, match=match):
        save_adapters(tmp_path / "a.npz", adapters, meta)
    assert not list(tmp_path.iterdir())


def test_from_peft_refuses_what_it_cannot_represent():
    _, adapters = trained_adapters()
    peft = to_peft(adapters)
    with pytest.raises(ValueError, match="'base_model.model.transformer.h.0.attn.c_attn.lora_B.bias'"):
        from_peft(dict(peft, **{PEFT_PREFIX + "h.0.attn.c_attn.lora_B.bias": np.zeros(24)}))
    with pytest.raises(ValueError, match="q_proj"):
        from_peft({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": np.zeros((R, 8))})
    two = dict(peft)
    two[PEFT_PREFIX + "h.0.attn.c_proj.lora_A.other.weight"] = np.zeros((R, 8))
    two[PEFT_PREFIX + "h.0.attn.c_proj.lora_B.other.weight"] = np.zeros((8, R))
    live = {k.replace(".weight", ".default.weight"): v for k, v in peft.items()}
    with pytest.raises(ValueError, match="more than one adapter"):
        from_peft(dict(live, **{k: v for k, v in two.items() if ".other." in k}))
    with pytest.raises(ValueError, match=r"h\.0\.attn\.c_attn\.lora_B is missing"):
        from_peft({k: v for k, v in peft.items() if k.endswith("h.0.attn.c_attn.lora_A.weight")})


# ----------------------------------------------------------------------------------------
# LoRA dropout in the model


def lora_model(dropout, batch_threads=1):
    """tiny_gpt (model dropout 0) with adapters on c_attn and a nonzero B (a trained adapter),
    so dropout on the LoRA branch changes the output."""
    model = attach(tiny_gpt(), r=R, alpha=ALPHA, dropout=dropout)
    model.batch_threads = batch_threads
    r = rng(3)
    for name in model.params:
        if name.endswith("lora_B"):
            model.params[name][...] = r.standard_normal(model.params[name].shape)
    return model


def test_lora_dropout_is_on_in_training_without_model_dropout():
    """strategies.lora.dropout acts on its own: the model's dropout is 0 (the default), and
    training still draws a new LoRA dropout mask every forward; evaluation draws none."""
    idx = rng(4).integers(0, 11, (4, 8))
    model = lora_model(0.5)
    assert model.config.dropout == 0.0 and model.config.lora_dropout == 0.5
    model.train()
    first, second = model(idx)[0], model(idx)[0]
    assert not np.allclose(first, second)  # two masks
    model.eval()
    np.testing.assert_array_equal(model(idx)[0], model(idx)[0])
    plain = lora_model(0.0).eval()(idx)[0]
    np.testing.assert_allclose(model(idx)[0], plain, rtol=1e-12, atol=1e-12)


def test_lora_dropout_runs_the_batch_whole_so_a_seed_gives_the_same_masks():
    """Batch parts in threads would draw the masks in an order the threads decide: with
    LoRA dropout on, the model runs the batch whole, and gives the one-thread numbers."""
    idx = rng(5).integers(0, 11, (4, 8))
    one, two = lora_model(0.5).train(), lora_model(0.5, batch_threads=2).train()
    for _ in range(2):
        np.testing.assert_array_equal(one(idx, idx)[0], two(idx, idx)[0])
        g1, g2 = one.backward(), two.backward()
        for name in g1:
            np.testing.assert_array_equal(g1[name], g2[name], err_msg=name)
