"""Your own text: a labelled JSONL file and a raw-text source, turned into the arrays the
runner and the training loop consume (tasks.Split, tasks.TargetData, tasks.SourceData).

    data = read_labelled("reviews.jsonl")            # every bad line reported, or nothing
    text = read_source("corpus/")                    # one .txt file or a folder of them
    vocab = ByteVocab()                              # or GPT2Vocab.from_dir("gpt2/")
    target = encode_labelled(data, vocab, max_len=64)          # train/val/test Splits
    source = source_splits(text, vocab, seq_len=64)            # LM windows, some held out
    refs = file_baselines(target)                    # majority (or mean) and n-gram counts

A file is checked whole before anything is returned: every problem is collected, and one
ValueError lists them as `path:LINE: what`, so a half-read file never reaches training.
The label kind decides the task: class names or integer ids give K-way classification
(kind "topic"), numbers in [0, 1] give the score head (kind "score"). Without `split`
fields the examples are split by a seeded, stratified deal that is recorded line by line.

The synthetic tasks know their optimum; real text does not, so the references here are
the simplest things that could work: the majority class (or the training mean) and a
multinomial naive Bayes over bags of n-grams. See docs/own_data.md.
"""
from __future__ import annotations

import json
import math
import operator
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .tasks import SourceData, Split, TargetData
from .tokenizer import encode_around_eot
from .train import metrics

SPLITS = ("train", "val", "test")
FRACTIONS = (0.7, 0.1, 0.2)  # default seeded split: train, val, test
SCORE_BINS = 5  # scores are stratified by quantile bins (quintiles)
MAX_LISTED = 10  # problems written out in full in one error message
EOT = "<|endoftext|>"  # GPT-2's document separator; ByteVocab encodes it as its EOT id too
SOURCE_SEPARATOR = EOT  # between the files of a source folder: "a new document starts here"


# ----------------------------------------------------------------------------------------
# reading a labelled JSONL file


@dataclass
class LabelledData:
    """A labelled file, checked whole. Lists and arrays are in file order, one entry per
    example (blank lines are not examples).

    kind:     "topic" (K-way classification, K = len(classes)) or "score" (floats in [0, 1])
    texts:    the `text` of each example
    y:        (N,) int64 class ids (index into `classes`) or float64 scores
    classes:  the distinct labels in sorted order; class id k is classes[k] (empty for score)
    lines:    (N,) int64, the 1-based file line of each example
    split:    (N,) the split of each example: "train", "val" or "test"
    split_from: "file" (every line had a `split`) or "seeded" (dealt by `stratified_split`)
    """

    path: str
    kind: str
    texts: list[str]
    y: np.ndarray
    classes: tuple
    lines: np.ndarray
    split: np.ndarray
    split_from: str
    seed: int | None = None
    fractions: tuple | None = None

    @property
    def n_classes(self) -> int:
        """K for classification, 1 for score (tasks.TargetData's convention)."""
        return len(self.classes) if self.kind == "topic" else 1

    def indices(self, name: str) -> np.ndarray:
        """Positions (into texts and y) of the examples in split `name`, in file order."""
        return np.flatnonzero(self.split == name)

    def split_record(self) -> dict:
        """Which line went where, for the results JSON: enough to rebuild the split."""
        record = {"file": self.path, "from": self.split_from, "seed": self.seed,
                  "fractions": None if self.fractions is None else list(self.fractions)}
        for name in SPLITS:
            record[name] = [int(n) for n in self.lines[self.indices(name)]]
        if self.kind == "topic":
            record["classes"] = list(self.classes)
        return record


class Problems:
    """Problems found in one file, kept until the whole file has been read."""

    def __init__(self, path: str):
        self.path, self.found = path, []

    def add(self, line: int | None, what: str) -> None:
        self.found.append((line, f"{self.path}:{line}: {what}" if line else f"{self.path}: {what}"))

    def raise_if_any(self) -> None:
        """One ValueError: the file and the count, then up to MAX_LISTED problems."""
        if not self.found:
            return
        n = len(self.found)
        head = f"{self.path}: {n} problem{'s' if n > 1 else ''}, nothing was read"
        # in file order; problems of the whole file (no line) last
        ordered = sorted(self.found, key=lambda p: (p[0] is None, p[0] or 0))
        listed = [message for _, message in ordered[:MAX_LISTED]]
        more = [f"... and {n - MAX_LISTED} more"] if n > MAX_LISTED else []
        raise ValueError("\n".join([head, *listed, *more]))


