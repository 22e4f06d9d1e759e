"""src/bench.py, run small and fast. (The fast kernels against the plain forms they equal:
tests/test_kernels.py.)"""
import json
import math
import statistics
import time

import numpy as np
import pytest

import bench
from transferlab import masks

torch = bench.import_torch()


@pytest.fixture
def restore_threads():
    """bench sets BLAS and torch thread counts process-wide: put them back afterwards."""
    funcs = bench._openblas_thread_funcs()
    blas_before = int(funcs[0]()) if funcs else None
    torch_before = torch.get_num_threads() if torch is not None else None
    yield
    if funcs:
        funcs[1](blas_before)
    if torch is not None:
        torch.set_num_threads(torch_before)


# ----------------------------------------------------------------------------------------
# the benchmark itself


@pytest.mark.slow
def test_benchmark_smoke_json(tmp_path, restore_threads):
    out = tmp_path / "bench.json"
    assert bench.main(["--sizes", "tiny", "--repeat", "1", "--threads", "1", "--rest", "0.01",
                       "--no-scaling", "--json", str(out)]) == 0
    result = json.loads(out.read_text())

    threads = result["machine"]["threads"]
    assert threads["requested"] == 1 and threads["cores"] >= 1
    assert result["machine"]["matmul_peak_gflops"] > 0
    assert result["rest_s"] == 0.01
    assert isinstance(result["quiet"]["quiet"], bool) and result["quiet"]["why"]
    tiny = result["sizes"]["tiny"]
    assert tiny["tokens"] == 32 * 32
    assert tiny["flops_per_step"] == bench.step_flops(32, 32, 2, 64, 32)
    assert len(tiny["load_before"]) == len(tiny["load_after"]) == 3
    for step in ("fwd_bwd", "train_step"):
        s = tiny[step]
        for key in ("numpy_ms", "numpy_tokens_per_s", "numpy_gflops", "numpy_peak_fraction",
                    "numpy_cpu_ms", "numpy_cpu_use"):
            assert math.isfinite(s[key]) and s[key] > 0, (step, key, s[key])
        assert s["numpy_others_cpu"] is None or s["numpy_others_cpu"] >= 0
        assert isinstance(s["numpy_calls"], int) and s["numpy_calls"] >= 1  # calls in a row
        assert 0 < s["peak_gflops"] <= s["peak_gflops_best"]
        assert s["numpy_peak_fraction"] < 2  # a fraction of a peak, not a unit mix-up
        # against the run's best matmul, one denominator for every row
        assert s["numpy_peak_fraction"] == pytest.approx(
            s["numpy_gflops"] / result["machine"]["matmul_peak_gflops"])
        assert s["numpy_gflops"] == pytest.approx(tiny["flops_per_step"] / s["numpy_ms"] / 1e6)
        assert "numpy_threads_ms" not in s  # one thread: no batch parts to time
        one = s["one_thread"]  # at --threads 1 the run itself is the one-thread run
        assert one["numpy_cpu_ms"] == s["numpy_cpu_ms"]
        if torch is not None:
            # the median of the rounds' ratios, each round's two calls side by side
            rounds = [n / t for n, t in zip(s["numpy_ms_all"], s["torch_ms_all"])]
            assert s["torch_ms"] > 0 and s["ratio"] == pytest.approx(statistics.median(rounds))
            assert s["ratio_of_medians"] == pytest.approx(s["numpy_ms"] / s["torch_ms"])
            assert s["ratio_best"] > 0
            assert one["ratio_cpu"] == s["ratio_cpu"] > 0
        else:
            assert "ratio" not in s
    if torch is not None:
        assert threads["torch"] == 1
        # same weights and batch in both frameworks: the timing compares like with like
        assert tiny["loss_torch"] == pytest.approx(tiny["loss_numpy"], abs=1e-4)

    rss = result["peak_rss"]["tiny"]  # each side's peak in a fresh process
    assert rss["numpy_mb"] >= rss["numpy_before_step_mb"] > 0
    if torch is not None:
        assert rss["torch_mb"] > 0 and rss["ratio"] == pytest.approx(rss["numpy_mb"] / rss["torch_mb"])

    cache = result["feature_cache"]["tiny"]
    for key in ("full_ms", "masks_ms", "cache_ms", "extract_ms", "bitfit_ms", "sparse_ms",
                "full_adamw_ms", "bitfit_adamw_ms", "sparse_adamw_ms"):
        assert cache[key] > 0, key
    for key in ("sparse_adamw_vs_full", "sparse_vs_full", "bitfit_vs_full", "speedup_cache_vs_full"):
        assert cache[key] > 0, key  # paired ratios: their rounds are not in the JSON
    assert cache["loss_abs_diff"] < 1e-6  # training on cached features = the uncached path
    assert cache["others_cpu"] is None or cache["others_cpu"] >= 0
    assert result["max_rss_mb"] > 0


