"""transferlab command line: parse the flags, load the config, hand both to the runner.

    python src/main.py --strategy full_finetune bitfit --seeds 0 1 2
    python src/main.py --strategy full_finetune bitfit --seeds 0 1 2 --resume   # after Ctrl-C
    python src/main.py --strategy all --data reviews.jsonl --source corpus/      # your own text
    python src/main.py generate --model gpt2/ --prompt "Hello" --temperature 0
    python src/main.py --help

Exit status: 0 done; 2 a bad flag, a bad config value or a path that cannot be written
(one line says which); 1 the run itself failed (one line here, the traceback in the log
file); 130 interrupted by Ctrl-C, 143 by SIGTERM (the message says how to continue).
"""
import argparse
import difflib
import json
import logging
import shlex
import signal
import sys
import traceback
from pathlib import Path

# `python src/main.py` puts the script's own folder, src/, first on sys.path, so the
# package imports from any working directory without patching the path.
from transferlab.config import (
    STRATEGY_NAMES, TASK_TARGETS, ConfigError, load_config, parse_override)
from transferlab.logs import setup_logging

SRC = Path(__file__).resolve().parent
DEFAULT_CONFIG = SRC.parent / "config.yaml"
SWEEPS = ("relatedness", "lr")

log = logging.getLogger("transferlab.main")

EXAMPLES = """\
examples:
  python src/main.py --strategy full_finetune
  python src/main.py --strategy all --seeds 0 1 2 --output results.json
  python src/main.py --strategy head_finetune bitfit --task tagging
  python src/main.py --strategy full_finetune --set strategies.lr.full_finetune=3e-4 --set runner.seeds=[0,1]
  python src/main.py --strategy scratch full_finetune --sweep relatedness
  python src/main.py --strategy all --seeds 0 1 2 --jobs 2
  python src/main.py --strategy all --seeds 0 1 2 --resume
      (after Ctrl-C or a kill: the same command plus --resume; finished runs are not redone)
  python src/main.py --strategy all --seeds 0 1 2 --data reviews.jsonl --source corpus/
      (your own text: a labelled JSONL and raw text to pretrain on, docs/own_data.md)
  python src/main.py --strategy all --data reviews.jsonl --source corpus/ --model gpt2/
      (GPT-2's tokenizer and weights as the backbone; nothing is pretrained)
  python src/main.py --strategy full_finetune --pretrained cache/pretrained-*.npz
      (the model a default run pretrained and cached; the shell fills in its key)
  python src/main.py generate --model gpt2/ --prompt "Hello" --temperature 0
      (text from a GPT-2 folder you downloaded, docs/gpt2.md; generate --help lists its flags)

Flags override config.yaml, which overrides the defaults; RANDOM_SEED and LOG_LEVEL
(environment or .env) sit between the file and the flags. See docs/configuration.md.
"""


def _one_of(kind, options):
    """An argparse `type` that accepts one of `options` and suggests the nearest one."""
    def check(text):
        if text in options:
            return text
        close = difflib.get_close_matches(text, options, n=1)
        hint = f"did you mean {close[0]!r}?" if close else f"choose from {', '.join(options)}"
        raise argparse.ArgumentTypeError(f"unknown {kind} {text!r} ({hint})")
    return check


def _seed(text):
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"seed must be an integer >= 0, got {text!r}")
    return value


def _existing_file(text):
    if not Path(text).is_file():
        raise argparse.ArgumentTypeError(f"no such file: {text!r}")
    return text


def _output_file(text):
    if text.strip() == "":
        raise argparse.ArgumentTypeError("must name a file (runner.output), got ''")
    if Path(text).is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is a directory, not a file (runner.output)")
    return text


def _jobs(text):
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return value


def _override(text):
    """Refuse a malformed --set now (usage + reason); load_config parses it again later."""
    try:
        parse_override(text)
    except ConfigError as err:
        # argparse already says "argument --set:", so drop our own "--set " prefix
        raise argparse.ArgumentTypeError(str(err).removeprefix("--set ")) from None
    return text