def _read_bytes(path: str) -> bytes:
    """The file's bytes, or a one-line ValueError naming it."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise ValueError(f"{path}: no such file") from None
    except OSError as e:  # a directory, no permission, ...
        raise ValueError(f"{path}: cannot be read ({e.strerror})") from None


def _label_kind(label) -> str | None:
    """"name" (str), "id" (int) or "score" (float); None for anything else (bool, null, ...)."""
    if isinstance(label, bool):
        return None
    if isinstance(label, str):
        return "name"
    if isinstance(label, int):
        return "id"
    if isinstance(label, float):
        return "score"
    return None


KIND_WORDS = {"name": "a class name", "id": "a class id", "score": "a score"}


def _check_line(obj, problems: Problems, n: int):
    """(text, label, label kind, split or None) of one parsed line, or None after adding
    every problem the line has to `problems`."""
    if not isinstance(obj, dict):
        problems.add(n, f"expected a JSON object with \"text\" and \"label\", got a JSON {_json_type(obj)}")
        return None
    ok = True
    text = obj.get("text")
    if "text" not in obj:
        problems.add(n, 'missing field "text"')
        ok = False
    elif not isinstance(text, str):
        problems.add(n, f'"text" must be a string, got a JSON {_json_type(text)}')
        ok = False
    elif not text.strip():
        problems.add(n, '"text" is empty')
        ok = False
    else:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:  # "\ud800" is valid JSON but no UTF-8 text holds it
            problems.add(n, f'"text" holds a lone surrogate U+{ord(text[e.start]):04X}, which is not text')
            ok = False
    label, kind = obj.get("label"), None
    if "label" not in obj:
        problems.add(n, 'missing field "label"')
        ok = False
    else:
        kind = _label_kind(label)
        if kind is None:
            problems.add(n, f'"label" must be a class name (string), a class id (integer) or a score '
                            f"(number in [0, 1]), got {json.dumps(label)}")
            ok = False
        elif kind == "name" and not label.strip():
            problems.add(n, '"label" is an empty string')
            ok = False
        elif kind == "score" and not (0.0 <= label <= 1.0):  # NaN fails this too
            problems.add(n, f'"label" {label} is a score outside [0, 1]')
            ok = False
    split = obj.get("split")
    if "split" in obj and split not in SPLITS:
        problems.add(n, f'unknown split {json.dumps(split)}; use "train", "val" or "test"')
        ok = False
    return (text, label, kind, split) if ok else None


def _json_type(value) -> str:
    for kind, name in ((bool, "boolean"), (str, "string"), (int, "number"), (float, "number"),
                       (list, "array"), (dict, "object")):
        if isinstance(value, kind):
            return name
    return "null"


def read_labelled(path, fractions=FRACTIONS, seed: int = 0, score_bins: int = SCORE_BINS) -> LabelledData:
    """Read and check a labelled JSONL file: one object per line, `text` (non-empty string),
    `label` (class name, integer class id, or a number in [0, 1] for a score), optional
    `split` ("train", "val", "test"). Blank lines are skipped; other fields are ignored.

    Every problem of the file is collected first; any problem raises one ValueError whose
    first line names the file and the count, then `path:LINE: what` per problem.

    Labels: all strings -> class names, all integers -> class ids (both "topic"; ids are
    the sorted distinct labels); any float -> "score" (then integer labels must be 0 or 1,
    written as numbers). Strings mixed with numbers are refused.
    Splits: every line has one (used as written) or none (`stratified_split` with
    `fractions` and `seed`, by class, or by `score_bins` quantile bins of the score).
    """
    path = os.fspath(path)
    _check_fractions(fractions)
    raw = _read_bytes(path)
    problems = Problems(path)
    rows = []  # (line number, text, label, kind, split)
    for n, line_bytes in enumerate(raw.split(b"\n"), start=1):
        if n == 1 and line_bytes.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte-order mark
            line_bytes = line_bytes[3:]
        try:
            line = line_bytes.decode("utf-8")
        except UnicodeDecodeError as e:
            problems.add(n, f"not UTF-8 (byte 0x{line_bytes[e.start]:02x} at column {e.start + 1})")
            continue
        if not line.strip():
            continue
        try:
            obj = json.loads(line, parse_constant=float)  # NaN, Infinity: caught as scores outside [0, 1]
        except json.JSONDecodeError as e:
            problems.add(n, f"not JSON ({e.msg} at column {e.colno})")
            continue
        checked = _check_line(obj, problems, n)
        if checked is not None:
            rows.append((n, *checked))

    if not rows and not problems.found:
        problems.add(None, "no examples: the file is empty (or only blank lines)")
    kind = _resolve_label_kind(rows, problems)
    with_split = [r for r in rows if r[4] is not None]
    if with_split and len(with_split) < len(rows):
        first_with = with_split[0][0]
        for r in rows:
            if r[4] is None:
                problems.add(r[0], f'no "split", but line {first_with} has one: give every line a split, or none')
    problems.raise_if_any()  # the checks below need clean lines

    lines = np.array([r[0] for r in rows], dtype=np.int64)
    texts = [r[1] for r in rows]
    labels = [r[2] for r in rows]
    if kind == "score":
        y, classes = np.array(labels, dtype=np.float64), ()
    else:
        classes = tuple(sorted(set(labels)))
        if len(classes) < 2:
            problems.add(None, f"every label is {json.dumps(classes[0])}: classification needs at least 2 classes")
            problems.raise_if_any()
        ids = {c: k for k, c in enumerate(classes)}
        y = np.array([ids[label] for label in labels], dtype=np.int64)

    if with_split:
        split, split_from, seed_used, fractions_used = np.array([r[4] for r in rows]), "file", None, None
    else:
        if len(rows) < 3:
            problems.add(None, f"{len(rows)} example{'s' if len(rows) > 1 else ''}: a train, a val and "
                               "a test split need at least 3")
            problems.raise_if_any()
        strata = y if kind == "topic" else quantile_bins(y, score_bins)
        try:
            split = stratified_split(strata, fractions, seed)
        except ValueError as e:
            problems.add(None, str(e))
            problems.raise_if_any()
        split_from, seed_used, fractions_used = "seeded", int(seed), tuple(float(f) for f in fractions)
    for name in SPLITS:
        if not np.any(split == name):
            problems.add(None, f'no {name} examples after splitting (no line has "split": "{name}")')
    problems.raise_if_any()
    return LabelledData(path, kind, texts, y, classes, lines, split, split_from, seed_used, fractions_used)


def _resolve_label_kind(rows, problems: Problems) -> str | None:
    """"topic" or "score" from the label kinds of the clean rows; mixed kinds are problems.

    Integers among floats are scores (0 and 1 written without a decimal point); every other
    mix (names with numbers) is reported on each line that differs from the first line."""
    if not rows:
        return None
    kinds = {r[3] for r in rows}
    if kinds == {"id", "score"}:
        for r in rows:
            if r[3] == "id" and r[2] not in (0, 1):
                problems.add(r[0], f'"label" {r[2]} is a score outside [0, 1]')
        return "score"
    if len(kinds) > 1:
        first_line, _, first_label, first_kind, _ = rows[0]
        for n, _, label, kind, _ in rows:
            if kind != first_kind:
                problems.add(n, f'"label" {json.dumps(label)} is {KIND_WORDS[kind]}, but line {first_line}\'s '
                                f"{json.dumps(first_label)} is {KIND_WORDS[first_kind]}: labels of mixed kinds")
        return None
    return "score" if kinds == {"score"} else "topic"


# ----------------------------------------------------------------------------------------
# the seeded, stratified split


def _check_fractions(fractions) -> None:
    ok = (isinstance(fractions, (tuple, list)) and len(fractions) == 3
          and all(isinstance(f, (int, float)) and not isinstance(f, bool) and f > 0 for f in fractions)
          and abs(sum(fractions) - 1.0) < 1e-9)
    if not ok:
        raise ValueError(f"fractions must be three numbers > 0 (train, val, test) that sum to 1, got {fractions!r}")


def quantile_bins(scores, n_bins: int = SCORE_BINS) -> np.ndarray:
    """(N,) int64 bin of each score: its rank cut into n_bins groups of (nearly) equal size,
    so a split stratified by bin has low, middle and high scores in every part. Equal
    scores share a bin (ties are ranked by their order in the file)."""
    scores = np.asarray(scores, dtype=np.float64)
    ranks = np.empty(len(scores), dtype=np.int64)
    ranks[np.argsort(scores, kind="stable")] = np.arange(len(scores))
    bins = ranks * n_bins // max(len(scores), 1)  # (N,)
    # equal scores go to the bin of their first occurrence: a tie never straddles two bins
    first_bin = {}
    for s, b in sorted(zip(scores.tolist(), bins.tolist())):
        first_bin.setdefault(s, b)
    return np.array([first_bin[s] for s in scores.tolist()], dtype=np.int64)


def deal_pattern(n: int, fractions) -> np.ndarray:
    """(n,) split names spread evenly with exact totals: position i goes to the split that is
    furthest behind its share of the first i + 1 positions (fractions * (i + 1) - dealt).

    Totals: val and test get round(fraction * n), at least 1 each; train gets the rest."""
    counts = [0, max(1, round(fractions[1] * n)), max(1, round(fractions[2] * n))]
    counts[0] = n - counts[1] - counts[2]
    if counts[0] < 1:
        raise ValueError(f"{n} examples leave no train example with fractions {tuple(fractions)} "
                         f"(val {counts[1]}, test {counts[2]})")
    share = np.array(counts, dtype=np.float64) / n
    dealt = np.zeros(3)
    out = np.empty(n, dtype=object)
    for i in range(n):
        s = int(np.argmax(share * (i + 1) - dealt))  # ties go to the earlier split (train)
        dealt[s] += 1
        out[i] = SPLITS[s]
    return out.astype(str)


def stratified_split(strata, fractions=FRACTIONS, seed: int = 0) -> np.ndarray:
    """(N,) "train" / "val" / "test" for each example, stratified by `strata` (N,) ints.

    The examples are ordered by stratum, shuffled within each stratum by `seed`, and dealt
    along that order with `deal_pattern`. Each stratum is a contiguous run of the deal, so
    it lands in each split in proportion, within two examples; the totals are exact. The
    same strata, fractions and seed always give the same split."""
    _check_fractions(fractions)
    strata = np.asarray(strata)
    n = len(strata)
    if n < 3:
        raise ValueError(f"a train, a val and a test split need at least 3 examples, got {n}")
    rng = np.random.default_rng(seed)
    order = np.lexsort((rng.permutation(n), strata))  # by stratum, then a random key
    split = np.empty(n, dtype=deal_pattern(n, fractions).dtype)
    split[order] = deal_pattern(n, fractions)
    return split


# ----------------------------------------------------------------------------------------
# reading the source text


def read_source(path) -> str:
    """Unlabelled text for pretraining: one UTF-8 file, or every `.txt` file under a folder
    (subfolders too), in sorted order of their paths, joined with SOURCE_SEPARATOR.

    Windows line ends become "\\n"; a byte-order mark is dropped; files holding only
    whitespace are skipped. A bad path, a folder with no .txt file, a non-UTF-8 file or no
    text at all raises a one-line ValueError naming the file."""
    path = os.fspath(path)
    if os.path.isdir(path):
        files = sorted(Path(path).rglob("*.txt"), key=lambda p: p.relative_to(path).as_posix())
        if not files:
            raise ValueError(f"{path}: no .txt files in this folder")
    elif os.path.exists(path):
        files = [Path(path)]
    else:
        raise ValueError(f"{path}: no such file or folder")
    texts = []
    for file in files:
        data = _read_bytes(str(file))
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError as e:
            line = data.count(b"\n", 0, e.start) + 1
            raise ValueError(f"{file}:{line}: not UTF-8 (byte 0x{data[e.start]:02x})") from None
        text = text.replace("\r\n", "\n")
        if text.strip():
            texts.append(text)
    if not texts:
        raise ValueError(f"{path}: no text (every file is empty)")
    return SOURCE_SEPARATOR.join(texts)


# ----------------------------------------------------------------------------------------
# tokenization: bytes, or GPT-2's BPE


class ByteVocab:
    """Text as its UTF-8 bytes, ids 0..255, plus three specials: PAD 256, CLS 257, EOT 258
    (vocab_size 259). Needs no files, knows every language, and decodes exactly:
    decode(encode(s)) == s for every str that has UTF-8. `<|endoftext|>` in the text
    becomes the single id EOT, as in GPT-2. The cost: a token is a byte, so a sentence
    is about 4 times longer than in GPT-2's BPE for English (see docs/own_data.md#tokenization)."""

    name = "bytes"
    pad_id, cls_id, eot_id = 256, 257, 258
    vocab_size = 259

    def encode(self, text: str) -> list[int]:
        def utf8(piece):
            try:
                return list(piece.encode("utf-8"))
            except UnicodeEncodeError as e:
                raise ValueError(f"encode: the text holds a lone surrogate U+{ord(piece[e.start]):04X}, "
                                 "which has no UTF-8 bytes") from None

        return encode_around_eot(text, self.eot_id, utf8)

    def decode(self, ids) -> str:
        """Bytes back to text; EOT becomes `<|endoftext|>`, PAD and CLS are dropped (they
        are not text), and bytes that are not UTF-8 (a cut character) become U+FFFD."""
        out, run = [], bytearray()
        for k, i in enumerate(ids):
            try:
                i = None if isinstance(i, bool) else operator.index(i)
            except TypeError:
                i = None
            if i is None or not 0 <= i < self.vocab_size:
                raise ValueError(f"decode: ids[{k}] = {ids[k]!r} is not a token id; ByteVocab has ids 0 to "
                                 f"{self.vocab_size - 1}")
            if i < 256:
                run.append(i)
            elif i == self.eot_id:
                out.extend([run.decode("utf-8", errors="replace"), EOT])
                run = bytearray()
        out.append(run.decode("utf-8", errors="replace"))
        return "".join(out)


