"""The training loop (src/transferlab/train.py): metrics against hand values and a
brute-force AUC, the feature cache against the uncached path, bit-exact resume in a new
process, the NaN stop, early stopping, the plateau schedule, masks honoured while training,
and reproducibility. See docs/training.md.

Every run is tiny (vocabulary 12, block 16, 2 layers of width 16, a dozen steps) and in
float64, so a difference is the code's, not rounding's.
"""
import dataclasses
import itertools
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from transferlab import GPT, GPTConfig
from transferlab.checkpoint import load_checkpoint
from transferlab.config import FreezeThenUnfreezeConfig, StrategiesConfig
from transferlab.losses import IGNORE_INDEX
from transferlab.strategies import Phase, Plan, build_plan
from transferlab.tasks import Split, TaskSpec, make_target
from transferlab.config import TrainingConfig
from transferlab.train import Data, TrainingError, auc, evaluate, metrics, train

TESTS = Path(__file__).resolve().parent
SRC = TESTS.parent / "src"

# 11 chain tokens + PAD = a vocabulary of 12; 3 topics; rows of 6..15 real tokens
SPEC = TaskSpec(n_tokens=11, n_topics=3, seq_len=16, min_len=6, n_target_train=32,
                n_target_val=16, n_target_test=16)
V, T, L, NH, C, K = 12, 16, 2, 2, 16, 3
KNOBS = StrategiesConfig()  # the config's defaults for every strategy
# GPT-2 parameter count V*C + T*C + L*(12C^2 + 13C) + 2C, plus the head C*K + K
HEAD = C * K + K  # 51
TOTAL = V * C + T * C + L * (12 * C * C + 13 * C) + 2 * C + HEAD  # 7,091
BACKBONE = TOTAL - HEAD  # 7,040


def target(kind="topic") -> Data:
    t = make_target(kind, SPEC, seed=0)
    return Data(kind, t.train, t.val, t.test)


def tiny(kind="topic", dropout=0.1, seed=0) -> GPT:
    """A float64 model with the head the target kind needs."""
    head = "token" if kind == "tagging" else "sequence"
    cfg = GPTConfig(vocab_size=V, block_size=T, n_layer=L, n_head=NH, n_embd=C, dropout=dropout,
                    dtype="float64", head=head, n_classes={"binary": 2, "score": 1}.get(kind, K),
                    sequence_output="score" if kind == "score" else "classify", pad_id=SPEC.pad_id)
    return GPT(cfg, seed=seed)


def settings(**changes) -> TrainingConfig:
    base = dict(steps=12, batch_size=8, lr=1e-2, weight_decay=0.1, eval_every=3, warmup_steps=0,
                patience=0)
    return TrainingConfig(**{**base, **changes})


def snapshot(model) -> dict:
    return {name: p.copy() for name, p in model.params.items()}


class Every:
    """A progress object that calls `hook(step)` after each optimizer step.

    The loop calls progress.update(step + 1, loss, lr) right after the optimizer step and
    before the evaluation, which lets a test act at an exact point of a run.
    """

    def __init__(self, hook):
        self.hook = hook

    def update(self, step, loss, lr):
        self.hook(step)


# ---------------------------------------------------------------------- metrics


def split(x_shape, y, mask=None):
    x = np.zeros(x_shape, dtype=np.int64)
    return Split(x, np.asarray(y), np.ones(x_shape, bool) if mask is None else mask)


def test_accuracy_of_a_sequence_classifier():
    logits = np.array([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0], [1.0, 0.0, 5.0], [4.0, 0.0, 0.0]])
    # argmax: 0, 1, 2, 0 against labels 0, 1, 1, 0: three of four right
    assert metrics("topic", logits, split((4, 5), [0, 1, 1, 0])) == {"accuracy": 0.75}


def test_token_accuracy_ignores_padding_targets():
    logits = np.zeros((2, 3, 2))
    logits[..., 1] = [[1.0, -1.0, 9.0], [-1.0, 1.0, 9.0]]  # argmax 1 where positive
    y = np.array([[1, 1, IGNORE_INDEX], [0, 0, IGNORE_INDEX]])
    # real positions: predicted 1,0 | 0,1 against 1,1 | 0,0 -> 2 of 4; the two wrong-looking
    # 9.0 logits sit on ignored positions and must not count
    assert metrics("tagging", logits, split((2, 3), y)) == {"accuracy": 0.5}


