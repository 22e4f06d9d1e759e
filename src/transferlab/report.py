"""Reporting an experiment: the progress line, the summary over seeds, the table, the plot.

runner.py runs the experiment and hands its results entries here:

    bar = Progress("full_finetune (seed 0)", total=300)   # train() calls bar.update(...)
    summary = summarize(entries, kind)    # mean +- std over seeds per strategy (and relatedness)
    print(table(summary, pretrained_loss))
    plot("results.png", entries, summary, kind, sweep=False)

The results JSON is written by fileio.write_json_atomic, the plot through
fileio.atomic_open. See docs/results.md.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

from .fileio import atomic_open
from .tasks import task_kind


# ---------------------------------------------------------------------- progress line


class Progress:
    """One status line on stderr: what runs, step, loss, rate and time left."""

    def __init__(self, label: str, total: int, enabled: bool = True, stream=None):
        self.label, self.total, self.stream = label, total, stream or sys.stderr
        self.enabled = enabled
        self.t0 = time.perf_counter()
        self.last_draw = 0.0

    def update(self, step: int, loss: float, lr: float) -> None:
        now = time.perf_counter()
        if not self.enabled or (now - self.last_draw < 0.1 and step < self.total):
            return
        self.last_draw = now
        rate = step / max(now - self.t0, 1e-9)
        eta = (self.total - step) / rate if rate > 0 else 0.0
        self.stream.write(f"\r{self.label:<28} {step:>5}/{self.total} loss {loss:7.4f} "
                          f"lr {lr:.2e} {rate:6.0f} it/s eta {eta:4.1f}s ")
        if step >= self.total:
            self.stream.write("\n")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self.stream.write("\n")
            self.stream.flush()


# ---------------------------------------------------------------------- summary, table, plot


def summarize(entries: list[dict], kind: str) -> list[dict]:
    """Mean and std over seeds per strategy (and relatedness)."""
    metric = task_kind(kind).metric
    rows, order = {}, []
    for e in entries:
        key = (e["strategy"], e["relatedness"])
        if key not in rows:
            rows[key], _ = [], order.append(key)
        rows[key].append(e)
    out = []
    for strategy, relatedness in order:
        group = rows[(strategy, relatedness)]
        values = np.array([e["target"][metric] for e in group])
        source = np.array([e["source"]["lm_loss"] for e in group])
        out.append({
            "strategy": strategy, "relatedness": relatedness, "metric": metric, "n_seeds": len(group),
            "mean": float(values.mean()), "std": float(values.std()),
            "source_lm_loss_mean": float(source.mean()), "source_lm_loss_std": float(source.std()),
            "trainable_params": group[0]["trainable_params"], "total_params": group[0]["total_params"],
            "seconds_mean": float(np.mean([e["seconds"] for e in group])),
        })
    return out


def table(summary: list[dict], pretrained_loss: float | None) -> str:
    """The comparison table printed at the end of a run."""
    metric = summary[0]["metric"]
    head = (f"{'strategy':<21} {'relat.':>6} {metric + ' (test)':>17} {'source LM loss':>17} "
            f"{'trainable':>10} {'of':>8} {'sec':>6}")
    lines = [head, "-" * len(head)]
    for r in summary:
        lines.append(
            f"{r['strategy']:<21} {r['relatedness']:>6.2f} {r['mean']:>9.4f} +- {r['std']:<5.3f}"
            f"{r['source_lm_loss_mean']:>10.4f} +- {r['source_lm_loss_std']:<5.3f}"
            f"{r['trainable_params']:>10,} {r['total_params']:>8,} {r['seconds_mean']:>6.2f}")
    if pretrained_loss is not None:
        lines.append(f"(source LM loss of the pretrained model before any transfer: {pretrained_loss:.4f})")
    return "\n".join(lines)


def plot(path, entries: list[dict], summary: list[dict], kind: str, sweep: bool) -> None:
    """Learning curves per strategy and the final metric per strategy (or vs relatedness)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = task_kind(kind).metric
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    strategies = list(dict.fromkeys(e["strategy"] for e in entries))
    colors = {s: plt.cm.tab10(i % 10) for i, s in enumerate(strategies)}
    top_r = max(e["relatedness"] for e in entries)
    for s in strategies:
        curves = [e["history"] for e in entries if e["strategy"] == s and e["relatedness"] == top_r]
        steps = [h["step"] for h in curves[0]]
        n = min(len(c) for c in curves)
        vals = np.array([[h[metric] for h in c[:n]] for c in curves]).mean(axis=0)
        ax1.plot(steps[:n], vals, label=s, color=colors[s])
    ax1.set_xlabel("step")
    ax1.set_ylabel(f"validation {metric}")
    ax1.set_title(f"learning curves ({kind}, relatedness {top_r:g}, mean over seeds)")
    ax1.legend(fontsize=7)
    if sweep:
        for s in strategies:
            rows = [r for r in summary if r["strategy"] == s]
            ax2.errorbar([r["relatedness"] for r in rows], [r["mean"] for r in rows],
                         yerr=[r["std"] for r in rows], marker="o", capsize=3, label=s, color=colors[s])
        ax2.set_xlabel("relatedness")
        ax2.legend(fontsize=7)
        ax2.set_title(f"test {metric} vs relatedness")
    else:
        rows = [r for r in summary if r["relatedness"] == top_r]
        ax2.bar(range(len(rows)), [r["mean"] for r in rows], yerr=[r["std"] for r in rows],
                color=[colors[r["strategy"]] for r in rows], capsize=3)
        ax2.set_xticks(range(len(rows)), [r["strategy"] for r in rows], rotation=35, ha="right", fontsize=8)
        ax2.set_title(f"test {metric} (mean +- std over seeds)")
        low = min(r["mean"] - r["std"] for r in rows)
        ax2.set_ylim(bottom=max(0.0, low - 0.1 * abs(low)))  # start near the data: gaps stay visible
    ax2.set_ylabel(f"test {metric}")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with atomic_open(path) as f:
            fig.savefig(f, format="png", dpi=110)
    finally:
        plt.close(fig)