class GPT2Vocab:
    """GPT-2's BPE (tokenizer.GPT2Tokenizer) behind ByteVocab's interface.

    GPT-2 has no pad token and no CLS. As Hugging Face does, the pad id is the end-of-text
    id (50256) and the attention mask tells padding from a real `<|endoftext|>`: every
    reader of a Split (attention, pooling, losses) looks at the mask, never at the pad id.
    cls_id is None: for CLS pooling the runner adds a new embedding row, as it does for
    the synthetic tasks (GPT.resize_vocab)."""

    name = "gpt2"
    cls_id = None

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    @classmethod
    def from_dir(cls, path) -> "GPT2Vocab":
        """vocab.json and merges.txt of a Hugging Face GPT-2 folder."""
        from .tokenizer import GPT2Tokenizer

        return cls(GPT2Tokenizer.from_dir(path))

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    @property
    def eot_id(self) -> int:
        return self.tokenizer.eot_id

    @property
    def pad_id(self) -> int:
        return self.tokenizer.eot_id  # under the mask: see the class docstring

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def decode(self, ids) -> str:
        return self.tokenizer.decode(ids)


# ----------------------------------------------------------------------------------------
# arrays for the model


@dataclass
class FileTarget(TargetData):
    """tasks.TargetData of a labelled file, plus what the results JSON reports about it."""

    classes: tuple = ()
    max_len: int = 0
    truncate: str = "right"
    truncated: dict = field(default_factory=dict)  # split name -> rows cut to fit
    split_record: dict = field(default_factory=dict)  # LabelledData.split_record()


