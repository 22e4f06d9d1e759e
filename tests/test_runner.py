"""runner.py in-process: a run's results file written atomically, the pretraining cache
key, the source-task loss of an adapted backbone, and the resumable checkpoint each
fine-tuning run keeps while it trains. The summary, table and progress line are tested in
test_report.py, the atomic JSON writer in test_fileio.py.

The end-to-end command line is tested in test_cli_end_to_end.py; these tests call the
runner's functions directly on a tiny config, with one pretrained model for the module.
"""
import json
import os
import textwrap
from pathlib import Path

import numpy as np
import pytest

from transferlab import checkpoint as C
from transferlab import fileio
from transferlab import runner as R
from transferlab import train as T
from transferlab.config import ConfigError, load_config, replace_in
from transferlab.tasks import make_source
from transferlab.train import evaluate, lm_split
from test_fileio import dump_half_then_fail

TINY = """\
seed: 0
model: {n_layer: 1, n_head: 2, n_embd: 16, block_size: 16}
task: {n_tokens: 8, n_topics: 2, seq_len: 12, min_len: 6, n_source_train: 64,
       n_source_val: 16, n_target_train: 16, n_target_val: 16, n_target_test: 32}
pretrain: {steps: 10, eval_every: 5, batch_size: 8, warmup_steps: 2}
finetune: {steps: 6, eval_every: 3, batch_size: 8, warmup_steps: 1}
strategies:
  sparse_mask: {fisher_batches: 1}
  freeze_then_unfreeze: {unfreeze_at_iteration: 3}
runner: {progress: false}
"""


def tiny(root, **changes):
    """The tiny config with every output under `root`; `changes` are dotted overrides."""
    path = root / "config.yaml"
    path.write_text(TINY + textwrap.dedent(f"""\
        logging: {{file: {json.dumps(str(root / 'logs' / 't.log'))}}}
        """))
    overrides = [("runner.cache_dir", str(root / "cache")), ("runner.output", str(root / "out.json")),
                 ("runner.plot", str(root / "out.png"))]
    return load_config(path, overrides=overrides + list(changes.items()), env=False)


@pytest.fixture(scope="module")
def pre(tmp_path_factory):
    """One pretrained model for the module: (config, checkpoint path, source val split)."""
    root = tmp_path_factory.mktemp("runner")
    config = tiny(root)
    path, info = R.ensure_pretrained(config, None, progress=False)
    assert info["cached"] is False and path.is_file()
    return config, path, make_source(R.task_spec(config)).val


def fresh(pre, tmp_path, **changes):
    """The module's config, writing into tmp_path but sharing the pretrained cache."""
    config, path, _ = pre
    cfg = tiny(tmp_path, **changes)
    return replace_in(cfg, "runner.cache_dir", str(path.parent))


# ---------------------------------------------------------------------- atomic results file


@pytest.mark.slow  # two whole runs
def test_a_run_whose_results_write_fails_keeps_the_earlier_results(pre, tmp_path, monkeypatch):
    config = fresh(pre, tmp_path, **{"runner.strategies": ["feature_extractor"]})
    assert R.run(config) == 0
    out = tmp_path / "out.json"
    earlier = out.read_bytes()
    umask = os.umask(0)
    os.umask(umask)
    for made in (out, tmp_path / "out.png"):  # as open() would make them, not mkstemp's 0600
        assert made.stat().st_mode & 0o777 == 0o666 & ~umask
    assert json.loads(earlier)["results"][0]["strategy"] == "feature_extractor"
    monkeypatch.setattr(fileio.json, "dump", dump_half_then_fail)
    with pytest.raises(OSError):
        R.run(replace_in(config, "runner.seeds", [0, 1]))
    assert out.read_bytes() == earlier
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_each_output_gets_its_own_plot_beside_it(pre, tmp_path):
    """runner.plot empty (as shipped): the plot is runner.output's path with .png, so a
    second experiment with another --output does not overwrite the first one's plot."""
    config = fresh(pre, tmp_path, **{"runner.strategies": ["feature_extractor"], "runner.plot": ""})
    plots = {}
    for name in ("a", "b"):
        cfg = replace_in(config, "runner.output", str(tmp_path / "runs" / f"{name}.json"))
        assert R.plot_path(cfg) == tmp_path / "runs" / f"{name}.png"
        assert R.run(cfg) == 0
        plots[name] = (tmp_path / "runs" / f"{name}.png").read_bytes()
    assert plots["a"].startswith(b"\x89PNG") and plots["b"].startswith(b"\x89PNG")
    assert (tmp_path / "runs" / "a.png").read_bytes() == plots["a"]  # untouched by run b
    assert R.plot_path(replace_in(config, "runner.plot", "p.png")) == Path("p.png")  # as given
    with pytest.raises(ConfigError, match="same file: set runner.plot"):
        R.preflight(replace_in(config, "runner.output", str(tmp_path / "x.png")))


