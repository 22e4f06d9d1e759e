"""`python src/main.py generate`: a Hugging Face GPT-2 folder (real tokenizer files, random
weights) gives Hugging Face's greedy continuation; a checkpoint takes token ids; every bad
input is one line and exit status 2."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import main as cli
from transferlab import GPT, GPTConfig
from transferlab.checkpoint import save_checkpoint
from reference import gpt2_vocab_files

SRC = Path(__file__).resolve().parents[1] / "src"


def run(argv, capsys):
    status = cli.main(["generate", *argv])
    out, err = capsys.readouterr()
    return status, out, err


@pytest.fixture(scope="module")
def gpt2_folder(tmp_path_factory):
    """A Hugging Face GPT-2 folder: random weights (a small model over GPT-2's real
    50257-token vocabulary), saved by transformers, with GPT-2's vocab.json and merges.txt."""
    files = gpt2_vocab_files()
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    # a wide init spreads the logits, so a wrong token cannot win greedy decoding by accident
    config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=64, vocab_size=50257,
                                     initializer_range=0.3)
    hf = transformers.GPT2LMHeadModel(config).eval()
    folder = tmp_path_factory.mktemp("gpt2")
    hf.save_pretrained(folder)
    shutil.copy(files[0], folder / "vocab.json")
    shutil.copy(files[1], folder / "merges.txt")
    return folder, hf, torch


def test_greedy_generation_from_a_folder_equals_hugging_face(gpt2_folder, capsys):
    folder, hf, torch = gpt2_folder
    from transferlab.tokenizer import GPT2Tokenizer

    tok = GPT2Tokenizer.from_dir(folder)
    prompt = "Transfer learning, in one sentence:"
    ids = tok.encode(prompt)
    with torch.no_grad():
        want = hf.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=12,
                           pad_token_id=50256, attention_mask=torch.ones(1, len(ids), dtype=torch.long))
    status, out, err = run(["--model", str(folder), "--prompt", prompt, "--temperature", "0",
                            "--max-new-tokens", "12"], capsys)
    assert status == 0, err
    assert out == tok.decode(want[0].tolist()) + "\n"
    assert out.startswith(prompt)


def test_sampling_is_reproducible_by_seed(gpt2_folder, capsys):
    folder, _, _ = gpt2_folder
    args = ["--model", str(folder), "--prompt", "Hello", "--top-k", "50", "--max-new-tokens", "8"]
    first, again, other = (run(args + ["--seed", s], capsys)[1] for s in ("3", "3", "4"))
    assert first == again and first != other


@pytest.fixture(scope="module")
def lm_checkpoint(tmp_path_factory):
    cfg = GPTConfig(vocab_size=9, block_size=12, n_layer=1, n_head=2, n_embd=8, init_std=0.5)
    model = GPT(cfg, seed=0)
    path = tmp_path_factory.mktemp("ckpt") / "lm.npz"
    save_checkpoint(path, model)
    return path, model


def test_a_checkpoint_takes_token_ids(lm_checkpoint, capsys):
    path, model = lm_checkpoint
    status, out, err = run(["--model", str(path), "--prompt", "3 1 4", "--temperature", "0",
                            "--max-new-tokens", "5"], capsys)
    assert status == 0, err
    want = model.eval().generate(np.array([[3, 1, 4]]), 5, temperature=0.0)
    assert out.split() == [str(i) for i in want[0]]


@pytest.mark.parametrize("argv, message", [
    (["--model", "{missing}", "--prompt", "hi"], "--model {missing}: no such folder or file"),
    (["--model", "{ckpt}", "--prompt", "three one"], "a checkpoint has no tokenizer, give token ids"),
    (["--model", "{ckpt}", "--prompt", "3 99"], "token id 99 is outside the model's vocabulary [0, 9)"),
    (["--model", "{ckpt}", "--prompt", "1 2 3", "--max-new-tokens", "10"],
     "--prompt has 3 tokens and --max-new-tokens is 10: together more than the model's context of 12"),
    (["--model", "{ckpt}", "--prompt", "   "], "--prompt: empty"),
    (["--model", "{empty}", "--prompt", "hi"], "config.json"),
    (["--model", "{cls}", "--prompt", "1 2"], "a checkpoint with a sequence head"),
])
def test_bad_input_is_one_line_and_exit_2(argv, message, lm_checkpoint, tmp_path, capsys):
    cls = GPT(GPTConfig(vocab_size=9, block_size=12, n_layer=1, n_head=2, n_embd=8, head="sequence"))
    save_checkpoint(tmp_path / "cls.npz", cls)
    (tmp_path / "empty").mkdir()
    names = {"missing": tmp_path / "nope", "ckpt": lm_checkpoint[0], "empty": tmp_path / "empty",
             "cls": tmp_path / "cls.npz"}
    argv = [a.format(**names) for a in argv]
    status, out, err = run(argv, capsys)
    assert status == 2 and out == ""
    assert err.startswith("error: ") and err.count("\n") == 1
    assert message.format(**names) in err


@pytest.mark.parametrize("flag, value", [("--top-p", "1.5"), ("--temperature", "-1"), ("--top-k", "0")])
def test_bad_sampling_flags_exit_2(flag, value, lm_checkpoint, capsys):
    status, _, err = run(["--model", str(lm_checkpoint[0]), "--prompt", "1", flag, value], capsys)
    assert status == 2 and flag in err


def test_the_command_runs_as_a_user_types_it(lm_checkpoint):
    done = subprocess.run([sys.executable, str(SRC / "main.py"), "generate", "--model", str(lm_checkpoint[0]),
                           "--prompt", "1 2", "--max-new-tokens", "3", "--seed", "1"],
                          capture_output=True, text=True, cwd="/")
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[:2] == ["1", "2"] and len(done.stdout.split()) == 5
