"""Reporting an experiment: progress (tqdm on a terminal, plain lines elsewhere), the
summary over seeds, the table, the plot.

runner.py runs the experiment and hands its results entries here:

    overall = Overall(n_runs=9, steps_per_run=300)     # run k of N, total time left
    bar = Progress("full_finetune (seed 0)", total=300, overall=overall)  # train() calls it
    summary = summarize(entries, kind)    # mean +- std over seeds per strategy (and relatedness)
    print(table(summary, pretrained_loss))
    plot("results.png", entries, summary, kind, sweep=None)

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


# ---------------------------------------------------------------------- progress


def _clock(seconds: float) -> str:
    seconds = int(round(max(seconds, 0.0)))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


class Overall:
    """The experiment as a whole: run k of N and the total time left (by steps trained).

    On a terminal a tqdm bar on the top line; elsewhere it only feeds the plain lines of
    each run (`Progress`). Runs read back from the journal count as done, not as speed.
    """

    def __init__(self, n_runs: int, steps_per_run: int, enabled: bool = True, stream=None):
        self.stream = stream or sys.stderr
        self.enabled, self.n_runs, self.steps_per_run = enabled, n_runs, steps_per_run
        self.tty = enabled and _isatty(self.stream)
        self.k, self.done_steps, self.trained_steps, self.t0 = 0, 0, 0, time.perf_counter()
        self.bar = None
        if self.tty:
            from tqdm import tqdm

            self.bar = tqdm(total=n_runs * steps_per_run, file=self.stream, position=0,
                            unit="step", dynamic_ncols=True, desc=f"run 0/{n_runs}",
                            bar_format="{desc} {percentage:3.0f}%|{bar}| {elapsed}<{remaining} total")

    def time_left(self) -> float | None:
        elapsed = time.perf_counter() - self.t0
        if self.trained_steps == 0:
            return None
        rate = self.trained_steps / max(elapsed, 1e-9)
        return (self.n_runs * self.steps_per_run - self.done_steps) / rate

    def begin(self, label: str) -> int:
        """A run starts; returns its number k (1-based)."""
        self.k += 1
        if self.bar is not None:
            self.bar.set_description_str(f"run {self.k}/{self.n_runs}", refresh=True)
        return self.k

    def advance(self, steps: int, trained: bool = True) -> None:
        steps = min(steps, self.n_runs * self.steps_per_run - self.done_steps)
        self.done_steps += steps
        if trained:
            self.trained_steps += steps
        if self.bar is not None:
            self.bar.update(steps)

    def finished(self, label: str, steps_run: int, steps_counted: int, how: str = "done",
                 trained: bool = True) -> None:
        """A run ended (or was read back from the journal): count what it did not train."""
        self.advance(max(self.steps_per_run - steps_counted, 0), trained=False)
        if self.enabled and not self.tty:
            left = self.time_left()
            eta = f", total time left {_clock(left)}" if left is not None else ""
            what = how if "step" in how else f"{how} at step {steps_run}"
            self.stream.write(f"run {self.k}/{self.n_runs} {label}: {what}{eta}\n")
            self.stream.flush()

    def note(self, text: str) -> None:
        """A line of its own (early stop, resume, a run read back from the journal)."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text, file=self.stream)
        else:
            self.stream.write(text + "\n")
            self.stream.flush()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _isatty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


class Progress:
    """One run's progress: step, loss, learning rate, it/s and time left.

    On a terminal (stream.isatty()) a tqdm bar, under the experiment's `Overall` bar when
    there is one. Elsewhere (a file, a pipe, CI) one plain line per evaluation and no
    carriage returns. Early stops and resumes get a line of their own (`note`).

        bar = Progress("full_finetune (seed 0)", total=300)   # train() calls bar.update(...)
    """

    def __init__(self, label: str, total: int, enabled: bool = True, stream=None,
                 overall: Overall | None = None):
        self.label, self.total, self.stream = label, total, stream or sys.stderr
        self.enabled, self.overall = enabled, overall
        self.tty = enabled and _isatty(self.stream)
        self.t0 = time.perf_counter()
        self.step = self.first = 0
        self.bar = None
        self.k = overall.begin(label) if overall is not None else None
        if self.tty:
            from tqdm import tqdm

            self.bar = tqdm(total=total, file=self.stream, desc=label, leave=overall is None,
                            position=1 if overall is not None else 0, dynamic_ncols=True,
                            unit="it", bar_format="{desc} {n_fmt}/{total_fmt}|{bar}|"
                                                  "{postfix} {rate_fmt} {remaining} left")

    def _prefix(self) -> str:
        k = f"run {self.k}/{self.overall.n_runs} " if self.overall is not None else ""
        return f"{k}{self.label}"

    def update(self, step: int, loss: float, lr: float) -> None:
        """After each optimizer step (train.train)."""
        if self.overall is not None:
            self.overall.advance(step - self.step)
        if self.step == 0 and step > 1:
            self.first = step - 1  # a resumed run: its rate counts from here
        self.step, self.loss, self.lr = step, loss, lr
        if self.bar is not None:
            self.bar.set_postfix_str(f"loss {loss:.4f} lr {lr:.2e}", refresh=False)
            self.bar.update(step - self.bar.n)

    def evaluated(self, step: int, loss: float, lr: float, metric: str, value: float) -> None:
        """After each evaluation: the plain line (not on a terminal)."""
        if not self.enabled or self.tty:
            return
        elapsed = time.perf_counter() - self.t0
        rate = (step - self.first) / max(elapsed, 1e-9)
        left = (self.total - step) / rate if rate > 0 else 0.0
        total_left = self.overall.time_left() if self.overall is not None else None
        total = f", total time left {_clock(total_left)}" if total_left is not None else ""
        self.stream.write(f"{self._prefix()}: step {step}/{self.total} loss {loss:.4f} "
                          f"lr {lr:.2e} val {metric} {value:.4f} {rate:.0f} it/s, "
                          f"run time left {_clock(left)}{total}\n")
        self.stream.flush()

    def note(self, text: str, step: int | None = None) -> None:
        """A line of its own: "early stop at step 225 ...", "resumed at step 100 ..."."""
        if step is not None and self.step == 0:
            self.step = self.first = step  # resumed: the steps before were done earlier
            if self.overall is not None:
                self.overall.advance(step, trained=False)
            if self.bar is not None:
                self.bar.update(step)
        line = f"{self._prefix()}: {text}"
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(line, file=self.stream)
        else:
            self.stream.write(line + "\n")
            self.stream.flush()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


