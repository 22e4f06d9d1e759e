"""Tests for transferlab.optim: SGD and AdamW against torch.optim, masks, rates, clipping.

The torch comparisons are skipped when torch is not installed; the hand-written scalar
references and every mask test run without it.
"""
import json
import math

import numpy as np
import pytest

from reference import import_torch, leaves, step_beside_torch
from transferlab import masks as M
from transferlab.optim import SGD, AdamW, clip_grad_norm

# a miniature GPT-2 parameter dict: 2-D weights and embeddings (decayed), 1-D biases and
# LayerNorm parameters (not decayed), and a head
SHAPES = {
    "wte.weight": (11, 4),
    "h.0.ln_1.weight": (4,),
    "h.0.ln_1.bias": (4,),
    "h.0.attn.c_attn.weight": (4, 12),
    "h.0.attn.c_attn.bias": (12,),
    "seq_head.weight": (4, 3),
    "seq_head.bias": (3,),
}


def make_params(seed=0, dtype=np.float64):
    rng = np.random.default_rng(seed)
    return {name: rng.standard_normal(shape).astype(dtype) for name, shape in SHAPES.items()}


def make_grads(rng, dtype=np.float64):
    return {name: rng.standard_normal(shape).astype(dtype) for name, shape in SHAPES.items()}


def copy_params(params):
    return {name: p.copy() for name, p in params.items()}


# ----------------------------------------------------------------------------------------
# against torch.optim, step for step


def torch_groups(tparams, lr, weight_decay, lr_scale):
    """torch param groups that express our decay rule (ndim >= 2) and lr_scale."""
    groups = []
    for name, t in tparams.items():
        groups.append({"params": [t], "lr": lr * lr_scale.get(name, 1.0),
                       "weight_decay": weight_decay if t.ndim >= 2 else 0.0})
    return groups


def run_against_torch(make_ours, make_theirs, steps=12):
    """Our optimizer and torch's, built on the same parameters, stepped side by side."""
    params = make_params()
    tparams = leaves(params)
    step_beside_torch(make_ours(params), make_theirs(tparams), params, tparams, steps=steps)
    return params


def test_adamw_matches_torch_with_decay_groups_and_lr_scale():
    torch = import_torch()
    lr, wd, scale = 1e-2, 0.1, {"seq_head.weight": 3.0, "seq_head.bias": 3.0}
    params = run_against_torch(
        lambda p: AdamW(p, lr=lr, betas=(0.8, 0.99), eps=1e-6, weight_decay=wd, lr_scale=scale),
        lambda t: torch.optim.AdamW(torch_groups(t, lr, wd, scale), betas=(0.8, 0.99), eps=1e-6,
                                    foreach=False))
    # the test means something only if the parameters moved appreciably
    assert np.abs(params["wte.weight"] - make_params()["wte.weight"]).max() > 0.05


@pytest.mark.parametrize("momentum, nesterov, wd", [(0.0, False, 0.0), (0.9, False, 0.01),
                                                    (0.9, True, 0.01), (0.5, True, 0.0)])
def test_sgd_matches_torch(momentum, nesterov, wd):
    torch = import_torch()
    lr, scale = 0.05, {"h.0.ln_1.weight": 0.25}
    run_against_torch(
        lambda p: SGD(p, lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=wd,
                      lr_scale=scale),
        lambda t: torch.optim.SGD(torch_groups(t, lr, wd, scale), momentum=momentum,
                                  nesterov=nesterov, foreach=False))


def test_lr_changed_between_steps_matches_torch():
    """Schedules set opt.lr between steps; torch's equivalent is the param group's lr."""
    torch = import_torch()
    params = make_params()
    tparams = leaves(params)
    opt = AdamW(params, lr=1e-3)
    topt = torch.optim.AdamW(torch_groups(tparams, 1e-3, 0.01, {}), foreach=False)

    def set_lr(step):
        lr = 1e-2 * (step + 1) / 10
        opt.lr = lr
        for group in topt.param_groups:
            group["lr"] = lr

    step_beside_torch(opt, topt, params, tparams, steps=10, seed=2, before_step=set_lr)


# ----------------------------------------------------------------------------------------
# against hand-written scalar references (no torch)


def test_adamw_two_steps_match_scalar_reference():
    lr, b1, b2, eps, wd = 0.1, 0.9, 0.999, 1e-8, 0.01
    p0, grads = 0.5, [0.2, -0.7]
    params = {"w": np.array([[p0]])}
    opt = AdamW(params, lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd)
    p, m, v = p0, 0.0, 0.0
    for t, g in enumerate(grads, start=1):
        opt.step({"w": np.array([[g]])})
        p = p - lr * wd * p
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        m_hat, v_hat = m / (1 - b1**t), v / (1 - b2**t)
        p = p - lr * m_hat / (math.sqrt(v_hat) + eps)
        assert params["w"][0, 0] == pytest.approx(p, rel=1e-12)
    # after step 1 Adam moves by almost exactly lr (m_hat/sqrt(v_hat) = sign(g))
    assert opt.state["w"]["step"] == 2


