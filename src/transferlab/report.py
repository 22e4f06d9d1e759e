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
    """Mean and std over seeds per strategy (and relatedness, and learning rate in an lr
    sweep), and the per-seed paired difference against `scratch` at the same relatedness
    and seed (when scratch ran)."""
    metric = task_kind(kind).metric
    rows, order = {}, []
    for e in entries:
        key = (e["strategy"], e["relatedness"], e.get("lr"))
        if key not in rows:
            rows[key], _ = [], order.append(key)
        rows[key].append(e)
    scratch = {(e["relatedness"], e.get("lr"), e["seed"]): e["target"][metric]
               for e in entries if e["strategy"] == "scratch"}
    out = []
    for strategy, relatedness, lr in order:
        group = rows[(strategy, relatedness, lr)]
        values = np.array([e["target"][metric] for e in group])
        source = np.array([e["source"]["lm_loss"] for e in group])
        row = {
            "strategy": strategy, "relatedness": relatedness, "lr": lr, "metric": metric, "n_seeds": len(group),
            "mean": float(values.mean()), "std": float(values.std()),
            "source_lm_loss_mean": float(source.mean()), "source_lm_loss_std": float(source.std()),
            "trainable_params": group[0]["trainable_params"], "total_params": group[0]["total_params"],
            "seconds_mean": float(np.mean([e["seconds"] for e in group])),
        }
        paired = [e["target"][metric] - scratch[(relatedness, lr, e["seed"])] for e in group
                  if (relatedness, lr, e["seed"]) in scratch]
        if paired and strategy != "scratch":
            row["vs_scratch"] = {"per_seed": [float(d) for d in paired], "mean": float(np.mean(paired)),
                                 "std": float(np.std(paired))}
        out.append(row)
    return out


def summarize_references(references: list[dict], kind: str) -> list[dict]:
    """Mean and std over seeds of each baseline (chance, count, bayes) per relatedness."""
    metric = task_kind(kind).metric
    groups: dict = {}
    for e in references:
        groups.setdefault((e["name"], e["relatedness"]), []).append(e["target"][metric])
    return [{"name": name, "relatedness": r, "metric": metric, "n_seeds": len(v),
             "mean": float(np.mean(v)), "std": float(np.std(v))} for (name, r), v in groups.items()]


REFERENCE_LABELS = {"chance": "chance (majority)", "count": "count baseline",
                    "bayes": "Bayes ceiling"}


def table(summary: list[dict], pretrained_loss: float | None, references: list[dict] | None = None,
          optimal_lm_loss: float | None = None) -> str:
    """The comparison table printed at the end of a run: strategies, then the references
    (chance, the count baseline, the Bayes ceiling) computed on the same test splits."""
    metric = summary[0]["metric"]
    head = (f"{'strategy':<21} {'relat.':>6} {metric + ' (test)':>17} {'vs scratch':>16} "
            f"{'source LM loss':>17} {'trainable':>10} {'of':>8} {'sec':>6}")
    lines = [head, "-" * len(head)]
    for r in summary:
        gain = r.get("vs_scratch")
        gain_text = f"{gain['mean']:>+9.4f} +- {gain['std']:<5.3f}" if gain else f"{'':>17}"
        lines.append(
            f"{r['strategy']:<21} {r['relatedness']:>6.2f} {r['mean']:>9.4f} +- {r['std']:<5.3f}"
            f"{gain_text}{r['source_lm_loss_mean']:>10.4f} +- {r['source_lm_loss_std']:<5.3f}"
            f"{r['trainable_params']:>10,} {r['total_params']:>8,} {r['seconds_mean']:>6.2f}")
    if references:
        lines.append("-" * len(head))
        for r in references:
            label = REFERENCE_LABELS.get(r["name"], r["name"])
            lines.append(f"{label:<21} {r['relatedness']:>6.2f} {r['mean']:>9.4f} +- {r['std']:<5.3f}")
    if pretrained_loss is not None:
        optimum = (f"; the optimum is {optimal_lm_loss:.4f}, a gap of {pretrained_loss - optimal_lm_loss:.4f}"
                   if optimal_lm_loss is not None else "")
        lines.append(f"(source LM loss of the pretrained model before any transfer: {pretrained_loss:.4f}{optimum})")
    return "\n".join(lines)


def strategy_colors(names) -> dict:
    """One colour per strategy, the same in every figure: by its place in the registry."""
    import matplotlib.pyplot as plt

    from .strategies import STRATEGIES

    order = list(STRATEGIES) + [n for n in names if n not in STRATEGIES]
    return {n: plt.cm.tab20(order.index(n) % 20) for n in names}


REFERENCE_STYLE = {"bayes": ("black", "-"), "count": ("dimgray", "--"), "chance": ("silver", ":")}


