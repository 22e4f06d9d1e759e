"""Checkpoints: one `.npz` file holding every array, plus a JSON string saying what they are.

    path.npz
      param/<name>          model parameters, Hugging Face GPT-2 names ("h.0.attn.c_attn.weight")
      mask/<name>           trainable masks (masks.py), 0-d for a fully frozen tensor;
                            restored read-only, as masks.py makes them
      optim/<key path>      optimizer arrays ("optim/state/wte.weight/exp_avg")
      extra/<key>           optional arrays of the caller (e.g. the best parameters so far)
      __meta__              a 0-d unicode array: the JSON metadata below

    __meta__ = {"format": "transferlab-checkpoint", "version": 1,
                "config": GPTConfig as a dict, "head": "lm", "tied": true,
                "optimizer": {"class": "AdamW", "state": <state_dict, arrays as placeholders>},
                "schedule": {"class": ..., "state": <state_dict>}, "step": 1200,
                "rng_state": <the dropout RNG's bit generator state>,
                "extra": <the caller's JSON-able dict: data position, history, ...>,
                "provenance": {"parent_sha256": ..., "created_utc": ..., "versions": {...}}}

An optimizer's state_dict mixes arrays (Adam's moments) with scalars (the step count,
lr, betas). The arrays go into the archive under `optim/...`; in the JSON each one is
replaced by a placeholder {"__array__": "optim/..."} naming its archive entry, and
loading puts them back. Nothing is ever pickled: the file is loaded with
`allow_pickle=False`, so opening a checkpoint cannot run code.

Writing is atomic (`fileio.atomic_open`): the archive goes to a temporary file in the
same directory, is flushed and fsync'ed, and only then renamed onto `path` with
`os.replace` (a rename within one file system is atomic). A crash or an exception
mid-write leaves the earlier checkpoint at `path` byte-identical.

Two ways to use a checkpoint:
  - transfer: `load_into(model, path, include=..., rename=..., resize=...)` copies some
    parameters into a model that may differ (another head, a larger vocabulary) and
    reports what happened to each name. Optimizer, step and RNG are not touched: the
    fine-tuning run starts fresh.
  - resume: `resume(path, model, optimizer, schedule)` restores everything, so training
    continues with exactly the numbers it would have produced without stopping.

Docs: docs/checkpoints.md.
"""
from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import platform
import zipfile
import zlib
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable, Mapping

import numpy as np

from . import masks as M
from .fileio import atomic_open  # the one atomic writer (fileio.py)
from .model import GPT, GPTConfig
from .weights import LoadReport, check_weight

__all__ = ["FORMAT", "VERSION", "CheckpointError", "Checkpoint", "save_checkpoint",
           "load_checkpoint", "model_from_checkpoint", "load_into", "resume", "file_sha256"]

FORMAT = "transferlab-checkpoint"
VERSION = 1
META_KEY = "__meta__"
ARRAY_REF = "__array__"  # JSON placeholder {"__array__": "<archive key>"} for an array
ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")  # a zip with members / an empty zip
RESIZE_MODES = ("truncate", "pad")


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used; the message names the file and the reason."""


@dataclass
class Checkpoint:
    """Everything `load_checkpoint` read from one file."""

    params: dict[str, np.ndarray]
    masks: dict[str, np.ndarray]
    optimizer_state: dict | None  # what optimizer.state_dict() returned, arrays restored
    schedule_state: dict | None  # what schedule.state_dict() returned
    step: int
    rng_state: dict | None  # model.rng.bit_generator.state at save time
    extra: dict  # the caller's JSON-able dict (data position, history, ...)
    config: dict  # GPTConfig.to_dict()
    meta: dict  # the whole JSON metadata (provenance, versions, head, tie state)
    path: str = ""
    sha256: str = ""  # of the file, usable as a child's `parent`
    extra_arrays: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def head(self) -> str:
        return self.meta["head"]

    @property
    def tied(self) -> bool:
        """True when the LM head was the embedding matrix wte itself."""
        return bool(self.meta["tied"])


# ---------------------------------------------------------------------- hashing


def file_sha256(path) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# ---------------------------------------------------------------------- arrays <-> JSON


def _split_arrays(value, key: str, arrays: dict) -> Any:
    """Copy `value` with every ndarray replaced by {"__array__": key}; the arrays go to `arrays`.

    `key` is the archive key the value would have: "optim/state/wte.weight/exp_avg".
    """
    if isinstance(value, np.ndarray):
        arrays[key] = value
        return {ARRAY_REF: key}
    if isinstance(value, Mapping):
        return {str(k): _split_arrays(v, f"{key}/{k}", arrays) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_split_arrays(v, f"{key}/{i}", arrays) for i, v in enumerate(value)]
    return value


def _join_arrays(value, arrays: Mapping[str, np.ndarray]) -> Any:
    """The inverse of _split_arrays: placeholders replaced by the archive's arrays."""
    if isinstance(value, dict):
        if set(value) == {ARRAY_REF}:
            return arrays[value[ARRAY_REF]]  # KeyError: the archive lost an entry
        return {k: _join_arrays(v, arrays) for k, v in value.items()}
    if isinstance(value, list):
        return [_join_arrays(v, arrays) for v in value]
    return value


