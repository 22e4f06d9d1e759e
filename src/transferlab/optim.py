"""Optimizers that respect masks: SGD and AdamW over a dict of NumPy arrays.

Transfer learning decides, entry by entry, which weights may move. Every update here is

    theta <- theta - tau * update          tau in {0, 1} per entry (the mask)

and tau gates *everything* the optimizer does to an entry: the gradient step, the
momentum or Adam moments left over from before the entry was frozen, and weight decay.
Multiplying the gradient by the mask is not enough: Adam keeps moving a weight whose
gradient is zero, on its stale moments, and decay keeps shrinking it (docs/optimizers.md
shows the drift). So for a partly masked parameter the optimizer gathers the entries
with tau = 1, runs the update on those alone, and scatters them back: an entry with
tau = 0 is never read nor written, neither in the parameter nor in its state. Which
entries those are comes from `masks.trainable_where`, which reads a read-only mask (every
mask masks.py makes) once and remembers the answer, so a step does not re-derive them.

    opt = AdamW(model.params, lr=1e-3, weight_decay=0.01, masks={"wte.weight": m})
    opt.step(grads)                     # updates the arrays in model.params in place
    opt.lr = schedule.lr_at(step)       # schedules set the rate between steps
    opt.lr_scale = {"seq_head.weight": 10.0}   # per-parameter multipliers on lr

The arithmetic of one step lives in two plain functions, `adamw_update` and `sgd_update`,
written in the same operation order as PyTorch's single-tensor (foreach=False) code, so
a float64 run matches torch.optim to ~1e-15. The classes only do the bookkeeping: which
parameters and entries move, at which rate, with which state; and how a large step runs
(in cache-sized chunks, in threads: `run_updates`), which never changes its numbers.

Docs: docs/optimizers.md.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Mapping, NamedTuple

import numpy as np

from .kernels import CHUNK_BYTES, blas_thread_count, in_threads, row_chunks
from .masks import ALL, NONE, trainable_where

__all__ = ["Optimizer", "AdamW", "SGD", "adamw_update", "sgd_update", "clip_grad_norm",
           "default_decay"]

Params = dict[str, np.ndarray]
DecayRule = Callable[[str, np.ndarray], bool]


# ----------------------------------------------------------------------------------------
# the update rules, one array at a time


def adamw_update(p: np.ndarray, g: np.ndarray, exp_avg: np.ndarray, exp_avg_sq: np.ndarray,
                 step: int, *, lr: float, betas: tuple[float, float], eps: float,
                 weight_decay: float) -> None:
    """One AdamW step on one array, in place (p, exp_avg and exp_avg_sq are updated).

        p   <- p * (1 - lr*wd)                                 decoupled weight decay
        m   <- beta1*m + (1 - beta1)*g                         first moment
        v   <- beta2*v + (1 - beta2)*g*g                       second moment
        p   <- p - lr/(1 - beta1^t) * m / (sqrt(v)/sqrt(1 - beta2^t) + eps)

    `step` is t, this parameter's step count including this step (t >= 1).
    See docs/optimizers.md#adamw.
    """
    beta1, beta2 = betas
    scratch = np.empty_like(p)  # the one temporary of the step, reused below
    if weight_decay != 0.0:
        # decoupled: decay shrinks p directly and never enters m or v (torch: p.mul_(1-lr*wd))
        np.multiply(p, 1.0 - lr * weight_decay, out=p)

    # m <- beta1*m + (1-beta1)*g: a running mean of the gradient
    np.multiply(exp_avg, beta1, out=exp_avg)
    np.multiply(g, 1.0 - beta1, out=scratch)
    np.add(exp_avg, scratch, out=exp_avg)
    # v <- beta2*v + (1-beta2)*g*g: a running mean of the squared gradient
    np.multiply(exp_avg_sq, beta2, out=exp_avg_sq)
    np.multiply(g, g, out=scratch)
    np.multiply(scratch, 1.0 - beta2, out=scratch)
    np.add(exp_avg_sq, scratch, out=exp_avg_sq)

    # m and v start at 0, so after t steps they are too small by (1 - beta^t): undo that
    bias_correction1 = 1.0 - beta1**step
    bias_correction2 = 1.0 - beta2**step
    step_size = lr / bias_correction1

    # denom = sqrt(v)/sqrt(1 - beta2^t) + eps
    np.sqrt(exp_avg_sq, out=scratch)
    np.divide(scratch, math.sqrt(bias_correction2), out=scratch)
    np.add(scratch, eps, out=scratch)
    # p <- p - step_size * m / denom
    np.divide(exp_avg, scratch, out=scratch)
    np.multiply(scratch, step_size, out=scratch)
    np.subtract(p, scratch, out=p)


def sgd_update(p: np.ndarray, g: np.ndarray, momentum_buffer: np.ndarray | None, *,
               lr: float, momentum: float, nesterov: bool, weight_decay: float) -> None:
    """One SGD step on one array, in place (torch.optim.SGD with dampening 0).

        d   = g + wd*p                                         coupled L2 decay
        buf <- momentum*buf + d                                (if momentum != 0)
        d   = d + momentum*buf if nesterov else buf
        p   <- p - lr*d

    `momentum_buffer` starts as zeros, so the first step gives buf = d exactly, which is
    torch's `buf = d.clone()`. See docs/optimizers.md#sgd.
    """
    scratch = np.empty_like(p)
    d_p = g
    if weight_decay != 0.0:
        # coupled: the decay term joins the gradient, and so also the momentum buffer
        np.multiply(p, weight_decay, out=scratch)
        np.add(g, scratch, out=scratch)
        d_p = scratch
    if momentum != 0.0:
        np.multiply(momentum_buffer, momentum, out=momentum_buffer)
        np.add(momentum_buffer, d_p, out=momentum_buffer)
        if nesterov:
            # look one momentum step ahead: d + momentum*buf
            ahead = np.multiply(momentum_buffer, momentum)
            d_p = np.add(d_p, ahead, out=ahead)
        else:
            d_p = momentum_buffer
    np.multiply(d_p, lr, out=scratch)
    np.subtract(p, scratch, out=p)


# ----------------------------------------------------------------------------------------
# one step's arithmetic, in cache-sized chunks and in threads
#
# An AdamW update makes about a dozen elementwise passes over its arrays (SGD fewer).
# Over a whole (50257, 768)
# embedding each pass streams 150 MB from main memory; over a chunk of 64K entries the
# four or five operands (~1.3 MB) stay in the L2 cache between passes. Every operation is
# elementwise, so a chunk's numbers are the whole array's, bit for bit, whatever the chunk
# size and whichever thread runs it: chunks only change how fast a step is.
# docs/performance.md#the-optimizer-in-chunks-and-threads


class Update(NamedTuple):
    """One parameter's update: p, g and the state arrays share one shape. With `k`, the
    arrays are flat and only their entries k (sorted flat indices) are updated."""
    p: np.ndarray
    g: np.ndarray
    arrays: dict[str, np.ndarray]
    step: int
    lr: float
    decays: bool
    k: np.ndarray | None = None

    @property
    def size(self) -> int:
        """How many entries the update changes: all of p's, or len(k)."""
        return self.p.size if self.k is None else self.k.size


