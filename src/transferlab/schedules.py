"""Learning-rate schedules: the rate as a pure function of the step.

Every schedule answers `lr_at(step) -> float` for step = 0, 1, 2, ... (the number of
optimizer steps already taken), and the training loop copies it into the optimizer:

    schedule = WarmupCosine(lr_max=3e-4, total_steps=1000, warmup_steps=100)
    for step in range(1000):
        opt.lr = schedule.lr_at(step)
        opt.step(grads)

Because the rate depends on nothing but the step, resuming a run needs only the step
counter; `state_dict()` (JSON-able) still records the hyperparameters so a checkpoint says
which schedule it was trained with. The one schedule with memory is `ReduceOnPlateau`,
which reacts to evaluation metrics and keeps its counters in its state dict.

`TransferSchedule` wraps any of them with the two transfer-learning knobs: a multiplier
for the new head's rate, and a frozen backbone until `unfreeze_at_iteration`. It is a
standalone schedule: the training loop (train.py) does not use it. The strategies express
the same two knobs through plans (strategies.py: the `freeze_then_unfreeze` plan's phases
and per-group rate multipliers); `TransferSchedule` shows them as one schedule object.

Every rate is returned as a Python float (a NumPy float64 would promote float32 arrays).
Docs: docs/schedules.md.
"""
from __future__ import annotations

import dataclasses
import math
import operator
from dataclasses import dataclass, field
from typing import Any, Mapping

__all__ = ["Constant", "WarmupCosine", "SlantedTriangular", "ReduceOnPlateau",
           "TransferSchedule", "Schedule", "make_schedule", "discriminative_scales",
           "SCHEDULES"]


def _check_number(name: str, value: Any, low: float = 0.0) -> float:
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(x) or x < low:
        raise ValueError(f"{name} must be a finite number >= {low}, got {value!r}")
    return x


def _check_int(name: str, value: Any, low: int = 0) -> int:
    try:
        if isinstance(value, bool):
            raise TypeError
        n = operator.index(value)  # accepts int and NumPy ints, refuses 2.5
    except TypeError:
        raise ValueError(f"{name} must be an integer, got {value!r}") from None
    if n < low:
        raise ValueError(f"{name} must be >= {low}, got {value!r}")
    return n


class _Schedule:
    """state_dict/load_state_dict for the dataclass schedules below."""

    def state_dict(self) -> dict[str, Any]:
        return {"type": type(self).__name__,
                **{f.name: getattr(self, f.name) for f in dataclasses.fields(self)}}

    def load_state_dict(self, sd: Mapping[str, Any]) -> None:
        if sd.get("type") != type(self).__name__:
            raise ValueError(f"state dict is for schedule {sd.get('type')!r}, "
                             f"not {type(self).__name__!r}")
        names = [f.name for f in dataclasses.fields(self)]
        missing = [name for name in names if name not in sd]
        if missing:
            raise ValueError(f"{type(self).__name__} state dict lacks {missing}")
        previous = {name: getattr(self, name) for name in names}
        for name in names:
            setattr(self, name, sd[name])
        try:
            self.__post_init__()  # the same checks as the constructor
        except ValueError:
            for name, value in previous.items():
                setattr(self, name, value)
            raise


# ----------------------------------------------------------------------------------------


@dataclass
class Constant(_Schedule):
    """lr(t) = lr for every step t."""

    lr: float

    def __post_init__(self) -> None:
        self.lr = _check_number("lr", self.lr)

    def lr_at(self, step: int) -> float:
        _check_int("step", step)
        return self.lr


