"""report.py: the summary over seeds, the comparison table and the progress line.

The plot is drawn by every run in test_runner.py and test_cli_end_to_end.py.
"""
import io
import math

import numpy as np
import pytest

from transferlab.report import Progress, summarize, table


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


def test_progress_line_only_when_enabled():
    quiet, loud = io.StringIO(), io.StringIO()
    Progress("x", 4, enabled=False, stream=quiet).update(4, 1.0, 1e-3)
    bar = Progress("full_finetune (seed 0)", 4, enabled=True, stream=loud)
    bar.update(4, 0.5, 1e-3)
    assert quiet.getvalue() == ""
    text = loud.getvalue()
    assert "full_finetune (seed 0)" in text and "4/4" in text and "0.5000" in text
    assert text.endswith("\n") and math.isfinite(float(text.split("loss")[1].split()[0]))