def test_binary_accuracy_and_auc_from_class_one_probability():
    d = np.array([2.0, -1.0, 0.25, 0.5])  # logit of class 1 minus logit of class 0
    logits = np.stack([np.zeros(4), d], axis=1)
    y = [1, 0, 1, 0]
    # predictions 1, 0, 1, 1: 3 of 4 right. AUC over the pairs (positive, negative):
    # (2 vs -1) yes, (2 vs 0.5) yes, (0.25 vs -1) yes, (0.25 vs 0.5) no -> 3/4
    assert metrics("binary", logits, split((4, 5), y)) == {"accuracy": 0.75, "auc": 0.75}


def test_mse_and_mae_of_a_scorer():
    out = np.array([0.5, 0.25, 1.0, 0.0])
    y = np.array([0.0, 0.25, 0.5, 0.5])
    # errors 0.5, 0, 0.5, -0.5: MSE = 0.75 / 4, MAE = 1.5 / 4
    assert metrics("score", out, split((4, 5), y)) == {"mse": 0.1875, "mae": 0.375}


def test_lm_loss_and_perplexity_over_the_masked_positions():
    logits = np.zeros((1, 3, 4))  # uniform: p = 1/4 for every token
    logits[0, 1] = [0.0, math.log(3.0), 0.0, 0.0]  # p(1) = 3 / (3 + 3) = 1/2
    logits[0, 2] = [50.0, 0.0, 0.0, 0.0]  # a hopeless prediction, masked out below
    y = np.array([[2, 1, 3]])
    mask = np.array([[True, True, False]])
    got = metrics("lm", logits, split((1, 3), y, mask))
    loss = (math.log(4.0) + math.log(2.0)) / 2  # mean NLL of the two real positions
    assert got["loss"] == pytest.approx(loss, rel=1e-14)
    assert got["perplexity"] == pytest.approx(math.sqrt(8.0), rel=1e-14)  # exp(loss)


def brute_force_auc(scores, labels):
    """P(positive scores above negative), every pair counted, a tie counting one half."""
    pos, neg = scores[labels == 1], scores[labels == 0]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


@pytest.mark.parametrize("seed", range(5))
def test_auc_equals_the_pairwise_count_with_ties(seed):
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, 5, size=40).astype(float)  # few distinct values: many ties
    labels = rng.integers(0, 2, size=40)
    assert auc(scores, labels) == pytest.approx(brute_force_auc(scores, labels), abs=1e-12)


def test_auc_edge_cases():
    labels = np.array([0, 0, 1, 1])
    assert auc(np.array([0.1, 0.2, 0.8, 0.9]), labels) == 1.0  # perfectly ranked
    assert auc(np.array([0.8, 0.9, 0.1, 0.2]), labels) == 0.0  # perfectly reversed
    assert auc(np.full(4, 0.3), labels) == 0.5  # all tied: a coin toss
    assert math.isnan(auc(np.array([0.1, 0.2]), np.array([1, 1])))  # no negatives: undefined


# ---------------------------------------------------------------------- feature cache


def test_feature_cache_gives_the_numbers_of_the_uncached_path():
    data = target()
    plan = build_plan("feature_extractor", 12, L, KNOBS)
    assert plan.feature_cache
    # dropout > 0: only because a frozen backbone runs without dropout do both paths agree
    cached, uncached = tiny(dropout=0.2), tiny(dropout=0.2)
    before = snapshot(cached)
    got = train(cached, data, plan, settings())
    want = train(uncached, data, dataclasses.replace(plan, feature_cache=False), settings())
    assert got.cache is not None and want.cache is None
    assert not np.array_equal(cached.params["seq_head.weight"], before["seq_head.weight"])
    for name, p in uncached.params.items():
        np.testing.assert_allclose(cached.params[name], p, rtol=1e-6, atol=0, err_msg=name)
    for a, b in zip(got.history, want.history):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-9)
        assert a["accuracy"] == b["accuracy"]


