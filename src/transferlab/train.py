"""The training loop: batches, evaluation, metrics, early stopping, feature cache, resume.

One loop serves pretraining (the LM head on the source task) and every transfer strategy:
the strategy's plan (strategies.py) decides, phase by phase, which parameters train and at
which rate; the loop only carries it out.

    result = train(model, data, plan, settings, seed=0)

Safety: the loss is checked every step; a NaN or inf stops training with a clear message
and the last good checkpoint (written at each evaluation when `checkpoint` is given) is
left untouched. A run can stop and resume bit-identically: the checkpoint holds the
parameters, masks, optimizer moments, schedule, step, dropout RNG and data-order RNG.
See docs/training.md.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass, field

import numpy as np

from . import checkpoint as ckpt
from . import strategies as S
from .kernels import kernel_table
from .losses import IGNORE_INDEX, log_softmax
from .masks import count, lowest_trainable_depth
from .optim import SGD, AdamW, clip_grad_norm
from .schedules import make_schedule
from .tasks import Split, task_kind

log = logging.getLogger("transferlab")

EVAL_BATCH_SIZE = 256  # examples per forward pass when evaluating (memory, not results)

class TrainingError(RuntimeError):
    """Training could not go on (a NaN loss); the message says where and what was kept."""


@dataclass
class Data:
    """What the loop trains on: three splits and the kind of task they hold."""

    kind: str  # "lm" or a target kind from tasks.TARGET_KINDS
    train: Split
    val: Split
    test: Split | None = None


@dataclass
class Result:
    history: list = field(default_factory=list)  # one dict per evaluation
    best: dict = field(default_factory=dict)  # validation metrics at the best evaluation
    best_step: int = 0
    steps_run: int = 0
    trainable_params: int = 0  # in the last phase
    trainable_by_phase: list = field(default_factory=list)
    stopped: str = "finished"
    seconds: float = 0.0
    cache: "FeatureCache | None" = None  # the feature cache, when the plan used one


def lm_split(tokens: np.ndarray, pad_id: int | None = None) -> Split:
    """Next-token prediction as a Split: x = tokens[:, :-1], y = tokens[:, 1:].

    With a pad id (padded target sequences, e.g. ULMFiT's LM stage on the target's text),
    padded inputs are masked out of attention and padded targets are IGNORE_INDEX."""
    x, y = tokens[:, :-1], tokens[:, 1:]
    mask = np.ones(x.shape, dtype=bool) if pad_id is None else x != pad_id
    if pad_id is not None:
        y = np.where(y == pad_id, IGNORE_INDEX, y)
    return Split(x=np.ascontiguousarray(x), y=np.ascontiguousarray(y), mask=mask)


# ---------------------------------------------------------------------- metrics


def auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve = P(score of a random positive > a random negative).

    Computed from ranks (Mann-Whitney U), ties counted as one half.
    """
    labels = labels.astype(bool)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores))
    sorted_scores = scores[order]
    # average ranks over ties
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    avg = first + (counts + 1) / 2.0
    ranks[order] = np.repeat(avg, counts)
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def token_nll(logits, y, mask):
    """-log softmax(logits)[y] at every position, in float64, and where it counts:
    (nll (N, T), valid (N, T)); valid = mask and y != IGNORE_INDEX."""
    logp = log_softmax(logits.astype(np.float64))  # (N, T, V)
    valid = mask & (y != IGNORE_INDEX)
    nll = -np.take_along_axis(logp, np.where(valid, y, 0)[..., None], axis=-1)[..., 0]
    return nll, valid


def lm_metrics(nll, valid) -> dict:
    """The loss (mean nll over the counted positions) and its perplexity."""
    loss = float(nll[valid].mean())
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}


def metrics(kind: str, outputs: np.ndarray, split: Split) -> dict:
    """Task metrics from model outputs on a whole split."""
    y = split.y
    if kind == "lm":
        return lm_metrics(*token_nll(outputs, y, split.mask))
    if kind == "score":
        err = outputs.astype(np.float64) - y
        return {"mse": float((err * err).mean()), "mae": float(np.abs(err).mean())}
    pred = outputs.argmax(axis=-1)
    if kind == "tagging":
        valid = y != IGNORE_INDEX
        return {"accuracy": float((pred[valid] == y[valid]).mean())}
    out = {"accuracy": float((pred == y).mean())}
    if kind == "binary":
        p = np.exp(log_softmax(outputs.astype(np.float64)))
        out["auc"] = auc(p[:, 1], y)
    return out


def is_better(kind: str, new: float, old: float | None) -> bool:
    """Is `new` a better value of the kind's metric than `old` (tasks.TASK_KINDS says which way)?"""
    return old is None or (new < old if task_kind(kind).goal == "min" else new > old)