# ---------------------------------------------------------------------- pretraining cache


@pytest.mark.parametrize("key, value", [
    ("task.relatedness", 0.5), ("task.target", "score"), ("task.n_target_train", 7),
    ("task.min_len", 7), ("finetune.lr", 0.5), ("runner.seeds", [3]), ("runner.output", "x.json"),
])
def test_target_side_knobs_share_the_pretrained_model(pre, key, value):
    config = pre[0]
    assert R.pretrain_key(replace_in(config, key, value)) == R.pretrain_key(config)


@pytest.mark.parametrize("key, value", [
    ("seed", 1), ("pretrain.steps", 11), ("pretrain.lr", 0.01), ("model.n_embd", 8),
    ("model.dropout", 0.2), ("task.n_tokens", 9), ("task.concentration", 0.5),
    ("task.n_source_train", 65),
])
def test_pretraining_knobs_change_the_cache_key(pre, key, value):
    config = pre[0]
    assert R.pretrain_key(replace_in(config, key, value)) != R.pretrain_key(config)


def test_the_cache_is_reused_and_a_given_checkpoint_is_checked(pre, tmp_path):
    config, path, _ = pre
    mtime = path.stat().st_mtime_ns
    again, info = R.ensure_pretrained(config, None, progress=False)
    assert again == path and info["cached"] is True and path.stat().st_mtime_ns == mtime
    other = replace_in(config, "task.n_tokens", 9)  # vocab 10, the checkpoint has 9
    with pytest.raises(ValueError, match=str(path)):
        R.ensure_pretrained(other, str(path), progress=False)


def test_a_corrupt_cached_model_is_pretrained_again(tmp_path, caplog):
    config = tiny(tmp_path)
    path, info = R.ensure_pretrained(config, None, progress=False)
    good = C.load_checkpoint(path)
    path.write_bytes(path.read_bytes()[:1000])  # cut short, as a full disk would leave it
    with caplog.at_level("WARNING", logger="transferlab"):
        again, info = R.ensure_pretrained(config, None, progress=False)
    assert again == path and info["cached"] is False
    assert any("truncated or corrupt" in r.getMessage() and "pretraining again" in r.getMessage()
               for r in caplog.records)
    remade = C.load_checkpoint(path)  # the same seed and knobs: the same model again
    assert all(np.array_equal(remade.params[n], good.params[n]) for n in good.params)


