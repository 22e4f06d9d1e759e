"""GPT-2 in NumPy: a block, a model, a forward pass and the backward pass that mirrors it.

    x = wte[idx] + wpe[:T]                                   embedding (+ dropout)
    for each block:  x = x + drop(attn(ln_1(x)))              pre-LayerNorm residual blocks
                     x = x + drop(mlp(ln_2(x)))
    h = ln_f(x)                                               backbone output (B, T, C)
    logits, loss = head(h, targets)                           lm / token / sequence head

Parameter names and shapes are those of Hugging Face's GPT2Model state dict (without the
`transformer.` prefix), weights laid out [in, out] so every linear layer is x @ W + b.

`model.backward()` runs the chain rule back through exactly the caches the last forward
stored, then frees them. It honours `model.masks` (name -> 0/1 array, see masks.py): a
fully frozen tensor gets no gradient computed (a shared read-only zero array is returned
in its place, `zero_gradient`), frozen blocks run in
inference mode (no dropout), and the backward pass stops below the lowest trainable
depth (masks.lowest_trainable_depth), so with a frozen backbone only the head's backward runs.

The layer functions come from a kernel table (kernels.py): the fast forms by default,
`GPT(config, kernels="plain")` for the plain forms of layers.py. `GPT(config,
batch_threads=2)` runs the whole step on two halves of the batch in two threads, the same
numbers up to float rounding (docs/performance.md#batch-parts-in-threads). Heads and
head switching live in heads.py, freezing in masks.py, loading other tools' state dicts in weights.py.

Docs: docs/model.md, docs/residual.md (fan-out gradients), docs/tied_weights.md.
"""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from . import heads as H
from . import masks as M
from . import weights
from .kernels import FAST, KernelTable, in_threads, kernel_table, reuse_freed_memory, split_in_threads
from .knobs import Rule, check_knobs, check_value, knob
from .layers import attention_mask
from .lora import lora_linear_backward, lora_linear_forward
from .losses import IGNORE_INDEX, sigmoid, sigmoid_mse
from .workers import BatchWorkers, part_of

DTYPES = ("float32", "float64")
BLOCK_PARAMS = (  # (name inside a block, shape as a function of C)
    ("ln_1.weight", lambda C: (C,)),
    ("ln_1.bias", lambda C: (C,)),
    ("attn.c_attn.weight", lambda C: (C, 3 * C)),
    ("attn.c_attn.bias", lambda C: (3 * C,)),
    ("attn.c_proj.weight", lambda C: (C, C)),
    ("attn.c_proj.bias", lambda C: (C,)),
    ("ln_2.weight", lambda C: (C,)),
    ("ln_2.bias", lambda C: (C,)),
    ("mlp.c_fc.weight", lambda C: (C, 4 * C)),
    ("mlp.c_fc.bias", lambda C: (4 * C,)),
    ("mlp.c_proj.weight", lambda C: (4 * C, C)),
    ("mlp.c_proj.bias", lambda C: (C,)),
)


