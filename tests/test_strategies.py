"""Strategies as plans (src/transferlab/strategies.py): every plan of the nine strategies
against hand-written phases and rates, `apply_phase` against trainable counts from the
GPT-2 parameter formula, and `describe`. See docs/strategies/README.md."""
import dataclasses
import re

import numpy as np
import pytest

from transferlab import GPT, GPTConfig
from transferlab import masks as M
from transferlab.config import (DiscriminativeLRConfig, FreezeThenUnfreezeConfig,
                                HeadFinetuneConfig, StrategiesConfig)
from transferlab.strategies import STRATEGIES, Phase, Plan, apply_phase, build_plan, describe

NAMES = ["scratch", "feature_extractor", "head_finetune", "full_finetune", "gradual_unfreeze",
         "discriminative_lr", "freeze_then_unfreeze", "bitfit", "sparse_mask", "lora", "ulmfit", "aux_lm"]
KNOBS = StrategiesConfig()  # defaults: backbone x0.1, decay 2.6, unfreeze at 100 at x0.1, ...
STEPS, L = 300, 2  # 2 blocks: 4 layer groups (embeddings, h.0, h.1, ln_f + head)
# ULMFiT's rates bottom to top: the top group at 1, each group below at the rate above / 2.6
ULMFIT = (1 / 17.576, 1 / 6.76, 1 / 2.6, 1.0)  # 2.6^3 = 17.576, 2.6^2 = 6.76

# the tiny model: vocabulary 12, block 16, 2 layers of width 16, a 3-way sequence head
V, T, NH, C, K = 12, 16, 2, 16, 3
EMB = V * C + T * C  # wte + wpe = 448
BLOCK = 12 * C * C + 13 * C  # one block = 3,280
LNF = 2 * C  # 32
HEAD = C * K + K  # 51
TOTAL = EMB + L * BLOCK + LNF + HEAD  # 7,091
LN_PER_BLOCK = 4 * C  # ln_1, ln_2: weight and bias
BIAS_PER_BLOCK = 3 * C + C + 4 * C + C + C + C  # c_attn, attn.c_proj, c_fc, mlp.c_proj, ln_1, ln_2


def tiny():
    return GPT(GPTConfig(vocab_size=V, block_size=T, n_layer=L, n_head=NH, n_embd=C,
                         head="sequence", n_classes=K), seed=0)


def as_tuples(plan):
    return [(p.start, p.trainable, tuple(p.lr_scales)) for p in plan.phases]


# ---------------------------------------------------------------------- build_plan

# strategy -> (pretrained, schedule, feature cache, [(start, trainable, lr_scales)])
EXPECTED = {
    "scratch": (False, None, False, [(0, "all", ())]),
    "feature_extractor": (True, None, True, [(0, "head", ())]),
    "head_finetune": (True, None, False, [(0, "all", (0.1, 0.1, 0.1, 1.0))]),
    "full_finetune": (True, None, False, [(0, "all", ())]),
    # 4 phases of 300 // 4 = 75 steps, one more group each
    "gradual_unfreeze": (True, "slanted_triangular", False,
                         [(0, "top:1", ULMFIT), (75, "top:2", ULMFIT),
                          (150, "top:3", ULMFIT), (225, "top:4", ULMFIT)]),
    "discriminative_lr": (True, "slanted_triangular", False, [(0, "all", ULMFIT)]),
    # frozen backbone (rate 0) until step 100, then all of it at 0.1; the head at 1 throughout
    "freeze_then_unfreeze": (True, None, False,
                             [(0, "head", (0.0, 0.0, 0.0, 1.0)), (100, "all", (0.1, 0.1, 0.1, 1.0))]),
    "bitfit": (True, None, False, [(0, "bias", ())]),
    "sparse_mask": (True, None, False, [(0, "sparse", ())]),
    "lora": (True, None, False, [(0, "lora", ())]),
    # ULMFiT: after its LM stage (Plan.lm_stage_steps), gradual unfreezing as above
    "ulmfit": (True, "slanted_triangular", False,
               [(0, "top:1", ULMFIT), (75, "top:2", ULMFIT), (150, "top:3", ULMFIT), (225, "top:4", ULMFIT)]),
    "aux_lm": (True, None, False, [(0, "all", ())]),
}


def test_the_registered_strategies():
    assert list(STRATEGIES) == NAMES == list(EXPECTED)