def encode_labelled(data: LabelledData, vocab, max_len: int, truncate: str = "right",
                    cls_slot: bool = True) -> FileTarget:
    """Tokenize every example into train/val/test tasks.Split arrays of max_len columns.

    x (N, max_len) int64, the pad id after each row's tokens; mask (N, max_len) bool, True
    on real tokens (a prefix); y (N,) int64 class ids or float64 scores. A row longer than
    it may be is cut: truncate="right" keeps its start, "left" keeps its end, and
    `truncated` counts the cut rows per split. cls_slot=True keeps one column free after
    every row (at most max_len - 1 tokens), so tasks.append_cls can write CLS there, as
    the synthetic tasks do."""
    if truncate not in ("right", "left"):
        raise ValueError(f'truncate must be "right" or "left", got {truncate!r}')
    if not isinstance(max_len, int) or isinstance(max_len, bool) or max_len < (2 if cls_slot else 1):
        raise ValueError(f"max_len must be an integer >= {2 if cls_slot else 1}, got {max_len!r}")
    limit = max_len - (1 if cls_slot else 0)  # real tokens a row may hold
    splits, truncated = {}, {}
    for name in SPLITS:
        index = data.indices(name)
        x = np.full((len(index), max_len), vocab.pad_id, dtype=np.int64)  # (N, T)
        mask = np.zeros((len(index), max_len), dtype=bool)  # (N, T)
        cut = 0
        for row, i in enumerate(index):
            ids = vocab.encode(data.texts[i])
            if len(ids) > limit:
                cut += 1
                ids = ids[:limit] if truncate == "right" else ids[len(ids) - limit:]
            x[row, :len(ids)] = ids
            mask[row, :len(ids)] = True
        splits[name] = Split(x=x, y=data.y[index].copy(), mask=mask)
        truncated[name] = cut
    return FileTarget(kind=data.kind, train=splits["train"], val=splits["val"], test=splits["test"],
                      n_classes=data.n_classes, vocab_size=vocab.vocab_size, pad_id=vocab.pad_id,
                      classes=data.classes, max_len=max_len, truncate=truncate, truncated=truncated,
                      split_record=data.split_record())


