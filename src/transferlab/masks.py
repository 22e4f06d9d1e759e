"""Trainable masks: which individual weights may change.

Every parameter may carry a 0/1 mask, broadcastable to it, in `model.masks`; a parameter
without one is fully trainable. The optimizer applies the update rule

    theta <- theta - tau * eta * update,      tau in {0, 1} per entry,

and the model's backward pass reads the same masks to skip work: a fully masked tensor
gets no gradient computed, and backward stops below the lowest trainable parameter.
Freezing, unfreezing, bias-only training (BitFit), training only new embedding rows and
sparse fine-tuning (a Fisher top-k mask, FISH) are all just masks. See docs/masks.md.

Masks are read-only. Every mask this module makes (and every mask a checkpoint restores)
has `flags.writeable = False`: to change a mask, set a new one. That lets
`trainable_where` read a mask once, not on every step: the optimizer, gradient clipping
and `is_frozen` ask it for the flat indices of the trainable entries and get the answer
computed when they first asked about that array.

Depth, one numbering for everything (docs/masks.md#depth): 0 the embeddings, 1..L the
transformer blocks, L + 1 ln_f, L + 2 the head. Backward stops at the lowest trainable
depth. Layer-wise rates and unfreezing use fastai's layer groups, which are the same
numbers with ln_f and the head in one group: group = min(depth, L + 1).
"""
from __future__ import annotations

import enum
import fnmatch
import re
import weakref

import numpy as np

_LAYERNORM = re.compile(r"(^|\.)ln_(1|2|f)\.")


def read_only(mask: np.ndarray) -> np.ndarray:
    """`mask`, marked read-only (the same array): the contract of every mask made here.

    Writing into it raises ValueError; to change a mask, set a new one.
    """
    mask.flags.writeable = False
    return mask


def frozen_mask(param) -> np.ndarray:
    """A 0-d zero mask: broadcasts to any shape and costs nothing to store.

    It has the parameter's dtype so that multiplying by it never promotes float32.
    """
    return read_only(np.zeros((), dtype=param.dtype))


def is_layernorm(name: str) -> bool:
    return bool(_LAYERNORM.search(name))


def is_head(name: str) -> bool:
    return name.startswith(("lm_head.", "token_head.", "seq_head."))


def depth_of(name: str, n_layer: int) -> int:
    """How deep a parameter sits: 0 embeddings, i + 1 block i, L + 1 ln_f, L + 2 the head."""
    if name.startswith(("wte.", "wpe.")):
        return 0
    match = re.match(r"h\.(\d+)\.", name)
    if match:
        return int(match.group(1)) + 1
    return n_layer + 2 if is_head(name) else n_layer + 1


def group_of(name: str, n_layer: int) -> int:
    """The layer group of a parameter: its depth, with ln_f and the head in one group L + 1."""
    return min(depth_of(name, n_layer), n_layer + 1)


def is_frozen(model, name: str) -> bool:
    """True when every entry of the parameter is masked out (no gradient needed)."""
    mask = model.masks.get(name)
    return mask is not None and trainable_where(mask, model.params[name].shape) is NONE


def lowest_trainable_depth(model) -> int:
    """The depth the backward pass must reach; L + 3 when nothing trains at all.

    A tied LM head is wte itself, so it counts at depth 0 (the embedding) as well as at
    the top: a trainable tied head means backward reaches the embedding.
    """
    L = model.config.n_layer
    depths = [depth_of(name, L) for name in model.params if not is_frozen(model, name)]
    return min(depths, default=L + 3)


def group_names(n_layer: int) -> list[str]:
    return ["embeddings"] + [f"h.{i}" for i in range(n_layer)] + ["ln_f + head"]


