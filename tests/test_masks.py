"""Trainable masks (src/transferlab/masks.py): counts checked against the GPT-2 parameter
formula by hand, the backward pass skipping frozen work, frozen parts running without
dropout, the optimizer leaving masked entries alone, and the FISH mask. See docs/masks.md."""
import dataclasses

import numpy as np
import pytest

import transferlab.model as model_module
from transferlab import GPT, GPTConfig
from transferlab import masks as M
from transferlab.optim import AdamW

# the default small model of the docs: vocab 25, block 32, 2 layers, 4 heads, width 64,
# a sequence head with K = 4 classes
V, T, L, NH, C, K = 25, 32, 2, 4, 64, 4
EMB = V * C + T * C  # wte + wpe = 3,648
BLOCK = 12 * C * C + 13 * C  # one transformer block = 49,984
LNF = 2 * C  # ln_f weight and bias
HEAD = C * K + K  # seq_head.weight (C, K) + seq_head.bias (K,) = 260
TOTAL = EMB + L * BLOCK + LNF + HEAD  # 104,004
LN_PER_BLOCK = 4 * C  # ln_1 and ln_2, weight and bias
BIAS_PER_BLOCK = 3 * C + C + 4 * C + C + C + C  # c_attn, attn c_proj, c_fc, mlp c_proj, ln_1, ln_2


def small(dtype="float32", dropout=0.0, **overrides):
    cfg = dict(vocab_size=V, block_size=T, n_layer=L, n_head=NH, n_embd=C, dtype=dtype,
               dropout=dropout, head="sequence", n_classes=K)
    cfg.update(overrides)
    return GPT(GPTConfig(**cfg), seed=0)


def batch(seed=0, B=3, length=10):
    rng = np.random.default_rng(seed)
    return rng.integers(0, V, (B, length)), rng.integers(0, K, B)


# ---------------------------------------------------------------------- counts by hand


def test_the_formula_matches_the_model():
    assert TOTAL == 104_004
    assert M.count(small()) == (TOTAL, TOTAL)


@pytest.mark.parametrize("mode, expected", [
    ("full", TOTAL),
    ("freeze_backbone", HEAD),  # 260
    ("freeze_backbone_ln_trainable", HEAD + L * LN_PER_BLOCK + LNF),  # 900
    ("bias_only", L * BIAS_PER_BLOCK + C + HEAD),  # 1,732: block biases, ln_f.bias, head
    ("cls_row_only", HEAD + C),  # 324: frozen backbone, one new embedding row
])
def test_trainable_count_of_each_mode(mode, expected):
    model = small()
    if mode == "freeze_backbone":
        M.freeze_backbone(model)
    elif mode == "freeze_backbone_ln_trainable":
        M.freeze_backbone(model, layernorm_trainable=True)
    elif mode == "bias_only":
        M.bias_only(model)
    elif mode == "cls_row_only":
        M.freeze_backbone(model)
        M.train_rows(model, "wte.weight", [V - 1])
    assert M.count(model) == (expected, TOTAL)


@pytest.mark.parametrize("n, expected", [
    (0, TOTAL),                           # nothing frozen
    (1, TOTAL - EMB),                     # 100,356: embeddings frozen
    (2, TOTAL - EMB - BLOCK),             # 50,372: embeddings and h.0 frozen
    (3, LNF + HEAD),                      # 388: only ln_f and the head
    (4, 0),                               # every group frozen
    (-1, LNF + HEAD),                     # the last group only
    (-2, BLOCK + LNF + HEAD),             # the top block, ln_f and the head
])
def test_freeze_to_each_group(n, expected):
    model = small()
    M.freeze_to(model, n)
    assert M.count(model) == (expected, TOTAL)


def test_freeze_to_with_trainable_layernorms():
    model = small()
    M.freeze_to(model, 3, layernorm_trainable=True)
    assert M.count(model)[0] == LNF + HEAD + L * LN_PER_BLOCK