def test_two_threads_time_the_batch_parts_and_a_one_thread_pass(restore_threads):
    """At 2 threads a size also times GPT(..., batch_threads=2) and repeats the steps at one
    thread each for CPU-time ratios."""
    bench.set_threads(2, torch)
    r = bench.bench_size("tiny", 1, torch, peak_n=64, threads=2)
    for step in ("fwd_bwd", "train_step"):
        s = r[step]
        assert s["numpy_threads_ms"] > 0 and s["numpy_threads_cpu_use"] > 0
        assert s["one_thread"]["numpy_cpu_ms"] > 0 and "numpy_threads_cpu_ms" not in s["one_thread"]
        if torch is not None:
            rounds = [n / t for n, t in zip(s["numpy_threads_ms_all"], s["torch_ms_all"])]
            assert s["ratio_threads"] == pytest.approx(statistics.median(rounds))
            assert s["one_thread"]["ratio_cpu"] > 0
        # and GPT(..., batch_processes=2), the parts in processes, beside them
        assert s["numpy_procs_ms"] > 0 and "numpy_procs_cpu_ms" not in s["one_thread"]
        if torch is not None:
            rounds = [n / t for n, t in zip(s["numpy_procs_ms_all"], s["torch_ms_all"])]
            assert s["ratio_procs"] == pytest.approx(statistics.median(rounds))
    rss = bench.peak_rss("tiny", 2, torch is not None)  # the batch-parts steps' own children
    assert rss["numpy_threads_mb"] >= rss["numpy_threads_before_step_mb"] > 0
    # two processes' peaks added up: more than one process's, the shared block named
    assert rss["numpy_procs_mb"] > rss["numpy_mb"] and rss["numpy_procs_shared_mb"] > 0
    if torch is not None:
        assert rss["ratio_threads"] == pytest.approx(rss["numpy_threads_mb"] / rss["torch_mb"])
        assert rss["ratio_procs"] == pytest.approx(rss["numpy_procs_mb"] / rss["torch_mb"])


def test_the_cpu_time_of_a_step_counts_its_worker_process():
    """cpu_seconds adds the live worker processes' CPU time: a procs/N step's second part
    is ours, not another process's (which would flag the machine busy)."""
    from transferlab import GPT, GPTConfig

    model = GPT(GPTConfig(vocab_size=64, block_size=64, n_layer=2, n_head=2, n_embd=64),
                batch_processes=2)
    idx = np.zeros((8, 64), dtype=int)
    model(idx, idx)
    model.backward()
    before = bench.workers_cpu_seconds()
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < 0.5:  # the worker runs half of every step
        model(idx, idx)
        model.backward()
    assert bench.workers_cpu_seconds() - before >= 0.05
    del model