def _match(model, patterns) -> list[str]:
    """Parameter names matching any of the glob patterns; a pattern matching nothing is an error."""
    names = []
    for pattern in patterns:
        hits = [n for n in model.params if fnmatch.fnmatchcase(n, pattern)]
        if not hits:
            raise ValueError(
                f"pattern {pattern!r} matches no parameter "
                f"(names look like 'h.0.attn.c_attn.weight', 'wte.weight', 'ln_f.bias')"
            )
        names += [n for n in hits if n not in names]
    return names


# ------------------------------------------------------------------ whole tensors


def freeze(model, *patterns: str) -> list[str]:
    """Freeze every parameter matching a glob pattern ('h.0.*', '*.bias'). Returns the names."""
    names = _match(model, patterns)
    for name in names:
        model.masks[name] = frozen_mask(model.params[name])
    return names


def unfreeze(model, *patterns: str) -> list[str]:
    """Make every parameter matching a pattern fully trainable again."""
    names = _match(model, patterns)
    for name in names:
        model.masks.pop(name, None)
    return names


def unfreeze_all(model) -> None:
    model.masks.clear()


def freeze_backbone(model, layernorm_trainable: bool = False) -> None:
    """Everything but the head frozen (the feature extractor).

    LayerNorms are frozen too by default (Keras semantics); fastai keeps them trainable,
    which `layernorm_trainable=True` gives. A tied LM head shares wte, so for an LM head the
    embedding stays trainable: switch to a classifier head first to freeze it.
    """
    model.masks.clear()
    tied_lm = model.config.head == "lm" and "lm_head.weight" not in model.params
    for name, p in model.params.items():
        if is_head(name) or (tied_lm and name == "wte.weight"):
            continue
        if not (layernorm_trainable and is_layernorm(name)):
            model.masks[name] = frozen_mask(p)


def freeze_to(model, n: int, layernorm_trainable: bool = False) -> None:
    """fastai's freeze_to: layer groups below n frozen, groups n and above trainable.

    Groups: 0 embeddings, 1..L blocks, L + 1 ln_f + head. Negative n counts from the top
    (freeze_to(-1): only the last group trains).
    """
    L = model.config.n_layer
    n_groups = L + 2
    if n < 0:
        n += n_groups
    if not 0 <= n <= n_groups:
        raise ValueError(f"freeze_to: n must be in [-{n_groups}, {n_groups}], got {n}")
    model.masks.clear()
    tied_lm = model.config.head == "lm" and "lm_head.weight" not in model.params
    for name in model.params:
        below = group_of(name, L) < n
        keep = (layernorm_trainable and is_layernorm(name)) or (tied_lm and name == "wte.weight" and n <= L + 1)
        if below and not keep:
            model.masks[name] = frozen_mask(model.params[name])


# ------------------------------------------------------------------ element-wise


def set_mask(model, name: str, mask) -> None:
    """Any 0/1 array broadcastable to the parameter; entries with 0 never change."""
    if name not in model.params:
        raise ValueError(f"set_mask: unknown parameter {name!r}")
    mask = np.asarray(mask)
    shape = model.params[name].shape
    try:
        np.broadcast_to(mask, shape)
    except ValueError:
        raise ValueError(
            f"mask for {name} has shape {mask.shape}, not broadcastable to the parameter's {shape}"
        ) from None
    if not np.all((mask == 0) | (mask == 1)):
        raise ValueError(f"mask for {name} must contain only 0 and 1")
    model.masks[name] = read_only(mask.astype(model.params[name].dtype))  # a copy: ours


def bias_only(model) -> None:
    """BitFit (arXiv 2106.10199): only bias terms (LayerNorm biases included) and the head train."""
    model.masks.clear()
    for name in model.params:
        if not (name.endswith(".bias") or is_head(name)):
            model.masks[name] = frozen_mask(model.params[name])


def is_adapter(name: str) -> bool:
    """A LoRA adapter matrix (lora.py): h.{i}.{module}.lora_A / lora_B."""
    return name.endswith((".lora_A", ".lora_B"))


