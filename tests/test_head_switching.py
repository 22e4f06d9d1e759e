"""Switching heads on one backbone (GPT.set_head, GPT.resize_vocab in model.py): the wte tie
broken and restored, new heads initialised small, parameter counts, and a new CLS row that
trains alone. See docs/head_switching.md and docs/tied_weights.md."""
import numpy as np
import pytest

from transferlab import GPT, GPTConfig
from transferlab import masks as M
from transferlab.heads import head_param_names
from transferlab.optim import AdamW

V, T, L, NH, C, K = 25, 32, 2, 4, 64, 4
BACKBONE = V * C + T * C + L * (12 * C * C + 13 * C) + 2 * C  # GPT-2 formula: 103,744


def lm(dtype="float32", **overrides):
    cfg = dict(vocab_size=V, block_size=T, n_layer=L, n_head=NH, n_embd=C, dtype=dtype)
    cfg.update(overrides)
    return GPT(GPTConfig(**cfg), seed=0)


def tokens(seed=0, B=2, length=12, high=V):
    return np.random.default_rng(seed).integers(0, high, (B, length))


# ---------------------------------------------------------------------- LM -> classifier


def test_lm_to_sequence_classifier_breaks_the_tie_and_adds_ck_plus_k():
    model = lm()
    assert "lm_head.weight" not in model.params  # tied: the LM head is wte itself
    assert M.count(model) == (BACKBONE, BACKBONE)
    wte_before = model.params["wte.weight"].copy()
    model.set_head("sequence", n_classes=K)
    assert "lm_head.weight" not in model.params
    assert head_param_names(model) == ["seq_head.weight", "seq_head.bias"]
    assert model.params["seq_head.weight"].shape == (C, K)
    assert model.params["seq_head.bias"].shape == (K,)
    assert M.count(model)[1] - BACKBONE == C * K + K
    assert np.array_equal(model.params["wte.weight"], wte_before)  # the backbone is kept


def test_new_linear_head_starts_small():
    model = lm().set_head("sequence", n_classes=16)
    w = model.params["seq_head.weight"]  # 1,024 draws
    assert abs(w.std() - 0.002) < 0.0002
    assert abs(w.mean()) < 0.0002
    assert not model.params["seq_head.bias"].any()


def test_new_mlp_head_is_xavier():
    H = 128
    model = lm().set_head("sequence", n_classes=K, head_hidden=H)
    fc, out = model.params["seq_head.fc.weight"], model.params["seq_head.weight"]
    assert fc.shape == (C, H) and out.shape == (H, K)
    assert abs(fc.std() - np.sqrt(2 / (C + H))) < 0.05 * np.sqrt(2 / (C + H))
    assert abs(out.std() - np.sqrt(2 / (H + K))) < 0.15 * np.sqrt(2 / (H + K))
    assert M.count(model)[1] - BACKBONE == C * H + H + H * K + K


def test_freeze_backbone_freezes_wte_only_after_the_tie_is_broken():
    model = lm()
    M.freeze_backbone(model)
    assert M.count(model)[0] == V * C  # tied: wte is the LM head, so it stays trainable
    model.set_head("sequence", n_classes=K)
    M.freeze_backbone(model)
    assert M.count(model)[0] == C * K + K  # wte frozen with the rest of the backbone
    assert M.is_frozen(model, "wte.weight")


def test_classifier_gradient_reaches_wte_only_through_the_embedding():
    """Tied, wte gets a gradient in every row (the LM head scores every token); after the
    switch only the rows of tokens that occur in the input get one."""
    idx = tokens(high=10)  # tokens 10..24 never occur
    model = lm("float64")
    model(idx, tokens(1, high=V))
    assert np.all(np.abs(model.backward()["wte.weight"][10:]).sum(axis=1) > 0)
    model.set_head("sequence", n_classes=K)
    model(idx, np.array([0, 3]))
    g = model.backward()["wte.weight"]
    assert not g[10:].any()
    assert np.all(np.abs(g[np.unique(idx)]).sum(axis=1) > 0)


# ---------------------------------------------------------------------- classifier -> LM


