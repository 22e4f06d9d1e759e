"""`python src/main.py --data ... --source ... [--model ...]` on small files a test writes:
the wiring (the JSON records the split, the truncation and the source windows; the
baselines are the file ones; GPT-2's tokenizer and a Hugging Face folder as backbone) and
every bad input (exit 2, one message naming the file or knob, earlier results kept).

Tiny sizes, so each command takes a few seconds; whether transfer *works* on file data is
tests/test_own_data_end_to_end.py's question.
"""
import dataclasses
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from reference import gpt2_vocab_files
from transferlab import checkpoint as C
from transferlab.data import ByteVocab, GPT2Vocab, read_source, source_splits
from transferlab.hf import save_hf_folder
from transferlab.model import GPT
from transferlab.tokenizer import bytes_to_unicode

MAIN = Path(__file__).resolve().parents[1] / "src" / "main.py"
WORDS = {"pos": ["good", "great", "fine", "warm"], "neg": ["bad", "awful", "dull", "cold"]}


def write_files(folder: Path, n=40, seed=0):
    """labelled.jsonl (n examples, no split field: the runner deals one) and corpus/ (two
    .txt files). Example lengths vary from 2 to 7 words, so a small max_len cuts some."""
    rng = np.random.default_rng(seed)
    lines = []
    for i in range(n):
        label = "pos" if i % 2 else "neg"
        words = rng.choice(WORDS[label], rng.integers(2, 8))
        lines.append(json.dumps({"text": " ".join(words), "label": label}))
    (folder / "labelled.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    corpus = folder / "corpus"
    corpus.mkdir()
    for name in ("a.txt", "b.txt"):
        text = ". ".join(" ".join(rng.choice(WORDS[k], 5)) for k in rng.choice(["pos", "neg"], 60))
        (corpus / name).write_text(text, encoding="utf-8")
    return folder / "labelled.jsonl", corpus


def tiny_config(folder: Path) -> Path:
    path = folder / "config.yaml"
    path.write_text(textwrap.dedent("""\
        model: {n_layer: 1, n_head: 2, n_embd: 16, block_size: 24}
        data: {max_len: 12}
        pretrain: {steps: 4, eval_every: 2, batch_size: 8, warmup_steps: 1}
        finetune: {steps: 4, eval_every: 2, batch_size: 8, warmup_steps: 1}
        strategies: {ulmfit: {lm_steps: 2}, sparse_mask: {fisher_batches: 1}}
        runner: {cache_dir: cache, output: results.json, plot: results.png, progress: false}
        logging: {file: logs/transferlab.log}
        """))
    return path


def run_cli(*args, cwd):
    env = {k: v for k, v in os.environ.items() if k not in ("RANDOM_SEED", "LOG_LEVEL")}
    return subprocess.run([sys.executable, str(MAIN), "--config", str(tiny_config(cwd)), *args],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def ok(proc):
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return proc


def refused(proc, *needles):
    """Exit 2, no traceback, and one `error:` line holding every needle."""
    assert proc.returncode == 2, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr
    for needle in needles:
        assert needle in proc.stderr, (needle, proc.stderr)
    return proc.stderr


@pytest.fixture(scope="module")
def byte_run(tmp_path_factory):
    """One run of three strategies on the files, bytes and our pretrained GPT."""
    cwd = tmp_path_factory.mktemp("own")
    data, corpus = write_files(cwd)
    proc = ok(run_cli("--strategy", "scratch", "feature_extractor", "lora", "--seeds", "0", "1",
                      "--data", str(data), "--source", str(corpus), cwd=cwd))
    return cwd, proc, json.loads((cwd / "results.json").read_text())


def test_the_json_records_the_split_truncation_and_source(byte_run):
    cwd, _, out = byte_run
    record = out["data"]
    assert record["vocab"] == "bytes" and record["model"] is None
    split = record["labelled"]
    assert split["from"] == "seeded" and split["seed"] == 0 and split["classes"] == ["neg", "pos"]
    lines = split["train"] + split["val"] + split["test"]
    assert sorted(lines) == list(range(1, 41))  # every line in exactly one split
    assert split["sizes"] == {"train": 28, "val": 4, "test": 8}  # 0.7 / 0.1 / 0.2 of 40
    # truncation: max_len 12 holds 11 bytes (one column stays free for CLS)
    texts = [json.loads(t)["text"] for t in (cwd / "labelled.jsonl").read_text().splitlines()]
    for name in ("train", "val", "test"):
        long = sum(len(texts[n - 1].encode()) > 11 for n in split[name])
        assert split["truncated"][name] == long, name
    assert sum(split["truncated"].values()) > 0
    source = record["source"]
    text = "<|endoftext|>".join((cwd / "corpus" / f).read_text() for f in ("a.txt", "b.txt"))
    n_tokens = len(ByteVocab().encode(text))
    assert source["tokens"] == n_tokens and source["window"] == 12
    assert source["windows"] == n_tokens // 12 and source["dropped_tokens"] == n_tokens % 12
    assert source["held_out"] == round(0.1 * source["windows"])


def test_file_baselines_and_entries(byte_run):
    cwd, proc, out = byte_run
    assert {e["name"] for e in out["baselines"]} == {"chance", "count"}
    assert {(e["strategy"], e["seed"]) for e in out["results"]} == {
        (s, k) for s in ("scratch", "feature_extractor", "lora") for k in (0, 1)}
    for e in out["results"]:
        assert e["task"] == "topic" and e["relatedness"] is None
        assert 0 <= e["target"]["accuracy"] <= 1 and np.isfinite(e["source"]["lm_loss"])
    assert out["pretrained"]["optimal_lm_loss"] is None
    assert "count baseline" in proc.stdout and "chance (majority)" in proc.stdout
    # ByteVocab's own CLS id (257) is used: no new embedding row, only the linear head
    ckpt = cwd / out["pretrained"]["path"]
    backbone = sum(p.size for p in C.load_checkpoint(ckpt).params.values())
    assert {e["total_params"] for e in out["results"] if e["strategy"] != "lora"} == {backbone + 16 * 2 + 2}


def test_the_pretrained_cache_is_keyed_by_the_source_text(byte_run, tmp_path):
    """The same files elsewhere reuse the cached model; an edited source pretrains anew."""
    cwd, _, _ = byte_run
    cached = sorted((cwd / "cache").glob("pretrained-*.npz"))
    assert len(cached) == 1
    with open(cwd / "corpus" / "a.txt", "a", encoding="utf-8") as f:
        f.write(" good good")
    try:
        ok(run_cli("--strategy", "feature_extractor", "--data", "labelled.jsonl", "--source", "corpus",
                   "--output", "edited.json", cwd=cwd))
        assert len(list((cwd / "cache").glob("pretrained-*.npz"))) == 2
    finally:
        text = (cwd / "corpus" / "a.txt").read_text(encoding="utf-8")
        (cwd / "corpus" / "a.txt").write_text(text.removesuffix(" good good"), encoding="utf-8")


def byte_level_gpt2_folder(ckpt_path, folder: Path) -> Path:
    """A Hugging Face GPT-2 folder holding a model pretrained on bytes (our .npz, ByteVocab
    ids) with a byte-level GPT-2 vocabulary: 256 byte tokens, ids = byte values, and
    <|endoftext|> = 256; no merges. GPT2Vocab then tokenizes exactly as ByteVocab does."""
    ours = C.model_from_checkpoint(ckpt_path)
    model = GPT(dataclasses.replace(ours.config, vocab_size=257, pad_id=None), seed=0)
    for name, value in ours.params.items():
        if name != "wte.weight":
            model.params[name][...] = value
    rows = list(range(256)) + [ByteVocab.eot_id]  # the EOT row moves to id 256
    model.params["wte.weight"][...] = ours.params["wte.weight"][rows]
    save_hf_folder(model, folder)
    write_byte_vocabulary(folder)
    return folder


def write_byte_vocabulary(folder: Path) -> None:
    """vocab.json and merges.txt of a byte-level GPT-2 vocabulary: the 256 byte tokens with
    ids = byte values, <|endoftext|> = 256, no merges (257 tokens)."""
    encoder = {char: b for b, char in bytes_to_unicode().items()}
    encoder["<|endoftext|>"] = 256
    (folder / "vocab.json").write_text(json.dumps(encoder), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")


def test_a_hugging_face_folder_is_the_backbone(byte_run):
    """--model: the folder's tokenizer (here byte-level) and weights, no pretraining; its
    pretrained loss on the held-out source equals the byte model's it was made from."""
    cwd, _, out = byte_run
    ckpt = cwd / out["pretrained"]["path"]
    folder = byte_level_gpt2_folder(ckpt, cwd / "hf")
    before = set((cwd / "cache").glob("pretrained-*.npz"))
    ok(run_cli("--strategy", "scratch", "feature_extractor", "--seeds", "0", "--data", "labelled.jsonl",
               "--source", "corpus", "--model", str(folder), "--output", "hf.json", cwd=cwd))
    hf_out = json.loads((cwd / "hf.json").read_text())
    assert set((cwd / "cache").glob("pretrained-*.npz")) == before  # nothing pretrained
    assert hf_out["data"]["vocab"] == "gpt2" and hf_out["data"]["model"] == str(folder)
    assert hf_out["pretrained"]["hugging_face"] is True
    assert hf_out["data"]["labelled"]["train"] == out["data"]["labelled"]["train"]
    # the same held-out byte windows through the same weights; only the softmax differs:
    # the folder has no PAD and CLS rows, so their two logits leave the normalizer
    src = source_splits(read_source(cwd / "corpus"), ByteVocab(), 12, val_fraction=0.1, seed=0, max_val=200)
    logits, _ = C.model_from_checkpoint(ckpt).eval()(src.val[:, :-1])
    keep = [*range(256), ByteVocab.eot_id]
    kept_logits = logits[..., keep].astype(np.float64)  # (N, T-1, 257)
    y = np.where(src.val[:, 1:] == ByteVocab.eot_id, 256, src.val[:, 1:])
    picked = np.take_along_axis(kept_logits, y[..., None], axis=-1)[..., 0]
    expected = np.mean(np.logaddexp.reduce(kept_logits, axis=-1) - picked)
    assert hf_out["pretrained"]["source_lm_loss"] == pytest.approx(expected, abs=1e-5)
    assert hf_out["pretrained"]["source_lm_loss"] < out["pretrained"]["source_lm_loss"]
    # GPT-2 has no CLS token: a new embedding row (257) for CLS pooling
    fe = next(e for e in hf_out["results"] if e["strategy"] == "feature_extractor")
    assert fe["trainable_params"] == 16 * 2 + 2  # the linear head: C x K + K


def test_gpt2s_own_tokenizer_with_a_random_gpt2_folder(tmp_path):
    """GPT-2's real vocabulary (50257 tokens) and a small random GPT-2 saved as a Hugging
    Face folder: the whole comparison runs, with GPT-2's BPE."""
    vocab, merges = gpt2_vocab_files()
    from transferlab.model import GPTConfig
    folder = tmp_path / "gpt2"
    save_hf_folder(GPT(GPTConfig(vocab_size=50257, block_size=32, n_layer=1, n_head=2, n_embd=8), seed=0),
                   folder)
    (folder / "vocab.json").write_bytes(vocab.read_bytes())
    (folder / "merges.txt").write_bytes(merges.read_bytes())
    data, corpus = write_files(tmp_path)
    ok(run_cli("--strategy", "feature_extractor", "full_finetune", "--seeds", "0", "--data", str(data),
               "--source", str(corpus), "--model", str(folder), cwd=tmp_path))
    out = json.loads((tmp_path / "results.json").read_text())
    tok = GPT2Vocab.from_dir(folder)
    text = "<|endoftext|>".join((corpus / f).read_text() for f in ("a.txt", "b.txt"))
    assert out["data"]["source"]["tokens"] == len(tok.encode(text)) < len(text)  # BPE, not bytes
    assert {e["strategy"] for e in out["results"]} == {"feature_extractor", "full_finetune"}


# ---------------------------------------------------------------------- bad input


@pytest.fixture
def files(tmp_path):
    write_files(tmp_path)
    (tmp_path / "results.json").write_text('{"kept": true}')  # an earlier result
    return tmp_path


def kept(cwd):
    assert json.loads((cwd / "results.json").read_text()) == {"kept": True}


@pytest.mark.parametrize("line, problem", [
    ("not json", "not JSON"),
    ('{"label": "pos"}', 'missing field "text"'),
    ('{"text": "  ", "label": "pos"}', '"text" is empty'),
    ('{"text": "x", "label": "pos", "split": "dev"}', 'unknown split "dev"'),
    ('{"text": "x", "label": 0.5}', "labels of mixed kinds"),
])
def test_a_bad_line_is_named_with_its_file_and_line(files, line, problem):
    with open(files / "labelled.jsonl", "a", encoding="utf-8") as f:
        f.write(line + "\n")
    err = refused(run_cli("--data", "labelled.jsonl", "--source", "corpus", cwd=files),
                  "labelled.jsonl:41:", problem)
    assert "nothing was read" in err
    kept(files)
    assert not (files / "cache").exists() or not list((files / "cache").glob("pretrained-*"))


@pytest.mark.parametrize("args, needles", [
    (("--data", "labelled.jsonl"), ("data.source", "--source")),
    (("--source", "corpus"), ("data.labelled", "--data")),
    (("--data", "missing.jsonl", "--source", "corpus"), ("missing.jsonl: no such file",)),
    (("--data", "labelled.jsonl", "--source", "nowhere"), ("nowhere: no such file or folder",)),
    (("--data", "labelled.jsonl", "--source", "corpus", "--sweep", "relatedness"), ("--sweep relatedness",)),
    (("--data", "labelled.jsonl", "--source", "corpus", "--set", "data.max_len=64"),
     ("data.max_len must be <= model.block_size (24)",)),
    (("--data", "labelled.jsonl", "--source", "corpus", "--set", "data.fractions=[0.5,0.5,0.5]"),
     ("data.fractions must be three numbers",)),
    (("--data", "labelled.jsonl", "--source", "corpus", "--model", "no_folder"), ("no_folder",)),
])
def test_bad_data_flags_exit_2(files, args, needles):
    refused(run_cli(*args, cwd=files), *needles)
    kept(files)


def test_a_model_folder_whose_vocabulary_is_not_its_weights_is_refused(files):
    folder = files / "hf"
    from transferlab.model import GPTConfig
    save_hf_folder(GPT(GPTConfig(vocab_size=300, block_size=32, n_layer=1, n_head=2, n_embd=8)), folder)
    write_byte_vocabulary(folder)
    refused(run_cli("--data", "labelled.jsonl", "--source", "corpus", "--model", str(folder), cwd=files),
            "300 token embeddings", "257 tokens")
    kept(files)