def test_unfreeze_gives_back_the_pattern_only():
    model = small()
    M.freeze_backbone(model)
    assert M.unfreeze(model, "h.1.*") == [f"h.1.{n}" for n, _ in model_module.BLOCK_PARAMS]
    assert M.count(model)[0] == HEAD + BLOCK
    M.unfreeze_all(model)
    assert M.count(model)[0] == TOTAL


def test_train_rows_alone_masks_only_that_parameter():
    model = small()
    M.train_rows(model, "wte.weight", [3, 7])
    assert M.count(model)[0] == TOTAL - V * C + 2 * C


def test_set_mask_element_wise_and_broadcast():
    model = small()
    rng = np.random.default_rng(1)
    mask = (rng.random((C, 3 * C)) < 0.3).astype(np.float32)
    M.set_mask(model, "h.0.attn.c_attn.weight", mask)
    assert M.count(model)[0] == TOTAL - C * 3 * C + int(mask.sum())
    columns = np.zeros((1, C))
    columns[0, :5] = 1  # (1, C) broadcasts over the V rows: 5 columns of wte train
    M.set_mask(model, "wte.weight", columns)
    assert M.count(model)[0] == TOTAL - C * 3 * C + int(mask.sum()) - V * C + V * 5


@pytest.mark.parametrize("mode, line", [
    ("full", "trainable params: 104,004 || all params: 104,004 || trainable%: 100.0"),
    ("freeze_to_2", "trainable params: 50,372 || all params: 104,004 || trainable%: 48.4"),
    ("bias_only", "trainable params: 1,732 || all params: 104,004 || trainable%: 1.7"),
])
def test_report_first_line_format(mode, line):
    model = small()
    if mode == "freeze_to_2":
        M.freeze_to(model, 2)
    elif mode == "bias_only":
        M.bias_only(model)
    assert M.report(model, per_group=False) == line
    table = M.report(model).splitlines()
    assert table[0] == line
    assert [row.split()[0] for row in table[2:]] == ["embeddings", "h.0", "h.1", "ln_f"]


def test_report_groups_add_up():
    model = small()
    M.freeze_to(model, 2)
    rows = M.report(model).splitlines()[2:]
    trainable = [int(row.split()[-2].replace(",", "")) for row in rows]
    assert trainable == [0, 0, BLOCK, LNF + HEAD]


# ---------------------------------------------------------------------- errors


@pytest.mark.parametrize("call", [M.freeze, M.unfreeze])
def test_unknown_pattern_names_the_pattern(call):
    with pytest.raises(ValueError, match=r"'h\.9\.\*' matches no parameter"):
        call(small(), "h.0.*", "h.9.*")


def test_wrong_mask_shape_names_parameter_and_both_shapes():
    with pytest.raises(ValueError) as err:
        M.set_mask(small(), "h.0.attn.c_attn.weight", np.ones((3, 3)))
    message = str(err.value)
    assert "h.0.attn.c_attn.weight" in message and "(3, 3)" in message and "(64, 192)" in message


def test_bad_masks_and_rows_are_refused():
    model = small()
    with pytest.raises(ValueError, match="only 0 and 1"):
        M.set_mask(model, "wpe.weight", np.full((T, C), 0.5))
    with pytest.raises(ValueError, match="unknown parameter 'nope'"):
        M.set_mask(model, "nope", 1)
    with pytest.raises(ValueError, match="not a 2-D parameter"):
        M.train_rows(model, "ln_f.bias", [0])
    with pytest.raises(ValueError, match=r"\[0, 25\)"):
        M.train_rows(model, "wte.weight", [25])
    with pytest.raises(ValueError, match="freeze_to"):
        M.freeze_to(model, 5)


# ---------------------------------------------------------------------- read-only masks, trainable_where


def _fish(model):
    M.fisher_mask(model, [(*batch(), None)], 0.1)