@dataclass
class GPTConfig:
    """Everything that fixes the model's shapes and behaviour.

    The fields that are knobs are declared here once, with their defaults, docs and rules
    (knobs.py): the backbone's (block_size .. dtype) make config.yaml's `model` section;
    the head's (pooling, head_hidden, label_smoothing) are `finetune`'s knobs, and
    lora_dropout is `strategies.lora.dropout` (config.py takes them with `knob_of`).
    `head` picks the head: "lm" (next token), "token" (a class per token) or "sequence"
    (pool, then `sequence_output` "classify" into n_classes, or "score" in [0, 1]).
    `causal=None` means: causal for the LM head, bidirectional for the others.
    """

    vocab_size: int
    block_size: int = knob(32, "longest sequence the model accepts (learned positions)", ge=1)
    n_layer: int = knob(2, "transformer blocks", ge=1)
    n_head: int = knob(4, "attention heads per block", ge=1)
    n_embd: int = knob(64, "width C of the residual stream", ge=1)
    dropout: float = knob(0.0, "dropout probability while training", ge=0, lt=1)
    dtype: str = knob("float32", "float type of every array", choices=DTYPES)
    head: str = "lm"
    n_classes: int = 2
    pooling: str = knob("last", "how a sequence head pools the hidden states into one vector",
                        choices=H.POOLINGS)
    sequence_output: str = "classify"
    head_hidden: int = knob(0, "0 = linear head, else the hidden width of an MLP head", ge=0)
    causal: bool | None = None
    tie_weights: bool = True
    pad_id: int | None = None
    cls_id: int | None = None
    label_smoothing: float = knob(0.0, "classification label smoothing eps", ge=0, lt=1)
    init_std: float = 0.02
    lora_r: int = 0  # LoRA rank of the adapters the params hold (lora.attach); 0 = none
    lora_alpha: float = 0.0  # LoRA scale s = lora_alpha / lora_r
    lora_dropout: float = knob(0.0, "dropout on the input of each LoRA branch while training "
                                    "(PEFT's lora_dropout)", ge=0, lt=1)
    extra: dict = field(default_factory=dict)  # free-form notes carried into checkpoints

    # The heads split the residual stream into n_head slices of equal width.
    RULES = (Rule("n_embd", "n_head", lambda c: c.n_embd % c.n_head == 0,
                  lambda c, name: f"a multiple of {name('n_head')} ({c.n_head})"),)

    def __post_init__(self):
        check_knobs(self)  # the knob fields and RULES; the other fields are checked here
        check_value(self.vocab_size, int, {"ge": 1}, "GPTConfig.vocab_size")
        if self.head not in H.HEADS:
            raise ValueError(f"GPTConfig.head must be one of {H.HEADS}, got {self.head!r}")
        if self.sequence_output not in H.SEQUENCE_OUTPUTS:
            raise ValueError(
                f"GPTConfig.sequence_output must be one of {H.SEQUENCE_OUTPUTS}, "
                f"got {self.sequence_output!r}"
            )
        if self.n_classes < 1 or (self.head != "lm" and self.n_outputs < 1):
            raise ValueError(f"GPTConfig.n_classes must be >= 1, got {self.n_classes}")
        if self.lora_r < 0 or (self.lora_r and self.lora_alpha <= 0):
            raise ValueError(f"GPTConfig.lora_r must be >= 0 and lora_alpha > 0 with it, "
                             f"got lora_r={self.lora_r}, lora_alpha={self.lora_alpha}")
        if self.head == "sequence" and self.pooling == "cls" and self.cls_id is None:
            raise ValueError("GPTConfig.cls_id must be set for pooling='cls'")
        for name in ("pad_id", "cls_id"):
            value = getattr(self, name)
            if value is not None and not 0 <= value < self.vocab_size:
                raise ValueError(
                    f"GPTConfig.{name} ({value}) must be a token id in [0, {self.vocab_size})"
                )

    @property
    def is_causal(self) -> bool:
        return (self.head == "lm") if self.causal is None else bool(self.causal)

    @property
    def is_scorer(self) -> bool:
        """The sequence head with one sigmoid output in [0, 1] (squared-error loss)."""
        return self.head == "sequence" and self.sequence_output == "score"

    @property
    def n_outputs(self) -> int:
        """Width of the classifier's output: 1 logit for a score, else n_classes."""
        return 1 if self.is_scorer else self.n_classes

    @property
    def lora_scale(self) -> float:
        """s = alpha / r of the LoRA adapters (0 without them)."""
        return self.lora_alpha / self.lora_r if self.lora_r else 0.0

    @property
    def draws_dropout(self) -> bool:
        """Does a training forward draw dropout masks? The model's dropout, or the LoRA
        branch's own (strategies.lora.dropout), which is on also when the model's is 0."""
        return self.dropout > 0 or (self.lora_r > 0 and self.lora_dropout > 0)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------------------
# one transformer block


class BlockCache(NamedTuple):
    """What block_backward needs from block_forward: each layer's own cache."""

    ln1: tuple
    qkv: tuple
    att: tuple
    attproj: tuple
    drop1: object
    ln2: tuple
    fc: tuple
    gelu: tuple
    fcproj: tuple
    drop2: object
    kernels: KernelTable  # backward must invert the very functions forward ran
    lora: frozenset  # the modules that ran with a LoRA detour (their caches are LoRA caches)


def block_linear_forward(K, x, w, module, lora_scale=0.0, lora_dropout=0.0, rng=None):
    """x @ W + b for one of the block's linear modules ("attn.c_attn", ...): the kernel
    table's linear, or lora.lora_linear_forward when the block holds adapters for it."""
    if module + ".lora_A" in w:
        return lora_linear_forward(x, w[module + ".weight"], w[module + ".bias"], w[module + ".lora_A"],
                                   w[module + ".lora_B"], lora_scale, lora_dropout, rng)
    return K.linear_forward(x, w[module + ".weight"], w[module + ".bias"])


def block_linear_backward(K, dout, cache, module, grads, need_dw, lora):
    """The backward of `block_linear_forward`: the gradient at its input; its parameters'
    gradients go into grads (for a LoRA module only lora_A and lora_B: the base weight is frozen)."""
    if module in lora:
        dx, grads[module + ".lora_A"], grads[module + ".lora_B"] = lora_linear_backward(dout, cache)
        return dx
    dx, grads[module + ".weight"], grads[module + ".bias"] = K.linear_backward(
        dout, cache, need_dw=need_dw(module + ".weight"))
    return dx