@pytest.mark.parametrize("name", NAMES)
def test_plan_of_each_strategy(name):
    pretrained, schedule, cache, phases = EXPECTED[name]
    plan = build_plan(name, STEPS, L, KNOBS)
    assert plan.name == name
    assert plan.pretrained is pretrained
    assert plan.schedule == schedule
    assert plan.feature_cache is cache
    got = as_tuples(plan)
    assert [(s, t) for s, t, _ in got] == [(s, t) for s, t, _ in phases]
    for (_, _, got_scales), (_, _, want_scales) in zip(got, phases):
        assert got_scales == pytest.approx(want_scales, rel=1e-14)


def test_discriminative_lr_takes_its_knobs():
    knobs = dataclasses.replace(KNOBS, discriminative_lr=DiscriminativeLRConfig(
        decay=2.0, cut_frac=0.25, ratio=8.0))
    plan = build_plan("discriminative_lr", STEPS, L, knobs)
    assert plan.phases[0].lr_scales == (0.125, 0.25, 0.5, 1.0)  # 1/2^3, 1/2^2, 1/2, 1
    assert plan.schedule_kwargs == {"cut_frac": 0.25, "ratio": 8.0}


def test_head_finetune_and_freeze_then_unfreeze_take_their_knobs():
    knobs = dataclasses.replace(
        KNOBS, head_finetune=HeadFinetuneConfig(backbone_lr_multiplier=0.25),
        freeze_then_unfreeze=FreezeThenUnfreezeConfig(
            unfreeze_at_iteration=40, unfreeze_lr_multiplier=0.5, head_lr_multiplier=3.0))
    assert as_tuples(build_plan("head_finetune", STEPS, L, knobs)) == \
        [(0, "all", (0.25, 0.25, 0.25, 1.0))]
    assert as_tuples(build_plan("freeze_then_unfreeze", STEPS, L, knobs)) == \
        [(0, "head", (0.0, 0.0, 0.0, 3.0)), (40, "all", (0.5, 0.5, 0.5, 3.0))]


@pytest.mark.parametrize("unfreeze_at", [STEPS, STEPS + 50])
def test_freeze_then_unfreeze_never_reaching_the_unfreeze_is_one_frozen_phase(unfreeze_at):
    knobs = dataclasses.replace(KNOBS, freeze_then_unfreeze=FreezeThenUnfreezeConfig(
        unfreeze_at_iteration=unfreeze_at))
    plan = build_plan("freeze_then_unfreeze", STEPS, L, knobs)
    assert as_tuples(plan) == [(0, "head", (0.0, 0.0, 0.0, 1.0))]


def test_gradual_unfreeze_opens_one_group_per_phase_from_the_top():
    plan = build_plan("gradual_unfreeze", STEPS, L, KNOBS)
    model = tiny()
    groups = {  # the layer groups by name, written out: 0 embeddings .. 3 ln_f + head
        0: ["wte.weight", "wpe.weight"],
        1: [n for n in model.params if n.startswith("h.0.")],
        2: [n for n in model.params if n.startswith("h.1.")],
        3: ["ln_f.weight", "ln_f.bias", "seq_head.weight", "seq_head.bias"],
    }
    assert sorted(sum(groups.values(), [])) == sorted(model.params)
    for k, phase in enumerate(plan.phases):
        apply_phase(model, phase)
        open_groups = {g for g, names in groups.items() if not any(M.is_frozen(model, n) for n in names)}
        shut_groups = {g for g, names in groups.items() if all(M.is_frozen(model, n) for n in names)}
        assert open_groups == set(range(3 - k, 4)), k  # the top k + 1 groups
        assert shut_groups == set(range(0, 3 - k)), k
    assert M.count(model) == (TOTAL, TOTAL)  # the last phase trains everything


def test_phase_at_follows_the_starts():
    plan = build_plan("gradual_unfreeze", STEPS, L, KNOBS)
    want = {0: 0, 74: 0, 75: 1, 149: 1, 150: 2, 224: 2, 225: 3, 299: 3, 10_000: 3}
    assert {step: plan.phases.index(plan.phase_at(step)) for step in want} == want


def test_unknown_strategy_is_refused_with_the_known_names():
    with pytest.raises(ValueError, match="unknown strategy 'adapters'") as caught:
        build_plan("adapters", STEPS, L, KNOBS)
    for name in NAMES:
        assert name in str(caught.value)


# ---------------------------------------------------------------------- apply_phase


def fisher_batches(n=2, B=4, length=8):
    rng = np.random.default_rng(0)
    for _ in range(n):
        yield rng.integers(0, V, (B, length)), rng.integers(0, K, B), None