@dataclass
class FileSource(SourceData):
    """tasks.SourceData of a raw text: non-overlapping windows of seq_len tokens."""

    n_tokens: int = 0  # tokens in the whole text
    dropped_tokens: int = 0  # the tail shorter than one window, in no window
    val_windows: np.ndarray | None = None  # (N_val,) which windows (in text order) are held out


def source_splits(text: str, vocab, seq_len: int, val_fraction: float = 0.1, seed: int = 0,
                  max_val: int | None = None) -> FileSource:
    """Cut the tokenized text into non-overlapping windows of seq_len tokens (the tail that
    fills no window is dropped) and hold out round(val_fraction * windows), at least one and
    at most `max_val` (None: no limit), chosen by `seed`. The held-out windows measure
    forgetting: the source LM loss of an adapted backbone on text it never trained on.
    train, val: (N, seq_len) int64."""
    if not isinstance(seq_len, int) or seq_len < 2:
        raise ValueError(f"seq_len must be an integer >= 2, got {seq_len!r}")
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
    tokens = np.asarray(vocab.encode(text), dtype=np.int64)  # (n_tokens,)
    n_windows = len(tokens) // seq_len
    if n_windows < 2:
        raise ValueError(f"the source text is {len(tokens)} tokens: {n_windows} window(s) of {seq_len}; "
                         "pretraining needs at least 2 (one to train on, one held out)")
    windows = tokens[: n_windows * seq_len].reshape(n_windows, seq_len)  # (W, seq_len)
    n_val = min(max(1, round(val_fraction * n_windows)), n_windows - 1, max_val or n_windows)
    val_windows = np.sort(np.random.default_rng(seed).permutation(n_windows)[:n_val])
    is_val = np.zeros(n_windows, dtype=bool)
    is_val[val_windows] = True
    return FileSource(train=windows[~is_val], val=windows[is_val], vocab_size=vocab.vocab_size,
                      pad_id=vocab.pad_id, n_tokens=len(tokens),
                      dropped_tokens=len(tokens) - n_windows * seq_len, val_windows=val_windows)