def block_forward(x, w, n_head, allowed=None, pdrop=0.0, rng=None, kernels=FAST, lora_scale=0.0,
                  lora_dropout=0.0):
    """One pre-LayerNorm block: x + drop(attn(ln_1(x))), then + drop(mlp(ln_2(x))).

    x (B, T, C); w: the block's parameters by their names inside the block ("ln_1.weight",
    "attn.c_attn.weight", ..., and "<module>.lora_A/B" for LoRA adapters, see
    `block_linear_forward`);
    allowed: the attention mask from layers.attention_mask. rng=None runs in inference
    mode (no dropout). Returns (x (B, T, C), BlockCache).
    """
    K = kernels
    lin = lambda x, module: block_linear_forward(K, x, w, module, lora_scale, lora_dropout, rng)  # noqa: E731
    ln1, c_ln1 = K.layernorm_forward(x, w["ln_1.weight"], w["ln_1.bias"])  # (B, T, C)
    qkv, c_qkv = lin(ln1, "attn.c_attn")  # (B, T, 3C)
    atty, c_att = K.attention_forward(qkv, n_head, allowed, pdrop, rng)  # (B, T, C)
    attproj, c_attproj = lin(atty, "attn.c_proj")  # (B, T, C)
    attproj, c_drop1 = K.dropout_forward(attproj, pdrop, rng)  # (B, T, C)
    x = x + attproj  # (B, T, C) residual
    ln2, c_ln2 = K.layernorm_forward(x, w["ln_2.weight"], w["ln_2.bias"])  # (B, T, C)
    fch, c_fc = lin(ln2, "mlp.c_fc")  # (B, T, 4C)
    fch_gelu, c_gelu = K.gelu_forward(fch)  # (B, T, 4C)
    fcproj, c_fcproj = lin(fch_gelu, "mlp.c_proj")  # (B, T, C)
    fcproj, c_drop2 = K.dropout_forward(fcproj, pdrop, rng)  # (B, T, C)
    x = x + fcproj  # (B, T, C) residual
    lora = frozenset(n[:-len(".lora_A")] for n in w if n.endswith(".lora_A"))
    return x, BlockCache(c_ln1, c_qkv, c_att, c_attproj, c_drop1, c_ln2, c_fc, c_gelu, c_fcproj,
                         c_drop2, K, lora)


def block_backward(dx, cache, need_dw=lambda name: True):
    """The block backwards: dx (B, T, C) at its output -> (dx at its input, grads).

    grads maps each parameter's name inside the block to its gradient; a weight for which
    need_dw(name) is False gets None (its product is never computed).
    """
    c, K, grads = cache, cache.kernels, {}
    lin_back = lambda d, cache, module: block_linear_backward(K, d, cache, module, grads, need_dw, c.lora)  # noqa: E731
    # in the forward pass this was: x = x + fcproj. The residual forks, so dx flows
    # unchanged to the block input and also into the MLP branch; gradients add up below
    (dfcproj,) = K.dropout_backward(dx, c.drop2)  # (B, T, C)
    dfch_gelu = lin_back(dfcproj, c.fcproj, "mlp.c_proj")  # (B, T, 4C)
    (dfch,) = K.gelu_backward(dfch_gelu, c.gelu)  # (B, T, 4C)
    dln2 = lin_back(dfch, c.fc, "mlp.c_fc")  # (B, T, C)
    dres, grads["ln_2.weight"], grads["ln_2.bias"] = K.layernorm_backward(dln2, c.ln2)  # (B, T, C)
    dx = dx + dres  # gradients add up at the fork
    # x = x + attproj: the same fork for the attention branch
    (dattproj,) = K.dropout_backward(dx, c.drop1)  # (B, T, C)
    datty = lin_back(dattproj, c.attproj, "attn.c_proj")  # (B, T, C)
    (dqkv,) = K.attention_backward(datty, c.att)  # (B, T, 3C)
    dln1 = lin_back(dqkv, c.qkv, "attn.c_attn")  # (B, T, C)
    dres, grads["ln_1.weight"], grads["ln_1.bias"] = K.layernorm_backward(dln1, c.ln1)  # (B, T, C)
    return dx + dres, grads


@functools.lru_cache(maxsize=None)
def zero_gradient(shape, dtype) -> np.ndarray:
    """The gradient of a frozen or unreached parameter: zeros of that shape, costing nothing.

    A read-only broadcast view of one 0-d zero, shared by every parameter of that shape
    and dtype: no memory, no fill, no allocation per step. It reads as any zero array
    (`g.any()`, `g.shape`, `g.dtype`); writing to it raises, and the optimizer skips it
    when the parameter is frozen (optim.py).
    """
    return np.broadcast_to(np.zeros((), dtype=dtype), shape)


