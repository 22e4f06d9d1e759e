"""Tests for transferlab.schedules: each formula at hand-computed points, torch's
ReduceLROnPlateau for the plateau rule, and JSON-able state dicts."""
import json
import math

import numpy as np
import pytest

from reference import import_torch, leaves, step_beside_torch
from transferlab.optim import SGD
from transferlab.schedules import (
    Constant,
    ReduceOnPlateau,
    SlantedTriangular,
    TransferSchedule,
    WarmupCosine,
    discriminative_scales,
    make_schedule,
)

# ----------------------------------------------------------------------------------------
# warmup + cosine


def test_warmup_cosine_hand_computed_values():
    s = WarmupCosine(lr_max=1.0, total_steps=10, warmup_steps=2, min_lr=0.1)
    expected = {
        0: 0.5,                   # 1.0 * (0+1)/2
        1: 1.0,                   # warmup ends at lr_max
        2: 1.0,                   # cosine starts at lr_max: cos(0) = 1
        4: 0.8681980515339464,    # 0.1 + 0.9 * 0.5*(1 + cos(pi/4))
        6: 0.55,                  # half way: 0.1 + 0.9 * 0.5
        8: 0.23180194846605365,   # 0.1 + 0.9 * 0.5*(1 + cos(3pi/4))
        10: 0.1,                  # total_steps: min_lr
        1000: 0.1,                # and min_lr after
    }
    for step, lr in expected.items():
        assert s.lr_at(step) == pytest.approx(lr, rel=1e-14, abs=1e-15), step


def test_warmup_cosine_endpoints_and_shape():
    s = WarmupCosine(lr_max=3e-4, total_steps=100, warmup_steps=10, min_lr=3e-5)
    assert s.lr_at(0) == pytest.approx(3e-5)   # lr_max / warmup_steps, never 0
    assert s.lr_at(9) == s.lr_at(10) == 3e-4
    assert s.lr_at(100) == 3e-5
    lrs = [s.lr_at(t) for t in range(101)]
    assert all(a < b for a, b in zip(lrs[:9], lrs[1:10]))      # rises during warmup
    assert all(a > b for a, b in zip(lrs[10:100], lrs[11:101]))  # falls after
    assert isinstance(s.lr_at(50), float)


def test_warmup_cosine_without_warmup_starts_at_lr_max():
    s = WarmupCosine(lr_max=2.0, total_steps=4)
    assert [s.lr_at(t) for t in range(5)] == pytest.approx(
        [2.0, 1.0 + math.cos(math.pi / 4), 1.0, 1.0 - math.cos(math.pi / 4), 0.0])


# ----------------------------------------------------------------------------------------
# slanted triangular (ULMFiT eq. 3)


def test_slanted_triangular_hand_computed_values():
    s = SlantedTriangular(lr_max=0.01, total_steps=100, cut_frac=0.1, ratio=32)
    assert s.cut == 10
    expected = {
        0: 0.0003125,             # p = 0: lr_max / ratio
        5: 0.00515625,            # p = 0.5: 0.01 * (1 + 0.5*31) / 32
        10: 0.01,                 # p = 1 at the cut: the peak
        20: 0.008923611111111111,  # p = 1 - 10/90: 0.01 * (1 + (8/9)*31) / 32
        55: 0.00515625,           # p = 1 - 45/90 = 0.5 again, on the way down
        100: 0.0003125,           # p = 0 at T
        500: 0.0003125,           # and after
    }
    for step, lr in expected.items():
        assert s.lr_at(step) == pytest.approx(lr, rel=1e-14), step


def test_slanted_triangular_peaks_at_cut():
    s = SlantedTriangular(lr_max=1.0, total_steps=250, cut_frac=0.2, ratio=10)
    lrs = [s.lr_at(t) for t in range(251)]
    assert max(lrs) == lrs[50] == 1.0
    assert lrs.index(max(lrs)) == 50
    assert lrs[0] == pytest.approx(0.1)


def test_slanted_triangular_guards():
    # cut = floor(5 * 0.1) = 0: no rise, a straight fall from lr_max over T steps
    s = SlantedTriangular(lr_max=1.0, total_steps=5, cut_frac=0.1, ratio=32)
    assert s.cut == 0
    assert s.lr_at(0) == 1.0
    assert s.lr_at(5) == pytest.approx(1.0 / 32)
    # T = 25: cut = 2 and the paper's fall lasts 18 steps; without the clip p < 0 and
    # the rate would go negative before T
    s = SlantedTriangular(lr_max=1.0, total_steps=25)
    assert min(s.lr_at(t) for t in range(30)) == pytest.approx(1.0 / 32)
    # 100 * 0.29 is 28.999999999999996 in floating point: the cut must still be 29
    assert SlantedTriangular(lr_max=1.0, total_steps=100, cut_frac=0.29).cut == 29


# ----------------------------------------------------------------------------------------
# constant and plateau


def test_constant():
    s = Constant(0.003)
    assert [s.lr_at(t) for t in (0, 1, 10**6)] == [0.003] * 3