def build_parser():
    parser = argparse.ArgumentParser(
        prog="main.py",
        description="Pretrain a small GPT-2 on a synthetic source task (or your own text, "
                    "--data/--source; or take GPT-2 from --model) once, then compare "
                    "transfer strategies on a small target task and write the results as "
                    "JSON.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--strategy", nargs="+", metavar="S", type=_one_of("strategy", STRATEGY_NAMES + ("all",)),
        help="transfer strategies to compare, or 'all'; one of: " + ", ".join(STRATEGY_NAMES)
             + " (default: runner.strategies in the config). "
               "Example: --strategy head_finetune full_finetune")
    parser.add_argument(
        "--task", metavar="T", type=_one_of("task", TASK_TARGETS),
        help="target task: " + ", ".join(TASK_TARGETS) + " (default: task.target). "
             "Example: --task tagging")
    parser.add_argument(
        "--config", metavar="PATH", default=str(DEFAULT_CONFIG),
        help="YAML config file (default: config.yaml at the repository root). "
             "Example: --config my_config.yaml")
    parser.add_argument(
        "--output", metavar="PATH", type=_output_file,
        help="results JSON file (default: runner.output). Example: --output runs/results.json")
    parser.add_argument(
        "--seeds", nargs="+", metavar="N", type=_seed,
        help="one fine-tuning run per seed (default: runner.seeds). Example: --seeds 0 1 2")
    parser.add_argument(
        "--data", metavar="PATH",
        help="your labelled examples instead of the synthetic tasks: a JSONL file, one "
             '{"text": ..., "label": ...} per line, optional "split" (sets data.labelled; '
             "docs/own_data.md). Example: --data reviews.jsonl")
    parser.add_argument(
        "--source", metavar="PATH",
        help="raw text for --data: a .txt file or a folder of them, to pretrain on and to "
             "measure forgetting on (sets data.source). Example: --source corpus/")
    parser.add_argument(
        "--model", metavar="DIR",
        help="a Hugging Face GPT-2 folder for --data: its tokenizer and weights are the "
             "backbone and nothing is pretrained (sets data.model; docs/gpt2.md). "
             "Example: --model gpt2/")
    parser.add_argument(
        "--pretrained", metavar="PATH", type=_existing_file,
        help="use this pretrained checkpoint instead of pretraining (or the cache). "
             "Example: --pretrained cache/pretrained.npz")
    parser.add_argument(
        "--resume", metavar="PATH", nargs="?", const=True, type=_existing_file,
        help="without PATH: continue the experiment this same command started (after Ctrl-C, "
             "SIGTERM or a kill): finished runs are read from its journal, the interrupted one "
             "continues from its checkpoint. With PATH: continue that one run's checkpoint "
             "(cache/runs/<strategy>-<task>-seed<k>.npz, kept while it is interrupted). "
             "Example: python src/main.py --strategy all --resume")
    parser.add_argument(
        "--jobs", metavar="N", type=_jobs,
        help="run the independent runs in N worker processes, one BLAS thread each; the "
             "results equal --jobs 1 (default: runner.jobs). Example: --jobs 2")
    parser.add_argument(
        "--set", dest="overrides", metavar="KEY=VALUE", action="append", default=[],
        type=_override,
        help="override any config key; the value is read as YAML; repeatable. "
             "Example: --set strategies.lr.full_finetune=3e-4 --set runner.seeds=[0,1,2]")
    parser.add_argument(
        "--sweep", metavar="KNOB", type=_one_of("sweep", SWEEPS),
        help="repeat the comparison for each value of a knob: relatedness (runner.sweep_values) "
             "or lr (runner.lr_values; prints each strategy's rate chosen on the validation "
             "split). Example: --sweep lr")
    parser.add_argument(
        "--no-progress", action="store_true",
        help="no progress display while training (sets runner.progress=false)")
    return parser