class BackboneCache(NamedTuple):
    emb: tuple
    embdrop: object
    blocks: list  # a BlockCache per block, None for blocks backward will not reach
    lnf: tuple
    lowest: int  # masks.lowest_trainable_depth at forward time


class StepCache(NamedTuple):
    """What backward() needs from one forward: the head's and pooling's caches, the loss's
    gradient with respect to the logits, and the backbone's caches (None: stop at h)."""
    head: object
    pool: object
    dlogits: np.ndarray | None  # None without targets
    backbone: BackboneCache | None


# ----------------------------------------------------------------------------------------
# batch parts in threads (GPT.batch_threads > 1): NumPy releases the GIL inside its ufunc
# loops and BLAS calls, so two threads each running a whole training step (backbone, head,
# loss and their backward) on half of the batch keep both cores busy also in the
# elementwise kernels, which are single-threaded. BLAS runs at one thread in each part, and
# no BLAS call is left outside the parts: OpenBLAS's idle worker would otherwise spin on
# the second core for about 0.1 s after it and slow the part running there.
# Every row of the batch is independent up to the loss, and each part divides its loss by
# the whole batch's count (`loss_count`), so the parts' losses and gradients add up to the
# whole batch's; each weight's gradient is the sum of the parts' gradients, added in part
# order (a fixed order: the same numbers run after run, equal to the one-thread path up to
# float rounding). docs/performance.md#batch-parts-in-threads


class BatchPartsCache(NamedTuple):
    parts: list  # slices of the batch
    caches: list  # a StepCache per part (None for a part a worker process holds)
    workers: BatchWorkers | None = None  # the processes holding parts 1.. (batch_processes)


