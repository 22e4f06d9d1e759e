"""The experiment journal and the fingerprints that keep results honestly labelled.

An experiment (`python src/main.py --strategy ... --seeds ...`) is a grid of independent
fine-tuning runs (strategy x seed x relatedness). The journal records each finished run
the moment it finishes, durably: one small JSON file per run, written atomically
(fileio.atomic_open: fsync, then rename), so kill -9 at any moment loses at most the run
that was training, and that one keeps its last checkpoint (runner.run_checkpoint_path).

    <cache_dir>/journal/<fingerprint[:16]>/
        experiment.json                    the fingerprinted config, argv, pretrained info
        run-0003-bitfit-rel1-seed0.json    one finished run: its results entry

`--resume` (no path) finds the journal of the same fingerprint and continues: finished
runs are read back, not redone. A fingerprint is `config_hash` of everything that changes
a result (every knob except where files go and how progress looks); each checkpoint and
journal entry records the config it was made under, so a resume or a pretrained load
under another config is refused with the list of differing keys (`differences`).
Docs: docs/results.md#interrupting-resuming-and-parallel-runs.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

from .config import ConfigError, config_hash
from .fileio import OutputError, atomic_open

# knobs that decide where files go or what the terminal shows, never a number in a result
NOT_IN_FINGERPRINT = {"runner": ("output", "plot", "cache_dir", "progress", "jobs"),
                      "logging": None}  # None: the whole section


class FingerprintError(ConfigError):
    """A checkpoint or journal made under another configuration (exit 2, keys listed)."""


def result_config(config) -> dict:
    """The parts of the config that change a result, as a plain dict."""
    d = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    out = {}
    for name, value in d.items():
        drop = NOT_IN_FINGERPRINT.get(name, ())
        if drop is None:
            continue
        out[name] = {k: v for k, v in value.items() if k not in drop} if isinstance(value, dict) else value
    return out


def run_config(config, strategy: str, seed: int, pretrained_id: str | None,
               data_id: dict | None = None) -> dict:
    """What one fine-tuning run depends on: the result config without the grid (runner),
    plus its own strategy, seed and pretrained model (runner.pretrained_id: the cache key or
    the given file's SHA-256) and, for file data, the files' contents (data_id: their
    SHA-256s); task.relatedness is in `task`."""
    d = result_config(config)
    d.pop("runner", None)
    run = {"strategy": strategy, "seed": int(seed), "pretrained": pretrained_id}
    if data_id:
        run["data"] = data_id
    return {**d, "run": run}


def flatten(d: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1}."""
    out = {}
    for key, value in d.items():
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def differences(saved: dict, ours: dict) -> list[str]:
    """Dotted keys whose values differ, as "key: saved -> ours" (sorted)."""
    a, b = flatten(saved), flatten(ours)
    missing = object()
    return [f"{k}: {a.get(k, 'absent')!r} -> {b.get(k, 'absent')!r}"
            for k in sorted(set(a) | set(b)) if a.get(k, missing) != b.get(k, missing)]


def refuse(what: str, saved: dict, ours: dict, hint: str = "") -> None:
    """Raise FingerprintError when `saved` and `ours` differ; the keys are in the message."""
    diff = differences(saved, ours)
    if diff:
        raise FingerprintError(f"{what} was made under another configuration; differing keys "
                               f"(saved -> now): {'; '.join(diff)}{hint}")


# ---------------------------------------------------------------------- exact JSON


def _encode(value):
    """Non-finite floats as {"__float__": "nan"}: strict JSON that reads back exactly."""
    if isinstance(value, float) and not math.isfinite(value):
        return {"__float__": repr(value)}
    if isinstance(value, dict):
        return {k: _encode(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_encode(v) for v in value]
    return value


def _decode(value):
    if isinstance(value, dict):
        if set(value) == {"__float__"}:
            return float(value["__float__"])
        return {k: _decode(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_decode(v) for v in value]
    return value


def _write(path: Path, obj) -> None:
    try:
        with atomic_open(path, "w") as f:
            json.dump(_encode(obj), f, allow_nan=False)
    except OSError as err:  # the journal lives in the cache: name the file and that knob
        raise OutputError(f"runner.cache_dir: cannot write {path}: {err.strerror or err}") from err


def _read(path: Path):
    try:
        return _decode(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConfigError(f"{path}: unreadable journal file ({err}); delete it to redo that run") from None


# ---------------------------------------------------------------------- the journal


class Journal:
    """The finished runs of one experiment, one atomic file each (see the module docstring)."""

    def __init__(self, root, fingerprint: str):
        self.fingerprint = fingerprint
        self.dir = Path(root) / fingerprint[:16]

    @staticmethod
    def run_name(index: int, strategy: str, seed: int, relatedness: float | None) -> str:
        rel = "" if relatedness is None else f"-rel{relatedness:g}"  # None: file data
        return f"run-{index:04d}-{strategy}{rel}-seed{seed}.json"

    @property
    def header(self) -> Path:
        return self.dir / "experiment.json"

    def exists(self) -> bool:
        return self.header.is_file()

    def start(self, config_dict: dict, argv, pretrained_info=None) -> None:
        """A new experiment: forget finished runs of an earlier one with this fingerprint."""
        self.dir.mkdir(parents=True, exist_ok=True)
        for old in self.dir.glob("run-*.json"):
            old.unlink()
        self.write_header(config_dict, argv, pretrained_info)

    def write_header(self, config_dict, argv, pretrained_info=None) -> None:
        _write(self.header, {"fingerprint": self.fingerprint, "config": config_dict,
                             "argv": list(argv or []), "pretrained": pretrained_info})

    def read_header(self) -> dict:
        return _read(self.header)

    def record(self, name: str, run_fingerprint: str, entry: dict, run_config: dict) -> None:
        """Durably note one finished run (fsync'ed before this returns), with the config it
        was made under (run_config) and that config's hash."""
        _write(self.dir / name, {"fingerprint": run_fingerprint, "run_config": run_config,
                                 "entry": entry})

    def finished(self) -> dict[str, dict]:
        """name -> {"fingerprint", "run_config", "entry"} of every recorded run."""
        return {p.name: _read(p) for p in sorted(self.dir.glob("run-*.json"))}


def candidates(root) -> list[dict]:
    """Headers of every journal under `root`, newest first (to explain a failed --resume)."""
    out = []
    for header in Path(root).glob("*/experiment.json"):
        try:
            data = _read(header)
        except ConfigError:
            continue
        out.append({**data, "mtime": os.path.getmtime(header), "path": str(header.parent)})
    return sorted(out, key=lambda d: -d["mtime"])
