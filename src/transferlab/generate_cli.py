"""`python src/main.py generate ...`: text from a Hugging Face GPT-2 folder or a checkpoint.

    python src/main.py generate --model gpt2/ --prompt "The meaning of life is" --temperature 0
    python src/main.py generate --model cache/pretrained-....npz --prompt "3 7 7 1" --seed 0

A folder is read as Hugging Face writes GPT-2 (hf.load_hf_folder: config.json and
model.safetensors; tokenizer.GPT2Tokenizer: vocab.json and merges.txt) and the prompt is
text. A transferlab checkpoint (.npz) has no tokenizer, so its prompt is token ids
separated by spaces. Prints the prompt and its continuation (generate.generate, with a KV
cache). Bad input exits with status 2 and one line naming the file or flag at fault.
See docs/sampling.md and docs/gpt2.md.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

EXAMPLES = """\
examples:
  python src/main.py generate --model gpt2/ --prompt "Transfer learning is" --temperature 0
  python src/main.py generate --model gpt2/ --prompt "Once upon a time" --top-p 0.9 --seed 1
  python src/main.py generate --model cache/pretrained-<key>.npz --prompt "3 7 7 1" --max-new-tokens 20

--model is a Hugging Face GPT-2 folder (config.json, model.safetensors, vocab.json,
merges.txt; you download it yourself, see docs/gpt2.md) or a transferlab checkpoint.
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python src/main.py generate", epilog=EXAMPLES,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                description="Continue a prompt with a GPT-2 (KV-cached sampling).")
    p.add_argument("--model", required=True, metavar="DIR|CKPT",
                   help="a Hugging Face GPT-2 folder, or a transferlab checkpoint (.npz)")
    p.add_argument("--prompt", required=True, metavar="TEXT",
                   help="text (a folder), or token ids separated by spaces (a checkpoint)")
    p.add_argument("--max-new-tokens", type=_at_least(1), default=50, metavar="N",
                   help="tokens to add (default 50)")
    p.add_argument("--temperature", type=_at_least(0.0, float), default=1.0, metavar="T",
                   help="0 = greedy; 1 = the model's own distribution (default 1)")
    p.add_argument("--top-k", type=_at_least(1), default=None, metavar="K",
                   help="sample only from the K most likely tokens")
    p.add_argument("--top-p", type=_top_p, default=None, metavar="P",
                   help="sample only from the smallest set of tokens whose probability reaches P")
    p.add_argument("--seed", type=_at_least(0), default=0, metavar="S", help="sampling seed (default 0)")
    return p


def _at_least(low, kind=int):
    def check(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, "
                                             f"got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {text!r}")
        return value
    return check


def _top_p(text):
    value = _at_least(0.0, float)(text)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text!r}")
    return value


def load(path: str):
    """(model, encode, decode) for a GPT-2 folder or a transferlab LM checkpoint."""
    from .checkpoint import model_from_checkpoint

    where = Path(path)
    if where.is_dir():
        from .hf import load_hf_folder
        from .tokenizer import GPT2Tokenizer

        model = load_hf_folder(where)
        tokenizer = GPT2Tokenizer.from_dir(where)
        return model, tokenizer.encode, tokenizer.decode
    if not where.exists():
        raise ValueError(f"--model {path}: no such folder or file")
    model = model_from_checkpoint(where)
    if model.config.head != "lm":
        raise ValueError(f"--model {path}: a checkpoint with a {model.config.head} head; "
                         f"generation needs a language-model (lm) head")

    def encode(text):
        try:
            return [int(t) for t in text.split()]
        except ValueError:
            raise ValueError(f"--prompt {text!r}: a checkpoint has no tokenizer, give token ids "
                             f"separated by spaces, e.g. '3 7 7 1'") from None

    return model, encode, lambda ids: " ".join(str(int(i)) for i in ids)


def main(argv) -> int:
    """Run `generate`; return the exit status (0 done, 2 bad input)."""
    import numpy as np

    from .generate import generate

    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as stop:  # --help (0) or a bad flag (2, usage already printed)
        return stop.code
    try:
        model, encode, decode = load(args.model)
        ids = encode(args.prompt)
        if not ids:
            raise ValueError("--prompt: empty (it must hold at least one token)")
        V, block = model.config.vocab_size, model.config.block_size
        bad = [i for i in ids if not 0 <= i < V]
        if bad:
            raise ValueError(f"--prompt: token id {bad[0]} is outside the model's vocabulary [0, {V})")
        if len(ids) + args.max_new_tokens > block:
            raise ValueError(f"--prompt has {len(ids)} tokens and --max-new-tokens is {args.max_new_tokens}: "
                             f"together more than the model's context of {block} positions")
        out = generate(model.eval(), np.array([ids]), args.max_new_tokens, temperature=args.temperature,
                       top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    except (ValueError, OSError) as err:  # HFFolderError, CheckpointError and tokenizer errors are ValueErrors
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    print(decode(out[0].tolist()))
    return 0