def test_no_feature_cache_when_layernorms_stay_trainable():
    # layernorm_trainable keeps the LayerNorms of the frozen backbone trainable: cached
    # features would give them no gradient, so the loop must run the backbone each step
    model = tiny()
    before = snapshot(model)
    result = train(model, target(), build_plan("feature_extractor", 12, L, KNOBS),
                   settings(layernorm_trainable_when_frozen=True))
    assert result.cache is None
    assert not np.array_equal(model.params["h.0.ln_1.weight"], before["h.0.ln_1.weight"])
    assert np.array_equal(model.params["h.0.attn.c_attn.weight"], before["h.0.attn.c_attn.weight"])


# ---------------------------------------------------------------------- exact resume

N, HALF = 12, 6  # the resumed process starts at step 6 (a checkpoint is written every 3)


def resume_setup(unfreeze_at):
    """The same model, data, plan and settings in both processes."""
    knobs = dataclasses.replace(KNOBS, freeze_then_unfreeze=FreezeThenUnfreezeConfig(
        unfreeze_at_iteration=unfreeze_at, unfreeze_lr_multiplier=0.5, head_lr_multiplier=2.0))
    plan = build_plan("freeze_then_unfreeze", N, L, knobs)
    assert len(plan.phases) == 2
    return tiny(dropout=0.1, seed=3), target(), plan, settings(steps=N, eval_every=3)


def finish_run(unfreeze_at, checkpoint, out):
    """Run in a fresh interpreter by the test below: resume, train to N, save the results."""
    model, data, plan, s = resume_setup(unfreeze_at)
    result = train(model, data, plan, s, seed=3, resume=checkpoint, checkpoint=checkpoint)
    np.savez(out + ".npz", **model.params)
    with open(out + ".json", "w") as f:
        json.dump({"history": result.history, "best_step": result.best_step,
                   "trainable_by_phase": result.trainable_by_phase}, f)


