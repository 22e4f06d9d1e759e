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
  see the same machine load, and the medians are compared;
- achieved GFLOP/s from an analytic count of matrix-multiply FLOPs (`step_flops`), as a
  fraction of this machine's float32 matmul peak: a large np.matmul timed as one more
  contender in the same interleaved loop;
- peak memory of one training step (tracemalloc: the NumPy arrays and Python objects the
  step allocates; the process-wide maximum RSS is printed once at the end).

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
import json
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
}
SCALING_BASE = "small"  # step time against T and against batch, other sizes fixed
SCALING_T = (32, 64, 128)
SCALING_BATCH = (8, 16, 32)
WARMUP = 2  # untimed steps before timing: first-touch page faults, BLAS buffers, caches
N_CLASSES = 4  # the sequence head of the feature-cache comparison


# ----------------------------------------------------------------------------------------
# threads: NumPy's BLAS and PyTorch's intra-op pool get the same number


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


# numpy's wheels bundle OpenBLAS with renamed symbols; the plain names cover other builds
_OPENBLAS_THREAD_FUNCS = [
    ("scipy_openblas_get_num_threads64_", "scipy_openblas_set_num_threads64_"),
    ("openblas_get_num_threads64_", "openblas_set_num_threads64_"),
    ("openblas_get_num_threads", "openblas_set_num_threads"),
]


def _openblas_thread_funcs():
    """(get, set) ctypes functions of the OpenBLAS NumPy loaded, or None if not found."""
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "openblas" in line.lower()}
    except OSError:  # not Linux
        return None
    for path in sorted(paths):
        lib = ctypes.CDLL(path)  # already loaded by numpy: this only returns a handle
        for get_name, set_name in _OPENBLAS_THREAD_FUNCS:
            if hasattr(lib, get_name) and hasattr(lib, set_name):
                return getattr(lib, get_name), getattr(lib, set_name)
    return None


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


