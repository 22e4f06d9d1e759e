"""The experiment: pretrain once, adapt with each strategy for each seed, compare.

    config -> tasks -> pretrain (LM head on the source task, cached on disk by config hash)
           -> for each seed and strategy: load, switch head, apply the plan, train on the target
           -> metrics (target test split; source LM loss of the adapted backbone) -> results

`run(config)` writes the results JSON (atomically, fileio.py), prints a comparison table
(mean +- std over seeds) and saves a plot (both from report.py). `--sweep relatedness`
repeats the comparison for each value of task.relatedness. The data is the synthetic
tasks or your own files (`--data`, `--source`, `--model`): experiment_data.py answers the
runner's questions about either. See docs/README.md, docs/results.md, docs/own_data.md.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time
from pathlib import Path

import numpy as np

from . import checkpoint as C
from . import hf
from . import journal as J
from . import lora
from . import masks as M
from . import strategies as S
from .config import ConfigError, config_hash, finetune_for, lr_knob, own_rate, replace_in
from .fileio import OutputError, check_writable, remove_stale_temporaries, write_json_atomic
from .model import GPT, GPTConfig
from .experiment_data import experiment_data, task_spec  # noqa: F401 (runner.task_spec in the docs)
from .report import Overall, Progress, plot, summarize, summarize_references, table
from .tasks import append_cls, task_kind
from .train import Data, TrainingError, evaluate, lm_split, train

log = logging.getLogger("transferlab")


# ---------------------------------------------------------------------- building blocks


def pretrain_config(config) -> dict:
    """Everything pretraining depends on: the seed, the model and pretraining knobs, and the
    source (the synthetic task's knobs, or the source text's SHA-256); never the target."""
    d = config.to_dict()
    return {"seed": config.seed, "model": d["model"], **experiment_data(config).pretrain_identity(),
            "pretrain": d["pretrain"]}


def pretrain_key(config) -> str:
    """The pretrained-model cache key: config_hash of pretrain_config."""
    return config_hash(pretrain_config(config))


def backbone_config(config, data) -> GPTConfig:
    """The LM our runner pretrains: the `model` section is GPTConfig's backbone knobs
    (config.ModelConfig is made from them); the data (a tasks.TaskSpec or an
    experiment_data object) sets the vocabulary and PAD."""
    return GPTConfig(**dataclasses.asdict(config.model), vocab_size=data.vocab_size,
                     head="lm", pad_id=data.pad_id)


@contextlib.contextmanager
def rate_named(what: str, knob: str, lr: float):
    """A loss that became NaN or infinite (train.TrainingError) says which run it was and
    which knob set that run's learning rate, the usual cause and the one to change."""
    try:
        yield
    except TrainingError as err:
        raise TrainingError(f"{what}: {err}; its learning rate is {knob} = {lr:g}, "
                            f"try a lower one") from None


def sound_cache_file(path: Path, then: str) -> C.Checkpoint | None:
    """Our own checkpoint cached at `path`, or None when there is none or it is truncated
    or corrupt (a warning says so and what happens `then`): a cache holds only what a run
    can make again, so a bad file is remade, not an error."""
    if not path.exists():
        return None
    try:
        return C.load_checkpoint(path)
    except C.CheckpointError as err:
        log.warning("%s; %s", err, then)
        return None


def pretrain_checkpoint_path(config) -> Path:
    """Where pretraining keeps its resumable checkpoint while it runs (one per cache key):
    <cache_dir>/runs/pretrain-<first 16 hex of pretrain_key>.npz"""
    return Path(config.runner.cache_dir) / "runs" / f"pretrain-{pretrain_key(config)[:16]}.npz"