@pytest.mark.parametrize("make", [
    lambda m: M.freeze(m, "h.0.*"),
    lambda m: M.freeze_backbone(m),
    lambda m: M.freeze_to(m, 2),
    lambda m: M.bias_only(m),
    lambda m: M.train_rows(m, "wte.weight", [3]),
    lambda m: M.set_mask(m, "h.1.mlp.c_fc.weight", np.eye(C, 4 * C)),
    _fish,
], ids=["freeze", "freeze_backbone", "freeze_to", "bias_only", "train_rows", "set_mask",
        "fisher_mask"])
def test_masks_made_here_are_read_only(make):
    """The contract that lets trainable_where remember its answer: to change a mask,
    set a new one. Writing into one raises, through any index."""
    model = small()
    make(model)
    assert model.masks
    for name, mask in model.masks.items():
        assert not mask.flags.writeable, name
        with pytest.raises(ValueError, match="read-only"):
            mask[...] = 1
        with pytest.raises(ValueError, match="read-only"):
            mask.reshape(-1)[:1] = 1  # nor through a view


def test_set_mask_keeps_its_own_copy():
    """The caller's array stays theirs (and writeable): editing it changes nothing."""
    model = small()
    mine = np.zeros((C, 4 * C))
    mine[0, :3] = 1
    M.set_mask(model, "h.0.mlp.c_fc.weight", mine)
    mine[1, :] = 1
    assert M.trainable_entries(model, "h.0.mlp.c_fc.weight") == 3


@pytest.mark.parametrize("writeable", [False, True])
def test_trainable_where_gives_the_flat_indices_of_the_ones(writeable):
    rng = np.random.default_rng(4)
    cases = [
        (rng.random((6, 8)) < 0.3, (6, 8)),  # scattered single entries, bool
        ((rng.random((6, 1)) < 0.5).astype(np.float32), (6, 8)),  # rows (train_rows)
        (np.array([[1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0]]), (6, 8)),  # columns
    ]
    for mask, shape in cases:
        if not writeable:
            mask = M.read_only(mask)
        want = np.flatnonzero(np.broadcast_to(mask, shape) != 0)
        for _ in range(2):  # the first answer and the remembered one
            k = M.trainable_where(mask, shape)
            assert np.array_equal(k, want)
            assert np.array_equal(np.arange(48).reshape(shape).reshape(-1)[k],
                                  np.arange(48).reshape(shape)[np.broadcast_to(mask, shape) != 0])
            assert not k.flags.writeable  # nobody can corrupt a remembered answer
    assert M.trainable_where(None, (3,)) is M.ALL
    for ones in (np.ones((2, 3)), np.ones(()), np.ones((1, 3), bool)):
        assert M.trainable_where(ones, (2, 3)) is M.ALL
    for zeros in (np.zeros((2, 3)), np.zeros(()), np.zeros((2, 1), bool)):
        assert M.trainable_where(zeros, (2, 3)) is M.NONE


def test_trainable_where_refuses_bad_masks():
    with pytest.raises(ValueError, match=r"\(3, 3\).*\(2, 3\)"):
        M.trainable_where(np.ones((3, 3)), (2, 3))
    for bad in (np.array([0.0, 0.5, 1.0]), np.array([0.0, np.nan, 1.0]), np.array([0, 2, 1])):
        with pytest.raises(ValueError, match="only 0 and 1"):
            M.trainable_where(M.read_only(bad), (3,))


def test_a_writeable_mask_is_read_afresh_on_every_call():
    mask = np.array([1.0, 0.0, 0.0])
    assert M.trainable_where(mask, (3,)).tolist() == [0]
    mask[2] = 1.0  # allowed (not made by masks.py), and seen
    assert M.trainable_where(mask, (3,)).tolist() == [0, 2]
    # a read-only view of an array someone can still write to is not frozen either
    base = np.array([1.0, 0.0, 0.0])
    view = base[:]
    view.flags.writeable = False
    assert M.trainable_where(view, (3,)).tolist() == [0]
    base[1] = 1.0
    assert M.trainable_where(view, (3,)).tolist() == [0, 1]


