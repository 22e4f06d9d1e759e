"""Transfer on your own files works, end to end: `python src/main.py --strategy all --data
labelled.jsonl --source source.txt`, then the same with `--model DIR` on a Hugging Face
GPT-2 folder, on files this test writes (no network).

The files hold a task whose answer we know: the synthetic topic task (tasks.py) written
as text, one letter per chain token. source.txt is unlabelled sequences from the source
chains, one per line; labelled.jsonl has 48 training examples, each labelled with the
chain that wrote it. A byte-level model pretrained on source.txt has learnt to tell the
chains apart; scratch has 48 examples to learn it from, and the bag-of-n-grams counter
sees only letter pairs. So the pretrained strategies must beat both by more than the seed
spread (docs/own_data.md#what-it-gives-on-a-known-task).
"""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from transferlab.tasks import TaskSpec, make_source, make_target

pytestmark = pytest.mark.slow

MAIN = Path(__file__).resolve().parents[1] / "src" / "main.py"
LETTERS = "abcdefghijklmnopqrstuvwx"  # chain token k is the letter LETTERS[k]
SEEDS = ("0", "1", "2")


def write_task_as_text(folder: Path, n_source: int) -> None:
    spec = TaskSpec(n_tokens=24, n_topics=4, seq_len=16, min_len=6, concentration=0.3,
                    n_source_train=n_source, n_target_train=48, n_target_val=128, n_target_test=512)

    def text(row, mask):
        return "".join(LETTERS[t] for t, m in zip(row, mask) if m)

    source = make_source(spec)
    full = np.ones(source.train.shape[1], dtype=bool)
    (folder / "source.txt").write_text("\n".join(text(r, full) for r in source.train), encoding="utf-8")
    target = make_target("topic", spec, seed=0)
    with open(folder / "labelled.jsonl", "w", encoding="utf-8") as f:
        for name in ("train", "val", "test"):
            split = getattr(target, name)
            for x, m, y in zip(split.x, split.mask, split.y):
                f.write(json.dumps({"text": text(x, m), "label": f"topic{int(y)}", "split": name}) + "\n")


# the shipped model and pretraining knobs; windows of 17 bytes are one source line each
# (16 letters and its newline), as the synthetic source task's sequences are
CONFIG = """\
    data: {max_len: 17}
    runner: {cache_dir: cache, output: results.json, plot: results.png, progress: false, jobs: 2}
    logging: {file: logs/transferlab.log}
    """


def run_cli(*args, cwd):
    (cwd / "config.yaml").write_text(textwrap.dedent(CONFIG))
    env = {k: v for k, v in os.environ.items() if k not in ("RANDOM_SEED", "LOG_LEVEL")}
    proc = subprocess.run([sys.executable, str(MAIN), "--config", "config.yaml", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return json.loads((cwd / "results.json").read_text()), proc.stdout


@pytest.fixture(scope="module")
def byte_run(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("own_e2e")
    write_task_as_text(cwd, n_source=50000)
    return cwd, *run_cli("--strategy", "all", "--seeds", *SEEDS, "--data", "labelled.jsonl",
                         "--source", "source.txt", cwd=cwd)


def check_transfer(out):
    """Every pretrained strategy's mean beats scratch's and the count baseline's by more
    than the larger seed spread of the two it is compared with."""
    rows = {r["strategy"]: r for r in out["summary"]}
    (count,) = [r["target"]["accuracy"] for r in out["baselines"] if r["name"] == "count"]
    scratch = rows.pop("scratch")
    assert scratch["mean"] < count  # 48 examples are too few to learn the chains from
    for name, r in rows.items():
        spread = max(r["std"], scratch["std"])
        assert r["mean"] - count > r["std"], (name, r["mean"], r["std"], count)
        assert r["mean"] - scratch["mean"] > spread, (name, r["mean"], scratch["mean"], spread)
    return rows, scratch, count


def test_pretrained_strategies_beat_scratch_and_the_count_baseline(byte_run):
    _, out, stdout = byte_run
    check_transfer(out)
    assert len(out["results"]) == len(out["summary"]) * len(SEEDS)
    assert out["data"]["labelled"]["from"] == "file"
    assert out["data"]["labelled"]["sizes"] == {"train": 48, "val": 128, "test": 512}
    assert sum(out["data"]["labelled"]["truncated"].values()) == 0  # at most 15 letters + CLS
    # 50,000 lines of 17 bytes, the last without its newline: one window short
    assert out["data"]["source"]["windows"] == 49999 and out["data"]["source"]["dropped_tokens"] == 16
    assert "count baseline" in stdout


def test_the_same_with_a_hugging_face_folder(byte_run, tmp_path):
    """The byte model saved as a Hugging Face GPT-2 folder with a byte-level vocabulary
    (test_own_data_cli.byte_level_gpt2_folder): --model loads it and pretrains nothing."""
    from test_own_data_cli import byte_level_gpt2_folder

    cwd, out, _ = byte_run
    folder = byte_level_gpt2_folder(cwd / out["pretrained"]["path"], tmp_path / "hf")
    for name in ("labelled.jsonl", "source.txt"):
        (tmp_path / name).write_bytes((cwd / name).read_bytes())
    hf_out, _ = run_cli("--strategy", "all", "--seeds", *SEEDS, "--data", "labelled.jsonl",
                        "--source", "source.txt", "--model", str(folder), cwd=tmp_path)
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").glob("pretrained-*"))
    assert hf_out["data"]["vocab"] == "gpt2"
    check_transfer(hf_out)