def pretrain(config, data, path: Path, progress: bool) -> dict:
    """Train the LM head on the source (data.source()) and save the checkpoint at `path`.

    Like a fine-tuning run it writes a resumable checkpoint at every evaluation
    (pretrain_checkpoint_path); an interrupted pretraining goes on from there the next
    time the same knobs ask for it, with the numbers of one that never stopped."""
    p = config.pretrain
    source = data.source()
    model = GPT(backbone_config(config, data), seed=config.seed)
    data = Data("lm", lm_split(source.train), lm_split(source.val))
    plan = S.Plan("pretrain", pretrained=False, phases=(S.Phase(0, "all"),))
    bar = Progress("pretrain (source LM)", p.steps, progress)
    running = pretrain_checkpoint_path(config)
    running.parent.mkdir(parents=True, exist_ok=True)
    # read here to know it is sound; train reads it again to resume (once, a small file)
    resume = str(running) if sound_cache_file(running, "pretraining from the start") else None
    if resume:
        log.info("pretraining goes on from its checkpoint %s", running)
    try:
        with rate_named("pretraining", "pretrain.lr", p.lr):
            result = train(model, data, plan, p, seed=config.seed, progress=bar,
                           checkpoint=str(running), resume=resume,
                           extra={"kind": "pretraining", "key": pretrain_key(config)})
    finally:
        bar.close()
    log.info("pretrained in %.1fs: source val loss %.4f (best at step %d)",
             result.seconds, result.best["loss"], result.best_step)
    C.save_checkpoint(path, model, step=result.steps_run,
                      extra={"kind": "pretrained", "history": result.history, "key": pretrain_key(config),
                             "pretrain_config": pretrain_config(config)})
    running.unlink(missing_ok=True)  # the cached model is the result; nothing to resume
    return {"seconds": result.seconds, "history": result.history}


def target_model(config, data, n_classes: int, pretrained, seed: int, start=None,
                 random_init: bool = False):
    """A model for the target task: the pretrained backbone with a new head, or (random_init)
    a randomly initialised one of the same architecture.

    `data`: the experiment_data object (kind, vocab_size, cls_id).
    `pretrained`: the pretrained Checkpoint (or its path); may be None with random_init.
    `start`: an LM to start from instead of the pretrained one (ULMFiT's fine-tuned LM).
    """
    f = config.finetune
    head, output = task_kind(data.kind).head, task_kind(data.kind).output
    changes = dict(n_classes=n_classes, sequence_output=output, pooling=f.pooling,
                   causal=f.attention == "causal", label_smoothing=f.label_smoothing,
                   head_hidden=f.head_hidden, dropout=config.model.dropout)
    cls_id = data.cls_id if (head == "sequence" and f.pooling == "cls") else None
    new_row = cls_id is not None and cls_id >= data.vocab_size  # else CLS is in the vocabulary
    if random_init:  # the pretrained model's architecture (ours without one)
        base = (GPTConfig(**C.as_checkpoint(pretrained).config) if pretrained is not None
                else backbone_config(config, data))
        cfg = dataclasses.replace(base, vocab_size=base.vocab_size + new_row, head=head,
                                  cls_id=cls_id, **changes)
        return GPT(cfg, seed=seed)
    model = start if start is not None else C.model_from_checkpoint(pretrained, seed=seed)
    model.masks.clear()
    if new_row:
        model.resize_vocab(data.vocab_size + 1)  # a new CLS row; the old rows are kept
    elif cls_id is not None:  # a CLS id the vocabulary reserved (ByteVocab's 257): never an
        # input in pretraining, but the tied LM head trained its row as an output, pushed
        # away from every hidden state; it starts fresh, as a new row would
        wte = model.params["wte.weight"]
        wte[cls_id] = model.init_rng.standard_normal(wte.shape[1]) * model.config.init_std
    model.set_head(head, cls_id=cls_id, **changes)  # breaks the wte tie
    return model


def source_lm_loss(model, pretrained, source_val) -> float:
    """LM loss on the source task of the adapted backbone under the pretrained LM head.

    The adapted backbone (its wte included, as the input embedding) is kept; the output
    projection is the pretrained wte, so any change in the loss is the backbone's doing.
    LoRA adapters are merged into the weights they adapt (the function they compute).
    `pretrained` is the pretrained Checkpoint, or its path.
    """
    ckpt = C.as_checkpoint(pretrained)
    cfg = GPTConfig(**{**ckpt.config, "tie_weights": False})
    lm = GPT(cfg)
    V = cfg.vocab_size
    for name, value in model.params.items():
        if name in lm.params:
            lm.params[name][...] = value[:V] if name == "wte.weight" else value
    lm.params["lm_head.weight"][...] = ckpt.params["wte.weight"]
    adapters = {name: value for name, value in model.params.items() if M.is_adapter(name)}
    if adapters:
        lora.merge(lm.params, adapters, model.config.lora_scale)
    return evaluate(lm, "lm", lm_split(source_val))["loss"]