def plot(path, entries: list[dict], summary: list[dict], kind: str, sweep,
         references: list[dict] | None = None, pretrained_loss: float | None = None,
         optimal_lm_loss: float | None = None) -> None:
    """Three panels that do not exaggerate: the test metric with the references as lines
    (or against relatedness in a sweep), the paired gain over scratch with its seed spread,
    and forgetting (source LM loss, with the pretrained model's and the optimum as lines)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = task_kind(kind).metric
    knob = {True: "relatedness", False: None}.get(sweep, sweep)  # the swept knob, or None
    sweep = knob is not None
    refs = summarize_references(references or [], kind)
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(16, 4.8))
    strategies = list(dict.fromkeys(e["strategy"] for e in entries))
    colors = strategy_colors(strategies)
    top_r = max(e["relatedness"] for e in entries)
    if sweep:
        for s in strategies:
            rows = [r for r in summary if r["strategy"] == s]
            ax1.errorbar([r[knob] for r in rows], [r["mean"] for r in rows],
                         yerr=[r["std"] for r in rows], marker="o", capsize=3, label=s, color=colors[s])
        for name, (color, style) in REFERENCE_STYLE.items():
            rows = [r for r in refs if r["name"] == name]
            if rows and knob == "relatedness":
                ax1.plot([r["relatedness"] for r in rows], [r["mean"] for r in rows], style, color=color,
                         label=REFERENCE_LABELS[name])
        ax1.set_xlabel(knob)
        if knob == "lr":
            ax1.set_xscale("log")
        ax1.set_title(f"test {metric} vs {knob} (mean +- std over seeds)")
    else:
        rows = [r for r in summary if r["relatedness"] == top_r]
        ax1.bar(range(len(rows)), [r["mean"] for r in rows], yerr=[r["std"] for r in rows],
                color=[colors[r["strategy"]] for r in rows], capsize=3)
        ax1.set_xticks(range(len(rows)), [r["strategy"] for r in rows], rotation=35, ha="right", fontsize=8)
        for r in refs:
            if r["relatedness"] == top_r and r["name"] in REFERENCE_STYLE:
                color, style = REFERENCE_STYLE[r["name"]]
                ax1.axhline(r["mean"], color=color, linestyle=style, label=REFERENCE_LABELS[r["name"]])
        ax1.set_title(f"test {metric} (mean +- std over seeds)")
        # the axis starts at chance (or 0), never just under the bars: gaps keep their size
        chance = [r["mean"] for r in refs if r["name"] == "chance" and r["relatedness"] == top_r]
        if task_kind(kind).goal == "max":
            ax1.set_ylim(bottom=min(chance + [min(r["mean"] - r["std"] for r in rows)]) * 0.95 if chance else 0.0)
    ax1.set_ylabel(f"test {metric}")
    ax1.legend(fontsize=7)
    # gain over scratch, per seed paired, at the top relatedness (or per relatedness in a sweep)
    gains = [r for r in summary if "vs_scratch" in r and (sweep or r["relatedness"] == top_r)]
    if sweep:
        for s in strategies:
            rows = [r for r in gains if r["strategy"] == s]
            if rows:
                ax2.errorbar([r[knob] for r in rows], [r["vs_scratch"]["mean"] for r in rows],
                             yerr=[r["vs_scratch"]["std"] for r in rows], marker="o", capsize=3,
                             color=colors[s], label=s)
        ax2.set_xlabel(knob)
        if knob == "lr":
            ax2.set_xscale("log")
    elif gains:
        ax2.bar(range(len(gains)), [r["vs_scratch"]["mean"] for r in gains],
                yerr=[r["vs_scratch"]["std"] for r in gains], color=[colors[r["strategy"]] for r in gains],
                capsize=3)
        ax2.set_xticks(range(len(gains)), [r["strategy"] for r in gains], rotation=35, ha="right", fontsize=8)
    ax2.axhline(0.0, color="black", linewidth=0.8)
    ax2.set_ylabel(f"{metric} minus scratch's (same seed)")
    ax2.set_title("gain over scratch (mean +- std of paired differences)")
    # forgetting: the source LM loss of each adapted backbone
    rows = [r for r in summary if r["relatedness"] == top_r]
    ax3.bar(range(len(rows)), [r["source_lm_loss_mean"] for r in rows],
            yerr=[r["source_lm_loss_std"] for r in rows], color=[colors[r["strategy"]] for r in rows], capsize=3)
    ax3.set_xticks(range(len(rows)), [r["strategy"] for r in rows], rotation=35, ha="right", fontsize=8)
    if pretrained_loss is not None:
        ax3.axhline(pretrained_loss, color="dimgray", linestyle="--", label="pretrained model")
    if optimal_lm_loss is not None:
        ax3.axhline(optimal_lm_loss, color="black", label="optimum")
    ax3.set_ylim(bottom=0.0)
    ax3.set_ylabel("source LM loss (nats)")
    ax3.set_title(f"forgetting (relatedness {top_r:g}): source LM loss after transfer")
    ax3.legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with atomic_open(path) as f:
            fig.savefig(f, format="png", dpi=110)
    finally:
        plt.close(fig)