MIN_CHUNKS = 8  # a parameter of fewer chunks runs whole: its few MB stay in cache anyway,
# and the extra ufunc calls cost more than chunks save (python src/bench.py --optimizer)


def in_chunks(u: Update, chunk_bytes: int = CHUNK_BYTES) -> list[Update]:
    """u as updates of about `chunk_bytes` per operand: views, so updating them updates
    u's arrays (with `k`: chunks of k, which touch disjoint entries). [u] itself when it
    has fewer than MIN_CHUNKS chunks' entries, or when an operand is not contiguous (a
    broadcast zero gradient, a strided parameter): those run whole."""
    slices = row_chunks(u.size, u.p.itemsize, chunk_bytes)  # an entry is a "row" here
    if len(slices) < MIN_CHUNKS:
        return [u]
    if u.k is not None:
        return [u._replace(k=u.k[s]) for s in slices]
    if not all(a.flags.c_contiguous for a in (u.p, u.g, *u.arrays.values())):
        return [u]
    p, g = u.p.reshape(-1), u.g.reshape(-1)
    arrays = {key: a.reshape(-1) for key, a in u.arrays.items()}
    return [Update(p[s], g[s], {key: a[s] for key, a in arrays.items()}, u.step, u.lr, u.decays)
            for s in slices]