def lm_stage(config, plan, data, target, pretrained, seed):
    """ULMFiT's second stage: the pretrained LM fine-tuned on the target task's own text
    (the inputs of its training and validation splits, no labels) before the classifier.
    Returns the fine-tuned LM (the runner then switches its head)."""
    model = C.model_from_checkpoint(pretrained, seed=seed)
    text = Data("lm", lm_split(target.train.x, data.pad_id), lm_split(target.val.x, data.pad_id))
    # the strategy's own rate (strategies.lr.<name>) for both stages: what --sweep lr measured
    s = dataclasses.replace(finetune_for(config, plan.name), steps=plan.lm_stage_steps, patience=0,
                            eval_every=min(config.finetune.eval_every, plan.lm_stage_steps))
    lm_plan = S.Plan("ulmfit_lm", pretrained=True, phases=(S.Phase(0, "all"),))
    with rate_named(f"{plan.name} seed {seed}, LM stage", lr_knob(config, plan.name), s.lr):
        train(model, text, lm_plan, s, seed=seed)
    return model


def run_one(config, strategy: str, seed: int, pretrained, source_val, progress: bool,
            resume: str | None = None, checkpoint: str | None = None, overall=None,
            fingerprint: dict | None = None) -> dict:
    """One strategy, one seed: one entry of the results JSON's `results` list (docs/API.md, Runner).

    pretrained: the pretrained Checkpoint, or its path (our .npz or a Hugging Face folder);
    overall: the experiment's report.Overall (run k of N); fingerprint: the run's
    journal.run_config, recorded in its checkpoint so a resume can be checked against it."""
    if not isinstance(pretrained, C.Checkpoint):  # a path: read once for the whole run
        pretrained = load_pretrained(pretrained)
    world = experiment_data(config)
    kind = world.kind
    target = world.target(seed)
    n_layer = pretrained.config["n_layer"]  # GPT-2's 12 with --model
    plan = S.build_plan(strategy, config.finetune.steps, n_layer, config.strategies)
    start = lm_stage(config, plan, world, target, pretrained, seed) if plan.lm_stage_steps else None
    model = target_model(config, world, target.n_classes, pretrained, seed, start,
                         random_init=not plan.pretrained)
    if plan.lora:  # adapters first, so a resumed run finds the parameters it saved
        lora.attach(model, seed=seed, **plan.lora)
    splits = [target.train, target.val, target.test]
    if model.config.cls_id is not None:
        splits = [append_cls(s, model.config.cls_id) for s in splits]
    data = Data(kind, *splits)
    bar = Progress(f"{strategy} (seed {seed})", config.finetune.steps, progress, overall=overall)
    extra = {"kind": "finetune", "strategy": strategy, "seed": seed, "task": kind,
             "relatedness": world.relatedness}
    if fingerprint is not None:
        extra["run_config"] = fingerprint
    settings = finetune_for(config, strategy)
    try:
        with rate_named(f"{strategy} seed {seed}", lr_knob(config, strategy), settings.lr):
            result = train(model, data, plan, settings, seed=seed, progress=bar,
                           checkpoint=checkpoint, resume=resume, extra=extra)
    finally:
        bar.close()
    if overall is not None:
        overall.finished(f"{strategy} (seed {seed})", result.steps_run, bar.step, result.stopped)
    test = evaluate(model, kind, data.test, cache=result.cache, cache_name="test")
    entry = {
        "strategy": strategy, "task": kind, "seed": seed,
        "relatedness": world.relatedness, "lr": settings.lr,
        "trainable_params": result.trainable_params,
        "trainable_params_by_phase": result.trainable_by_phase,
        "total_params": int(sum(p.size for p in model.params.values())),
        "seconds": round(result.seconds, 3),
        "steps": result.steps_run, "best_step": result.best_step, "stopped": result.stopped,
        "target": test,
        "source": {"lm_loss": source_lm_loss(model, pretrained, source_val)},
        "history": result.history,
    }
    log.info("%s seed %d: %s %.4f, source lm_loss %.4f, %d/%d trainable, %.1fs", strategy, seed,
             task_kind(kind).metric, test[task_kind(kind).metric], entry["source"]["lm_loss"],
             entry["trainable_params"], entry["total_params"], entry["seconds"])
    return entry