def test_classifier_to_lm_restores_a_tied_head():
    idx = tokens()
    model = lm().eval()
    before, _ = model(idx)
    model.set_head("sequence", n_classes=K)
    assert model(idx)[0].shape == (2, K)
    model.set_head("lm")
    assert "lm_head.weight" not in model.params and not head_param_names(model)
    assert not any(n.startswith("seq_head.") for n in model.params)
    logits, _ = model(idx)
    h = model.backbone(idx)  # (B, T, C)
    np.testing.assert_allclose(logits, h @ model.params["wte.weight"].T, rtol=1e-5, atol=1e-6)
    assert np.array_equal(logits, before)  # LM -> classifier -> LM reproduces the LM exactly
    assert M.count(model)[1] == BACKBONE


def test_switch_to_untied_lm_copies_wte():
    model = lm().set_head("sequence", n_classes=K).set_head("lm", tie_weights=False)
    head = model.params["lm_head.weight"]
    assert np.array_equal(head, model.params["wte.weight"])
    assert head is not model.params["wte.weight"]
    assert M.count(model)[1] == BACKBONE + V * C


def test_switch_drops_the_old_heads_masks():
    model = lm().set_head("sequence", n_classes=K)
    M.freeze(model, "seq_head.*")
    model.set_head("token", n_classes=3)
    assert not any(n.startswith("seq_head.") for n in model.masks)


# ---------------------------------------------------------------------- token head


def test_token_head():
    model = lm().set_head("token", n_classes=3)
    assert head_param_names(model) == ["token_head.weight", "token_head.bias"]
    assert M.count(model)[1] - BACKBONE == C * 3 + 3
    logits, loss = model(tokens(), tokens(2, high=3))
    assert logits.shape == (2, 12, 3) and np.isfinite(loss)
    assert not model.config.is_causal  # classifiers attend both ways by default


# ---------------------------------------------------------------------- a CLS token


def test_resize_vocab_adds_a_cls_row_keeping_old_rows():
    model = lm()
    old = model.params["wte.weight"].copy()
    model.resize_vocab(V + 1)
    wte = model.params["wte.weight"]
    assert wte.shape == (V + 1, C) and model.config.vocab_size == V + 1
    assert np.array_equal(wte[:V], old)  # bit-identical
    assert 0 < np.abs(wte[V]).sum() and abs(wte[V].std() - 0.02) < 0.01
    assert M.count(model)[1] == BACKBONE + C


def test_resize_vocab_grows_a_mask_with_trainable_new_rows():
    model = lm().set_head("sequence", n_classes=K)
    M.freeze_backbone(model)
    model.resize_vocab(V + 1)
    assert M.count(model)[0] == C * K + K + C
    grown = model.masks["wte.weight"]  # read-only like every other mask
    with pytest.raises(ValueError):
        grown[0, 0] = 1.0
    # a step moves the new row and the head, nothing of the old vocabulary
    before = model.params["wte.weight"].copy()
    opt = AdamW(model.params, lr=1e-2, masks=model.masks)
    idx = tokens(0)
    idx[:, -1] = V  # the new token, so its row gets a gradient
    model(idx, np.array([0, 1]))
    opt.step(model.backward())
    wte = model.params["wte.weight"]
    assert np.array_equal(wte[:V], before[:V]) and not np.array_equal(wte[V], before[V])


def test_bad_resize_leaves_the_model_unchanged():
    model = lm(pad_id=V - 1)
    old = model.params["wte.weight"]
    with pytest.raises(ValueError, match="pad_id"):
        model.resize_vocab(V - 5)
    assert model.params["wte.weight"] is old and model.config.vocab_size == V


def test_only_the_new_cls_row_trains():
    cls = V
    model = lm().resize_vocab(V + 1)
    model.set_head("sequence", n_classes=K, pooling="cls", cls_id=cls)
    M.freeze_backbone(model)
    M.train_rows(model, "wte.weight", [cls])
    assert M.count(model)[0] == C * K + K + C
    before = model.state_dict()
    opt = AdamW(model.params, lr=1e-2, weight_decay=0.1, masks=model.masks)
    for step in range(3):
        idx = tokens(step)
        idx[:, -1] = cls
        model(idx, np.array([step % K, (step + 1) % K]))
        opt.step(model.backward())
    wte = model.params["wte.weight"]
    assert np.array_equal(wte[:V], before["wte.weight"][:V])
    assert not np.array_equal(wte[cls], before["wte.weight"][cls])
    for name, p in model.params.items():
        if name != "wte.weight" and not name.startswith("seq_head."):
            assert np.array_equal(p, before[name]), name
    assert not np.array_equal(model.params["seq_head.weight"], before["seq_head.weight"])
