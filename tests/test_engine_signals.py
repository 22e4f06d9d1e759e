"""Real signals against a real `python src/main.py` (issue 11): SIGINT, SIGTERM or SIGKILL
in the middle of a multi-run experiment, then the same command with --resume, must give
the JSON and the plot of an uninterrupted run (timings aside); --jobs 2 must equal
--jobs 1. The in-process tests of the same machinery are in test_engine.py.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from test_cli_end_to_end import MAIN, tiny_config

pytestmark = pytest.mark.slow  # each test runs whole experiments in new processes

ARGS = ["--strategy", "scratch", "bitfit", "full_finetune", "--seeds", "0", "1"]
STEPS = 30  # per run: long enough to be caught in the middle


def _env():
    env = {k: v for k, v in os.environ.items() if k not in ("RANDOM_SEED", "LOG_LEVEL")}
    env.update(OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")  # --jobs 1 equals --jobs 2 here
    return env


def _without_timings(obj):
    if isinstance(obj, dict):
        return {k: _without_timings(v) for k, v in obj.items() if "seconds" not in k and k != "jobs"}
    if isinstance(obj, list):
        return [_without_timings(v) for v in obj]
    return obj


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A warm cache and the uninterrupted reference run."""
    root = tmp_path_factory.mktemp("signals")
    config = root / "config.yaml"
    config.write_text(tiny_config(root / "cache").replace("steps: 6,", f"steps: {STEPS},")
                      .replace("progress: false", "progress: true"))
    ref = root / "reference"
    ref.mkdir()
    for _ in range(2):  # the second run is the reference: warm cache, as the ones it is held to
        done = subprocess.run([sys.executable, str(MAIN), "--config", str(config), *ARGS], cwd=ref,
                              env=_env(), capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
    return root, config, ref


def _same_experiment(a, b):
    """Equal but for timings, the cache folder of each and the worker count."""
    for d in (a, b):
        d["config"]["runner"].pop("cache_dir"), d["config"]["runner"].pop("progress")
        d["pretrained"].pop("path")
    assert _without_timings(a) == _without_timings(b)


def _start(world, cwd, *extra):
    root, config, _ = world
    cache = cwd / "cache"
    shutil.copytree(root / "cache", cache, ignore=shutil.ignore_patterns("journal", "runs"))
    args = ["--config", str(config), "--set", f"runner.cache_dir={cache}", *ARGS, *extra]
    return args, subprocess.Popen([sys.executable, str(MAIN), *args], cwd=cwd, env=_env(),
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_a_run_in_the_middle(cwd, proc, finished=2):
    """Until `finished` runs are journaled and the next one has a checkpoint on disk."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        journaled = {"-".join(p.stem.split("-")[2:]).replace("-rel1", "")  # strategy-seed<k>
                     for p in (cwd / "cache" / "journal").glob("*/run-*.json")}
        running = {p.stem.replace("-topic", "") for p in (cwd / "cache" / "runs").glob("*.npz")}
        if len(journaled) >= finished and running - journaled:  # a run with a checkpoint, unfinished
            return
        time.sleep(0.005)
    pytest.fail(f"the experiment ended or stalled before it could be interrupted: {proc.poll()}")


@pytest.mark.parametrize("sig, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143),
                                         (signal.SIGKILL, -signal.SIGKILL)])
def test_interrupted_at_any_signal_resumes_to_the_uninterrupted_results(world, tmp_path, sig, status):
    args, proc = _start(world, tmp_path)
    _wait_for_a_run_in_the_middle(tmp_path, proc)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == status, err
    assert not (tmp_path / "results.json").exists()
    if sig != signal.SIGKILL:  # Ctrl-C and SIGTERM say the same: exactly what to run
        assert "Traceback" not in err
        assert err.splitlines()[-1] == ("interrupted: finished runs are saved; continue with: "
                                        f"python {MAIN} " + " ".join(args) + " --resume")
    done = subprocess.run([sys.executable, str(MAIN), *args, "--resume"], cwd=tmp_path, env=_env(),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stderr.count("read back from the journal") >= 2  # finished runs not redone
    assert "resumed at step" in done.stderr  # the interrupted run went on from its checkpoint
    assert "\r" not in done.stderr  # not a terminal: plain lines
    reference = json.loads((world[2] / "results.json").read_text())
    resumed = json.loads((tmp_path / "results.json").read_text())
    assert _without_timings(resumed["results"]) == _without_timings(reference["results"])
    _same_experiment(resumed, reference)
    assert (tmp_path / "results.png").read_bytes() == (world[2] / "results.png").read_bytes()
    assert not list((tmp_path / "cache").rglob("*.tmp"))  # killed writes cleaned up
    assert not list((tmp_path / "cache" / "runs").iterdir())


def test_two_jobs_give_the_results_of_one(world, tmp_path):
    args, proc = _start(world, tmp_path, "--jobs", "2", "--no-progress")
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    reference = json.loads((world[2] / "results.json").read_text())
    parallel = json.loads((tmp_path / "results.json").read_text())
    assert parallel["config"]["runner"]["jobs"] == 2
    assert [(e["strategy"], e["seed"]) for e in parallel["results"]] == [
        (e["strategy"], e["seed"]) for e in reference["results"]]  # the serial order
    _same_experiment(parallel, reference)


def test_sigterm_with_two_jobs_stops_the_workers_and_resumes(world, tmp_path):
    args, proc = _start(world, tmp_path, "--jobs", "2")
    _wait_for_a_run_in_the_middle(tmp_path, proc, finished=1)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert err.splitlines()[-1].endswith("--jobs 2 --resume")
    done = subprocess.run([sys.executable, str(MAIN), *args, "--resume"], cwd=tmp_path, env=_env(),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    reference = json.loads((world[2] / "results.json").read_text())
    resumed = json.loads((tmp_path / "results.json").read_text())
    assert _without_timings(resumed["results"]) == _without_timings(reference["results"])


def _processes_in_group(pgid: int) -> list[str]:
    """The command lines of the live processes whose process group is `pgid` (Linux)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmdline = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":  # pgrp; a zombie holds nothing
            found.append(cmdline)
    return found


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
def test_ctrl_c_with_batch_processes_leaves_no_worker_and_resumes(world, tmp_path):
    """finetune.batch_processes: 2 and a Ctrl-C, which the terminal sends to the whole
    process group: the worker ignores it, the runner stops as always (status 130, the
    resume line, no traceback), no process of the group is left, no shared memory either,
    and --resume gives the results of an uninterrupted batch_processes run."""
    procs = ["--set", "finetune.batch_processes=2"]
    (tmp_path / "ref").mkdir()
    ref_args, ref = _start(world, tmp_path / "ref", *procs, "--no-progress")
    assert ref.wait(timeout=300) == 0, ref.communicate()[1]
    cwd = tmp_path / "run"
    cwd.mkdir()
    root, config, _ = world
    shutil.copytree(root / "cache", cwd / "cache", ignore=shutil.ignore_patterns("journal", "runs"))
    args = ["--config", str(config), "--set", f"runner.cache_dir={cwd / 'cache'}", *ARGS, *procs]
    shm_before = set(os.listdir("/dev/shm"))
    proc = subprocess.Popen([sys.executable, str(MAIN), *args], cwd=cwd, env=_env(), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    _wait_for_a_run_in_the_middle(cwd, proc)
    assert any("spawn_main" in cmd for cmd in _processes_in_group(proc.pid))  # a worker runs
    os.killpg(proc.pid, signal.SIGINT)  # as Ctrl-C does: every process of the group
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    assert err.splitlines()[-1].endswith("finetune.batch_processes=2 --resume")
    deadline = time.monotonic() + 10  # multiprocessing's resource tracker exits right after
    while _processes_in_group(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _processes_in_group(proc.pid) == []
    assert set(os.listdir("/dev/shm")) <= shm_before
    done = subprocess.run([sys.executable, str(MAIN), *args, "--resume"], cwd=cwd, env=_env(),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stderr.count("read back from the journal") >= 2
    reference = json.loads((tmp_path / "ref" / "results.json").read_text())
    resumed = json.loads((cwd / "results.json").read_text())
    assert _without_timings(resumed["results"]) == _without_timings(reference["results"])


def test_jobs_with_batch_processes_say_how_many_processes_share_the_cores(world, tmp_path):
    args, proc = _start(world, tmp_path, "--jobs", "2", "--set", "finetune.batch_processes=2",
                        "--no-progress")
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    warning = [line for line in err.splitlines() if "runner.jobs 2 with finetune.batch_processes 2" in line]
    assert len(warning) == 1 and f"4 busy processes on {os.cpu_count()} cores" in warning[0]
