"""`python src/main.py ...` end to end, on a tiny config: every strategy, every task,
the pretraining cache, reproducibility, seeds, the relatedness sweep, --pretrained,
--resume, and the bad-input paths (exit 2, one line, earlier results left alone).

Each test runs the real command line in a fresh process with its own working directory.
One pretrained model (a module-scoped cache directory) serves every test, so the whole
file runs in well under a minute on a small machine.
"""
import json
import math
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from transferlab.config import STRATEGY_NAMES

# every test needs the module's first run (pretraining, then all nine strategies) and
# most start another command line: the quick loop (-m "not slow") leaves the file out
pytestmark = pytest.mark.slow

MAIN = Path(__file__).resolve().parents[1] / "src" / "main.py"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
FINETUNE_STEPS = 6
METRICS = {"topic": ("accuracy",), "binary": ("accuracy", "auc"), "tagging": ("accuracy",),
           "score": ("mse", "mae")}


def tiny_config(cache_dir) -> str:
    """A config small enough that a run of every strategy takes a second or two."""
    return textwrap.dedent(f"""\
        seed: 0
        model: {{n_layer: 1, n_head: 2, n_embd: 16, block_size: 16}}
        task:
          n_tokens: 8
          n_topics: 2
          seq_len: 12
          min_len: 6
          n_source_train: 64
          n_source_val: 16
          n_target_train: 16
          n_target_val: 16
          n_target_test: 32
        pretrain: {{steps: 10, eval_every: 5, batch_size: 8, warmup_steps: 2}}
        finetune: {{steps: {FINETUNE_STEPS}, eval_every: 3, batch_size: 8, warmup_steps: 1,
                   pooling: mean, attention: bidirectional}}
        strategies:
          sparse_mask: {{fisher_batches: 1}}
          freeze_then_unfreeze: {{unfreeze_at_iteration: 4}}
        runner:
          cache_dir: {json.dumps(str(cache_dir))}
          output: results.json
          plot: results.png
          progress: false
        logging: {{file: logs/transferlab.log}}
        """)