def _json_default(value):
    """json.dumps hook: NumPy scalars become Python numbers; anything else is refused."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        raise TypeError(f"an array of shape {value.shape} (pass arrays via `arrays=`, not `extra`)")
    raise TypeError(f"a {type(value).__name__}")


# ---------------------------------------------------------------------- saving


def _versions() -> dict:
    from . import __version__  # here, not at the top: the package imports us lazily

    return {"python": platform.python_version(), "numpy": np.__version__,
            "transferlab": __version__}


def _parent_hash(parent) -> tuple[str | None, str | None]:
    """(sha256, path) of the parent checkpoint: hash the file, or take a hex digest as is."""
    if parent is None:
        return None, None
    if isinstance(parent, str) and len(parent) == 64 and not os.path.exists(parent):
        try:
            int(parent, 16)
            return parent.lower(), None  # already a SHA-256 digest
        except ValueError:
            pass
    path = os.fspath(parent)
    if not os.path.isfile(path):
        raise CheckpointError(f"parent checkpoint {path} does not exist")
    return file_sha256(path), path


def save_checkpoint(path, model: GPT, optimizer=None, schedule=None, step: int = 0,
                    extra: dict | None = None, parent=None,
                    arrays: Mapping[str, np.ndarray] | None = None) -> str:
    """Write one .npz with the model, its masks, optimizer, schedule, step and RNG.

    extra: a JSON-able dict the caller wants back on resume (data position, its own RNG
    state, history). arrays: optional name -> ndarray kept under `extra/<name>`.
    parent: the checkpoint this run started from (a path, hashed here, or a SHA-256 hex
    digest). Returns the SHA-256 of the written file. The write is atomic (see the
    module docstring). Everything is checked before the first byte is written.
    """
    path = os.fspath(path)
    entries: dict[str, np.ndarray] = {}
    for name, value in model.params.items():
        entries[f"param/{name}"] = value
    for name, mask in model.masks.items():
        entries[f"mask/{name}"] = np.asarray(mask)
    for name, value in (arrays or {}).items():
        entries[f"extra/{name}"] = np.asarray(value)
    for key, value in entries.items():
        if value.dtype == object:
            raise ValueError(f"save_checkpoint: {key} is an object array; checkpoints hold "
                             f"numeric arrays only (they are never pickled)")

    parent_sha256, parent_path = _parent_hash(parent)
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "config": model.config.to_dict(),
        "head": model.config.head,
        # tied: the LM head multiplies by wte itself, so there is no lm_head.weight entry
        "tied": model.config.head == "lm" and "lm_head.weight" not in model.params,
        "optimizer": None if optimizer is None else {
            "class": type(optimizer).__name__,
            "state": _split_arrays(optimizer.state_dict(), "optim", entries),
        },
        "schedule": None if schedule is None else {
            "class": type(schedule).__name__,
            "state": schedule.state_dict(),
        },
        "step": int(step),
        "rng_state": model.rng.bit_generator.state,
        "extra": extra if extra is not None else {},
        "extra_arrays": sorted(arrays or {}),
        "provenance": {
            "parent_sha256": parent_sha256,
            "parent_path": parent_path,
            "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "versions": _versions(),
        },
    }
    try:
        text = json.dumps(meta, default=_json_default)
    except TypeError as e:
        raise ValueError(f"save_checkpoint: the metadata (config, optimizer/schedule scalars "
                         f"or `extra`) must be JSON-able, found {e}") from None
    entries[META_KEY] = np.array(text)  # 0-d unicode array: no pickling needed
    return _write_atomic(path, entries)


def _write_atomic(path: str, entries: Mapping[str, np.ndarray]) -> str:
    """np.savez through `atomic_open`; returns the SHA-256 of the written file."""
    with atomic_open(path) as f:
        np.savez(f, **entries)
    return file_sha256(path)


# ---------------------------------------------------------------------- loading


def _read_meta(path: str, npz) -> dict:
    """The JSON metadata, after checking that this is our format in a version we read."""
    if META_KEY not in npz.files:
        shown = ", ".join(sorted(npz.files)[:5]) or "none"
        raise CheckpointError(f"{path} is not a transferlab checkpoint: an .npz without a "
                              f"{META_KEY!r} entry (its arrays: {shown})")
    raw = npz[META_KEY]
    if raw.dtype.kind != "U" or raw.ndim != 0:
        raise CheckpointError(f"{path} is not a transferlab checkpoint: its {META_KEY!r} "
                              f"entry is not a JSON string")
    try:
        meta = json.loads(str(raw[()]))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is corrupt: its metadata is not valid JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else None
        raise CheckpointError(f"{path} is not a transferlab checkpoint: its format is "
                              f"{found!r}, expected {FORMAT!r}")
    if meta.get("version") != VERSION:
        raise CheckpointError(f"{path}: checkpoint format version {meta.get('version')!r} is "
                              f"not supported (this transferlab reads version {VERSION})")
    return meta


def load_checkpoint(path) -> Checkpoint:
    """Read a checkpoint written by save_checkpoint, with pickling off.

    Raises CheckpointError (a ValueError) naming the file when it is missing, truncated or
    corrupt, not an .npz, not a transferlab checkpoint, holds object arrays, or has a
    format version this code does not read.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        raise CheckpointError(f"checkpoint {path} is a directory, not a file")
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:  # e.g. no permission
        raise CheckpointError(f"checkpoint {path} cannot be read ({e.strerror})") from None
    if not magic:
        raise CheckpointError(f"{path} is empty (truncated or corrupt)")
    if magic not in ZIP_MAGIC:  # an .npz is a zip archive of .npy files
        raise CheckpointError(f"{path} is not a transferlab checkpoint: not an .npz (zip) archive")
    try:
        with zipfile.ZipFile(path) as zf:
            members = zf.namelist()
        strays = [m for m in members if not m.endswith(".npy")]
        if strays:
            raise CheckpointError(f"{path} is not a transferlab checkpoint: a zip archive "
                                  f"whose member {strays[0]!r} is not a NumPy .npy array")
        with np.load(path, allow_pickle=False) as npz:
            meta = _read_meta(path, npz)
            arrays = {key: npz[key] for key in npz.files if key != META_KEY}
    except CheckpointError:
        raise
    except ValueError as e:
        if "allow_pickle" in str(e):  # NumPy refuses object arrays without pickling
            raise CheckpointError(f"{path} holds object arrays; refusing to unpickle "
                                  f"(checkpoints are loaded with allow_pickle=False)") from None
        raise CheckpointError(f"{path} is truncated or corrupt ({e})") from None
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, KeyError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is truncated or corrupt ({type(e).__name__}: {e})") from None

    def section(prefix):
        return {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}

    try:
        optimizer = meta["optimizer"]
        schedule = meta["schedule"]
        return Checkpoint(
            params=section("param/"),
            masks=section("mask/"),
            optimizer_state=None if optimizer is None else _join_arrays(optimizer["state"], arrays),
            schedule_state=None if schedule is None else schedule["state"],
            step=int(meta["step"]),
            rng_state=meta["rng_state"],
            extra=meta["extra"],
            config=meta["config"],
            meta=meta,
            path=path,
            sha256=file_sha256(path),
            extra_arrays=section("extra/"),
        )
    except KeyError as e:
        raise CheckpointError(f"{path} is corrupt: its metadata lacks {e}") from None
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path} is corrupt: malformed metadata ({e})") from None


