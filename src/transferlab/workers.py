"""Batch parts in processes: GPT(..., batch_processes=N) runs each step on N parts of the
batch, the first in the calling process and the others in worker processes, each with its
own interpreter and BLAS at one thread. docs/performance.md#batch-parts-in-processes

Why processes: in threads (GPT's batch_threads) the parts share one interpreter, and every
NumPy call hands the GIL back and forth; a step makes thousands of short calls, so the two
threads wait for each other. Two processes share nothing but memory, and each runs its
part at one-thread speed. This is data parallelism as PyTorch's DistributedDataParallel
does it, on one machine: the same model in every process, a part of the batch each, the
gradients summed.

What crosses between the processes, per step:
- before the forward: the weights, copied into a shared-memory block the workers' models
  view (a copy of every parameter per step: the workers never hold stale weights, whatever
  changed them: an optimizer, load_state_dict, a strategy's surgery); and when the model
  changed shape or settings (config, kernel table, frozen parameters), the new settings,
  on which the worker rebuilds its model;
- the part's rows of idx, targets and the padding mask, and back its logits and loss;
- after the backward: each worker's gradients, written into its own area of the block,
  which the calling process adds to its own part's gradients in part order (the same
  additions as the threads path, so the same numbers bit for bit).
The other processes wait while these copies and sums run, so from GPT-2 124M's size
(kernels.SPLIT_FROM entries) each is split across as many threads as there are processes.

A worker starts with the spawn method (a fresh interpreter: no state forked from a process
with running threads, which imports NumPy and transferlab once) the first time a model
asks for processes, and stops when the model is freed or the program ends. As with any multiprocessing code, a
script that builds such a model must guard its top level with `if __name__ == "__main__":`.
"""

from __future__ import annotations

import multiprocessing
import pickle
import signal
import traceback
import weakref
from multiprocessing import shared_memory
from typing import NamedTuple

import numpy as np

from . import kernels
from . import masks as M
from .kernels import blas_threads, split_in_threads

ALIGN = 64  # bytes: every array in the shared block starts on a cache line


class WorkerError(RuntimeError):
    """A worker process failed or exited; the message carries its traceback."""


EXITED = ("a batch worker process exited (killed, or out of memory?); the next step starts "
          "a new one, and batch_processes=1 runs every part here")