THREADS_FROM = 1 << 24  # entries in a step: fewer run in the calling thread alone. Handing
# chunks to a thread costs ~0.3 ms, and right after a backward OpenBLAS's idle worker
# still spins on the second core: a medium step (4.8M entries) gained 10% from two
# threads even rested, GPT-2 124M's (124M entries) went from 650 to 373 ms in two; the
# threshold between is not tuned (docs/performance.md#the-optimizer-in-chunks-and-threads).


def run_updates(rule: Callable[[Update], None], updates: list[Update], threads: int) -> None:
    """rule(u) for every update, in chunks, dealt round-robin to `threads` threads.

    Neighbouring chunks are the same size, so dealing them in turn gives each thread
    about the same number of entries. A step of fewer than THREADS_FROM entries, or one
    thread, runs them in the calling thread.
    """
    chunks = [c for u in updates for c in in_chunks(u)]
    if threads <= 1 or len(chunks) < 2 or sum(u.size for u in updates) < THREADS_FROM:
        for c in chunks:
            rule(c)
        return
    threads = min(threads, len(chunks))
    in_threads(lambda share: [rule(c) for c in share],
               [chunks[i::threads] for i in range(threads)])


# ----------------------------------------------------------------------------------------
# validation helpers: every message names the bad value


def _check_number(name: str, value: Any, low: float = 0.0, high: float | None = None,
                  high_open: bool = False) -> float:
    """float(value) if it is a finite number in [low, high] (or [low, high)), else ValueError."""
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    bad = not math.isfinite(x) or x < low
    if high is not None:
        bad = bad or x > high or (high_open and x == high)
    if bad:
        upper = "" if high is None else (f" and < {high}" if high_open else f" and <= {high}")
        raise ValueError(f"{name} must be a finite number >= {low}{upper}, got {value!r}")
    return x  # a Python float: keeps float32 arrays float32 under NumPy 2


def _require(h: Mapping[str, Any], keys: tuple[str, ...]) -> None:
    missing = [key for key in keys if key not in h]
    if missing:
        raise ValueError(f"hyperparameters lack {missing}")


def _check_mask_names(params: Params, masks: Mapping[str, Any]) -> None:
    for name, mask in masks.items():
        if mask is not None and name not in params:  # None: same as absent, fully trainable
            raise ValueError(f"mask given for unknown parameter {name!r}")


def _where(name: str, mask: Any, shape: tuple) -> Any:
    """masks.trainable_where (ALL, NONE or the flat indices that train), its errors
    naming the parameter."""
    try:
        return trainable_where(mask, shape)
    except ValueError as e:
        raise ValueError(f"parameter {name!r}: {e}") from None


def _check_masks(params: Params, masks: Mapping[str, Any]) -> dict[str, Any]:
    """Every mask names a known parameter, broadcasts to its shape and holds only 0/1.
    Returns name -> trainable_where's answer, for the masks that are not None."""
    _check_mask_names(params, masks)
    return {name: _where(name, mask, params[name].shape)
            for name, mask in masks.items() if mask is not None}


def _check_lr_scale(params: Params, lr_scale: Mapping[str, Any]) -> dict[str, float]:
    """Known names, finite non-negative multipliers; returned as Python floats."""
    checked = {}
    for name, scale in lr_scale.items():
        if name not in params:
            raise ValueError(f"lr_scale given for unknown parameter {name!r}")
        checked[name] = _check_number(f"lr_scale[{name!r}]", scale)
    return checked