def as_checkpoint(ckpt_or_path) -> Checkpoint:
    """A loaded Checkpoint as it is; a path is loaded (so callers may pass either)."""
    return ckpt_or_path if isinstance(ckpt_or_path, Checkpoint) else load_checkpoint(ckpt_or_path)


# ---------------------------------------------------------------------- rebuilding and resuming


def model_from_checkpoint(ckpt_or_path, seed: int = 0) -> GPT:
    """A new GPT with the checkpoint's config (head included), parameters and masks.

    `seed` seeds the new model's dropout RNG; `resume` restores the saved one instead.
    """
    ckpt = as_checkpoint(ckpt_or_path)
    try:
        config = GPTConfig(**ckpt.config)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{ckpt.path}: its model config cannot be rebuilt ({e})") from None
    model = GPT(config, seed=seed)
    _check_same_params(model, ckpt)
    _check_weights(ckpt)
    for name, value in ckpt.params.items():
        model.params[name][...] = value
    model.masks.update(_restored_masks(ckpt))
    return model


def _restored_masks(ckpt: Checkpoint) -> dict[str, np.ndarray]:
    """The checkpoint's masks as masks.py makes them: arrays of their own, read-only."""
    return {name: M.read_only(mask.copy()) for name, mask in ckpt.masks.items()}