def test_sgd_nesterov_matches_scalar_reference():
    lr, mu, wd = 0.1, 0.9, 0.05
    params = {"w": np.array([[1.0]])}
    opt = SGD(params, lr=lr, momentum=mu, nesterov=True, weight_decay=wd)
    p, buf = 1.0, None
    for g in [0.3, -0.2, 0.5]:
        opt.step({"w": np.array([[g]])})
        d = g + wd * p
        buf = d if buf is None else mu * buf + d
        p = p - lr * (d + mu * buf)
        assert params["w"][0, 0] == pytest.approx(p, rel=1e-13)


# ----------------------------------------------------------------------------------------
# masks: a masked entry never changes


@pytest.mark.parametrize("make_opt", [
    lambda p: AdamW(p, lr=0.05, weight_decay=0.1, decay="all"),
    lambda p: SGD(p, lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.1, decay="all"),
], ids=["adamw", "sgd"])
def test_entries_frozen_after_training_stay_bit_identical(make_opt):
    """Train everything (moments become nonzero), then freeze half the entries: those
    entries must not move under stale moments or weight decay, and their optimizer state
    must be left exactly as it was, to resume from when they are unfrozen."""
    params = make_params()
    opt = make_opt(params)
    rng = np.random.default_rng(3)
    for _ in range(5):
        opt.step(make_grads(rng))
    mask = (np.arange(12) % 2).reshape(1, 12)  # broadcasts over the (4, 12) weight's rows
    name = "h.0.attn.c_attn.weight"
    opt.masks = {name: mask, "h.0.ln_1.bias": np.zeros(4)}
    frozen = ~mask.astype(bool).repeat(4, axis=0)  # mask 0 = frozen
    before = params[name].copy()
    state_before = {k: v.copy() for k, v in opt.state[name].items() if k != "step"}
    assert all(np.any(v[frozen] != 0) for v in state_before.values())  # stale moments exist
    for _ in range(20):
        opt.step(make_grads(rng))
    assert np.array_equal(params[name][frozen], before[frozen])
    assert not np.any(params[name][~frozen] == before[~frozen])  # the rest did train
    for key, value in state_before.items():
        assert np.array_equal(opt.state[name][key][frozen], value[frozen]), key
        assert not np.array_equal(opt.state[name][key][~frozen], value[~frozen]), key


@pytest.mark.parametrize("make_opt", [
    lambda p, masks: AdamW(p, lr=0.05, weight_decay=0.1, masks=masks),
    lambda p, masks: SGD(p, lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.1,
                         masks=masks),
], ids=["adamw", "sgd"])
def test_trainable_entries_under_a_mask_get_exactly_the_unmasked_numbers(make_opt):
    """Every update is elementwise, so an entry that may train must end up bit-identical
    to the same entry in a run without masks."""
    rng = np.random.default_rng(12)
    masks = {name: (rng.permutation(math.prod(shape)) % 3 == 0).reshape(shape).astype(float)
             for name, shape in SHAPES.items()}  # a scattered third of each parameter trains
    masks["h.0.attn.c_attn.weight"] = np.array([[1.0, 0.0, 1.0] * 4])  # broadcast over rows
    masked, free = make_params(), make_params()
    opt_masked, opt_free = make_opt(masked, masks), make_opt(free, None)
    for _ in range(8):
        grads = make_grads(rng)
        opt_masked.step({k: g.copy() for k, g in grads.items()})
        opt_free.step(grads)
    for name, mask in masks.items():
        trains = np.broadcast_to(mask, SHAPES[name]) == 1
        assert trains.any() and not trains.all()
        assert np.array_equal(masked[name][trains], free[name][trains]), name
        assert not np.any(masked[name][~trains] == free[name][~trains]), name


