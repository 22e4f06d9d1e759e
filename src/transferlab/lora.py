"""LoRA (Hu et al., arXiv 2106.09685) with PEFT's semantics, as NumPy layer pairs.

A frozen linear layer y = x @ W + b gets a trainable low-rank detour:

    y = x @ W + b + s * dropout(x) @ A @ B,        s = alpha / r
    A (IN, r)   Kaiming-uniform, bound 1/sqrt(IN)   (PEFT's lora_A, transposed)
    B (r, OUT)  zeros, so the adapted model starts exactly at the pretrained one

Only A and B train: r * (IN + OUT) numbers per adapted matrix instead of IN * OUT.
Adapters are named after the module they adapt, `h.{i}.attn.c_attn.lora_A` (IN, r) and
`h.{i}.attn.c_attn.lora_B` (r, OUT), in the [in, out] layout of the rest of the model, so
our update s * A @ B is PEFT's s * lora_B.weight @ lora_A.weight transposed
(`to_peft` / `from_peft` convert names and layouts). Docs: docs/lora.md.

In the model: `lora.attach(model, r, alpha, dropout, targets)` adds the adapters to
model.params and sets GPTConfig.lora_r / lora_alpha / lora_dropout; the block's four
linear modules go through model.block_linear_forward / block_linear_backward, which call
lora_linear_forward / lora_linear_backward for a module that has adapters (its frozen
weight and bias get no gradient). The `lora` strategy (strategies.py) attaches them and
masks everything but the adapters and the head (masks.adapters_only). For inference,
`merge` folds s * A @ B into W once and the plain linear runs at zero extra cost.
"""
from __future__ import annotations

import json
import math
import os
import re
import zipfile
import zlib

import numpy as np

from .fileio import atomic_open
from .layers import dropout_backward, dropout_forward

TARGETS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
FORMAT = "transferlab-lora"
VERSION = 1
META_KEY = "__meta__"
META_FIELDS = ("r", "alpha", "dropout", "targets")
PEFT_PREFIX = "base_model.model.transformer."  # PEFT around GPT2LMHeadModel
# h.{i}.{module}.lora_A / lora_B, the only names an adapter dict holds
ADAPTER_NAME = re.compile(r"^h\.(\d+)\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)\.lora_(A|B)$")
# PEFT's keys: optional wrapper prefixes, optional adapter name ("default") before .weight
PEFT_KEY = re.compile(r"^(?:base_model\.model\.)?(?:transformer\.)?(h\.\d+\.[\w.]+?)\.lora_(A|B)"
                      r"(?:\.([A-Za-z_]\w*))?\.weight$")


# ----------------------------------------------------------------------------------------
# the layer pair


def lora_linear_forward(x, w, b, A, B, scale, p=0.0, rng=None):
    """out = x @ w + b + scale * dropout(x) @ A @ B.

    x (..., IN), w (IN, OUT), b (OUT,) or None, A (IN, r), B (r, OUT) -> out (..., OUT).
    Dropout (PEFT's lora_dropout) touches only the input of the LoRA branch, never the
    frozen path; it is inverted dropout like layers.dropout_forward, off when p == 0 or
    rng is None (evaluation). See docs/lora.md#forward.
    """
    scale = float(scale)  # a NumPy float64 scale would promote a float32 pass
    x2 = x.reshape(-1, x.shape[-1])  # (N, IN), N = B*T: a view
    out = x2 @ w  # (N, OUT) the frozen path
    if b is not None:
        out += b
    x_d, drop_cache = dropout_forward(x2, p, rng)  # (N, IN); x2 itself when dropout is off
    xa = x_d @ A  # (N, r) the rank-r bottleneck
    # scale the (N, r) product, not the (N, OUT) one: r is small
    out += (xa * scale) @ B  # (N, OUT)
    cache = (x.shape, w, A, B, x_d, drop_cache, xa, scale)
    return out.reshape(*x.shape[:-1], w.shape[1]), cache


