"""Batch parts in processes (GPT(..., batch_processes=2), workers.py): the same numbers as
batch parts in threads, bit for bit, whatever changed in the model between steps; clear
errors when a worker cannot run or dies; no worker or shared memory left behind."""

import multiprocessing
import os
import signal

import numpy as np
import pytest

from transferlab import GPT, GPTConfig
from transferlab import masks as M
from transferlab.lora import attach
from transferlab.optim import AdamW
from transferlab.workers import WorkerError


def step(model, idx, y, mask=None):
    logits, loss = model(idx, y, attention_mask=mask)
    return logits, loss, model.backward()


def assert_same_step(a, b):
    """Two (logits, loss, grads) equal bit for bit."""
    np.testing.assert_array_equal(a[0], b[0])
    assert a[1] == b[1]
    assert a[2].keys() == b[2].keys()
    for name in a[2]:
        np.testing.assert_array_equal(a[2][name], b[2][name], err_msg=name)


def pair(cfg, seed=2):
    """The same model twice: parts in two threads, parts in two processes."""
    return GPT(cfg, seed=seed, batch_threads=2), GPT(cfg, seed=seed, batch_processes=2)


@pytest.mark.parametrize("head, frozen", [
    ("lm", False), ("sequence", False), ("score", False), ("token", False), ("lm", True)])
def test_batch_parts_in_processes_give_the_threads_numbers_bit_for_bit(head, frozen):
    """Each part runs the same operations in either place and the gradients are added in
    the same order, so logits, loss and every gradient are equal, not just close; also
    with padding, ignored positions, a frozen lower half and without targets."""
    kind = dict(head="sequence", sequence_output="score") if head == "score" else dict(head=head)
    cfg = GPTConfig(vocab_size=11, block_size=70, n_layer=2, n_head=2, n_embd=8, dtype="float64",
                    n_classes=3, pooling="mean", label_smoothing=0.1, **kind)
    r = np.random.default_rng(6)
    idx = r.integers(0, 11, (5, 70))  # parts of 2 and 3 rows
    if head == "lm":
        y = r.integers(0, 11, (5, 70))
        y[:2, 5:] = -100
    elif head == "token":
        y = r.integers(0, 3, (5, 70))
    else:
        y = r.random(5) if head == "score" else r.integers(0, 3, 5)
    mask = None if head == "lm" else (np.arange(70)[None, :] < np.array([70, 40, 3, 70, 66])[:, None])
    threads, procs = pair(cfg)
    if frozen:
        M.freeze_to(threads, 1), M.freeze_to(procs, 1)
    want = step(threads, idx, y, mask)
    got = step(procs, idx, y, mask)
    assert_same_step(got, want)
    if frozen:  # a frozen parameter's gradient is the shared zero, as in one process
        assert not got[2]["wpe.weight"].any() and not got[2]["wpe.weight"].flags.writeable
    # evaluation: logits without targets, and nothing to backward
    np.testing.assert_array_equal(procs(idx, attention_mask=mask)[0], want[0])
    with pytest.raises(RuntimeError, match="needs a forward pass with targets"):
        procs.backward()
    # feature extraction: the backbone alone, in parts
    np.testing.assert_array_equal(procs.backbone(idx), threads.backbone(idx))