def _flat_view(name: str, a: np.ndarray) -> np.ndarray:
    """a as a 1-D view (writing to it writes to a); a copy would silently lose updates."""
    if not a.flags.c_contiguous:
        raise ValueError(f"parameter {name!r} must be a C-contiguous array to be updated "
                         f"through a mask (np.ascontiguousarray makes one)")
    return a.reshape(-1)


def default_decay(name: str, p: np.ndarray) -> bool:
    """nanoGPT's rule: weight matrices and embeddings decay, biases and LayerNorms don't."""
    return p.ndim >= 2


def _decay_rule(decay: None | str | DecayRule) -> DecayRule:
    if decay is None:
        return default_decay
    if decay == "all":
        return lambda name, p: True
    if callable(decay):
        return decay
    raise ValueError(f"decay must be None, 'all' or a callable (name, array) -> bool, "
                     f"got {decay!r}")


# ----------------------------------------------------------------------------------------
# the optimizers: bookkeeping around the update rules


class Optimizer:
    """What SGD and AdamW share: which entries move, at which rate, with which state.

    params     name -> float ndarray, updated in place (the same dict and array objects)
    lr         plain float attribute; schedules set it between steps
    masks      name -> 0/1 array broadcastable to the parameter; absent = fully trainable
    lr_scale   name -> multiplier on lr; absent = 1.0
    state      name -> {"step": int, <state arrays>}, created on a parameter's first step
    threads    how many threads a step's arithmetic runs in; None (default): as many as
               BLAS runs on (1 in the runner's one-BLAS-thread workers). The numbers are
               the same for any count (see run_updates)
    """

    state_keys: tuple[str, ...] = ()  # names of the per-parameter state arrays

    def __init__(self, params: Params, masks: Mapping[str, Any] | None,
                 lr_scale: Mapping[str, float] | None, decay: None | str | DecayRule,
                 threads: int | None = None) -> None:
        if not isinstance(params, dict) or not params:
            raise ValueError("params must be a non-empty dict name -> ndarray")
        for name, p in params.items():
            if not isinstance(p, np.ndarray) or not np.issubdtype(p.dtype, np.floating):
                raise ValueError(f"parameter {name!r} must be a floating-point ndarray, "
                                 f"got {type(p).__name__} {getattr(p, 'dtype', '')}")
        self.params = params
        self.decay_rule = _decay_rule(decay)
        self.masks = masks
        self.lr_scale = lr_scale
        if threads is not None and (not isinstance(threads, int) or isinstance(threads, bool)
                                    or threads < 1):
            raise ValueError(f"threads must be a positive integer or None, got {threads!r}")
        self.threads = threads  # None: as many as BLAS uses (run_updates)
        self.state: dict[str, dict[str, Any]] = {}

    # masks and lr_scale are checked whenever they are (re)assigned, e.g. by gradual
    # unfreezing between steps, so a bad one fails where it was made, not deep in step().
    # The masks dict is kept, not copied: `opt.masks = model.masks` then follows later
    # in-place edits of model.masks (step() rechecks names and shapes).
    @property
    def masks(self) -> Mapping[str, Any]:
        return self._masks

    @masks.setter
    def masks(self, masks: Mapping[str, Any] | None) -> None:
        masks = {} if masks is None else masks
        _check_masks(self.params, masks)  # for read-only masks this also primes the memo
        self._masks = masks

    @property
    def lr_scale(self) -> dict[str, float]:
        return self._lr_scale

    @lr_scale.setter
    def lr_scale(self, lr_scale: Mapping[str, float] | None) -> None:
        self._lr_scale = _check_lr_scale(self.params, dict(lr_scale or {}))

    def step(self, grads: Mapping[str, np.ndarray | None]) -> None:
        """Update every parameter that has a gradient and is not fully masked, in place.

        A missing or None gradient skips that parameter and leaves its state untouched;
        gradients for names the optimizer does not hold are ignored. Everything is
        checked before the first parameter changes: a refused step changes nothing.
        """
        lr = _check_number("lr", self.lr)
        # the dicts may have been edited in place since they were assigned: recheck them
        # (for read-only masks trainable_where answers from memory)
        _check_mask_names(self.params, self._masks)
        _check_lr_scale(self.params, self._lr_scale)
        todo = []  # (name, p, g, where): the parameters this step updates
        for name, p in self.params.items():
            g = grads.get(name)
            if g is None:
                continue
            if g.shape != p.shape:
                raise ValueError(f"gradient for parameter {name!r} has shape {g.shape}, "
                                 f"the parameter has shape {p.shape}")
            where = _where(name, self._masks.get(name), p.shape)
            if where is not ALL and where is not NONE:
                _flat_view(name, p)  # a parameter updated through a mask must be contiguous
            if where is NONE:
                continue  # fully frozen: no computation, no step count, state untouched
            if name in self.state:
                self._check_state_shapes(name, self.state[name], p)
            todo.append((name, p, g, where))
        updates = []
        for name, p, g, where in todo:
            state = self.state.get(name)
            if state is None:
                state = self.state[name] = self._init_state(p)
            state["step"] += 1
            arrays = {key: state[key] for key in self.state_keys}
            rate, decays = lr * self._lr_scale.get(name, 1.0), self.decay_rule(name, p)
            if where is ALL:  # no mask, or a mask of ones: the plain update, in place
                updates.append(Update(p, g, arrays, state["step"], rate, decays))
            else:  # (p.size,) views: writing them writes p and its state
                flats = {key: _flat_view(name, a) for key, a in arrays.items()}
                updates.append(Update(_flat_view(name, p), g.reshape(-1), flats,
                                      state["step"], rate, decays, where))
        run_updates(self._run, updates, self.threads or blas_thread_count())

    def _run(self, u: Update) -> None:
        """One update (or chunk of one): the whole arrays, or only the entries u.k.

        theta[k] <- theta[k] - update, for the trainable entries k (tau = 1) only: `k`
        holds their flat indices in C order (masks.trainable_where). Gathers those entries
        of p, g and the state arrays into short vectors, runs the ordinary update on them,
        and scatters the results back. The frozen entries and their state are never read
        nor written, so they stay bit-identical, and the trainable ones get exactly the
        numbers an unmasked update would give them.
        """
        if u.k is None:
            self._update(u.p, u.g, u.arrays, u.step, u.lr, u.decays)
            return
        p_k, arrays_k = u.p[u.k], {key: a[u.k] for key, a in u.arrays.items()}  # (K,) copies
        self._update(p_k, u.g[u.k], arrays_k, u.step, u.lr, u.decays)
        u.p[u.k] = p_k
        for key, a in u.arrays.items():
            a[u.k] = arrays_k[key]

    def _init_state(self, p: np.ndarray) -> dict[str, Any]:
        # C order, like the parameter, so the masked path can view both as flat vectors
        return {"step": 0, **{key: np.zeros(p.shape, p.dtype) for key in self.state_keys}}

    def _check_state_shapes(self, name: str, state: Mapping[str, Any], p: np.ndarray) -> None:
        for key in self.state_keys:
            if state[key].shape != p.shape:
                raise ValueError(f"optimizer state {key!r} for parameter {name!r} has shape "
                                 f"{state[key].shape}, the parameter has shape {p.shape}")

    def _update(self, p: np.ndarray, g: np.ndarray, arrays: dict[str, np.ndarray], step: int,
                lr: float, decays: bool) -> None:
        """Apply the update rule to p and its state arrays in place (all unmasked)."""
        raise NotImplementedError

    # -- checkpointing -------------------------------------------------------------------

    def hyperparameters(self) -> dict[str, Any]:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        """A snapshot (arrays copied) of everything needed to continue bit-identically.

            {"type": "AdamW", "hyperparameters": {"lr": ..., ...},
             "lr_scale": {name: float},
             "state": {name: {"step": int, "exp_avg": ndarray, "exp_avg_sq": ndarray}}}

        Only ndarrays and JSON-able values. Masks are not included: they belong to the
        training plan and are checkpointed with the model (as torch leaves requires_grad
        out of an optimizer's state_dict).
        """
        return {
            "type": type(self).__name__,
            "hyperparameters": self.hyperparameters(),
            "lr_scale": dict(self._lr_scale),
            "state": {name: {"step": int(s["step"]),
                             **{key: s[key].copy() for key in self.state_keys}}
                      for name, s in self.state.items()},
        }

    def load_state_dict(self, sd: Mapping[str, Any]) -> None:
        """Restore a `state_dict()` exactly (arrays copied, cast to each parameter's dtype)."""
        if sd.get("type") != type(self).__name__:
            raise ValueError(f"state dict is for optimizer {sd.get('type')!r}, "
                             f"not {type(self).__name__!r}")
        for key in ("hyperparameters", "lr_scale", "state"):
            if key not in sd:
                raise ValueError(f"optimizer state dict has no {key!r} entry")
        # hyperparameters first: they decide which state arrays exist (SGD's momentum)
        previous = self.hyperparameters()
        self.set_hyperparameters(sd["hyperparameters"])
        try:
            state = {}
            for name, s in sd["state"].items():
                if name not in self.params:
                    raise ValueError(f"optimizer state given for unknown parameter {name!r}")
                p = self.params[name]
                missing = [key for key in ("step", *self.state_keys) if key not in s]
                if missing:
                    raise ValueError(f"optimizer state for parameter {name!r} lacks {missing}")
                state[name] = {"step": int(s["step"]),
                               **{key: np.array(s[key], dtype=p.dtype, order="C")
                                  for key in self.state_keys}}
                self._check_state_shapes(name, state[name], p)
            self.lr_scale = sd["lr_scale"]
        except ValueError:
            self.set_hyperparameters(previous)  # a failed load leaves the optimizer as it was
            raise
        self.state = state

    def set_hyperparameters(self, h: Mapping[str, Any]) -> None:
        raise NotImplementedError