def lora_linear_backward(dout, cache, need_dx=True):
    """dA = x_d^T (dout B^T) s,  dB = (x_d A)^T dout s,  dx = dout w^T + dropout'(s dout B^T A^T).

    Returns (dx, dA, dB). w and b get no gradient: LoRA freezes the pretrained layer and
    trains only A and B, so computing dw (an IN x OUT product, the largest of the layer)
    would be work thrown away. `need_dx=False` skips dx too (nothing below trains) and
    returns None in its place. Derivation: docs/lora.md#backward.
    """
    x_shape, w, A, B, x_d, drop_cache, xa, scale = cache
    dout2 = dout.reshape(-1, dout.shape[-1])  # (N, OUT)
    # in the forward pass this was: out += (xa * s) @ B, so:
    dB = xa.T @ dout2  # (r, OUT)
    dB *= scale
    dxa = dout2 @ B.T  # (N, r)
    dxa *= scale
    # and before that: xa = x_d @ A, so:
    dA = x_d.T @ dxa  # (IN, r)
    if not need_dx:
        return None, dA, dB
    # x feeds both the frozen path and the LoRA branch: gradients add up at forks
    dx = dout2 @ w.T  # (N, IN)  from out = x @ w + b
    (dx_d,) = dropout_backward(dxa @ A.T, drop_cache)  # (N, IN) through x_d = dropout(x)
    dx += dx_d
    return dx.reshape(x_shape), dA, dB


# ----------------------------------------------------------------------------------------
# adapters on a GPT-2 params dict


def lora_scale(r, alpha) -> float:
    """s = alpha / r, a Python float (PEFT's `scaling` without rsLoRA). See docs/lora.md#rank-and-scaling."""
    _check_r_alpha(r, alpha)
    return float(alpha) / int(r)