# ---------------------------------------------------------------------- feature cache


def chunks(n: int, size: int):
    """Row indices 0..n-1 in consecutive batches of `size` (the last one may be shorter)."""
    for start in range(0, n, size):
        yield np.arange(start, min(start + size, n))


class FeatureCache:
    """Backbone outputs computed once for a frozen, dropout-free backbone.

    Training the head on cached features gives the same numbers as running the frozen
    backbone every step (a frozen backbone runs in inference mode, so it is a fixed function).
    """

    def __init__(self, model, splits: dict[str, Split], batch_size: int = 256):
        self.features = {}
        for name, split in splits.items():
            if split is None:
                continue
            parts = []
            for index in chunks(len(split), batch_size):
                part = split.batch(index)
                parts.append(model.backbone(part.x, part.mask, keep_cache=False))
            self.features[name] = np.concatenate(parts)  # (N, T, C)

    def get(self, name: str, index) -> np.ndarray:
        return self.features[name][index]


# ---------------------------------------------------------------------- evaluation


def outputs_by_batch(model, split: Split, batch_size: int = EVAL_BATCH_SIZE,
                     cache: FeatureCache | None = None, cache_name: str | None = None):
    """(outputs, index) for each batch of a split, in evaluation mode.

    The backbone keeps no activations for backward (keep_cache=False): a batch of 256
    examples' would otherwise stay alive until the next batch's forward had made its own.
    """
    was_training = model.training
    model.eval()
    try:
        for index in chunks(len(split), batch_size):
            part = split.batch(index)
            h = (cache.get(cache_name, index) if cache is not None
                 else model.backbone(part.x, part.mask, keep_cache=False))  # (B, T, C)
            out, _ = model.forward_head(h, idx=part.x, attention_mask=part.mask)
            yield out, index
    finally:
        model.clear_caches()  # the head's cache of the last batch
        model.train(was_training)


def predict(model, split: Split, batch_size: int = EVAL_BATCH_SIZE, cache: FeatureCache | None = None,
            cache_name: str | None = None) -> np.ndarray:
    """Model outputs for a whole split, in evaluation mode, batch by batch (outputs_by_batch)."""
    return np.concatenate([out for out, _ in outputs_by_batch(model, split, batch_size, cache, cache_name)])


def evaluate(model, kind: str, split: Split, batch_size: int = EVAL_BATCH_SIZE, cache=None, cache_name=None) -> dict:
    """metrics(kind, predict(...), split). For a language model each batch's logits are
    reduced to its targets' negative log-likelihoods as they come (`token_nll`, row by
    row, so the same numbers): a split's (N, T, V) logits never exist at once, which at
    GPT-2's vocabulary is 1.6 GB per 256 windows of 32 tokens, and more in float64."""
    if kind != "lm":
        return metrics(kind, predict(model, split, batch_size, cache, cache_name), split)
    per_batch = [token_nll(out, split.y[index], split.mask[index])
                 for out, index in outputs_by_batch(model, split, batch_size, cache, cache_name)]
    return lm_metrics(*(np.concatenate(parts) for parts in zip(*per_batch)))  # nll, valid


# ---------------------------------------------------------------------- the loop


class BatchOrder:
    """Shuffled epochs over a split, from its own RNG so the order can be saved and resumed."""

    def __init__(self, n: int, batch_size: int, seed: int):
        self.n, self.batch_size = n, min(batch_size, n)
        self.rng = np.random.default_rng([seed, 2])
        self.perm, self.pos = self.rng.permutation(n), 0

    def next(self) -> np.ndarray:
        if self.pos + self.batch_size > self.n:  # start a new epoch; drop the ragged end
            self.perm, self.pos = self.rng.permutation(self.n), 0
        index = self.perm[self.pos:self.pos + self.batch_size]
        self.pos += self.batch_size
        return index

    def state(self) -> dict:
        return {"rng": self.rng.bit_generator.state, "perm": self.perm.tolist(), "pos": self.pos}

    def restore(self, state: dict) -> None:
        self.rng.bit_generator.state = state["rng"]
        self.perm, self.pos = np.array(state["perm"]), state["pos"]