class AdamW(Optimizer):
    """Adam with decoupled weight decay (Loshchilov & Hutter), as torch.optim.AdamW.

    Weight decay applies to the parameters `decay` selects: by default those with
    ndim >= 2 (nanoGPT); "all"; or a callable (name, array) -> bool.
    """

    state_keys = ("exp_avg", "exp_avg_sq")

    def __init__(self, params: Params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.01,
                 masks: Mapping[str, Any] | None = None,
                 lr_scale: Mapping[str, float] | None = None,
                 decay: None | str | DecayRule = None, threads: int | None = None) -> None:
        super().__init__(params, masks, lr_scale, decay, threads)
        self.set_hyperparameters(
            {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})

    def set_hyperparameters(self, h: Mapping[str, Any]) -> None:
        _require(h, ("lr", "betas", "eps", "weight_decay"))
        betas = h["betas"]
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
        # check everything before assigning anything: a bad value changes nothing
        lr = _check_number("lr", h["lr"])
        betas = (_check_number("beta1", betas[0], high=1.0, high_open=True),
                 _check_number("beta2", betas[1], high=1.0, high_open=True))
        eps = _check_number("eps", h["eps"])
        weight_decay = _check_number("weight_decay", h["weight_decay"])
        self.lr, self.betas, self.eps, self.weight_decay = lr, betas, eps, weight_decay

    def hyperparameters(self) -> dict[str, Any]:
        return {"lr": float(self.lr), "betas": list(self.betas), "eps": self.eps,
                "weight_decay": self.weight_decay}

    def _update(self, p, g, arrays, step, lr, decays):
        adamw_update(p, g, arrays["exp_avg"], arrays["exp_avg_sq"], step, lr=lr,
                     betas=self.betas, eps=self.eps,
                     weight_decay=self.weight_decay if decays else 0.0)