@pytest.mark.parametrize("make_opt", [
    lambda p, masks: AdamW(p, lr=0.05, weight_decay=0.1, masks=masks),
    lambda p, masks: SGD(p, lr=0.05, momentum=0.9, weight_decay=0.1, masks=masks),
], ids=["adamw", "sgd"])
def test_read_only_sparse_masks_give_the_dense_update_restricted_to_the_mask(make_opt):
    """float32 and read-only masks (as masks.py makes them, so the trainable entries come
    from trainable_where's memory): each step equals a dense reference step on the
    trainable entries, and leaves the others alone. Midway a parameter gets a new mask,
    which must take over at once."""
    rng = np.random.default_rng(21)
    shapes = {n: s for n, s in SHAPES.items() if len(s) == 2}

    def sparse_masks():
        return {n: M.read_only((rng.random(s) < 0.2).astype(np.float32)) for n, s in shapes.items()}

    masked, dense = make_params(dtype=np.float32), make_params(dtype=np.float32)
    masks = sparse_masks()
    opt_masked, opt_dense = make_opt(masked, masks), make_opt(dense, None)
    for step in range(6):
        if step == 3:
            masks.update(sparse_masks())  # new arrays; the old ones may be freed
        before = copy_params(masked)
        grads = make_grads(rng, dtype=np.float32)
        opt_masked.step({k: g.copy() for k, g in grads.items()})
        # the reference: the dense optimizer, started from the masked run's parameters
        # and state, takes the same step; only the trainable entries should match it
        for name, p in masked.items():
            dense[name][...] = before[name]
        opt_dense.step(grads)
        for name, p in masked.items():
            trains = np.broadcast_to(masks.get(name, np.ones((), np.float32)), p.shape) == 1
            np.testing.assert_array_equal(p[trains], dense[name][trains], err_msg=name)
            np.testing.assert_array_equal(p[~trains], before[name][~trains], err_msg=name)
        # carry the masked run's state over, so the next reference step starts from it
        opt_dense.load_state_dict(opt_masked.state_dict())
    assert all(opt_masked.state[n]["step"] == 6 for n in SHAPES)


def test_a_refused_step_changes_nothing():
    """A bad mask anywhere is found before the first parameter moves."""
    params, masks = make_params(), {}
    opt = AdamW(params, lr=0.1, masks=masks)
    before = copy_params(params)
    masks["seq_head.bias"] = np.ones(7)  # the last parameter: checked before the first moves
    with pytest.raises(ValueError, match=r"'seq_head\.bias'.*\(7,\).*\(3,\)"):
        opt.step(make_grads(np.random.default_rng(0)))
    for name, p in params.items():
        assert np.array_equal(p, before[name]), name
    assert opt.state == {}


def test_masking_a_non_contiguous_parameter_is_refused_by_name():
    params = make_params()
    params["seq_head.weight"] = np.asfortranarray(np.ones((4, 3)))
    opt = AdamW(params, masks={"seq_head.weight": np.array([[1, 0, 1]])})
    with pytest.raises(ValueError, match=r"'seq_head\.weight'.*contiguous"):
        opt.step(make_grads(np.random.default_rng(0)))


@pytest.mark.parametrize("make_opt", [
    lambda p: AdamW(p, lr=0.05, weight_decay=0.1),
    lambda p: SGD(p, lr=0.05, momentum=0.9),
], ids=["adamw", "sgd"])
def test_zeroing_the_gradient_is_not_freezing(make_opt):
    """The failure masks exist for: with a zero gradient but no mask, stale momentum
    (and decay) keep moving the weight. docs/optimizers.md shows this drift."""
    params = make_params()
    opt = make_opt(params)
    rng = np.random.default_rng(4)
    for _ in range(5):
        opt.step(make_grads(rng))
    before = params["wte.weight"].copy()
    zero = {name: np.zeros(shape) for name, shape in SHAPES.items()}
    opt.step(zero)
    assert np.all(params["wte.weight"] != before)
    opt.masks = {"wte.weight": np.zeros((11, 4))}
    before = params["wte.weight"].copy()
    for _ in range(3):
        opt.step(zero)
    assert np.array_equal(params["wte.weight"], before)


def test_fully_masked_parameter_is_skipped_entirely():
    params = make_params()
    opt = AdamW(params, lr=0.1, weight_decay=0.5, masks={"wte.weight": np.zeros((11, 4))})
    before = params["wte.weight"].copy()
    rng = np.random.default_rng(5)
    for _ in range(3):
        opt.step(make_grads(rng))
    assert np.array_equal(params["wte.weight"], before)
    assert "wte.weight" not in opt.state  # no state, no step count
    assert opt.state["h.0.attn.c_attn.weight"]["step"] == 3


def test_unfrozen_entries_resume_and_step_counts_follow_the_parameter():
    params = make_params()
    opt = AdamW(params, lr=0.1, masks={"seq_head.bias": np.zeros(3)})
    rng = np.random.default_rng(6)
    opt.step(make_grads(rng))
    opt.masks = {}  # unfreeze
    opt.step(make_grads(rng))
    assert opt.state["seq_head.bias"]["step"] == 1
    assert opt.state["seq_head.weight"]["step"] == 2