def run_cli(*args, cwd, config):
    """The command line in a fresh process, cwd=`cwd`, without RANDOM_SEED / LOG_LEVEL."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANDOM_SEED", "LOG_LEVEL")}
    return subprocess.run([sys.executable, str(MAIN), "--config", str(config), *args],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def ok(proc):
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert "Traceback" not in proc.stderr
    return proc


def results_of(cwd, name="results.json"):
    return json.loads((Path(cwd) / name).read_text())


def by_strategy(entries):
    return {e["strategy"]: e for e in entries}


def pretrained_files(cache_dir):
    return sorted(p.name for p in Path(cache_dir).glob("pretrained-*.npz"))


class World:
    """The shared cache and config, and the first (pretraining) run of every strategy."""

    def __init__(self, root):
        self.root = root
        self.cache = root / "cache"
        self.config = root / "config.yaml"
        self.config.write_text(tiny_config(self.cache))
        self.base_dir = root / "base"
        self.base_dir.mkdir()
        self.base = ok(run_cli("--strategy", "all", cwd=self.base_dir, config=self.config))
        self.base_json = results_of(self.base_dir)
        (self.cache_file,) = self.cache.glob("pretrained-*.npz")
        self.cache_mtime = self.cache_file.stat().st_mtime_ns
        self.pretrained_loss = self.base_json["pretrained"]["source_lm_loss"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return World(tmp_path_factory.mktemp("e2e"))


@pytest.fixture(scope="module")
def second(world):
    """The same command again, in another directory: the cache must serve it."""
    cwd = world.root / "second"
    cwd.mkdir()
    proc = ok(run_cli("--strategy", "all", cwd=cwd, config=world.config))
    return proc, results_of(cwd)


def check_entry(entry, task, pretrained_loss):
    """The fields docs/API.md (Runner) promises for one results entry, with sane values."""
    name = entry["strategy"]
    assert entry["task"] == task
    assert type(entry["seed"]) is int and entry["seed"] >= 0
    trainable, total = entry["trainable_params"], entry["total_params"]
    assert type(trainable) is int and type(total) is int
    assert 0 < trainable <= total
    if name in ("full_finetune", "scratch"):
        assert trainable == total, name
    if name in ("feature_extractor", "bitfit"):
        assert trainable < total / 10, (name, trainable, total)
    assert isinstance(entry["seconds"], (int, float)) and entry["seconds"] >= 0

    target = entry["target"]
    for metric in METRICS[task]:
        assert metric in target, (name, task, sorted(target))
        assert math.isfinite(target[metric])
    if "accuracy" in METRICS[task]:
        assert 0 <= target["accuracy"] <= 1
    if task == "binary":
        assert 0 <= target["auc"] <= 1
    if task == "score":
        assert target["mse"] >= 0 and target["mae"] >= 0
        assert target["mse"] <= target["mae"] + 1e-12  # errors of scores in [0, 1]

    lm_loss = entry["source"]["lm_loss"]
    assert math.isfinite(lm_loss) and lm_loss > 0
    if name == "feature_extractor":  # a frozen backbone cannot forget the source task
        assert abs(lm_loss - pretrained_loss) <= 1e-9, (lm_loss, pretrained_loss)

    history = entry["history"]
    assert isinstance(history, list) and history
    steps = [h["step"] for h in history]
    assert all(isinstance(h, dict) for h in history)
    assert steps == sorted(steps) and 0 < steps[0] and steps[-1] <= FINETUNE_STEPS


def check_outputs(proc, cwd, strategies, task, pretrained_loss):
    data = results_of(cwd)
    entries = data["results"]
    assert isinstance(entries, list)
    assert sorted(e["strategy"] for e in entries) == sorted(strategies)
    for entry in entries:
        check_entry(entry, task, pretrained_loss)
    png = (Path(cwd) / "results.png").read_bytes()
    assert png.startswith(PNG_SIGNATURE) and len(png) > 1000
    table = proc.stdout.splitlines()
    for name in strategies:  # one table row per strategy, starting with its name
        assert any(line.split()[:1] == [name] for line in table), (name, proc.stdout)
    return data


# ------------------------------------------------------------------ every strategy, every task


def test_every_strategy_on_the_topic_task(world):
    data = check_outputs(world.base, world.base_dir, STRATEGY_NAMES, "topic", world.pretrained_loss)
    assert data["pretrained"]["cached"] is False  # this run did the pretraining
    assert "pretraining the source LM" in world.base.stderr
    assert math.isfinite(world.pretrained_loss)


@pytest.mark.parametrize("task, strategies, pooling", [
    ("binary", ["scratch", "feature_extractor", "bitfit", "full_finetune"], "cls"),
    ("tagging", ["feature_extractor", "gradual_unfreeze", "sparse_mask", "discriminative_lr"], None),
    ("score", ["feature_extractor", "head_finetune", "freeze_then_unfreeze", "full_finetune"],
     "attention"),
])
def test_every_task(world, tmp_path, task, strategies, pooling):
    extra = ["--set", f"finetune.pooling={pooling}"] if pooling else []
    proc = ok(run_cli("--task", task, "--strategy", *strategies, *extra, cwd=tmp_path,
                      config=world.config))
    data = check_outputs(proc, tmp_path, strategies, task, world.pretrained_loss)
    if pooling:
        assert data["config"]["finetune"]["pooling"] == pooling
    if pooling == "cls":  # the CLS token is a new vocabulary row: one more row of wte
        topic = by_strategy(world.base_json["results"])  # the same 2-way head, mean pooling
        n_embd = data["config"]["model"]["n_embd"]
        for e in data["results"]:
            assert e["total_params"] == topic[e["strategy"]]["total_params"] + n_embd


# ------------------------------------------------------------------ cache and reproducibility


def test_pretraining_is_cached(world, second, tmp_path):
    proc, data = second
    assert "using the cached pretrained model" in proc.stderr
    assert "pretraining the source LM" not in proc.stderr
    assert world.cache_file.stat().st_mtime_ns == world.cache_mtime
    assert data["pretrained"]["cached"] is True
    assert data["pretrained"]["path"] == str(world.cache_file)
    assert data["pretrained"]["source_lm_loss"] == world.pretrained_loss

    before = pretrained_files(world.cache)
    changed = ok(run_cli("--strategy", "feature_extractor", "--set", "pretrain.steps=11",
                         cwd=tmp_path, config=world.config))
    assert "pretraining the source LM" in changed.stderr
    new = sorted(set(pretrained_files(world.cache)) - set(before))
    assert len(new) == 1, (before, pretrained_files(world.cache))
    assert results_of(tmp_path)["pretrained"]["path"] == str(world.cache / new[0])
    assert world.cache_file.stat().st_mtime_ns == world.cache_mtime


def test_same_config_and_seed_give_identical_results(world, second):
    _, data = second
    first, again = by_strategy(world.base_json["results"]), by_strategy(data["results"])
    assert sorted(first) == sorted(again) == sorted(STRATEGY_NAMES)
    for name in STRATEGY_NAMES:
        assert again[name]["target"] == first[name]["target"], name
        assert again[name]["history"] == first[name]["history"], name
        assert again[name]["source"] == first[name]["source"], name


# ------------------------------------------------------------------ seeds and the sweep


def test_seeds_give_one_entry_each_and_the_summary_is_over_them(world, tmp_path):
    strategies = ["scratch", "bitfit"]
    ok(run_cli("--strategy", *strategies, "--seeds", "0", "1", cwd=tmp_path, config=world.config))
    data = results_of(tmp_path)
    for name in strategies:
        entries = [e for e in data["results"] if e["strategy"] == name]
        assert sorted(e["seed"] for e in entries) == [0, 1]
        (row,) = [r for r in data["summary"] if r["strategy"] == name]
        values = np.array([e["target"][row["metric"]] for e in entries])
        assert row["metric"] == "accuracy" and row["n_seeds"] == 2
        assert row["mean"] == pytest.approx(values.mean(), abs=1e-12)
        assert row["std"] == pytest.approx(values.std(), abs=1e-12)  # population std (ddof 0)
        losses = np.array([e["source"]["lm_loss"] for e in entries])
        assert row["source_lm_loss_mean"] == pytest.approx(losses.mean(), abs=1e-12)
        assert row["source_lm_loss_std"] == pytest.approx(losses.std(), abs=1e-12)
    # the two seeds really are different runs (different target data and batches)
    scratch = [e for e in data["results"] if e["strategy"] == "scratch"]
    assert scratch[0]["history"] != scratch[1]["history"]


def test_relatedness_sweep_has_entries_for_each_value(world, tmp_path):
    strategies = ["scratch", "full_finetune"]
    proc = ok(run_cli("--strategy", *strategies, "--sweep", "relatedness",
                      "--set", "runner.sweep_values=[0.0,1.0]", cwd=tmp_path, config=world.config))
    data = results_of(tmp_path)
    assert data["sweep"] == "relatedness"
    pairs = sorted((e["strategy"], e["relatedness"]) for e in data["results"])
    assert pairs == sorted((s, r) for s in strategies for r in (0.0, 1.0))
    assert sorted((r["strategy"], r["relatedness"]) for r in data["summary"]) == pairs
    # relatedness 1 is the default task: the same numbers as the first run
    full = [e for e in data["results"] if e["strategy"] == "full_finetune"]
    at = {e["relatedness"]: e for e in full}
    assert at[1.0]["target"] == by_strategy(world.base_json["results"])["full_finetune"]["target"]
    assert at[0.0]["history"] != at[1.0]["history"]  # another target task
    assert (tmp_path / "results.png").read_bytes().startswith(PNG_SIGNATURE)
    assert "0.00" in proc.stdout and "1.00" in proc.stdout


# ------------------------------------------------------------------ --pretrained and --resume


def test_pretrained_checkpoint_is_used_instead_of_pretraining(world, tmp_path):
    empty_cache = tmp_path / "other-cache"
    ok(run_cli("--strategy", "feature_extractor", "--pretrained", str(world.cache_file),
               "--set", f"runner.cache_dir={empty_cache}", cwd=tmp_path, config=world.config))
    data = results_of(tmp_path)
    assert data["pretrained"]["path"] == str(world.cache_file)
    assert not pretrained_files(empty_cache)  # nothing was pretrained
    assert data["pretrained"]["source_lm_loss"] == world.pretrained_loss
    (entry,) = data["results"]
    assert entry["target"] == by_strategy(world.base_json["results"])["feature_extractor"]["target"]


def test_pretrained_that_is_not_a_checkpoint_fails_with_one_line(world, tmp_path):
    bogus = tmp_path / "not-a-checkpoint.npz"
    bogus.write_text("these are not the weights you are looking for\n")
    proc = run_cli("--strategy", "feature_extractor", "--pretrained", str(bogus),
                   cwd=tmp_path, config=world.config)
    assert proc.returncode == 2  # the user's file: a user error
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and str(bogus) in errors[0], proc.stderr
    assert not (tmp_path / "results.json").exists()


def test_a_diverging_run_exits_2_naming_the_rate_knob_and_keeps_earlier_results(world, tmp_path):
    output = tmp_path / "results.json"
    shutil.copy(world.base_dir / "results.json", output)
    earlier = output.read_bytes()
    proc = run_cli("--strategy", "full_finetune", "--seeds", "0", "--output", str(output),
                   "--set", "strategies.lr.full_finetune=1e9", cwd=tmp_path, config=world.config)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and "RuntimeWarning" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1, proc.stderr
    assert errors[0].startswith("error: full_finetune seed 0: loss became")
    assert "strategies.lr.full_finetune = 1e+09" in errors[0]
    assert output.read_bytes() == earlier


INTERRUPT_AFTER_FIRST_CHECKPOINT = """\
import sys
sys.path.insert(0, {src!r})
from transferlab import checkpoint
import main