def batch_parts(model, B: int) -> list[slice] | None:
    """The batch split into model.batch_threads (or batch_processes) parts, or None to run
    it whole: one part asked for, a single row, or dropout active (the parts would draw
    from one RNG in an order the threads decide, so the masks would differ run to run)."""
    if model.batch_threads > 1 and model.batch_processes > 1:
        raise ValueError(f"batch_threads ({model.batch_threads}) and batch_processes "
                         f"({model.batch_processes}): at most one of them can be above 1")
    n = min(max(model.batch_threads, model.batch_processes), B)
    if n <= 1 or (model.training and model.config.draws_dropout):
        return None
    bounds = [B * k // n for k in range(n + 1)]
    return [slice(bounds[k], bounds[k + 1]) for k in range(n)]


def sum_parts(runs, names, threads: int) -> dict:
    """name -> runs[0][name] + runs[1][name] + ..., left to right, for every name; None
    where a part has None (a skipped product). The parts' gradients are new arrays nothing
    else holds, so each sum goes into the first part's (no copy of a (V, C) gradient at
    GPT-2's size). The additions, which the other parts wait for, are split across
    `threads` threads (kernels.split_in_threads: the same numbers)."""
    totals, adds = {}, []
    for name in names:
        arrays = [run[name] for run in runs]
        if any(a is None for a in arrays):
            totals[name] = None
            continue
        first = arrays[0]
        totals[name] = first if first.flags.writeable and first.flags.owndata else first.copy()
        adds.append((totals[name], *arrays[1:]))
    split_in_threads(add_in_order, adds, threads)
    return totals


def add_in_order(total, *others):
    """total += others[0]; total += others[1]; ...: the parts' order, whichever thread runs it."""
    for a in others:
        total += a


def concat_parts(arrays, threads: int) -> np.ndarray:
    """np.concatenate(arrays): the parts' rows, one after another, the copies split across
    `threads` threads (kernels.split_in_threads)."""
    bounds = np.cumsum([0] + [len(a) for a in arrays])
    out = np.empty((bounds[-1], *arrays[0].shape[1:]), dtype=np.result_type(*arrays))
    split_in_threads(np.copyto, [(out[bounds[k]:bounds[k + 1]], a) for k, a in enumerate(arrays)],
                     threads)
    return out


def loss_count(cfg, targets) -> int:
    """How many targets the loss averages over: the counted positions (not IGNORE_INDEX)
    for cross-entropy, every row for the scorer's mean squared error."""
    if cfg.is_scorer:
        return int(targets.size)
    return int(np.count_nonzero(targets != IGNORE_INDEX))


# ----------------------------------------------------------------------------------------
# the model


class GPT:
    """GPT-2 with a hand-written backward pass. See the module docstring."""

    def __init__(self, config: GPTConfig, seed: int = 0, kernels: str | KernelTable = "fast",
                 batch_threads: int = 1, batch_processes: int = 1, params: dict | None = None):
        self.config = config
        self.dtype = np.dtype(config.dtype)
        self.kernels = kernel_table(kernels)
        reuse_freed_memory()  # once per process: no page faults on every step's temporaries
        for knob, n in (("batch_threads", batch_threads), ("batch_processes", batch_processes)):
            if not isinstance(n, int) or isinstance(n, bool) or n < 1:
                raise ValueError(f"{knob} must be a positive integer, got {n!r}")
        # > 1: each step (forward, loss, backward) runs on that many parts of the batch, one
        # thread each (batch_parts); 1: the whole batch in the calling thread
        self.batch_threads = batch_threads
        # or one process each: the first part here, the others in worker processes
        # (workers.py), started at the first step that asks for them
        self.batch_processes = batch_processes
        self._workers: BatchWorkers | None = None
        self.training = True
        self.masks: dict[str, np.ndarray] = {}  # trainable masks, managed by masks.py
        self.rng = np.random.default_rng([seed, 1])  # dropout masks
        self.init_rng = np.random.default_rng([seed, 0])  # weights, new heads, new vocab rows
        if params is None:
            self.params: dict[str, np.ndarray] = self._init_backbone()
            self.params.update(H.init_head(self))
        else:  # these arrays are the weights, as they are (a worker's views of shared memory)
            self.params = dict(params)
        self.clear_caches()

    def _init_backbone(self):
        """GPT-2 initialisation: N(0, 0.02), residual projections scaled by 1/sqrt(2 L)."""
        cfg, C, dt = self.config, self.config.n_embd, self.dtype
        normal = lambda shape, std: (self.init_rng.standard_normal(shape) * std).astype(dt)  # noqa: E731
        p = {"wte.weight": normal((cfg.vocab_size, C), cfg.init_std),
             "wpe.weight": normal((cfg.block_size, C), cfg.init_std)}
        for i in range(cfg.n_layer):
            for name, shape in BLOCK_PARAMS:
                full, shp = f"h.{i}.{name}", shape(C)
                if name.startswith("ln_"):
                    p[full] = (np.ones if name.endswith("weight") else np.zeros)(shp, dtype=dt)
                elif name.endswith("bias"):
                    p[full] = np.zeros(shp, dtype=dt)
                elif name.endswith("c_proj.weight"):  # the two writes into the residual stream
                    p[full] = normal(shp, cfg.init_std / np.sqrt(2 * cfg.n_layer))
                else:
                    p[full] = normal(shp, cfg.init_std)
        p["ln_f.weight"] = np.ones(C, dtype=dt)
        p["ln_f.bias"] = np.zeros(C, dtype=dt)
        return p

    def block_params(self, i: int) -> dict[str, np.ndarray]:
        """Block i's parameters (LoRA adapters included) by their names inside the block."""
        pre = f"h.{i}."
        return {name[len(pre):]: p for name, p in self.params.items() if name.startswith(pre)}

    def lm_weight(self) -> np.ndarray:
        """The (V, C) matrix the LM head multiplies by: wte when tied."""
        return self.params.get("lm_head.weight", self.params["wte.weight"])

    # ------------------------------------------------------------------ modes

    def train(self, mode: bool = True) -> "GPT":
        self.training = mode
        return self

    def eval(self) -> "GPT":
        return self.train(False)

    def clear_caches(self) -> None:
        """Drop the activations the last forward kept for backward."""
        self._cache = None
        self._backbone_cache = None

    # ------------------------------------------------------------------ forward

    def __call__(self, idx, targets=None, attention_mask=None):
        return self.forward(idx, targets, attention_mask)

    def forward(self, idx, targets=None, attention_mask=None):
        """logits, loss = model(idx, targets). loss is None when targets is None.

        idx (B, T) int. attention_mask (B, T), 1 on real tokens (default: idx != pad_id when
        the config names a pad id). Logits: (B, T, V) lm, (B, T, K) token, (B, K) sequence
        classifier, (B,) score in [0, 1] for the sequence scorer. With batch_threads > 1
        the whole step (backbone, head and loss) runs on parts of the batch, one thread
        each (`batch_parts`).
        """
        cfg = self.config
        idx = check_idx(idx, cfg)
        pad_mask = pad_mask_of(idx, attention_mask, cfg.pad_id)
        B, T = idx.shape
        if targets is not None:
            targets = check_targets(targets, cfg, self.dtype, B, T, pad_mask)
        parts = batch_parts(self, B)
        if parts is None:
            h, bb = self._backbone(idx, pad_mask, keep_cache=True)  # (B, T, C)
            logits, loss, self._cache = self._head(h, targets, idx, pad_mask, bb)
            return logits, loss
        # every part divides its loss by the whole batch's count, so the parts' losses
        # and gradients add up to the whole batch's
        count = None if targets is None else loss_count(cfg, targets)

        def run(s):  # one part, start to finish, in its own thread
            return self.part_forward(idx[s], part_of(targets, s), part_of(pad_mask, s), count)

        workers = self.worker_processes()
        if workers is None:
            runs = in_threads(run, parts)
        else:  # the first part here, the others in the worker processes
            runs = workers.forward(self, run, parts, idx, targets, pad_mask, count)
        logits = concat_parts([run[0] for run in runs], len(parts))  # (B, ...)
        loss = None if targets is None else sum(run[1] for run in runs)
        self._cache = BatchPartsCache(parts, [run[2] for run in runs], workers)
        return logits, loss

    def part_forward(self, idx, targets, pad_mask, count):
        """One part of a batch, start to finish (what a thread or a worker process runs):
        (logits, loss, StepCache), the loss divided by the whole batch's `count`."""
        h, bb = self._backbone(idx, pad_mask, keep_cache=True)
        return self._head(h, targets, idx, pad_mask, bb, count)

    def backbone(self, idx, pad_mask=None, keep_cache=False):
        """The transformer up to and including ln_f: h (B, T, C).

        With keep_cache=False nothing is stored for backward (feature extraction), and with
        batch_threads > 1 the batch runs in parts, one thread each (`batch_parts`); with
        keep_cache=True the whole batch runs here and only the blocks backward will reach
        (those at or above the lowest trainable depth) keep their caches, for a
        forward_head(..., keep_backbone=True) to follow.
        """
        parts = None if keep_cache else batch_parts(self, idx.shape[0])
        if parts is None:
            h, self._backbone_cache = self._backbone(idx, pad_mask, keep_cache)
            return h
        run = lambda s: self._backbone(idx[s], part_of(pad_mask, s), False)[0]  # noqa: E731
        workers = self.worker_processes()
        if workers is None:
            hs = in_threads(run, parts)
        else:
            hs = workers.backbone(self, run, parts, idx, pad_mask)
        self._backbone_cache = None
        return concat_parts(hs, len(parts))  # (B, T, C)

    def _backbone(self, idx, pad_mask, keep_cache):
        """backbone() on one batch: (h, BackboneCache or None)."""
        cfg, p, K = self.config, self.params, self.kernels
        T = idx.shape[1]
        lowest = M.lowest_trainable_depth(self)

        def rng_at(depth):  # a frozen part runs in inference mode: no dropout
            return self.rng if (self.training and cfg.draws_dropout and depth >= lowest) else None

        allowed = attention_mask(T, cfg.is_causal, pad_mask)  # (B or 1, 1, T, T)
        x, c_emb = K.embedding_forward(idx, p["wte.weight"], p["wpe.weight"])  # (B, T, C)
        x, c_embdrop = K.dropout_forward(x, cfg.dropout, rng_at(0))  # (B, T, C)
        blocks = []
        for i in range(cfg.n_layer):
            x, c_block = block_forward(x, self.block_params(i), cfg.n_head, allowed, cfg.dropout,
                                       rng_at(i + 1), K, cfg.lora_scale, cfg.lora_dropout)  # (B, T, C)
            # backward stops above a frozen block: its activations can be freed now
            blocks.append(c_block if keep_cache and i + 1 >= lowest else None)
        h, c_lnf = K.layernorm_forward(x, p["ln_f.weight"], p["ln_f.bias"])  # (B, T, C)
        return h, (BackboneCache(c_emb, c_embdrop, blocks, c_lnf, lowest) if keep_cache else None)

    def forward_head(self, h, targets=None, idx=None, attention_mask=None, keep_backbone=False):
        """Run only the head on backbone outputs h (B, T, C), e.g. on cached features.

        `model.backward()` after this call stops at h unless the backbone forward before it
        was `backbone(..., keep_cache=True)` and keep_backbone=True.
        """
        B, T, C = h.shape
        pad_mask = None if attention_mask is None else np.asarray(attention_mask).astype(bool)
        if targets is not None:
            targets = check_targets(targets, self.config, self.dtype, B, T, pad_mask)
        bb = self._backbone_cache if keep_backbone else None
        logits, loss, self._cache = self._head(h, targets, idx, pad_mask, bb)
        return logits, loss

    def _head(self, h, targets, idx, pad_mask, backbone_cache, count=None):
        """The head and the loss on h (B, T, C): (logits, loss, StepCache). The loss is
        divided by `count` when given (a part of a batch), else by what it counts here."""
        cfg = self.config
        B, T, C = h.shape
        pool_cache = None
        if cfg.head == "lm":
            logits, head_cache = H.lm_head_forward(h, self.lm_weight())  # (B, T, V)
        elif cfg.head == "token":
            logits, head_cache = H.classifier_forward(h, self.params, "token_head")  # (B, T, K)
        else:
            positions = H.pool_positions(cfg.pooling, idx, pad_mask, cfg.cls_id, B, T)
            pooled, pool_cache = H.pool_forward(h, cfg.pooling, pad_mask, positions)  # (B, C)
            logits, head_cache = H.classifier_forward(pooled, self.params, "seq_head")  # (B, K)
        loss, dlogits = None, None
        is_score = cfg.is_scorer
        if is_score:
            logits = logits[:, 0]  # (B,) one logit per sequence
        if targets is not None:
            if is_score:
                loss, dlogits = sigmoid_mse(logits, targets, count=count)
                dlogits = dlogits[:, None]  # (B, 1)
            else:
                loss, dlogits = self.kernels.cross_entropy(logits, targets, count=count,
                                                           label_smoothing=cfg.label_smoothing)
        cache = StepCache(head_cache, pool_cache, dlogits, backbone_cache)
        return (sigmoid(logits) if is_score else logits), loss, cache

    # ------------------------------------------------------------------ backward

    def backward(self) -> dict[str, np.ndarray]:
        """Gradients of the last forward's loss for every parameter (same keys and shapes).

        Fully frozen parameters get a zero array (a shared read-only view, `zero_gradient`)
        and none of their work is done. The caches are released at the end: one forward,
        one backward.
        """
        c, p = self._cache, self.params
        steps = c.caches if isinstance(c, BatchPartsCache) else [c]
        # (a part a worker process holds has None here; the worker checks its own)
        if c is None or any(step.dlogits is None for step in steps if step is not None):
            raise RuntimeError("backward() needs a forward pass with targets first")
        if isinstance(c, BatchPartsCache):  # each part's backward in its own thread or process
            if c.workers is None:
                runs = in_threads(self.step_backward, c.caches)
            else:
                runs = c.workers.backward(self.step_backward, c.caches[0])
            grads = sum_parts(runs, p, len(runs))
        else:
            grads = self.step_backward(c)
        for name, g in grads.items():  # frozen or unreached: an explicit zero gradient
            if g is None or M.is_frozen(self, name):
                grads[name] = zero_gradient(p[name].shape, p[name].dtype)
        # the activations are not needed any more: free them now, not at the next forward
        # (a second backward() needs a new forward), see
        # docs/performance.md#memory-caches-released-when-backward-is-done
        self.clear_caches()
        return grads

    def step_backward(self, c) -> dict:
        """_backward of one StepCache (the whole batch's, or a part's in a thread or a worker
        process) with the model's own frozen parameters."""
        return self._backward(c, lambda name: not M.is_frozen(self, name))

    def _backward(self, c, trains) -> dict:
        """The chain rule from one StepCache's dlogits down: every parameter's gradient by
        name, None where nothing was computed."""
        cfg, p = self.config, self.params
        grads: dict[str, np.ndarray | None] = {name: None for name in p}
        # the head: in the forward pass this was logits = head(h)
        if cfg.head == "lm":
            head_w = "lm_head.weight" if "lm_head.weight" in p else "wte.weight"
            dh, grads[head_w] = H.lm_head_backward(c.dlogits, c.head, need_dw=trains(head_w))
        else:
            dx, head_grads = H.classifier_backward(c.dlogits, c.head, H.HEAD_PREFIX[cfg.head])
            grads.update(head_grads)
            dh = dx if c.pool is None else H.pool_backward(dx, c.pool)  # (B, T, C)
        # tied: the embedding and the LM head both use wte, so their gradients add up (the
        # embedding's backward adds its rows into the head's gradient)
        grads.update(self._backbone_backward(dh, c.backbone, trains, head_dwte=grads["wte.weight"]))
        return grads

    def _backbone_backward(self, dh, bb, trains, head_dwte=None) -> dict:
        """From dh (B, T, C) at the backbone's output down to the lowest trainable depth:
        the backbone's gradients by name (None where a product was skipped). head_dwte:
        the tied LM head's gradient of wte, which the embedding's gradient is added into."""
        K, L, grads = self.kernels, self.config.n_layer, {}
        if bb is None or bb.lowest > L + 1:
            return grads
        # h = ln_f(x)
        dx, grads["ln_f.weight"], grads["ln_f.bias"] = K.layernorm_backward(dh, bb.lnf)  # (B, T, C)
        for i in reversed(range(L)):
            if bb.lowest > i + 1:
                break  # nothing below trains: stop the chain rule here
            pre = f"h.{i}."
            dx, block_grads = block_backward(dx, bb.blocks[i], lambda n: trains(pre + n))  # (B, T, C)
            grads.update({pre + n: g for n, g in block_grads.items()})
        if bb.lowest == 0:
            # x = dropout(wte[idx] + wpe[:T])
            (dx,) = K.dropout_backward(dx, bb.embdrop)
            grads["wte.weight"], grads["wpe.weight"] = K.embedding_backward(dx, bb.emb, head_dwte)
        return grads

    # ------------------------------------------------------------------ processes

    def worker_processes(self) -> BatchWorkers | None:
        """The worker processes batch_processes > 1 asks for (started on first use, and
        again when the number changes or one has died), or None to run the parts in
        threads."""
        n = self.batch_processes - 1
        if n < 1:
            return None
        if self._workers is None or self._workers.n_workers != n or not self._workers.alive:
            if self._workers is not None:
                self._workers.close()
            self._workers = BatchWorkers(n)
        return self._workers

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, np.ndarray]:
        """A copy of the parameters, name -> array."""
        return {name: value.copy() for name, value in self.params.items()}

    def load_state_dict(self, state, strict: bool = False) -> weights.LoadReport:
        """Copy tensors in from a state dict this or another tool wrote: weights.load_state_dict."""
        return weights.load_state_dict(self, state, strict)

    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, seed=None,
                 stop_token=None):
        """Continue idx (B, T) by max_new_tokens, one token per step with a KV cache:
        generate.generate (temperature 0 = greedy; top-k, top-p; a seed; a stop token)."""
        from .generate import generate

        return generate(self, idx, max_new_tokens, temperature, top_k, top_p, seed, stop_token)

    def set_head(self, head: str, **changes) -> "GPT":
        """Switch to another head on the same backbone: heads.set_head."""
        return H.set_head(self, head, **changes)

    def resize_vocab(self, new_vocab_size: int, std: float | None = None) -> "GPT":
        """Grow the vocabulary (e.g. for a CLS token): heads.resize_vocab."""
        return H.resize_vocab(self, new_vocab_size, std)