# ---------------------------------------------------------------------- entry point


def reference_entries(configs) -> list[dict]:
    """What a result is judged against, on the test split of every (sweep point, seed) the
    strategies ran on: chance, the count baseline and (synthetic tasks) the Bayes ceiling
    (baselines.py, data.file_baselines)."""
    return [e for cfg in configs for e in experiment_data(cfg).references(cfg.runner.seeds)]


SHAPE_KEYS = ("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "dtype")


def check_pretrained(ckpt, config, given: bool) -> None:
    """Refuse (exit 2, the differing keys listed) a pretrained checkpoint made under another
    model shape, source task or seed, or a cached one made under other pretraining knobs."""
    want = backbone_config(config, experiment_data(config)).to_dict()
    what = f"pretrained checkpoint {ckpt.path}"
    J.refuse(what, {"model": {k: ckpt.config.get(k) for k in SHAPE_KEYS}},
             {"model": {k: want[k] for k in SHAPE_KEYS}},
             " (model.vocab_size follows task.n_tokens, or the vocabulary of your data)")
    saved = (ckpt.extra or {}).get("pretrain_config")
    if saved is None:  # not ours, or from before fingerprints: the shape check is all we have
        return
    ours = pretrain_config(config)
    if given:  # a checkpoint given on purpose replaces pretraining: only the source counts
        saved = {k: v for k, v in saved.items() if k in ("seed", "task", "source")}
        ours = {k: v for k, v in ours.items() if k in ("seed", "task", "source")}
    J.refuse(what, saved, ours, "" if given else "; delete it to pretrain again")


def check_fits(ckpt, data, config) -> None:
    """Refuse (exit 2) a pretrained model whose vocabulary is not the data's, or whose
    context is shorter than the examples (data.max_len, with a Hugging Face folder)."""
    V, T = ckpt.config["vocab_size"], ckpt.config["block_size"]
    if V != data.vocab_size:
        raise ConfigError(f"{ckpt.path}: the model has {V} token embeddings, the vocabulary of the data "
                          f"has {data.vocab_size} tokens (a GPT-2 folder's vocab.json must match its weights)")
    if config.data.labelled and config.data.max_len > T:
        raise ConfigError(f"data.max_len must be <= {T}, the context of {ckpt.path}, got {config.data.max_len}")


def pretrained_cache_path(config) -> Path:
    """<cache_dir>/pretrained-<first 16 hex of pretrain_key>.npz"""
    return Path(config.runner.cache_dir) / f"pretrained-{pretrain_key(config)[:16]}.npz"


def pretrained_id(config, pretrained: str | None) -> str:
    """What the experiment's pretrained model is: a file's SHA-256 (a Hugging Face folder's
    weights file), or the cache key."""
    if config.data.model:
        return f"hf:{C.file_sha256(hf.weights_path(config.data.model))}"
    return f"file:{C.file_sha256(pretrained)}" if pretrained else f"cache:{pretrain_key(config)}"


def load_pretrained(path) -> C.Checkpoint:
    """The pretrained model as a Checkpoint: our .npz file, or a Hugging Face GPT-2 folder."""
    return hf.load_hf_checkpoint(path) if Path(path).is_dir() else C.load_checkpoint(path)


def ensure_pretrained(config, pretrained: str | None, progress: bool):
    """The pretrained checkpoint: a Hugging Face folder (data.model), the one given, the
    cached one, or a new one; a loaded one is checked against the config first
    (check_pretrained)."""
    if config.data.model:
        if pretrained:
            raise ConfigError("--pretrained and --model (data.model) both name the pretrained model; give one")
        return Path(config.data.model), {"path": config.data.model, "cached": True, "hugging_face": True}
    if pretrained:
        check_pretrained(C.load_checkpoint(pretrained), config, given=True)
        return Path(pretrained), {"path": str(pretrained), "cached": True}
    path = pretrained_cache_path(config)
    cached = sound_cache_file(path, "pretraining again")
    if cached is not None:
        check_pretrained(cached, config, given=False)
        log.info("using the cached pretrained model %s", path)
        return path, {"path": str(path), "cached": True}
    log.info("pretraining the source LM (cached afterwards at %s)", path)
    path.parent.mkdir(parents=True, exist_ok=True)
    info = pretrain(config, experiment_data(config), path, progress)
    return path, {"path": str(path), "cached": False, **info}


# what --sweep can vary: the config key each point sets, and the runner knob listing the points
SWEEPS = {"relatedness": ("task.relatedness", "sweep_values"), "lr": ("finetune.lr", "lr_values")}


def sweep_points(config, sweep) -> list:
    """(value, config) for each point of the sweep; [(None, config)] without one. In an lr
    sweep every strategy runs at the point's rate (strategies.lr is set aside)."""
    if sweep is None:
        return [(None, config)]
    if sweep == "relatedness" and config.data.labelled:
        raise ConfigError("--sweep relatedness varies the synthetic tasks; with --data (data.labelled) "
                          "sweep lr or nothing")
    key, values = SWEEPS[sweep]
    points = []
    for value in getattr(config.runner, values):
        cfg = replace_in(config, key, float(value))
        if sweep == "lr":
            cfg = replace_in(cfg, "strategies.lr", {name: 0.0 for name in S.STRATEGIES})
        points.append((float(value), cfg))
    return points


def choose_rates(entries: list[dict], kind: str) -> dict:
    """Each strategy's rate in an lr sweep: the best mean over seeds of its best VALIDATION
    metric (the history's evaluations; never the test split). Ties go to the smaller rate."""
    goal = task_kind(kind)
    scores: dict = {}
    for e in entries:
        values = [h[goal.metric] for h in e["history"]]
        best = max(values) if goal.goal == "max" else -min(values)
        scores.setdefault(e["strategy"], {}).setdefault(e["lr"], []).append(best)
    return {s: max(sorted(by_lr), key=lambda lr: np.mean(by_lr[lr])) for s, by_lr in scores.items()}


def run_checkpoint_path(config, strategy: str, seed: int, sweep=None) -> Path:
    """Where run() keeps the resumable checkpoint of one fine-tuning run while it trains:
    <cache_dir>/runs/<strategy>-<task>-seed<k>.npz (with -rel<r> or -lr<rate> in a sweep)."""
    rel = {"relatedness": f"-rel{config.task.relatedness:g}",
           "lr": f"-lr{config.finetune.lr:g}"}.get(sweep, "")
    kind = experiment_data(config).kind
    path = Path(config.runner.cache_dir) / "runs" / f"{strategy}-{kind}{rel}-seed{seed}.npz"
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


OUTPUT_KNOBS = {"output": "runner.output (--output)", "plot": "runner.plot",
                "cache_dir": "runner.cache_dir"}


def plot_path(config) -> Path:
    """Where the plot goes: runner.plot, or when that is empty runner.output's path with
    .png (results.json -> results.png), so each --output keeps its own plot."""
    r = config.runner
    return Path(r.plot) if r.plot else Path(r.output).with_suffix(".png")


def preflight(config) -> None:
    """Fail before work: every path the experiment will write is checked now (exit 2,
    naming the path and its knob), and temporary files that killed writers left behind
    are removed (fileio.remove_stale_temporaries: only ours, only of dead processes)."""
    r = config.runner
    if plot_path(config) == Path(r.output):
        raise ConfigError(f"runner.output {r.output} and the plot would be the same file: "
                          "set runner.plot")
    try:
        check_writable(r.output, OUTPUT_KNOBS["output"])
        check_writable(plot_path(config), OUTPUT_KNOBS["plot"])
        check_writable(r.cache_dir, OUTPUT_KNOBS["cache_dir"], directory=True)
    except OutputError as err:
        raise ConfigError(str(err)) from None
    cache = Path(r.cache_dir)
    folders = {Path(r.output).parent, plot_path(config).parent, cache, cache / "runs",
               *(cache / "journal").glob("*")}
    for folder in folders:
        for path in remove_stale_temporaries(folder):
            log.info("removed %s, left by a write that was killed", path)


@dataclasses.dataclass
class RunTask:
    """One cell of the grid (strategy x seed x relatedness), in the serial order."""

    index: int
    config: object
    strategy: str
    seed: int
    checkpoint: str
    name: str  # its journal file
    fingerprint: dict  # journal.run_config
    resume: str | None = None


_PRETRAINED: dict = {}  # per worker process: path -> the pretrained Checkpoint, read once


def _run_task(task: RunTask, pretrained_path: str, source_val) -> dict:
    """One run in a worker (any concurrent.futures executor): reads the pretrained model
    itself (once per process) rather than receiving its arrays with every task."""
    pretrained = _PRETRAINED.get(pretrained_path)
    if pretrained is None:
        pretrained = _PRETRAINED.setdefault(pretrained_path, load_pretrained(pretrained_path))
    return run_one(task.config, task.strategy, task.seed, pretrained, source_val, False,
                   resume=task.resume, checkpoint=task.checkpoint, fingerprint=task.fingerprint)


class _OneBlasThread:
    """A process pool whose workers start with one BLAS/OpenMP thread each: the variables
    are set in this process while the workers are spawned (they inherit them before NumPy
    loads) and restored afterwards."""

    VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")

    def __init__(self, jobs: int):
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        self.saved = {v: os.environ.get(v) for v in self.VARS}
        os.environ.update({v: "1" for v in self.VARS})
        self.pool = ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"))

    def restore_env(self):
        for name, value in self.saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value

    def stop(self, now: bool) -> None:
        if now:  # interrupted: no worker may go on training (a SIGTERM reaches only us)
            # no public way to stop the workers before Python 3.14 (terminate_workers)
            workers = list((getattr(self.pool, "_processes", None) or {}).values())
            self.pool.shutdown(wait=False, cancel_futures=True)
            for process in workers:
                process.terminate()
            for process in workers:
                process.join(timeout=10)
        self.pool.shutdown(wait=True, cancel_futures=True)
        self.restore_env()


def warn_unused_finetune_lr(config) -> bool:
    """finetune.lr set away from its default while every strategy of the run has its own
    rate in strategies.lr, so that nothing uses it: say so once (True if it did)."""
    own = {name: own_rate(config, name) for name in config.runner.strategies}
    if config.finetune.lr == type(config.finetune)().lr or not all(own.values()):
        return False
    rates = ", ".join(f"strategies.lr.{name} = {lr:g}" for name, lr in own.items())
    log.warning("finetune.lr = %g is not used: every strategy of this run has its own rate (%s); "
                "set those, or 0 there to use finetune.lr", config.finetune.lr, rates)
    return True


def run(config, pretrained=None, resume=None, sweep=None, progress=None, executor=None,
        argv=None) -> int:
    """Run what the config asks for; write JSON and plot; print the table. Returns 0.

    resume: True continues the experiment this same config started (its journal,
    journal.py); a path continues one run from that checkpoint (prints its entry).
    executor: any concurrent.futures.Executor to run the independent runs on (a Dask
    Client's get_executor(), ...); otherwise runner.jobs worker processes, or this process
    when it is 1. Results equal the serial run's, in the serial order.
    argv: the command line, kept in the journal (what `--resume` continues).
    """
    progress = config.runner.progress if progress is None else progress
    t0 = time.perf_counter()
    preflight(config)
    if resume and resume is not True:
        return _resume(config, resume, pretrained, progress)
    points = sweep_points(config, sweep)
    if sweep != "lr":  # the lr sweep sets every strategy's rate from finetune.lr
        warn_unused_finetune_lr(config)
    world = experiment_data(config)  # files are read and checked here, before any work
    pre_id = pretrained_id(config, pretrained)
    fingerprint = {"config": J.result_config(config), "sweep": sweep, "pretrained": pre_id}
    if world.identity() is not None:  # file data: the files' contents
        fingerprint["data"] = world.identity()
    journal = J.Journal(Path(config.runner.cache_dir) / "journal", config_hash(fingerprint))
    if resume:
        header = _journal_to_resume(journal, fingerprint)
    else:
        journal.start(fingerprint, argv)
        header = {}
    path, pre_info = ensure_pretrained(config, pretrained, progress)
    pretrained = load_pretrained(path)  # read once; every run starts from this copy
    check_fits(pretrained, world, config)
    source_val = world.source().val
    if header.get("pretrained"):  # as the interrupted experiment first found it
        pre_info = header["pretrained"]
    else:
        pre_info["source_lm_loss"] = source_lm_loss(C.model_from_checkpoint(pretrained), pretrained, source_val)
        pre_info["optimal_lm_loss"] = world.optimal_lm_loss()
        journal.write_header(fingerprint, argv, pre_info)

    tasks = _grid(points, sweep, pre_id, world)
    done = journal.finished() if resume else {}
    overall = Overall(len(tasks), config.finetune.steps, progress)
    entries, pending = {}, []
    for task in tasks:
        record = done.get(task.name)
        if record is not None:
            J.refuse(f"journal entry {journal.dir / task.name}",
                     record["run_config"], task.fingerprint)
            entries[task.index] = record["entry"]
            overall.begin(task.name)
            overall.finished(f"{task.strategy} (seed {task.seed})", record["entry"]["steps"], 0,
                             "read back from the journal", trained=False)
            continue
        if resume and Path(task.checkpoint).is_file():
            saved = C.load_checkpoint(task.checkpoint)
            J.refuse(f"run checkpoint {task.checkpoint}", (saved.extra or {}).get("run_config", {}),
                     task.fingerprint, "; delete it to redo that run from the start")
            task.resume = task.checkpoint
        pending.append(task)

    def finished(task, entry):
        journal.record(task.name, config_hash(task.fingerprint), entry, task.fingerprint)
        entries[task.index] = entry
        Path(task.checkpoint).unlink(missing_ok=True)  # the journal holds the run now

    jobs = config.runner.jobs
    if jobs > 1 and config.finetune.batch_processes > 1 and len(pending) > 1:
        log.warning("runner.jobs %d with finetune.batch_processes %d: each job starts its own "
                    "worker processes, %d busy processes on %d cores "
                    "(docs/performance.md#batch-parts-in-processes)",
                    jobs, config.finetune.batch_processes,
                    jobs * config.finetune.batch_processes, os.cpu_count() or 1)
    try:
        if executor is None and jobs == 1:
            for task in pending:
                finished(task, run_one(task.config, task.strategy, task.seed, pretrained, source_val,
                                       progress, resume=task.resume, checkpoint=task.checkpoint,
                                       overall=overall, fingerprint=task.fingerprint))
        else:
            _run_parallel(pending, str(path), source_val, executor, jobs, overall, finished)
    except KeyboardInterrupt:
        log.warning("interrupted: %d of %d runs finished, each kept in %s", len(entries), len(tasks),
                    journal.dir, extra={"console": False})
        raise
    finally:
        overall.close()
    entries = [entries[task.index] for task in tasks]  # the serial order, however they ran
    kind = world.kind
    summary = summarize(entries, kind, sweep)
    references = reference_entries([cfg for _, cfg in points] if sweep == "relatedness" else [config])
    out = {
        "config": config.to_dict(), "data": world.record(), "sweep": sweep, "pretrained": pre_info,
        "summary": summary,
        "baselines": references, "results": entries, "seconds": round(time.perf_counter() - t0, 2),
    }
    if sweep == "lr":
        out["lr_choice"] = choose_rates(entries, kind)
    write_json_atomic(config.runner.output, out, knob=OUTPUT_KNOBS["output"])
    print(table(summary, pre_info["source_lm_loss"], summarize_references(references, kind),
                pre_info["optimal_lm_loss"]))
    try:
        plot(plot_path(config), entries, summary, kind, sweep, references,
             pre_info["source_lm_loss"], pre_info["optimal_lm_loss"])
        print(f"results: {config.runner.output}   plot: {plot_path(config)}")
    except ImportError:
        print(f"results: {config.runner.output}   (no plot: matplotlib is not installed)")
    except OSError as err:
        raise OutputError(f"{OUTPUT_KNOBS['plot']}: cannot write {plot_path(config)}: "
                          f"{err.strerror or err}") from err
    if sweep == "lr":
        print("rates chosen on the validation split (paste into config.yaml):\nstrategies:\n  lr:")
        for strategy, lr in out["lr_choice"].items():
            print(f"    {strategy}: {lr:g}")
    log.info("done in %.1fs", time.perf_counter() - t0)
    return 0


def _grid(points, sweep, pre_id: str, world) -> list[RunTask]:
    """Every run of the experiment in the serial order: sweep point, seed, strategy."""
    tasks, data_id = [], world.identity()
    for _, cfg in points:
        for seed in cfg.runner.seeds:
            for strategy in cfg.runner.strategies:
                index = len(tasks)  # makes the name unique whatever the sweep varies
                tasks.append(RunTask(
                    index, cfg, strategy, seed, str(run_checkpoint_path(cfg, strategy, seed, sweep)),
                    J.Journal.run_name(index, strategy, seed, None if world.relatedness is None
                                       else float(cfg.task.relatedness)),
                    J.run_config(cfg, strategy, seed, pre_id, data_id)))
    return tasks


def _journal_to_resume(journal, fingerprint) -> dict:
    """The header of the journal `--resume` continues; explain (exit 2) when there is none."""
    if journal.exists():
        header = journal.read_header()
        log.info("resuming the experiment journaled in %s", journal.dir)
        return header
    root = journal.dir.parent
    for other in J.candidates(root):  # the newest experiment: say what changed since
        J.refuse(f"--resume: the last experiment journaled in {other['path']}",
                 other["config"], fingerprint,
                 "; run without --resume to start this one")
    raise ConfigError(f"--resume: no experiment to continue in {root} (runner.cache_dir); "
                      f"run the command without --resume to start it")


def _run_parallel(pending, pretrained_path, source_val, executor, jobs, overall, finished) -> None:
    """Run `pending` on `executor` (or a pool of `jobs` processes); journal each on return."""
    from concurrent.futures import as_completed

    own = None
    if executor is None:
        own = _OneBlasThread(jobs)
        executor = own.pool
    interrupted, futures = True, {}
    try:
        for task in pending:
            futures[executor.submit(_run_task, task, pretrained_path, source_val)] = task
        if own is not None:
            own.restore_env()  # every worker has been started: this process keeps its own
        for future in as_completed(futures):
            task = futures[future]
            entry = future.result()
            overall.begin(task.name)
            overall.advance(entry["steps"])
            overall.finished(f"{task.strategy} (seed {task.seed})", entry["steps"], entry["steps"],
                             entry["stopped"])
            finished(task, entry)
        interrupted = False
    finally:
        if own is not None:
            own.stop(now=interrupted)
        elif interrupted:  # the caller's executor: cancel what has not started
            for future in futures:
                future.cancel()


def _resume(config, resume, pretrained, progress) -> int:
    """Continue one interrupted fine-tuning run from its checkpoint; print its entry."""
    ckpt = C.load_checkpoint(resume)
    extra = ckpt.extra or {}
    world = experiment_data(config)
    if extra.get("kind") != "finetune":
        raise ValueError(f"{resume}: not a fine-tuning run checkpoint (nothing to resume)")
    path, _ = ensure_pretrained(config, pretrained, progress)
    cfg = config
    if world.relatedness is not None:  # synthetic: the run's own task and relatedness
        cfg = replace_in(config, "task.target", extra["task"])
        if extra.get("relatedness") is not None:  # a run from a relatedness sweep
            cfg = replace_in(cfg, "task.relatedness", float(extra["relatedness"]))
    pre_id = pretrained_id(config, pretrained)
    fingerprint = J.run_config(cfg, extra["strategy"], extra["seed"], pre_id, world.identity())
    if "run_config" in extra:
        J.refuse(f"run checkpoint {resume}", extra["run_config"], fingerprint)
    source_val = experiment_data(cfg).source().val
    entry = run_one(cfg, extra["strategy"], extra["seed"], path, source_val, progress,
                    resume=resume, checkpoint=resume, fingerprint=fingerprint)
    write_json_atomic(config.runner.output, {"config": cfg.to_dict(), "results": [entry]},
                      knob=OUTPUT_KNOBS["output"])
    print(table(summarize([entry], entry["task"]), None))
    return 0