def test_an_interrupted_pretraining_goes_on_to_the_uninterrupted_model(pre, tmp_path, monkeypatch):
    """Ctrl-C after pretraining's first checkpoint: the next call resumes from it (it does
    not start over) and caches the model an uninterrupted pretraining made."""
    config = tiny(tmp_path)  # the module's knobs, so the module's model is the reference
    save = C.save_checkpoint
    saved_steps = []

    def save_then_interrupt(path, *args, **kwargs):
        saved_steps.append(kwargs.get("step"))
        save(path, *args, **kwargs)
        raise KeyboardInterrupt
    monkeypatch.setattr(C, "save_checkpoint", save_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        R.ensure_pretrained(config, None, progress=False)
    running = R.pretrain_checkpoint_path(config)
    assert saved_steps == [5] and running.is_file()  # TINY: pretrain.eval_every 5 of 10 steps
    assert not R.pretrained_cache_path(config).exists()
    monkeypatch.setattr(C, "save_checkpoint", save)
    resumed_from = []
    resume = T.ckpt.resume
    monkeypatch.setattr(T.ckpt, "resume", lambda path, *a, **k: resumed_from.append(path) or resume(path, *a, **k))
    path, info = R.ensure_pretrained(config, None, progress=False)
    assert resumed_from == [str(running)] and info["cached"] is False
    assert not running.exists()  # done: the cached model is the result
    done, reference = C.load_checkpoint(path), C.load_checkpoint(pre[1])
    assert all(np.array_equal(done.params[n], reference.params[n]) for n in reference.params)
    assert info["history"] == reference.extra["history"]


def test_a_corrupt_pretraining_checkpoint_starts_pretraining_over(pre, tmp_path, caplog):
    config = tiny(tmp_path)
    running = R.pretrain_checkpoint_path(config)
    running.parent.mkdir(parents=True)
    running.write_bytes(b"half a checkpoint")
    with caplog.at_level("WARNING", logger="transferlab"):
        path, info = R.ensure_pretrained(config, None, progress=False)
    assert any("pretraining from the start" in r.getMessage() for r in caplog.records)
    assert not running.exists() and info["cached"] is False
    done, reference = C.load_checkpoint(path), C.load_checkpoint(pre[1])
    assert all(np.array_equal(done.params[n], reference.params[n]) for n in reference.params)


# ---------------------------------------------------------------------- source LM loss


def test_source_loss_of_the_pretrained_model_is_its_own_lm_loss(pre):
    _, path, source_val = pre
    model = C.model_from_checkpoint(path)
    own = evaluate(model, "lm", lm_split(source_val))["loss"]
    assert R.source_lm_loss(model, path, source_val) == pytest.approx(own, rel=1e-6)


def test_source_loss_sees_a_changed_backbone_but_keeps_the_pretrained_output_layer(pre):
    config, path, source_val = pre
    base = R.source_lm_loss(C.model_from_checkpoint(path), path, source_val)
    changed = C.model_from_checkpoint(path)
    changed.params["h.0.mlp.c_proj.weight"] *= 3.0
    assert abs(R.source_lm_loss(changed, path, source_val) - base) > 1e-4
    # a classifier model (new head, CLS row added) is measured with the pretrained wte
    cls_config = replace_in(config, "finetune.pooling", "cls")
    model = R.target_model(cls_config, R.experiment_data(cls_config), 2, path, seed=0)
    assert model.params["wte.weight"].shape[0] == R.task_spec(config).vocab_size + 1
    assert R.source_lm_loss(model, path, source_val) == pytest.approx(base, abs=1e-9)


def test_feature_extractor_keeps_the_source_loss_and_full_finetune_moves_it(pre):
    config, path, source_val = pre
    pretrained = R.source_lm_loss(C.model_from_checkpoint(path), path, source_val)
    frozen = R.run_one(config, "feature_extractor", 0, path, source_val, progress=False)
    assert abs(frozen["source"]["lm_loss"] - pretrained) <= 1e-9
    assert frozen["trainable_params"] == 2 * 16 + 2  # the 2-way linear head alone
    full = R.run_one(config, "full_finetune", 0, path, source_val, progress=False)
    assert full["trainable_params"] == full["total_params"]
    assert abs(full["source"]["lm_loss"] - pretrained) > 1e-6


# ---------------------------------------------------------------------- resumable runs


def _interrupt_after_first_evaluation(monkeypatch):
    save = C.save_checkpoint

    def save_then_interrupt(path, *args, **kwargs):
        digest = save(path, *args, **kwargs)
        if (kwargs.get("extra") or {}).get("kind") == "finetune":
            raise KeyboardInterrupt
        return digest

    monkeypatch.setattr(T.ckpt, "save_checkpoint", save_then_interrupt)


def _same(a, b):
    for key in ("target", "history", "source", "trainable_params", "relatedness", "seed", "task"):
        assert a[key] == b[key], key


def test_run_checkpoint_path_names_the_run(pre):
    config = pre[0]
    path = R.run_checkpoint_path(config, "bitfit", 2)
    assert path.name == "bitfit-topic-seed2.npz" and path.parent.name == "runs"
    swept = replace_in(config, "task.relatedness", 0.25)
    assert R.run_checkpoint_path(swept, "bitfit", 2, sweep="relatedness").name == "bitfit-topic-rel0.25-seed2.npz"


@pytest.mark.parametrize("strategy", ["full_finetune", "sparse_mask", "gradual_unfreeze"])
def test_an_interrupted_run_resumes_to_the_same_numbers(pre, tmp_path, monkeypatch, strategy):
    config = fresh(pre, tmp_path, **{"runner.strategies": [strategy]})
    assert R.run(config) == 0
    (reference,) = json.loads((tmp_path / "out.json").read_text())["results"]
    runs = pre[1].parent / "runs"
    assert not list(runs.glob(f"{strategy}-*")), "a finished run removes its checkpoint"

    with monkeypatch.context() as m:
        _interrupt_after_first_evaluation(m)
        with pytest.raises(KeyboardInterrupt):
            R.run(replace_in(config, "runner.output", str(tmp_path / "never.json")))
    saved = R.run_checkpoint_path(config, strategy, 0)
    assert C.load_checkpoint(saved).step == 3
    assert not (tmp_path / "never.json").exists()

    assert R.run(replace_in(config, "runner.output", str(tmp_path / "resumed.json")), resume=str(saved)) == 0
    (resumed,) = json.loads((tmp_path / "resumed.json").read_text())["results"]
    _same(resumed, reference)
    saved.unlink()


def test_a_sweep_run_resumes_at_its_own_relatedness(pre, tmp_path, monkeypatch):
    config = fresh(pre, tmp_path, **{"runner.strategies": ["bitfit"], "runner.sweep_values": [0.0]})
    assert R.run(config, sweep="relatedness") == 0
    (reference,) = json.loads((tmp_path / "out.json").read_text())["results"]
    assert reference["relatedness"] == 0.0
    with monkeypatch.context() as m:
        _interrupt_after_first_evaluation(m)
        with pytest.raises(KeyboardInterrupt):
            R.run(config, sweep="relatedness")
    saved = R.run_checkpoint_path(replace_in(config, "task.relatedness", 0.0), "bitfit", 0, sweep="relatedness")
    # resumed under the default config (relatedness 1): the checkpoint says 0
    assert R.run(replace_in(config, "runner.output", str(tmp_path / "resumed.json")), resume=str(saved)) == 0
    (resumed,) = json.loads((tmp_path / "resumed.json").read_text())["results"]
    _same(resumed, reference)
    saved.unlink()


def test_resume_on_a_phase_boundary(pre, tmp_path, monkeypatch):
    # freeze_then_unfreeze unfreezes at step 3, exactly where the first checkpoint is written:
    # the resumed run must enter the new phase (masks, rates) as the uninterrupted one did
    config = fresh(pre, tmp_path, **{"runner.strategies": ["freeze_then_unfreeze"]})
    R.run(config)
    (reference,) = json.loads((tmp_path / "out.json").read_text())["results"]
    with monkeypatch.context() as m:
        _interrupt_after_first_evaluation(m)
        with pytest.raises(KeyboardInterrupt):
            R.run(config)
    saved = R.run_checkpoint_path(config, "freeze_then_unfreeze", 0)
    try:
        R.run(replace_in(config, "runner.output", str(tmp_path / "resumed.json")), resume=str(saved))
    finally:
        saved.unlink()
    (resumed,) = json.loads((tmp_path / "resumed.json").read_text())["results"]
    _same(resumed, reference)
    assert reference["history"][0]["step"] == 3 and len(reference["history"]) == 2


def test_resume_refuses_a_pretrained_checkpoint(pre):
    config, path, _ = pre
    with pytest.raises(ValueError, match="not a fine-tuning run checkpoint"):
        R.run(config, resume=str(path))


# ---------------------------------------------------------------------- references in the results


def test_results_carry_the_baselines_and_the_optimal_source_loss(pre, tmp_path):
    """Every result is judged against chance, the count baseline and the Bayes ceiling on
    the same test splits, and the pretrained model against the optimal source LM loss."""
    from transferlab.baselines import baselines_for, source_reference
    from transferlab.tasks import make_target

    config = fresh(pre, tmp_path, **{"runner.strategies": ["feature_extractor"], "runner.seeds": [0, 1]})
    assert R.run(config) == 0
    out = json.loads((tmp_path / "out.json").read_text())
    refs = out["baselines"]
    assert sorted((e["name"], e["seed"]) for e in refs) == sorted(
        (name, seed) for name in ("chance", "count", "bayes") for seed in (0, 1))
    spec = R.task_spec(config)
    want = baselines_for("topic", spec, make_target("topic", spec, seed=1), 1)
    got = [e for e in refs if e["seed"] == 1]
    assert got == want  # the test split of seed 1, the runs' own
    for e in refs:
        assert e["task"] == "topic" and e["relatedness"] == 1.0 and 0.0 <= e["target"]["accuracy"] <= 1.0
    pre_info = out["pretrained"]
    assert pre_info["optimal_lm_loss"] == pytest.approx(source_reference(spec)["optimal_lm_loss"])
    assert pre_info["source_lm_loss"] > pre_info["optimal_lm_loss"]  # a 10-step LM is far from it


# ------------------------------------------------------------------ which knob sets the rate


@pytest.mark.parametrize("overrides, warned", [
    (["finetune.lr=1e-3", "runner.strategies=[bitfit,lora]"], True),  # both have their own rate
    (["runner.strategies=[bitfit,lora]"], False),  # finetune.lr left at its default
    (["finetune.lr=1e-3", "runner.strategies=[bitfit,lora]", "strategies.lr.lora=0"], False),
])
def test_a_finetune_lr_that_no_strategy_uses_is_warned_about(caplog, overrides, warned):
    config = load_config(overrides=overrides, env=False)
    with caplog.at_level("WARNING", logger="transferlab"):
        assert R.warn_unused_finetune_lr(config) is warned
    messages = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    if warned:
        (message,) = messages
        assert "finetune.lr = 0.001 is not used" in message
        assert "strategies.lr.bitfit = 0.0001" in message and "strategies.lr.lora = 0.0003" in message
    else:
        assert messages == []


def test_a_nan_loss_names_the_run_and_the_knob_of_its_rate():
    config = load_config(overrides=["runner.strategies=[bitfit]"], env=False)
    with pytest.raises(T.TrainingError) as err:
        with R.rate_named("bitfit seed 3", "strategies.lr.bitfit", 1e9):
            raise T.TrainingError("loss became nan at step 2 (lr 3e+08)")
    assert str(err.value) == ("bitfit seed 3: loss became nan at step 2 (lr 3e+08); its learning "
                              "rate is strategies.lr.bitfit = 1e+09, try a lower one")
    from transferlab.config import lr_knob
    assert lr_knob(config, "bitfit") == "strategies.lr.bitfit"
    assert lr_knob(replace_in(config, "strategies.lr.bitfit", 0.0), "bitfit") == "finetune.lr"