def test_the_workers_follow_every_change_to_the_model_between_steps():
    """Weights an optimizer changed, weights loaded in place, a new head, new frozen
    parameters, LoRA adapters: the worker's part runs on what the model is now."""
    cfg = GPTConfig(vocab_size=13, block_size=8, n_layer=2, n_head=2, n_embd=8, dtype="float64",
                    n_classes=3)
    r = np.random.default_rng(1)
    idx, y = r.integers(0, 13, (4, 8)), r.integers(0, 13, (4, 8))
    threads, procs = pair(cfg, seed=5)
    opts = [AdamW(m.params, lr=1e-2) for m in (threads, procs)]
    for _ in range(3):  # training: the optimizer updates the weights in place
        a, b = step(threads, idx, y), step(procs, idx, y)
        assert_same_step(b, a)
        for opt, grads in zip(opts, (a[2], b[2])):
            opt.step(grads)
    for m in (threads, procs):  # load_state_dict writes into the same arrays
        m.load_state_dict({"h.0.ln_1.weight": np.full(8, 0.5)})
        M.freeze(m, "h.0.*")
    assert_same_step(step(procs, idx, y), step(threads, idx, y))
    for m in (threads, procs):  # a new head: other parameters, another loss
        m.set_head("token", n_classes=3)
    yt = r.integers(0, 3, (4, 8))
    assert_same_step(step(procs, idx, yt), step(threads, idx, yt))
    threads, procs = (attach(m, r=2, alpha=4.0, dropout=0.0) for m in (threads, procs))
    for m in (threads, procs):
        for name in m.params:
            if name.endswith("lora_B"):
                m.params[name][...] = 0.1
    assert_same_step(step(procs, idx, yt), step(threads, idx, yt))


def test_passes_over_every_parameter_split_across_threads_keep_the_numbers(monkeypatch):
    """With the threshold at 0 every pass over the parameters that the other parts wait
    for runs in as many threads as there are parts, in both processes: the weights'
    copy into the shared block, the worker's copy of its gradients, the logits joined and
    the gradients added. The numbers stay the threads path's bit for bit, through
    optimizer steps and with a frozen block (gradients no part computes)."""
    from transferlab import kernels

    monkeypatch.setattr(kernels, "SPLIT_FROM", 0)  # read when a worker is built, sent to it
    handed, real = [], kernels.in_threads
    monkeypatch.setattr(kernels, "in_threads", lambda fn, items: handed.append(len(items)) or real(fn, items))
    cfg = GPTConfig(vocab_size=13, block_size=8, n_layer=2, n_head=2, n_embd=8, dtype="float64")
    r = np.random.default_rng(3)
    idx, y = r.integers(0, 13, (5, 8)), r.integers(0, 13, (5, 8))
    threads, procs = pair(cfg, seed=7)
    for m in (threads, procs):
        M.freeze(m, "h.0.*")
    opts = [AdamW(m.params, lr=1e-2) for m in (threads, procs)]
    for _ in range(2):
        a, b = step(threads, idx, y), step(procs, idx, y)
        assert_same_step(b, a)
        for opt, grads in zip(opts, (a[2], b[2])):
            opt.step(grads)
    # per step: threads join and add (2), processes also copy the weights in (3)
    assert handed == [2] * 10


def test_float32_parts_in_processes_equal_the_one_part_step_to_float32_rounding():
    cfg = GPTConfig(vocab_size=50, block_size=32, n_layer=2, n_head=2, n_embd=16)
    r = np.random.default_rng(8)
    idx, y = r.integers(0, 50, (6, 32)), r.integers(0, 50, (6, 32))
    _, loss1, g1 = step(GPT(cfg, seed=4), idx, y)
    _, loss2, g2 = step(GPT(cfg, seed=4, batch_processes=2), idx, y)
    assert loss2 == pytest.approx(loss1, rel=1e-6)
    for name in g1:
        assert g2[name].dtype == np.float32
        np.testing.assert_allclose(g2[name], g1[name], rtol=1e-4, atol=1e-6, err_msg=name)


def test_processes_and_threads_together_are_refused_and_bad_counts_named():
    cfg = GPTConfig(vocab_size=7, block_size=4, n_layer=1, n_head=1, n_embd=4)
    with pytest.raises(ValueError, match="batch_processes must be a positive integer, got 0"):
        GPT(cfg, batch_processes=0)
    model = GPT(cfg, batch_threads=2, batch_processes=2)
    with pytest.raises(ValueError, match=r"batch_threads \(2\) and batch_processes \(2\): at most one"):
        model(np.zeros((2, 4), dtype=int))