@dataclass
class WarmupCosine(_Schedule):
    """Linear warmup, then a half cosine from lr_max down to min_lr (llm.c / nanoGPT).

        t < W:        lr = lr_max * (t + 1) / W
        W <= t < N:   lr = min_lr + 0.5 * (1 + cos(pi * (t - W) / (N - W))) * (lr_max - min_lr)
        t >= N:       lr = min_lr

    with W = warmup_steps and N = total_steps. The warmup reaches lr_max at its last
    step t = W-1 and never gives a zero rate (a step at lr 0 would be wasted); this is
    llm.c's form (nanoGPT divides by W + 1 instead, and so never quite reaches lr_max).
    """

    lr_max: float
    total_steps: int
    warmup_steps: int = 0
    min_lr: float = 0.0

    def __post_init__(self) -> None:
        self.lr_max = _check_number("lr_max", self.lr_max)
        self.total_steps = _check_int("total_steps", self.total_steps, low=1)
        self.warmup_steps = _check_int("warmup_steps", self.warmup_steps)
        self.min_lr = _check_number("min_lr", self.min_lr)
        if self.warmup_steps > self.total_steps:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) must not exceed "
                             f"total_steps ({self.total_steps})")
        if self.min_lr > self.lr_max:
            raise ValueError(f"min_lr ({self.min_lr}) must not exceed lr_max ({self.lr_max})")

    def lr_at(self, step: int) -> float:
        t = _check_int("step", step)
        W, N = self.warmup_steps, self.total_steps
        if t < W:
            return self.lr_max * (t + 1) / W
        if t >= N:
            return self.min_lr
        progress = (t - W) / (N - W)  # 0 at the end of warmup, -> 1 at total_steps
        coeff = 0.5 * (1.0 + math.cos(math.pi * progress))  # 1 -> 0
        return self.min_lr + coeff * (self.lr_max - self.min_lr)


@dataclass
class SlantedTriangular(_Schedule):
    """ULMFiT's slanted triangular rate (Howard & Ruder, arXiv 1801.06146, eq. 3).

        cut = floor(T * cut_frac)
        p   = t / cut                                    if t < cut
              1 - (t - cut) / (cut * (1/cut_frac - 1))   otherwise
        lr  = lr_max * (1 + p * (ratio - 1)) / ratio

    A short steep rise to lr_max at t = cut, then a long linear fall back to
    lr_max / ratio at t = T. Two guards the paper does not need:
      * cut = 0 (T * cut_frac < 1): there is no rise; the fall runs from lr_max at t = 0
        over all T steps, p = 1 - t / T.
      * p is clipped at 0 (the rate never drops below lr_max / ratio): with the floor,
        the fall can end before T, e.g. T = 25 gives cut = 2 and a fall of 2 * 9 = 18
        steps: p would be negative after t = 20, and the rate itself from t = 21 on.
    """

    lr_max: float
    total_steps: int
    cut_frac: float = 0.1
    ratio: float = 32.0

    def __post_init__(self) -> None:
        self.lr_max = _check_number("lr_max", self.lr_max)
        self.total_steps = _check_int("total_steps", self.total_steps, low=1)
        self.cut_frac = _check_number("cut_frac", self.cut_frac)
        if self.cut_frac >= 1.0:
            raise ValueError(f"cut_frac must be in [0, 1), got {self.cut_frac!r}")
        self.ratio = _check_number("ratio", self.ratio, low=1.0)

    @property
    def cut(self) -> int:
        # + 1e-9: 100 * 0.29 is 28.999999999999996 in floating point, and should floor to 29
        return math.floor(self.total_steps * self.cut_frac + 1e-9)

    def lr_at(self, step: int) -> float:
        t = _check_int("step", step)
        cut = self.cut
        if t < cut:
            p = t / cut
        elif cut == 0:
            p = 1.0 - t / self.total_steps
        else:
            p = 1.0 - (t - cut) / (cut * (1.0 / self.cut_frac - 1.0))
        p = max(p, 0.0)
        return self.lr_max * (1.0 + p * (self.ratio - 1.0)) / self.ratio


