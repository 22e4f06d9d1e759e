"""GPT-2 in NumPy: parameters, forward pass, backward pass, heads, and loading weights.

    x = wte[idx] + wpe[:T]                                   embedding (+ dropout)
    for each block:  x = x + drop(attn(ln_1(x)))              pre-LayerNorm residual blocks
                     x = x + drop(mlp(ln_2(x)))
    h = ln_f(x)                                               backbone output (B, T, C)
    logits, loss = head(h, targets)                           lm / token / sequence head

Parameter names and shapes are those of Hugging Face's GPT2Model state dict (without the
`transformer.` prefix), weights laid out [in, out] so every linear layer is x @ W + b.

`model.backward()` runs the chain rule back through exactly the caches the last forward
stored. It honours `model.masks` (name -> 0/1 array, see masks.py): a fully frozen tensor
gets no gradient computed (a zero array is returned in its place), frozen blocks run in
inference mode (no dropout), and the backward pass stops below the lowest trainable
parameter, so with a frozen backbone only the head's backward runs.

Docs: docs/model.md, docs/residual.md (fan-out gradients), docs/tied_weights.md.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field

import numpy as np

from . import heads as H
from .layers import (
    attention_backward,
    attention_forward,
    attention_mask,
    dropout_backward,
    dropout_forward,
    embedding_backward,
    embedding_forward,
    gelu_backward,
    gelu_forward,
    layernorm_backward,
    layernorm_forward,
    linear_backward,
    linear_forward,
)
from .losses import IGNORE_INDEX, cross_entropy, sigmoid, sigmoid_mse

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
# prefixes other tools put in front of GPT-2's names (HF, torch.compile, DataParallel)
STRIP_PREFIXES = ("_orig_mod.", "module.", "transformer.")
# non-parameter buffers in GPT-2 checkpoints: the causal mask and its fill value
BUFFER_RE = re.compile(r"^h\.\d+\.attn\.(bias|masked_bias)$")


@dataclass
class GPTConfig:
    """Everything that fixes the model's shapes and behaviour.

    `head` picks the head: "lm" (next token), "token" (a class per token) or "sequence"
    (pool, then `sequence_output` "classify" into n_classes, or "score" in [0, 1]).
    `causal=None` means: causal for the LM head, bidirectional for the others.
    """

    vocab_size: int
    block_size: int
    n_layer: int = 2
    n_head: int = 4
    n_embd: int = 64
    dropout: float = 0.0
    dtype: str = "float32"
    head: str = "lm"
    n_classes: int = 2
    pooling: str = "last"
    sequence_output: str = "classify"
    head_hidden: int = 0
    causal: bool | None = None
    tie_weights: bool = True
    pad_id: int | None = None
    cls_id: int | None = None
    label_smoothing: float = 0.0
    init_std: float = 0.02
    extra: dict = field(default_factory=dict)  # free-form notes carried into checkpoints

    def __post_init__(self):
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
                raise ValueError(f"GPTConfig.{name} must be a positive integer, got {value!r}")
        if self.n_embd % self.n_head:
            raise ValueError(
                f"GPTConfig.n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})"
            )
        if self.dtype not in DTYPES:
            raise ValueError(f"GPTConfig.dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.head not in H.HEADS:
            raise ValueError(f"GPTConfig.head must be one of {H.HEADS}, got {self.head!r}")
        if self.pooling not in H.POOLINGS:
            raise ValueError(f"GPTConfig.pooling must be one of {H.POOLINGS}, got {self.pooling!r}")
        if self.sequence_output not in H.SEQUENCE_OUTPUTS:
            raise ValueError(
                f"GPTConfig.sequence_output must be one of {H.SEQUENCE_OUTPUTS}, "
                f"got {self.sequence_output!r}"
            )
        if self.n_classes < 1 or (self.head != "lm" and self.n_outputs < 1):
            raise ValueError(f"GPTConfig.n_classes must be >= 1, got {self.n_classes}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"GPTConfig.dropout must be in [0, 1), got {self.dropout}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"GPTConfig.label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.head_hidden < 0:
            raise ValueError(f"GPTConfig.head_hidden must be >= 0, got {self.head_hidden}")
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
    def n_outputs(self) -> int:
        """Width of the classifier's output: 1 logit for a score, else n_classes."""
        return 1 if (self.head == "sequence" and self.sequence_output == "score") else self.n_classes

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class LoadReport:
    """What `load_state_dict` did with each key."""

    loaded: list = field(default_factory=list)
    missing: list = field(default_factory=list)
    unexpected: list = field(default_factory=list)
    mismatched: list = field(default_factory=list)  # (name, expected shape, got shape)
    ignored: list = field(default_factory=list)  # buffers and tied aliases, with the reason
    # filled by checkpoint.load_into (partial loading for transfer):
    resized: list = field(default_factory=list)  # (name, model shape, checkpoint shape, how)
    reasons: dict = field(default_factory=dict)  # name -> why it was not loaded as it is

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def __str__(self) -> str:
        lines = [f"loaded {len(self.loaded)} tensors"]
        if self.missing:
            lines.append(f"missing ({len(self.missing)}): {', '.join(self.missing)}")
        if self.unexpected:
            lines.append(f"unexpected ({len(self.unexpected)}): {', '.join(self.unexpected)}")
        for name, want, got in self.mismatched:
            lines.append(f"shape mismatch: {name} expects {want}, checkpoint has {got} (skipped)")
        for name, want, got, how in self.resized:
            lines.append(f"resized ({how}): {name} {got} -> {want}, the overlap copied")
        if self.ignored:
            lines.append(f"ignored ({len(self.ignored)}): " + ", ".join(n for n, _ in self.ignored))
        return "\n".join(lines)


