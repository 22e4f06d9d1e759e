"""Data from files (src/transferlab/data.py): every bad line of a labelled JSONL file is
reported by file and line, the seeded split is stratified and reproducible, the byte
vocabulary round-trips any text, truncation is counted on the chosen side, source text is
cut into non-overlapping windows, and the n-gram naive Bayes matches a hand computation.

Every file is written here, in tmp_path: nothing is downloaded."""
from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest

from transferlab.data import (EOT, FRACTIONS, MAX_LISTED, SOURCE_SEPARATOR, SPLITS, ByteVocab,
                              GPT2Vocab, deal_pattern, encode_labelled, file_baselines,
                              majority_baseline, mean_baseline, ngram_count_baseline, ngram_outputs,
                              ngrams, quantile_bins, read_labelled, read_source, source_splits,
                              split_tokens, stratified_split)
from transferlab.tasks import append_cls
from transferlab.tokenizer import GPT2Tokenizer, bytes_to_unicode


def write_lines(path, lines, newline="\n"):
    """A JSONL file from dicts (dumped) and strings (written as they are)."""
    text = newline.join(line if isinstance(line, str) else json.dumps(line) for line in lines) + newline
    path.write_text(text, encoding="utf-8")
    return path


def good_rows(n=30, labels=("cat", "dog")):
    return [{"text": f"example {i} {labels[i % len(labels)]}", "label": labels[i % len(labels)]}
            for i in range(n)]


def error_of(path, **kwargs) -> str:
    with pytest.raises(ValueError) as info:
        read_labelled(path, **kwargs)
    return str(info.value)


# ------------------------------------------------------------------------------ bad lines

LABEL_TYPES = '"label" must be a class name (string), a class id (integer) or a score (number in [0, 1]), got '
BAD_LINES = [  # (line 3 of an otherwise good file, the message expected for it)
    ("this is not json", "not JSON (Expecting value at column 1)"),
    ('{"text": "a", "label": "cat"', "not JSON ("),
    ("[1, 2]", 'expected a JSON object with "text" and "label", got a JSON array'),
    ('"just a string"', 'expected a JSON object with "text" and "label", got a JSON string'),
    ({"label": "cat"}, 'missing field "text"'),
    ({"text": "a film"}, 'missing field "label"'),
    ({"text": 7, "label": "cat"}, '"text" must be a string, got a JSON number'),
    ({"text": "", "label": "cat"}, '"text" is empty'),
    ({"text": " \t ", "label": "cat"}, '"text" is empty'),
    ('{"text": "\\ud800", "label": "cat"}', '"text" holds a lone surrogate U+D800, which is not text'),
    ({"text": "a", "label": True}, LABEL_TYPES + "true"),
    ({"text": "a", "label": None}, LABEL_TYPES + "null"),
    ({"text": "a", "label": ["cat"]}, LABEL_TYPES + '["cat"]'),
    ({"text": "a", "label": ""}, '"label" is an empty string'),
    ({"text": "a", "label": "cat", "split": "dev"}, 'unknown split "dev"; use "train", "val" or "test"'),
    ({"text": "a", "label": "cat", "split": None}, 'unknown split null; use "train", "val" or "test"'),
    ({"text": "a", "label": 0.5}, "\"label\" 0.5 is a score, but line 1's \"cat\" is a class name: "
                                  "labels of mixed kinds"),
    ({"text": "a", "label": 3}, "\"label\" 3 is a class id, but line 1's \"cat\" is a class name: "
                                "labels of mixed kinds"),
]


@pytest.mark.parametrize("bad, message", BAD_LINES, ids=[m[:40] for _, m in BAD_LINES])
def test_every_bad_line_kind_is_reported_with_file_and_line(tmp_path, bad, message):
    rows = good_rows(6)
    rows.insert(2, bad)
    path = write_lines(tmp_path / "data.jsonl", rows)
    err = error_of(path)
    first, *rest = err.splitlines()
    assert first == f"{path}: 1 problem, nothing was read"
    assert rest[0].startswith(f"{path}:3: {message}"), rest


