"""What an experiment trains on: the synthetic Markov tasks, or your own files.

The runner asks the same questions of both (runner.py never looks at which one it has):

    d = experiment_data(config)    # SyntheticData, or FileData when data.labelled is set
    d.kind                         # the target task: "topic", "score", ...
    d.vocab_size, d.pad_id         # of the backbone's vocabulary
    d.cls_id                       # the CLS token for pooling "cls" (>= vocab_size: a new row)
    d.source()                     # tasks.SourceData: LM windows to pretrain on, some held out
    d.target(seed)                 # tasks.TargetData: train / val / test Splits for one seed
    d.references(seeds)            # the results' `baselines` entries (chance, count, ...)
    d.optimal_lm_loss()            # the best source LM loss possible, or None (real text)
    d.pretrain_identity()          # what a pretrained model on this data depends on
    d.identity()                   # the files' SHA-256s for the fingerprints (None: synthetic)
    d.record()                     # what the results JSON says about the data

SyntheticData draws everything from the task section (tasks.py); FileData reads a
labelled JSONL file (`--data`), a raw text (`--source`) and, with `--model`, tokenizes
with GPT-2's BPE instead of bytes (data.py, docs/own_data.md). A file is read and
tokenized once per process however many runs ask for it.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os

import numpy as np

from . import data as D
from .baselines import baselines_for, source_reference
from .config import ConfigError
from .tasks import TaskSpec, make_source, make_target


def task_spec(config) -> TaskSpec:
    """The config's task. The `task` section is TaskSpec's knobs (config.TaskConfig is made
    from them) and `target`, which picks among the tasks; the world seed is config.seed."""
    knobs = {k: v for k, v in dataclasses.asdict(config.task).items() if k != "target"}
    return TaskSpec(**knobs, seed=config.seed)


class SyntheticData:
    """The synthetic tasks of the config's task section (tasks.py)."""

    name = "synthetic"

    def __init__(self, config):
        self.spec = task_spec(config)
        self.kind = config.task.target
        self.relatedness = float(config.task.relatedness)
        self.vocab_size, self.pad_id = self.spec.vocab_size, self.spec.pad_id
        self.cls_id = self.spec.vocab_size  # a new embedding row after the chain tokens and PAD
        self.config = config

    def source(self):
        return make_source(self.spec)

    def target(self, seed: int):
        return make_target(self.kind, self.spec, seed=seed)

    def references(self, seeds) -> list[dict]:
        return [e for seed in seeds for e in baselines_for(self.kind, self.spec, self.target(seed), seed)]

    def optimal_lm_loss(self) -> float:
        return source_reference(self.spec)["optimal_lm_loss"]

    def pretrain_identity(self) -> dict:
        """The task knobs pretraining reads (the target task and relatedness are not)."""
        target_only = ("relatedness", "target", "n_target_train", "n_target_val", "n_target_test", "min_len")
        return {"task": {k: v for k, v in self.config.to_dict()["task"].items() if k not in target_only}}

    def identity(self) -> None:
        return None  # the config says everything

    def record(self) -> dict:
        return {"kind": self.name}


class FileData:
    """Your own files: a labelled JSONL (data.labelled) and a raw text (data.source), in
    bytes (ByteVocab, our small GPT pretrained on the source) or, with data.model, in
    GPT-2's BPE (the folder's vocab.json and merges.txt; its weights are the backbone).

    One split for every seed: the file's own, or a stratified one dealt with config.seed
    (recorded in the JSON); the seeds vary initialisation, dropout and batch order."""

    name = "files"
    relatedness = None

    def __init__(self, config):
        d = config.data
        self.config = config
        self.vocab = D.GPT2Vocab.from_dir(d.model) if d.model else D.ByteVocab()
        self.labelled = D.read_labelled(d.labelled, fractions=tuple(d.fractions), seed=config.seed)
        self._target = D.encode_labelled(self.labelled, self.vocab, d.max_len, truncate=d.truncate)
        self.text = D.read_source(d.source)
        self._source = D.source_splits(self.text, self.vocab, seq_len=d.max_len,
                                       val_fraction=d.source_val_fraction, seed=config.seed,
                                       max_val=d.source_val_max)
        # the contents, hashed once: the cache key and every fingerprint read them
        with open(self.labelled.path, "rb") as f:
            self.labelled_sha256 = hashlib.sha256(f.read()).hexdigest()
        self.source_sha256 = hashlib.sha256(self.text.encode("utf-8")).hexdigest()
        self.kind = self.labelled.kind
        self.vocab_size, self.pad_id = self.vocab.vocab_size, self.vocab.pad_id
        # ByteVocab has a CLS id of its own; GPT-2 has none, so CLS is a new row
        self.cls_id = self.vocab.cls_id if self.vocab.cls_id is not None else self.vocab.vocab_size

    def source(self):
        return self._source

    def target(self, seed: int):
        return self._target

    def references(self, seeds) -> list[dict]:
        return D.file_baselines(self._target, seed=self.config.seed)

    def optimal_lm_loss(self) -> None:
        return None  # real text does not know its own optimum

    def pretrain_identity(self) -> dict:
        d = self.config.data
        return {"source": {"sha256": self.source_sha256, "vocab": self.vocab.name, "window": d.max_len,
                           "val_fraction": d.source_val_fraction, "val_max": d.source_val_max}}

    def identity(self) -> dict:
        """The files' contents, for the fingerprints: an edited file is another experiment."""
        return {"labelled": self.labelled_sha256, **self.pretrain_identity()}

    def record(self) -> dict:
        d, s, t = self.config.data, self._source, self._target
        return {
            "kind": self.name, "vocab": self.vocab.name, "model": d.model or None,
            "labelled": {**t.split_record, "sizes": {n: len(getattr(t, n)) for n in D.SPLITS},
                         "max_len": t.max_len, "truncate": t.truncate, "truncated": t.truncated},
            "source": {"path": d.source, "tokens": s.n_tokens, "windows": len(s.train) + len(s.val),
                       "held_out": len(s.val), "window": d.max_len, "dropped_tokens": s.dropped_tokens},
        }


_FILE_DATA: dict = {}  # per process: (files and knobs) -> FileData, read once


def experiment_data(config):
    """SyntheticData, or FileData when config.data.labelled names a file. File problems
    (a bad line, a missing folder, a text too short) raise ConfigError: exit 2."""
    d = config.data
    if not d.labelled:
        return SyntheticData(config)
    key = (d, config.seed, *(_stamp(p) for p in (d.labelled, d.source, d.model) if p))
    if key not in _FILE_DATA:
        try:
            _FILE_DATA[key] = FileData(config)
        except ValueError as err:  # data.py's and tokenizer.py's messages name the file
            raise ConfigError(str(err)) from None
    return _FILE_DATA[key]


def _stamp(path: str):
    """A file's (or folder's) path, size and time of change: a changed file is read again."""
    try:
        st = os.stat(path)
    except OSError:
        return (path, None)
    return (os.path.abspath(path), st.st_size, st.st_mtime_ns)