def test_paired_ratio_is_the_median_of_the_rounds_ratios():
    # rounds' ratios 2, 1, 3: median 2; the ratio of the medians would be 4 / 3
    assert bench.paired_ratio([2.0, 4.0, 9.0], [1.0, 4.0, 3.0]) == 2.0
    # a machine that slows down round by round: every round's ratio is 1.25, and so is
    # the paired ratio, whatever the drift
    slow = [1.0, 1.7, 3.1, 0.9, 2.2]
    assert bench.paired_ratio([1.25 * f for f in slow], slow) == pytest.approx(1.25)
    with pytest.raises(ValueError, match="equally long"):
        bench.paired_ratio([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="non-empty"):
        bench.paired_ratio([], [])


def test_summaries_pair_the_rounds():
    """_summarise and _summarise_cpu give ratios as paired_ratio of the rounds' records."""
    rec = lambda wall, cpu: {"wall": wall, "cpu": cpu, "others": 0.0}  # noqa: E731
    runs = {"numpy": [rec(2.0, 2.0), rec(4.0, 3.0), rec(9.0, 9.0)],
            "torch": [rec(1.0, 1.0), rec(4.0, 1.0), rec(3.0, 3.0)],
            "matmul_peak": [rec(1.0, 1.0)] * 3}
    s = bench._summarise(runs, flops=1e9, tokens=10, peak_flops=1e9)
    assert s["ratio"] == 2.0 and s["ratio_of_medians"] == pytest.approx(4.0 / 3.0)
    assert s["ratio_cpu"] == 3.0  # rounds 2, 3, 3
    c = bench._summarise_cpu({k: v for k, v in runs.items() if k != "matmul_peak"})
    assert c["ratio"] == 2.0 and c["ratio_cpu"] == 3.0


def test_rested_alternates_the_order_and_rests_before_every_timed_call():
    order = []
    fns = {"a": lambda: order.append("a"), "b": lambda: order.append("b")}
    t0 = bench.time.perf_counter()
    runs = bench.rested(fns, 3, warmup=1, rest=0.02)
    assert bench.time.perf_counter() - t0 >= 6 * 0.02  # a rest before each of 6 timed calls
    assert order == ["a", "b", "a", "b", "b", "a", "a", "b"]  # warmup, then A B, B A, A B
    for rs in runs.values():
        assert len(rs) == 3 and all(r["wall"] >= 0 and r["cpu"] >= 0 for r in rs)


def test_rested_times_back_to_back_calls_filling_min_sample(monkeypatch):
    """With min_sample, a record times as many calls in a row as fill it (from the last
    warmup call's time) and holds the time per call: a fake clock that each call of "a"
    moves by 30 ms and each call of "b" by 150 ms."""
    clock, count = [0.0], {"a": 0, "b": 0}
    monkeypatch.setattr(bench.time, "perf_counter", lambda: clock[0])

    def call(name, seconds):
        def fn():
            count[name] += 1
            clock[0] += seconds
        return fn

    runs = bench.rested({"a": call("a", 0.03), "b": call("b", 0.15)}, 3, warmup=2, rest=0.0,
                        min_sample=0.1)
    assert [r["calls"] for r in runs["a"]] == [4] * 3  # ceil(0.1 / 0.03)
    assert [r["calls"] for r in runs["b"]] == [1] * 3  # one call already fills 0.1 s
    assert count == {"a": 2 + 3 * 4, "b": 2 + 3 * 1}
    assert [r["wall"] for r in runs["a"]] == pytest.approx([0.03] * 3)
    assert [r["wall"] for r in runs["b"]] == pytest.approx([0.15] * 3)
    # without min_sample every record is one call
    plain = bench.rested({"a": call("a", 0.03)}, 2, warmup=0, rest=0.0)
    assert [r["calls"] for r in plain["a"]] == [1, 1]


def test_quiet_verdict_names_the_reason():
    assert bench.quiet_verdict([0.2, 0.3, 0.4], 0.05) == (True, "quiet")
    quiet, why = bench.quiet_verdict([3.1, 2.0, 1.0], 1.4)
    assert not quiet and "load 3.1" in why and "1.40 cores" in why
    quiet, why = bench.quiet_verdict([0.1, 0.1, 0.1], 0.52, ["tiny fwd+bwd", "tiny fwd+bwd batch/N"])
    assert not quiet and why.endswith("in tiny fwd+bwd, tiny fwd+bwd batch/N")


def test_the_rows_other_processes_disturbed_are_named_and_marked():
    row = {"numpy_others_cpu": 0.02, "numpy_threads_others_cpu": 0.46}
    sizes = {"tiny": {"fwd_bwd": row, "train_step": {"numpy_others_cpu": 0.30}},
             "gpt2": {"fwd_bwd": {"numpy_others_cpu": 0.01}, "train_step": {"numpy_others_cpu": None}}}
    assert bench.others_by_row(sizes) == {"tiny fwd+bwd": 0.02, "tiny fwd+bwd batch/N": 0.46,
                                          "tiny train step": 0.30, "gpt2 fwd+bwd": 0.01}
    assert bench._busy(0.46) and not bench._busy(0.25) and not bench._busy(None)
    # the tables that run last count too: the scaling rows and the head-only sizes
    result = {"sizes": sizes,
              "scaling": {"T": [{"T": 32, "batch": 32, "others_cpu": 0.61}],
                          "batch": [{"T": 64, "batch": 8, "others_cpu": None}]},
              "feature_cache": {"small": {"others_cpu": 0.04}}}
    rows = bench.others_in_every_row(result)
    assert rows["scaling T (T 32, batch 32)"] == 0.61 and rows["head-only small"] == 0.04
    assert "scaling batch (T 64, batch 8)" not in rows  # not measured (off Linux): no row


def test_others_cores_is_their_cpu_time_over_our_wall_time():
    rec = lambda wall, others: {"wall": wall, "cpu": wall, "others": others}  # noqa: E731
    runs = {"a": [rec(1.0, 0.5), rec(1.0, 0.0)], "b": [rec(2.0, 1.0)]}
    assert bench.others_cores(runs) == pytest.approx(1.5 / 4.0)
    assert bench.others_cores(runs, {"c": [rec(4.0, 0.5)]}) == pytest.approx(2.0 / 8.0)
    assert bench.others_cores({"a": [rec(1.0, None)]}) is None


def test_scaling_rows_cover_each_length_and_batch(restore_threads):
    bench.set_threads(1, torch)  # one thread: fast and steady on a busy machine
    sc = bench.bench_scaling(1, torch, base="tiny", Ts=(8, 16), batches=(2, 4))
    assert [(r["T"], r["batch"]) for r in sc["T"]] == [(8, 32), (16, 32)]
    assert [(r["T"], r["batch"]) for r in sc["batch"]] == [(32, 2), (32, 4)]
    for row in sc["T"] + sc["batch"]:
        assert row["numpy_ms"] > 0 and row["numpy_us_per_token"] > 0
        assert row["others_cpu"] is None or row["others_cpu"] >= 0
        assert ("ratio" in row) == (torch is not None)


def test_step_flops_counts_every_matmul_of_the_model():
    """The analytic formula against an explicit list of the products one forward makes."""
    V, T, L, C, B = 32, 16, 2, 64, 4
    N = B * T
    products = []  # (M, K, N) of each forward matmul
    for _ in range(L):
        products += [(N, C, 3 * C), (N, C, C), (N, C, 4 * C), (N, 4 * C, C)]  # weight GEMMs
        products += [(B * T, C, T), (B * T, T, C)]  # q k^T and att v over all heads
    products.append((N, C, V))  # the LM head
    forward = sum(2 * m * k * n for m, k, n in products)
    assert bench.step_flops(V, T, L, C, B) == 3 * forward  # backward = 2 x forward


# ----------------------------------------------------------------------------------------
# a frozen backbone costs less memory, not only less time


def test_frozen_backbone_step_keeps_no_activations_for_frozen_blocks():
    """With everything below the head masked out, backward never reaches the blocks, so
    the forward does not keep their activations: one training step allocates far less."""
    spec = dict(bench.SIZES["tiny"], batch=8, n_layer=4)
    cfg = bench.GPTConfig(vocab_size=spec["vocab_size"], block_size=spec["block_size"],
                          n_layer=spec["n_layer"], n_head=spec["n_head"], n_embd=spec["n_embd"],
                          head="sequence", pooling="mean", n_classes=4)
    idx = np.random.default_rng(0).integers(0, cfg.vocab_size, (spec["batch"], cfg.block_size))
    y = np.arange(spec["batch"]) % 4
    full, frozen = bench.GPT(cfg, seed=0), bench.GPT(cfg, seed=0)
    masks.freeze_backbone(frozen)

    def step(model):
        model(idx, y)
        return model.backward()

    step(full), step(frozen)  # the previous step's caches exist in both: like for like
    assert bench.peak_traced_mb(lambda: step(frozen)) < 0.5 * bench.peak_traced_mb(lambda: step(full))
    g_full, g_frozen = step(full), step(frozen)
    for name in ("seq_head.weight", "seq_head.bias"):  # the head still gets its gradient
        np.testing.assert_allclose(g_frozen[name], g_full[name], rtol=1e-6, atol=1e-9)
    assert not g_frozen["h.0.mlp.c_fc.weight"].any()


def test_compare_layers_runs_each_side_through_its_own_kernel_table():
    """--compare-layers REV times the model on layers.py as it was at REV, through a kernel
    table built from that file; the model's own table is left as it was."""
    import subprocess

    from transferlab.kernels import FAST

    if subprocess.run(["git", "-C", str(bench.Path(bench.__file__).parent), "rev-parse", "HEAD"],
                      capture_output=True).returncode != 0:
        pytest.skip("not a git checkout")
    old = bench.layers_from_git("HEAD")
    table = bench.kernels_from_module(old, "HEAD")
    assert table.layernorm_forward is old.layernorm_forward and table.name == "layers.py@HEAD"
    result = bench.compare_layers("HEAD", ["tiny"], repeat=1, rounds=1)["tiny"]
    assert result["before_ms"] > 0 and result["after_ms"] > 0
    assert result["kernels_before_ms"]["attention_forward"] > 0
    assert FAST.attention_forward.__module__ == "transferlab.kernels"  # nothing was rebound


def test_kernel_gains_time_each_form_of_each_layer(restore_threads):
    result = bench.kernel_gains(["tiny"], repeat=2, rest=0.0, torch=torch)["tiny"]
    assert set(result) == {"linear", "gelu", "layernorm", "attention", "cross_entropy", "embedding"}
    for layer, r in result.items():
        assert all(len(ts) == 2 for ts in r["rounds_ms"].values())
        assert r["table_ms"] == min(r["rounds_ms"]["table_ms"])
        assert r["plain_ms"] > 0 and r["table_ms"] > 0
        assert (r["inplace_ms"] is None) == (layer in ("linear", "cross_entropy", "embedding"))
        assert (r["torch_ms"] is None) == (torch is None)
        if torch is not None:  # two rounds: the median of their two ratios is their mean
            ours, theirs = r["rounds_ms"]["table_ms"], r["rounds_ms"]["torch_ms"]
            assert r["vs_torch"] == pytest.approx((ours[0] / theirs[0] + ours[1] / theirs[1]) / 2)
    assert result["linear"]["plain_ms"] == result["linear"]["table_ms"]  # one form, timed once
    report = bench.format_kernel_gains({"tiny": result})
    assert "attention" in report
    assert [line.split()[3] for line in report.splitlines() if " embedding " in line] == ["-"]
    assert ("vs torch" in report) == (torch is not None)


def test_the_profiles_account_for_the_whole_step(restore_threads):
    """--profile: NumPy's kernel calls, each counted once, fit inside its step; PyTorch's
    `top` largest operators come largest first, followed by one line for all the others."""
    bench.set_threads(1, torch)
    numpy_side = bench.profile_numpy("tiny", steps=2)
    kernels = numpy_side["kernels"]
    assert kernels["layernorm_forward"]["calls"] == 2 * 2 + 1  # two blocks and ln_f
    assert kernels["other (head, loss, residual adds, Python)"]["ms"] >= 0  # no call timed twice
    if torch is None:
        return
    torch_side = bench.profile_torch(torch, "tiny", steps=2, top=3)
    ops = torch_side["ops"]
    assert len(ops) == 4 and "(the other operators)" in ops
    largest = [op["ms"] for name, op in ops.items() if name != "(the other operators)"]
    assert largest == sorted(largest, reverse=True)
    assert ops["(the other operators)"]["calls"] > 0 and ops["(the other operators)"]["ms"] >= 0


def test_step_counts_are_how_often_a_step_runs_each_layer():
    """step_against_layers runs each layer alone as often as a step does: count the kernel
    calls of one real forward+backward (two blocks at tiny)."""
    model, idx, targets = bench.lm_batch(bench.SIZES["tiny"])
    totals = {}
    model.kernels = bench.timed_table(model.kernels, totals)
    model(idx, targets)
    model.backward()
    counts = bench.step_counts(model.config.n_layer)
    assert counts["layernorm"] == 5 and counts["linear"] == 2
    for layer, fns in bench.STEP_KERNELS.items():
        per_run = 4 if layer == "linear" else 1  # numpy_layers' "linear" runs the block's four
        assert [totals[f][1] for f in fns] == [counts[layer] * per_run] * len(fns), layer


def test_step_against_layers_pairs_a_step_with_its_layers_alone(restore_threads):
    r = bench.step_against_layers("tiny", rounds=1, torch=torch, rest=0.0)
    n = r["numpy"]
    assert n["step_ms"] > 0 and n["alone_ms"] > 0
    assert n["step_vs_alone"] == pytest.approx(n["step_ms"] / n["alone_ms"])  # one round
    assert set(n["in_step_vs_alone"]) == set(bench.step_counts(2))
    assert 0 < n["step_ms"] - n["between_kernels_ms"] <= n["step_ms"]  # the kernels' share of the step
    assert ("torch" in r) == (torch is not None)
    if torch is not None:
        assert r["step_vs_torch"] == pytest.approx(n["step_ms"] / r["torch"]["step_ms"])
        assert r["alone_vs_torch"] == pytest.approx(n["alone_ms"] / r["torch"]["alone_ms"])
    report = bench.format_step_against_layers({"tiny": r})
    assert "layernorm" in report and "between" in report


@pytest.mark.skipif(torch is None, reason="the reference is PyTorch (tests/requirements-reference.txt)")
def test_the_kernel_table_times_the_same_work_in_pytorch_as_in_numpy():
    """--kernels' torch column is only a comparison if each PyTorch layer computes what the
    NumPy forms compute: the same gradients from the same inputs, layer by layer."""
    inputs = bench.layer_inputs(bench.SIZES["tiny"])
    ours, theirs = bench.numpy_layers(inputs), bench.torch_layers(torch, inputs)
    for layer, (plain, inplace, table) in ours.items():
        got, want = table(), theirs[layer]()
        if layer == "linear":
            pairs = zip(got, want)
        elif layer == "cross_entropy":  # (loss, dlogits)
            pairs = [(np.float32(got[0]), want[0].detach()), (got[1], want[1])]
        elif layer == "embedding":  # (the head's gradient with the rows added, dwpe)
            pairs = zip(got, want)
        else:  # the gradient at the layer's input; the NumPy forms return it first
            pairs = [(got[0], want)]
        for g, w in pairs:
            np.testing.assert_allclose(np.asarray(g), w.numpy(), rtol=1e-4, atol=1e-5, err_msg=layer)


def test_optimizer_bench_times_every_form_of_the_step(tmp_path, restore_threads, capsys):
    """--optimizer: the update rule on whole arrays, AdamW in chunks on 1 and N threads,
    clip_grad_norm, and PyTorch's two when installed; the report names every column."""
    out = tmp_path / "opt.json"
    assert bench.main(["--optimizer", "--sizes", "tiny", "--repeat", "1", "--rest", "0.0",
                       "--threads", "2", "--json", str(out)]) == 0
    tiny = json.loads(out.read_text())["sizes"]["tiny"]
    assert tiny["entries"] == sum(p.size for p in bench.lm_batch(bench.SIZES["tiny"])[0].params.values())
    threads = json.loads(out.read_text())["threads"]["numpy_blas"]
    for key in ("whole_ms", "chunks/1_ms", f"chunks/{threads}_ms", "clip_ms"):
        assert tiny[key] > 0
    assert ("torch_ms" in tiny) == (torch is not None)
    assert "chunks/1" in capsys.readouterr().out


def test_generate_bench_reports_tokens_per_second_and_agrees_with_hugging_face(tmp_path, restore_threads):
    """--generate: KV-cached greedy generation timed beside Hugging Face's generate on the same
    weights; both must produce the same tokens, else the timing compares different work."""
    out = tmp_path / "gen.json"
    assert bench.main(["--generate", "--sizes", "tiny", "--repeat", "1", "--rest", "0.01",
                       "--threads", "1", "--json", str(out)]) == 0
    tiny = json.loads(out.read_text())["sizes"]["tiny"]
    assert tiny["new_tokens"] == 32 - 16 and tiny["numpy_tokens_per_s"] > 0  # tiny's context is 32
    if torch is not None:
        assert tiny["same_tokens"] is True and tiny["torch_tokens_per_s"] > 0
        assert tiny["speed_ratio"] == pytest.approx(tiny["numpy_tokens_per_s"] / tiny["torch_tokens_per_s"])


def test_reusing_freed_memory_removes_the_page_faults_of_every_step():
    """kernels.reuse_freed_memory (GPT() calls it): a training step stops page-faulting
    its temporaries in, where glibc's own settings fault thousands of pages per step
    (counted by the kernel, fresh processes: not a timing)."""
    row = bench.malloc_comparison(["tiny"], repeat=2, rounds=1)["tiny"]
    assert row["glibc_faults_per_step"] > 1000  # the tiny step's temporaries, mapped afresh
    assert row["reuse_faults_per_step"] < 0.01 * row["glibc_faults_per_step"]
    assert row["glibc_cpu_ms"] > 0 and row["reuse_cpu_ms"] > 0
    assert "reuse faults" in bench.format_malloc({"tiny": row})


def test_the_kernels_in_a_step_are_timed_on_the_steps_own_clock(monkeypatch, restore_threads):
    """step_against_layers times the step in CPU time, and so the kernels inside it: a
    process that waits (descheduled on a busy machine; here a GELU that sleeps) adds wall
    time but no CPU time, and the kernels' share never exceeds the step."""
    import dataclasses

    real = bench.lm_batch

    def with_a_waiting_gelu(spec, *args, **kwargs):
        model, idx, targets = real(spec, *args, **kwargs)
        gelu = model.kernels.gelu_forward

        def waiting_gelu(x):
            time.sleep(0.02)
            return gelu(x)

        model.kernels = dataclasses.replace(model.kernels, gelu_forward=waiting_gelu)
        return model, idx, targets

    monkeypatch.setattr(bench, "lm_batch", with_a_waiting_gelu)
    n = bench.step_against_layers("tiny", rounds=1, torch=None, rest=0.0)["numpy"]
    assert 0 <= n["between_kernels_ms"] < n["step_ms"]