def _seconds(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def interleaved(fns: dict, repeat: int, warmup: int = WARMUP) -> dict:
    """name -> list of `repeat` wall times (s), the callables run alternately.

    Repetition r runs the callables in order, r + 1 in reverse order, and so on (A B, B A,
    A B, ...): on a shared machine the load drifts, and alternating gives every contender
    the same drift; neither is always the one that runs right after the other.
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    names = list(fns)
    times = {name: [] for name in names}
    for r in range(repeat):
        for name in names if r % 2 == 0 else names[::-1]:
            times[name].append(_seconds(fns[name]))
    return times


def median_ms(times) -> float:
    return statistics.median(times) * 1e3


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

    def __init__(self, torch, model: GPT):
        cfg = model.config
        self.torch, self.F = torch, torch.nn.functional
        self.L, self.NH, self.C = cfg.n_layer, cfg.n_head, cfg.n_embd
        self.p = {name: torch.tensor(a, requires_grad=True) for name, a in model.params.items()}

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


def bench_size(name, repeat, torch=None, spec=None, peak_n=1024) -> dict:
    """Forward+backward and training steps of one size, NumPy and (if given) PyTorch,
    interleaved with each other and with the matmul that measures the peak."""
    spec = spec or SIZES[name]
    model, idx, targets = lm_batch(spec)
    B, T = idx.shape
    flops = step_flops(spec["vocab_size"], T, spec["n_layer"], spec["n_embd"], B)
    out = {"config": dict(spec), "tokens": B * T, "flops_per_step": flops}
    peak_fn, peak_flops = matmul_peak(peak_n)

    def np_fwd_bwd():
        model(idx, targets)
        return model.backward()

    fwd_bwd = {"numpy": np_fwd_bwd, "matmul_peak": peak_fn}
    if torch is not None:
        tmodel = TorchGPT(torch, model)
        tidx, ttargets = torch.tensor(idx), torch.tensor(targets)
        # the two models agree before any timing: the comparison is like for like
        out["loss_numpy"] = float(model(idx, targets)[1])
        with torch.no_grad():
            out["loss_torch"] = float(tmodel.loss(tidx, ttargets))
        fwd_bwd["torch"] = lambda: tmodel.fwd_bwd(tidx, ttargets)
    out["fwd_bwd"] = _summarise(interleaved(fwd_bwd, repeat), flops, B * T, peak_flops)

    opt = make_adamw(model.params)

    def np_train():
        opt.step(np_fwd_bwd())

    train = {"numpy": np_train, "matmul_peak": peak_fn}
    if torch is not None:
        topt = tmodel.adamw()

        def torch_train():
            tmodel.fwd_bwd(tidx, ttargets)
            topt.step()

        train["torch"] = torch_train
    out["train_step"] = _summarise(interleaved(train, repeat), flops, B * T, peak_flops)
    out["numpy_step_peak_mb"] = peak_traced_mb(np_train)
    return out


def _summarise(times, flops, tokens, peak_flops) -> dict:
    """Medians (and bests) of interleaved timings -> ms, tokens/s, GFLOP/s, fraction of peak."""
    peak_times = times.pop("matmul_peak")
    res = {"peak_gflops": peak_flops / statistics.median(peak_times) / 1e9,
           "peak_gflops_best": peak_flops / min(peak_times) / 1e9}
    for who, ts in times.items():
        ms = median_ms(ts)
        gflops = flops / (ms / 1e3) / 1e9
        res.update({
            f"{who}_ms": ms,
            f"{who}_ms_best": min(ts) * 1e3,
            f"{who}_ms_all": [t * 1e3 for t in ts],
            f"{who}_tokens_per_s": tokens / (ms / 1e3),
            f"{who}_gflops": gflops,
            # median against median: both measured under the same (drifting) load
            f"{who}_peak_fraction": gflops / res["peak_gflops"],
        })
    if "torch_ms" in res:
        res["ratio"] = res["numpy_ms"] / res["torch_ms"]  # numpy time / torch time, medians
        res["ratio_best"] = res["numpy_ms_best"] / res["torch_ms_best"]  # the fastest of each
    return res


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
        times = interleaved(fns, repeat)
        row = {"T": shape["T"], "batch": shape["B"], "numpy_ms": median_ms(times["numpy"])}
        row["numpy_us_per_token"] = row["numpy_ms"] * 1e3 / (shape["T"] * shape["B"])
        if torch is not None:
            row["torch_ms"] = median_ms(times["torch"])
            row["ratio"] = row["numpy_ms"] / row["torch_ms"]
        rows[axis].append(row)
    return {"base": base, **rows}


def frozen_masks(model):
    """Everything but the sequence head frozen: backward stops below the head."""
    return {n: np.zeros_like(p) for n, p in model.params.items() if not n.startswith("seq_head.")}


def bench_feature_cache(name, repeat, spec=None) -> dict:
    """Head-only training three ways, on a sequence classifier (mean pooling, 4 classes).

    full    every weight trains: forward, backward, AdamW over everything
    masks   backbone frozen through model.masks: the full forward still runs every step,
            backward stops below the head
    cache   backbone frozen and run once (model.backbone, keep_cache=False); each step is
            forward_head on the cached features, backward, AdamW (as train.py does)
    """
    spec = spec or SIZES[name]
    cfg = GPTConfig(vocab_size=spec["vocab_size"], block_size=spec["block_size"],
                    n_layer=spec["n_layer"], n_head=spec["n_head"], n_embd=spec["n_embd"],
                    head="sequence", pooling="mean", n_classes=N_CLASSES, dtype="float32")
    rng = np.random.default_rng(1)
    idx = rng.integers(0, cfg.vocab_size, (spec["batch"], cfg.block_size))
    y = rng.integers(0, N_CLASSES, spec["batch"])
    models = {how: GPT(cfg, seed=0) for how in ("full", "masks", "cache")}
    for how in ("masks", "cache"):
        models[how].masks = frozen_masks(models[how])
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

    times = interleaved({how: functools.partial(step, how) for how in models}, repeat)
    res = {f"{how}_ms": median_ms(ts) for how, ts in times.items()}
    res.update(
        extract_ms=median_ms(extract["extract"]),
        loss_abs_diff=abs(loss_masks - loss_cache),
        speedup_cache_vs_full=res["full_ms"] / res["cache_ms"],
        speedup_masks_vs_full=res["full_ms"] / res["masks_ms"],
        speedup_cache_vs_masks=res["masks_ms"] / res["cache_ms"],
    )
    return res


# ----------------------------------------------------------------------------------------
# --profile: where the time goes


def timed_table(table, totals: dict):
    """A copy of a KernelTable whose every function adds its time and calls to `totals`."""
    from transferlab.kernels import KernelTable

    def timed(fname, fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            result = fn(*args, **kwargs)
            entry = totals.setdefault(fname, [0.0, 0])
            entry[0] += time.perf_counter() - t0
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


def profile_torch(torch, name, steps=5, top=10, spec=None) -> dict:
    """ms per forward+backward by PyTorch operator (self CPU time, torch.profiler)."""
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
    return {"step_ms": total, "ops": ops}


# ----------------------------------------------------------------------------------------
# --compare-layers REV: the kernels of an older revision against the working tree


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
    carried the plain names), falling back to the current fast form for any it lacks."""
    from transferlab.kernels import FAST, KernelTable

    names = FAST.functions()
    return KernelTable(f"layers.py@{rev}", **{n: getattr(module, n, fn) for n, fn in names.items()})


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


def format_report(result) -> str:
    m = result["machine"]
    th = m["threads"]
    load = m["load_average_before_after"]
    lines = [
        f"numpy {m['numpy']} ({m['blas']}), torch {m['torch'] or 'not installed'}, "
        f"Python {m['python']}, {m['cpu']}",
        f"threads: {th['cores']} cores available; NumPy BLAS {th['numpy_blas']} "
        f"(elementwise ufuncs: 1), torch {th['torch']}; "
        f"load average (1, 5, 15 min) before {load[0]}, after {load[1]}",
        f"float32 matmul peak: a {result['peak_n']}^3 np.matmul interleaved with the steps "
        f"(best seen {m['matmul_peak_gflops']:.1f} GFLOP/s)",
        f"{result['repeat']} interleaved repetitions each: medians; 'best' columns: the "
        "fastest repetition of each",
        "GFLOP/s = analytic matmul FLOPs / median time (bench.step_flops: "
        "6 N_mm BT + 12 L T C BT); %peak against the median peak of the same loop",
        "",
        f"{'size':7} {'step':10} {'numpy ms':>9} {'torch ms':>9} {'np/torch':>8} "
        f"{'best np/t':>9} {'tokens/s':>9} {'GFLOP/s':>8} {'peak':>6} {'%peak':>6} "
        f"{'torch%pk':>8} {'step MB':>8}",
    ]
    for name, r in result["sizes"].items():
        for key, label in (("fwd_bwd", "fwd+bwd"), ("train_step", "train step")):
            s = r[key]
            has_torch = "torch_ms" in s
            torch_cols = (f"{s['torch_ms']:9.2f} {s['ratio']:8.2f} {s['ratio_best']:9.2f}"
                          if has_torch else f"{'-':>9} {'-':>8} {'-':>9}")
            tpeak = f"{100 * s['torch_peak_fraction']:7.1f}%" if has_torch else f"{'-':>8}"
            mem = f"{r['numpy_step_peak_mb']:8.1f}" if key == "train_step" else f"{'':>8}"
            lines.append(
                f"{name:7} {label:10} {s['numpy_ms']:9.2f} {torch_cols} "
                f"{s['numpy_tokens_per_s']:9.0f} {s['numpy_gflops']:8.1f} "
                f"{s['peak_gflops']:6.0f} {100 * s['numpy_peak_fraction']:5.1f}% {tpeak} {mem}"
            )
        if "loss_torch" in r:
            lines.append(f"{'':7} same weights, same batch: loss numpy {r['loss_numpy']:.6f}, "
                         f"torch {r['loss_torch']:.6f}")
    lines.append("step MB: tracemalloc peak of one NumPy training step (activations, gradients, "
                 "temporaries; parameters and optimizer state excluded)")
    if "scaling" in result:
        sc = result["scaling"]
        lines += ["", f"scaling, fwd+bwd, base size {sc['base']}:",
                  f"{'T':>5} {'batch':>5} {'numpy ms':>9} {'us/token':>9} {'torch ms':>9} {'np/torch':>8}"]
        for row in sc["T"] + sc["batch"]:
            t = f"{row['torch_ms']:9.2f} {row['ratio']:8.2f}" if "torch_ms" in row else ""
            lines.append(f"{row['T']:5d} {row['batch']:5d} {row['numpy_ms']:9.2f} "
                         f"{row['numpy_us_per_token']:9.2f} {t}")
    if "feature_cache" in result:
        lines += ["", "head-only training, sequence classifier (mean pooling, 4 classes), ms/step "
                  "(forward, backward, AdamW):",
                  f"{'size':7} {'full FT':>9} {'masks':>9} {'cache':>9} {'extract':>9} "
                  f"{'cache/full':>10} {'cache/masks':>11} {'|dloss|':>8}"]
        for name, r in result["feature_cache"].items():
            lines.append(
                f"{name:7} {r['full_ms']:9.2f} {r['masks_ms']:9.2f} {r['cache_ms']:9.3f} "
                f"{r['extract_ms']:9.2f} {r['speedup_cache_vs_full']:9.1f}x "
                f"{r['speedup_cache_vs_masks']:10.1f}x {r['loss_abs_diff']:8.1e}")
        lines.append("extract: the one backbone pass that fills the cache; cache/full: "
                     "full-FT step time / cached step time")
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
    lines += ["", f"process max RSS (getrusage ru_maxrss, whole run incl. torch): "
              f"{result['max_rss_mb']:.0f} MB"]
    return "\n".join(lines)


def run(sizes=("tiny", "small", "medium"), repeat=7, threads=None, scaling=True,
        feature_cache=True, profile=False, use_torch=True, peak_n=1024, profile_steps=5) -> dict:
    """Run the benchmark and return the results as a JSON-ready dict (see `main`)."""
    torch = import_torch() if use_torch else None
    thread_info = set_threads(threads or available_cores(), torch)
    load_before = load_average()
    result = {"sizes": {}, "peak_n": peak_n, "repeat": repeat}
    for name in sizes:
        result["sizes"][name] = bench_size(name, repeat, torch, peak_n=peak_n)
    if scaling:
        result["scaling"] = bench_scaling(repeat, torch)
    if feature_cache:
        result["feature_cache"] = {name: bench_feature_cache(name, repeat) for name in sizes}
    if profile:
        result["profile"] = {}
        for name in sizes:
            entry = {"numpy": profile_numpy(name, profile_steps)}
            if torch is not None:
                entry["torch"] = profile_torch(torch, name, profile_steps)
            result["profile"][name] = entry
    peak = max(step["peak_gflops_best"] for r in result["sizes"].values()
               for step in (r["fwd_bwd"], r["train_step"]))
    result["machine"] = machine_info(thread_info, peak, torch)
    result["machine"]["load_average_before_after"] = [load_before, load_average()]
    result["max_rss_mb"] = max_rss_mb()
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--repeat", type=int, default=7, help="timed repetitions per contender (default 7)")
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    parser.add_argument("--threads", type=int, default=None,
                        help="threads for NumPy's BLAS and for torch (default: all available cores)")
    parser.add_argument("--no-scaling", dest="scaling", action="store_false",
                        help="skip the step-time-vs-T and -vs-batch sweep")
    parser.add_argument("--no-feature-cache", dest="feature_cache", action="store_false",
                        help="skip the feature-cache comparison")
    parser.add_argument("--no-torch", dest="use_torch", action="store_false",
                        help="time NumPy only, even if torch is installed")
    parser.add_argument("--profile", action="store_true", help="also show where the time goes")
    parser.add_argument("--compare-layers", metavar="REV",
                        help="instead: time layers.py of git revision REV against the working tree")
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error(f"--repeat must be >= 1, got {args.repeat}")
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    if args.compare_layers:
        threads = set_threads(args.threads or available_cores())
        result = compare_layers(args.compare_layers, args.sizes, args.repeat)
        print(f"threads: NumPy BLAS {threads['numpy_blas']}")
        print(format_comparison(args.compare_layers, result))
        if args.json:
            args.json.write_text(json.dumps(result, indent=2) + "\n")
        return 0
    result = run(args.sizes, args.repeat, args.threads, args.scaling, args.feature_cache,
                 args.profile, args.use_torch)
    result["command"] = "python src/bench.py " + " ".join(sys.argv[1:] if argv is None else argv)
    print(format_report(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