@pytest.mark.parametrize("spec, layernorm_trainable, expected", [
    ("all", False, TOTAL),  # 7,091
    ("head", False, HEAD),  # 51: the feature extractor
    ("head", True, HEAD + L * LN_PER_BLOCK + LNF),  # 211: fastai's trainable LayerNorms
    ("bias", False, L * BIAS_PER_BLOCK + C + HEAD),  # 419: block biases, ln_f.bias, head
    ("top:1", False, LNF + HEAD),  # 83
    ("top:2", False, BLOCK + LNF + HEAD),  # 3,363
    ("top:3", False, 2 * BLOCK + LNF + HEAD),  # 6,643
    ("top:3", True, 2 * BLOCK + LNF + HEAD),  # the embeddings have no LayerNorm: 6,643
    ("top:2", True, BLOCK + LN_PER_BLOCK + LNF + HEAD),  # 3,427: h.0's LayerNorms too
    ("top:4", False, TOTAL),
    ("sparse", False, round(0.05 * (TOTAL - HEAD)) + HEAD),  # 352 of 7,040, plus the head
])
def test_trainable_count_of_each_spec(spec, layernorm_trainable, expected):
    model = tiny()
    assert sum(p.size for p in model.params.values()) == TOTAL  # the formula above: 7,091
    apply_phase(model, Phase(0, spec), layernorm_trainable, fisher_batches(), keep_fraction=0.05)
    assert M.count(model) == (expected, TOTAL)


def test_lr_scale_gives_every_parameter_its_group_rate():
    model = tiny()
    scales = apply_phase(model, Phase(0, "all", ULMFIT))
    assert set(scales) == set(model.params)
    for name, scale in scales.items():
        if name in ("wte.weight", "wpe.weight"):
            want = ULMFIT[0]
        elif name.startswith("h.0."):
            want = ULMFIT[1]
        elif name.startswith("h.1."):
            want = ULMFIT[2]
        else:  # ln_f and the head
            assert name.startswith(("ln_f.", "seq_head.")), name
            want = ULMFIT[3]
        assert scale == pytest.approx(want, rel=1e-14), name


def test_no_lr_scales_means_every_rate_at_one():
    assert apply_phase(tiny(), Phase(0, "all")) == {}


def test_a_spec_applies_from_scratch_not_on_top_of_the_last_phase():
    model = tiny()
    apply_phase(model, Phase(0, "head"))
    apply_phase(model, Phase(10, "bias"))  # BitFit after a frozen phase: the biases train
    assert M.count(model)[0] == L * BIAS_PER_BLOCK + C + HEAD


def test_unknown_spec_is_refused():
    with pytest.raises(ValueError, match="unknown trainable spec 'layers'"):
        apply_phase(tiny(), Phase(0, "layers"))


# ---------------------------------------------------------------------- describe


def test_describe_lists_each_phase_with_its_step_range():
    text = describe(build_plan("gradual_unfreeze", STEPS, L, KNOBS), STEPS)
    ranges = re.findall(r"steps\s+(\d+)-(\d+)\s+train (\S+)", text)
    assert ranges == [("0", "74", "top:1"), ("75", "149", "top:2"),
                      ("150", "224", "top:3"), ("225", "299", "top:4")]
    assert text.splitlines()[0].startswith("gradual_unfreeze: ")
    assert "slanted_triangular" in text


def test_describe_of_a_single_phase_plan():
    text = describe(build_plan("feature_extractor", STEPS, L, KNOBS), STEPS)
    assert re.findall(r"steps\s+(\d+)-(\d+)\s+train (\S+)", text) == [("0", "299", "head")]
    assert "feature cache" in text and "pretrained backbone" in text


def test_describe_of_a_hand_made_plan():
    custom = Plan("top_then_all", pretrained=False, phases=(Phase(0, "top:1"), Phase(4, "all")))
    text = describe(custom, 10)
    assert text.splitlines()[0] == "top_then_all: a plan of your own"
    assert "random init" in text
    assert re.findall(r"steps\s+(\d+)-(\d+)\s+train (\S+)", text) == [("0", "3", "top:1"),
                                                                       ("4", "9", "all")]


# ---------------------------------------------------------------------- LoRA as a strategy


