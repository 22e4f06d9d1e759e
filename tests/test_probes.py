"""Linear probes (src/transferlab/probes.py): the features are the model's own, the probe
separates what is linearly separable and finds nothing in noise, and docs/probes.md shows
the numbers its command wrote."""
import json
from pathlib import Path

import numpy as np
import pytest

from transferlab import GPT, GPTConfig
from transferlab import probes as P
from transferlab.layers import layernorm_forward
from transferlab.tasks import TaskSpec, make_target

ROOT = Path(__file__).resolve().parents[1]


def tiny_model(head="sequence", **kw):
    cfg = GPTConfig(vocab_size=25, block_size=32, n_layer=2, n_head=4, n_embd=16, head=head, n_classes=4, **kw)
    return GPT(cfg, seed=0).eval()


def small_split(n=24):
    spec = TaskSpec(seq_len=32, n_target_train=n, n_target_val=4, n_target_test=4)  # T = block_size
    return make_target("topic", spec, seed=0).train


@pytest.mark.parametrize("head", ["sequence", "lm"])  # both ways, and causal
def test_last_layer_output_through_ln_f_is_the_backbone(head):
    model, split = tiny_model(head, pad_id=24), small_split()
    outs = P.layer_outputs(model, split.x, split.mask)
    assert len(outs) == model.config.n_layer + 1 and all(o.shape == (24, 32, 16) for o in outs)
    h, _ = layernorm_forward(outs[-1], model.params["ln_f.weight"], model.params["ln_f.bias"])
    assert np.allclose(h, model.backbone(split.x, split.mask), atol=1e-5)


def test_layer_features_are_the_mean_over_real_tokens_only():
    model, split = tiny_model(), small_split()
    feats = P.layer_features(model, split)
    assert feats.shape == (3, 24, 16) and feats.dtype == np.float64
    # the embedding row of sequence 0: mean of wte[x] + wpe over its real tokens, pads ignored
    n = int(split.mask[0].sum())
    assert n < 32  # the row has padding, so a plain mean would differ
    expected = (model.params["wte.weight"][split.x[0, :n]] + model.params["wpe.weight"][:n]).mean(axis=0)
    assert np.allclose(feats[0, 0], expected, atol=1e-6)
    # batching changes nothing
    P.FEATURE_BATCH, saved = 5, P.FEATURE_BATCH
    try:
        assert np.allclose(P.layer_features(model, split), feats)
    finally:
        P.FEATURE_BATCH = saved


def test_probe_separates_linearly_separable_classes():
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((3, 10)) * 4.0
    labels = rng.integers(0, 3, 300)
    X = centres[labels] + rng.standard_normal((300, 10))
    train, test = P.probe_split(300)
    out = P.linear_probe(X, labels, train, test)
    assert out["test_accuracy"] > 0.97 and out["train_accuracy"] > 0.97
    assert out["W"].shape == (10, 3) and out["b"].shape == (3,)


def test_probe_on_random_features_is_near_chance():
    rng = np.random.default_rng(1)
    X, labels = rng.standard_normal((800, 16)), rng.integers(0, 4, 800)
    train, test = P.probe_split(800)
    acc = P.linear_probe(X, labels, train, test)["test_accuracy"]
    assert abs(acc - 0.25) < 0.07, acc


def test_probe_is_deterministic_and_converges():
    rng = np.random.default_rng(2)
    X, labels = rng.standard_normal((100, 5)), rng.integers(0, 2, 100)
    a = P.linear_probe(X, labels, np.arange(50), np.arange(50, 100), steps=300)
    b = P.linear_probe(X, labels, np.arange(50), np.arange(50, 100), steps=300)
    assert np.array_equal(a["W"], b["W"])
    longer = P.linear_probe(X, labels, np.arange(50), np.arange(50, 100), steps=3000)
    assert longer["train_loss"] <= a["train_loss"] + 1e-12  # gradient descent with step 1/L never goes up


def test_attention_maps_match_figures_py_on_a_causal_model_and_rows_sum_to_one():
    import sys
    sys.path.insert(0, str(ROOT / "src"))
    from figures import attention_maps as figures_maps

    idx = np.random.default_rng(0).integers(0, 25, (1, 12))
    lm = tiny_model("lm")
    assert np.allclose(P.attention_maps(lm, idx), figures_maps(lm, idx), atol=1e-6)
    both = P.attention_maps(tiny_model(), idx)  # (L, NH, T, T), nothing masked
    assert both.shape == (2, 4, 12, 12) and np.allclose(both.sum(-1), 1.0) and (both[..., 0, 1:] > 0).all()


def test_probes_page_shows_the_numbers_in_probes_json():
    """docs/probes.md's table is what `probes.main()` last wrote to docs/figures/probes.json."""
    result = json.loads((ROOT / "docs/figures/probes.json").read_text())
    page = (ROOT / "docs/probes.md").read_text()
    assert P.table_markdown(result) in page
    assert set(result["probes"]) >= {"pretrained", "random init", *P.STRATEGIES}