class SGD(Optimizer):
    """Stochastic gradient descent with momentum and Nesterov, as torch.optim.SGD.

    Weight decay is coupled L2 (added to the gradient), on the parameters `decay` selects.
    """

    def __init__(self, params: Params, lr: float = 1e-2, momentum: float = 0.0,
                 nesterov: bool = False, weight_decay: float = 0.0,
                 masks: Mapping[str, Any] | None = None,
                 lr_scale: Mapping[str, float] | None = None,
                 decay: None | str | DecayRule = None, threads: int | None = None) -> None:
        super().__init__(params, masks, lr_scale, decay, threads)
        self.set_hyperparameters({"lr": lr, "momentum": momentum, "nesterov": nesterov,
                                  "weight_decay": weight_decay})

    @property
    def state_keys(self) -> tuple[str, ...]:
        # plain SGD keeps no buffer at all (torch stores None)
        return ("momentum_buffer",) if self.momentum != 0.0 else ()

    def set_hyperparameters(self, h: Mapping[str, Any]) -> None:
        _require(h, ("lr", "momentum", "nesterov", "weight_decay"))
        lr = _check_number("lr", h["lr"])
        momentum = _check_number("momentum", h["momentum"])
        if h["nesterov"] and momentum == 0.0:
            raise ValueError("nesterov=True needs momentum > 0, got momentum=0")
        weight_decay = _check_number("weight_decay", h["weight_decay"])
        self.lr, self.momentum, self.weight_decay = lr, momentum, weight_decay
        self.nesterov = bool(h["nesterov"])

    def hyperparameters(self) -> dict[str, Any]:
        return {"lr": float(self.lr), "momentum": self.momentum, "nesterov": self.nesterov,
                "weight_decay": self.weight_decay}

    def _update(self, p, g, arrays, step, lr, decays):
        sgd_update(p, g, arrays.get("momentum_buffer"), lr=lr, momentum=self.momentum,
                   nesterov=self.nesterov, weight_decay=self.weight_decay if decays else 0.0)