def test_a_new_mask_at_a_reused_id_is_not_answered_from_the_old_one():
    """CPython hands a freed object's id to the next object of its size: a memo keyed by
    id alone would answer the new mask with the old one's entries."""
    reused = 0
    for _ in range(20):
        old = M.read_only(np.array([1.0, 0.0, 0.0, 0.0]))
        assert M.trainable_where(old, (4,)).tolist() == [0]
        old_id = id(old)
        del old
        new = M.read_only(np.array([0.0, 0.0, 1.0, 1.0]))
        reused += id(new) == old_id
        assert M.trainable_where(new, (4,)).tolist() == [2, 3]
    assert reused  # the case this test is about did happen


def test_is_frozen_and_counts_follow_a_new_mask_on_the_same_parameter():
    model = small()
    name = "h.0.mlp.c_fc.weight"
    M.set_mask(model, name, np.zeros((C, 4 * C)))
    assert M.is_frozen(model, name) and M.trainable_entries(model, name) == 0
    M.set_mask(model, name, np.eye(C, 4 * C))
    assert not M.is_frozen(model, name) and M.trainable_entries(model, name) == C
    M.freeze(model, name)
    assert M.is_frozen(model, name) and M.count(model)[0] == TOTAL - 4 * C * C


# ---------------------------------------------------------------------- backward with masks


def grads_of(model, idx, targets):
    model(idx, targets)
    return model.backward()


@pytest.mark.parametrize("mode", ["freeze_backbone", "freeze_to_2", "bias_only", "cls_row"])
def test_frozen_get_zero_grads_and_trainable_get_the_unmasked_grads(mode):
    idx, targets = batch()
    reference = grads_of(small("float64"), idx, targets)
    model = small("float64")
    if mode == "freeze_backbone":
        M.freeze_backbone(model)
    elif mode == "freeze_to_2":
        M.freeze_to(model, 2)
    elif mode == "bias_only":
        M.bias_only(model)
    else:
        M.freeze_backbone(model)
        M.train_rows(model, "wte.weight", [int(idx[0, 0])])
    grads = grads_of(model, idx, targets)
    for name, g in grads.items():
        if M.is_frozen(model, name):
            assert not g.any(), name
        else:
            np.testing.assert_allclose(g, reference[name], rtol=1e-12, atol=1e-15, err_msg=name)
    assert any(grads[n].any() for n in grads)


def count_backward_calls(monkeypatch, model):
    """Count layernorm backward calls (through the model's kernel table) and whole-block
    backward calls (model.block_backward)."""
    calls = {"layernorm": 0, "block": 0}
    layernorm_backward = model.kernels.layernorm_backward
    block_backward = model_module.block_backward

    def counting_layernorm(*args, **kwargs):
        calls["layernorm"] += 1
        return layernorm_backward(*args, **kwargs)

    def counting_block(*args, **kwargs):
        calls["block"] += 1
        return block_backward(*args, **kwargs)

    model.kernels = dataclasses.replace(model.kernels, layernorm_backward=counting_layernorm)
    monkeypatch.setattr(model_module, "block_backward", counting_block)
    return calls


@pytest.mark.parametrize("mode, blocks, layernorms", [
    ("none", L, 2 * L + 1),              # everything: every block, every LayerNorm
    ("freeze_to_2", 1, 2 + 1),           # backward stops below h.1
    ("freeze_backbone", 0, 0),           # only the head's backward runs
    ("freeze_backbone_ln", L, 2 * L + 1),  # trainable h.0.ln_1: backward must reach it
])
def test_backward_stops_below_the_lowest_trainable_parameter(monkeypatch, mode, blocks, layernorms):
    model = small()
    if mode == "freeze_to_2":
        M.freeze_to(model, 2)
    elif mode == "freeze_backbone":
        M.freeze_backbone(model)
    elif mode == "freeze_backbone_ln":
        M.freeze_backbone(model, layernorm_trainable=True)
    calls = count_backward_calls(monkeypatch, model)
    grads_of(model, *batch())
    assert calls == {"layernorm": layernorms, "block": blocks}