def test_score_file_problems(tmp_path):
    """A score outside [0, 1] (NaN too), and integers other than 0 and 1 among scores."""
    rows = [{"text": "a", "label": 0.2}, {"text": "b", "label": 1.5}, '{"text": "c", "label": NaN}',
            {"text": "d", "label": 1}, {"text": "e", "label": 2}, {"text": "f", "label": -0.1}]
    path = write_lines(tmp_path / "scores.jsonl", rows)
    assert error_of(path).splitlines() == [
        f"{path}: 4 problems, nothing was read",
        f'{path}:2: "label" 1.5 is a score outside [0, 1]',
        f'{path}:3: "label" nan is a score outside [0, 1]',
        f'{path}:5: "label" 2 is a score outside [0, 1]',
        f'{path}:6: "label" -0.1 is a score outside [0, 1]',
    ]


def test_all_problems_are_collected_in_file_order_in_one_message(tmp_path):
    rows = ["{oops", {"text": "a", "label": 0.5}, {"label": "x"}, {"text": "b", "label": "cat", "split": "x"}]
    path = write_lines(tmp_path / "d.jsonl", [{"text": "first", "label": "cat"}, *rows])
    assert error_of(path).splitlines() == [
        f"{path}: 4 problems, nothing was read",
        f"{path}:2: not JSON (Expecting property name enclosed in double quotes at column 2)",
        f"{path}:3: \"label\" 0.5 is a score, but line 1's \"cat\" is a class name: labels of mixed kinds",
        f'{path}:4: missing field "text"',
        f'{path}:5: unknown split "x"; use "train", "val" or "test"',
    ]