def _check_same_params(model: GPT, ckpt: Checkpoint) -> None:
    """The model must have exactly the checkpoint's parameter names and shapes."""
    problems = [f"{n} is missing from the checkpoint"
                for n in model.params if n not in ckpt.params]
    problems += [f"{n} is not a parameter of the model"
                 for n in ckpt.params if n not in model.params]
    problems += [f"{n} has shape {v.shape} in the checkpoint, {model.params[n].shape} in the model"
                 for n, v in ckpt.params.items()
                 if n in model.params and v.shape != model.params[n].shape]
    if problems:
        raise CheckpointError(f"{ckpt.path} does not fit this model: " + "; ".join(problems))


def _check_weights(ckpt: Checkpoint) -> None:
    """Refuse integer or non-finite parameters before any of them is copied anywhere:
    a NaN weight is a broken file, not a learning-rate problem to find out in training."""
    for name, value in ckpt.params.items():
        try:
            check_weight(name, value)
        except ValueError as e:
            raise CheckpointError(f"{ckpt.path}: {e}") from None


def resume(path, model: GPT, optimizer=None, schedule=None) -> Checkpoint:
    """Restore a run exactly: parameters, masks, optimizer state, schedule state, dropout RNG.

    The model must have the checkpoint's config (the free-form `extra` field aside). The
    optimizer's masks are set to the restored model.masks (masks belong to the model).
    Returns the checkpoint: the caller restores its own state from `ckpt.extra` (data
    position, history) and continues from `ckpt.step`. On an error nothing in the model
    has changed yet.
    """
    ckpt = as_checkpoint(path)
    saved = {k: v for k, v in ckpt.config.items() if k != "extra"}
    ours = {k: v for k, v in model.config.to_dict().items() if k != "extra"}
    differ = [f"{k}={saved.get(k)!r} in the checkpoint, {ours.get(k)!r} in the model"
              for k in sorted(set(saved) | set(ours)) if saved.get(k) != ours.get(k)]
    if differ:
        raise CheckpointError(f"{ckpt.path} was saved from a different model: " + "; ".join(differ))
    _check_same_params(model, ckpt)
    _check_weights(ckpt)
    # optimizer and schedule first: they validate what they load and may refuse it
    if optimizer is not None:
        if ckpt.optimizer_state is None:
            raise CheckpointError(f"{ckpt.path} holds no optimizer state to resume from "
                                  f"(use load_into for a fresh start)")
        try:
            optimizer.load_state_dict(ckpt.optimizer_state)
        except ValueError as e:
            raise CheckpointError(f"{ckpt.path}: cannot restore the optimizer: {e}") from None
    if schedule is not None:
        if ckpt.schedule_state is None:
            raise CheckpointError(f"{ckpt.path} holds no schedule state to resume from")
        try:
            schedule.load_state_dict(ckpt.schedule_state)
        except ValueError as e:
            raise CheckpointError(f"{ckpt.path}: cannot restore the schedule: {e}") from None

    for name, value in ckpt.params.items():
        model.params[name][...] = value  # in place: the optimizer holds these arrays
    model.masks.clear()
    model.masks.update(_restored_masks(ckpt))
    if optimizer is not None:
        optimizer.masks = model.masks
    if ckpt.rng_state is not None:
        _restore_rng(model, ckpt.rng_state)
    return ckpt