def test_plateau_hand_computed_sequence():
    s = ReduceOnPlateau(lr=1.0, patience=1, factor=0.5, min_lr=0.2)
    metrics = [5, 4, 4, 4, 3, 3, 3, 3, 3, 3, 3]
    # bad evaluations: -, -, 1, 2>1 cut, -, 1, 2 cut, 1, 2 cut (0.125 -> min_lr 0.2), 1, 2
    expected = [1.0, 1.0, 1.0, 0.5, 0.5, 0.5, 0.25, 0.25, 0.2, 0.2, 0.2]
    assert [s.step(m) for m in metrics] == expected
    assert s.lr_at(0) == s.lr_at(12345) == 0.2


def test_plateau_relative_threshold():
    s = ReduceOnPlateau(lr=1.0, patience=0, threshold=0.1)
    s.step(1.0)
    assert s.step(0.95) == 0.5   # 0.95 is not below 1.0 * (1 - 0.1): no improvement
    assert s.step(0.85) == 0.5   # 0.85 < 0.9: improvement, no cut


@pytest.mark.parametrize("mode, first", [("min", 1e300), ("max", -1e300)])
def test_plateau_first_metric_is_never_a_bad_evaluation(mode, first):
    s = ReduceOnPlateau(lr=1.0, patience=0, mode=mode)
    assert s.step(first) == 1.0  # with patience 0 a single bad evaluation would cut
    assert s.best == first


def test_plateau_skips_a_cut_smaller_than_eps():
    s = ReduceOnPlateau(lr=1.5e-8, patience=0, eps=1e-8)
    s.step(1.0)
    assert s.step(1.0) == 1.5e-8  # the cut to 0.75e-8 would change lr by < eps


@pytest.mark.parametrize("mode, kwargs", [
    ("min", dict(patience=2, factor=0.5, min_lr=0.01, threshold=1e-4)),
    ("max", dict(patience=1, factor=0.3, min_lr=0.0, threshold=1e-2)),
])
def test_plateau_matches_torch(mode, kwargs):
    """Each metric goes to our schedule and to torch's ReduceLROnPlateau; the rates agree
    exactly, and SGD stepped at them (ours and torch's) gives the same parameters."""
    torch = import_torch()
    params = {"w": np.zeros(3)}
    tparams = leaves(params)
    opt, topt = SGD(params, lr=0.8), torch.optim.SGD(list(tparams.values()), lr=0.8)
    theirs = torch.optim.lr_scheduler.ReduceLROnPlateau(topt, mode=mode, **kwargs)
    ours = ReduceOnPlateau(lr=0.8, mode=mode, **kwargs)
    metrics = [1.0, 0.9, 0.9, 0.8999, 0.95, 0.91, 0.85, 0.86, 0.86, 0.86, 0.86, 0.70, 0.7,
               0.7, 0.71, 0.69, 0.69, 0.69, 0.69, 0.69, 0.69, 0.69, 0.69, 0.69]
    if mode == "max":
        metrics = [1.0 - m for m in metrics]
    lrs = []

    def report_metric(step):
        theirs.step(metrics[step])
        lrs.append(ours.step(metrics[step]))
        assert lrs[-1] == topt.param_groups[0]["lr"]
        opt.lr = lrs[-1]

    step_beside_torch(opt, topt, params, tparams, steps=len(metrics), before_step=report_metric)
    assert len(set(lrs)) >= 3  # the sequence did trigger cuts


def test_plateau_state_dict_resumes_mid_sequence_and_is_strict_json():
    metrics = [3, 2, 2, 2, 2, 1, 1, 1, 1, 1]
    straight = ReduceOnPlateau(lr=1.0, patience=1)
    expected = [straight.step(m) for m in metrics]
    first = ReduceOnPlateau(lr=1.0, patience=1)
    for m in metrics[:4]:
        first.step(m)
    text = json.dumps(first.state_dict(), allow_nan=False)
    resumed = ReduceOnPlateau(lr=5.0, patience=7)
    resumed.load_state_dict(json.loads(text))
    assert [resumed.step(m) for m in metrics[4:]] == expected[4:]
    # before any metric, "best" has no value: None, not Infinity (which is not JSON)
    json.dumps(ReduceOnPlateau(lr=1.0).state_dict(), allow_nan=False)


# ----------------------------------------------------------------------------------------
# transfer schedule and discriminative rates


def test_transfer_schedule_multipliers_before_and_after_unfreezing():
    base = WarmupCosine(lr_max=1e-3, total_steps=100, warmup_steps=10)
    s = TransferSchedule(base, head_lr_multiplier=10.0, unfreeze_at_iteration=30,
                         unfreeze_lr_multiplier=0.1)
    assert s.lr_at(42) == base.lr_at(42)
    assert s.multipliers(0) == {"head": 10.0, "backbone": 0.0}
    assert s.multipliers(29) == {"head": 10.0, "backbone": 0.0}
    assert s.multipliers(30) == {"head": 10.0, "backbone": 0.1}
    assert s.backbone_frozen(29) and not s.backbone_frozen(30)
    never_frozen = TransferSchedule(Constant(1.0), unfreeze_lr_multiplier=0.5)
    assert not never_frozen.backbone_frozen(0)
    assert never_frozen.multipliers(0) == {"head": 1.0, "backbone": 0.5}


