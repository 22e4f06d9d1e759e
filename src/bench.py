"""Speed benchmark: transferlab's NumPy GPT-2 against the same model in PyTorch.

    python src/bench.py [--sizes tiny small medium] [--repeat N] [--json out.json]
                        [--threads N] [--no-scaling] [--no-feature-cache] [--no-torch]
                        [--profile]
    python src/bench.py --compare-layers REV [--sizes ...] [--repeat N] [--threads N]

For every named size it times, on one fixed batch:

- forward+backward (`model(idx, targets)` then `model.backward()`), and a full training
  step (the same plus `AdamW.step`);
- the same two in PyTorch when torch is importable: the same weights, the same shapes,
  float32, `F.scaled_dot_product_attention`, and as many threads as NumPy's BLAS has.
  NumPy and PyTorch repetitions alternate (A B, B A, A B, ...) in one process, so both
  see the same machine load; each ratio is the median of the rounds' ratios
  (`paired_ratio`), beside each side's median time; a repetition of a step shorter than
  MIN_SAMPLE_S runs it several times in a row and reports the time per call;
- achieved GFLOP/s from an analytic count of matrix-multiply FLOPs (`step_flops`), as a
  fraction of this machine's float32 matmul peak: a large np.matmul timed as one more
  contender in the same interleaved loop;
- peak memory of one training step, each side in a fresh process (`peak_rss`).

Then how a step's time grows with T and with the batch size, and the feature-cache path
(frozen backbone, head trained on cached features) against full fine-tuning and against
a frozen backbone expressed with `model.masks`. `--profile` adds where the time goes,
kernel by kernel. `--compare-layers REV` instead times the model with layers.py as it was
at git revision REV against the working tree (a regression check for the kernels).
Method, results and the profile: docs/performance.md.
"""
from __future__ import annotations

import argparse
import ctypes
import functools
import inspect
import json
import math
import multiprocessing
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
import tracemalloc
import types
from pathlib import Path

import numpy as np

from transferlab import GPT, GPTConfig  # src/ is on sys.path: it is this script's own folder

SIZES = {
    "tiny": dict(vocab_size=32, block_size=32, n_layer=2, n_head=4, n_embd=64, batch=32),
    "small": dict(vocab_size=64, block_size=64, n_layer=4, n_head=4, n_embd=128, batch=32),
    "medium": dict(vocab_size=256, block_size=128, n_layer=6, n_head=8, n_embd=256, batch=16),
    # GPT-2 124M's shape (its vocabulary and width, 12 layers and heads) on T = 256, B = 4:
    # ~8 s a step on 2 cores, so it runs at most GPT2_REPEAT timed repetitions
    "gpt2": dict(vocab_size=50257, block_size=256, n_layer=12, n_head=12, n_embd=768, batch=4),
}
GPT2_REPEAT = 3
# the batch-parts contenders and their rows' labels: GPT's batch_threads, batch_processes
PARTS = {"threads": "batch", "procs": "procs"}
FEATURE_CACHE_SIZES = ("tiny", "small", "medium")  # the head-only comparison skips gpt2
SCALING_BASE = "small"  # step time against T and against batch, other sizes fixed
SCALING_T = (32, 64, 128)
SCALING_BATCH = (8, 16, 32)
WARMUP = 2  # untimed steps before timing: first-touch page faults, BLAS buffers, caches
REST_S = 0.2  # pause before every timed call: an idle OpenBLAS worker spins ~0.1 s after
# each call and slows whatever runs next on the other core (issue 15); resting first
# lets it go to sleep, so no contender pays for the one that ran before it
MIN_SAMPLE_S = 0.1  # a timed sample of the step tables is back-to-back calls lasting at
# least this long (`rested(..., min_sample=)`): a call of a few ms right after the rest
# mostly times the thread pools waking up, which a training run's back-to-back steps
# never pay (tiny's PyTorch step: 15 ms alone, 7 ms a call eight in a row)
QUIET_LOAD = 1.5  # a 1-minute load average above this before a run: not a quiet machine
QUIET_OTHERS = 0.25  # other processes using more than this many cores during our timed
# calls (from /proc/stat, our own CPU time subtracted): not a quiet machine
N_CLASSES = 4  # the sequence head of the feature-cache comparison
SPARSE_KEEP = 0.05  # the sparse-mask step: this fraction of each weight matrix trains


# ----------------------------------------------------------------------------------------
# threads: NumPy's BLAS and PyTorch's intra-op pool get the same number


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _openblas_thread_funcs():
    """(get, set) ctypes functions of the OpenBLAS NumPy loaded, or None if not found."""
    from transferlab.kernels import openblas_thread_funcs

    return openblas_thread_funcs()


def set_threads(n: int, torch=None) -> dict:
    """Give NumPy's BLAS and PyTorch n threads each; returns what each reports back.

    NumPy's elementwise ufuncs and reductions run on one thread whatever this says:
    only its BLAS calls (matmul) use the pool. PyTorch threads its elementwise kernels too.
    """
    funcs = _openblas_thread_funcs()
    if funcs is not None:
        get, set_ = funcs
        set_(ctypes.c_int(n))
        blas = int(get())
    else:
        blas = None  # unknown BLAS: set OPENBLAS_NUM_THREADS / OMP_NUM_THREADS by hand
    info = {"requested": n, "cores": available_cores(), "numpy_blas": blas,
            "numpy_ufuncs": 1, "torch": None}
    if torch is not None:
        torch.set_num_threads(n)
        info["torch"] = torch.get_num_threads()
    return info


def import_torch():
    """torch if importable, else None: the benchmark never requires it."""
    try:
        import torch
    except (ImportError, OSError):  # not installed, or installed without its libraries
        return None
    return torch


# ----------------------------------------------------------------------------------------
# FLOPs and the machine's matmul peak


def step_flops(V, T, L, C, B) -> int:
    """Matrix-multiply FLOPs of one forward+backward of the LM model, counted analytically.

        N_mm     = L * 12 C^2 + V C           weights that take part in a product: per block
                                              c_attn 3C^2, c_proj C^2, c_fc 4C^2, mlp.c_proj
                                              4C^2; the (tied) LM head V C
        forward  = 2 N_mm (B T)               a multiply and an add per weight and token
                 + 4 L T C (B T)              q k^T and att v: 2 T C each per token and layer,
                                              over the full T x T (what the code computes,
                                              causal mask or not)
        backward = 2 forward                  every product has two: d input and d weight
        total    = 6 N_mm (B T) + 12 L T C (B T)

    Embedding lookups, LayerNorm, GELU, softmax and the optimizer are not counted: they are
    not matrix products (PaLM's "model FLOPs" convention, arXiv 2204.02311, appendix B).
    """
    tokens = B * T
    n_mm = L * 12 * C * C + V * C
    return 6 * n_mm * tokens + 12 * L * T * C * tokens


def matmul_peak(n: int = 1024):
    """(fn, flops): an (n, n) @ (n, n) float32 np.matmul, this machine's matmul peak.

    The benchmark runs it as one more contender, interleaved with the model steps, so the
    peak is measured under the same load as the steps it is compared with (a peak taken
    once at the start of a run on a shared machine is off by as much as the load drifts).
    """
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)  # (n, n)
    b = rng.standard_normal((n, n), dtype=np.float32)  # (n, n)
    return (lambda: a @ b), 2 * n**3


# ----------------------------------------------------------------------------------------
# timing: interleaved repetitions, medians


def cpu_seconds() -> float:
    """CPU time (user + system) this process has used so far, summed over all its threads
    (OpenBLAS's workers and torch's intra-op pool included), plus that of its live worker
    processes (GPT's batch_processes). time.process_time reads the process CPU clock to the
    nanosecond; os.times counts 10 ms clock ticks, too coarse for a 10 ms step."""
    return time.process_time() + workers_cpu_seconds()