# ----------------------------------------------------------------------------------------
# baselines on file data


def _scored(kind: str, outputs, y) -> dict:
    """train.metrics on label-only data: the metrics read y, never x."""
    y = np.asarray(y)
    blank = np.zeros((len(y), 1), dtype=np.int64)
    return metrics(kind, np.asarray(outputs), Split(x=blank, y=y, mask=blank.astype(bool)))


def ngrams(item, n=(1, 2)) -> Counter:
    """The bag of n-grams of one text (characters) or token sequence (ids), for each order
    in `n`: Counter of tuples, e.g. ngrams("abab", (1, 2)) has ('a',): 2, ('a', 'b'): 2."""
    seq = tuple(item)
    bag = Counter()
    for k in n:
        bag.update(seq[i:i + k] for i in range(len(seq) - k + 1))
    return bag


def ngram_outputs(train_texts, train_labels, eval_texts, n=(1, 2), alpha: float = 1.0) -> np.ndarray:
    """log p(c | x) of a multinomial naive Bayes over bags of n-grams: (N_eval, K).

        log p(c | x) = log prior(c) + sum_f count(f in x) log p(f | c) - log Z
        p(f | c) = (count(f in class c) + alpha) / (all n-gram counts of c + alpha |F|)

    fitted on the training texts only: prior(c) is the class frequency, F the n-grams seen
    in training (an unseen n-gram is skipped, as scikit-learn's CountVectorizer does).
    Labels are class ids 0..K-1 (K = max + 1). Texts are strings (character n-grams) or
    sequences of token ids (token n-grams)."""
    labels = np.asarray(train_labels, dtype=np.int64)
    K = int(labels.max()) + 1
    features = {}  # n-gram -> column
    bags = [ngrams(t, n) for t in train_texts]
    for bag in bags:
        for f in bag:
            features.setdefault(f, len(features))
    counts = np.zeros((K, len(features)))  # (K, F) n-gram counts per class
    for bag, c in zip(bags, labels):
        for f, m in bag.items():
            counts[c, features[f]] += m
    log_p = np.log(counts + alpha) - np.log(counts.sum(axis=1, keepdims=True) + alpha * len(features))  # (K, F)
    with np.errstate(divide="ignore"):  # a class absent from training has prior 0: log 0 = -inf
        log_prior = np.log(np.bincount(labels, minlength=K) / len(labels))  # (K,)
    joint = np.tile(log_prior, (len(eval_texts), 1))  # (N_eval, K)
    for row, t in enumerate(eval_texts):  # row by row: a dense (N_eval, F) matrix can be huge
        known = [(features[f], m) for f, m in ngrams(t, n).items() if f in features]
        if known:
            cols, m = np.array(known).T  # (F_x,) columns and counts of the row's known n-grams
            joint[row] += log_p[:, cols] @ m
    return joint - np.logaddexp.reduce(joint, axis=1, keepdims=True)


