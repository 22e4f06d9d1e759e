"""The runner as an experiment engine (issue 11), in-process on the tiny config of
test_runner.py: the journal, fingerprints, failing before work, strict JSON, stale
temporary files, loaded weights checked, the NaN message, a .env that is not UTF-8, the
--help examples and an executor from Dask. Real signals against a real process are in
test_engine_signals.py.
"""
import errno
import fnmatch
import json
import os
import re
import shlex

import numpy as np
import pytest

from transferlab import checkpoint as C
from transferlab import fileio
from transferlab import journal as J
from transferlab import runner as R
from transferlab import train as T
from transferlab.config import Config, ConfigError, replace_in
from test_runner import _interrupt_after_first_evaluation, fresh, pre, tiny  # noqa: F401 (fixture)
from test_cli import cli, config_file, isolated  # noqa: F401 (fixtures)

STRATEGIES = ["feature_extractor", "bitfit"]


def _without_timings(obj):
    """A results JSON without what may differ between equal runs: timings and file names."""
    if isinstance(obj, dict):
        return {k: _without_timings(v) for k, v in obj.items()
                if "seconds" not in k and k not in ("output", "plot")}
    if isinstance(obj, list):
        return [_without_timings(v) for v in obj]
    return obj


def _journal_dir(config):
    (one,) = (R.Path(config.runner.cache_dir) / "journal").glob("*/experiment.json")
    return one.parent


@pytest.fixture
def interrupted(pre, tmp_path, monkeypatch):
    """An experiment (two strategies x two seeds) Ctrl-C'ed in its second run, plus the
    uninterrupted reference JSON. Each test gets its own cache (a copy of the pretrained)."""
    config = fresh(pre, tmp_path, **{"runner.strategies": STRATEGIES, "runner.seeds": [0, 1]})
    config = replace_in(config, "runner.cache_dir", str(tmp_path / "cache"))
    (tmp_path / "cache").mkdir()
    cached = R.pretrained_cache_path(config)
    cached.write_bytes(pre[1].read_bytes())
    reference_config = replace_in(config, "runner.output", str(tmp_path / "reference.json"))
    assert R.run(replace_in(reference_config, "runner.plot", str(tmp_path / "reference.png"))) == 0
    reference = json.loads((tmp_path / "reference.json").read_text())

    calls = []
    save = C.save_checkpoint

    def second_run_interrupted(path, *args, **kwargs):
        digest = save(path, *args, **kwargs)
        if (kwargs.get("extra") or {}).get("kind") == "finetune":
            calls.append(path)
            if len({p for p in calls}) == 2:  # the first evaluation of the second run
                raise KeyboardInterrupt
        return digest

    with monkeypatch.context() as m:
        m.setattr(T.ckpt, "save_checkpoint", second_run_interrupted)
        with pytest.raises(KeyboardInterrupt):
            R.run(config)
    return config, reference


# ---------------------------------------------------------------------- the journal


def test_resume_continues_the_whole_experiment(interrupted, tmp_path, monkeypatch):
    """Before: the hint resumed one run and wrote a one-entry results.json. Now the finished
    run is read from the journal, the interrupted one continues from its checkpoint, and
    the JSON equals the uninterrupted one's (timings aside)."""
    config, reference = interrupted
    journal = _journal_dir(config)
    assert [p.name for p in sorted(journal.glob("run-*.json"))] == ["run-0000-feature_extractor-rel1-seed0.json"]
    checkpoint = R.run_checkpoint_path(config, "bitfit", 0)
    assert C.load_checkpoint(checkpoint).step == 3
    assert not (tmp_path / "out.json").exists()

    ran = []
    run_one = R.run_one
    monkeypatch.setattr(R, "run_one", lambda *a, **k: ran.append((a[1], a[2], k.get("resume"))) or run_one(*a, **k))
    assert R.run(config, resume=True) == 0
    assert ran[0] == ("bitfit", 0, str(checkpoint))  # continued from its checkpoint ...
    assert ("feature_extractor", 0, None) not in ran  # ... and the finished run not redone
    assert len(ran) == 3
    out = json.loads((tmp_path / "out.json").read_text())
    assert _without_timings(out) == _without_timings(reference)
    assert (tmp_path / "out.png").read_bytes() == (tmp_path / "reference.png").read_bytes()
    assert not checkpoint.exists()


def test_resume_with_nothing_to_resume_is_refused(pre, tmp_path):
    config = replace_in(fresh(pre, tmp_path), "runner.cache_dir", str(tmp_path / "empty-cache"))
    with pytest.raises(ConfigError, match="no experiment to continue in .*empty-cache.*runner.cache_dir"):
        R.run(config, resume=True)