def block_layout(params: dict) -> tuple[list, int]:
    """[(name, shape, offset)] of every parameter in one flat block, and the block's bytes
    per copy of the parameters (the weights, or one worker's gradients)."""
    layout, offset = [], 0
    for name, p in params.items():
        layout.append((name, p.shape, offset))
        offset += -(-p.nbytes // ALIGN) * ALIGN
    return layout, offset


def views(buf, layout, dtype, start: int) -> dict[str, np.ndarray]:
    """name -> an array over buf at `start` + each parameter's offset (no copy)."""
    dtype = np.dtype(dtype)
    return {name: np.ndarray(shape, dtype, buffer=buf, offset=start + offset)
            for name, shape, offset in layout}


class Posted(NamedTuple):
    """An array sent through a worker's outbox: where it is and what it looks like."""
    box: str  # the shared memory's name
    shape: tuple
    dtype: str


class Outbox:
    """A worker's shared memory for the arrays it sends back (a part's logits: at GPT-2's
    vocabulary 100 MB, too much to pickle through a pipe every step). It grows to the
    largest array sent and is replaced, not resized, when a larger one comes."""

    def __init__(self):
        self.shm = None

    def post(self, a: np.ndarray) -> Posted:
        if self.shm is None or self.shm.size < a.nbytes:
            self.close()
            self.shm = shared_memory.SharedMemory(create=True, size=max(1, a.nbytes))
        np.copyto(np.ndarray(a.shape, a.dtype, buffer=self.shm.buf), a)
        return Posted(self.shm.name, a.shape, a.dtype.str)

    def close(self):
        if self.shm is not None:
            self.shm.close()
            self.shm.unlink()
            self.shm = None


def part_of(a, s: slice):
    """The rows s of a per-row array, or None for None (no mask, no targets)."""
    return None if a is None else a[s]


def frozen_names(model) -> list[str]:
    """The parameters no entry of which trains (masks.is_frozen): the worker freezes them too."""
    return [name for name in model.params if M.is_frozen(model, name)]


class BatchWorkers:
    """n_workers processes, each holding a copy of one model and running a part of its
    batch; the parts go out and come back through forward / backbone / backward."""

    def __init__(self, n_workers: int):
        ctx = multiprocessing.get_context("spawn")
        self.conns, self.procs = [], []
        for k in range(n_workers):
            mine, theirs = ctx.Pipe()
            proc = ctx.Process(target=worker_main, args=(theirs,), daemon=True,
                               name=f"transferlab-part{k + 1}")
            proc.start()
            theirs.close()
            self.conns.append(mine)
            self.procs.append(proc)
        self.shm = None  # the shared block: the weights, then one gradient area per worker
        self.outboxes: dict[str, shared_memory.SharedMemory] = {}  # the workers' (by name)
        self.settings = None  # what the workers' models were last built from
        self.weights: dict[str, np.ndarray] = {}  # views of the block: the weights
        self.grads: list[dict[str, np.ndarray]] = []  # and each worker's gradients
        self._closer = weakref.finalize(self, BatchWorkers._close, self.conns, self.procs, [None])

    @property
    def n_workers(self) -> int:
        return len(self.conns)

    def close(self):
        self._closer.detach()
        for box in self.outboxes.values():
            box.close()
        BatchWorkers._close(self.conns, self.procs, [self.shm])
        self.shm = None

    @staticmethod
    def _close(conns, procs, shms):
        for conn in conns:
            try:
                conn.send(("stop",))
                conn.close()
            except (OSError, ValueError):
                pass
        for proc in procs:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()
        for shm in shms:
            if shm is not None:
                shm.close()
                shm.unlink()

    # ------------------------------------------------------------------ the model

    def sync(self, model):
        """Give every worker the model's settings (if they changed) and its weights."""
        layout, nbytes = block_layout(model.params)
        try:
            table = pickle.dumps(model.kernels)
        except Exception as e:  # a table of lambdas or local functions
            raise ValueError(f"batch_processes needs a kernel table other processes can "
                             f"import (a name in kernels.KERNELS): {e}") from None
        settings = (model.config, table, model.dtype.str, layout, frozen_names(model))
        if settings != self.settings:
            self._rebuild(model, settings, layout, nbytes)
        # the workers wait for this copy: it runs in as many threads as there are processes
        split_in_threads(np.copyto, [(self.weights[name], p) for name, p in model.params.items()],
                         self.n_workers + 1)

    def _rebuild(self, model, settings, layout, nbytes):
        size = nbytes * (1 + self.n_workers)
        if self.shm is None or self.shm.size < size:  # a larger block (a new head, LoRA)
            old, self.weights, self.grads = self.shm, {}, []
            self.shm = shared_memory.SharedMemory(create=True, size=max(1, size))
            self._closer.detach()
            self._closer = weakref.finalize(self, BatchWorkers._close, self.conns, self.procs, [self.shm])
            if old is not None:  # no view of it is left here; the worker drops its own
                old.close()
                old.unlink()
        self.weights = views(self.shm.buf, layout, model.dtype, 0)
        starts = [nbytes * (k + 1) for k in range(self.n_workers)]
        self.grads = [views(self.shm.buf, layout, model.dtype, start) for start in starts]
        # the worker splits its gradients' copy as this process splits its passes (the
        # threshold goes with the message, so one setting holds for every process)
        split = (self.n_workers + 1, kernels.SPLIT_FROM)
        self._call([("model", self.shm.name, settings, start, split) for start in starts])
        self.settings = settings

    @property
    def alive(self) -> bool:
        return all(proc.is_alive() for proc in self.procs)

    def _call(self, messages, run_here=None, arg=None):
        """Send each worker its message, run run_here(arg) here meanwhile (BLAS at one
        thread), then hear every worker: (run_here's result, [each worker's reply]). All
        replies are read before an error is raised, here or in a worker, so a call never
        leaves a reply behind for the next one."""
        sent, here = [], None
        try:
            for conn, msg in zip(self.conns, messages):
                self._send(conn, *msg)
                sent.append(conn)
            if run_here is not None:
                with blas_threads(1):
                    here = run_here(arg)
        finally:
            replies, error = [], None
            for conn in sent:
                try:
                    replies.append(self._reply(conn))
                except WorkerError as err:
                    error = error or err
        if error is not None:
            raise error
        return here, replies

    def _send(self, conn, *msg):
        try:
            conn.send(msg)
        except (OSError, ValueError):
            raise WorkerError(EXITED) from None

    def _reply(self, conn):
        try:
            kind, *payload = conn.recv()
        except (EOFError, OSError):
            raise WorkerError(EXITED) from None
        if kind == "error":
            raise WorkerError("a batch worker process failed:\n" + payload[0])
        return [self._unpack(x) for x in payload]

    def _unpack(self, x):
        """An array a worker put in its outbox (a view, valid until its next reply), or x."""
        if not isinstance(x, Posted):
            return x
        box = self.outboxes.get(x.box)
        if box is None:
            box = self.outboxes[x.box] = shared_memory.SharedMemory(name=x.box)
        return np.ndarray(x.shape, np.dtype(x.dtype), buffer=box.buf)

    # ------------------------------------------------------------------ a step

    def forward(self, model, run_here, parts, idx, targets, pad_mask, count):
        """[run_here(parts[0]), (logits, loss, None) of every other part]: the first part in
        this process while the workers run theirs."""
        self.sync(model)
        first, replies = self._call([("forward", model.training, idx[s], part_of(targets, s),
                                      part_of(pad_mask, s), count) for s in parts[1:]],
                                    run_here, parts[0])
        return [first] + [(logits, loss, None) for logits, loss in replies]

    def backbone(self, model, run_here, parts, idx, pad_mask):
        """[h of every part]: backbone(..., keep_cache=False) on the parts."""
        self.sync(model)
        first, replies = self._call([("backbone", model.training, idx[s], part_of(pad_mask, s))
                                     for s in parts[1:]], run_here, parts[0])
        return [first] + [h for (h,) in replies]

    def backward(self, run_here, first_cache):
        """[run_here(first_cache), each worker's gradients]: name -> gradient, None where
        nothing was computed. A worker's gradients are views of the shared block, valid
        until its next backward."""
        first, replies = self._call([("backward",)] * self.n_workers, run_here, first_cache)
        return [first] + [{name: g if name in computed else None for name, g in grads.items()}
                          for (computed,), grads in zip(replies, self.grads)]


# ----------------------------------------------------------------------------------------
# the worker process


class Worker:
    """What a worker process holds between messages: the shared block and its views, the
    model built on them, the cache of the part it ran last, and its outbox. Each method
    answers one kind of message with the tuple that follows "ok" in the reply."""

    def __init__(self):
        self.shm, self.model, self.cache, self.grads_out = None, None, None, {}
        self.outbox = Outbox()
        self.split = (1, None)  # (threads, from how many entries) for the copy of its
        # gradients, which the other processes wait for (kernels.split_in_threads)

    def build(self, name, settings, grad_start, split):
        from .model import worker_model  # imported here: model.py imports this module

        config, table, dtype, layout, frozen = settings
        if self.shm is None or self.shm.name != name:  # a new block: drop every view of the old
            self.model = self.cache = None
            self.grads_out = {}
            if self.shm is not None:
                self.shm.close()
            self.shm = shared_memory.SharedMemory(name=name)
        self.grads_out = views(self.shm.buf, layout, dtype, grad_start)
        self.split = split
        self.model = worker_model(config, pickle.loads(table), views(self.shm.buf, layout, dtype, 0),
                                  frozen)
        self.cache = None
        return ()

    def forward(self, training, idx, targets, pad_mask, count):
        self.model.training = training
        logits, loss, self.cache = self.model.part_forward(idx, targets, pad_mask, count)
        return self.outbox.post(logits), loss

    def backbone(self, training, idx, pad_mask):
        self.model.training = training
        return (self.outbox.post(self.model.backbone(idx, pad_mask)),)

    def backward(self):
        grads = self.model.step_backward(self.cache)
        self.cache = None
        split_in_threads(np.copyto, [(self.grads_out[name], g) for name, g in grads.items() if g is not None],
                         *self.split)
        return ({name for name, g in grads.items() if g is not None},)

    def close(self):
        self.model = self.cache = None
        self.grads_out = {}
        self.outbox.close()
        if self.shm is not None:
            self.shm.close()


def worker_main(conn):
    """A worker process's loop: answer each message until "stop" or the pipe closes."""
    # Ctrl-C reaches the whole process group: the parent decides what happens (a runner
    # saves its journal), and stops its workers
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    worker = Worker()
    answer = {"model": worker.build, "forward": worker.forward, "backbone": worker.backbone,
              "backward": worker.backward}
    with blas_threads(1):
        while True:
            try:
                kind, *args = conn.recv()
            except (EOFError, OSError):  # the calling process is gone
                break
            if kind == "stop":
                break
            try:
                reply = ("ok", *answer[kind](*args))
            except BaseException:
                worker.cache = None
                reply = ("error", traceback.format_exc())
            try:
                conn.send(reply)
            except OSError:  # the calling process is gone
                break
    worker.close()