@dataclass
class ReduceOnPlateau(_Schedule):
    """Cut the rate by `factor` when a metric stops improving (torch ReduceLROnPlateau).

    Call `step(metric)` after each evaluation. A metric is an improvement when

        mode "min":  metric < best * (1 - threshold)       (relative threshold)
        mode "max":  metric > best * (1 + threshold)

    Non-improving evaluations are counted; when the count exceeds `patience`,

        lr <- max(lr * factor, min_lr)     (skipped if that changes lr by <= eps)

    and the count restarts at 0 (torch's cooldown = 0). `lr_at(step)` returns the
    current rate whatever the step: this schedule follows evaluations, not steps.
    """

    lr: float
    patience: int = 2
    factor: float = 0.5
    min_lr: float = 0.0
    mode: str = "min"
    threshold: float = 1e-4
    eps: float = 1e-8
    # memory, updated by step() and kept in the state dict; best None = no metric yet
    best: float | None = field(default=None, init=False)
    num_bad_evals: int = field(default=0, init=False)
    num_evals: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        self.lr = _check_number("lr", self.lr)
        self.patience = _check_int("patience", self.patience)
        self.factor = _check_number("factor", self.factor)
        if self.factor >= 1.0:
            raise ValueError(f"factor must be < 1 (it multiplies the rate), got {self.factor!r}")
        self.min_lr = _check_number("min_lr", self.min_lr)
        if self.mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {self.mode!r}")
        self.threshold = _check_number("threshold", self.threshold)
        self.eps = _check_number("eps", self.eps)
        self.best = None if self.best is None else float(self.best)
        self.num_bad_evals = _check_int("num_bad_evals", self.num_bad_evals)
        self.num_evals = _check_int("num_evals", self.num_evals)

    def _is_better(self, metric: float) -> bool:
        if self.mode == "min":
            best = math.inf if self.best is None else self.best  # None: no metric yet
            return metric < best * (1.0 - self.threshold)
        best = -math.inf if self.best is None else self.best
        return metric > best * (1.0 + self.threshold)

    def step(self, metric: float) -> float:
        """Record one evaluation's metric; return the (possibly reduced) rate."""
        metric = float(metric)
        self.num_evals += 1
        if self._is_better(metric):
            self.best = metric
            self.num_bad_evals = 0
        else:
            self.num_bad_evals += 1
        if self.num_bad_evals > self.patience:
            new_lr = max(self.lr * self.factor, self.min_lr)
            if self.lr - new_lr > self.eps:  # don't bother with a negligible cut
                self.lr = new_lr
            self.num_bad_evals = 0
        return self.lr

    def lr_at(self, step: int) -> float:
        _check_int("step", step)
        return self.lr


# ----------------------------------------------------------------------------------------