def test_missing_or_none_gradient_leaves_parameter_and_state_alone():
    params = make_params()
    opt = SGD(params, lr=0.1, momentum=0.9, weight_decay=0.1, decay="all")
    rng = np.random.default_rng(7)
    opt.step(make_grads(rng))
    before = copy_params(params)
    buf = opt.state["wte.weight"]["momentum_buffer"].copy()
    grads = make_grads(rng)
    grads["wte.weight"] = None
    del grads["seq_head.bias"]
    opt.step(grads)
    assert np.array_equal(params["wte.weight"], before["wte.weight"])
    assert np.array_equal(params["seq_head.bias"], before["seq_head.bias"])
    assert np.array_equal(opt.state["wte.weight"]["momentum_buffer"], buf)
    assert opt.state["wte.weight"]["step"] == 1
    assert not np.array_equal(params["seq_head.weight"], before["seq_head.weight"])


def test_bad_mask_shape_names_the_parameter_and_both_shapes():
    params = make_params()
    with pytest.raises(ValueError, match=r"'h\.0\.attn\.c_attn\.weight'.*\(4, 5\).*\(4, 12\)"):
        AdamW(params, masks={"h.0.attn.c_attn.weight": np.ones((4, 5))})
    opt = AdamW(params)
    with pytest.raises(ValueError, match=r"'seq_head\.bias'.*\(2,\).*\(3,\)"):
        opt.masks = {"seq_head.bias": np.ones(2)}


def test_masks_dict_edited_in_place_is_followed_and_rechecked():
    """The training loop does `opt.masks = model.masks` and masks.py then edits
    model.masks in place: the optimizer must see those edits, and check them."""
    params, model_masks = make_params(), {}
    opt = AdamW(params, masks=model_masks)
    before = params["seq_head.bias"].copy()
    model_masks["seq_head.bias"] = np.zeros(3)  # frozen after the optimizer was made
    opt.step(make_grads(np.random.default_rng(0)))
    assert np.array_equal(params["seq_head.bias"], before)
    model_masks["seq_head.bias"] = np.ones(7)
    with pytest.raises(ValueError, match=r"'seq_head\.bias'"):
        opt.step(make_grads(np.random.default_rng(0)))