def test_a_long_list_of_problems_is_cut_after_max_listed(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", ["nope"] * 25)
    lines = error_of(path).splitlines()
    assert lines[0] == f"{path}: 25 problems, nothing was read"
    assert len(lines) == 1 + MAX_LISTED + 1
    assert lines[1] == f"{path}:1: not JSON (Expecting value at column 1)"
    assert lines[MAX_LISTED] == f"{path}:{MAX_LISTED}: not JSON (Expecting value at column 1)"
    assert lines[-1] == f"... and {25 - MAX_LISTED} more"


def test_a_line_that_is_not_utf8_is_reported(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"text": "ok", "label": "a"}\n{"text": "caf\xe9", "label": "b"}\n')
    assert error_of(path).splitlines()[1] == f"{path}:2: not UTF-8 (byte 0xe9 at column 14)"


@pytest.mark.parametrize("content", ["", "\n\n  \n"], ids=["empty", "blank lines"])
def test_a_blank_file_is_refused(tmp_path, content):
    path = tmp_path / "blank.jsonl"
    path.write_text(content, encoding="utf-8")
    assert error_of(path).splitlines() == [
        f"{path}: 1 problem, nothing was read",
        f"{path}: no examples: the file is empty (or only blank lines)",
    ]


def test_missing_file_and_folder_are_one_line(tmp_path):
    assert error_of(tmp_path / "nope.jsonl") == f"{tmp_path / 'nope.jsonl'}: no such file"
    assert error_of(tmp_path).startswith(f"{tmp_path}: cannot be read")


def test_no_train_examples_after_splitting(tmp_path):
    rows = [{**r, "split": "val" if i % 2 else "test"} for i, r in enumerate(good_rows(6))]
    path = write_lines(tmp_path / "d.jsonl", rows)
    assert error_of(path).splitlines()[1] == \
        f'{path}: no train examples after splitting (no line has "split": "train")'


def test_split_on_some_lines_but_not_all(tmp_path):
    rows = good_rows(5)
    rows[1]["split"] = "train"
    path = write_lines(tmp_path / "d.jsonl", rows)
    lines = error_of(path).splitlines()
    assert lines[0] == f"{path}: 4 problems, nothing was read"
    assert lines[1] == f'{path}:1: no "split", but line 2 has one: give every line a split, or none'
    assert [line.split(":")[1] for line in lines[1:]] == ["1", "3", "4", "5"]


def test_one_class_and_too_few_examples_are_refused(tmp_path):
    path = write_lines(tmp_path / "one.jsonl", [{"text": f"t{i}", "label": "spam"} for i in range(5)])
    assert error_of(path).splitlines()[1] == \
        f'{path}: every label is "spam": classification needs at least 2 classes'
    path = write_lines(tmp_path / "two.jsonl", [{"text": "a", "label": "x"}, {"text": "b", "label": "y"}])
    assert error_of(path).splitlines()[1] == f"{path}: 2 examples: a train, a val and a test split need at least 3"


def test_fractions_that_leave_no_train_example_are_refused(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", good_rows(3))
    assert "3 examples leave no train example" in error_of(path, fractions=(0.01, 0.01, 0.98))
    with pytest.raises(ValueError, match=r"fractions must be three numbers > 0 \(train, val, test\) that sum to 1"):
        read_labelled(path, fractions=(0.8, 0.3, 0.1))


# ------------------------------------------------------------------------------ good files


def test_class_names_become_sorted_ids_and_the_kind_is_topic(tmp_path):
    labels = ["pear", "apple", "fig"] * 5
    path = write_lines(tmp_path / "d.jsonl", [{"text": f"t {i}", "label": lab, "id": i} for i, lab in enumerate(labels)])
    data = read_labelled(path)
    assert data.kind == "topic" and data.n_classes == 3
    assert data.classes == ("apple", "fig", "pear")
    assert data.y.dtype == np.int64 and list(data.y[:3]) == [2, 0, 1]
    assert data.texts[4] == "t 4" and list(data.lines[:3]) == [1, 2, 3]


def test_integer_ids_are_classes_sorted_by_value(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", [{"text": f"t {i}", "label": [10, 2, 7][i % 3]} for i in range(9)])
    data = read_labelled(path)
    assert data.kind == "topic" and data.classes == (2, 7, 10)  # by value, not as text ("10" < "2")
    assert list(data.y[:3]) == [2, 0, 1]


def test_floats_make_a_score_file_and_integers_0_1_are_scores_there(tmp_path):
    rows = [{"text": f"t {i}", "label": [0, 0.25, 1, 0.5][i % 4]} for i in range(12)]
    data = read_labelled(write_lines(tmp_path / "s.jsonl", rows))
    assert data.kind == "score" and data.n_classes == 1 and data.classes == ()
    assert data.y.dtype == np.float64 and list(data.y[:4]) == [0.0, 0.25, 1.0, 0.5]


def test_blank_lines_bom_and_windows_line_ends_are_fine(tmp_path):
    path = tmp_path / "d.jsonl"
    body = "\r\n".join(json.dumps(r) for r in good_rows(6))
    path.write_bytes(b"\xef\xbb\xbf" + body.replace('\r\n{"text": "example 3', '\r\n\r\n{"text": "example 3')
                     .encode("utf-8") + b"\r\n\r\n")
    data = read_labelled(path)
    assert len(data.texts) == 6
    assert list(data.lines) == [1, 2, 3, 5, 6, 7]  # line 4 is blank
    assert data.texts[0] == "example 0 cat"


def test_split_fields_are_used_as_written_and_recorded(tmp_path):
    rows = good_rows(8)
    names = ["train", "train", "val", "test", "train", "val", "test", "train"]
    for r, s in zip(rows, names):
        r["split"] = s
    data = read_labelled(write_lines(tmp_path / "d.jsonl", rows))
    record = data.split_record()
    assert record["from"] == "file" and record["seed"] is None
    assert record["train"] == [1, 2, 5, 8] and record["val"] == [3, 6] and record["test"] == [4, 7]
    assert record["classes"] == ["cat", "dog"]


# ------------------------------------------------------------------------------ the split


def test_seeded_split_is_stratified_with_exact_totals(tmp_path):
    labels = ["a"] * 100 + ["b"] * 50 + ["c"] * 30 + ["d"] * 20  # 200 examples, imbalanced
    random.Random(0).shuffle(labels)
    data = read_labelled(write_lines(tmp_path / "d.jsonl", [{"text": f"t{i}", "label": lab}
                                                            for i, lab in enumerate(labels)]))
    assert data.split_from == "seeded" and data.seed == 0 and data.fractions == FRACTIONS
    totals = {s: int(np.sum(data.split == s)) for s in SPLITS}
    assert totals == {"train": 140, "val": 20, "test": 40}
    for k, size in enumerate([100, 50, 30, 20]):  # classes a, b, c, d
        for s, fraction in zip(SPLITS, FRACTIONS):
            got = np.sum(data.split[data.y == k] == s)
            assert abs(got - fraction * size) < 2, (k, s, got)


def test_every_class_keeps_its_proportion_in_every_split_over_many_strata():
    rng = np.random.default_rng(3)
    for trial in range(50):
        sizes = rng.integers(1, 60, size=rng.integers(2, 8))
        strata = np.repeat(np.arange(len(sizes)), sizes)
        split = stratified_split(strata, (0.6, 0.15, 0.25), seed=trial)
        n = len(strata)
        for s, count in zip(SPLITS, [n - max(1, round(0.15 * n)) - max(1, round(0.25 * n)),
                                     max(1, round(0.15 * n)), max(1, round(0.25 * n))]):
            assert np.sum(split == s) == count
            for k, size in enumerate(sizes):
                assert abs(np.sum(split[strata == k] == s) - count / n * size) < 2


def test_the_split_depends_on_the_seed_only(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", good_rows(60, labels=("x", "y", "z")))
    a, b, c = read_labelled(path, seed=4), read_labelled(path, seed=4), read_labelled(path, seed=5)
    assert a.split_record() == b.split_record()
    assert a.split_record()["train"] != c.split_record()["train"]
    record = a.split_record()
    assert sorted(record["train"] + record["val"] + record["test"]) == list(range(1, 61))
    assert record["from"] == "seeded" and record["seed"] == 4 and record["fractions"] == [0.7, 0.1, 0.2]


def test_deal_pattern_spreads_the_splits_evenly():
    pattern = deal_pattern(10, FRACTIONS)
    assert list(pattern).count("train") == 7 and list(pattern).count("val") == 1
    assert list(pattern).count("test") == 2
    assert pattern[0] == "train"
    assert "val" not in deal_pattern(5, FRACTIONS)[:1] and list(deal_pattern(3, FRACTIONS)).count("val") == 1


def test_scores_are_stratified_by_quantile_bins(tmp_path):
    scores = np.linspace(0, 1, 100)
    bins = quantile_bins(scores, 5)
    assert list(np.bincount(bins)) == [20] * 5 and list(bins[:21]) == [0] * 20 + [1]
    assert list(quantile_bins([0.5, 0.5, 0.5, 0.9], 2)) == [0, 0, 0, 1]  # a tie stays in one bin
    rng = np.random.default_rng(0)
    rows = [{"text": f"t{i}", "label": float(s)} for i, s in enumerate(rng.permutation(scores))]
    data = read_labelled(write_lines(tmp_path / "s.jsonl", rows))
    strata = quantile_bins(data.y, 5)
    for s, fraction in zip(SPLITS, FRACTIONS):
        for b in range(5):
            assert abs(np.sum(data.split[strata == b] == s) - fraction * 20) < 2


# ------------------------------------------------------------------------------ byte vocabulary


def random_text(rng, n):
    """Any Unicode text UTF-8 can hold: every plane, controls and NUL, no lone surrogates."""
    chars = []
    for _ in range(n):
        c = rng.choice([rng.randrange(0, 0x80), rng.randrange(0x80, 0x800), rng.randrange(0x800, 0xD800),
                        rng.randrange(0xE000, 0x10000), rng.randrange(0x10000, 0x110000)])
        chars.append(chr(c))
    return "".join(chars)


def test_byte_vocab_round_trips_any_utf8_text():
    vocab, rng = ByteVocab(), random.Random(0)
    assert vocab.vocab_size == 259 and (vocab.pad_id, vocab.cls_id, vocab.eot_id) == (256, 257, 258)
    for text in ["", "hello", "naïve café", "日本語のテキスト", "🙂👍🏽", "a\x00b\n\t", "e\u0301"]:
        ids = vocab.encode(text)
        assert ids == list(text.encode("utf-8")) and vocab.decode(ids) == text
    for _ in range(200):
        text = random_text(rng, rng.randrange(0, 40))
        assert vocab.decode(vocab.encode(text)) == text


def test_byte_vocab_specials():
    vocab = ByteVocab()
    ids = vocab.encode(f"one{EOT}two")
    assert ids == [111, 110, 101, 258, 116, 119, 111]
    assert vocab.decode(ids) == f"one{EOT}two"
    assert vocab.decode([104, 256, 105, 257, 256]) == "hi"  # PAD and CLS are not text
    assert vocab.decode([0xE6, 0x97]) == "\ufffd"  # a character cut in the middle
    with pytest.raises(ValueError, match=r"decode: ids\[1\] = 259 is not a token id; ByteVocab has ids 0 to 258"):
        vocab.decode([1, 259])
    with pytest.raises(ValueError, match=r"ids\[0\] = True is not a token id"):
        vocab.decode([True])
    with pytest.raises(ValueError, match=r"lone surrogate U\+D800"):
        vocab.encode("a\ud800")


def byte_level_gpt2(tmp_path):
    """A GPT-2 folder whose vocabulary is the 256 bytes, one merge ("a" + "b") and EOT."""
    encoder = {char: b for b, char in bytes_to_unicode().items()}
    encoder["ab"] = 256
    encoder[EOT] = 257
    (tmp_path / "vocab.json").write_text(json.dumps(encoder), encoding="utf-8")
    (tmp_path / "merges.txt").write_text("#version: 0.2\na b\n", encoding="utf-8")
    return tmp_path


def test_gpt2_vocab_pads_with_eot_under_the_mask(tmp_path):
    vocab = GPT2Vocab.from_dir(byte_level_gpt2(tmp_path))
    assert vocab.vocab_size == 258 and vocab.pad_id == vocab.eot_id == 257 and vocab.cls_id is None
    assert vocab.encode("abc") == [256, ord("c")] and vocab.decode([256, ord("c")]) == "abc"
    rows = [{"text": "ab", "label": "x"}, {"text": f"b{EOT}", "label": "y"}, {"text": "c", "label": "x"}]
    for r, s in zip(rows, SPLITS):
        r["split"] = s
    target = encode_labelled(read_labelled(write_lines(tmp_path / "d.jsonl", rows)), vocab, max_len=4)
    assert target.pad_id == 257 and target.vocab_size == 258
    assert target.val.x.tolist() == [[ord("b"), 257, 257, 257]]
    assert target.val.mask.tolist() == [[True, True, False, False]]  # the real EOT is masked in, pads are not


# ------------------------------------------------------------------------------ encoding


def encoded(tmp_path, texts, **kwargs):
    rows = [{"text": t, "label": ["p", "q"][i % 2], "split": "train"} for i, t in enumerate(texts)]
    rows += [{"text": "v", "label": "p", "split": "val"}, {"text": "w" * 9, "label": "q", "split": "test"}]
    data = read_labelled(write_lines(tmp_path / "d.jsonl", rows))
    return encode_labelled(data, ByteVocab(), **kwargs)


def test_right_truncation_keeps_the_start_and_counts_cut_rows(tmp_path):
    target = encoded(tmp_path, ["abcdefgh", "ab", "abcdef"], max_len=6)
    assert target.truncated == {"train": 2, "val": 0, "test": 1}
    assert target.kind == "topic" and target.n_classes == 2 and target.classes == ("p", "q")
    x, mask = target.train.x, target.train.mask
    assert x.shape == (3, 6) and x.dtype == np.int64
    assert x[0].tolist() == [*b"abcde", 256]  # 5 tokens and the free slot for CLS
    assert x[1].tolist() == [*b"ab", 256, 256, 256, 256]
    assert mask.sum(axis=1).tolist() == [5, 2, 5]
    assert target.train.y.tolist() == [0, 1, 0]
    with_cls = append_cls(target.train, ByteVocab.cls_id)  # there is always room for CLS
    assert with_cls.x[0, 5] == 257 and with_cls.mask.sum(axis=1).tolist() == [6, 3, 6]


def test_left_truncation_keeps_the_end(tmp_path):
    target = encoded(tmp_path, ["abcdefgh", "ab"], max_len=6, truncate="left")
    assert target.train.x[0].tolist() == [*b"defgh", 256]
    assert target.truncated["train"] == 1 and target.truncate == "left"


def test_without_a_cls_slot_rows_may_fill_every_column(tmp_path):
    target = encoded(tmp_path, ["abcdefgh", "abcdef"], max_len=6, cls_slot=False)
    assert target.train.x[1].tolist() == list(b"abcdef") and target.train.mask[1].all()
    assert target.truncated["train"] == 1  # "abcdef" fits exactly; only "abcdefgh" is cut


def test_encoding_checks_its_arguments(tmp_path):
    with pytest.raises(ValueError, match='truncate must be "right" or "left", got \'middle\''):
        encoded(tmp_path, ["a"], max_len=4, truncate="middle")
    with pytest.raises(ValueError, match="max_len must be an integer >= 2, got 1"):
        encoded(tmp_path, ["a"], max_len=1)


def test_the_split_record_travels_with_the_encoded_data(tmp_path):
    target = encoded(tmp_path, ["abc", "de"], max_len=4)
    assert target.split_record["train"] == [1, 2] and target.split_record["test"] == [4]


# ------------------------------------------------------------------------------ source text


def test_read_source_one_file_or_a_sorted_folder(tmp_path):
    (tmp_path / "one.txt").write_bytes("\ufeffline one\r\nline two\n".encode("utf-8"))
    assert read_source(tmp_path / "one.txt") == "line one\nline two\n"
    folder = tmp_path / "corpus"
    (folder / "sub").mkdir(parents=True)
    (folder / "b.txt").write_text("bee", encoding="utf-8")
    (folder / "a.txt").write_text("ay", encoding="utf-8")
    (folder / "sub" / "c.txt").write_text("sea", encoding="utf-8")
    (folder / "empty.txt").write_text("  \n", encoding="utf-8")
    (folder / "notes.md").write_text("not read", encoding="utf-8")
    assert read_source(folder) == SOURCE_SEPARATOR.join(["ay", "bee", "sea"])


def test_read_source_errors_name_the_file(tmp_path):
    with pytest.raises(ValueError) as info:
        read_source(tmp_path / "missing")
    assert str(info.value) == f"{tmp_path / 'missing'}: no such file or folder"
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "x.md").write_text("md", encoding="utf-8")
    with pytest.raises(ValueError) as info:
        read_source(tmp_path / "empty")
    assert str(info.value) == f"{tmp_path / 'empty'}: no .txt files in this folder"
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.txt").write_text("fine", encoding="utf-8")
    (bad / "b.txt").write_bytes(b"ok\nline two \xff\n")
    with pytest.raises(ValueError) as info:
        read_source(bad)
    assert str(info.value) == f"{bad / 'b.txt'}:2: not UTF-8 (byte 0xff)"
    (tmp_path / "blank.txt").write_text("\n\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"blank.txt: no text \(every file is empty\)"):
        read_source(tmp_path / "blank.txt")


def test_source_windows_do_not_overlap_and_some_are_held_out():
    text = "".join(chr(ord("a") + i % 26) for i in range(1003))
    source = source_splits(text, ByteVocab(), seq_len=10, val_fraction=0.2, seed=0)
    assert source.train.shape == (80, 10) and source.val.shape == (20, 10)
    assert source.n_tokens == 1003 and source.dropped_tokens == 3
    assert source.vocab_size == 259 and source.pad_id == 256
    # train and val windows, put back in text order, are the text's first 1000 bytes
    windows = np.empty((100, 10), dtype=np.int64)
    is_val = np.zeros(100, dtype=bool)
    is_val[source.val_windows] = True
    windows[is_val], windows[~is_val] = source.val, source.train
    assert bytes(windows.reshape(-1).tolist()) == text[:1000].encode()
    again = source_splits(text, ByteVocab(), seq_len=10, val_fraction=0.2, seed=0)
    other = source_splits(text, ByteVocab(), seq_len=10, val_fraction=0.2, seed=1)
    assert np.array_equal(again.val_windows, source.val_windows)
    assert not np.array_equal(other.val_windows, source.val_windows)


def test_source_too_short_for_two_windows():
    with pytest.raises(ValueError, match=r"the source text is 15 tokens: 1 window\(s\) of 10; pretraining needs "
                                         r"at least 2 \(one to train on, one held out\)"):
        source_splits("x" * 15, ByteVocab(), seq_len=10)
    assert len(source_splits("x" * 20, ByteVocab(), seq_len=10, val_fraction=0.9).train) == 1


# ------------------------------------------------------------------------------ baselines


def test_ngrams_of_characters_and_of_token_ids():
    assert ngrams("abab", (1, 2)) == {("a",): 2, ("b",): 2, ("a", "b"): 2, ("b", "a"): 1}
    assert ngrams([5, 6], (2, 3)) == {(5, 6): 1}


def test_naive_bayes_against_a_hand_computation():
    """Unigrams, alpha 1: "ab" is class 0, "bb" class 1. Features {a, b}, 2 counts per class:
    p(a|0) = p(b|0) = 2/4, p(a|1) = 1/4, p(b|1) = 3/4, priors 1/2. Then
    p(0 | "a") = (1/2)/(1/2 + 1/4) = 2/3 and p(1 | "bbb") = (3/4)^3 / ((1/2)^3 + (3/4)^3);
    "az" is scored as "a" (z was never seen in training)."""
    logp = ngram_outputs(["ab", "bb"], [0, 1], ["a", "bbb", "az"], n=(1,), alpha=1.0)
    p = np.exp(logp)
    assert p[0, 0] == pytest.approx(2 / 3)
    assert p[1, 1] == pytest.approx(0.75 ** 3 / (0.5 ** 3 + 0.75 ** 3))
    assert np.allclose(p[2], p[0])
    assert ngram_count_baseline(["ab", "bb"], [0, 1], ["a", "bbb"], [0, 1], n=(1,)) == {"accuracy": 1.0}
    assert ngram_count_baseline(["ab", "bb"], [0, 1], ["a", "bbb"], [1, 1], n=(1,)) == {"accuracy": 0.5}


def test_bigrams_tell_apart_what_unigrams_cannot():
    """"ab" (class 0) and "ba" (class 1) share their unigrams. With bigrams the features are
    {a, b, ab, ba}, 3 counts per class: p(ab|0) = 2/7, p(ab|1) = 1/7, so p(0 | "ab") = 2/3."""
    assert np.exp(ngram_outputs(["ab", "ba"], [0, 1], ["ab"], n=(1,)))[0, 0] == pytest.approx(0.5)
    assert np.exp(ngram_outputs(["ab", "ba"], [0, 1], ["ab"], n=(1, 2)))[0, 0] == pytest.approx(2 / 3)


def test_naive_bayes_prior_is_the_training_class_frequency():
    p = np.exp(ngram_outputs(["a", "a", "a"], [0, 0, 1], ["a"], n=(1,)))
    assert p[0].tolist() == pytest.approx([2 / 3, 1 / 3])


def test_naive_bayes_works_on_token_ids():
    p = np.exp(ngram_outputs([[1, 2], [2, 2]], [0, 1], [[1]], n=(1,)))
    assert p[0, 0] == pytest.approx(2 / 3)


def test_majority_and_mean_baselines():
    assert majority_baseline([2, 2, 1, 0], [2, 1, 2, 2]) == {"accuracy": 0.75}
    assert majority_baseline([0, 1], [1, 1]) == {"accuracy": 0.0}  # a tie goes to the lower id
    m = mean_baseline([0.0, 1.0, 0.5], [0.5, 1.0])  # predicts 0.5
    assert m == {"mse": pytest.approx(0.125), "mae": pytest.approx(0.25)}


def test_file_baselines_use_the_tokens_the_model_reads(tmp_path):
    rows = [{"text": ("good " if i % 2 else "bad ") + "x" * (i % 5), "label": "pos" if i % 2 else "neg"}
            for i in range(40)]
    data = read_labelled(write_lines(tmp_path / "d.jsonl", rows))
    target = encode_labelled(data, ByteVocab(), max_len=8)
    assert split_tokens(target.train)[0] == ByteVocab().encode(data.texts[data.indices("train")[0]])[:7]
    refs = file_baselines(target, seed=3)
    assert [r["name"] for r in refs] == ["chance", "count"]
    assert all(r["task"] == "topic" and r["seed"] == 3 for r in refs)
    assert refs[1]["target"] == {"accuracy": 1.0}  # "good" vs "bad" in the first bytes
    assert math.isclose(refs[0]["target"]["accuracy"], 0.5)
    scores = [{"text": f"t{i}", "label": i / 39} for i in range(40)]
    score_target = encode_labelled(read_labelled(write_lines(tmp_path / "s.jsonl", scores)), ByteVocab(), 8)
    (chance,) = file_baselines(score_target)
    assert chance["task"] == "score" and set(chance["target"]) == {"mse", "mae"}


def test_naive_bayes_gives_a_class_absent_from_training_probability_zero():
    p = np.exp(ngram_outputs(["ab", "bb"], [0, 2], ["a", "b"], n=(1,)))  # no example of class 1
    assert p.shape == (2, 3) and p[:, 1].tolist() == [0.0, 0.0]
    assert np.allclose(p.sum(axis=1), 1.0)