def test_transfer_schedule_state_dict_round_trip():
    plateau = ReduceOnPlateau(lr=1.0, patience=0)
    s = TransferSchedule(plateau, head_lr_multiplier=5.0, unfreeze_at_iteration=7)
    plateau.step(1.0)
    plateau.step(2.0)  # a cut: lr 0.5
    sd = json.loads(json.dumps(s.state_dict(), allow_nan=False))
    t = TransferSchedule(ReduceOnPlateau(lr=1.0))
    t.load_state_dict(sd)
    assert (t.lr_at(3), t.multipliers(3), t.multipliers(7)) == (
        0.5, {"head": 5.0, "backbone": 0.0}, {"head": 5.0, "backbone": 1.0})


def test_discriminative_scales_bottom_to_top():
    assert discriminative_scales(1) == [1.0]
    assert discriminative_scales(4) == pytest.approx([1 / 2.6**3, 1 / 2.6**2, 1 / 2.6, 1.0],
                                                     rel=1e-15)
    assert discriminative_scales(3, decay=2.0) == [0.25, 0.5, 1.0]


# ----------------------------------------------------------------------------------------
# factory, state dicts, validation


def test_make_schedule_builds_each_named_schedule():
    assert make_schedule("constant", lr=0.1).lr_at(5) == 0.1
    assert make_schedule("warmup_cosine", lr_max=1.0, total_steps=10,
                         warmup_steps=2).lr_at(0) == 0.5
    assert make_schedule("slanted_triangular", lr_max=0.01, total_steps=100).lr_at(10) == 0.01
    plateau = make_schedule("plateau", lr=1.0, patience=0)
    plateau.step(1.0)
    assert plateau.step(1.0) == 0.5


def test_make_schedule_unknown_name_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"'cosine'.*constant.*warmup_cosine.*"
                                         r"slanted_triangular.*plateau"):
        make_schedule("cosine", lr=1.0)
    with pytest.raises(ValueError, match=r"'constant'.*warmup"):
        make_schedule("constant", lr=1.0, warmup=3)


def test_make_schedule_builds_every_schedule_from_the_common_arguments():
    """A training loop passes lr_max and total_steps whatever the schedule is."""
    common = {"lr_max": 0.1, "total_steps": 50}
    assert make_schedule("constant", **common).lr_at(49) == 0.1
    assert make_schedule("plateau", **common, patience=3).lr_at(0) == 0.1
    assert make_schedule("warmup_cosine", **common).lr_at(50) == 0.0
    assert make_schedule("slanted_triangular", **common).lr_at(5) == 0.1
    with pytest.raises(ValueError, match="not both"):
        make_schedule("constant", lr=0.1, lr_max=0.2)


@pytest.mark.parametrize("schedule", [
    Constant(0.5),
    WarmupCosine(lr_max=1.0, total_steps=50, warmup_steps=5, min_lr=0.01),
    SlantedTriangular(lr_max=0.01, total_steps=77, cut_frac=0.2, ratio=16),
], ids=lambda s: type(s).__name__)
def test_state_dict_round_trip_restores_the_schedule(schedule):
    sd = json.loads(json.dumps(schedule.state_dict(), allow_nan=False))
    fresh = {Constant: lambda: Constant(9.0),
             WarmupCosine: lambda: WarmupCosine(9.0, 3),
             SlantedTriangular: lambda: SlantedTriangular(9.0, 3)}[type(schedule)]()
    fresh.load_state_dict(sd)
    assert [fresh.lr_at(t) for t in range(80)] == [schedule.lr_at(t) for t in range(80)]
    with pytest.raises(ValueError, match="ReduceOnPlateau"):
        fresh.load_state_dict(ReduceOnPlateau(lr=1.0).state_dict())


@pytest.mark.parametrize("make, pattern", [
    (lambda: Constant(-1.0), r"lr.*-1\.0"),
    (lambda: WarmupCosine(1.0, total_steps=10, warmup_steps=20), r"warmup_steps \(20\)"),
    (lambda: WarmupCosine(1.0, total_steps=10, min_lr=2.0), r"min_lr \(2\.0\)"),
    (lambda: WarmupCosine(1.0, total_steps=2.5), r"total_steps.*2\.5"),
    (lambda: SlantedTriangular(1.0, 100, cut_frac=1.0), r"cut_frac.*1\.0"),
    (lambda: SlantedTriangular(1.0, 100, ratio=0.5), r"ratio.*0\.5"),
    (lambda: ReduceOnPlateau(1.0, factor=1.5), r"factor.*1\.5"),
    (lambda: ReduceOnPlateau(1.0, mode="maximum"), r"'maximum'"),
    (lambda: Constant(1.0).lr_at(-1), r"step.*-1"),
    (lambda: TransferSchedule(0.1), r"base"),
    (lambda: discriminative_scales(0), r"n_groups.*0"),
])
def test_bad_arguments_raise_value_error_naming_the_value(make, pattern):
    with pytest.raises(ValueError, match=pattern):
        make()