def ngram_count_baseline(train_texts, train_labels, eval_texts, eval_labels, n=(1, 2),
                         alpha: float = 1.0) -> dict:
    """{"accuracy": ...} of the n-gram naive Bayes (`ngram_outputs`) on the eval texts."""
    outputs = ngram_outputs(train_texts, train_labels, eval_texts, n, alpha)
    return _scored("topic", outputs, eval_labels)


def majority_baseline(train_labels, eval_labels) -> dict:
    """{"accuracy": ...} of always predicting the most frequent training class (ties: the
    lower id)."""
    majority = int(np.bincount(np.asarray(train_labels, dtype=np.int64)).argmax())
    K = max(majority + 1, int(np.max(eval_labels)) + 1)
    return _scored("topic", np.broadcast_to(np.eye(K)[majority], (len(eval_labels), K)), eval_labels)


def mean_baseline(train_scores, eval_scores) -> dict:
    """{"mse": ..., "mae": ...} of always predicting the training mean score."""
    mean = float(np.mean(train_scores))
    return _scored("score", np.full(len(eval_scores), mean), np.asarray(eval_scores, dtype=np.float64))


def split_tokens(split: Split) -> list[list[int]]:
    """Each row's real tokens, the ones the model reads (after truncation, without CLS)."""
    return [row[m].tolist() for row, m in zip(split.x, split.mask)]


def file_baselines(target: TargetData, seed: int = 0, n=(1, 2), alpha: float = 1.0) -> list[dict]:
    """The references for the results' `baselines` list, on the test split: "chance" (the
    majority class, or the mean score) and, for classification, "count" (the n-gram naive
    Bayes over the same tokens the model reads, fitted on the training split)."""
    train, test = target.train, target.test
    if target.kind == "score":
        found = {"chance": mean_baseline(train.y, test.y)}
    else:
        found = {"chance": majority_baseline(train.y, test.y),
                 "count": ngram_count_baseline(split_tokens(train), train.y, split_tokens(test), test.y, n, alpha)}
    return [{"name": name, "task": target.kind, "seed": int(seed), "relatedness": None, "target": t}
            for name, t in found.items()]
