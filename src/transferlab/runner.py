"""The experiment: pretrain once, adapt with each strategy for each seed, compare.

    config -> tasks -> pretrain (LM head on the source task, cached on disk by config hash)
           -> for each seed and strategy: load, switch head, apply the plan, train on the target
           -> metrics (target test split; source LM loss of the adapted backbone) -> results

`run(config)` writes the results JSON (atomically, fileio.py), prints a comparison table
(mean +- std over seeds) and saves a plot (both from report.py). `--sweep relatedness`
repeats the comparison for each value of task.relatedness. See docs/README.md and
docs/results.md.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

import numpy as np

from . import checkpoint as C
from . import lora
from . import masks as M
from . import strategies as S
from .config import config_hash, finetune_for, replace_in
from .fileio import write_json_atomic
from .model import GPT, GPTConfig
from .baselines import baselines_for, source_reference
from .report import Progress, plot, summarize, summarize_references, table
from .tasks import TaskSpec, append_cls, make_source, make_target, task_kind
from .train import Data, evaluate, lm_split, train

log = logging.getLogger("transferlab")


# ---------------------------------------------------------------------- building blocks


def task_spec(config) -> TaskSpec:
    t = config.task
    return TaskSpec(
        n_tokens=t.n_tokens, n_topics=t.n_topics, seq_len=t.seq_len, concentration=t.concentration,
        relatedness=t.relatedness, n_source_train=t.n_source_train, n_source_val=t.n_source_val,
        n_target_train=t.n_target_train, n_target_val=t.n_target_val, n_target_test=t.n_target_test,
        min_len=t.min_len, seed=config.seed)


def pretrain_key(config) -> str:
    """Everything pretraining depends on; the target task and relatedness are not part of it."""
    task = {k: v for k, v in config.to_dict()["task"].items()
            if k not in ("relatedness", "target", "n_target_train", "n_target_val", "n_target_test", "min_len")}
    return config_hash({"seed": config.seed, "model": config.to_dict()["model"], "task": task,
                        "pretrain": config.to_dict()["pretrain"]})


def backbone_config(config, spec: TaskSpec) -> GPTConfig:
    m = config.model
    return GPTConfig(vocab_size=spec.vocab_size, block_size=m.block_size, n_layer=m.n_layer,
                     n_head=m.n_head, n_embd=m.n_embd, dropout=m.dropout, dtype=m.dtype,
                     head="lm", pad_id=spec.pad_id)


def pretrain(config, spec: TaskSpec, path: Path, progress: bool) -> dict:
    """Train the LM head on the source task and save the checkpoint at `path`."""
    p = config.pretrain
    source = make_source(spec)
    model = GPT(backbone_config(config, spec), seed=config.seed)
    data = Data("lm", lm_split(source.train), lm_split(source.val))
    plan = S.Plan("pretrain", pretrained=False, phases=(S.Phase(0, "all"),))
    bar = Progress("pretrain (source LM)", p.steps, progress)
    result = train(model, data, plan, p, seed=config.seed, progress=bar)
    log.info("pretrained in %.1fs: source val loss %.4f (best at step %d)",
             result.seconds, result.best["loss"], result.best_step)
    C.save_checkpoint(path, model, step=result.steps_run,
                      extra={"kind": "pretrained", "history": result.history, "key": pretrain_key(config)})
    return {"seconds": result.seconds, "history": result.history}


def target_model(config, kind: str, n_classes: int, spec: TaskSpec, pretrained, seed: int, start=None):
    """A model for the target task: the pretrained backbone with a new head, or a random one.

    `pretrained`: the pretrained Checkpoint (or its path); None for a random backbone.
    `start`: an LM to start from instead of the pretrained one (ULMFiT's fine-tuned LM).
    """
    f = config.finetune
    head, output = task_kind(kind).head, task_kind(kind).output
    changes = dict(n_classes=n_classes, sequence_output=output, pooling=f.pooling,
                   causal=f.attention == "causal", label_smoothing=f.label_smoothing,
                   head_hidden=f.head_hidden, dropout=config.model.dropout)
    cls_id = spec.vocab_size if (head == "sequence" and f.pooling == "cls") else None
    if pretrained is None:
        base = backbone_config(config, spec)
        cfg = dataclasses.replace(base, vocab_size=base.vocab_size + (cls_id is not None),
                                  head=head, cls_id=cls_id, **changes)
        return GPT(cfg, seed=seed)
    model = start if start is not None else C.model_from_checkpoint(pretrained, seed=seed)
    model.masks.clear()
    if cls_id is not None:
        model.resize_vocab(spec.vocab_size + 1)  # a new CLS row; the old rows are kept
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


def lm_stage(config, plan, spec, target, pretrained, seed):
    """ULMFiT's second stage: the pretrained LM fine-tuned on the target task's own text
    (the inputs of its training and validation splits, no labels) before the classifier.
    Returns the fine-tuned LM (the runner then switches its head)."""
    model = C.model_from_checkpoint(pretrained, seed=seed)
    data = Data("lm", lm_split(target.train.x, spec.pad_id), lm_split(target.val.x, spec.pad_id))
    s = dataclasses.replace(config.finetune, steps=plan.lm_stage_steps, patience=0,
                            eval_every=min(config.finetune.eval_every, plan.lm_stage_steps))
    lm_plan = S.Plan("ulmfit_lm", pretrained=True, phases=(S.Phase(0, "all"),))
    train(model, data, lm_plan, s, seed=seed)
    return model


def run_one(config, strategy: str, seed: int, pretrained, source_val, progress: bool,
            resume: str | None = None, checkpoint: str | None = None) -> dict:
    """One strategy, one seed: one entry of the results JSON's `results` list (docs/API.md, Runner)."""
    spec = task_spec(config)
    kind = config.task.target
    target = make_target(kind, spec, seed=seed)
    plan = S.build_plan(strategy, config.finetune.steps, config.model.n_layer, config.strategies)
    start = lm_stage(config, plan, spec, target, pretrained, seed) if plan.lm_stage_steps else None
    model = target_model(config, kind, target.n_classes, spec, pretrained if plan.pretrained else None, seed,
                         start)
    if plan.lora:  # adapters first, so a resumed run finds the parameters it saved
        lora.attach(model, seed=seed, **plan.lora)
    splits = [target.train, target.val, target.test]
    if model.config.cls_id is not None:
        splits = [append_cls(s, model.config.cls_id) for s in splits]
    data = Data(kind, *splits)
    bar = Progress(f"{strategy} (seed {seed})", config.finetune.steps, progress)
    result = train(model, data, plan, finetune_for(config, strategy), seed=seed, progress=bar,
                   checkpoint=checkpoint, resume=resume,
                   extra={"kind": "finetune", "strategy": strategy, "seed": seed, "task": kind,
                          "relatedness": config.task.relatedness})
    test = evaluate(model, kind, data.test, cache=result.cache, cache_name="test")
    entry = {
        "strategy": strategy, "task": kind, "seed": seed,
        "relatedness": config.task.relatedness, "lr": finetune_for(config, strategy).lr,
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


def reference_entries(config, relatedness_values) -> list[dict]:
    """Chance, the count baseline and the Bayes ceiling on the test split of every
    (relatedness, seed) the strategies ran on (baselines.py): what a result is judged against."""
    kind, out = config.task.target, []
    for value in relatedness_values:
        spec = task_spec(replace_in(config, "task.relatedness", float(value)))
        for seed in config.runner.seeds:
            out += baselines_for(kind, spec, make_target(kind, spec, seed=seed), seed)
    return out


def ensure_pretrained(config, pretrained: str | None, progress: bool):
    """The pretrained checkpoint: the one given, the cached one, or a new one."""
    spec = task_spec(config)
    if pretrained:
        ckpt = C.load_checkpoint(pretrained)
        if ckpt.config.get("vocab_size") != spec.vocab_size:
            raise ValueError(f"{pretrained}: pretrained vocab_size {ckpt.config.get('vocab_size')} "
                             f"does not match the task's {spec.vocab_size}")
        return Path(pretrained), {"path": str(pretrained), "cached": True}
    key = pretrain_key(config)
    path = Path(config.runner.cache_dir) / f"pretrained-{key[:16]}.npz"
    if path.exists():
        log.info("using the cached pretrained model %s", path)
        return path, {"path": str(path), "cached": True}
    log.info("pretraining the source LM (cached afterwards at %s)", path)
    path.parent.mkdir(parents=True, exist_ok=True)
    info = pretrain(config, spec, path, progress)
    return path, {"path": str(path), "cached": False, **info}


# what --sweep can vary: the config key each point sets, and the runner knob listing the points
SWEEPS = {"relatedness": ("task.relatedness", "sweep_values"), "lr": ("finetune.lr", "lr_values")}


def sweep_points(config, sweep) -> list:
    """(value, config) for each point of the sweep; [(None, config)] without one. In an lr
    sweep every strategy runs at the point's rate (strategies.lr is set aside)."""
    if sweep is None:
        return [(None, config)]
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
           "lr": f"-lr{config.finetune.lr:g}"}.get({True: "relatedness"}.get(sweep, sweep), "")
    path = Path(config.runner.cache_dir) / "runs" / f"{strategy}-{config.task.target}{rel}-seed{seed}.npz"
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def run(config, pretrained=None, resume=None, sweep=None, progress=None) -> int:
    """Run what the config asks for; write JSON and plot; print the table. Returns 0."""
    progress = config.runner.progress if progress is None else progress
    t0 = time.perf_counter()
    if resume:
        return _resume(config, resume, pretrained, progress)
    path, pre_info = ensure_pretrained(config, pretrained, progress)
    pretrained = C.load_checkpoint(path)  # read once; every run starts from this copy
    spec = task_spec(config)
    source_val = make_source(spec).val
    pre_info["source_lm_loss"] = source_lm_loss(C.model_from_checkpoint(pretrained), pretrained, source_val)
    pre_info["optimal_lm_loss"] = source_reference(spec)["optimal_lm_loss"]
    points = sweep_points(config, sweep)
    entries = []
    for _, cfg in points:
        for seed in config.runner.seeds:
            for strategy in config.runner.strategies:
                # resumable with --resume if the run is interrupted; removed once it finishes
                ckpt_path = run_checkpoint_path(cfg, strategy, seed, sweep)
                try:
                    entries.append(run_one(cfg, strategy, seed, pretrained, source_val, progress,
                                           checkpoint=str(ckpt_path)))
                except KeyboardInterrupt:
                    if ckpt_path.exists():
                        log.warning("interrupted: continue this run with --resume %s", ckpt_path)
                    raise
                ckpt_path.unlink(missing_ok=True)
    kind = config.task.target
    summary = summarize(entries, kind)
    references = reference_entries(config, [v for v, _ in points] if sweep == "relatedness"
                                   else [config.task.relatedness])
    out = {
        "config": config.to_dict(), "sweep": sweep, "pretrained": pre_info, "summary": summary,
        "baselines": references, "results": entries, "seconds": round(time.perf_counter() - t0, 2),
    }
    if sweep == "lr":
        out["lr_choice"] = choose_rates(entries, kind)
    write_json_atomic(config.runner.output, out)
    print(table(summary, pre_info["source_lm_loss"], summarize_references(references, kind),
                pre_info["optimal_lm_loss"]))
    try:
        plot(config.runner.plot, entries, summary, kind, sweep, references,
             pre_info["source_lm_loss"], pre_info["optimal_lm_loss"])
        print(f"results: {config.runner.output}   plot: {config.runner.plot}")
    except ImportError:
        print(f"results: {config.runner.output}   (no plot: matplotlib is not installed)")
    if sweep == "lr":
        print("rates chosen on the validation split (paste into config.yaml):\nstrategies:\n  lr:")
        for strategy, lr in out["lr_choice"].items():
            print(f"    {strategy}: {lr:g}")
    log.info("done in %.1fs", time.perf_counter() - t0)
    return 0


def _resume(config, resume, pretrained, progress) -> int:
    """Continue one interrupted fine-tuning run from its checkpoint; print its entry."""
    ckpt = C.load_checkpoint(resume)
    extra = ckpt.extra or {}
    if extra.get("kind") != "finetune":
        raise ValueError(f"{resume}: not a fine-tuning run checkpoint (nothing to resume)")
    path, _ = ensure_pretrained(config, pretrained, progress)
    cfg = replace_in(config, "task.target", extra["task"])
    if "relatedness" in extra:  # a run from a relatedness sweep resumes on its own task
        cfg = replace_in(cfg, "task.relatedness", float(extra["relatedness"]))
    source_val = make_source(task_spec(cfg)).val
    entry = run_one(cfg, extra["strategy"], extra["seed"], path, source_val, progress,
                    resume=resume, checkpoint=resume)
    write_json_atomic(config.runner.output, {"config": cfg.to_dict(), "results": [entry]})
    print(table(summarize([entry], entry["task"]), None))
    return 0