def test_lora_strategy_trains_only_the_adapters_and_the_head():
    """PEFT's semantics: the pretrained weights never move, the model starts at the
    pretrained function (B = 0), and r * (in + out) numbers per adapted matrix train."""
    from transferlab import lora
    from transferlab.config import LoraConfig, StrategiesConfig

    knobs = StrategiesConfig(lora=LoraConfig(r=2, alpha=4.0, targets=("attn.c_attn", "mlp.c_fc")))
    plan = build_plan("lora", 10, 2, knobs)
    assert plan.lora == {"r": 2, "alpha": 4.0, "dropout": 0.0, "targets": ("attn.c_attn", "mlp.c_fc")}
    model = GPT(GPTConfig(vocab_size=11, block_size=8, n_layer=2, n_head=2, n_embd=8, head="sequence",
                          n_classes=3, dtype="float64"), seed=0)
    idx = np.random.default_rng(0).integers(0, 11, (4, 8))
    before, _ = model(idx)
    lora.attach(model, seed=0, **plan.lora)
    after, _ = model(idx)
    np.testing.assert_array_equal(after, before)  # B = 0: exactly the pretrained function
    apply_phase(model, plan.phases[0])
    C = 8
    per_layer = 2 * (C + 3 * C) + 2 * (C + 4 * C)  # c_attn (C -> 3C) and c_fc (C -> 4C)
    head = C * 3 + 3
    assert M.count(model)[0] == 2 * per_layer + head
    trainable = {n for n in model.params if not M.is_frozen(model, n)}
    assert trainable == set(lora.adapter_names(model.params)) | {"seq_head.weight", "seq_head.bias"}


def test_lora_gradients_through_the_model_match_finite_differences():
    from gradcheck import tensor_rel_error
    from transferlab import lora

    model = GPT(GPTConfig(vocab_size=7, block_size=5, n_layer=2, n_head=2, n_embd=8, head="sequence",
                          n_classes=3, dtype="float64"), seed=1)
    lora.attach(model, r=2, alpha=3.0, targets=("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"))
    rng = np.random.default_rng(2)
    for name in lora.adapter_names(model.params):  # B = 0 would make dA exactly 0: move off it
        model.params[name][...] = rng.standard_normal(model.params[name].shape) * 0.3
    idx, y = rng.integers(0, 7, (3, 5)), rng.integers(0, 3, 3)
    model(idx, y)
    grads = model.backward()
    for name in ("h.0.attn.c_attn.lora_A", "h.1.mlp.c_proj.lora_B", "h.0.mlp.c_fc.lora_B"):
        p, num = model.params[name], np.zeros_like(model.params[name])
        for i in np.ndindex(p.shape):
            old = p[i]
            p[i] = old + 1e-6
            plus = model(idx, y)[1]
            p[i] = old - 1e-6
            minus = model(idx, y)[1]
            p[i] = old
            num[i] = (plus - minus) / 2e-6
        assert tensor_rel_error(grads[name], num) < 1e-5, name  # the whole-model tolerance (STYLE.md)


# ---------------------------------------------------------------------- forgetting remedies


def test_ulmfit_and_aux_lm_plans_carry_their_stage_and_weight():
    plan = build_plan("ulmfit", STEPS, L, KNOBS)
    assert plan.lm_stage_steps == KNOBS.ulmfit.lm_steps == 100 and plan.aux_lm_weight == 0.0
    aux = build_plan("aux_lm", STEPS, L, KNOBS)
    assert aux.aux_lm_weight == KNOBS.aux_lm.weight == 0.5 and aux.lm_stage_steps == 0


def test_auxiliary_lm_is_the_causal_lm_loss_of_the_same_backbone():
    """train.auxiliary_lm equals the loss and gradients of the same weights built as a
    causal LM with a tied head, and leaves the classifier model as it was."""
    from transferlab.losses import IGNORE_INDEX
    from transferlab.train import auxiliary_lm

    cfg = GPTConfig(vocab_size=9, block_size=8, n_layer=2, n_head=2, n_embd=8, dtype="float64",
                    head="sequence", n_classes=3, pad_id=8)
    model = GPT(cfg, seed=0)
    rng = np.random.default_rng(1)
    x = rng.integers(0, 8, (3, 8))
    x[0, 6:] = 8  # padding at the end of one row
    mask = x != 8
    loss, grads = auxiliary_lm(model, x, mask)
    assert model.config == cfg  # the classifier view is back
    lm = GPT(dataclasses.replace(cfg, head="lm", causal=True), seed=5)
    for name, value in model.params.items():
        if name in lm.params:
            lm.params[name][...] = value
    y = np.where(mask[:, 1:], x[:, 1:], IGNORE_INDEX)
    _, want = lm(x[:, :-1], y, attention_mask=mask[:, :-1])
    assert loss == pytest.approx(want, rel=1e-12)
    want_grads = lm.backward()
    for name, g in want_grads.items():
        np.testing.assert_allclose(grads[name], g, rtol=1e-10, atol=1e-14, err_msg=name)
    assert not grads["seq_head.weight"].any()  # the LM loss does not reach the classifier