# ----------------------------------------------------------------------------------------
# input checks: one clear message for each way an input can be wrong


def worker_model(config: GPTConfig, kernels: KernelTable, params: dict, frozen: list) -> GPT:
    """A worker process's copy of a model: `params` (views of the shared block) as its
    weights, and the same parameters frozen (workers.py)."""
    # no initialisation to throw away (GPT-2 124M's takes seconds, and a worker rebuilds at
    # every change of the frozen set); LoRA adapters and heads included, looked up by name
    model = GPT(config, kernels=kernels, params=params)
    for name in frozen:  # masks.freeze's mask, so masks.is_frozen holds for each
        model.masks[name] = M.frozen_mask(params[name])
    return model


def check_idx(idx, config: GPTConfig) -> np.ndarray:
    """idx as a 2-D integer array (B, T) with T <= block_size and every id in the vocabulary."""
    idx = np.asarray(idx)
    if idx.ndim != 2 or not np.issubdtype(idx.dtype, np.integer):
        raise ValueError(f"idx must be a 2-D integer array (B, T), got shape {idx.shape} dtype {idx.dtype}")
    T, V, bs = idx.shape[1], config.vocab_size, config.block_size
    if T > bs:
        raise ValueError(f"sequence length {T} exceeds block_size {bs}")
    if idx.size and (idx.min() < 0 or idx.max() >= V):
        bad = np.argwhere((idx < 0) | (idx >= V))[0]
        raise ValueError(f"token id {int(idx[tuple(bad)])} at position {tuple(int(i) for i in bad)} "
                         f"is outside the vocabulary [0, {V})")
    return idx