# ---------------------------------------------------------------------- summary, table, plot


def summarize(entries: list[dict], kind: str, sweep=None) -> list[dict]:
    """Mean and std over seeds per strategy (and relatedness; and learning rate in an lr
    sweep), and the per-seed paired difference against `scratch` at the same relatedness
    (and sweep rate) and seed, when scratch ran. Outside an lr sweep each strategy runs at
    its own rate, so the rate is not part of the pairing."""
    metric = task_kind(kind).metric
    point = (lambda e: e.get("lr")) if sweep == "lr" else (lambda e: None)
    rows, order = {}, []
    for e in entries:
        key = (e["strategy"], e["relatedness"], point(e))
        if key not in rows:
            rows[key], _ = [], order.append(key)
        rows[key].append(e)
    scratch = {(e["relatedness"], point(e), e["seed"]): e["target"][metric]
               for e in entries if e["strategy"] == "scratch"}
    out = []
    for strategy, relatedness, lr in order:
        group = rows[(strategy, relatedness, lr)]
        values = np.array([e["target"][metric] for e in group])
        source = np.array([e["source"]["lm_loss"] for e in group])
        row = {
            "strategy": strategy, "relatedness": relatedness, "lr": lr if sweep == "lr" else group[0].get("lr"),
            "metric": metric, "n_seeds": len(group),
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


def _relatedness(value) -> str:
    """The relat. column: the synthetic target's relatedness, "-" for file data (None)."""
    return f"{'-':>6}" if value is None else f"{value:>6.2f}"


def table(summary: list[dict], pretrained_loss: float | None, references: list[dict] | None = None,
          optimal_lm_loss: float | None = None) -> str:
    """The comparison table printed at the end of a run: strategies, then the references
    (chance, the count baseline, the Bayes ceiling) computed on the same test splits."""
    metric = summary[0]["metric"]
    # the count columns grow with the model (GPT-2's 124,442,114), always a space apart
    wt = max(10, 1 + max(len(f"{r['trainable_params']:,}") for r in summary))
    wo = max(8, 1 + max(len(f"{r['total_params']:,}") for r in summary))
    head = (f"{'strategy':<21} {'relat.':>6} {metric + ' (test)':>17} {'vs scratch':>16} "
            f"{'source LM loss':>17} {'trainable':>{wt}} {'of':>{wo}} {'sec':>6}")
    lines = [head, "-" * len(head)]
    for r in summary:
        gain = r.get("vs_scratch")
        gain_text = f"{gain['mean']:>+9.4f} +- {gain['std']:<5.3f}" if gain else f"{'':>17}"
        lines.append(
            f"{r['strategy']:<21} {_relatedness(r['relatedness'])} {r['mean']:>9.4f} +- {r['std']:<5.3f}"
            f"{gain_text}{r['source_lm_loss_mean']:>10.4f} +- {r['source_lm_loss_std']:<5.3f}"
            f"{r['trainable_params']:>{wt},} {r['total_params']:>{wo},} {r['seconds_mean']:>6.2f}")
    if references:
        lines.append("-" * len(head))
        for r in references:
            label = REFERENCE_LABELS.get(r["name"], r["name"])
            lines.append(f"{label:<21} {_relatedness(r['relatedness'])} {r['mean']:>9.4f} +- {r['std']:<5.3f}")
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
    (or against the swept knob: `sweep` is "relatedness", "lr" or None), the paired gain
    over scratch with its seed spread, and forgetting (source LM loss, with the pretrained
    model's and the optimum as lines)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = task_kind(kind).metric
    knob, sweep = sweep, sweep is not None  # the swept knob ("relatedness", "lr") or None
    refs = summarize_references(references or [], kind)
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(16, 4.8))
    strategies = list(dict.fromkeys(e["strategy"] for e in entries))
    colors = strategy_colors(strategies)
    # the panels without a sweep show the highest relatedness (None: file data has none)
    top_r = max((e["relatedness"] for e in entries), key=lambda r: -1.0 if r is None else r)
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
    at = "" if top_r is None else f" (relatedness {top_r:g})"
    ax3.set_title(f"forgetting{at}: source LM loss after transfer")
    ax3.legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with atomic_open(path) as f:
            fig.savefig(f, format="png", dpi=110)
    finally:
        plt.close(fig)