# ----------------------------------------------------------------------------------------
# gradient clipping


def _constant_zero(g: np.ndarray) -> bool:
    """True for an array whose entries all share one memory slot holding 0 (a broadcast
    zero, as model.zero_gradient returns): O(1), never a pass over the array."""
    return g.size == 0 or (not any(g.strides) and g[(0,) * g.ndim] == 0)


def clip_grad_norm(grads: Mapping[str, np.ndarray | None], max_norm: float,
                   masks: Mapping[str, Any] | None = None) -> float:
    """Scale all gradients in place so their global L2 norm is at most `max_norm`.

        norm = sqrt(sum over every gradient entry of g^2)      (masked entries left out)
        g   <- g * max_norm/(norm + 1e-6)                      only if that factor is < 1

    as torch.nn.utils.clip_grad_norm_. Returns the norm before clipping. Masked entries
    are excluded because they will not be applied: a frozen weight's large gradient
    should not shrink the step of the weights that do train. See docs/optimizers.md#clipping.
    """
    max_norm = _check_number("max_norm", max_norm)
    if max_norm == 0.0:
        raise ValueError("max_norm must be > 0, got 0")
    masks = masks or {}
    # a constant zero (the model's zero_gradient of a frozen tensor) adds nothing to the
    # norm and is unchanged by scaling: skip it rather than copy or write it
    present = {name: g for name, g in grads.items() if g is not None and not _constant_zero(g)}
    wheres = _check_masks(present, {n: m for n, m in masks.items() if n in present})
    sum_sq = 0.0
    for name, g in present.items():
        where = wheres.get(name, ALL)
        if where is NONE:
            continue
        entries = g.reshape(-1)
        if where is not ALL:  # only the trainable entries count
            entries = entries[where]
        # summed in float64 so a float32 gradient's norm is not rounded away, a chunk at
        # a time: no float64 copy of a whole (V, C) gradient, twice as fast at GPT-2's size
        for s in row_chunks(entries.size, entries.itemsize):
            part = entries[s].astype(np.float64, copy=False)
            sum_sq += float(np.dot(part, part))
    norm = math.sqrt(sum_sq)
    clip_coef = max_norm / (norm + 1e-6)
    if clip_coef < 1.0:
        for g in present.values():
            np.multiply(g, clip_coef, out=g)  # Python float: float32 stays float32
    return norm