def workers_cpu_seconds() -> float:
    """CPU time the live child processes multiprocessing started have used so far
    (/proc/PID/stat's utime and stime, clock ticks; 0 off Linux). Without it, the worker's
    half of a batch_processes step would count as another process keeping the machine busy."""
    total = 0
    for child in multiprocessing.active_children():
        try:
            with open(f"/proc/{child.pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()  # after the command name
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime: fields 14 and 15
    return total / os.sysconf("SC_CLK_TCK")


def machine_busy_seconds() -> float | None:
    """CPU seconds all cores of the machine have spent not idle since boot (/proc/stat,
    clock-tick resolution), or None where /proc/stat does not exist."""
    try:
        with open("/proc/stat") as f:
            ticks = [int(v) for v in f.readline().split()[1:9]]  # user .. steal
    except (OSError, ValueError):
        return None
    busy = sum(ticks) - ticks[3] - ticks[4]  # minus idle and iowait
    return busy / os.sysconf("SC_CLK_TCK")


def timed_call(fn) -> dict:
    """Run fn once: wall time, this process's CPU time, and the CPU time every other
    process on the machine used meanwhile (all in seconds; others None off Linux)."""
    m0, c0 = machine_busy_seconds(), cpu_seconds()
    t0 = time.perf_counter()
    fn()
    wall = time.perf_counter() - t0
    cpu, m1 = cpu_seconds() - c0, machine_busy_seconds()
    others = None if m0 is None or m1 is None else max(0.0, (m1 - m0) - cpu)
    return {"wall": wall, "cpu": cpu, "others": others}


def rested(fns: dict, repeat: int, warmup: int = WARMUP, rest: float | None = None,
           min_sample: float = 0.0) -> dict:
    """name -> list of `repeat` timed_call records, the callables run alternately, each
    after a rest of `rest` seconds.

    With `min_sample` > 0 each record times a callable `calls` times back to back, as many
    as its last warmup call says fill `min_sample` seconds, and holds the times per call
    (and `calls`): the steady state of calls that follow each other, as a training run's
    steps do, with the thread pools' waking after the rest paid once per record.

    Repetition r runs the callables in order, r + 1 in reverse order (A B, B A, A B, ...):
    on a shared machine the load drifts, and alternating gives every contender the same
    drift. The rest (default REST_S, `--rest`) before every timed call removes the other
    bias of running one after
    another: OpenBLAS's idle worker spin-waits ~0.1 s after each call, and during that
    time it takes the second core from whatever runs next (PyTorch measured 70 ms rested
    and 130 ms right after an OpenBLAS call at the small size).
    """
    last = {}
    for _ in range(max(warmup, 1 if min_sample > 0 else 0)):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            last[name] = time.perf_counter() - t0
    calls = {name: max(1, math.ceil(min_sample / last[name])) if min_sample > 0 else 1
             for name in fns}
    rest = REST_S if rest is None else rest
    names = list(fns)
    runs = {name: [] for name in names}
    for r in range(repeat):
        for name in names if r % 2 == 0 else names[::-1]:
            if rest > 0:
                time.sleep(rest)
            runs[name].append(per_call(timed_call(repeated(fns[name], calls[name])), calls[name]))
    return runs


def repeated(fn, n: int):
    """fn called n times in a row (one call: fn itself)."""
    if n == 1:
        return fn

    def run():
        for _ in range(n):
            fn()
    return run


def per_call(record: dict, n: int) -> dict:
    """A timed_call record of n calls in a row -> the times of one call, and `calls` = n."""
    return {**{k: (None if v is None else v / n) for k, v in record.items()}, "calls": n}


def interleaved(fns: dict, repeat: int, warmup: int = WARMUP, rest: float | None = None) -> dict:
    """name -> list of `repeat` wall times (s): `rested` without the CPU columns."""
    return column(rested(fns, repeat, warmup, rest))


def column(runs: dict, key: str = "wall") -> dict:
    """name -> one field of `rested`'s records, in round order: "wall" or "cpu" (s)."""
    return {name: [r[key] for r in records] for name, records in runs.items()}


def others_cores(*runs: dict) -> float | None:
    """The cores other processes used on average during the timed calls of `rested` runs
    (their CPU time over our wall time), or None off Linux."""
    records = [r for run in runs for records in run.values() for r in records]
    if not records or any(r["others"] is None for r in records):
        return None
    return sum(r["others"] for r in records) / sum(r["wall"] for r in records)


def median_ms(times) -> float:
    return statistics.median(times) * 1e3


def paired_ratio(a, b) -> float:
    """The median over repetitions of a[r] / b[r]: each ratio of two calls timed side by
    side in one round of `rested` (adjacent in time), so a machine that speeds up or slows
    down between rounds cancels out of every ratio instead of only on average, as it does
    in median(a) / median(b)."""
    if len(a) != len(b) or not a:
        raise ValueError(f"paired_ratio needs two equally long, non-empty lists, got {len(a)} and {len(b)}")
    return statistics.median(x / y for x, y in zip(a, b))


def peak_traced_mb(fn) -> float:
    """Peak memory (MB) that one call of fn allocates, as tracemalloc sees it.

    NumPy reports its array buffers to tracemalloc, so this is the step's activations,
    gradients and temporaries at their peak. Arrays that existed before the call (the
    parameters, the optimizer state) are not included. Run untimed: tracing slows code.
    """
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        fn()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return peak / 2**20


def max_rss_mb() -> float:
    """Process-wide peak resident set size (getrusage ru_maxrss; kB on Linux, bytes on macOS)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10


# ----------------------------------------------------------------------------------------
# the models


def lm_batch(spec, T=None, B=None, seed=0):
    """A NumPy LM model for `spec` (block_size = T) and one random batch (idx, targets)."""
    T = T or spec["block_size"]
    B = B or spec["batch"]
    cfg = GPTConfig(vocab_size=spec["vocab_size"], block_size=T, n_layer=spec["n_layer"],
                    n_head=spec["n_head"], n_embd=spec["n_embd"], dtype="float32")
    model = GPT(cfg, seed=seed)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, cfg.vocab_size, (B, T))
    targets = rng.integers(0, cfg.vocab_size, (B, T))
    return model, idx, targets


def make_adamw(params, masks=None):
    from transferlab.optim import AdamW  # imported late: optim.py is not needed to time fwd+bwd

    return AdamW(params, lr=1e-4, weight_decay=0.01, masks=masks)


class TorchGPT:
    """The same GPT-2 in PyTorch, holding copies of a NumPy model's weights.

    Written like Hugging Face's GPT-2 (Conv1D layout: addmm(b, x, W) with W [in, out]),
    with F.scaled_dot_product_attention, F.layer_norm and tanh-approximated F.gelu, the
    LM head tied to wte. Eager mode, float32.
    """

    def __init__(self, torch, model: GPT, share: bool = False):
        cfg = model.config
        self.torch, self.F = torch, torch.nn.functional
        self.L, self.NH, self.C = cfg.n_layer, cfg.n_head, cfg.n_embd
        # share=True: the tensors use the NumPy arrays' memory (the peak-RSS child, where
        # a second copy of the weights would be counted against PyTorch)
        copy = (lambda a: torch.from_numpy(a)) if share else torch.tensor
        self.p = {name: copy(a).requires_grad_(True) for name, a in model.params.items()}

    def parameters(self):
        return list(self.p.values())

    def adamw(self):
        """torch.optim.AdamW with the NumPy optimizer's settings and decay rule (ndim >= 2)."""
        decay = [t for t in self.p.values() if t.ndim >= 2]
        no_decay = [t for t in self.p.values() if t.ndim < 2]
        groups = [{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}]
        return self.torch.optim.AdamW(groups, lr=1e-4)

    def _linear(self, x, name):
        w, b = self.p[name + ".weight"], self.p[name + ".bias"]
        return self.torch.addmm(b, x.reshape(-1, x.shape[-1]), w).view(*x.shape[:-1], w.shape[1])

    def loss(self, idx, targets):
        F, p, C, NH = self.F, self.p, self.C, self.NH
        B, T = idx.shape
        x = p["wte.weight"][idx] + p["wpe.weight"][:T]  # (B, T, C)
        for i in range(self.L):
            pre = f"h.{i}."
            h = F.layer_norm(x, (C,), p[pre + "ln_1.weight"], p[pre + "ln_1.bias"], 1e-5)
            q, k, v = self._linear(h, pre + "attn.c_attn").split(C, dim=2)
            q, k, v = (a.view(B, T, NH, C // NH).transpose(1, 2) for a in (q, k, v))  # (B, NH, T, HS)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            y = y.transpose(1, 2).reshape(B, T, C)
            x = x + self._linear(y, pre + "attn.c_proj")
            h = F.layer_norm(x, (C,), p[pre + "ln_2.weight"], p[pre + "ln_2.bias"], 1e-5)
            h = F.gelu(self._linear(h, pre + "mlp.c_fc"), approximate="tanh")
            x = x + self._linear(h, pre + "mlp.c_proj")
        x = F.layer_norm(x, (C,), p["ln_f.weight"], p["ln_f.bias"], 1e-5)
        logits = x.reshape(B * T, C) @ p["wte.weight"].T  # (B*T, V)
        return F.cross_entropy(logits, targets.reshape(-1))

    def fwd_bwd(self, idx, targets):
        for t in self.p.values():
            t.grad = None
        loss = self.loss(idx, targets)
        loss.backward()
        return loss


# ----------------------------------------------------------------------------------------
# benchmarks


def bench_size(name, repeat, torch=None, spec=None, peak_n=1024, threads=1,
               one_thread=True) -> dict:
    """Forward+backward and training steps of one size, NumPy and (if given) PyTorch,
    rested and alternated with each other and with the matmul that measures the peak,
    at `threads` threads (wall-time ratios); then, if `one_thread` and threads > 1, again
    at one thread each (CPU-time ratios). Peak RSS is measured apart: `peak_rss`."""
    spec = spec or SIZES[name]
    if name == "gpt2":
        repeat = min(repeat, GPT2_REPEAT)
    warmup = 1 if name == "gpt2" else WARMUP
    model, idx, targets = lm_batch(spec)
    B, T = idx.shape
    flops = step_flops(spec["vocab_size"], T, spec["n_layer"], spec["n_embd"], B)
    out = {"config": dict(spec), "tokens": B * T, "flops_per_step": flops, "repeat": repeat,
           "load_before": load_average()}
    peak_fn, peak_flops = matmul_peak(peak_n)
    opt = make_adamw(model.params)

    def np_fwd_bwd():
        model(idx, targets)
        return model.backward()

    def np_train():
        opt.step(np_fwd_bwd())

    def in_parts(fn, n, where="batch_threads"):  # the same model, the whole step on n
        def run():  # batch parts in n threads (or processes: where="batch_processes")
            setattr(model, where, n)
            try:
                return fn()
            finally:
                setattr(model, where, 1)
        return run

    fwd_bwd = {"numpy": np_fwd_bwd}
    train = {"numpy": np_train}
    if threads > 1:  # GPT(..., batch_threads=threads): the explicit switch, timed beside
        fwd_bwd["numpy_threads"] = in_parts(np_fwd_bwd, threads)
        train["numpy_threads"] = in_parts(np_train, threads)
        # GPT(..., batch_processes=threads): the parts in worker processes (workers.py)
        fwd_bwd["numpy_procs"] = in_parts(np_fwd_bwd, threads, "batch_processes")
        train["numpy_procs"] = in_parts(np_train, threads, "batch_processes")
    if torch is not None:
        tmodel = TorchGPT(torch, model)
        tidx, ttargets = torch.tensor(idx), torch.tensor(targets)
        # the two models agree before any timing: the comparison is like for like
        out["loss_numpy"] = float(model(idx, targets)[1])
        model.clear_caches()
        with torch.no_grad():
            out["loss_torch"] = float(tmodel.loss(tidx, ttargets))
        topt = tmodel.adamw()

        def torch_train():
            tmodel.fwd_bwd(tidx, ttargets)
            topt.step()

        fwd_bwd["torch"] = lambda: tmodel.fwd_bwd(tidx, ttargets)
        train["torch"] = torch_train
    for key, fns in (("fwd_bwd", fwd_bwd), ("train_step", train)):
        runs = rested({**fns, "matmul_peak": peak_fn}, repeat, warmup, min_sample=MIN_SAMPLE_S)
        out[key] = _summarise(runs, flops, B * T, peak_flops)
    if one_thread and threads > 1:
        set_threads(1, torch)
        try:
            for key, fns in (("fwd_bwd", fwd_bwd), ("train_step", train)):
                fns = {who: fn for who, fn in fns.items() if who in ("numpy", "torch")}
                out[key]["one_thread"] = _summarise_cpu(rested(fns, repeat, warmup=1,
                                                               min_sample=MIN_SAMPLE_S))
        finally:
            set_threads(threads, torch)
    elif one_thread:  # the run is already at one thread: its CPU times are the 1-thread ones
        for key in ("fwd_bwd", "train_step"):
            out[key]["one_thread"] = {k: v for k, v in out[key].items() if k.endswith("cpu_ms")
                                      or k == "ratio_cpu"}
    out["load_after"] = load_average()
    return out


def _summarise_cpu(runs) -> dict:
    """Medians of CPU time per call (ms) for each side, and numpy / torch (paired_ratio)."""
    cpu, wall = column(runs, "cpu"), column(runs)
    res = {}
    for who in runs:
        res[f"{who}_cpu_ms"] = median_ms(cpu[who])
        res[f"{who}_ms"] = median_ms(wall[who])
        res[f"{who}_calls"] = runs[who][0].get("calls", 1)
    if "torch" in runs:
        res["ratio_cpu"] = paired_ratio(cpu["numpy"], cpu["torch"])
        res["ratio"] = paired_ratio(wall["numpy"], wall["torch"])
    return res


def add_peak_fractions(sizes: dict) -> float:
    """Give every side of every step its `*_peak_fraction`, against the best 1024^3 matmul
    of the whole run, and return that best. One denominator for every row: a size's own
    median peak drifts (one gpt2 row saw 99 GFLOP/s against a best of 217) and made
    fractions above 1."""
    steps = [r[k] for r in sizes.values() for k in ("fwd_bwd", "train_step")]
    peak = max(step["peak_gflops_best"] for step in steps)
    for step in steps:
        for who in ("numpy", *(f"numpy_{parts}" for parts in PARTS), "torch"):
            if f"{who}_gflops" in step:
                step[f"{who}_peak_fraction"] = step[f"{who}_gflops"] / peak
    return peak


def _summarise(runs, flops, tokens, peak_flops) -> dict:
    """Medians (and bests) of rested, alternated calls -> ms, tokens/s, GFLOP/s (`run` adds
    each side's fraction of the run's best matmul: add_peak_fractions); each side's CPU use
    (its CPU time / wall time, in cores) and the cores other processes used meanwhile."""
    runs = dict(runs)
    peak_times = [r["wall"] for r in runs.pop("matmul_peak")]
    res = {"peak_gflops": peak_flops / statistics.median(peak_times) / 1e9,
           "peak_gflops_best": peak_flops / min(peak_times) / 1e9}
    wall, cpu = column(runs), column(runs, "cpu")
    for who, rs in runs.items():
        ts = wall[who]
        ms = median_ms(ts)
        gflops = flops / (ms / 1e3) / 1e9
        res.update({
            f"{who}_ms": ms,
            f"{who}_ms_best": min(ts) * 1e3,
            f"{who}_ms_all": [t * 1e3 for t in ts],
            f"{who}_cpu_ms": median_ms(cpu[who]),
            # cores in use on average during the timed calls: ours, and everyone else's
            f"{who}_cpu_use": sum(cpu[who]) / sum(ts),
            f"{who}_others_cpu": others_cores({who: rs}),
            f"{who}_tokens_per_s": tokens / (ms / 1e3),
            f"{who}_gflops": gflops,
            f"{who}_calls": rs[0].get("calls", 1),  # calls in a row per repetition (rested)
        })
    if "torch_ms" in res:
        # numpy time / torch time: the median of the rounds' ratios (paired_ratio)
        res["ratio"] = paired_ratio(wall["numpy"], wall["torch"])
        res["ratio_of_medians"] = res["numpy_ms"] / res["torch_ms"]
        res["ratio_best"] = res["numpy_ms_best"] / res["torch_ms_best"]  # the fastest of each
        res["ratio_cpu"] = paired_ratio(cpu["numpy"], cpu["torch"])
        for parts in PARTS:
            if f"numpy_{parts}_ms" in res:
                res[f"ratio_{parts}"] = paired_ratio(wall[f"numpy_{parts}"], wall["torch"])
                res[f"ratio_{parts}_best"] = res[f"numpy_{parts}_ms_best"] / res["torch_ms_best"]
    return res


# ----------------------------------------------------------------------------------------
# peak memory of a training step, each side in a fresh process


def _rss_mb(field: str, pid="self") -> float | None:
    """A field of /proc/PID/status (VmRSS: now, VmHWM: the peak so far) in MB."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 2**10
    except OSError:
        pass
    return None


def rss_child(name: str, side: str, threads: int) -> dict:
    """What a fresh process does for `peak_rss`: build one size's model (and optimizer) on
    one side, run two training steps (a warm one and the measured one), report its peak
    RSS (VmHWM) and the RSS before the first step (weights, optimizer state
    and imports). The PyTorch side shares the NumPy weights' memory, so the weights are
    counted once on both sides."""
    spec = SIZES[name]
    torch = import_torch() if side == "torch" else None
    set_threads(threads, torch)
    model, idx, targets = lm_batch(spec)
    if side.startswith("numpy"):
        model.batch_threads = threads if side == "numpy_threads" else 1
        model.batch_processes = threads if side == "numpy_procs" else 1
        opt = make_adamw(model.params)

        def step():
            model(idx, targets)
            opt.step(model.backward())
    else:
        tmodel = TorchGPT(torch, model, share=True)
        tidx, ttargets = torch.tensor(idx), torch.tensor(targets)
        topt = tmodel.adamw()

        def step():
            tmodel.fwd_bwd(tidx, ttargets)
            topt.step()
    before = _rss_mb("VmRSS")
    step()
    step()
    # VmHWM, this process's own peak: getrusage's ru_maxrss of a child started by fork and
    # exec carries over the parent's peak (Linux copies it at exec), so a child of a
    # benchmark that imported torch would report at least the parent's RSS
    peak = _rss_mb("VmHWM")
    out = {"side": side, "size": name, "rss_before_step_mb": before,
           "peak_rss_mb": max_rss_mb() if peak is None else peak}
    if side == "numpy_procs":  # and the worker processes' peaks (the shared block counted
        workers = model._workers  # in each process that touched it)
        out["peak_rss_mb"] += sum(_rss_mb("VmHWM", proc.pid) for proc in workers.procs)
        out["shared_mb"] = workers.shm.size / 2**20
    return out


def run_child(args: list[str], what: str) -> dict:
    """Run `python bench.py ARGS` in a fresh process and return the JSON line it prints
    last; a failed child raises, naming `what` it measured."""
    done = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"bench.py: the {what} child failed: {done.stderr.strip()[-500:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def peak_rss(name: str, threads: int, use_torch: bool) -> dict:
    """Peak RSS (MB) of a training step for each side, each in a fresh subprocess
    (`rss_child`): numpy_mb, torch_mb, ratio; the RSS before the step beside each; with
    threads > 1 also numpy_threads_mb and numpy_procs_mb, the step with
    GPT(..., batch_threads=threads) and with batch_processes=threads (the sum of every
    process's peak, and numpy_procs_shared_mb, the shared block each of them counts)."""
    res = {}
    sides = (["numpy"] + [f"numpy_{parts}" for parts in PARTS if threads > 1]
             + (["torch"] if use_torch else []))
    for side in sides:
        child = run_child(["--rss-child", name, side, "--threads", str(threads)],
                          f"{side} peak-RSS for {name}")
        res[f"{side}_mb"] = child["peak_rss_mb"]
        res[f"{side}_before_step_mb"] = child["rss_before_step_mb"]
        if "shared_mb" in child:
            res[f"{side}_shared_mb"] = child["shared_mb"]
    if use_torch:
        res["ratio"] = res["numpy_mb"] / res["torch_mb"]
        for parts in PARTS:
            if f"numpy_{parts}_mb" in res:
                res[f"ratio_{parts}"] = res[f"numpy_{parts}_mb"] / res["torch_mb"]
    return res


def malloc_child(name: str, mode: str, repeat: int) -> dict:
    """What a fresh process does for `malloc_comparison`: training steps of one size at one
    BLAS thread, with glibc's own allocator settings (mode "glibc": GPT() is kept from
    calling kernels.reuse_freed_memory) or with reuse_freed_memory's (mode "reuse"); the
    page faults (minor: a page mapped in) per step and the median CPU time of a step."""
    import transferlab.model

    if mode == "glibc":
        transferlab.model.reuse_freed_memory = lambda: False
    set_threads(1)
    model, idx, targets = lm_batch(SIZES[name])
    opt = make_adamw(model.params)

    def step():
        model(idx, targets)
        opt.step(model.backward())

    step()
    step()
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    times = []
    for _ in range(repeat):
        t0 = time.process_time()
        step()
        times.append(time.process_time() - t0)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
    return {"size": name, "mode": mode, "faults_per_step": faults / repeat,
            "cpu_ms": statistics.median(times) * 1e3}


def malloc_comparison(sizes, repeat: int, rounds: int = 3) -> dict:
    """A training step's page faults and CPU time with glibc's allocator settings and with
    kernels.reuse_freed_memory, in fresh processes (the setting is per process), rounds
    alternating the order; medians over the rounds."""
    result = {}
    for name in sizes:
        runs = {"glibc": [], "reuse": []}
        for r in range(rounds):
            for mode in ("glibc", "reuse") if r % 2 == 0 else ("reuse", "glibc"):
                runs[mode].append(run_child(["--malloc-child", name, mode, "--repeat", str(repeat)],
                                            f"{mode} malloc for {name}"))
        row = {}
        for mode, children in runs.items():
            row[f"{mode}_faults_per_step"] = statistics.median(c["faults_per_step"] for c in children)
            row[f"{mode}_cpu_ms"] = statistics.median(c["cpu_ms"] for c in children)
        row["gain"] = row["glibc_cpu_ms"] / row["reuse_cpu_ms"]
        result[name] = row
    return result


def format_malloc(result) -> str:
    lines = ["a training step at one BLAS thread, fresh process per run, medians: page faults "
             "per step and CPU ms, glibc's allocator settings against kernels.reuse_freed_memory",
             f"{'size':8}{'glibc faults':>13}{'glibc ms':>10}{'reuse faults':>13}{'reuse ms':>10}{'gain':>7}"]
    for name, r in result.items():
        lines.append(f"{name:8}{r['glibc_faults_per_step']:13.0f}{r['glibc_cpu_ms']:10.1f}"
                     f"{r['reuse_faults_per_step']:13.0f}{r['reuse_cpu_ms']:10.1f}{r['gain']:6.2f}x")
    return "\n".join(lines)


def bench_scaling(repeat, torch=None, base=SCALING_BASE, Ts=SCALING_T, batches=SCALING_BATCH) -> dict:
    """Forward+backward time against T (batch fixed) and against batch (T fixed)."""
    spec = SIZES[base]
    rows = {"T": [], "batch": []}
    cases = [("T", dict(T=T, B=spec["batch"])) for T in Ts]
    cases += [("batch", dict(T=spec["block_size"], B=B)) for B in batches]
    for axis, shape in cases:
        model, idx, targets = lm_batch(spec, **shape)
        fns = {"numpy": lambda: (model(idx, targets), model.backward())}
        if torch is not None:
            tmodel = TorchGPT(torch, model)
            tidx, ttargets = torch.tensor(idx), torch.tensor(targets)
            fns["torch"] = lambda: tmodel.fwd_bwd(tidx, ttargets)
        runs = rested(fns, repeat, min_sample=MIN_SAMPLE_S)
        times = column(runs)
        row = {"T": shape["T"], "batch": shape["B"], "numpy_ms": median_ms(times["numpy"]),
               "others_cpu": others_cores(runs)}
        row["numpy_us_per_token"] = row["numpy_ms"] * 1e3 / (shape["T"] * shape["B"])
        if torch is not None:
            row["torch_ms"] = median_ms(times["torch"])
            row["ratio"] = paired_ratio(times["numpy"], times["torch"])
        rows[axis].append(row)
    return {"base": base, **rows}


def bench_feature_cache(name, repeat, spec=None) -> dict:
    """Head-only training three ways, on a sequence classifier (mean pooling, 4 classes).

    full    every weight trains: forward, backward, AdamW over everything
    masks   backbone frozen through model.masks: the full forward still runs every step,
            backward stops below the head
    cache   backbone frozen and run once (model.backbone, keep_cache=False); each step is
            forward_head on the cached features, backward, AdamW (as train.py does)
    bitfit  only biases (and the head) train: masks.bias_only
    sparse  a per-element mask on every weight keeping a random SPARSE_KEEP of its entries
            (the shape of a Fisher top-k mask, FISH, and like it set by masks.set_mask,
            so read-only), the head fully trainable

    A bitfit or sparse step must cost at most a full one (issue 15): their backward is the
    full one, and their optimizer works on fewer entries. That difference is a few per
    cent of a step, so the ratios are paired (`paired_ratio`: the steps of one round ran
    next to each other) and the AdamW step is also timed alone, full against bitfit
    against sparse, on one backward's gradients (`*_adamw_ms`).
    """
    from transferlab import masks as M
    spec = spec or SIZES[name]
    cfg = GPTConfig(vocab_size=spec["vocab_size"], block_size=spec["block_size"],
                    n_layer=spec["n_layer"], n_head=spec["n_head"], n_embd=spec["n_embd"],
                    head="sequence", pooling="mean", n_classes=N_CLASSES, dtype="float32")
    rng = np.random.default_rng(1)
    idx = rng.integers(0, cfg.vocab_size, (spec["batch"], cfg.block_size))
    y = rng.integers(0, N_CLASSES, spec["batch"])
    models = {how: GPT(cfg, seed=0) for how in ("full", "masks", "cache", "bitfit", "sparse")}
    for how in ("masks", "cache"):  # everything but the head frozen, as a user freezes it
        M.freeze_backbone(models[how])
    M.bias_only(models["bitfit"])
    keep = np.random.default_rng(2)
    for n, p in models["sparse"].params.items():  # set_mask: read-only, as fisher_mask's are
        if not M.is_head(n) and p.ndim >= 2:
            M.set_mask(models["sparse"], n, keep.random(p.shape) < SPARSE_KEEP)
    opts = {how: make_adamw(m.params, masks=m.masks) for how, m in models.items()}

    # filling the cache: one backbone pass per batch, paid once for all epochs
    extract = interleaved({"extract": lambda: models["cache"].backbone(idx, None, keep_cache=False)},
                          repeat)
    features = models["cache"].backbone(idx, None, keep_cache=False)  # (B, T, C)
    # the cached path must give the numbers of the uncached one (DESIGN.md: feature cache)
    loss_masks = models["masks"](idx, y)[1]
    loss_cache = models["cache"].forward_head(features, y, idx=idx)[1]

    def step(how):
        m, opt = models[how], opts[how]
        if how == "cache":
            m.forward_head(features, y, idx=idx)
        else:
            m(idx, y)
        opt.step(m.backward())

    step_runs = rested({how: functools.partial(step, how) for how in models}, repeat,
                       min_sample=MIN_SAMPLE_S)
    times = column(step_runs)
    res = {f"{how}_ms": median_ms(ts) for how, ts in times.items()}
    # the optimizer alone: where a sparse or BitFit step differs from a full one
    grads = {}
    for how in ("full", "bitfit", "sparse"):
        models[how](idx, y)
        grads[how] = models[how].backward()
    adamw_runs = rested({how: functools.partial(opts[how].step, g) for how, g in grads.items()},
                        repeat, min_sample=MIN_SAMPLE_S)
    adamw = column(adamw_runs)
    res.update({f"{how}_adamw_ms": median_ms(ts) for how, ts in adamw.items()})
    res.update(
        extract_ms=median_ms(extract["extract"]),
        others_cpu=others_cores(step_runs, adamw_runs),
        loss_abs_diff=abs(loss_masks - loss_cache),
        speedup_cache_vs_full=paired_ratio(times["full"], times["cache"]),
        speedup_masks_vs_full=paired_ratio(times["full"], times["masks"]),
        speedup_cache_vs_masks=paired_ratio(times["masks"], times["cache"]),
        bitfit_vs_full=paired_ratio(times["bitfit"], times["full"]),
        sparse_vs_full=paired_ratio(times["sparse"], times["full"]),
        sparse_adamw_vs_full=paired_ratio(adamw["sparse"], adamw["full"]),
    )
    return res


# ----------------------------------------------------------------------------------------
# --profile: where the time goes


def timed_table(table, totals: dict, clock=time.perf_counter):
    """A copy of a KernelTable whose every function adds its time (by `clock`) and calls to
    `totals`."""
    from transferlab.kernels import KernelTable

    def timed(fname, fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            t0 = clock()
            result = fn(*args, **kwargs)
            entry = totals.setdefault(fname, [0.0, 0])
            entry[0] += clock() - t0
            entry[1] += 1
            return result
        return wrapper

    return KernelTable(f"timed {table.name}", **{n: timed(n, f) for n, f in table.functions().items()})


def profile_numpy(name, steps=5, spec=None, kernels=None) -> dict:
    """ms per forward+backward spent in each kernel, by running the model on a copy of its
    kernel table whose functions carry timers (nothing is rebound: the model's table is
    swapped for the timed one)."""
    spec = spec or SIZES[name]
    model, idx, targets = lm_batch(spec)
    totals: dict[str, list] = {}
    model.kernels = timed_table(kernels or model.kernels, totals)
    for _ in range(WARMUP):
        model(idx, targets)
        model.backward()
    totals.clear()
    t0 = time.perf_counter()
    for _ in range(steps):
        model(idx, targets)
        model.backward()
    step_ms = (time.perf_counter() - t0) * 1e3 / steps
    kernels = {n: {"ms": t * 1e3 / steps, "calls": c // steps}
               for n, (t, c) in sorted(totals.items(), key=lambda kv: -kv[1][0])}
    other = step_ms - sum(k["ms"] for k in kernels.values())
    kernels["other (head, loss, residual adds, Python)"] = {"ms": other, "calls": 0}
    return {"step_ms": step_ms, "kernels": kernels}


def profile_torch(torch, name, steps=5, top=16, spec=None) -> dict:
    """ms per forward+backward by PyTorch operator (self CPU time, torch.profiler): the
    `top` largest, and the rest summed as one line."""
    from torch.profiler import ProfilerActivity, profile

    spec = spec or SIZES[name]
    model, idx, targets = lm_batch(spec)
    tmodel = TorchGPT(torch, model)
    tidx, ttargets = torch.tensor(idx), torch.tensor(targets)
    for _ in range(WARMUP):
        tmodel.fwd_bwd(tidx, ttargets)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            tmodel.fwd_bwd(tidx, ttargets)
    events = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    total = sum(e.self_cpu_time_total for e in events) / 1e3 / steps
    ops = {e.key: {"ms": e.self_cpu_time_total / 1e3 / steps, "calls": e.count // steps}
           for e in events[:top]}
    ops["(the other operators)"] = {"ms": total - sum(op["ms"] for op in ops.values()),
                                    "calls": sum(e.count for e in events[top:]) // steps}
    return {"step_ms": total, "ops": ops}


# ----------------------------------------------------------------------------------------
# --kernels: each fast form against the forms it builds on, one layer, one thread


def kernel_gains(sizes, repeat=7, rest=0.05, torch=None) -> dict:
    """CPU ms (best of `repeat`, one thread) of one layer's forward+backward on each size's
    shapes: the plain form (layers.py), the in-place form (kernels.*_fast), the table's
    form (chunked GELU and LayerNorm, tiled attention) and, with torch, the same layer in
    PyTorch (`torch_layers`); the forms of one layer are timed in alternating rounds
    (`rested`), and "vs_torch" is the median of the rounds' table / torch ratios.
    Also the block's four linear layers (one form, in both tables), the LM loss
    (cross-entropy and its gradient on the (B*T, V) logits) and the tied embedding's
    backward (its rows added into the LM head's gradient of wte), which have no in-place
    form (None). `step_against_layers` then puts the layers back into a step."""
    set_threads(1, torch)
    result = {}
    for name in sizes:
        inputs = layer_inputs(SIZES[name])
        forms = numpy_layers(inputs)
        theirs = torch_layers(torch, inputs) if torch is not None else {}
        result[name] = {}
        for layer, (plain, inplace, table) in forms.items():
            fns = {"plain_ms": None if plain is table else plain, "inplace_ms": inplace,
                   "table_ms": table, "torch_ms": theirs.get(layer)}
            runs = rested({k: fn for k, fn in fns.items() if fn is not None}, repeat, warmup=1, rest=rest)
            times = {k: [t * 1e3 for t in ts] for k, ts in column(runs, "cpu").items()}  # CPU ms by round
            r = result[name][layer] = {k: min(times[k]) if k in times else None for k in fns}
            if plain is table:  # one form (linear): timed once, the same in both tables
                r["plain_ms"] = r["table_ms"]
            r["rounds_ms"] = times
            if theirs:  # the median of the rounds' ratios: the two calls of a round ran side by side
                r["vs_torch"] = paired_ratio(times["table_ms"], times["torch_ms"])
    return result


# how often one forward+backward runs each layer of numpy_layers, for n_layer blocks: per
# block the four linear layers, GELU, attention and two LayerNorms; then the final LayerNorm,
# the LM loss and the embedding's backward
def step_counts(n_layer: int) -> dict:
    return {"linear": n_layer, "gelu": n_layer, "attention": n_layer, "layernorm": 2 * n_layer + 1,
            "cross_entropy": 1, "embedding": 1}


# the kernel-table functions (KernelTable) each layer of numpy_layers stands for
STEP_KERNELS = {"linear": ("linear_forward", "linear_backward"), "gelu": ("gelu_forward", "gelu_backward"),
                "attention": ("attention_forward", "attention_backward"),
                "layernorm": ("layernorm_forward", "layernorm_backward"),
                "cross_entropy": ("cross_entropy",), "embedding": ("embedding_backward",)}


def step_against_layers(name, rounds, torch=None, rest=None) -> dict:
    """One forward+backward of the whole model against the same layers run alone, each
    side, one thread, CPU time, paired by round (`rounds`; gpt2: at most GPT2_REPEAT).

    "alone" runs each layer of `numpy_layers` (the fast table's form) or `torch_layers`
    as often as a step does (`step_counts`), back to back on `layer_inputs`' arrays. In a
    round: the NumPy step (its kernels timed inside it by `timed_table`), its layers
    alone, PyTorch's step, its layers alone, each after a rest. step/alone above 1 is what
    a step adds to its layers: the work between them (the LM head's product, the residual
    adds, Python) and whatever running them inside a step costs over running them alone
    (in_step_vs_alone; our reading: their arrays come from other layers, not from the
    cache the same call warmed a moment before)."""
    set_threads(1, torch)
    spec = SIZES[name]
    if name == "gpt2":
        rounds = min(rounds, GPT2_REPEAT)
    rest = REST_S if rest is None else rest
    model, idx, targets = lm_batch(spec)
    totals: dict[str, list] = {}
    # the kernels inside the step on the step's own clock, CPU time: their times then add up
    # to at most the step's, also on a busy machine (wall time inside a CPU-timed step did not)
    model.kernels = timed_table(model.kernels, totals, clock=time.process_time)
    inputs = layer_inputs(spec)
    counts = step_counts(spec["n_layer"])

    def numpy_step():
        model(idx, targets)
        model.backward()

    sides = {"numpy": (numpy_step, {layer: forms[2] for layer, forms in numpy_layers(inputs).items()})}
    if torch is not None:
        tmodel, tidx, ttargets = TorchGPT(torch, model), torch.tensor(idx), torch.tensor(targets)
        sides["torch"] = (lambda: tmodel.fwd_bwd(tidx, ttargets), torch_layers(torch, inputs))

    def alone(layers):  # layer -> CPU s of its calls in one step's worth, back to back
        out = {}
        for layer, n in counts.items():
            t0 = cpu_seconds()
            for _ in range(n):
                layers[layer]()
            out[layer] = cpu_seconds() - t0
        return out

    for step, layers in sides.values():  # warm-up
        step()
        alone(layers)
    rows = []
    for _ in range(rounds):
        row = {}
        for side, (step, layers) in sides.items():
            time.sleep(rest)
            totals.clear()
            t0 = cpu_seconds()
            step()
            row[f"{side}_step"] = cpu_seconds() - t0
            if side == "numpy":  # CPU time inside the step's kernel calls
                row["in_step"] = {layer: sum(totals[f][0] for f in fns if f in totals)
                                  for layer, fns in STEP_KERNELS.items()}
            time.sleep(rest)
            row[f"{side}_alone"] = alone(layers)
        rows.append(row)

    def median(f):  # over the rounds; a ratio of two values of one round is a paired ratio
        return statistics.median(f(r) for r in rows)

    alone_s = lambda r, side: sum(r[f"{side}_alone"].values())  # noqa: E731
    out = {"rounds": rounds}
    for side in sides:
        out[side] = {"step_ms": 1e3 * median(lambda r: r[f"{side}_step"]),
                     "alone_ms": 1e3 * median(lambda r: alone_s(r, side)),
                     "step_vs_alone": median(lambda r: r[f"{side}_step"] / alone_s(r, side))}
    out["numpy"]["in_step_vs_alone"] = {layer: median(lambda r: r["in_step"][layer] / r["numpy_alone"][layer])
                                        for layer in counts}
    out["numpy"]["between_kernels_ms"] = 1e3 * median(lambda r: r["numpy_step"] - sum(r["in_step"].values()))
    if "torch" in sides:
        out["step_vs_torch"] = median(lambda r: r["numpy_step"] / r["torch_step"])
        out["alone_vs_torch"] = median(lambda r: alone_s(r, "numpy") / alone_s(r, "torch"))
    return out


def format_step_against_layers(result: dict) -> str:
    lines = ["a step against its layers run alone (as often as a step runs them, back to back), "
             "one thread, CPU ms, medians; ratios: the median of the rounds' ratios",
             f"{'size':7} {'np step':>9} {'np alone':>9} {'step/alone':>10} | {'tch step':>9} "
             f"{'tch alone':>9} {'step/alone':>10} | {'step np/tch':>11} {'alone np/tch':>12}"]
    for name, r in result.items():
        n, t = r["numpy"], r.get("torch")
        theirs = (f"{t['step_ms']:9.1f} {t['alone_ms']:9.1f} {t['step_vs_alone']:10.2f} | "
                  f"{r['step_vs_torch']:11.2f} {r['alone_vs_torch']:12.2f}") if t else \
            f"{'-':>9} {'-':>9} {'-':>10} | {'-':>11} {'-':>12}"
        ours = f"{n['step_ms']:9.1f} {n['alone_ms']:9.1f} {n['step_vs_alone']:10.2f}"
        lines.append(f"{name:7} {ours} | {theirs}")
    lines.append("NumPy, each kernel inside the step / the same kernel alone; and the step's time "
                 "between its kernels (the LM head's product, residual adds, Python):")
    for name, r in result.items():
        n = r["numpy"]
        each = "  ".join(f"{layer} {x:.2f}" for layer, x in n["in_step_vs_alone"].items())
        lines.append(f"{name:7} {each}  | between {n['between_kernels_ms']:.1f} ms")
    return "\n".join(lines)


def layer_inputs(spec, seed=0) -> dict:
    """Random inputs for one layer of each kind at a size's shapes (float32): the four
    linear layers' x, w, b and upstream gradient, GELU's (B, T, 4C) input, LayerNorm's
    (B, T, C) input and weights, attention's qkv and dy, the LM loss's logits and targets,
    the embedding's token ids and the tied head's gradient it adds into."""
    B, T, C, NH, V = (spec[k] for k in ("batch", "block_size", "n_embd", "n_head", "vocab_size"))
    rng = np.random.default_rng(seed)
    normal = lambda *shape: rng.standard_normal(shape, dtype=np.float32)  # noqa: E731
    shapes = [(C, 3 * C), (C, C), (C, 4 * C), (4 * C, C)]  # [in, out]: c_attn, attn.c_proj, c_fc, mlp.c_proj
    return {"n_head": NH, "vocab_size": V,
            "linear": [(normal(B, T, i), normal(i, o) * 0.02, np.zeros(o, np.float32), normal(B, T, o))
                       for i, o in shapes],
            "x4": normal(B, T, 4 * C), "x": normal(B, T, C),
            "w": np.ones(C, np.float32), "b": np.zeros(C, np.float32),
            "qkv": normal(B, T, 3 * C), "dy": normal(B, T, C),
            "logits": normal(B * T, V), "targets": rng.integers(0, V, B * T),
            "idx": rng.integers(0, V, (B, T)), "head_dwte": np.zeros((V, C), np.float32)}


def numpy_layers(inp) -> dict:
    """layer -> [plain, in-place or None, the fast table's form]: callables running one
    forward+backward on `layer_inputs`' arrays, each returning its gradients (the linear
    layers: their dx; the embedding: (dwte, dwpe), dwte being the head's gradient added to)."""
    from transferlab import kernels as K
    from transferlab import layers as L
    from transferlab import losses

    def fwd_bwd(forward, backward, dout, *args):
        def run():
            out, cache = forward(*args)
            return backward(out if dout is None else dout, cache)
        return run

    def linears():
        return [L.linear_backward(d, L.linear_forward(x, w, b)[1])[0] for x, w, b, d in inp["linear"]]

    x4, x, w, b, qkv, dy = (inp[k] for k in ("x4", "x", "w", "b", "qkv", "dy"))
    NH, T, C = inp["n_head"], x.shape[1], x.shape[2]
    allowed = L.attention_mask(T, True)
    emb_cache = (inp["idx"], (inp["vocab_size"], C), (T, C))
    logits, targets, head = inp["logits"], inp["targets"], inp["head_dwte"]
    return {
        "linear": [linears, None, linears],
        "gelu": [fwd_bwd(L.gelu_forward, L.gelu_backward, None, x4),
                 fwd_bwd(K.gelu_forward_fast, K.gelu_backward_fast, None, x4),
                 fwd_bwd(K.gelu_forward_chunked, K.gelu_backward_chunked, None, x4)],
        "layernorm": [fwd_bwd(L.layernorm_forward, L.layernorm_backward, None, x, w, b),
                      fwd_bwd(K.layernorm_forward_fast, K.layernorm_backward_fast, None, x, w, b),
                      fwd_bwd(K.layernorm_forward_chunked, K.layernorm_backward_chunked, None, x, w, b)],
        "attention": [fwd_bwd(L.attention_forward, L.attention_backward, dy, qkv, NH, allowed),
                      fwd_bwd(K.attention_forward_fast, K.attention_backward_fast, dy, qkv, NH, allowed),
                      fwd_bwd(K.attention_forward_tiled, K.attention_backward_tiled, dy, qkv, NH, allowed)],
        "cross_entropy": [lambda: losses.cross_entropy(logits, targets), None,
                          lambda: K.cross_entropy_chunked(logits, targets)],
        "embedding": [lambda: L.embedding_backward(dy, emb_cache, head), None,
                      lambda: K.embedding_backward_rows(dy, emb_cache, head)],
    }


def torch_layers(torch, inp) -> dict:
    """layer -> a callable running that layer's forward+backward in PyTorch on the arrays
    of `layer_inputs`, as TorchGPT runs it (autograd, the backward fed the same upstream
    gradient as numpy_layers'): addmm, tanh GELU, F.layer_norm, causal
    scaled_dot_product_attention, F.cross_entropy, and the embedding's backward (aten's
    embedding_dense_backward added into the head's gradient, and the positions' sum).
    Each returns the gradients numpy_layers' forms return, as tensors."""
    F, t = torch.nn.functional, torch.from_numpy
    leaf = lambda a: t(a).requires_grad_(True)  # noqa: E731
    x4, x, w, b, qkv, dy = (inp[k] for k in ("x4", "x", "w", "b", "qkv", "dy"))
    NH, V, (B, T, C) = inp["n_head"], inp["vocab_size"], x.shape

    def linears():
        dxs = []
        for xi, wi, bi, di in inp["linear"]:
            xl = leaf(xi)
            y = torch.addmm(leaf(bi), xl.view(-1, xi.shape[-1]), leaf(wi))
            y.backward(t(di).view(y.shape))
            dxs.append(xl.grad)
        return dxs

    def gelu():  # fed its own output as the upstream gradient, as numpy_layers' GELU is
        xl = leaf(x4)
        y = F.gelu(xl, approximate="tanh")
        y.backward(y.detach())
        return xl.grad

    def attention():
        ql = leaf(qkv)
        q, k, v = (a.view(B, T, NH, C // NH).transpose(1, 2) for a in ql.split(C, dim=2))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, C)
        y.backward(t(dy))
        return ql.grad

    def cross_entropy():
        ll = leaf(inp["logits"])
        loss = F.cross_entropy(ll, t(inp["targets"]))
        loss.backward()
        return loss, ll.grad

    head, idx, dy_t = torch.zeros((V, C)), t(inp["idx"]), t(dy)

    def embedding():
        head.add_(torch.ops.aten.embedding_dense_backward(dy_t, idx, V, -1, False))
        return head, dy_t.sum(0)

    def layernorm():  # the weight and bias are leaves too: their gradients are part of the work
        xl = leaf(x)
        y = F.layer_norm(xl, (C,), leaf(w), leaf(b), 1e-5)
        y.backward(y.detach())
        return xl.grad

    return {"linear": linears,
            "gelu": gelu, "layernorm": layernorm,
            "attention": attention, "cross_entropy": cross_entropy, "embedding": embedding}


def format_kernel_gains(result) -> str:
    with_torch = any(r.get("torch_ms") for layers in result.values() for r in layers.values())
    torch_head = f" {'torch':>8} {'vs torch':>9}" if with_torch else ""
    lines = ["one layer's forward+backward, CPU ms, one thread (best of repeats): plain "
             "(layers.py), in-place (kernels.*_fast), the fast table's form (chunked / tiled)"
             + (", and PyTorch's (vs torch: the median of the rounds' table / torch ratios, lower "
                "is faster for NumPy)" if with_torch else ""),
             f"{'size':7} {'layer':13} {'plain':>8} {'in-place':>9} {'table':>8} "
             f"{'vs in-place':>11} {'vs plain':>9}" + torch_head]
    for name, layers in result.items():
        for layer, r in layers.items():
            inplace = r["inplace_ms"]
            theirs = (f" {_fmt(r.get('torch_ms'))} {_fmt(r.get('vs_torch'), '9.2f')}"
                      if with_torch else "")
            lines.append(f"{name:7} {layer:13} {r['plain_ms']:8.2f} "
                         + (f"{'-':>9} {r['table_ms']:8.2f} {'-':>11} " if inplace is None else
                            f"{inplace:9.2f} {r['table_ms']:8.2f} {inplace / r['table_ms']:10.2f}x ")
                         + f"{r['plain_ms'] / r['table_ms']:8.2f}x" + theirs)
    lines.append("linear: the block's four (c_attn, attn.c_proj, c_fc, mlp.c_proj), one form in "
                 "both tables; cross_entropy: the LM loss and its gradient on (B*T, V) logits "
                 "(losses.cross_entropy, kernels.cross_entropy_chunked); embedding: its backward "
                 "into the tied LM head's gradient (layers.embedding_backward, "
                 "kernels.embedding_backward_rows)")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------
# --optimizer: the optimizer step alone


def bench_optimizer(name, repeat, torch=None, threads=1) -> dict:
    """The AdamW step and the gradient norm alone, on one backward's gradients, median wall
    ms, rested and alternated: the update rule called once per whole parameter (the step
    before it ran in chunks), AdamW in chunks on 1 and on `threads` threads, PyTorch's
    AdamW; clip_grad_norm against torch.nn.utils.clip_grad_norm_ (max_norm large: the
    norm is computed, nothing is scaled)."""
    from transferlab.optim import adamw_update, clip_grad_norm

    spec = SIZES[name]
    if name == "gpt2":
        repeat = min(repeat, GPT2_REPEAT)
    model, idx, targets = lm_batch(spec)
    model(idx, targets)
    grads = model.backward()
    params = model.params
    state = {n: (np.zeros_like(p), np.zeros_like(p)) for n, p in params.items()}
    steps = [0]
    ref = make_adamw(params)  # the settings and decay rule the chunked contenders use

    def whole_arrays():  # what AdamW.step did before chunks: one call per parameter
        steps[0] += 1
        for n, p in params.items():
            adamw_update(p, grads[n], *state[n], steps[0], lr=ref.lr, betas=ref.betas,
                         eps=ref.eps, weight_decay=ref.weight_decay if ref.decay_rule(n, p) else 0.0)

    fns = {"whole": whole_arrays}
    for t in sorted({1, threads}):
        opt = make_adamw(params)
        opt.threads = t
        fns[f"chunks/{t}"] = functools.partial(opt.step, grads)
    fns["clip"] = lambda: clip_grad_norm(grads, 1e30)
    if torch is not None:
        tmodel = TorchGPT(torch, model)
        tmodel.fwd_bwd(torch.tensor(idx), torch.tensor(targets))
        topt = tmodel.adamw()
        fns["torch"] = topt.step
        fns["torch_clip"] = lambda: torch.nn.utils.clip_grad_norm_(tmodel.parameters(), 1e30)
    runs = rested(fns, repeat, 1)
    out = {"entries": int(sum(p.size for p in params.values())), "repeat": repeat,
           **{f"{k}_ms": median_ms([r["wall"] for r in rs]) for k, rs in runs.items()}}
    if torch is not None:
        out["chunks_vs_torch"] = out[f"chunks/{threads}_ms"] / out["torch_ms"]
        out["clip_vs_torch"] = out["clip_ms"] / out["torch_clip_ms"]
    return out


def format_optimizer(result) -> str:
    t = result["threads"]["numpy_blas"]
    lines = [f"the AdamW step and the gradient norm alone, on one backward's gradients, median "
             f"wall ms ({t} threads): the update rule on whole arrays (the step before "
             f"chunks), AdamW in chunks on 1 and {t} threads, PyTorch's AdamW",
             f"{'size':7} {'entries':>11} {'whole':>9} {'chunks/1':>9} {f'chunks/{t}':>9} "
             f"{'torch':>9} {'vs torch':>8} | {'clip':>8} {'torch':>8} {'vs torch':>8}"]
    for name, r in result["sizes"].items():
        tch = (f"{r['torch_ms']:9.1f} {r['chunks_vs_torch']:8.2f}" if "torch_ms" in r
               else f"{'-':>9} {'-':>8}")
        tclip = (f"{r['torch_clip_ms']:8.1f} {r['clip_vs_torch']:8.2f}" if "torch_clip_ms" in r
                 else f"{'-':>8} {'-':>8}")
        lines.append(f"{name:7} {r['entries']:11d} {r['whole_ms']:9.1f} {r['chunks/1_ms']:9.1f} "
                     f"{r[f'chunks/{t}_ms']:9.1f} {tch} | {r['clip_ms']:8.1f} {tclip}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------
# --compare-layers REV: the kernels of an older revision against the working tree


def bench_generate(name, repeat, torch=None, prompt_len=16, new_tokens=32) -> dict:
    """KV-cached greedy generation, tokens per second: GPT.generate (generate.py) against
    Hugging Face's GPT2LMHeadModel.generate(do_sample=False) on the same weights, rested
    and alternated like every other timing here. Also says whether both produced the same
    tokens (the weights are drawn wide, std 0.3, so near-ties in the logits are rare)."""
    spec = SIZES[name]
    cfg = GPTConfig(vocab_size=spec["vocab_size"], block_size=spec["block_size"], n_layer=spec["n_layer"],
                    n_head=spec["n_head"], n_embd=spec["n_embd"], init_std=0.3)
    model = GPT(cfg, seed=0).eval()
    new_tokens = min(new_tokens, cfg.block_size - prompt_len)  # the context bounds prompt + new
    idx = np.random.default_rng(0).integers(0, cfg.vocab_size, (1, prompt_len))
    fns = {"numpy": lambda: model.generate(idx, new_tokens, temperature=0.0)}
    out = {"prompt_tokens": prompt_len, "new_tokens": new_tokens}
    if torch is not None:
        import transformers

        from transferlab.hf import hf_config, hf_state_dict

        hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(**hf_config(model))).eval()
        hf.load_state_dict({k: torch.tensor(v) for k, v in hf_state_dict(model).items()}, strict=False)
        tidx, ones = torch.tensor(idx), torch.ones(idx.shape, dtype=torch.long)

        def hf_generate():
            with torch.no_grad():
                return hf.generate(tidx, attention_mask=ones, do_sample=False, max_new_tokens=new_tokens,
                                   min_new_tokens=new_tokens, pad_token_id=0)

        out["same_tokens"] = bool(np.array_equal(fns["numpy"](), hf_generate().numpy()))
        fns["torch"] = hf_generate
    runs = rested(fns, repeat, warmup=1)
    for side, records in runs.items():
        wall = statistics.median(r["wall"] for r in records)
        out[f"{side}_tokens_per_s"] = new_tokens / wall
        out[f"{side}_cpu_use"] = statistics.median(r["cpu"] / r["wall"] for r in records)
    if torch is not None:
        out["speed_ratio"] = out["numpy_tokens_per_s"] / out["torch_tokens_per_s"]  # > 1: NumPy faster
    return out


def layers_from_git(rev: str):
    """src/transferlab/layers.py as it was at git revision `rev`, loaded as a module."""
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run(["git", "-C", str(root), "show", f"{rev}:src/transferlab/layers.py"],
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"bench.py: cannot read layers.py at revision {rev!r}: {done.stderr.strip()}")
    module = types.ModuleType(f"layers@{rev}")
    exec(compile(done.stdout, f"layers.py@{rev}", "exec"), module.__dict__)
    return module


def kernels_from_module(module, rev: str):
    """A KernelTable of `module`'s layer functions (an older layers.py, whose fast forms
    carried the plain names), falling back to the current fast form for any it lacks or
    whose older form lacks a parameter the model now passes (embedding_backward's
    head_dwte)."""
    from transferlab.kernels import FAST, PLAIN, KernelTable

    def usable(name):
        old = getattr(module, name, None)
        if old is None:
            return False
        wanted = inspect.signature(getattr(PLAIN, name)).parameters
        return set(wanted) <= set(inspect.signature(old).parameters)

    names = FAST.functions()
    return KernelTable(f"layers.py@{rev}",
                       **{n: getattr(module, n) if usable(n) else fn for n, fn in names.items()})


def compare_layers(rev, sizes, repeat, rounds=3) -> dict:
    """Forward+backward with the layers of `rev` ("before") and of the working tree
    ("after"), interleaved; then ms per kernel inside the step, the fastest of `rounds`
    alternating profile rounds. Each side runs through its own kernel table."""
    before = kernels_from_module(layers_from_git(rev), rev)
    result = {}
    for name in sizes:
        model, idx, targets = lm_batch(SIZES[name])
        after = model.kernels

        def step(table):
            model.kernels = table
            model(idx, targets)
            model.backward()

        times = interleaved({"before": lambda: step(before), "after": lambda: step(after)}, repeat)
        model.kernels = after
        kernels = {"before": {}, "after": {}}
        for _ in range(rounds):
            for tag, table in (("before", before), ("after", after)):
                prof = profile_numpy(name, kernels=table)
                for k, v in prof["kernels"].items():
                    kernels[tag][k] = min(kernels[tag].get(k, float("inf")), v["ms"])
        result[name] = {"before_ms": median_ms(times["before"]), "after_ms": median_ms(times["after"]),
                        "kernels_before_ms": kernels["before"], "kernels_after_ms": kernels["after"]}
    return result


def format_comparison(rev, result) -> str:
    lines = [f"layers.py at {rev} (before) against the working tree (after), ms per fwd+bwd"]
    for name, r in result.items():
        lines.append(f"{name}: step {r['before_ms']:.2f} -> {r['after_ms']:.2f} "
                     f"({r['before_ms'] / r['after_ms']:.2f}x, interleaved medians)")
        for k, before in r["kernels_before_ms"].items():
            after = r["kernels_after_ms"].get(k, float("nan"))
            if before >= 0.05 and not k.startswith("other"):
                lines.append(f"  {k:22} {before:9.2f} -> {after:9.2f}  ({before / after:.2f}x)")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------
# report


def load_average() -> list | None:
    """1-, 5- and 15-minute load averages: how busy the shared machine was."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def machine_info(threads, peak, torch) -> dict:
    return {
        "python": platform.python_version(),
        "numpy": np.__version__,
        "blas": _blas_name(),
        "torch": None if torch is None else torch.__version__,
        "cpu": _cpu_name(),
        "threads": threads,
        "matmul_peak_gflops": peak,
    }


def _blas_name() -> str:
    try:
        blas = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
        return f"{blas.get('name')} {blas.get('version')}"
    except Exception:  # the config layout is not a stable API
        return "unknown"


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def quiet_verdict(load_before, others, busy=()) -> tuple[bool, str]:
    """Was the machine quiet? The 1-minute load before the run, and the cores other
    processes used during our timed calls (load averages include our own threads, so the
    load after a run says little; /proc/stat minus our CPU time says who else ran).
    `busy` names the rows where others went over the limit, so the reason says which rows
    a reader must not quote (the others were timed on a quiet machine)."""
    reasons = []
    if load_before and load_before[0] > QUIET_LOAD:
        reasons.append(f"1-min load {load_before[0]} > {QUIET_LOAD} before the run")
    if others is not None and others > QUIET_OTHERS:
        where = f" in {', '.join(busy)}" if busy else ""
        reasons.append(f"other processes used {others:.2f} cores during the timed calls "
                       f"(> {QUIET_OTHERS}){where}")
    return (not reasons), "; ".join(reasons) or "quiet"


def others_by_row(sizes: dict) -> dict:
    """'size step' (and 'size step batch/N', 'size step procs/N') -> cores other processes
    used in that row."""
    rows = {}
    for name, r in sizes.items():
        for key, label in (("fwd_bwd", "fwd+bwd"), ("train_step", "train step")):
            for field, suffix in (("numpy_others_cpu", ""),
                                  *((f"numpy_{parts}_others_cpu", f" {label}/N")
                                    for parts, label in PARTS.items())):
                if r[key].get(field) is not None:
                    rows[f"{name} {label}{suffix}"] = r[key][field]
    return rows


def others_in_every_row(result: dict) -> dict:
    """others_by_row, and the rows of the scaling and head-only tables, which run last:
    the verdict covers every table the report prints."""
    rows = others_by_row(result["sizes"])
    for axis in ("T", "batch"):
        for row in (result.get("scaling") or {}).get(axis, []):
            rows[f"scaling {axis} (T {row['T']}, batch {row['batch']})"] = row.get("others_cpu")
    for name, r in (result.get("feature_cache") or {}).items():
        rows[f"head-only {name}"] = r.get("others_cpu")
    return {row: x for row, x in rows.items() if x is not None}


def _busy(x) -> str:
    """The report's mark after a row whose others went over the limit."""
    return "  <- busy" if x is not None and x > QUIET_OTHERS else ""


def _fmt(x, spec="8.2f", missing="-"):
    return format(x, spec) if x is not None else format(missing, ">" + spec.split(".")[0])


def format_report(result) -> str:
    m = result["machine"]
    th = m["threads"]
    load = m["load_average_before_after"]
    q = result["quiet"]
    lines = [
        f"numpy {m['numpy']} ({m['blas']}), torch {m['torch'] or 'not installed'}, "
        f"Python {m['python']}, {m['cpu']}",
        f"threads: {th['cores']} cores available; NumPy BLAS {th['numpy_blas']} "
        f"(elementwise ufuncs: 1), torch {th['torch']}; "
        f"load average (1, 5, 15 min) before {load[0]}, after {load[1]}",
        ("machine: quiet" if q["quiet"] else f"MACHINE NOT QUIET: {q['why']} "
         "(these numbers are not the quiet-machine figures)"),
        f"method: {result['repeat']} timed repetitions per contender (gpt2: at most "
        f"{GPT2_REPEAT}), alternating order, a {result['rest_s']} s rest before every timed "
        "sample (OpenBLAS spin-wait), each sample as many calls in a row as fill "
        f"{MIN_SAMPLE_S} s (times per call); medians, and ratios as the median of each "
        "round's ratio",
        f"float32 matmul peak: a {result['peak_n']}^3 np.matmul as one more contender "
        f"(best seen {m['matmul_peak_gflops']:.1f} GFLOP/s; %peak is against it)",
        "",
        f"{th['requested']} thread(s): wall ms | 1 thread: CPU ms | CPU use in cores during "
        "the timed calls: numpy, torch, other processes",
        f"batch/N rows: the same NumPy model with GPT(..., batch_threads=N), the whole step on N "
        "parts of the batch in N threads (BLAS at 1 thread each); procs/N: with "
        "GPT(..., batch_processes=N), the parts in N processes (CPU use: all of them)",
        f"{'size':7} {'step':10} {'numpy ms':>9} {'torch ms':>9} {'np/torch':>8} {'best':>6} | "
        f"{'np cpu':>8} {'tch cpu':>8} {'np/torch':>8} | {'np':>4} {'torch':>5} {'others':>6} | "
        f"{'GFLOP/s':>7} {'%peak':>6}",
    ]
    for name, r in result["sizes"].items():
        for key, label in (("fwd_bwd", "fwd+bwd"), ("train_step", "train step")):
            s = r[key]
            one = s.get("one_thread", {})
            lines.append(
                f"{name:7} {label:10} {s['numpy_ms']:9.1f} {_fmt(s.get('torch_ms'), '9.1f')} "
                f"{_fmt(s.get('ratio'), '8.2f')} {_fmt(s.get('ratio_best'), '6.2f')} | "
                f"{_fmt(one.get('numpy_cpu_ms'), '8.1f')} {_fmt(one.get('torch_cpu_ms'), '8.1f')} "
                f"{_fmt(one.get('ratio_cpu'), '8.2f')} | {s['numpy_cpu_use']:4.2f} "
                f"{_fmt(s.get('torch_cpu_use'), '5.2f')} {_fmt(s.get('numpy_others_cpu'), '6.2f')} | "
                f"{s['numpy_gflops']:7.1f} {100 * s['numpy_peak_fraction']:5.1f}%"
                + _busy(s.get('numpy_others_cpu')))
            for parts, label in PARTS.items():
                if f"numpy_{parts}_ms" not in s:
                    continue
                n = f"numpy_{parts}"
                lines.append(
                    f"{'':7} {f'  {label}/' + str(th['requested']):10} {s[n + '_ms']:9.1f} "
                    f"{'':9} {_fmt(s.get('ratio_' + parts), '8.2f')} "
                    f"{_fmt(s.get('ratio_' + parts + '_best'), '6.2f')} | {'':8} {'':8} {'':8} | "
                    f"{s[n + '_cpu_use']:4.2f} {'':5} "
                    f"{_fmt(s.get(n + '_others_cpu'), '6.2f')} | "
                    f"{s[n + '_gflops']:7.1f} {100 * s[n + '_peak_fraction']:5.1f}%"
                    + _busy(s.get(n + '_others_cpu')))
        if "loss_torch" in r:
            lines.append(f"{'':7} same weights, same batch: loss numpy {r['loss_numpy']:.6f}, "
                         f"torch {r['loss_torch']:.6f}; load (1 min) {r['load_before'][0]} -> "
                         f"{r['load_after'][0]}")
    if result.get("peak_rss"):
        lines += ["", "peak RSS of a training step (fresh process per side, VmHWM; "
                  "weights shared, so counted once on both sides):",
                  f"{'size':7} {'numpy MB':>9} {'torch MB':>9} {'np/torch':>8} "
                  f"{'np setup':>9} {'tch setup':>9} {'batch/N MB':>10} {'np/torch':>8} "
                  f"{'procs/N MB':>10} {'np/torch':>8} {'shared':>7}"]
        for name, r in result["peak_rss"].items():
            lines.append(f"{name:7} {r['numpy_mb']:9.0f} {_fmt(r.get('torch_mb'), '9.0f')} "
                         f"{_fmt(r.get('ratio'), '8.2f')} {r['numpy_before_step_mb']:9.0f} "
                         f"{_fmt(r.get('torch_before_step_mb'), '9.0f')} "
                         f"{_fmt(r.get('numpy_threads_mb'), '10.0f')} {_fmt(r.get('ratio_threads'), '8.2f')} "
                         f"{_fmt(r.get('numpy_procs_mb'), '10.0f')} {_fmt(r.get('ratio_procs'), '8.2f')} "
                         f"{_fmt(r.get('numpy_procs_shared_mb'), '7.0f')}")
        lines.append("setup: RSS before the first step (imports, weights, optimizer state); "
                     "batch/N: the step with GPT(..., batch_threads=N); procs/N: with "
                     "batch_processes=N, every process's peak added up, so the shared block "
                     "(weights and the workers' gradients, MB under shared) counts once per process")
    if "scaling" in result:
        sc = result["scaling"]
        lines += ["", f"scaling, fwd+bwd, base size {sc['base']}:",
                  f"{'T':>5} {'batch':>5} {'numpy ms':>9} {'us/token':>9} {'torch ms':>9} {'np/torch':>8}"]
        for row in sc["T"] + sc["batch"]:
            t = f"{row['torch_ms']:9.2f} {row['ratio']:8.2f}" if "torch_ms" in row else ""
            lines.append(f"{row['T']:5d} {row['batch']:5d} {row['numpy_ms']:9.2f} "
                         f"{row['numpy_us_per_token']:9.2f} {t}{_busy(row.get('others_cpu'))}")
    if result.get("feature_cache"):
        lines += ["", "head-only and masked training, sequence classifier (mean pooling, 4 classes), "
                  "ms/step (forward, backward, AdamW):",
                  f"{'size':7} {'full FT':>9} {'masks':>9} {'cache':>9} {'extract':>9} "
                  f"{'bitfit':>9} {'sparse':>9} {'cache/full':>10} {'cache/masks':>11} "
                  f"{'bitfit/full':>11} {'sparse/full':>11} {'|dloss|':>8}"]
        for name, r in result["feature_cache"].items():
            lines.append(
                f"{name:7} {r['full_ms']:9.2f} {r['masks_ms']:9.2f} {r['cache_ms']:9.3f} "
                f"{r['extract_ms']:9.2f} {r['bitfit_ms']:9.2f} {r['sparse_ms']:9.2f} "
                f"{r['speedup_cache_vs_full']:9.1f}x "
                f"{r['speedup_cache_vs_masks']:10.1f}x {r['bitfit_vs_full']:11.2f} "
                f"{r['sparse_vs_full']:11.2f} {r['loss_abs_diff']:8.1e}{_busy(r.get('others_cpu'))}")
        lines.append("extract: the one backbone pass that fills the cache; cache/full: "
                     "full-FT step time / cached step time (x/y columns: paired ratios); "
                     f"sparse: {SPARSE_KEEP:.0%} of every weight matrix trains")
        lines += ["the AdamW step alone, on one backward's gradients, ms:",
                  f"{'size':7} {'full FT':>9} {'bitfit':>9} {'sparse':>9} {'sparse/full':>11}"]
        for name, r in result["feature_cache"].items():
            lines.append(f"{name:7} {r['full_adamw_ms']:9.2f} {r['bitfit_adamw_ms']:9.2f} "
                         f"{r['sparse_adamw_ms']:9.2f} {r['sparse_adamw_vs_full']:11.2f}")
    if "profile" in result:
        for name, pr in result["profile"].items():
            lines += ["", f"profile {name}, NumPy, ms per fwd+bwd "
                      f"(step {pr['numpy']['step_ms']:.1f} ms, timers around each layer call):"]
            for k, v in pr["numpy"]["kernels"].items():
                lines.append(f"  {k:52} {v['ms']:8.2f}  {v['calls']:3d} calls")
            if "torch" in pr:
                lines.append(f"profile {name}, PyTorch, self CPU ms per fwd+bwd "
                             f"(total {pr['torch']['step_ms']:.1f} ms, torch.profiler):")
                for k, v in pr["torch"]["ops"].items():
                    lines.append(f"  {k[:52]:52} {v['ms']:8.2f}  {v['calls']:3d} calls")
    lines += ["", f"this process's max RSS (whole run incl. torch): {result['max_rss_mb']:.0f} MB"]
    return "\n".join(lines)


def run(sizes=tuple(SIZES), repeat=7, threads=None, scaling=True, feature_cache=True,
        profile=False, use_torch=True, peak_n=1024, profile_steps=5, one_thread=True,
        rss=True) -> dict:
    """Run the benchmark and return the results as a JSON-ready dict (see `main`)."""
    torch = import_torch() if use_torch else None
    threads = threads or available_cores()
    thread_info = set_threads(threads, torch)
    load_before = load_average()
    result = {"sizes": {}, "peak_n": peak_n, "repeat": repeat, "rest_s": REST_S}
    for name in sizes:
        result["sizes"][name] = bench_size(name, repeat, torch, peak_n=peak_n, threads=threads,
                                           one_thread=one_thread)
    if rss:
        result["peak_rss"] = {name: peak_rss(name, threads, torch is not None) for name in sizes}
    if scaling:
        result["scaling"] = bench_scaling(repeat, torch)
    if feature_cache:
        result["feature_cache"] = {name: bench_feature_cache(name, repeat) for name in sizes
                                   if name in FEATURE_CACHE_SIZES}
    if profile:
        result["profile"] = {}
        for name in sizes:
            entry = {"numpy": profile_numpy(name, profile_steps)}
            if torch is not None:
                entry["torch"] = profile_torch(torch, name, profile_steps)
            result["profile"][name] = entry
    peak = add_peak_fractions(result["sizes"])
    result["machine"] = machine_info(thread_info, peak, torch)
    result["machine"]["load_average_before_after"] = [load_before, load_average()]
    others = others_in_every_row(result)
    busy = [row for row, x in others.items() if x > QUIET_OTHERS]
    quiet, why = quiet_verdict(load_before, max(others.values()) if others else None, busy)
    result["quiet"] = {"quiet": quiet, "why": why, "load_limit": QUIET_LOAD,
                       "others_limit": QUIET_OTHERS}
    result["max_rss_mb"] = max_rss_mb()
    return result


def main(argv=None) -> int:
    global REST_S
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--repeat", type=int, default=7,
                        help=f"timed repetitions per contender (default 7; gpt2 at most {GPT2_REPEAT})")
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    parser.add_argument("--threads", type=int, default=None,
                        help="threads for NumPy's BLAS and for torch (default: all available cores)")
    parser.add_argument("--rest", type=float, default=REST_S,
                        help=f"seconds of rest before every timed call (default {REST_S})")
    parser.add_argument("--no-one-thread", dest="one_thread", action="store_false",
                        help="skip the 1-thread CPU-time pass")
    parser.add_argument("--no-rss", dest="rss", action="store_false",
                        help="skip the peak-RSS subprocesses")
    parser.add_argument("--no-scaling", dest="scaling", action="store_false",
                        help="skip the step-time-vs-T and -vs-batch sweep")
    parser.add_argument("--no-feature-cache", dest="feature_cache", action="store_false",
                        help="skip the feature-cache and masked-step comparison")
    parser.add_argument("--no-torch", dest="use_torch", action="store_false",
                        help="time NumPy only, even if torch is installed")
    parser.add_argument("--profile", action="store_true", help="also show where the time goes")
    parser.add_argument("--compare-layers", metavar="REV",
                        help="instead: time layers.py of git revision REV against the working tree")
    parser.add_argument("--kernels", action="store_true",
                        help="instead: each fast kernel against its plain and in-place forms, "
                             "and against PyTorch's; then a step against its layers run alone "
                             "(one thread)")
    parser.add_argument("--optimizer", action="store_true",
                        help="instead: the AdamW step and the gradient norm alone, whole arrays "
                             "against chunks in 1 and N threads, and PyTorch's")
    parser.add_argument("--generate", action="store_true",
                        help="instead: KV-cached generation tokens/s against Hugging Face's generate")
    parser.add_argument("--malloc", action="store_true",
                        help="instead: a step's page faults and CPU time with glibc's allocator "
                             "settings and with reuse_freed_memory's (fresh processes)")
    parser.add_argument("--malloc-child", nargs=2, metavar=("SIZE", "MODE"), help=argparse.SUPPRESS)
    parser.add_argument("--rss-child", nargs=2, metavar=("SIZE", "SIDE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error(f"--repeat must be >= 1, got {args.repeat}")
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    if args.rest < 0:
        parser.error(f"--rest must be >= 0, got {args.rest}")
    REST_S = args.rest
    if args.rss_child:
        print(json.dumps(rss_child(*args.rss_child, args.threads or available_cores())))
        return 0
    if args.malloc_child:
        print(json.dumps(malloc_child(*args.malloc_child, args.repeat)))
        return 0
    if args.malloc or args.kernels:  # one comparison instead of the benchmark
        if args.malloc:
            result, report = malloc_comparison(args.sizes, args.repeat), format_malloc
        else:
            torch = import_torch() if args.use_torch else None
            gains = kernel_gains(args.sizes, args.repeat, torch=torch)
            steps = {n: step_against_layers(n, args.repeat, torch) for n in args.sizes}
            result = {"layers": gains, "steps": steps}

            def report(r):
                return format_kernel_gains(r["layers"]) + "\n\n" + format_step_against_layers(r["steps"])
        print(f"load average (1, 5, 15 min): {load_average()}")
        print(report(result))
        if args.json:
            args.json.write_text(json.dumps(result, indent=2) + "\n")
        return 0
    if args.generate:
        torch = import_torch() if args.use_torch else None
        threads = set_threads(args.threads or available_cores(), torch)
        load = load_average()
        result = {"load_before": load, "threads": threads,
                  "sizes": {n: bench_generate(n, min(args.repeat, GPT2_REPEAT) if n == "gpt2" else args.repeat, torch)
                            for n in args.sizes}}
        print(f"load average (1, 5, 15 min) before: {load}; threads: {threads}")
        for n, r in result["sizes"].items():
            hf = (f"  Hugging Face {r['torch_tokens_per_s']:8.1f} tokens/s  ratio {r['speed_ratio']:.2f}"
                  f"  same tokens: {r['same_tokens']}") if "torch_tokens_per_s" in r else ""
            print(f"{n:<7} generate {r['new_tokens']} after {r['prompt_tokens']}: "
                  f"NumPy {r['numpy_tokens_per_s']:8.1f} tokens/s{hf}")
        if args.json:
            args.json.write_text(json.dumps(result, indent=2) + "\n")
        return 0
    if args.optimizer:
        torch = import_torch() if args.use_torch else None
        threads = set_threads(args.threads or available_cores(), torch)
        load = load_average()
        result = {"load_before": load, "threads": threads,
                  "sizes": {n: bench_optimizer(n, args.repeat, torch, threads["numpy_blas"])
                            for n in args.sizes}}
        result["load_after"] = load_average()
        print(f"load average (1, 5, 15 min) before: {load}, after: {result['load_after']}")
        print(format_optimizer(result))
        if args.json:
            args.json.write_text(json.dumps(result, indent=2) + "\n")
        return 0
    if args.compare_layers:
        threads = set_threads(args.threads or available_cores())
        result = compare_layers(args.compare_layers, args.sizes, args.repeat)
        print(f"threads: NumPy BLAS {threads['numpy_blas']}")
        print(format_comparison(args.compare_layers, result))
        if args.json:
            args.json.write_text(json.dumps(result, indent=2) + "\n")
        return 0
    result = run(args.sizes, args.repeat, args.threads, args.scaling, args.feature_cache,
                 args.profile, args.use_torch, one_thread=args.one_thread, rss=args.rss)
    result["command"] = "python src/bench.py " + " ".join(sys.argv[1:] if argv is None else argv)
    print(format_report(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
