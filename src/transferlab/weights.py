"""Loading a state dict that another tool wrote: names, aliases, and what happened to each key.

Other tools save GPT-2 under the same names as ours with a prefix in front
(`transformer.` from Hugging Face, `_orig_mod.` from torch.compile, `module.` from
DataParallel), keep a tied LM head as a separate `lm_head.weight`, and store two attention
buffers that are not parameters. `load_state_dict` undoes all of that and reports each key:

    report = load_state_dict(model, state)          # or model.load_state_dict(state)
    print(report)      # loaded 26 tensors / missing ... / unexpected ... / shape mismatch ...

Loading is all-or-nothing: every tensor is checked (name, shape, float dtype, finite values)
before the first one is copied, so a refused load leaves the model as it was.
See docs/checkpoints.md#foreign-state-dicts.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

# prefixes other tools put in front of GPT-2's names (HF, torch.compile, DataParallel)
STRIP_PREFIXES = ("_orig_mod.", "module.", "transformer.")
# non-parameter buffers in GPT-2 checkpoints: the causal mask and its fill value
BUFFER_RE = re.compile(r"^h\.\d+\.attn\.(bias|masked_bias)$")


@dataclass
class LoadReport:
    """What a load did with each key."""

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


def as_array(value) -> np.ndarray:
    """A NumPy array from an array, a list or a torch tensor (without importing torch)."""
    return np.asarray(value.detach().cpu().numpy() if hasattr(value, "detach") else value)


def check_weight(name: str, array: np.ndarray) -> None:
    """Refuse a tensor that cannot be a trained weight: not floating point, or NaN / inf."""
    if not np.issubdtype(array.dtype, np.floating):
        raise ValueError(f"tensor {name} has dtype {array.dtype}, not a floating-point weight")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"tensor {name} holds NaN or inf values")


def load_state_dict(model, state, strict: bool = False) -> LoadReport:
    """Copy tensors from a name -> array mapping written by this or another tool.

    Strips `transformer.`, `_orig_mod.` and `module.` prefixes; takes a tied
    `lm_head.weight` as `wte.weight`; ignores GPT-2's attention buffers; skips tensors
    whose shape does not match. Values may be NumPy arrays or anything np.asarray takes
    (torch tensors included). Arrays are copied into the existing parameter arrays, so an
    optimizer holding them keeps working.

    strict=True raises ValueError unless every parameter is loaded and nothing is left
    over, and also when a tied model is given an `lm_head.weight` that differs from the
    `wte.weight` beside it (an untied head cannot load into a tied model without a change
    of function). Either way nothing is copied until every tensor has passed its checks.
    """
    report = LoadReport()
    incoming = {}
    for key, value in state.items():
        name = canonical_name(key)
        if BUFFER_RE.match(name):
            report.ignored.append((key, "GPT-2 attention buffer, not a parameter"))
            continue
        incoming[name] = (key, value)
    untied_conflict = None
    if "lm_head.weight" in incoming and "lm_head.weight" not in model.params:
        key, value = incoming.pop("lm_head.weight")
        if model.config.head != "lm":
            report.ignored.append((key, f"the model has a {model.config.head} head, no LM head"))
        elif "wte.weight" in incoming:
            report.ignored.append(
                (key, "the model's LM head is tied to wte.weight, which the state dict also holds"))
            if not np.array_equal(as_array(value), as_array(incoming["wte.weight"][1])):
                untied_conflict = key
        else:
            incoming["wte.weight"] = (key, value)
    staged = {}
    for name, (key, value) in incoming.items():
        if name not in model.params:
            report.unexpected.append(key)
            continue
        array = as_array(value)
        if array.shape != model.params[name].shape:
            report.mismatched.append((name, model.params[name].shape, array.shape))
            continue
        check_weight(key, array)
        staged[name] = array
    report.loaded = list(staged)
    report.missing = [n for n in model.params if n not in staged]
    if strict and untied_conflict:
        raise ValueError(f"load_state_dict(strict=True): {untied_conflict} differs from wte.weight, "
                         f"but the model ties its LM head to wte (build it with tie_weights=False)")
    if strict and not report.ok:
        raise ValueError(f"load_state_dict(strict=True) failed:\n{report}")
    for name, array in staged.items():
        model.params[name][...] = array.astype(model.dtype, copy=False)
    return report