def config_from_args(args):
    """The Config the flags describe: the file, then --set, then the dedicated flags."""
    overrides = list(args.overrides)  # "key=value" strings, reported as "--set" in errors
    if args.strategy:
        overrides.append(("runner.strategies", args.strategy))
    if args.task:
        overrides.append(("task.target", args.task))
    if args.seeds:
        overrides.append(("runner.seeds", args.seeds))
    if args.output is not None:
        overrides.append(("runner.output", args.output))
    if args.jobs is not None:
        overrides.append(("runner.jobs", args.jobs))
    if args.no_progress:
        overrides.append(("runner.progress", False))
    for flag, key in (("data", "data.labelled"), ("source", "data.source"), ("model", "data.model")):
        if getattr(args, flag) is not None:
            overrides.append((key, getattr(args, flag)))
    return load_config(args.config, overrides=overrides)


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the program is, so it stops exactly as Ctrl-C does."""


def _on_sigterm(signum, frame):
    raise _Terminated


def resume_command(argv) -> str:
    """The command that continues this one: the same flags plus --resume (once)."""
    script = sys.argv[0] if sys.argv and sys.argv[0].endswith("main.py") else "src/main.py"
    args = list(argv)
    if "--resume" not in args and not any(a.startswith("--resume=") for a in args):
        args.append("--resume")
    return shlex.join(["python", script, *args])


def main(argv=None):
    """Run the command line on `argv` (default sys.argv[1:]); return the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    previous = signal.getsignal(signal.SIGTERM)
    try:
        signal.signal(signal.SIGTERM, _on_sigterm)
    except ValueError:  # not the main thread (a notebook's worker): no handler, no harm
        previous = None
    try:
        if argv[:1] == ["generate"]:  # the one subcommand: text from a model (generate_cli.py)
            from transferlab.generate_cli import main as generate_main
            return generate_main(argv[1:])
        return _main(argv)
    except KeyboardInterrupt as stop:
        # Ctrl-C and SIGTERM alike: each finished run is in the journal, the one that was
        # training has its last checkpoint; the same command with --resume goes on
        print(f"interrupted: finished runs are saved; continue with: {resume_command(argv)}",
              file=sys.stderr)
        return 143 if isinstance(stop, _Terminated) else 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _main(argv):
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as stop:  # --help (0) or a bad flag (2, usage already printed)
        return stop.code

    try:
        config = config_from_args(args)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    settings = config.logging
    try:
        setup_logging(settings.level, settings.file, settings.max_bytes, settings.backup_count)
    except OSError as err:
        print(f"error: logging.file: cannot open {settings.file!r}: {err.strerror or err}",
              file=sys.stderr)
        return 2
    log.debug("config: %s", json.dumps(config.to_dict(), sort_keys=True))

    from transferlab.checkpoint import CheckpointError
    from transferlab.train import TrainingError
    try:
        from transferlab.runner import run
        status = run(config, pretrained=args.pretrained, resume=args.resume, sweep=args.sweep,
                     progress=config.runner.progress, argv=argv)
    except (ConfigError, CheckpointError, TrainingError) as err:
        # a bad combination of knobs, a --pretrained or --resume file that is not a sound
        # checkpoint of ours, or a loss that became NaN (the message names the rate's knob):
        # the user's to fix, so exit status 2
        log.error("run stopped: %s", err, exc_info=True, extra={"console": False})
        print(f"error: {err}", file=sys.stderr)
        return 2
    except Exception as err:  # noqa: BLE001 - one line here, the traceback in the log file
        log.error("run failed", exc_info=True, extra={"console": False})
        if settings.level == "DEBUG":
            traceback.print_exc()
        message = " ".join(str(err).split())
        print(f"error: {type(err).__name__}{': ' + message if message else ''} "
              f"(traceback in {settings.file})", file=sys.stderr)
        return 1
    return 0 if status is None else int(status)


if __name__ == "__main__":
    sys.exit(main())