def _restore_rng(model: GPT, state: dict) -> None:
    """Put the dropout RNG back where it was; same bit generator type, else a new one."""
    bit_generator = model.rng.bit_generator
    if type(bit_generator).__name__ != state["bit_generator"]:
        bit_generator = getattr(np.random, state["bit_generator"])()
        model.rng = np.random.Generator(bit_generator)
    bit_generator.state = state


# ---------------------------------------------------------------------- partial loading


def _as_patterns(patterns) -> list[str]:
    if patterns is None:
        return []
    return [patterns] if isinstance(patterns, str) else list(patterns)


def _renamer(rename) -> Callable[[str], str | None]:
    """rename: None, a callable name -> new name (None drops it), or {old prefix: new prefix}.

    With a dict the longest matching prefix wins: {"h.0.": "h.1."} maps
    "h.0.ln_1.weight" to "h.1.ln_1.weight".
    """
    if rename is None:
        return lambda name: name
    if callable(rename):
        return rename
    prefixes = sorted(rename.items(), key=lambda kv: -len(kv[0]))

    def by_prefix(name):
        for old, new in prefixes:
            if name.startswith(old):
                return new + name[len(old):]
        return name

    return by_prefix


def _resize_modes(resize) -> set[str]:
    """resize: None, "truncate", "pad", or both as a tuple ("truncate", "pad")."""
    modes = set() if resize is None else {resize} if isinstance(resize, str) else set(resize)
    unknown = modes - set(RESIZE_MODES)
    if unknown:
        raise ValueError(f"resize must be None, 'truncate', 'pad' or both as a tuple, "
                         f"got {resize!r}")
    return modes


def _resize(value: np.ndarray, own: np.ndarray, modes: set[str]) -> tuple[np.ndarray | None, str]:
    """Copy the overlapping block of `value` into a copy of `own` when `modes` allow it.

    Returns (resized array, what was done) or (None, why not). The checkpoint tensor is
    truncated where it is larger than the model's and padded where it is smaller; padded
    entries keep the model's own values (its initialisation).
    """
    got, want = value.shape, own.shape
    if len(got) != len(want):
        return None, f"shape {got} in the checkpoint, {want} in the model (different rank)"
    needs = []
    if any(g > w for g, w in zip(got, want)):
        needs.append("truncate")
    if any(g < w for g, w in zip(got, want)):
        needs.append("pad")
    if not set(needs) <= modes:
        hint = needs[0] if len(needs) == 1 else tuple(needs)
        return None, (f"shape {got} in the checkpoint, {want} in the model "
                      f"(resize={hint!r} would copy the overlapping block)")
    block = tuple(slice(0, min(g, w)) for g, w in zip(got, want))
    out = own.copy()
    out[block] = value[block]
    return out, "+".join(needs)