@dataclass
class TransferSchedule:
    """A base schedule plus the head multiplier and the frozen-backbone phase.

        lr_at(t)        = base.lr_at(t)
        multipliers(t)  = {"head": head_lr_multiplier,
                           "backbone": 0.0 if t < unfreeze_at_iteration
                                       else unfreeze_lr_multiplier}

    so the head trains at lr * head_lr_multiplier throughout, and the backbone is frozen
    until `unfreeze_at_iteration`, then trains at lr * unfreeze_lr_multiplier.
    `unfreeze_at_iteration=None` means no frozen phase: the backbone trains from step 0
    (at unfreeze_lr_multiplier). A zero multiplier alone does not freeze (Adam's moments
    would still move); a loop that uses it must also mask the backbone while
    `backbone_frozen(t)`.
    """

    base: Any
    head_lr_multiplier: float = 1.0
    unfreeze_at_iteration: int | None = None
    unfreeze_lr_multiplier: float = 1.0

    def __post_init__(self) -> None:
        if not callable(getattr(self.base, "lr_at", None)):
            raise ValueError(f"base must be a schedule with lr_at(step), got {self.base!r}")
        self.head_lr_multiplier = _check_number("head_lr_multiplier", self.head_lr_multiplier)
        if self.unfreeze_at_iteration is not None:
            self.unfreeze_at_iteration = _check_int("unfreeze_at_iteration",
                                                    self.unfreeze_at_iteration)
        self.unfreeze_lr_multiplier = _check_number("unfreeze_lr_multiplier",
                                                    self.unfreeze_lr_multiplier)

    def lr_at(self, step: int) -> float:
        return self.base.lr_at(step)

    def backbone_frozen(self, step: int) -> bool:
        t = _check_int("step", step)
        return self.unfreeze_at_iteration is not None and t < self.unfreeze_at_iteration

    def multipliers(self, step: int) -> dict[str, float]:
        backbone = 0.0 if self.backbone_frozen(step) else self.unfreeze_lr_multiplier
        return {"head": self.head_lr_multiplier, "backbone": backbone}

    def state_dict(self) -> dict[str, Any]:
        return {"type": "TransferSchedule", "base": self.base.state_dict(),
                "head_lr_multiplier": self.head_lr_multiplier,
                "unfreeze_at_iteration": self.unfreeze_at_iteration,
                "unfreeze_lr_multiplier": self.unfreeze_lr_multiplier}

    def load_state_dict(self, sd: Mapping[str, Any]) -> None:
        if sd.get("type") != "TransferSchedule":
            raise ValueError(f"state dict is for schedule {sd.get('type')!r}, "
                             f"not 'TransferSchedule'")
        restored = TransferSchedule(self.base, sd["head_lr_multiplier"],
                                    sd["unfreeze_at_iteration"], sd["unfreeze_lr_multiplier"])
        self.base.load_state_dict(sd["base"])
        self.head_lr_multiplier = restored.head_lr_multiplier
        self.unfreeze_at_iteration = restored.unfreeze_at_iteration
        self.unfreeze_lr_multiplier = restored.unfreeze_lr_multiplier


# ----------------------------------------------------------------------------------------

SCHEDULES = {
    "constant": Constant,
    "warmup_cosine": WarmupCosine,
    "slanted_triangular": SlantedTriangular,
    "plateau": ReduceOnPlateau,
}
# The schedules finetune.schedule may name: slanted triangular needs the step count and
# knobs of the strategy that brings it (discriminative_lr, gradual_unfreeze).
CONFIGURABLE = ("warmup_cosine", "constant", "plateau")


Schedule = Constant | WarmupCosine | SlantedTriangular | ReduceOnPlateau


def make_schedule(name: str, **kwargs: Any) -> Schedule:
    """Build a schedule by its config name, e.g. make_schedule("warmup_cosine", lr_max=...).

    Every schedule accepts the common pair `lr_max=` and `total_steps=`, so a training
    loop can build any of them the same way: "constant" and "plateau" take lr_max as
    their (starting) `lr` and have no use for total_steps. Any other unknown keyword is
    a ValueError naming the schedule.
    """
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; known schedules: {', '.join(SCHEDULES)}")
    if name in ("constant", "plateau"):
        kwargs.pop("total_steps", None)
        if "lr_max" in kwargs:
            if "lr" in kwargs:
                raise ValueError(f"schedule {name!r}: give lr or lr_max, not both")
            kwargs["lr"] = kwargs.pop("lr_max")
    try:
        return SCHEDULES[name](**kwargs)
    except TypeError as e:  # a missing or unknown keyword: say which schedule it was for
        raise ValueError(f"schedule {name!r}: {e}") from None


def discriminative_scales(n_groups: int, decay: float = 2.6) -> list[float]:
    """ULMFiT's discriminative rates as lr multipliers, bottom group first.

    The top group trains at 1.0 and each group below at the rate above it / decay:
    [1/decay**(n-1), ..., 1/decay**2, 1/decay, 1.0]. Lower layers hold more general
    features, so they should move less.
    """
    n_groups = _check_int("n_groups", n_groups, low=1)
    decay = _check_number("decay", decay)
    if decay == 0.0:
        raise ValueError("decay must be > 0, got 0")
    return [1.0 / decay**k for k in range(n_groups - 1, -1, -1)]