def canonical_name(key: str) -> str:
    """Strip the prefixes other tools add (`transformer.`, `_orig_mod.`, `module.`)."""
    changed = True
    while changed:
        changed = False
        for prefix in STRIP_PREFIXES:
            if key.startswith(prefix):
                key, changed = key[len(prefix):], True
    return key


class GPT:
    """GPT-2 with a hand-written backward pass. See the module docstring."""

    def __init__(self, config: GPTConfig, seed: int = 0):
        self.config = config
        self.dtype = np.dtype(config.dtype)
        self.training = True
        self.masks: dict[str, np.ndarray] = {}  # trainable masks, managed by masks.py
        self.rng = np.random.default_rng([seed, 1])  # dropout masks
        self._init_rng = np.random.default_rng([seed, 0])  # weights
        self.params: dict[str, np.ndarray] = self._init_backbone()
        self.params.update(self._init_head())
        self._cache = None
        self._backbone_cache = None

    # ------------------------------------------------------------------ parameters

    def _normal(self, shape, std):
        return (self._init_rng.standard_normal(shape) * std).astype(self.dtype)

    def _init_backbone(self):
        """GPT-2 initialisation: N(0, 0.02), residual projections scaled by 1/sqrt(2 L)."""
        cfg, C = self.config, self.config.n_embd
        std, dt = cfg.init_std, self.dtype
        p = {
            "wte.weight": self._normal((cfg.vocab_size, C), std),
            "wpe.weight": self._normal((cfg.block_size, C), std),
        }
        for i in range(cfg.n_layer):
            for name, shape in BLOCK_PARAMS:
                full, shp = f"h.{i}.{name}", shape(C)
                if name.startswith("ln_"):
                    p[full] = (np.ones if name.endswith("weight") else np.zeros)(shp, dtype=dt)
                elif name.endswith("bias"):
                    p[full] = np.zeros(shp, dtype=dt)
                elif name.endswith("c_proj.weight"):  # the two writes into the residual stream
                    p[full] = self._normal(shp, std / np.sqrt(2 * cfg.n_layer))
                else:
                    p[full] = self._normal(shp, std)
        p["ln_f.weight"] = np.ones(C, dtype=dt)
        p["ln_f.bias"] = np.zeros(C, dtype=dt)
        return p

    def _init_head(self):
        cfg = self.config
        if cfg.head == "lm":
            if cfg.tie_weights:
                return {}
            return {"lm_head.weight": self.params["wte.weight"].copy()}
        prefix = H.HEAD_PREFIX[cfg.head]
        return H.init_classifier(
            prefix, cfg.n_embd, cfg.n_outputs, cfg.head_hidden, self._init_rng, self.dtype
        )

    def head_param_names(self) -> list[str]:
        """Names of the head's own parameters (empty for a tied LM head)."""
        return [n for n in self.params if n.startswith(("lm_head.", "token_head.", "seq_head."))]

    def lm_weight(self) -> np.ndarray:
        """The (V, C) matrix the LM head multiplies by: wte when tied."""
        return self.params.get("lm_head.weight", self.params["wte.weight"])

    def set_head(self, head: str, **changes) -> "GPT":
        """Switch to another head on the same backbone, e.g. LM -> sequence classifier.

        LM -> classifier breaks the wte tie first: the classifier never touches wte, so
        freezing the backbone then really freezes the embedding. A new classifier starts
        small (std 0.002; Xavier for an MLP head). Classifier -> LM restores the tied head
        (unless tie_weights=False is passed, which copies wte into its own lm_head.weight).
        Returns self. See docs/head_switching.md.
        """
        old_head_names = self.head_param_names()
        self.config = dataclasses.replace(self.config, head=head, **changes)
        for name in old_head_names:
            del self.params[name]
            self.masks.pop(name, None)
        self.params.update(self._init_head())
        self._cache = None
        return self

    def resize_vocab(self, new_vocab_size: int, std: float | None = None) -> "GPT":
        """Grow (or shrink) the vocabulary: old wte rows are kept, new rows drawn N(0, std).

        Used to add a CLS token for CLS pooling. A tied LM head follows automatically; an
        untied lm_head.weight is resized the same way. Any mask on wte is resized too (new
        rows trainable, old rows as they were).
        """
        old = self.config.vocab_size
        std = self.config.init_std if std is None else std
        # validate first (e.g. a pad_id or cls_id beyond the new size), before changing params
        new_config = dataclasses.replace(self.config, vocab_size=new_vocab_size)
        for name in ("wte.weight", "lm_head.weight"):
            if name not in self.params:
                continue
            w = self.params[name]
            new = np.empty((new_vocab_size, w.shape[1]), dtype=self.dtype)
            keep = min(old, new_vocab_size)
            new[:keep] = w[:keep]
            new[keep:] = self._normal((max(new_vocab_size - old, 0), w.shape[1]), std)
            self.params[name] = new
            if name in self.masks:
                mask = np.broadcast_to(self.masks[name], w.shape)
                grown = np.ones((new_vocab_size, w.shape[1]), dtype=mask.dtype)
                grown[:keep] = mask[:keep]
                self.masks[name] = grown
        self.config = new_config
        return self

    # ------------------------------------------------------------------ modes

    def train(self, mode: bool = True) -> "GPT":
        self.training = mode
        return self

    def eval(self) -> "GPT":
        return self.train(False)

    def frozen(self, name: str) -> bool:
        """True when every entry of the parameter is masked out (no gradient needed)."""
        mask = self.masks.get(name)
        return mask is not None and not np.any(mask)

    def _level_names(self, level: int) -> list[str]:
        """Parameters by depth: 0 embeddings, 1..L blocks, L+1 ln_f, L+2 the head."""
        L = self.config.n_layer
        if level == 0:
            return ["wte.weight", "wpe.weight"]
        if level <= L:
            return [f"h.{level - 1}.{name}" for name, _ in BLOCK_PARAMS]
        if level == L + 1:
            return ["ln_f.weight", "ln_f.bias"]
        return self.head_param_names() or ["wte.weight"]  # a tied LM head is wte

    def lowest_trainable_level(self) -> int:
        """The depth the backward pass must reach; L + 3 when nothing trains at all."""
        for level in range(self.config.n_layer + 3):
            if not all(self.frozen(n) for n in self._level_names(level)):
                return level
        return self.config.n_layer + 3

    # ------------------------------------------------------------------ input checks

    def _check_idx(self, idx):
        idx = np.asarray(idx)
        if idx.ndim != 2 or not np.issubdtype(idx.dtype, np.integer):
            raise ValueError(
                f"idx must be a 2-D integer array (B, T), got shape {idx.shape} dtype {idx.dtype}"
            )
        B, T = idx.shape
        V, bs = self.config.vocab_size, self.config.block_size
        if T > bs:
            raise ValueError(f"sequence length {T} exceeds block_size {bs}")
        if idx.size and (idx.min() < 0 or idx.max() >= V):
            bad = np.argwhere((idx < 0) | (idx >= V))[0]
            raise ValueError(
                f"token id {int(idx[tuple(bad)])} at position {tuple(int(i) for i in bad)} "
                f"is outside the vocabulary [0, {V})"
            )
        return idx

    def _pad_mask(self, idx, attention_mask):
        if attention_mask is not None:
            mask = np.asarray(attention_mask).astype(bool)
            if mask.shape != idx.shape:
                raise ValueError(f"attention_mask must have shape {idx.shape}, got {mask.shape}")
            return mask
        if self.config.pad_id is not None:
            return idx != self.config.pad_id
        return None

    def _check_targets(self, targets, B, T, pad_mask):
        cfg = self.config
        targets = np.asarray(targets)
        per_token = cfg.head in ("lm", "token")
        want = (B, T) if per_token else (B,)
        if targets.shape != want:
            raise ValueError(f"targets for the {cfg.head} head must have shape {want}, got {targets.shape}")
        if cfg.head == "sequence" and cfg.sequence_output == "score":
            if not np.all((targets >= 0) & (targets <= 1)):
                raise ValueError("score targets must lie in [0, 1]")
            return targets.astype(self.dtype)
        if not np.issubdtype(targets.dtype, np.integer):
            raise ValueError(f"class targets must be integers, got dtype {targets.dtype}")
        n_out = cfg.vocab_size if cfg.head == "lm" else cfg.n_classes
        bad = (targets != IGNORE_INDEX) & ((targets < 0) | (targets >= n_out))
        if bad.any():
            raise ValueError(
                f"target {int(targets[bad][0])} is outside [0, {n_out}) "
                f"(use {IGNORE_INDEX} to ignore a position)"
            )
        if per_token and pad_mask is not None:
            targets = np.where(pad_mask, targets, IGNORE_INDEX)  # padding never counts
        return targets

    # ------------------------------------------------------------------ forward

    def __call__(self, idx, targets=None, attention_mask=None):
        return self.forward(idx, targets, attention_mask)

    def forward(self, idx, targets=None, attention_mask=None):
        """logits, loss = model(idx, targets). loss is None when targets is None.

        idx (B, T) int. attention_mask (B, T), 1 on real tokens (default: idx != pad_id when
        the config names a pad id). Logits: (B, T, V) lm, (B, T, K) token, (B, K) sequence
        classifier, (B,) score in [0, 1] for the sequence scorer.
        """
        idx = self._check_idx(idx)
        pad_mask = self._pad_mask(idx, attention_mask)
        h = self.backbone(idx, pad_mask, keep_cache=True)
        return self.forward_head(h, targets, idx=idx, attention_mask=pad_mask, keep_backbone=True)

    def backbone(self, idx, pad_mask=None, keep_cache=False):
        """The transformer up to and including ln_f: h (B, T, C).

        With keep_cache=False nothing is stored for backward (feature extraction); with
        keep_cache=True only the blocks backward will reach (those at or above the lowest
        trainable level) keep their caches.
        """
        cfg, p = self.config, self.params
        B, T = idx.shape
        NH, pdrop = cfg.n_head, cfg.dropout
        lowest = self.lowest_trainable_level()

        def rng_at(level):  # a frozen part runs in inference mode: no dropout
            return self.rng if (self.training and pdrop > 0 and level >= lowest) else None

        allowed = attention_mask(T, cfg.is_causal, pad_mask)  # (B or 1, 1, T, T)
        x, c_emb = embedding_forward(idx, p["wte.weight"], p["wpe.weight"])  # (B, T, C)
        x, c_embdrop = dropout_forward(x, pdrop, rng_at(0))
        blocks = []
        for i in range(cfg.n_layer):
            pre, rng = f"h.{i}.", rng_at(i + 1)
            ln1, c_ln1 = layernorm_forward(x, p[pre + "ln_1.weight"], p[pre + "ln_1.bias"])  # (B, T, C)
            qkv, c_qkv = linear_forward(ln1, p[pre + "attn.c_attn.weight"], p[pre + "attn.c_attn.bias"])  # (B, T, 3C)
            atty, c_att = attention_forward(qkv, NH, allowed, pdrop, rng)  # (B, T, C)
            attproj, c_attproj = linear_forward(atty, p[pre + "attn.c_proj.weight"], p[pre + "attn.c_proj.bias"])  # (B, T, C)
            attproj, c_drop1 = dropout_forward(attproj, pdrop, rng)
            x = x + attproj  # (B, T, C) residual
            ln2, c_ln2 = layernorm_forward(x, p[pre + "ln_2.weight"], p[pre + "ln_2.bias"])  # (B, T, C)
            fch, c_fc = linear_forward(ln2, p[pre + "mlp.c_fc.weight"], p[pre + "mlp.c_fc.bias"])  # (B, T, 4C)
            fch_gelu, c_gelu = gelu_forward(fch)  # (B, T, 4C)
            fcproj, c_fcproj = linear_forward(fch_gelu, p[pre + "mlp.c_proj.weight"], p[pre + "mlp.c_proj.bias"])  # (B, T, C)
            fcproj, c_drop2 = dropout_forward(fcproj, pdrop, rng)
            x = x + fcproj  # (B, T, C) residual
            if keep_cache and i + 1 >= lowest:
                blocks.append((c_ln1, c_qkv, c_att, c_attproj, c_drop1, c_ln2, c_fc, c_gelu, c_fcproj, c_drop2))
            else:  # backward stops above a frozen block: its activations can be freed now
                blocks.append(None)
        h, c_lnf = layernorm_forward(x, p["ln_f.weight"], p["ln_f.bias"])  # (B, T, C)
        self._backbone_cache = (c_emb, c_embdrop, blocks, c_lnf, lowest) if keep_cache else None
        return h

    def forward_head(self, h, targets=None, idx=None, attention_mask=None, keep_backbone=False):
        """Run only the head on backbone outputs h (B, T, C), e.g. on cached features.

        `model.backward()` after this call stops at h unless the backbone forward was run
        by `forward` (keep_backbone=True).
        """
        cfg = self.config
        B, T, C = h.shape
        pad_mask = None if attention_mask is None else np.asarray(attention_mask).astype(bool)
        if targets is not None:
            targets = self._check_targets(targets, B, T, pad_mask)
        pool_cache = None
        if cfg.head == "lm":
            logits, head_cache = H.lm_head_forward(h, self.lm_weight())  # (B, T, V)
        elif cfg.head == "token":
            logits, head_cache = H.classifier_forward(h, self.params, "token_head")  # (B, T, K)
        else:
            positions = self._pool_positions(idx, pad_mask, B, T)
            pooled, pool_cache = H.pool_forward(h, cfg.pooling, pad_mask, positions)  # (B, C)
            logits, head_cache = H.classifier_forward(pooled, self.params, "seq_head")  # (B, K)
        loss, dlogits = None, None
        is_score = cfg.head == "sequence" and cfg.sequence_output == "score"
        if is_score:
            logits = logits[:, 0]  # (B,) one logit per sequence
        if targets is not None:
            if is_score:
                loss, dlogits = sigmoid_mse(logits, targets)
                dlogits = dlogits[:, None]
            else:
                loss, dlogits = cross_entropy(logits, targets, label_smoothing=cfg.label_smoothing)
        self._cache = {
            "head": head_cache,
            "pool": pool_cache,
            "dlogits": dlogits,
            "backbone": self._backbone_cache if keep_backbone else None,
        }
        out = sigmoid(logits) if is_score else logits
        return out, loss

    def _pool_positions(self, idx, pad_mask, B, T):
        pooling = self.config.pooling
        if pooling == "cls":
            if idx is None:
                raise ValueError("CLS pooling needs the token ids (pass idx=...)")
            is_cls = idx == self.config.cls_id  # (B, T)
            missing = ~is_cls.any(axis=1)
            if missing.any():
                raise ValueError(
                    f"CLS pooling: row {int(np.argmax(missing))} has no CLS token "
                    f"(id {self.config.cls_id})"
                )
            return is_cls.argmax(axis=1)  # the first CLS of each row
        if pooling == "last":
            if pad_mask is None:
                return np.full(B, T - 1)
            return T - 1 - pad_mask[:, ::-1].argmax(axis=1)  # last real token
        return None

    # ------------------------------------------------------------------ backward

    def backward(self) -> dict[str, np.ndarray]:
        """Gradients of the last forward's loss for every parameter (same keys and shapes).

        Fully frozen parameters get a zero array and none of their work is done.
        """
        if self._cache is None or self._cache["dlogits"] is None:
            raise RuntimeError("backward() needs a forward pass with targets first")
        cfg, p = self.config, self.params
        c = self._cache
        grads: dict[str, np.ndarray | None] = {name: None for name in p}
        need = lambda name: not self.frozen(name)  # noqa: E731

        dlogits = c["dlogits"]
        if cfg.head == "lm":
            head_w = "lm_head.weight" if "lm_head.weight" in p else "wte.weight"
            dh, grads[head_w] = H.lm_head_backward(dlogits, c["head"], need_dw=need(head_w))
        else:
            prefix = H.HEAD_PREFIX[cfg.head]
            dx, head_grads = H.classifier_backward(dlogits, c["head"], prefix)
            grads.update(head_grads)
            dh = dx if c["pool"] is None else H.pool_backward(dx, c["pool"])  # (B, T, C)

        bb = c["backbone"]
        if bb is not None:
            c_emb, c_embdrop, blocks, c_lnf, lowest = bb
            L = cfg.n_layer
            if lowest <= L + 1:
                dx, grads["ln_f.weight"], grads["ln_f.bias"] = layernorm_backward(dh, c_lnf)
                for i in reversed(range(L)):
                    if lowest > i + 1:
                        break  # nothing below trains: stop the chain rule here
                    dx = self._block_backward(dx, blocks[i], f"h.{i}.", grads, need)
                if lowest == 0:
                    (dx,) = dropout_backward(dx, c_embdrop)
                    dwte, grads["wpe.weight"] = embedding_backward(dx, c_emb)
                    if grads["wte.weight"] is not None:
                        grads["wte.weight"] += dwte  # tied: the embedding and the LM head both use wte
                    else:
                        grads["wte.weight"] = dwte

        for name, g in grads.items():  # frozen or unreached: an explicit zero gradient
            if g is None or self.frozen(name):
                grads[name] = np.zeros_like(p[name])
        return grads

    @staticmethod
    def _block_backward(dx, caches, pre, grads, need):
        """One transformer block backwards. dx is the gradient at the block's output."""
        c_ln1, c_qkv, c_att, c_attproj, c_drop1, c_ln2, c_fc, c_gelu, c_fcproj, c_drop2 = caches
        # in the forward pass this was: x = x + fcproj. The residual forks, so dx flows
        # unchanged to the block input and also into the MLP branch; gradients add up below.
        (dfcproj,) = dropout_backward(dx, c_drop2)
        dfch_gelu, grads[pre + "mlp.c_proj.weight"], grads[pre + "mlp.c_proj.bias"] = linear_backward(
            dfcproj, c_fcproj, need_dw=need(pre + "mlp.c_proj.weight"))  # (B, T, 4C)
        (dfch,) = gelu_backward(dfch_gelu, c_gelu)  # (B, T, 4C)
        dln2, grads[pre + "mlp.c_fc.weight"], grads[pre + "mlp.c_fc.bias"] = linear_backward(
            dfch, c_fc, need_dw=need(pre + "mlp.c_fc.weight"))  # (B, T, C)
        dres, grads[pre + "ln_2.weight"], grads[pre + "ln_2.bias"] = layernorm_backward(dln2, c_ln2)
        dx = dx + dres  # gradients add up at the fork
        # x = x + attproj: the same fork for the attention branch
        (dattproj,) = dropout_backward(dx, c_drop1)
        datty, grads[pre + "attn.c_proj.weight"], grads[pre + "attn.c_proj.bias"] = linear_backward(
            dattproj, c_attproj, need_dw=need(pre + "attn.c_proj.weight"))  # (B, T, C)
        (dqkv,) = attention_backward(datty, c_att)  # (B, T, 3C)
        dln1, grads[pre + "attn.c_attn.weight"], grads[pre + "attn.c_attn.bias"] = linear_backward(
            dqkv, c_qkv, need_dw=need(pre + "attn.c_attn.weight"))  # (B, T, C)
        dres, grads[pre + "ln_1.weight"], grads[pre + "ln_1.bias"] = layernorm_backward(dln1, c_ln1)
        return dx + dres

    # ------------------------------------------------------------------ loading weights

    def state_dict(self) -> dict[str, np.ndarray]:
        """A copy of the parameters, name -> array."""
        return {name: value.copy() for name, value in self.params.items()}

    def load_state_dict(self, state, strict: bool = False) -> LoadReport:
        """Copy tensors from a name -> array mapping written by this or another tool.

        Strips `transformer.`, `_orig_mod.` and `module.` prefixes; takes a tied
        `lm_head.weight` as `wte.weight`; ignores GPT-2's attention buffers; skips tensors
        whose shape does not match. Values may be NumPy arrays or anything np.asarray
        takes (torch tensors included). Arrays are copied into the existing parameter
        arrays, so an optimizer holding them keeps working. strict=True raises ValueError
        unless every parameter was loaded and nothing was left over.
        """
        report = LoadReport()
        incoming = {}
        for key, value in state.items():
            name = canonical_name(key)
            if BUFFER_RE.match(name):
                report.ignored.append((key, "GPT-2 attention buffer, not a parameter"))
                continue
            incoming[name] = (key, value)
        if "lm_head.weight" in incoming and "lm_head.weight" not in self.params:
            key, value = incoming.pop("lm_head.weight")
            if self.config.head != "lm":
                report.ignored.append((key, f"the model has a {self.config.head} head, no LM head"))
            elif "wte.weight" in incoming:
                report.ignored.append(
                    (key, "the model's LM head is tied to wte.weight, which the state dict also holds"))
            else:
                incoming["wte.weight"] = (key, value)
        for name, (key, value) in incoming.items():
            if name not in self.params:
                report.unexpected.append(key)
                continue
            array = np.asarray(value.detach().cpu().numpy() if hasattr(value, "detach") else value)
            if array.shape != self.params[name].shape:
                report.mismatched.append((name, self.params[name].shape, array.shape))
                continue
            self.params[name][...] = array.astype(self.dtype, copy=False)
            report.loaded.append(name)
        report.missing = [n for n in self.params if n not in report.loaded]
        if strict and not report.ok:
            raise ValueError(f"load_state_dict(strict=True) failed:\n{report}")
        return report