save = checkpoint.save_checkpoint

def save_then_interrupt(path, *args, **kwargs):  # Ctrl-C right after the first evaluation
    digest = save(path, *args, **kwargs)
    if (kwargs.get("extra") or {{}}).get("kind") == "finetune":
        raise KeyboardInterrupt
    return digest

checkpoint.save_checkpoint = save_then_interrupt
sys.exit(main.main(sys.argv[1:]))
"""


def _mark_first_evaluation(path):
    """Tag the history saved in a checkpoint, to see that a resumed run reads it."""
    with np.load(path, allow_pickle=False) as npz:
        entries = {key: npz[key] for key in npz.files}
    meta = json.loads(str(entries["__meta__"]))
    meta["extra"]["train"]["history"][0]["from_checkpoint"] = True
    entries["__meta__"] = np.array(json.dumps(meta))
    with open(path, "wb") as f:
        np.savez(f, **entries)


def test_interrupted_run_resumes_to_the_uninterrupted_numbers(world, tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    shutil.copy(world.cache_file, cache / world.cache_file.name)  # the pretrained model, cached
    script = tmp_path / "interrupt.py"
    script.write_text(INTERRUPT_AFTER_FIRST_CHECKPOINT.format(src=str(MAIN.parent)))
    env = {k: v for k, v in os.environ.items() if k not in ("RANDOM_SEED", "LOG_LEVEL")}
    common = ["--config", str(world.config), "--set", f"runner.cache_dir={cache}"]
    proc = subprocess.run(
        [sys.executable, str(script), "--strategy", "full_finetune", *common],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 130, proc.stderr
    saved = cache / "runs" / "full_finetune-topic-seed0.npz"
    assert saved.is_file(), sorted(map(str, cache.rglob("*")))
    # the console says how to continue: the same command plus --resume (the whole experiment)
    assert proc.stderr.splitlines()[-1].endswith(" ".join(["--strategy", "full_finetune", *common, "--resume"]))
    assert not (tmp_path / "results.json").exists()

    _mark_first_evaluation(saved)
    resumed = ok(subprocess.run(
        [sys.executable, str(MAIN), "--resume", str(saved), *common],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120))
    assert "full_finetune" in resumed.stdout
    (entry,) = results_of(tmp_path)["results"]
    reference = by_strategy(world.base_json["results"])["full_finetune"]
    assert entry["history"][0].pop("from_checkpoint") is True  # steps 1-3 came from the file
    assert entry["target"] == reference["target"]
    assert entry["history"] == reference["history"]
    assert entry["source"] == reference["source"]
    assert entry["trainable_params"] == reference["trainable_params"]


def test_a_finished_run_leaves_no_run_checkpoint(world):
    runs = world.cache / "runs"  # where each run kept its resumable checkpoint while training
    assert runs.is_dir() and list(runs.iterdir()) == []


# ------------------------------------------------------------------ bad input


@pytest.mark.parametrize("config, args, says", [
    (None, ["--strategy", "bogus_strategy"], "unknown strategy 'bogus_strategy'"),
    (None, ["--strategy", "scratch", "--bogus-flag"], "unrecognized arguments: --bogus-flag"),
    (None, ["--seeds", "-1"], "seed must be an integer >= 0"),
    (None, ["--set", "model.n_layers=2"], "unknown key 'model.n_layers' (did you mean 'n_layer'?)"),
    (None, ["--set", "finetune.lr=-1"], "finetune.lr must be > 0"),
    ("malformed.yaml", [], "malformed YAML at line 3"),
    ("missing.yaml", [], "config file not found"),
], ids=["strategy", "flag", "seed", "key", "value", "yaml", "no-config"])
def test_bad_input_exits_2_with_one_line_and_keeps_earlier_results(world, tmp_path, config, args, says):
    output = tmp_path / "results.json"
    shutil.copy(world.base_dir / "results.json", output)
    earlier = output.read_bytes()
    (tmp_path / "malformed.yaml").write_text("model:\n  n_layer: [1\n")
    config = world.config if config is None else tmp_path / config
    proc = run_cli(*args, "--output", str(output), cwd=tmp_path, config=config)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and says in errors[0], proc.stderr
    if config != world.config:
        assert str(config) in errors[0]  # the message names the file
    assert output.read_bytes() == earlier
    # nothing else was written: no temporary or partial files, no plot
    assert sorted(p.name for p in tmp_path.iterdir()) == ["malformed.yaml", "results.json"]