def test_a_kernel_table_other_processes_cannot_import_is_named():
    from transferlab.kernels import FAST

    import dataclasses

    spy = dataclasses.replace(FAST, name="spy", gelu_forward=lambda x: FAST.gelu_forward(x))
    model = GPT(GPTConfig(vocab_size=7, block_size=4, n_layer=1, n_head=1, n_embd=4), kernels=spy,
                batch_processes=2)
    with pytest.raises(ValueError, match="batch_processes needs a kernel table other processes can import"):
        model(np.zeros((2, 4), dtype=int))


def gelu_here_only(x):
    """The fast GELU in the parent process; an error in a worker process."""
    from transferlab.kernels import FAST

    if multiprocessing.parent_process() is not None:
        raise RuntimeError("this GELU runs only in the parent process")
    return FAST.gelu_forward(x)


def test_an_error_in_a_worker_comes_back_with_its_traceback():
    import dataclasses

    from transferlab.kernels import FAST

    table = dataclasses.replace(FAST, name="here-only", gelu_forward=gelu_here_only)
    cfg = GPTConfig(vocab_size=7, block_size=4, n_layer=1, n_head=1, n_embd=4)
    model = GPT(cfg, kernels=table, batch_processes=3)
    idx = np.arange(12).reshape(3, 4) % 7
    with pytest.raises(WorkerError, match=r"(?s)a batch worker process failed:.*"
                                          r"RuntimeError: this GELU runs only in the parent process"):
        model(idx)
    # both workers answered the failed call: the next one reads its own replies, and the
    # workers, alive, take the new table
    model.kernels = FAST
    np.testing.assert_array_equal(model(idx)[0], GPT(cfg, batch_threads=3)(idx)[0])


def test_a_dead_worker_is_one_clear_error_and_a_new_one_takes_over():
    cfg = GPTConfig(vocab_size=7, block_size=4, n_layer=1, n_head=1, n_embd=4, dtype="float64")
    idx = np.zeros((2, 4), dtype=int)
    model = GPT(cfg, batch_processes=2)
    want = step(GPT(cfg, batch_threads=2), idx, idx)
    model(idx, idx)
    (proc,) = model._workers.procs
    os.kill(proc.pid, signal.SIGKILL)  # between the forward and the backward of its part
    proc.join(5)
    with pytest.raises(WorkerError, match="a batch worker process exited"):
        model.backward()
    assert_same_step(step(model, idx, idx), want)  # the next step starts a new worker
    assert model._workers.procs[0].pid != proc.pid


@pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="shared memory is not files in /dev/shm here")
def test_a_worker_stops_and_its_shared_memory_goes_when_the_model_is_freed():
    cfg = GPTConfig(vocab_size=7, block_size=4, n_layer=1, n_head=1, n_embd=4)
    model = GPT(cfg, batch_processes=2)
    step(model, np.zeros((2, 4), dtype=int), np.zeros((2, 4), dtype=int))
    (proc,) = model._workers.procs
    names = [model._workers.shm.name, *model._workers.outboxes]
    assert all(os.path.exists(f"/dev/shm/{name}") for name in names)
    del model
    import gc

    gc.collect()
    proc.join(5)
    assert not proc.is_alive()
    assert not any(os.path.exists(f"/dev/shm/{name}") for name in names)


def test_a_model_built_on_given_arrays_uses_them_as_they_are():
    """GPT(config, params=...) (how a worker builds its model on the shared block): those
    arrays are the weights, no copy and no initialisation, so writing into them is writing
    into the model, and the model computes what the one that made them computes."""
    cfg = GPTConfig(vocab_size=11, block_size=8, n_layer=2, n_head=2, n_embd=8, dtype="float64",
                    head="token", n_classes=3)
    source = GPT(cfg, seed=3)
    arrays = {name: p.copy() for name, p in source.params.items()}
    built = GPT(cfg, seed=99, params=arrays)  # another seed: it must not matter
    assert all(built.params[name] is arrays[name] for name in arrays)
    idx = np.random.default_rng(0).integers(0, 11, (2, 8))
    np.testing.assert_array_equal(built(idx)[0], source(idx)[0])
    arrays["token_head.bias"][...] = 5.0
    assert not np.array_equal(built(idx)[0], source(idx)[0])
