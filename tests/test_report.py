"""report.py: the summary over seeds, the comparison table and the progress line.

The plot is drawn by every run in test_runner.py and test_cli_end_to_end.py.
"""
import io
import math

import numpy as np
import pytest

from transferlab.report import Overall, Progress, summarize, table


# ---------------------------------------------------------------------- summary and table


def entry(strategy, seed, value, loss, relatedness=1.0):
    return {"strategy": strategy, "seed": seed, "relatedness": relatedness, "target": {"accuracy": value},
            "source": {"lm_loss": loss}, "trainable_params": 10, "total_params": 100, "seconds": 1.0}


def test_summary_is_mean_and_std_over_seeds_per_strategy_and_relatedness():
    entries = [entry("scratch", 0, 0.5, 2.0), entry("bitfit", 0, 0.9, 1.0),
               entry("scratch", 1, 0.7, 2.2), entry("bitfit", 1, 0.8, 1.5),
               entry("scratch", 0, 0.1, 3.0, relatedness=0.0)]
    rows = summarize(entries, "topic")
    assert [(r["strategy"], r["relatedness"], r["n_seeds"]) for r in rows] == [
        ("scratch", 1.0, 2), ("bitfit", 1.0, 2), ("scratch", 0.0, 1)]  # first-seen order
    scratch, bitfit, unrelated = rows
    assert scratch["metric"] == "accuracy"
    assert scratch["mean"] == pytest.approx(np.mean([0.5, 0.7]))
    assert scratch["std"] == pytest.approx(np.std([0.5, 0.7]))
    assert bitfit["std"] == pytest.approx(np.std([0.9, 0.8]))
    assert bitfit["source_lm_loss_mean"] == pytest.approx(1.25)
    assert bitfit["source_lm_loss_std"] == pytest.approx(np.std([1.0, 1.5]))
    assert unrelated["mean"] == pytest.approx(0.1) and unrelated["std"] == 0.0


def test_summary_uses_the_primary_metric_of_the_task():
    entries = [{**entry("scratch", s, 0.0, 1.0), "target": {"mse": m, "mae": 0.5}}
               for s, m in ((0, 0.02), (1, 0.04))]
    (row,) = summarize(entries, "score")
    assert row["metric"] == "mse" and row["mean"] == pytest.approx(0.03)


def test_table_has_a_row_per_strategy_and_the_pretrained_loss():
    rows = summarize([entry("scratch", 0, 0.5, 2.0), entry("full_finetune", 0, 0.75, 2.5)], "topic")
    text = table(rows, 2.125)
    lines = text.splitlines()
    assert "accuracy (test)" in lines[0]
    assert [line.split()[0] for line in lines[2:4]] == ["scratch", "full_finetune"]
    assert "0.7500" in lines[3] and "2.5000" in lines[3]
    assert lines[-1].endswith("2.1250)")
    assert "before any transfer" not in table(rows, None)


# ---------------------------------------------------------------------- progress line


class Terminal(io.StringIO):
    """A stream that says it is a terminal, as sys.stderr does in an interactive shell."""

    def isatty(self):
        return True


def test_progress_is_silent_when_disabled():
    quiet = io.StringIO()
    overall = Overall(2, 4, enabled=False, stream=quiet)
    bar = Progress("x", 4, enabled=False, stream=quiet, overall=overall)
    bar.update(4, 1.0, 1e-3)
    bar.evaluated(4, 1.0, 1e-3, "accuracy", 0.5)
    bar.note("early stop at step 4")
    overall.finished("x", 4, 4)
    assert quiet.getvalue() == ""


def test_not_on_a_terminal_one_plain_line_per_evaluation_and_no_carriage_returns():
    out = io.StringIO()  # a file or a pipe: isatty() is False
    overall = Overall(n_runs=2, steps_per_run=6, stream=out)
    bar = Progress("full_finetune (seed 0)", 6, stream=out, overall=overall)
    for step in range(1, 6):
        bar.update(step, 0.5, 1e-3)
        if step % 3 == 0:
            bar.evaluated(step, 0.5, 1e-3, "accuracy", 0.75)
    bar.note("early stop at step 5: no better accuracy in 1 evaluations")
    bar.close()
    overall.finished("full_finetune (seed 0)", 5, bar.step, "early stop")
    text = out.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    assert len(lines) == 3, text  # the evaluation, the early stop, the end of the run
    assert lines[0].startswith("run 1/2 full_finetune (seed 0): step 3/6 loss 0.5000 lr 1.00e-03 "
                               "val accuracy 0.7500")
    assert "it/s" in lines[0] and "total time left" in lines[0]
    assert lines[1] == ("run 1/2 full_finetune (seed 0): early stop at step 5: "
                        "no better accuracy in 1 evaluations")  # on a line of its own
    assert lines[2].startswith("run 1/2 full_finetune (seed 0): early stop at step 5")
    assert overall.done_steps == 6  # the step the early stop skipped counts as done


def test_on_a_terminal_an_overall_bar_above_the_run_bar():
    out = Terminal()
    overall = Overall(n_runs=3, steps_per_run=4, stream=out)
    bar = Progress("bitfit (seed 1)", 4, stream=out, overall=overall)
    for step in range(1, 5):
        bar.update(step, 0.25, 2e-3)
    bar.note("resumed at step 2 from x.npz")
    bar.close()
    overall.finished("bitfit (seed 1)", 4, bar.step)
    overall.close()
    text = out.getvalue()
    assert "run 1/3" in text and "total" in text  # run k of N, total time left
    assert "bitfit (seed 1) 4/4" in text and "loss 0.2500 lr 2.00e-03" in text and "it/s" in text
    # a line of its own: the bars are cleared (\r, blanks, cursor up) before it, redrawn after
    assert "\x1b[Arun 1/3 bitfit (seed 1): resumed at step 2 from x.npz\n" in text


def test_paired_gain_pairs_by_seed_whatever_rate_each_strategy_used():
    """Strategies run at their own rates (strategies.lr): the gain over scratch still pairs
    seed with seed. Only in an lr sweep does the rate split the rows and the pairs."""
    def e(strategy, seed, acc, lr):
        return {"strategy": strategy, "seed": seed, "relatedness": 1.0, "lr": lr, "task": "topic",
                "target": {"accuracy": acc}, "source": {"lm_loss": 2.0}, "trainable_params": 1,
                "total_params": 1, "seconds": 0.1, "history": []}
    entries = [e("scratch", 0, 0.30, 3e-3), e("scratch", 1, 0.40, 3e-3),
               e("bitfit", 0, 0.90, 1e-4), e("bitfit", 1, 0.95, 1e-4)]
    (scratch, bitfit) = summarize(entries, "topic")
    assert bitfit["vs_scratch"]["per_seed"] == pytest.approx([0.60, 0.55])
    assert bitfit["lr"] == 1e-4 and "vs_scratch" not in scratch
    swept = summarize(entries + [e("bitfit", 0, 0.5, 3e-3), e("bitfit", 1, 0.6, 3e-3)], "topic", sweep="lr")
    at_3e3 = [r for r in swept if r["strategy"] == "bitfit" and r["lr"] == 3e-3][0]
    assert at_3e3["vs_scratch"]["per_seed"] == pytest.approx([0.2, 0.2])  # against scratch at 3e-3
    assert not any("vs_scratch" in r for r in swept if r["strategy"] == "bitfit" and r["lr"] == 1e-4)