# ---------------------------------------------------------------------- fingerprints


@pytest.mark.parametrize("key, value, shown", [
    ("seed", 1, "seed: 0 -> 1"),
    ("finetune.lr", 0.5, "finetune.lr: 0.0003 -> 0.5"),
    ("finetune.steps", 9, "finetune.steps: 6 -> 9"),
    ("finetune.eval_every", 2, "finetune.eval_every: 3 -> 2"),
    ("task.target", "binary", "task.target: 'topic' -> 'binary'"),
    ("runner.seeds", [0, 2], "runner.seeds: [0, 1] -> [0, 2]"),
])
def test_resume_under_another_config_is_refused_naming_the_keys(interrupted, key, value, shown):
    """Before: the old run continued and was labelled with the new settings."""
    config, _ = interrupted
    with pytest.raises(J.FingerprintError) as err:
        R.run(replace_in(config, key, value), resume=True)
    assert isinstance(err.value, ConfigError)  # main.py: exit 2
    assert shown in str(err.value)
    assert "runner.output" not in str(err.value)  # where files go is not a difference


def test_resume_path_under_another_config_is_refused(interrupted):
    config, _ = interrupted
    checkpoint = str(R.run_checkpoint_path(config, "bitfit", 0))
    with pytest.raises(J.FingerprintError, match=r"finetune\.lr: 0\.0003 -> 0\.5"):
        R.run(replace_in(config, "finetune.lr", 0.5), resume=checkpoint)
    assert "run_config" in C.load_checkpoint(checkpoint).extra  # recorded in every run checkpoint


def test_journal_entries_record_their_config(interrupted):
    config, _ = interrupted
    (entry,) = [json.loads(p.read_text()) for p in _journal_dir(config).glob("run-*.json")]
    assert entry["run_config"]["finetune"]["lr"] == config.finetune.lr
    assert entry["run_config"]["run"]["strategy"] == "feature_extractor"
    assert entry["fingerprint"] == R.config_hash(entry["run_config"])


def _other_shape_checkpoint(pre, tmp_path, **changes):
    (tmp_path / "other").mkdir()
    config = tiny(tmp_path / "other", **changes)
    model = R.GPT(R.backbone_config(config, R.task_spec(config)), seed=0)
    path = tmp_path / "other.npz"
    C.save_checkpoint(path, model, extra={"kind": "pretrained"})
    return path


def test_pretrained_of_another_shape_is_refused_before_training(pre, tmp_path):
    """Before: used without a check; the JSON then stated the wrong n_embd."""
    config = fresh(pre, tmp_path)
    other = _other_shape_checkpoint(pre, tmp_path, **{"model.n_embd": 8})
    with pytest.raises(J.FingerprintError, match=r"model\.n_embd: 8 -> 16"):
        R.ensure_pretrained(config, str(other), progress=False)
    # the same file at the cache path
    config = replace_in(config, "runner.cache_dir", str(tmp_path / "cache"))
    R.pretrained_cache_path(config).parent.mkdir(parents=True)
    R.pretrained_cache_path(config).write_bytes(other.read_bytes())
    with pytest.raises(J.FingerprintError, match=r"model\.n_embd: 8 -> 16"):
        R.run(config)


def test_cached_pretrained_made_under_other_pretraining_knobs_is_refused(pre, tmp_path):
    config = replace_in(fresh(pre, tmp_path), "runner.cache_dir", str(tmp_path / "cache"))
    theirs = replace_in(config, "pretrain.lr", 0.01)
    R.pretrained_cache_path(config).parent.mkdir(parents=True)
    R.pretrained_cache_path(config).write_bytes(pre[1].read_bytes())  # made with pretrain.lr 3e-3
    C_path = R.pretrained_cache_path(config)
    ckpt = C.load_checkpoint(C_path)
    extra = dict(ckpt.extra, pretrain_config=R.pretrain_config(theirs))
    C.save_checkpoint(C_path, C.model_from_checkpoint(ckpt), extra=extra)
    with pytest.raises(J.FingerprintError, match=r"pretrain\.lr: 0\.01 -> 0\.003"):
        R.ensure_pretrained(config, None, progress=False)