def _check_r_alpha(r, alpha):
    if not isinstance(r, (int, np.integer)) or isinstance(r, bool) or r < 1:
        raise ValueError(f"LoRA rank r must be a positive integer, got {r!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float, np.integer, np.floating)) \
            or not math.isfinite(alpha) or alpha <= 0:
        raise ValueError(f"LoRA alpha must be a positive number, got {alpha!r}")


def _check_targets(targets) -> tuple[str, ...]:
    if isinstance(targets, str):  # "attn.c_attn" would otherwise be read letter by letter
        targets = (targets,)
    targets = tuple(targets)
    bad = [t for t in targets if t not in TARGETS] if targets else [()]
    if bad:
        raise ValueError(f"LoRA target {bad[0]!r} is not one of {', '.join(TARGETS)}")
    return targets


def _weight(params, name):
    if name not in params:
        raise ValueError(f"LoRA: the params dict has no {name!r} (is n_layer right?)")
    return params[name]


def add_lora(params, n_layer, r, alpha, targets=("attn.c_attn",), rng=None) -> dict:
    """New adapters for `targets` in every block: {"h.{i}.{target}.lora_A": (IN, r), ".lora_B": (r, OUT)}.

    A ~ U(-1/sqrt(IN), 1/sqrt(IN)): PEFT's kaiming_uniform_(a=sqrt(5)) on its (r, IN)
    lora_A.weight, whose bound gain * sqrt(3 / fan_in) with gain = sqrt(2 / (1 + a^2)) and
    fan_in = IN is 1/sqrt(IN). B = 0, so s * A @ B = 0 and the model starts exactly at the
    pretrained function. Adapters take the dtype of the weight they adapt. `params` is
    only read; put the result into a model with params.update(...). `alpha` is checked
    here and used by lora_scale(r, alpha). rng: a np.random.Generator (None: seed 0).
    See docs/lora.md#initialisation.
    """
    _check_r_alpha(r, alpha)
    targets = _check_targets(targets)
    rng = np.random.default_rng(0) if rng is None else rng
    adapters = {}
    for i in range(n_layer):
        for target in targets:
            w = _weight(params, f"h.{i}.{target}.weight")  # (IN, OUT)
            IN, OUT = w.shape
            bound = 1.0 / math.sqrt(IN)
            adapters[f"h.{i}.{target}.lora_A"] = rng.uniform(-bound, bound, (IN, r)).astype(w.dtype)  # (IN, r)
            adapters[f"h.{i}.{target}.lora_B"] = np.zeros((r, OUT), dtype=w.dtype)  # (r, OUT)
    return adapters


def attach(model, r, alpha, dropout=0.0, targets=("attn.c_attn",), seed=0):
    """Give a GPT adapters on `targets` in every block (add_lora) and the config that runs
    them (GPTConfig.lora_r / lora_alpha / lora_dropout); the model's output is unchanged
    (B = 0). Returns the model. Which weights then train is the masks' business (the
    `lora` strategy freezes everything but the adapters and the head)."""
    import dataclasses

    adapters = add_lora(model.params, model.config.n_layer, r, alpha, targets, np.random.default_rng([seed, 3]))
    model.config = dataclasses.replace(model.config, lora_r=int(r), lora_alpha=float(alpha),
                                       lora_dropout=float(dropout))
    model.params.update(adapters)
    return model


def adapter_names(params) -> list[str]:
    """The names in `params` that are LoRA adapters (`h.{i}.{module}.lora_A` / `lora_B`), in order."""
    return [name for name in params if ADAPTER_NAME.match(name)]


def _modules(adapters):
    """{module prefix "h.0.attn.c_attn": (A, B)}, refusing names that are not adapters or lack a partner."""
    pairs = {}
    for name, value in adapters.items():
        m = ADAPTER_NAME.match(name)
        if m is None:
            raise ValueError(f"LoRA: {name!r} is not an adapter name (h.{{i}}.{{module}}.lora_A / lora_B)")
        pairs.setdefault(name[: -len(".lora_A")], {})[m.group(3)] = value
    for module, pair in pairs.items():
        if len(pair) != 2:
            missing = "lora_B" if "A" in pair else "lora_A"
            raise ValueError(f"LoRA: {module}.{missing} is missing (A and B come in pairs)")
    return {module: (pair["A"], pair["B"]) for module, pair in pairs.items()}


def _delta(params, adapters, scale):
    """Yield (W, s * A @ B) per adapted module after checking the shapes agree."""
    for module, (A, B) in _modules(adapters).items():
        w = _weight(params, module + ".weight")  # (IN, OUT)
        if A.ndim != 2 or B.ndim != 2 or A.shape[1] != B.shape[0] or (A.shape[0], B.shape[1]) != w.shape:
            raise ValueError(f"LoRA: {module}.lora_A {A.shape} @ lora_B {B.shape} does not make "
                             f"the weight's shape {w.shape}")
        delta = A @ B  # (IN, OUT)
        delta *= float(scale)
        yield w, delta.astype(w.dtype, copy=False)


def merge(params, adapters, scale) -> dict:
    """W += scale * A @ B for every adapted module, in place; returns params.

    Afterwards the plain linear layer computes the adapted function: zero extra cost at
    inference. Merging twice adds the update twice (no merged flag is kept: the arrays
    are all there is). See docs/lora.md#merging.
    """
    for w, delta in _delta(params, adapters, scale):
        w += delta
    return params


def unmerge(params, adapters, scale) -> dict:
    """W -= scale * A @ B: undoes `merge` up to rounding; returns params."""
    for w, delta in _delta(params, adapters, scale):
        w -= delta
    return params


def trainable_count(params, targets, n_layer, r) -> int:
    """r * (IN + OUT) summed over every adapted matrix: what LoRA trains. See docs/lora.md#how-many-numbers-train."""
    _check_r_alpha(r, 1.0)
    targets = _check_targets(targets)
    return sum(int(r) * sum(_weight(params, f"h.{i}.{t}.weight").shape)
               for i in range(n_layer) for t in targets)


# ----------------------------------------------------------------------------------------
# files: our .npz, and PEFT's names


def _check_meta(meta, where):
    if not isinstance(meta, dict):
        raise ValueError(f"{where}: LoRA metadata must be a dict, got {type(meta).__name__}")
    missing = [k for k in META_FIELDS if k not in meta]
    if missing:
        raise ValueError(f"{where}: LoRA metadata lacks {', '.join(missing)} (needs {', '.join(META_FIELDS)})")
    _check_r_alpha(meta["r"], meta["alpha"])
    _check_targets(meta["targets"])
    if not 0.0 <= meta["dropout"] < 1.0:
        raise ValueError(f"{where}: LoRA dropout must be in [0, 1), got {meta['dropout']!r}")


def _check_adapters(adapters, r, targets, where, params=None):
    """Every tensor a 2-D float array of the right rank and module; with params, of the right size."""
    for module, (A, B) in _modules(adapters).items():
        target = module.split(".", 2)[2]
        if target not in targets:
            raise ValueError(f"{where}: {module} is not among the targets {list(targets)}")
        for tag, arr, rank_axis in (("lora_A", A, 1), ("lora_B", B, 0)):
            if arr.ndim != 2 or arr.dtype.kind != "f" or arr.shape[rank_axis] != r:
                want = "(IN, r)" if tag == "lora_A" else "(r, OUT)"
                raise ValueError(f"{where}: {module}.{tag} has shape {arr.shape} dtype {arr.dtype}, "
                                 f"expected a float {want} array with r = {r}")
        if params is not None:
            w = _weight(params, module + ".weight")
            if (A.shape[0], B.shape[1]) != w.shape:
                raise ValueError(f"{where}: {module}.lora_A {A.shape} / lora_B {B.shape} do not fit "
                                 f"{module}.weight {w.shape}")


def save_adapters(path, adapters, meta) -> None:
    """Write adapters to an .npz: one array per name, plus `__meta__` (JSON: r, alpha, dropout, targets).

    Written through checkpoint.atomic_open (a temporary file, then os.replace), so a
    crash never leaves half a file. See docs/lora.md#saving-and-loading.
    """
    path = os.fspath(path)
    _check_meta(meta, path)
    _check_adapters(adapters, int(meta["r"]), _check_targets(meta["targets"]), path)
    body = dict(meta, targets=list(_check_targets(meta["targets"])), format=FORMAT, version=VERSION)
    try:
        text = json.dumps(body)
    except TypeError as e:
        raise ValueError(f"{path}: LoRA metadata must be JSON-able ({e})") from None
    with atomic_open(path) as f:
        np.savez(f, **{name: np.asarray(v) for name, v in adapters.items()}, **{META_KEY: np.array(text)})


def load_adapters(path, params=None) -> tuple[dict, dict]:
    """Read a file written by save_adapters, with pickling off: returns (adapters, meta).

    A file that is missing, not an .npz, not ours, corrupt, or holds tensors of the wrong
    name or shape raises ValueError naming the file and the tensor. With `params`, each
    adapter must also fit the weight it adapts.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"LoRA adapters {path} do not exist (or are not a file)")
    try:
        loaded = np.load(path, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):  # a bare .npy array
            raise ValueError("a single .npy array, not an .npz archive")
        with loaded as npz:
            arrays = {key: npz[key] for key in npz.files}
    except ValueError as e:  # object arrays (pickling is off), or not a NumPy file at all
        raise ValueError(f"{path} is not a LoRA adapter file ({e})") from None
    except (zipfile.BadZipFile, zlib.error, OSError, EOFError, KeyError) as e:
        raise ValueError(f"{path} is truncated or corrupt ({type(e).__name__}: {e})") from None
    if META_KEY not in arrays:
        raise ValueError(f"{path} is not a LoRA adapter file: no {META_KEY!r} entry")
    raw = arrays.pop(META_KEY)
    try:
        meta = json.loads(str(raw[()])) if raw.dtype.kind == "U" and raw.ndim == 0 else None
    except json.JSONDecodeError:
        meta = None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"{path} is not a LoRA adapter file: its metadata is not {FORMAT!r} JSON")
    if meta.get("version") != VERSION:
        raise ValueError(f"{path}: LoRA file version {meta.get('version')!r} is not supported (reads {VERSION})")
    meta = {k: v for k, v in meta.items() if k not in ("format", "version")}
    _check_meta(meta, path)
    _check_adapters(arrays, int(meta["r"]), _check_targets(meta["targets"]), path, params)
    return arrays, meta


def to_peft(adapters, prefix=PEFT_PREFIX) -> dict:
    """Our adapters under PEFT's names and layout: a dict for safetensors' save_file.

    h.{i}.{module}.lora_A (IN, r)  ->  {prefix}h.{i}.{module}.lora_A.weight (r, IN) = A^T
    h.{i}.{module}.lora_B (r, OUT) ->  {prefix}h.{i}.{module}.lora_B.weight (OUT, r) = B^T
    The default prefix is PEFT's around GPT2LMHeadModel; around a bare GPT2Model it is
    "base_model.model.". Arrays are contiguous copies. See docs/lora.md#moving-adapters-to-and-from-peft.
    """
    _modules(adapters)  # names and pairs checked
    return {f"{prefix}{name}.weight": np.ascontiguousarray(np.asarray(v).T) for name, v in adapters.items()}


def from_peft(state) -> dict:
    """PEFT's LoRA state dict (adapter_model.safetensors, or a live model's state_dict) -> our adapters.

    Accepts the prefixes `base_model.model.` and `transformer.`, and one adapter name
    before `.weight` (`lora_A.default.weight` in a live PeftModel). Any other key (a LoRA
    bias, a non-GPT-2 module, a second adapter) is refused, not silently dropped.
    """
    adapters, names = {}, set()
    for key, value in state.items():
        m = PEFT_KEY.match(key)
        name = None if m is None else f"{m.group(1)}.lora_{m.group(2)}"
        if name is None or not ADAPTER_NAME.match(name):
            raise ValueError(f"from_peft: {key!r} is not a GPT-2 LoRA weight this code reads "
                             f"(expected e.g. {PEFT_PREFIX}h.0.attn.c_attn.lora_A.weight)")
        names.add(m.group(3))
        if len(names) > 1:
            raise ValueError(f"from_peft: the state holds more than one adapter {sorted(map(str, names))}; "
                             f"pass one adapter's keys")
        arr = np.asarray(value)
        if arr.ndim != 2:
            raise ValueError(f"from_peft: {key!r} has shape {arr.shape}, expected a 2-D weight")
        adapters[name] = np.ascontiguousarray(arr.T)  # torch's (out, in) -> our (in, out)
    _modules(adapters)
    return adapters