def auxiliary_lm(model, x, mask):
    """GPT-1's auxiliary objective (Radford et al. 2018, eq. 3): the next-token loss of the
    same backbone on the same batch, read through the LM head tied to wte.

    The model keeps its classifier; for this one pass it is viewed as a causal LM (an LM
    loss with bidirectional attention could read the answer). Padded targets are ignored.
    Returns (loss, grads) with the model's parameter names (the classifier's grads 0)."""
    cfg = model.config
    y = np.where(mask[:, 1:], x[:, 1:], IGNORE_INDEX)  # (B, T-1) the next token, pads ignored
    model.config = dataclasses.replace(cfg, head="lm", causal=True)
    try:
        _, loss = model(x[:, :-1], y, attention_mask=mask[:, :-1])
        return loss, model.backward()
    finally:
        model.config = cfg


def make_optimizer(model, s):
    if s.optimizer == "sgd":
        return SGD(model.params, lr=s.lr, momentum=s.momentum, weight_decay=s.weight_decay)
    return AdamW(model.params, lr=s.lr, weight_decay=s.weight_decay)


def make_plan_schedule(plan: S.Plan, s, kind: str):
    """The plan's own schedule (e.g. slanted triangular), else the one `s` names.

    s: a training section of the config (config.TrainingConfig: pretrain or finetune)."""
    name = plan.schedule or s.schedule
    kwargs = dict(plan.schedule_kwargs)
    if name == "warmup_cosine":
        kwargs.setdefault("warmup_steps", min(s.warmup_steps, s.steps // 2))
    elif name == "plateau":
        kwargs.update(patience=s.plateau_patience, factor=s.plateau_factor, mode=task_kind(kind).goal)
    return make_schedule(name, lr_max=s.lr, total_steps=s.steps, **kwargs)


# a run that diverges is reported once, as the TrainingError of its non-finite loss (with
# the step and rate), not also as NumPy's overflow warnings from inside the kernels
@np.errstate(over="ignore", invalid="ignore")
def train(model, data: Data, plan: S.Plan, s, seed: int = 0, progress=None,
          checkpoint: str | None = None, resume: str | None = None, extra: dict | None = None) -> Result:
    """Run `plan` for s.steps steps on data.train, evaluating on data.val.

    s: the run's training knobs, a config section (config.TrainingConfig: config.pretrain,
    config.finetune, or TrainingConfig(steps=..., ...) built by hand). s.batch_threads
    becomes model.batch_threads, s.batch_processes model.batch_processes, s.kernels
    model.kernels.

    Keeps the best parameters by the validation metric and restores them at the end.
    progress: an object with update(step, loss, lr) (see report.Progress) or None; when it
        also has evaluated(step, loss, lr, metric, value) and note(text, step) they hear of
        each evaluation, an early stop and a resume.
    checkpoint: write a resumable checkpoint there at every evaluation (atomically).
    resume: continue from such a checkpoint; the numbers equal a run that never stopped.
    """
    t0 = time.perf_counter()
    kind = data.kind
    metric = task_kind(kind).metric
    # every forward and backward of the run on s.batch_threads parts of the batch, one
    # thread each (1: whole); the model keeps the setting (docs/performance.md#batch-parts-in-threads)
    model.batch_threads = s.batch_threads
    # or in s.batch_processes processes, the first part here (docs/performance.md#batch-parts-in-processes)
    model.batch_processes = s.batch_processes
    # and with s.kernels' layer functions: the fast forms, or layers.py's plain equations
    model.kernels = kernel_table(s.kernels)
    order = BatchOrder(len(data.train), s.batch_size, seed)
    opt = make_optimizer(model, s)
    schedule = make_plan_schedule(plan, s, kind)
    result = Result()
    best_params, bad_evals, start = None, 0, 0
    written = 0  # the step of the last checkpoint this run has on disk (0: none)

    def fisher_batches():  # for the sparse mask: its own batch order, not the training one
        fisher_order = BatchOrder(len(data.train), s.batch_size, seed + 7919)
        for _ in range(plan.fisher_batches):
            b = data.train.batch(fisher_order.next())
            yield b.x, b.y, b.mask

    def enter(phase):
        opt.lr_scale = S.apply_phase(model, phase, s.layernorm_trainable_when_frozen, fisher_batches(),
                                     plan.keep_fraction)
        opt.masks = model.masks
        result.trainable_params = count(model)[0]
        result.trainable_by_phase.append(result.trainable_params)

    if resume:  # parameters, masks, optimizer (lr_scale too), schedule, dropout RNG
        saved = ckpt.resume(resume, model, opt, schedule)
        state = saved.extra["train"]
        order.restore(state["order"])
        start, bad_evals = saved.step, state["bad_evals"]
        # the clock goes on from the checkpoint's: seconds to reach it, then this run's
        # (steps done after it before the interruption are redone, and counted once)
        t0 -= float(state.get("seconds", 0.0))  # absent in checkpoints older than the field
        result.history, result.best, result.best_step = state["history"], state["best"], state["best_step"]
        result.trainable_by_phase = state["trainable_by_phase"]
        result.trainable_params = count(model)[0]
        best = {n[len("best/"):]: a for n, a in saved.extra_arrays.items() if n.startswith("best/")}
        best_params = best or None
        result.steps_run = start
        written = start if checkpoint == resume else 0  # the resumed file is the one kept
        if progress is not None and hasattr(progress, "note"):
            progress.note(f"resumed at step {start} from {resume}", step=start)
        if s.patience and bad_evals >= s.patience:  # the run had already stopped early
            result.stopped = f"early stop at step {start}: no better {metric} in {s.patience} evaluations"
            start = s.steps  # nothing left to train
    # the phase the run was in at its last step (start - 1): a phase that begins at `start`
    # is entered by the loop below, as it would have been had the run never stopped
    phase = plan.phase_at(max(start - 1, 0))
    if not resume:
        enter(phase)
    cache = None
    # exact only when nothing below the head trains (a LayerNorm kept trainable by
    # layernorm_trainable would get no gradient through cached features)
    head_only = lowest_trainable_depth(model) == model.config.n_layer + 2
    if plan.feature_cache and all(p.trainable == "head" for p in plan.phases) and head_only:
        cache = FeatureCache(model, {"train": data.train, "val": data.val, "test": data.test}, EVAL_BATCH_SIZE)

    model.train()
    for step in range(start, s.steps):
        if plan.phase_at(step) is not phase:
            phase = plan.phase_at(step)
            enter(phase)
        opt.lr = schedule.lr_at(step)
        index = order.next()
        batch = data.train.batch(index)
        if cache is not None:  # the frozen backbone's output was computed once
            _, loss = model.forward_head(cache.get("train", index), batch.y, idx=batch.x, attention_mask=batch.mask)
        else:
            _, loss = model(batch.x, batch.y, attention_mask=batch.mask)
        if not math.isfinite(loss):
            if written:  # name a checkpoint only if this run really has one on disk
                kept = f"; the last good checkpoint (step {written}) is kept at {checkpoint}"
            elif checkpoint:
                kept = f"; no checkpoint was written (the first is saved at step {s.eval_every})"
            else:
                kept = ""
            raise TrainingError(f"loss became {loss} at step {step} (lr {opt.lr:.3g}){kept}")
        grads = model.backward()
        if plan.aux_lm_weight:  # GPT-1: L = L_task + lambda * L_LM on the same batch
            lm_loss, lm_grads = auxiliary_lm(model, batch.x, batch.mask)
            loss += plan.aux_lm_weight * lm_loss
            grads = {n: g + plan.aux_lm_weight * lm_grads[n] for n, g in grads.items()}
        if s.grad_clip:
            clip_grad_norm(grads, s.grad_clip, masks=model.masks)
        opt.step(grads)
        result.steps_run = step + 1
        if progress is not None:
            progress.update(step + 1, loss, opt.lr)

        if (step + 1) % s.eval_every and step + 1 != s.steps:
            continue
        val = evaluate(model, kind, data.val, EVAL_BATCH_SIZE, cache, "val")
        result.history.append({"step": step + 1, "train_loss": loss, "lr": opt.lr, **val})
        if is_better(kind, val[metric], result.best.get(metric)):
            result.best, result.best_step, bad_evals = val, step + 1, 0
            best_params = {n: p.copy() for n, p in model.params.items()}
        else:
            bad_evals += 1
        if hasattr(schedule, "step"):  # reduce-on-plateau watches the validation metric
            schedule.step(val[metric])
        if progress is not None and hasattr(progress, "evaluated"):
            progress.evaluated(step + 1, loss, opt.lr, metric, val[metric])
        if checkpoint:
            ckpt.save_checkpoint(
                checkpoint, model, opt, schedule, step=step + 1,
                arrays={f"best/{n}": p for n, p in best_params.items()},
                extra={**(extra or {}), "train": {
                    "order": order.state(), "bad_evals": bad_evals, "history": result.history,
                    "best": result.best, "best_step": result.best_step,
                    "trainable_by_phase": result.trainable_by_phase,
                    "seconds": time.perf_counter() - t0}})
            written = step + 1
        if s.patience and bad_evals >= s.patience:
            result.stopped = f"early stop at step {step + 1}: no better {metric} in {s.patience} evaluations"
            if progress is not None and hasattr(progress, "note"):
                progress.note(result.stopped, step=step + 1)
            break

    if best_params is not None:  # end on the best parameters by the validation metric
        for name, value in best_params.items():
            model.params[name][...] = value
    model.eval()
    result.seconds = time.perf_counter() - t0
    result.cache = cache
    return result