# unfreezing before, exactly at, and after the step where the run is resumed: dropout RNG
# and Adam moments from before the stop; a phase entered at the first resumed step; a
# phase entered later by the resumed process
@pytest.mark.parametrize("unfreeze_at", [HALF - 2, HALF, HALF + 2])
def test_resume_in_a_new_process_is_bit_identical(tmp_path, unfreeze_at):
    straight, mid = tmp_path / "straight.npz", tmp_path / "mid.npz"

    def keep_the_half_way_checkpoint(step):
        if step == HALF + 1:  # the checkpoint of step HALF was written after step HALF
            shutil.copy(straight, mid)

    model, data, plan, s = resume_setup(unfreeze_at)
    result = train(model, data, plan, s, seed=3, checkpoint=str(straight),
                   progress=Every(keep_the_half_way_checkpoint))
    assert load_checkpoint(mid).step == HALF

    out = str(tmp_path / "resumed")
    code = (f"import sys; sys.path[:0] = [{str(SRC)!r}, {str(TESTS)!r}]; import test_train; "
            f"test_train.finish_run({unfreeze_at}, {str(mid)!r}, {out!r})")
    done = subprocess.run([sys.executable, "-B", "-c", code], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr

    with np.load(out + ".npz") as resumed:  # the best parameters, restored at the end
        assert sorted(resumed.files) == sorted(model.params)
        for name, p in model.params.items():
            assert np.array_equal(resumed[name], p), name
    with open(out + ".json") as f:
        info = json.load(f)
    assert info["history"] == result.history
    assert info["best_step"] == result.best_step
    assert info["trainable_by_phase"] == result.trainable_by_phase == [HEAD, TOTAL]
    # the last step's parameters, optimizer moments and RNG, from the final checkpoints
    a, b = load_checkpoint(straight), load_checkpoint(mid)
    assert a.step == b.step == N
    for name, p in a.params.items():
        assert np.array_equal(b.params[name], p), name
    for name, state in a.optimizer_state["state"].items():
        for key in ("exp_avg", "exp_avg_sq"):
            assert np.array_equal(b.optimizer_state["state"][name][key], state[key]), name
    assert a.rng_state == b.rng_state


# ---------------------------------------------------------------------- NaN


def test_a_nan_loss_stops_training_and_keeps_the_last_checkpoint(tmp_path):
    path = tmp_path / "run.npz"
    model = tiny()
    saved = {}

    def poison(step):
        if step == 5:  # the checkpoint of the evaluation at step 4 is on disk now
            saved["bytes"] = path.read_bytes()
        if step == 6:  # one NaN weight: the loss of the next step (step 6) is NaN
            model.params["h.0.mlp.c_fc.bias"][0] = np.nan

    with pytest.raises(TrainingError, match=r"loss became nan at step 6\b") as caught:
        train(model, target(), build_plan("full_finetune", 12, L, KNOBS), settings(eval_every=4),
              checkpoint=str(path), progress=Every(poison))
    assert str(path) in str(caught.value)  # the message says where the good checkpoint is
    assert path.read_bytes() == saved["bytes"]  # not overwritten by the failed run
    kept = load_checkpoint(path)
    assert kept.step == 4
    assert all(np.isfinite(p).all() for p in kept.params.values())


# ---------------------------------------------------------------------- early stopping, plateau


def set_constant_score(model, data, offsets):
    """A hook making the scorer output sigmoid(best + offsets[step]) for every sequence.

    With seq_head.weight = 0 the output is sigmoid(bias) whatever the backbone does; the
    validation MSE of a constant c is var(y) + (c - mean(y))^2, smallest at c = mean(y).
    So offset 0 is the best possible evaluation and a larger |offset| is worse.
    """
    ybar = data.val.y.mean()
    best = math.log(ybar / (1.0 - ybar))  # sigmoid(best) = mean(y)

    def hook(step):
        model.params["seq_head.weight"][...] = 0.0
        model.params["seq_head.bias"][...] = best + offsets[step]

    return best, hook


@pytest.mark.parametrize("patience", [2, 0])
def test_early_stopping_ends_on_the_best_parameters(patience):
    data, model = target("score"), tiny("score")
    # evaluations at steps 1.. see offsets 2 (first: best), 0 (best), -1, 3 (two without
    # improvement: stop at step 4 with patience 2), then 1, 1, 1, 1
    offsets = {1: 2.0, 2: 0.0, 3: -1.0, 4: 3.0, 5: 1.0, 6: 1.0, 7: 1.0, 8: 1.0}
    best, hook = set_constant_score(model, data, offsets)
    result = train(model, data, build_plan("full_finetune", 8, L, KNOBS),
                   settings(steps=8, lr=0.0, eval_every=1, patience=patience), progress=Every(hook))
    if patience == 0:  # never stop early
        assert len(result.history) == 8 and result.stopped == "finished"
    else:
        assert [h["step"] for h in result.history] == [1, 2, 3, 4]
        assert result.stopped == "early stop at step 4: no better mse in 2 evaluations"
    assert result.best_step == 2
    assert model.params["seq_head.bias"][0] == best  # the step-2 parameters are back
    assert evaluate(model, "score", data.val)["mse"] == result.best["mse"]
    # the best constant predictor's MSE is the variance of the labels
    assert result.best["mse"] == pytest.approx(data.val.y.var(), rel=1e-9)


def test_resuming_an_early_stopped_run_trains_no_further(tmp_path):
    """The checkpoint of a run that stopped early resumes as stopped: same history, best params."""
    data, model = target("score"), tiny("score")
    offsets = {1: 2.0, 2: 0.0, 3: -1.0, 4: 3.0, 5: 1.0, 6: 1.0, 7: 1.0, 8: 1.0}
    best, hook = set_constant_score(model, data, offsets)
    path = str(tmp_path / "run.npz")
    plan = build_plan("full_finetune", 8, L, KNOBS)
    first = train(model, data, plan, settings(steps=8, lr=0.0, eval_every=1, patience=2),
                  progress=Every(hook), checkpoint=path)
    assert first.steps_run == 4
    again = tiny("score")
    second = train(again, data, plan, settings(steps=8, lr=0.0, eval_every=1, patience=2),
                   resume=path, checkpoint=path)
    assert second.steps_run == 4 and second.stopped == first.stopped
    assert second.history == first.history
    assert again.params["seq_head.bias"][0] == best  # ends on the best parameters too


def test_a_resumed_run_counts_the_seconds_before_its_checkpoint(tmp_path, monkeypatch):
    """Result.seconds of a resumed run is the time to reach the checkpoint plus the time
    after the resume: the first run's clock is made to jump 1000 s a reading, so its
    checkpoint holds thousands of seconds the resumed run (milliseconds) must carry on."""
    import transferlab.train as T
    data = target("score")
    plan = build_plan("full_finetune", 4, L, KNOBS)
    path = str(tmp_path / "run.npz")
    clock = itertools.count(0.0, 1000.0)
    monkeypatch.setattr(T.time, "perf_counter", lambda: next(clock))
    first = train(tiny("score"), data, plan, settings(steps=4, eval_every=2), checkpoint=path)
    monkeypatch.undo()
    before = load_checkpoint(path).extra["train"]["seconds"]
    assert before >= 1000.0 and first.seconds >= before
    again = train(tiny("score"), data, plan, settings(steps=4, eval_every=2), resume=path)
    assert before <= again.seconds < before + 60.0


def test_plateau_schedule_cuts_the_rate_after_patience_bad_evaluations():
    data, model = target("score"), tiny("score")
    # MSE by step: best, worse, worse (2 > patience 1 bad evaluations: halve), best, worse,
    # worse (halve again), worse
    offsets = {1: 2.0, 2: 3.0, 3: 4.0, 4: 0.0, 5: 1.0, 6: 1.5, 7: 0.5}
    _, hook = set_constant_score(model, data, offsets)
    result = train(model, data, build_plan("full_finetune", 7, L, KNOBS),
                   settings(steps=7, eval_every=1, schedule="plateau", plateau_patience=1,
                            plateau_factor=0.5), progress=Every(hook))
    # the rate each step ran at; a cut decided at an evaluation applies from the next step
    assert [h["lr"] for h in result.history] == [1e-2, 1e-2, 1e-2, 5e-3, 5e-3, 5e-3, 2.5e-3]


# ---------------------------------------------------------------------- masks while training


def test_bitfit_changes_no_weight_but_the_biases():
    model = tiny()
    before = snapshot(model)
    result = train(model, target(), build_plan("bitfit", 12, L, KNOBS), settings())
    assert result.trainable_params == L * 11 * C + C + HEAD  # block biases, ln_f.bias, head
    for name, p in model.params.items():
        if not (name.endswith(".bias") or name.startswith("seq_head.")):
            assert np.array_equal(p, before[name]), name
    for name in ("h.0.mlp.c_fc.bias", "h.1.ln_2.bias", "ln_f.bias", "seq_head.weight"):
        assert not np.array_equal(model.params[name], before[name]), name


def test_feature_extractor_changes_no_backbone_parameter():
    model = tiny()
    before = snapshot(model)
    result = train(model, target(), build_plan("feature_extractor", 12, L, KNOBS), settings())
    assert result.trainable_params == HEAD
    for name, p in model.params.items():
        same = np.array_equal(p, before[name])
        assert same != name.startswith("seq_head."), name  # the head alone has moved


def test_sparse_mask_trains_exactly_keep_fraction_of_the_backbone():
    model = tiny()
    before = snapshot(model)
    plan = build_plan("sparse_mask", 12, L, KNOBS)
    assert plan.keep_fraction == 0.05  # from the strategies.sparse_mask section
    result = train(model, target(), plan, settings())
    k = round(0.05 * BACKBONE)  # 352 of 7,040
    assert result.trainable_params == k + HEAD
    kept = moved = 0
    for name, p in model.params.items():
        if name.startswith("seq_head."):
            continue
        mask = np.broadcast_to(model.masks[name], p.shape) != 0
        changed = p != before[name]
        assert not (changed & ~mask).any(), name  # weight decay included: 0.1 here
        kept, moved = kept + mask.sum(), moved + changed.sum()
    assert kept == k and moved > 0


def test_gradual_unfreezing_enters_each_phase_with_one_more_group():
    result = train(tiny(), target(), build_plan("gradual_unfreeze", 12, L, KNOBS), settings())
    block, top = 12 * C * C + 13 * C, 2 * C + HEAD  # 3,280 and 83
    assert result.trainable_by_phase == [top, top + block, top + 2 * block, TOTAL]


# ---------------------------------------------------------------------- reproducibility


def run_with_seed(seed):
    model = tiny(seed=seed)
    result = train(model, target(), build_plan("full_finetune", 12, L, KNOBS), settings(),
                   seed=seed)
    return result.history, model.params


def test_same_seed_same_run_other_seed_other_run():
    h1, p1 = run_with_seed(0)
    h2, p2 = run_with_seed(0)
    h3, p3 = run_with_seed(1)
    assert h1 == h2
    assert all(np.array_equal(p1[n], p2[n]) for n in p1)
    assert [h["train_loss"] for h in h1] != [h["train_loss"] for h in h3]
    assert not np.array_equal(p1["h.0.attn.c_attn.weight"], p3["h.0.attn.c_attn.weight"])


def test_plan_is_data_the_loop_only_follows_it():
    # a hand-made plan, no strategy name: the head alone for 6 steps, then everything
    plan = Plan("custom", pretrained=True, phases=(Phase(0, "head"), Phase(6, "all")))
    model = tiny()
    before = snapshot(model)
    changed_at = {}

    def watch(step):
        changed_at.setdefault(step, not np.array_equal(model.params["wte.weight"], before["wte.weight"]))

    result = train(model, target(), plan, settings(), progress=Every(watch))
    assert result.trainable_by_phase == [HEAD, TOTAL]
    assert [changed_at[s] for s in range(1, 13)] == [False] * 6 + [True] * 6


# ---------------------------------------------------------------------- batch_threads


@pytest.mark.parametrize("strategy", ["full_finetune", "aux_lm"])
def test_batch_threads_runs_each_step_in_parts_with_the_whole_batch_numbers(strategy, monkeypatch):
    """finetune.batch_threads: 2 splits every forward and backward of the run into two
    parts (model.GPT's batch_threads); the parts' gradients add up to the whole batch's, so
    the run equals the one-part run to float64 rounding, and repeats itself exactly."""
    import transferlab.model as model_module

    parts = []
    real = model_module.in_threads
    monkeypatch.setattr(model_module, "in_threads",
                        lambda fn, items: parts.append(len(items)) or real(fn, items))

    def run(batch_threads):
        model = tiny(dropout=0.0)
        plan = build_plan(strategy, 12, L, KNOBS)
        result = train(model, target(), plan, settings(batch_threads=batch_threads))
        return model, result

    whole, r1 = run(1)
    assert parts == [] and whole.batch_threads == 1
    split_a, r2 = run(2)
    assert parts and set(parts) == {2} and split_a.batch_threads == 2
    for name, p in whole.params.items():
        np.testing.assert_allclose(split_a.params[name], p, rtol=1e-9, atol=1e-12, err_msg=name)
    assert [h["train_loss"] for h in r2.history] == pytest.approx([h["train_loss"] for h in r1.history],
                                                                   rel=1e-10)
    split_b, r3 = run(2)
    assert r3.history == r2.history
    assert all(np.array_equal(split_b.params[n], split_a.params[n]) for n in split_a.params)


@pytest.mark.parametrize("strategy", ["full_finetune", "aux_lm"])
def test_batch_processes_runs_the_batch_threads_numbers_bit_for_bit(strategy):
    """finetune.batch_processes: 2 runs the second part of every step in a worker process
    (workers.py) on the same operations as a thread would: the run, its history and its
    weights equal finetune.batch_threads: 2's exactly."""
    def run(**knobs):
        model = tiny(dropout=0.0)
        result = train(model, target(), build_plan(strategy, 12, L, KNOBS), settings(**knobs))
        return model, result

    threads, r1 = run(batch_threads=2)
    procs, r2 = run(batch_processes=2)
    assert procs.batch_processes == 2 and procs._workers is not None and procs._workers.alive
    assert [{k: v for k, v in h.items() if k != "seconds"} for h in r2.history] == \
        [{k: v for k, v in h.items() if k != "seconds"} for h in r1.history]
    for name, p in threads.params.items():
        np.testing.assert_array_equal(procs.params[name], p, err_msg=name)


def test_batch_threads_is_validated_and_keys_the_pretrained_cache():
    from transferlab.config import ConfigError, load_config
    from transferlab.runner import pretrain_key

    base = load_config(env=False)
    assert base.pretrain.batch_threads == base.finetune.batch_threads == 1
    two = load_config(overrides=["pretrain.batch_threads=2"], env=False)
    assert pretrain_key(two) != pretrain_key(base)
    assert pretrain_key(load_config(overrides=["finetune.batch_threads=2"], env=False)) == pretrain_key(base)
    with pytest.raises(ConfigError, match=r"finetune\.batch_threads must be >= 1, got 0"):
        load_config(overrides=["finetune.batch_threads=0"], env=False)
    procs = load_config(overrides=["pretrain.batch_processes=2"], env=False)
    assert pretrain_key(procs) not in (pretrain_key(base), pretrain_key(two))
    with pytest.raises(ConfigError, match=r"^--set: finetune\.batch_processes must be 1 while "
                                          r"finetune\.batch_threads is above 1 .*, got 2$"):
        load_config(overrides=["finetune.batch_threads=2", "finetune.batch_processes=2"], env=False)


@pytest.mark.parametrize("strategy", ["full_finetune", "aux_lm"])
def test_the_kernels_knob_picks_the_layer_functions_of_every_step(strategy, monkeypatch):
    """finetune.kernels: "plain" runs layers.py's equations in every forward and backward of
    the run (model.GPT's kernels), "fast" the chunked and tiled forms; the two runs agree to
    float64 rounding."""
    import dataclasses

    from transferlab import kernels as K

    calls = []

    def counted(fn):
        def wrapper(*args, **kwargs):
            calls.append(fn.__name__)
            return fn(*args, **kwargs)
        return wrapper

    spy = dataclasses.replace(K.PLAIN, **{name: counted(fn) for name, fn in K.PLAIN.functions().items()})
    monkeypatch.setitem(K.KERNELS, "plain", spy)

    def run(kernels):
        model = tiny(dropout=0.0)
        result = train(model, target(), build_plan(strategy, 12, L, KNOBS), settings(kernels=kernels))
        return model, result

    fast, r_fast = run("fast")
    assert fast.kernels is K.FAST and calls == []
    plain, r_plain = run("plain")
    assert plain.kernels is spy
    # every step ran a forward and a backward of each layer through the plain table
    assert calls.count("layernorm_backward") >= 12 * (2 * L + 1)
    assert {"attention_forward", "gelu_backward", "cross_entropy"} <= set(calls)
    for name, p in fast.params.items():
        np.testing.assert_allclose(plain.params[name], p, rtol=1e-9, atol=1e-12, err_msg=name)
    assert [h["train_loss"] for h in r_plain.history] == pytest.approx(
        [h["train_loss"] for h in r_fast.history], rel=1e-10)


def test_the_kernels_knob_is_validated_and_keys_the_pretrained_cache():
    from transferlab.config import ConfigError, load_config
    from transferlab.runner import pretrain_key

    base = load_config(env=False)
    assert base.pretrain.kernels == base.finetune.kernels == "fast"
    assert pretrain_key(load_config(overrides=["pretrain.kernels=plain"], env=False)) != pretrain_key(base)
    assert pretrain_key(load_config(overrides=["finetune.kernels=plain"], env=False)) == pretrain_key(base)
    with pytest.raises(ConfigError, match=r"finetune\.kernels must be one of plain, fast, got 'tiled'"):
        load_config(overrides=["finetune.kernels=tiled"], env=False)


def test_predict_gives_the_forward_outputs_and_keeps_no_activations():
    """Evaluation runs the backbone without caches for backward (a 256-example batch's would
    otherwise stay alive into the next batch) and gives exactly the forward's outputs."""
    from transferlab.train import predict

    model = tiny(dropout=0.0)
    split = target().val
    model.eval()
    batches = [split.batch(np.arange(i, min(i + 5, len(split)))) for i in range(0, len(split), 5)]
    want = np.concatenate([model(b.x, attention_mask=b.mask)[0] for b in batches])
    model.train()
    got = predict(model, split, batch_size=5)
    assert np.array_equal(got, want)
    assert model._cache is None and model._backbone_cache is None and model.training


def test_lm_evaluation_batch_by_batch_equals_the_whole_split_metrics():
    """evaluate() reduces each batch's logits to its targets' nll as they come; the loss is
    the one metrics() computes from the whole split's logits, bit for bit."""
    from transferlab.train import predict

    lm = GPT(GPTConfig(vocab_size=V, block_size=T, n_layer=L, n_head=NH, n_embd=C, dtype="float32",
                       head="lm", pad_id=SPEC.pad_id), seed=0)
    x = np.random.default_rng(3).integers(0, V - 1, (11, T))
    y = np.roll(x, -1, axis=1)
    y[:, -1] = IGNORE_INDEX
    mask = np.ones((11, T), bool)
    mask[2, 9:] = False
    split = Split(x, y, mask)
    whole = metrics("lm", predict(lm, split, batch_size=4), split)
    assert evaluate(lm, "lm", split, batch_size=4) == whole
    assert evaluate(lm, "lm", split, batch_size=3) == whole and lm._cache is None