def load_into(model: GPT, ckpt_or_path, include=None, exclude=None, rename=None,
              resize=None) -> LoadReport:
    """Copy a checkpoint's parameters into `model` for transfer, and report on every name.

    For each checkpoint parameter, in this order:
      1. rename: {old prefix: new prefix} or a callable (returning None drops the tensor);
      2. include / exclude: glob patterns on the renamed name ("h.*", "wte.weight");
         a name must match some include pattern (when given) and no exclude pattern;
      3. shape: a mismatch is skipped and reported, unless `resize` allows copying the
         overlapping block ("truncate" a larger tensor, "pad" a smaller one keeping the
         model's own init for the rest, or both as a tuple).
    Then model.load_state_dict copies what remains, in place.

    The report (model.LoadReport): loaded (resized ones included), missing (model
    parameters left at their own values, e.g. a new head), unexpected, mismatched,
    ignored (filtered out, with why), resized (name, model shape, checkpoint shape, how),
    and reasons: name -> why it was not loaded as is. Masks, optimizer, step and RNG are
    not touched: transfer starts a fresh run.
    """
    ckpt = as_checkpoint(ckpt_or_path)
    include, exclude = _as_patterns(include), _as_patterns(exclude)
    modes, new_name = _resize_modes(resize), _renamer(rename)

    renamed: dict[str, tuple[str, np.ndarray]] = {}  # model-side name -> (checkpoint name, array)
    ignored: list[tuple[str, str]] = []  # (checkpoint name, why it was not used)
    reasons: dict[str, str] = {}  # name -> why it was not loaded as it is
    for name, value in ckpt.params.items():
        target = new_name(name)
        if target is None:
            ignored.append((name, "dropped by rename"))
            reasons[name] = "dropped by rename"
        elif target in renamed:
            raise ValueError(f"load_into: rename maps both {renamed[target][0]!r} and "
                             f"{name!r} to {target!r}")
        else:
            renamed[target] = (name, value)
    # the checkpoint's LM head *was* wte: a model with its own lm_head.weight gets wte there
    untied_model = "lm_head.weight" in model.params and "lm_head.weight" not in renamed
    if ckpt.meta.get("tied") and untied_model and "wte.weight" in renamed:
        renamed["lm_head.weight"] = renamed["wte.weight"]

    known = set(renamed) | set(model.params)
    for pattern in include + exclude:  # a pattern that matches nothing is a typo
        if not any(fnmatch.fnmatchcase(n, pattern) for n in known):
            raise ValueError(f"load_into: pattern {pattern!r} matches no parameter of "
                             f"{ckpt.path or 'the checkpoint'} or the model")

    state, resized = {}, []
    for target, (name, value) in renamed.items():
        if include and not any(fnmatch.fnmatchcase(target, p) for p in include):
            ignored.append((name, "not matched by include"))
            reasons[target] = f"not matched by include {include}"
            continue
        hit = next((p for p in exclude if fnmatch.fnmatchcase(target, p)), None)
        if hit is not None:
            ignored.append((name, f"excluded by {hit!r}"))
            reasons[target] = f"excluded by {hit!r}"
            continue
        own = model.params.get(target)
        if own is not None and value.shape != own.shape:
            out, how = _resize(value, own, modes)
            if out is None:
                reasons[target] = how  # load_state_dict will report it as mismatched
            else:
                resized.append((target, own.shape, value.shape, how))
                reasons[target] = f"{how}: checkpoint {value.shape} -> model {own.shape}"
                value = out
        state[target] = value

    report = model.load_state_dict(state)
    for name, why in report.ignored:  # load_state_dict's own: e.g. an lm_head tied to wte
        reasons.setdefault(name, why)
    for name in report.missing:
        reasons.setdefault(name, "not in the checkpoint: keeps the model's own values")
    for name in report.unexpected:
        reasons.setdefault(name, "the model has no parameter of that name")
    report.ignored = ignored + report.ignored
    report.resized = resized
    report.reasons = reasons
    return report