@pytest.mark.parametrize("make_bad, says", [
    (lambda a: a.astype(np.int32), "has dtype int32, not a floating-point weight"),
    (lambda a: np.where(np.arange(a.size).reshape(a.shape) == 0, np.nan, a).astype(a.dtype),
     "holds NaN or inf"),
])
def test_weights_that_cannot_be_trained_are_refused_at_load(pre, tmp_path, make_bad, says):
    """Before: integer weights were accepted and NaN weights reported as a learning-rate
    problem during training."""
    with np.load(pre[1], allow_pickle=False) as npz:
        entries = {k: npz[k] for k in npz.files}
    entries["param/h.0.mlp.c_fc.weight"] = make_bad(entries["param/h.0.mlp.c_fc.weight"])
    bad = tmp_path / "bad.npz"
    with open(bad, "wb") as f:
        np.savez(f, **entries)
    with pytest.raises(C.CheckpointError, match=f"{bad}: tensor h.0.mlp.c_fc.weight {says}"):
        C.model_from_checkpoint(bad)


# ---------------------------------------------------------------------- fail before work


@pytest.mark.parametrize("flag, value, says", [
    ("--output", "", "argument --output: must name a file (runner.output), got ''"),
    ("--output", "{tmp}", "is a directory, not a file (runner.output)"),
    ("--output", "/proc/results.json", "runner.output (--output): cannot write /proc/results.json"),
    ("--output", "{tmp}/a-file/results.json", "runner.output (--output): cannot write"),
    ("--set", "runner.plot=/proc/x.png", "runner.plot: cannot write /proc/x.png"),
    ("--set", "runner.cache_dir={tmp}/a-file", "runner.cache_dir: cannot write"),
])
def test_a_path_that_cannot_be_written_is_refused_before_any_training(
        capsys, tmp_path, config_file, flag, value, says):
    """Before: found only after all the training; `--output ''` silently used results.json."""
    (tmp_path / "a-file").write_text("a file, not a folder\n")
    value = value.format(tmp=tmp_path)
    cache = tmp_path / "cache"
    args = ["--config", str(config_file), "--set", f"runner.cache_dir={cache}", flag, value]
    assert cli.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err[-1:]) == 1 and says in err[-1], err
    assert not list(cache.glob("pretrained-*.npz"))  # nothing was trained
    assert not (tmp_path / "results.json").exists()