def adapters_only(model) -> None:
    """LoRA: only the adapters and the head train; every pretrained weight is frozen."""
    model.masks.clear()
    for name in model.params:
        if not (is_adapter(name) or is_head(name)):
            model.masks[name] = frozen_mask(model.params[name])


def train_rows(model, name: str, rows) -> None:
    """Only the given rows of a 2-D parameter train, e.g. new embedding rows for a CLS token."""
    p = model.params[name] if name in model.params else None
    if p is None or p.ndim != 2:
        raise ValueError(f"train_rows: {name!r} is not a 2-D parameter")
    rows = np.asarray(rows, dtype=int).ravel()
    if rows.size and (rows.min() < 0 or rows.max() >= p.shape[0]):
        raise ValueError(
            f"train_rows: row ids {rows.tolist()} must lie in [0, {p.shape[0]}) for {name}")
    mask = np.zeros((p.shape[0], 1), dtype=p.dtype)  # (V, 1): broadcasts over the columns
    mask[rows] = 1.0
    model.masks[name] = read_only(mask)


def fisher_mask(model, batches, keep_fraction: float, exclude_head: bool = True) -> dict:
    """FISH mask (Sung et al., arXiv 2111.09839): keep the top-k weights by empirical Fisher.

    F_i = mean over examples of (dL_example/dtheta_i)^2 approximates the Fisher information
    of weight i. Squares are taken per example, as the paper does: the square of a batch's
    mean gradient would let examples that pull a weight in opposite directions cancel.
    The `keep_fraction` of backbone weights with the largest F_i train, the rest are
    masked; the head (new, so it has no meaningful Fisher yet) stays fully trainable.
    `batches` yields (idx, targets, attention_mask). Returns the masks it set.
    """
    if not 0.0 < keep_fraction <= 1.0:
        raise ValueError(f"keep_fraction must be in (0, 1], got {keep_fraction}")
    model.masks.clear()
    was_training = model.training
    model.eval()  # the Fisher of the deterministic model, no dropout noise
    fisher = {name: np.zeros_like(p) for name, p in model.params.items()}
    n = 0
    for idx, targets, attention_mask in batches:
        for i in range(len(idx)):  # one example at a time: per-example gradients
            mask = None if attention_mask is None else attention_mask[i:i + 1]
            model(idx[i:i + 1], targets[i:i + 1], attention_mask=mask)
            for name, g in model.backward().items():
                fisher[name] += g * g
            n += 1
    model.train(was_training)
    if n == 0:
        raise ValueError("fisher_mask needs at least one example")
    scored = [name for name in fisher if not (exclude_head and is_head(name))]
    scores = np.concatenate([fisher[name].ravel() for name in scored])
    k = max(1, int(round(keep_fraction * scores.size)))
    # exactly the k largest, ties broken arbitrarily: a threshold test `F >= F_(k)` would
    # also keep every entry tied with the k-th, e.g. all the zero gradients of unused rows
    keep = np.zeros(scores.size, dtype=bool)
    keep[np.argpartition(scores, scores.size - k)[scores.size - k:]] = True
    start = 0
    for name in scored:
        p = model.params[name]
        model.masks[name] = read_only(keep[start:start + p.size].reshape(p.shape).astype(p.dtype))
        start += p.size
    return model.masks


# ------------------------------------------------------------------ where a mask trains


class Every(enum.Enum):
    """`trainable_where`'s answer when no list of entries is needed."""
    ALL = "every entry trains"
    NONE = "no entry trains"


ALL, NONE = Every.ALL, Every.NONE

# id(mask) -> {parameter shape: answer}, for read-only masks only. An entry is dropped
# by a weakref.finalize when its array is freed, which happens before CPython can hand
# the same id to a new array: a new mask at a reused id is never answered from the old.
_WHERE: dict[int, dict[tuple, object]] = {}