def test_frozen_backbone_runs_without_dropout():
    idx, _ = batch()
    model = small(dropout=0.5).train()
    first, second = model.backbone(idx), model.backbone(idx)
    assert not np.array_equal(first, second)  # trainable: dropout draws new masks each time
    M.freeze_backbone(model)
    first, second = model.backbone(idx), model.backbone(idx)
    assert np.array_equal(first, second)
    assert np.array_equal(first, model.eval().backbone(idx))  # it is the inference output


def test_frozen_lower_blocks_run_without_dropout_upper_ones_with_it():
    model = small(dropout=0.5).train()
    M.freeze_to(model, 2)  # embeddings and h.0 frozen: their dropout is off, h.1's is on
    gets_rng = []
    dropout_forward = model.kernels.dropout_forward

    def spy(x, p, rng):
        gets_rng.append(rng is not None)
        return dropout_forward(x, p, rng)

    model.kernels = dataclasses.replace(model.kernels, dropout_forward=spy)
    model.backbone(batch()[0])
    # the dropout sites in order: embedding, h.0 (attention, MLP), h.1 (attention, MLP)
    assert gets_rng == [False, False, False, True, True]


def test_masked_entries_never_change_under_adamw():
    model = small()
    idx, targets = batch()
    opt = AdamW(model.params, lr=1e-2, weight_decay=0.1)
    opt.step(grads_of(model, idx, targets))  # moments for every entry, before freezing
    M.freeze_to(model, 2)
    element = (np.random.default_rng(2).random((C, 4 * C)) < 0.5).astype(np.float32)
    M.set_mask(model, "h.1.mlp.c_fc.weight", element)
    opt.masks = model.masks
    before = model.state_dict()
    for step in range(3):
        opt.step(grads_of(model, *batch(step + 1)))
    for name, p in model.params.items():
        mask = np.broadcast_to(model.masks.get(name, np.ones((), p.dtype)), p.shape) != 0
        assert np.array_equal(p[~mask], before[name][~mask]), name  # bit-identical
        if mask.any():
            assert not np.array_equal(p[mask], before[name][mask]), name  # the rest trained


# ---------------------------------------------------------------------- FISH


def fisher_by_hand(model, batches):
    """The empirical Fisher: squared gradients of each example's own loss, summed."""
    fisher = {name: np.zeros_like(p) for name, p in model.params.items()}
    model.eval()
    for idx, targets, _ in batches:
        for row in range(len(idx)):
            model(idx[row:row + 1], targets[row:row + 1])
            for name, g in model.backward().items():
                fisher[name] += g * g
    return fisher


@pytest.mark.parametrize("keep_fraction", [0.01, 0.1, 0.99])
def test_fisher_mask_keeps_the_top_fraction(keep_fraction):
    batches = [(*batch(s, length=6), None) for s in range(3)]  # few tokens: many zero grads
    model = small()
    fisher = fisher_by_hand(small(), batches)
    masks = M.fisher_mask(model, batches, keep_fraction)
    backbone = [n for n in model.params if not M.is_head(n)]
    assert set(masks) == set(backbone)  # the head stays fully trainable
    n_backbone = TOTAL - HEAD
    kept = sum(int(masks[n].sum()) for n in backbone)
    assert abs(kept - keep_fraction * n_backbone) <= 1
    kept_scores = np.concatenate([fisher[n][masks[n] == 1] for n in backbone])
    dropped_scores = np.concatenate([fisher[n][masks[n] == 0] for n in backbone])
    assert kept_scores.min() >= dropped_scores.max()
    assert M.count(model)[0] == kept + HEAD


def test_fisher_mask_refuses_bad_fraction_and_no_batches():
    with pytest.raises(ValueError, match="keep_fraction"):
        M.fisher_mask(small(), [], 0.0)
    with pytest.raises(ValueError, match="at least one example"):
        M.fisher_mask(small(), [], 0.5)