def test_a_failed_results_write_names_path_and_knob_and_resume_rebuilds_it(pre, tmp_path, monkeypatch):
    """Before: a disk-full error named no path. The runs are in the journal, so --resume
    writes the results without training again."""
    config = fresh(pre, tmp_path, **{"runner.strategies": ["feature_extractor"]})

    dump = json.dump

    def disk_full(obj, f, **kwargs):  # the results file only: the journal is written fine
        if os.path.basename(f.name).startswith("out.json"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return dump(obj, f, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(fileio.json, "dump", disk_full)
        with pytest.raises(fileio.OutputError) as err:
            R.run(config)
    assert str(err.value) == (f"runner.output (--output): cannot write {tmp_path / 'out.json'}: "
                              f"No space left on device")
    monkeypatch.setattr(R, "run_one", lambda *a, **k: pytest.fail("trained again"))
    assert R.run(config, resume=True) == 0
    assert json.loads((tmp_path / "out.json").read_text())["results"][0]["strategy"] == "feature_extractor"


def test_stale_temporaries_of_dead_writers_are_removed_at_start(pre, tmp_path):
    """Before: killed saves left *.tmp files (up to 127 MiB) behind for ever."""
    config = fresh(pre, tmp_path)
    dead = 2 ** 22 + 12345  # above any pid_max default: no such process
    runs = R.Path(config.runner.cache_dir) / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    stale = [tmp_path / f"out.json.{dead}.0123abcd.tmp", runs / f"bitfit-topic-seed0.npz.{dead}.89abcdef.tmp"]
    live = tmp_path / f"out.json.{os.getppid()}.0123abcd.tmp"  # a live process's write
    foreign = tmp_path / "notes.tmp"  # not named by us
    for path in stale + [live, foreign]:
        path.write_bytes(b"partial")
    R.preflight(config)
    assert [p.exists() for p in stale] == [False, False]
    assert live.exists() and foreign.exists()


def test_json_never_holds_a_bare_nan(tmp_path):
    """Before: a degenerate split (one class only: AUC undefined) wrote NaN into the JSON."""
    path = tmp_path / "r.json"
    fileio.write_json_atomic(path, {"target": {"accuracy": 0.5, "auc": float("nan")},
                                    "per_seed": [1.0, float("inf")]})

    def refuse(name):
        raise AssertionError(f"bare {name} in the JSON")

    data = json.loads(path.read_text(), parse_constant=refuse)
    assert data["target"]["auc"] is None and data["per_seed"] == [1.0, None]
    assert data["target"]["auc_null_reason"].startswith("nan is not a number")
    assert data["target"]["accuracy"] == 0.5


def test_journal_keeps_a_nan_exactly(tmp_path):
    journal = J.Journal(tmp_path, "ab" * 32)
    journal.start({"x": 1}, ["--resume"])
    journal.record("run-0000-x-rel1-seed0.json", "f", {"target": {"auc": float("nan")}}, {})
    assert "NaN" not in (journal.dir / "run-0000-x-rel1-seed0.json").read_text()
    (record,) = journal.finished().values()
    assert np.isnan(record["entry"]["target"]["auc"])


# ---------------------------------------------------------------------- messages


class _NaNAt:
    """Wrap a model so that its loss is NaN from step `at` on."""

    def __init__(self, model, at):
        self.model, self.at, self.calls = model, at, 0

    def __getattr__(self, name):
        return getattr(self.model, name)

    def __call__(self, *args, **kwargs):
        self.calls += 1
        logits, loss = self.model(*args, **kwargs)
        return logits, (float("nan") if self.calls > self.at else loss)


@pytest.mark.parametrize("nan_after, written", [(1, False), (4, True)])
def test_the_nan_message_names_a_checkpoint_only_if_one_exists(pre, tmp_path, nan_after, written):
    """Before: the message named the checkpoint path even when nothing had been saved."""
    config, path, _ = pre
    config = replace_in(config, "finetune.pooling", "mean")  # the splits below carry no CLS token
    from transferlab import strategies as S
    from transferlab.tasks import make_target
    spec = R.task_spec(config)
    target = make_target("topic", spec, seed=0)
    model = R.target_model(config, R.experiment_data(config), target.n_classes, path, 0)
    data = T.Data("topic", target.train, target.val, target.test)
    plan = S.build_plan("full_finetune", config.finetune.steps, config.model.n_layer, config.strategies)
    checkpoint = tmp_path / "run.npz"
    with pytest.raises(T.TrainingError) as err:
        T.train(_NaNAt(model, nan_after), data, plan, config.finetune, checkpoint=str(checkpoint))
    message = str(err.value)
    if written:
        assert checkpoint.is_file() and f"kept at {checkpoint}" in message
    else:
        assert not checkpoint.exists() and "no checkpoint was written" in message
        assert str(checkpoint) not in message


def test_an_env_file_that_is_not_utf8_is_one_line_exit_2(capsys, tmp_path, config_file):
    """Before: a traceback and exit 1."""
    (config_file.parent / ".env").write_bytes(b"RANDOM_SEED=1\nLOG_LEVEL=\xff\xfe\n")
    assert cli.main(["--config", str(config_file)]) == 2
    err = capsys.readouterr().err
    assert err == (f"error: {config_file.parent / '.env'}: not UTF-8 text (byte 0xff at offset 24); "
                   f"save the .env file as UTF-8\n")


def test_help_examples_name_paths_a_default_run_makes(capsys):
    """Before: --help named cache/pretrained.npz, which no run ever writes."""
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["--help"])
    text = capsys.readouterr().out
    examples = [shlex.split(line.strip()) for line in text.splitlines()
                if line.strip().startswith("python src/main.py")]
    assert examples
    made = str(R.pretrained_cache_path(Config()))  # what a default run caches, from the repo root
    for words in examples:
        args = words[2:]
        if "--pretrained" in args:  # a shell glob: it must match the file a default run caches
            at = args.index("--pretrained")
            assert fnmatch.fnmatch(made, args[at + 1]), (args[at + 1], made)
            del args[at:at + 2]
        if args[:1] == ["generate"]:  # the subcommand has its own parser
            from transferlab.generate_cli import build_parser as generate_parser
            generate_parser().parse_args(args[1:])
            continue
        cli.build_parser().parse_args(args)  # every other example parses as it is


# ---------------------------------------------------------------------- any executor


@pytest.mark.slow  # starts a Dask cluster (about 2 s)
def test_runs_on_a_dask_executor_equal_the_serial_runs(pre, tmp_path):
    distributed = pytest.importorskip("distributed")
    config = fresh(pre, tmp_path, **{"runner.strategies": STRATEGIES})
    assert R.run(config) == 0
    serial = json.loads((tmp_path / "out.json").read_text())
    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=False,
                                  dashboard_address=None) as cluster, distributed.Client(cluster) as client:
        out = replace_in(config, "runner.output", str(tmp_path / "dask.json"))
        assert R.run(out, executor=client.get_executor()) == 0
    on_dask = json.loads((tmp_path / "dask.json").read_text())
    assert [e["strategy"] for e in on_dask["results"]] == STRATEGIES
    for a, b in zip(serial["results"], on_dask["results"]):
        assert _without_timings(a) == _without_timings(b)