def trainable_where(mask, shape) -> Every | np.ndarray:
    """Which entries of a parameter of `shape` may train under `mask` (None: no mask).

        ALL      every entry (no mask, or a mask of ones)
        NONE     no entry (a mask of zeros: the parameter is frozen)
        k        otherwise: the flat indices, in C order, of the entries where the
                 broadcast mask is 1, a read-only (K,) intp array, so that
                 p.reshape(-1)[k] are exactly the entries that train

    Raises ValueError (naming both shapes) for a mask that does not broadcast to `shape`,
    or one that holds anything but 0 and 1. A read-only mask (every mask masks.py makes)
    is read once: the answer is kept for as long as the array lives, and later calls cost
    a dictionary look-up. A writeable mask may be edited at any time, so it is read
    afresh on every call (correct, just not cached); so is a read-only view of an array
    someone can still write to. (Setting a mask's flag back to writeable, editing it and
    setting it read-only again breaks the contract: set a new mask instead.)
    """
    if mask is None:
        return ALL
    shape = tuple(shape)
    if not (isinstance(mask, np.ndarray) and _unchanging(mask)):
        return _read(np.asarray(mask), shape)
    key = id(mask)
    answers = _WHERE.get(key)
    if answers is None:
        answers = _WHERE[key] = {}
        weakref.finalize(mask, _WHERE.pop, key, None)
    if shape not in answers:
        answers[shape] = _read(mask, shape)
    return answers[shape]


def _unchanging(mask: np.ndarray) -> bool:
    """True when no one can write the mask's numbers: it, and every array whose memory
    it views, is read-only (a read-only view of a writeable array is not)."""
    a = mask
    while isinstance(a, np.ndarray):
        if a.flags.writeable:
            return False
        a = a.base
    return a is None  # owns its memory, or views a read-only array that does


def _read(mask: np.ndarray, shape: tuple) -> Every | np.ndarray:
    """trainable_where without the memory: reads the mask itself, not its broadcast."""
    try:
        fits = np.broadcast_shapes(mask.shape, shape) == shape
    except ValueError:
        fits = False
    if not fits:
        raise ValueError(f"a mask of shape {mask.shape} does not broadcast to the "
                         f"parameter's shape {shape}")
    if not np.any(mask):  # all zeros, the commonest full-size mask (frozen): one pass
        return NONE
    tau = mask if mask.dtype == bool else mask != 0
    # tau is 0/1 by construction, so it equals the mask exactly when the mask is 0/1
    # (a NaN or a 0.5 differs from both)
    if tau is not mask and not np.array_equal(mask, tau):
        raise ValueError("a mask must hold only 0 and 1")
    if np.count_nonzero(tau) == tau.size:
        return ALL
    k = np.flatnonzero(np.broadcast_to(tau, shape))  # (K,)
    return read_only(k)


# ------------------------------------------------------------------ reporting


def trainable_entries(model, name: str) -> int:
    """How many entries of one parameter may change under its mask."""
    p = model.params[name]
    where = trainable_where(model.masks.get(name), p.shape)
    return p.size if where is ALL else 0 if where is NONE else where.size


def count(model) -> tuple[int, int]:
    """(trainable entries, all entries); a tied LM head counts wte once."""
    trainable = sum(trainable_entries(model, name) for name in model.params)
    return trainable, sum(p.size for p in model.params.values())


def report(model, per_group: bool = True) -> str:
    """`trainable params: 1,234 || all params: 5,678 || trainable%: 21.7` plus a group table."""
    trainable, total = count(model)
    lines = [f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.1f}"]
    if per_group:
        L = model.config.n_layer
        rows = {g: [0, 0] for g in range(L + 2)}
        for name, p in model.params.items():
            rows[group_of(name, L)][0] += trainable_entries(model, name)
            rows[group_of(name, L)][1] += p.size
        width = max(len(n) for n in group_names(L))
        lines.append(f"{'group':<{width}}  {'trainable':>10}  {'total':>10}")
        for g, label in enumerate(group_names(L)):
            lines.append(f"{label:<{width}}  {rows[g][0]:>10,}  {rows[g][1]:>10,}")
    return "\n".join(lines)