def pad_mask_of(idx, attention_mask, pad_id):
    """(B, T) bool, True on real tokens: the given mask, else idx != pad_id, else None."""
    if attention_mask is not None:
        mask = np.asarray(attention_mask).astype(bool)
        if mask.shape != idx.shape:
            raise ValueError(f"attention_mask must have shape {idx.shape}, got {mask.shape}")
        return mask
    return None if pad_id is None else idx != pad_id


def check_targets(targets, cfg: GPTConfig, dtype, B, T, pad_mask):
    """Targets of the right shape and range for the head; padding set to IGNORE_INDEX."""
    targets = np.asarray(targets)
    per_token = cfg.head in ("lm", "token")
    want = (B, T) if per_token else (B,)
    if targets.shape != want:
        raise ValueError(f"targets for the {cfg.head} head must have shape {want}, got {targets.shape}")
    if cfg.is_scorer:
        if not np.all((targets >= 0) & (targets <= 1)):
            raise ValueError("score targets must lie in [0, 1]")
        return targets.astype(dtype)
    if not np.issubdtype(targets.dtype, np.integer):
        raise ValueError(f"class targets must be integers, got dtype {targets.dtype}")
    n_out = cfg.vocab_size if cfg.head == "lm" else cfg.n_classes
    bad = (targets != IGNORE_INDEX) & ((targets < 0) | (targets >= n_out))
    if bad.any():
        raise ValueError(f"target {int(targets[bad][0])} is outside [0, {n_out}) "
                         f"(use {IGNORE_INDEX} to ignore a position)")
    if per_token and pad_mask is not None:
        targets = np.where(pad_mask, targets, IGNORE_INDEX)  # padding never counts
    return targets