@pytest.mark.parametrize("kwargs, pattern", [
    ({"lr": -1e-3}, r"lr.*-0\.001"),
    ({"lr": float("nan")}, r"lr.*nan"),
    ({"betas": (0.9, 1.0)}, r"beta2.*1\.0"),
    ({"betas": (-0.1, 0.999)}, r"beta1.*-0\.1"),
    ({"weight_decay": -0.01}, r"weight_decay.*-0\.01"),
    ({"masks": {"h.9.mlp.c_fc.weight": np.ones(3)}},
     r"unknown parameter 'h\.9\.mlp\.c_fc\.weight'"),
    ({"masks": {"seq_head.bias": np.array([0, 2, 1])}}, r"'seq_head\.bias'.*0 and 1"),
    ({"lr_scale": {"head.weight": 2.0}}, r"unknown parameter 'head\.weight'"),
    ({"lr_scale": {"seq_head.weight": -2.0}}, r"seq_head\.weight.*-2\.0"),
    ({"decay": "some"}, r"decay.*'some'"),
])
def test_bad_arguments_raise_value_error_naming_the_value(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        AdamW(make_params(), **kwargs)


def test_sgd_nesterov_without_momentum_is_refused():
    with pytest.raises(ValueError, match="nesterov"):
        SGD(make_params(), nesterov=True)


def test_negative_lr_set_by_a_schedule_is_refused_at_step():
    opt = SGD(make_params())
    opt.lr = -0.5
    with pytest.raises(ValueError, match=r"-0\.5"):
        opt.step(make_grads(np.random.default_rng(0)))


def test_gradient_of_wrong_shape_names_the_parameter():
    grads = make_grads(np.random.default_rng(0))
    grads["seq_head.weight"] = np.ones((3, 4))
    with pytest.raises(ValueError, match=r"'seq_head\.weight'.*\(3, 4\).*\(4, 3\)"):
        AdamW(make_params()).step(grads)


# ----------------------------------------------------------------------------------------
# per-parameter rates and the decay rule


def test_lr_scale_multiplies_the_effective_rate():
    params = {"a": np.ones((2, 2)), "b": np.ones((2, 2))}
    g = np.array([[0.5, -1.0], [2.0, 0.1]])
    opt = SGD(params, lr=0.1, lr_scale={"b": 3.0})
    opt.step({"a": g.copy(), "b": g.copy()})
    np.testing.assert_allclose(1.0 - params["b"], 3.0 * (1.0 - params["a"]), rtol=1e-14)
    # AdamW, no decay: the first step moves each entry by lr*scale*sign(g) (up to eps)
    params = {"a": np.ones((2, 2)), "b": np.ones((2, 2))}
    opt = AdamW(params, lr=0.1, weight_decay=0.0, lr_scale={"b": 3.0})
    opt.step({"a": g.copy(), "b": g.copy()})
    np.testing.assert_allclose(1.0 - params["a"], 0.1 * np.sign(g), rtol=1e-6)
    np.testing.assert_allclose(1.0 - params["b"], 0.3 * np.sign(g), rtol=1e-6)


def test_decay_rule_default_all_and_callable():
    """With zero gradients AdamW's update is 0, so only decay can move a parameter."""
    def moved(decay):
        params = make_params()
        before = copy_params(params)
        opt = AdamW(params, lr=0.1, weight_decay=0.5, decay=decay)
        opt.step({name: np.zeros(shape) for name, shape in SHAPES.items()})
        return {name for name in params if not np.array_equal(params[name], before[name])}

    two_d = {name for name, shape in SHAPES.items() if len(shape) >= 2}
    assert moved(None) == two_d
    assert moved("all") == set(SHAPES)
    assert moved(lambda name, p: name.startswith("seq_head")) == {"seq_head.weight",
                                                                  "seq_head.bias"}


# ----------------------------------------------------------------------------------------
# gradient clipping


def test_clip_grad_norm_matches_hand_computation():
    grads = {"a": np.array([3.0, 0.0]), "b": np.array([[0.0], [4.0]]), "c": None}
    norm = clip_grad_norm(grads, max_norm=1.0)
    assert norm == pytest.approx(5.0)
    coef = 1.0 / (5.0 + 1e-6)
    np.testing.assert_allclose(grads["a"], [3.0 * coef, 0.0], rtol=1e-15)
    np.testing.assert_allclose(grads["b"], [[0.0], [4.0 * coef]], rtol=1e-15)
    # under the limit: returned norm, nothing scaled
    grads = {"a": np.array([0.3, 0.4])}
    assert clip_grad_norm(grads, max_norm=1.0) == pytest.approx(0.5)
    assert np.array_equal(grads["a"], [0.3, 0.4])


def test_clip_grad_norm_leaves_masked_entries_out_of_the_norm():
    grads = {"a": np.array([3.0, 100.0]), "b": np.array([4.0])}
    norm = clip_grad_norm(grads, max_norm=10.0, masks={"a": np.array([1, 0])})
    assert norm == pytest.approx(5.0)
    assert np.array_equal(grads["a"], [3.0, 100.0])  # 5 < 10: no clipping


def test_clip_grad_norm_with_read_only_sparse_masks_counts_only_their_entries():
    """float32 gradients, masks as masks.py makes them (read-only, remembered): the norm
    is the float64 norm of the trainable entries, and clipping scales whole gradients."""
    rng = np.random.default_rng(9)
    grads = make_grads(rng, dtype=np.float32)
    masks = {n: M.read_only(rng.random(s) < 0.1) for n, s in SHAPES.items() if len(s) == 2}
    masks["h.0.ln_1.bias"] = M.read_only(np.zeros(4, np.float32))  # frozen: counts nothing
    want = math.sqrt(sum(
        float(np.sum(g.astype(np.float64)[np.broadcast_to(masks.get(n, True), g.shape)] ** 2))
        for n, g in grads.items() if n != "h.0.ln_1.bias"))
    before = {n: g.copy() for n, g in grads.items()}
    for _ in range(2):  # the second call answers the masks from memory
        grads = {n: g.copy() for n, g in before.items()}
        norm = clip_grad_norm(grads, max_norm=want / 2, masks=masks)
        assert norm == pytest.approx(want, rel=1e-12)
        for n, g in grads.items():
            assert g.dtype == np.float32
            np.testing.assert_allclose(g, before[n] * (want / 2) / (want + 1e-6), rtol=1e-6)


def test_clip_grad_norm_matches_torch():
    torch = import_torch()
    grads = make_grads(np.random.default_rng(8))
    tparams = {n: torch.zeros(g.shape, dtype=torch.float64, requires_grad=True)
               for n, g in grads.items()}
    for name, t in tparams.items():
        t.grad = torch.tensor(grads[name])
    expected = torch.nn.utils.clip_grad_norm_(list(tparams.values()), max_norm=2.0,
                                              foreach=False)
    norm = clip_grad_norm(grads, max_norm=2.0)
    assert norm == pytest.approx(float(expected), rel=1e-14)
    assert norm > 2.0  # so clipping really happened
    for name, t in tparams.items():
        np.testing.assert_allclose(grads[name], t.grad.numpy(), rtol=1e-14)


# ----------------------------------------------------------------------------------------
# checkpointing


def split_arrays(tree, arrays, prefix=""):
    """Replace every ndarray in a nested dict by a key into `arrays`, as a .npz + JSON
    checkpoint stores it."""
    if isinstance(tree, np.ndarray):
        arrays[prefix] = tree
        return {"__array__": prefix}
    if isinstance(tree, dict):
        return {k: split_arrays(v, arrays, f"{prefix}/{k}") for k, v in tree.items()}
    return tree


def join_arrays(tree, arrays):
    if isinstance(tree, dict):
        if set(tree) == {"__array__"}:
            return arrays[tree["__array__"]]
        return {k: join_arrays(v, arrays) for k, v in tree.items()}
    return tree


@pytest.mark.parametrize("make_opt", [
    lambda p: AdamW(p, lr=0.01, weight_decay=0.1, lr_scale={"seq_head.weight": 2.0},
                    masks={"wte.weight": np.eye(11, 4)}),
    lambda p: SGD(p, lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.1,
                  masks={"wte.weight": np.eye(11, 4)}),
], ids=["adamw", "sgd"])
def test_state_dict_round_trip_through_json_continues_bit_identically(make_opt):
    rng = np.random.default_rng(9)
    all_grads = [make_grads(rng) for _ in range(10)]
    # seq_head.bias gets no gradient at first: its state must round-trip as absent
    for grads in all_grads[:3]:
        grads["seq_head.bias"] = None

    straight = make_params()
    opt = make_opt(straight)
    for grads in all_grads:
        opt.step({k: None if g is None else g.copy() for k, g in grads.items()})

    resumed = make_params()
    opt = make_opt(resumed)
    for grads in all_grads[:5]:
        opt.step({k: None if g is None else g.copy() for k, g in grads.items()})
    arrays = {}
    text = json.dumps(split_arrays(opt.state_dict(), arrays), allow_nan=False)
    saved_params = copy_params(resumed)

    fresh = make_params(seed=123)  # a different start: everything must come from the save
    for name in fresh:
        fresh[name][...] = saved_params[name]
    opt = make_opt(fresh)
    opt.lr, opt.lr_scale = 123.0, {}  # overwritten by the load
    opt.load_state_dict(join_arrays(json.loads(text), arrays))
    for grads in all_grads[5:]:
        opt.step({k: None if g is None else g.copy() for k, g in grads.items()})
    for name in straight:
        assert np.array_equal(fresh[name], straight[name]), name


def test_state_dict_is_a_snapshot_not_a_view():
    params = make_params()
    opt = AdamW(params)
    rng = np.random.default_rng(10)
    opt.step(make_grads(rng))
    sd = opt.state_dict()
    m = sd["state"]["wte.weight"]["exp_avg"].copy()
    opt.step(make_grads(rng))
    assert np.array_equal(sd["state"]["wte.weight"]["exp_avg"], m)
    # and loading copies too: a second optimizer stepping must not write into `sd`
    other = AdamW(make_params())
    other.load_state_dict(sd)
    other.step(make_grads(rng))
    assert np.array_equal(sd["state"]["wte.weight"]["exp_avg"], m)


def test_load_state_dict_refuses_mismatches():
    opt = AdamW(make_params())
    opt.step(make_grads(np.random.default_rng(0)))
    sd = opt.state_dict()
    with pytest.raises(ValueError, match="AdamW"):
        SGD(make_params()).load_state_dict(sd)
    sd["state"]["wte.weight"]["exp_avg"] = np.zeros((3, 3))
    fresh = AdamW(make_params(), lr=0.5)
    with pytest.raises(ValueError, match=r"'wte\.weight'.*\(3, 3\)"):
        fresh.load_state_dict(sd)
    assert fresh.lr == 0.5 and fresh.state == {}  # a failed load changes nothing


# ----------------------------------------------------------------------------------------
# dtype discipline


@pytest.mark.parametrize("make_opt", [
    lambda p: AdamW(p, lr=np.float64(1e-2), weight_decay=0.1, lr_scale={"wte.weight": 2.0},
                    masks={"seq_head.weight": np.array([[1, 0, 1]])}),
    lambda p: SGD(p, lr=np.float64(1e-2), momentum=0.9, nesterov=True, weight_decay=0.1,
                  masks={"seq_head.weight": np.array([[1, 0, 1]])}),
], ids=["adamw", "sgd"])
def test_float32_parameters_and_state_stay_float32(make_opt):
    params = make_params(dtype=np.float32)
    arrays = {name: id(p) for name, p in params.items()}
    opt = make_opt(params)
    rng = np.random.default_rng(11)
    for _ in range(3):
        opt.lr = np.float64(opt.lr)  # as a careless schedule might set it
        grads = make_grads(rng, dtype=np.float32)
        clip_grad_norm(grads, max_norm=0.5)
        assert all(g.dtype == np.float32 for g in grads.values())
        opt.step(grads)
    assert all(p.dtype == np.float32 for p in params.values())
    assert {name: id(p) for name, p in params.items()} == arrays  # updated in place
    for state in opt.state.values():
        assert all(v.dtype == np.float32 for k, v in state.items() if k != "step")


# ----------------------------------------------------------------------------------------
# frozen parameters cost nothing (issue 15): the model's shared read-only zero gradient


def test_a_frozen_backbone_step_does_no_work_for_frozen_parameters():
    from transferlab import GPT, GPTConfig
    from transferlab import masks as M
    from transferlab.optim import clip_grad_norm

    model = GPT(GPTConfig(vocab_size=13, block_size=6, n_layer=2, n_head=2, n_embd=8,
                          head="sequence", n_classes=3, dtype="float64"), seed=0)
    M.freeze_backbone(model)
    opt = AdamW(model.params, lr=1e-2, weight_decay=0.1, masks=model.masks)
    before = {n: p.copy() for n, p in model.params.items()}
    idx = np.random.default_rng(0).integers(0, 13, (2, 6))
    model(idx, np.array([0, 2]))
    grads = model.backward()
    frozen = [n for n in grads if M.is_frozen(model, n)]
    assert frozen and set(grads) == set(model.params)
    for n in frozen:  # no memory behind them: a broadcast view of one zero, read-only
        g = grads[n]
        assert g.shape == model.params[n].shape and not g.any() and not g.flags.writeable
        assert not any(g.strides)
    clip_grad_norm(grads, 1e-3, masks=model.masks)  # no write into the read-only zeros
    clip_grad_norm(grads, 1e-3)  # nor without masks
    opt.step(grads)
    assert set(opt.state) == {n for n in grads if n not in frozen}  # no state, no step count
    for n in frozen:
        np.testing.assert_array_equal(model.params[n], before[n])
    assert any(not np.array_equal(model.params[n], before[n]) for n in opt.state)


def test_a_zero_d_mask_is_read_as_one_number():
    p = {"w": np.ones((3, 4)), "b": np.ones(4)}
    opt = AdamW(p, lr=0.1, masks={"w": np.zeros(()), "b": np.ones(())})
    opt.step({"w": np.ones((3, 4)), "b": np.ones(4)})
    assert set(opt.state) == {"b"}
    np.testing.assert_array_equal(p["w"], np.ones((3, 4)))
    assert (p["b"] < 1).all()


# ----------------------------------------------------------------------------------------
# a step in cache-sized chunks and in threads: the numbers of one whole-array call


def big_params(dtype):
    """Parameters of several chunks each (a chunk is CHUNK_BYTES per operand), a
    non-multiple of the chunk size, and small ones that run whole."""
    rng = np.random.default_rng(3)
    shapes = {"wte.weight": (1000, 1201), "h.0.mlp.c_fc.weight": (257, 513), "h.0.ln_1.bias": (7,)}
    return {n: rng.standard_normal(s).astype(dtype) for n, s in shapes.items()}


def spy_on_threads(monkeypatch):
    """Let every step run in threads however small (THREADS_FROM = 0), and record how many
    shares each threaded step dealt out."""
    from transferlab import optim

    shares = []

    def spy(fn, items):
        items = list(items)
        shares.append(len(items))
        return in_threads(fn, items)

    in_threads = optim.in_threads
    monkeypatch.setattr(optim, "THREADS_FROM", 0)
    monkeypatch.setattr(optim, "in_threads", spy)
    return shares


@pytest.mark.parametrize("make_opt, rule", [
    (lambda p, t: AdamW(p, lr=1e-2, weight_decay=0.1, threads=t), "adamw"),
    (lambda p, t: SGD(p, lr=1e-2, momentum=0.9, nesterov=True, weight_decay=0.1, threads=t),
     "sgd"),
])
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_chunked_threaded_steps_equal_the_whole_array_rule_bit_for_bit(make_opt, rule,
                                                                      threads, dtype,
                                                                      monkeypatch):
    from transferlab.kernels import CHUNK_BYTES
    from transferlab.optim import MIN_CHUNKS, adamw_update, sgd_update

    shares = spy_on_threads(monkeypatch)
    params = big_params(dtype)
    assert params["wte.weight"].nbytes > MIN_CHUNKS * CHUNK_BYTES  # chunks, a ragged last one
    ref = copy_params(params)
    state = {n: (np.zeros_like(p), np.zeros_like(p)) for n, p in ref.items()}
    opt = make_opt(params, threads)
    rng = np.random.default_rng(0)
    for t in range(1, 4):
        grads = {n: rng.standard_normal(p.shape).astype(dtype) for n, p in params.items()}
        opt.step(grads)
        for n, p in ref.items():  # the plain rule, one call on the whole array
            wd = 0.1 if p.ndim >= 2 else 0.0
            if rule == "adamw":
                adamw_update(p, grads[n], *state[n], t, lr=1e-2, betas=(0.9, 0.999),
                             eps=1e-8, weight_decay=wd)
            else:
                sgd_update(p, grads[n], state[n][0], lr=1e-2, momentum=0.9, nesterov=True,
                           weight_decay=wd)
        for n in params:
            assert params[n].dtype == dtype
            np.testing.assert_array_equal(params[n], ref[n])
            np.testing.assert_array_equal(opt.state[n][opt.state_keys[0]], state[n][0])
    assert shares == ([threads] * 3 if threads > 1 else [])  # every step ran in threads


@pytest.mark.parametrize("threads", [1, 2])
def test_a_chunked_masked_step_equals_the_whole_array_masked_step(threads, monkeypatch):
    from transferlab.optim import adamw_update

    shares = spy_on_threads(monkeypatch)
    params = big_params(np.float32)
    ref = copy_params(params)
    rng = np.random.default_rng(1)
    masks = {n: M.read_only((rng.random(p.shape) < 0.6).astype(np.float32))  # wte: 11 chunks
             for n, p in params.items()}
    opt = AdamW(params, lr=1e-2, weight_decay=0.1, masks=masks, threads=threads)
    grads = {n: rng.standard_normal(p.shape).astype(np.float32) for n, p in params.items()}
    opt.step(grads)
    for n, p in ref.items():  # the update written out: the masked entries alone, whole
        k = np.flatnonzero(masks[n])
        p_k, g_k = p.reshape(-1)[k], grads[n].reshape(-1)[k]
        m, v = np.zeros_like(p_k), np.zeros_like(p_k)
        adamw_update(p_k, g_k, m, v, 1, lr=1e-2, betas=(0.9, 0.999), eps=1e-8,
                     weight_decay=0.1 if p.ndim >= 2 else 0.0)
        p.reshape(-1)[k] = p_k
        np.testing.assert_array_equal(params[n], p)
        np.testing.assert_array_equal(opt.state[n]["exp_avg_sq"].reshape(-1)[k], v)
    assert shares == ([threads] if threads > 1 else [])


def test_in_chunks_gives_views_that_cover_the_array_and_keeps_strided_operands_whole():
    from transferlab.optim import Update, in_chunks

    p, g, m = np.zeros((10, 7)), np.ones((10, 7)), np.zeros((10, 7))
    chunks = in_chunks(Update(p, g, {"m": m}, 1, 0.1, True), chunk_bytes=8 * 8)
    assert [c.p.size for c in chunks] == [8] * 8 + [6]
    for i, c in enumerate(chunks):
        np.add(c.p, i + 1, out=c.p)  # writing a chunk writes the parameter
        np.subtract(c.arrays["m"], 1, out=c.arrays["m"])
    assert np.array_equal(p.reshape(-1), np.repeat(np.arange(1, 10), [8] * 8 + [6]))
    assert (m == -1).all()
    broadcast = np.broadcast_to(np.zeros(()), (10, 7))  # a frozen tensor's zero gradient
    whole = Update(p, broadcast, {"m": m}, 1, 0.1, True)
    assert in_chunks(whole, chunk_bytes=8 * 8) == [whole]
    assert in_chunks(Update(p.T, g.T, {"m": m.T}, 1, 0.1, True), chunk_bytes=8)[0].p.shape == (7, 10)
    small = Update(p, g, {"m": m}, 1, 0.1, True)  # 70 entries: fewer than MIN_CHUNKS chunks of 16
    assert in_chunks(small, chunk_bytes=8 * 16) == [small]
    k = np.arange(0, 70, 2)  # 35 trainable entries in chunks of 4 indices
    assert [c.k.tolist() for c in in_chunks(small._replace(k=k), chunk_bytes=8 * 4)] == \
        [k[i:i + 4].tolist() for i in range(0, 35, 4)]


@pytest.mark.parametrize("threads", [0, -1, 1.5, True, "2"])
def test_a_bad_thread_count_is_refused_naming_it(threads):
    with pytest.raises(ValueError, match=rf"threads must be a positive integer.*{threads!r}"):
        AdamW(make_params(), threads=threads)


def test_a_small_step_stays_in_the_calling_thread(monkeypatch):
    from transferlab import optim

    called = []
    monkeypatch.setattr(optim, "in_threads", lambda fn, items: called.append(1))
    params = big_params(np.float32)  # ~1.3M entries, below THREADS_FROM (2^24)
    AdamW(params, threads=2).step({n: np.ones_like(p) for n, p in params.items()})
    assert not called and (params["wte.weight"] != big_params(np.float32)["wte.weight"]).all()
