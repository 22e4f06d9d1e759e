"""src/main.py and logs.py: flags -> config -> runner, exit codes, one-line errors, logging.

The runner is replaced by a fake module, so these tests check the command line alone;
the end-to-end run is tested with the runner.
"""
import importlib.util
import logging
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

from transferlab.config import STRATEGY_NAMES, Config
from transferlab.logs import setup_logging

ROOT = Path(__file__).resolve().parents[1]
MAIN = ROOT / "src" / "main.py"
FLAGS = ("--strategy", "--task", "--config", "--output", "--seeds", "--pretrained",
         "--resume", "--jobs", "--set", "--sweep", "--no-progress", "--help")


def _load_main():
    spec = importlib.util.spec_from_file_location("transferlab_main", MAIN)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


cli = _load_main()


def run_main_script(*args, cwd):
    """`python src/main.py ...` in a fresh process, without RANDOM_SEED / LOG_LEVEL."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANDOM_SEED", "LOG_LEVEL")}
    return subprocess.run([sys.executable, str(MAIN), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """Empty cwd (no .env), no env variables, and our log handlers removed afterwards."""
    monkeypatch.chdir(tmp_path)
    for name in ("RANDOM_SEED", "LOG_LEVEL"):
        monkeypatch.delenv(name, raising=False)
    yield
    logger = logging.getLogger("transferlab")
    for handler in list(logger.handlers):
        if handler.name in ("transferlab.console", "transferlab.file"):
            logger.removeHandler(handler)
            handler.close()


@pytest.fixture
def config_file(tmp_path):
    """A small config whose log file lives in tmp_path."""
    path = tmp_path / "config.yaml"
    path.write_text(f"seed: 4\nfinetune:\n  lr: 0.002\nlogging:\n"
                    f"  file: {tmp_path / 'logs' / 'run.log'}\n", encoding="utf-8")
    return path


@pytest.fixture
def runner(monkeypatch):
    """A fake transferlab.runner: records each call; `behaviour` decides what run does."""
    fake = types.ModuleType("transferlab.runner")
    fake.calls = []
    fake.behaviour = lambda: 0

    def run(config, pretrained=None, resume=None, sweep=None, progress=True, argv=None):
        fake.calls.append(dict(config=config, pretrained=pretrained, resume=resume,
                               sweep=sweep, progress=progress, argv=argv))
        return fake.behaviour()

    fake.run = run
    monkeypatch.setitem(sys.modules, "transferlab.runner", fake)
    return fake


# ------------------------------------------------------------ as a real process (stderr)


def test_help_exits_0_and_explains_every_flag(tmp_path):
    done = run_main_script("--help", cwd=tmp_path)
    assert done.returncode == 0
    assert done.stderr == ""
    for flag in FLAGS:
        assert flag in done.stdout, flag
    assert "Example" in done.stdout and "python src/main.py --strategy" in done.stdout


def test_unknown_strategy_exits_2_with_usage_and_one_reason(tmp_path):
    done = run_main_script("--strategy", "full_finetun", cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.startswith("usage: main.py")
    assert "Traceback" not in done.stderr
    assert done.stderr.splitlines()[-1] == (
        "main.py: error: argument --strategy: unknown strategy 'full_finetun' "
        "(did you mean 'full_finetune'?)")


def test_unknown_flag_exits_2(tmp_path):
    done = run_main_script("--strategy", "bitfit", "--epochs", "3", cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.splitlines()[-1] == "main.py: error: unrecognized arguments: --epochs 3"
    assert "Traceback" not in done.stderr


def test_config_error_is_one_line_exit_2(tmp_path):
    done = run_main_script("--config", str(tmp_path / "missing.yaml"), cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr == f"error: {tmp_path / 'missing.yaml'}: config file not found\n"
    done = run_main_script("--set", "finetune.lr=-1", cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr == "error: --set: finetune.lr must be > 0, got -1.0\n"


# --------------------------------------------------------------------- bad flag values


@pytest.mark.parametrize("args, reason", [
    (["--task", "regression"], "argument --task: unknown task 'regression' "
                               "(choose from topic, binary, tagging, score)"),
    (["--strategy", "bitfit", "adapters"], "argument --strategy: unknown strategy 'adapters' "
                                       "(choose from " + ", ".join(STRATEGY_NAMES) + ", all)"),
    (["--set", "finetune.lr"], "argument --set: 'finetune.lr': expected section.key=value, "
                               "e.g. finetune.lr=3e-4"),
    (["--seeds", "0", "-1"], "argument --seeds: seed must be an integer >= 0, got '-1'"),
    (["--seeds", "x"], "argument --seeds: seed must be an integer >= 0, got 'x'"),
    (["--pretrained", "nope.npz"], "argument --pretrained: no such file: 'nope.npz'"),
    (["--sweep", "seed"], "argument --sweep: unknown sweep 'seed' (choose from relatedness, lr)"),
])
def test_bad_flag_value_exits_2(capsys, runner, config_file, args, reason):
    assert cli.main(["--config", str(config_file), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: main.py")
    assert err.splitlines()[-1] == f"main.py: error: {reason}"
    assert runner.calls == []


def test_unknown_key_in_set_exits_2_naming_it(capsys, runner, config_file):
    assert cli.main(["--config", str(config_file), "--set", "finetune.lrr=1"]) == 2
    assert capsys.readouterr().err == (
        "error: --set: unknown key 'finetune.lrr' (did you mean 'lr'?)\n")
    assert runner.calls == []


# ----------------------------------------------------------- flags -> config -> runner


def test_flags_map_onto_the_config(tmp_path, runner, config_file):
    (tmp_path / "pre.npz").write_bytes(b"")
    (tmp_path / "resume.npz").write_bytes(b"")
    status = cli.main([
        "--config", str(config_file), "--strategy", "bitfit", "full_finetune",
        "--task", "tagging", "--seeds", "3", "4", "--output", "out.json",
        "--set", "finetune.lr=3e-4", "--set", "runner.sweep_values=[0, 0.5]",
        "--pretrained", "pre.npz", "--resume", "resume.npz", "--sweep", "relatedness",
        "--no-progress"])
    assert status == 0
    [call] = runner.calls
    config = call["config"]
    assert config.runner.strategies == ("bitfit", "full_finetune")
    assert config.task.target == "tagging"
    assert config.runner.seeds == (3, 4)
    assert config.runner.output == "out.json"
    assert config.runner.progress is False and call["progress"] is False
    assert config.finetune.lr == 3e-4  # --set beats the file (0.002)
    assert config.runner.sweep_values == (0.0, 0.5)
    assert config.seed == 4  # from the file
    assert (call["pretrained"], call["resume"], call["sweep"]) == (
        "pre.npz", "resume.npz", "relatedness")


def test_without_flags_the_config_decides(runner, config_file):
    assert cli.main(["--config", str(config_file)]) == 0
    [call] = runner.calls
    assert call["config"].runner == Config().runner  # strategies "all", seeds [0], ...
    assert (call["pretrained"], call["resume"], call["sweep"], call["progress"]) == (
        None, None, None, True)


def test_strategy_all_means_every_strategy(runner, config_file):
    assert cli.main(["--config", str(config_file), "--strategy", "all"]) == 0
    assert runner.calls[0]["config"].runner.strategies == STRATEGY_NAMES


def test_dedicated_flags_beat_set_and_env_beats_file(runner, config_file, monkeypatch):
    monkeypatch.setenv("RANDOM_SEED", "8")
    assert cli.main(["--config", str(config_file), "--set", "runner.seeds=[5]",
                     "--seeds", "1"]) == 0
    config = runner.calls[0]["config"]
    assert config.runner.seeds == (1,)
    assert config.seed == 8


def test_default_config_is_the_shipped_one_from_any_cwd(runner, tmp_path):
    # cwd is an empty tmp dir: main.py finds config.yaml next to src/, not in the cwd
    log_file = tmp_path / "logs" / "x.log"
    assert cli.main(["--set", f"logging.file={log_file}"]) == 0
    config = runner.calls[0]["config"]
    assert config.finetune == Config().finetune and config.model == Config().model


# --------------------------------------------------------------- failures in the runner


def test_runner_exception_is_one_line_exit_1_traceback_in_log(capsys, tmp_path, runner,
                                                              config_file):
    def boom():
        raise RuntimeError("pretraining diverged\nat step 12")
    runner.behaviour = boom
    assert cli.main(["--config", str(config_file)]) == 1
    err = capsys.readouterr().err
    log_file = tmp_path / "logs" / "run.log"
    assert err == ("error: RuntimeError: pretraining diverged at step 12 "
                   f"(traceback in {log_file})\n")
    text = log_file.read_text(encoding="utf-8")
    assert "Traceback (most recent call last)" in text and "pretraining diverged" in text


def test_runner_exception_with_debug_shows_the_traceback(capsys, runner, config_file):
    def boom():
        raise KeyError("wte.weight")
    runner.behaviour = boom
    assert cli.main(["--config", str(config_file), "--set", "logging.level=DEBUG"]) == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err
    assert err.splitlines()[-1].startswith("error: KeyError: 'wte.weight'")


def test_config_error_from_the_runner_exits_2(capsys, runner, config_file):
    from transferlab.config import replace_in

    runner.behaviour = lambda: replace_in(Config(), "task.relatedness", 3)
    assert cli.main(["--config", str(config_file)]) == 2
    assert capsys.readouterr().err == (
        "error: replace_in: task.relatedness must be in [0, 1], got 3.0\n")


@pytest.mark.parametrize("module, name, message", [
    ("checkpoint", "CheckpointError",
     "/x/pre.npz is not a transferlab checkpoint: not an .npz (zip) archive"),
    ("train", "TrainingError", "bitfit seed 0: loss became nan at step 2 (lr 3e+08); its "
     "learning rate is strategies.lr.bitfit = 1e+09, try a lower one"),
])
def test_a_foreign_checkpoint_or_a_nan_loss_exits_2_with_its_message(capsys, tmp_path, runner,
                                                                     config_file, module, name,
                                                                     message):
    error = getattr(importlib.import_module(f"transferlab.{module}"), name)

    def boom():
        raise error(message)
    runner.behaviour = boom
    assert cli.main(["--config", str(config_file)]) == 2
    assert capsys.readouterr().err == f"error: {message}\n"  # one line, no traceback
    assert "Traceback (most recent call last)" in (tmp_path / "logs" / "run.log").read_text()


def test_keyboard_interrupt_exits_130_and_says_the_resume_command(capsys, runner, config_file):
    def interrupt():
        raise KeyboardInterrupt
    runner.behaviour = interrupt
    assert cli.main(["--config", str(config_file), "--seeds", "0", "1"]) == 130
    assert capsys.readouterr().err == (
        f"interrupted: finished runs are saved; continue with: python src/main.py "
        f"--config {config_file} --seeds 0 1 --resume\n")
    # resuming again and interrupted again: the same command, not a second --resume
    assert cli.main(["--config", str(config_file), "--resume"]) == 130
    assert capsys.readouterr().err.endswith(f"--config {config_file} --resume\n")


def test_runner_status_is_passed_on(runner, config_file):
    runner.behaviour = lambda: 3
    assert cli.main(["--config", str(config_file)]) == 3


# --------------------------------------------------------------------------- logging


def test_setup_logging_writes_the_file_and_is_idempotent(tmp_path, capsys):
    log_file = tmp_path / "new_dir" / "t.log"  # the directory does not exist yet
    setup_logging("INFO", str(log_file), 1_000_000, 3)
    logger = setup_logging("INFO", str(log_file), 1_000_000, 3)
    assert logger.name == "transferlab"
    logging.getLogger("transferlab.train").info("step 10 loss 2.5")
    logging.getLogger("transferlab.train").debug("not at INFO")
    text = log_file.read_text(encoding="utf-8")
    assert text.count("step 10 loss 2.5") == 1  # one file handler, not two
    assert "not at INFO" not in text
    assert capsys.readouterr().err == "INFO    step 10 loss 2.5\n"  # one console line


def test_console_is_concise_and_file_keeps_tracebacks(tmp_path, capsys):
    log_file = tmp_path / "t.log"
    setup_logging("WARNING", str(log_file), 0, 0)
    log = logging.getLogger("transferlab.runner")
    log.info("file only, below the console level")
    try:
        raise ValueError("bad shape")
    except ValueError:
        log.error("loading failed", exc_info=True)
    log.error("quiet", extra={"console": False})
    assert capsys.readouterr().err == "ERROR   loading failed\n"
    text = log_file.read_text(encoding="utf-8")
    assert "file only, below the console level" in text  # the file keeps INFO
    assert "ValueError: bad shape" in text and "quiet" in text


def test_setup_logging_rotates(tmp_path):
    log_file = tmp_path / "r.log"
    setup_logging("INFO", str(log_file), max_bytes=200, backup_count=2)
    log = logging.getLogger("transferlab.train")
    for i in range(40):
        log.info("a line long enough to fill the file quickly %d", i)
    assert (tmp_path / "r.log.1").exists() and (tmp_path / "r.log.2").exists()
    assert not (tmp_path / "r.log.3").exists()
