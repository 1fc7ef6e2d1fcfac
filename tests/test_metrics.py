"""Metrics over hand-computed accuracy matrices (continual/metrics.py)."""

import math
import warnings

import numpy as np
import pytest

from continual.metrics import (
    average_accuracy,
    backward_transfer,
    forgetting,
    forward_transfer,
    mean_forgetting,
    summarize,
)
from continual.results import RunResult

NAN = float("nan")

# R[i][j]: accuracy on task j after training on tasks 0..i.
R3 = np.array([
    [0.90, 0.20, 0.10],
    [0.95, 0.80, 0.30],  # task 0 improves after task 1 (positive backward transfer before forgetting)
    [0.60, 0.60, 0.90],
])
B3 = np.array([0.10, 0.25, 0.20])
# By hand:
#   ACC = (0.60 + 0.60 + 0.90) / 3                         = 0.70
#   BWT = ((0.60 - 0.90) + (0.60 - 0.80)) / 2              = (-0.30 - 0.20) / 2 = -0.25
#   FWT = ((R[0][1] - b1) + (R[1][2] - b2)) / 2
#       = ((0.20 - 0.25) + (0.30 - 0.20)) / 2              = (-0.05 + 0.10) / 2 = 0.025
#   F_0 = max(0.90, 0.95) - 0.60 = 0.35;  F_1 = max(0.20, 0.80) - 0.60 = 0.20
#   mean forgetting = (0.35 + 0.20) / 2                    = 0.275  (differs from -BWT because of the 0.95)


def test_three_tasks_by_hand():
    assert average_accuracy(R3) == pytest.approx(0.70)
    assert backward_transfer(R3) == pytest.approx(-0.25)
    assert forward_transfer(R3, B3) == pytest.approx(0.025)
    np.testing.assert_allclose(forgetting(R3), [0.35, 0.20])
    assert mean_forgetting(R3) == pytest.approx(0.275)


def test_summarize_matches_functions_and_returns_floats():
    result = RunResult(task_names=["a", "b", "c"], matrix=R3, initial=B3)
    summary = summarize(result)
    assert set(summary) == {"acc", "bwt", "fwt", "forgetting"}
    assert all(type(v) is float for v in summary.values())
    assert summary["acc"] == pytest.approx(0.70)
    assert summary["bwt"] == pytest.approx(-0.25)
    assert summary["fwt"] == pytest.approx(0.025)
    assert summary["forgetting"] == pytest.approx(0.275)


def test_forgetting_max_runs_only_over_rows_after_the_task_was_learned():
    # F_j = max_{j<=l<T-1} R[l][j] - R[T-1][j]: task 1 scored 0.9 before it was trained; that is not forgetting.
    r = np.array([
        [0.5, 0.9, 0.0],
        [0.5, 0.7, 0.0],
        [0.5, 0.6, 0.8],
    ])
    # F_0 = max(0.5, 0.5) - 0.5 = 0;  F_1 = R[1][1] - R[2][1] = 0.7 - 0.6 = 0.1 (the 0.9 of row 0 does not count)
    np.testing.assert_allclose(forgetting(r), [0.0, 0.1])


def test_isolated_modules_that_cannot_forget_report_zero_forgetting():
    # The LoRA run of the issue: BWT exactly 0, every earlier task bit-identical after later tasks, but task 1
    # scored 52.0 before it was trained (chance level) and 50.0 after. The old max over every earlier row reported
    # forgetting 0.50 (mean over 2 tasks of 0 and 1.0 points); nothing was forgotten.
    r = np.array([
        [0.90, 0.52, 0.31],
        [0.90, 0.50, 0.33],
        [0.90, 0.50, 0.70],
    ])
    assert backward_transfer(r) == 0.0
    np.testing.assert_array_equal(forgetting(r), [0.0, 0.0])
    assert mean_forgetting(r) == 0.0


def test_no_initial_gives_nan_fwt():
    assert math.isnan(forward_transfer(R3, None))
    summary = summarize(RunResult(task_names=["a", "b", "c"], matrix=R3))
    assert math.isnan(summary["fwt"])
    assert summary["acc"] == pytest.approx(0.70)


def test_single_task():
    r = np.array([[0.8]])
    assert average_accuracy(r) == pytest.approx(0.8)
    assert math.isnan(backward_transfer(r))
    assert math.isnan(forward_transfer(r, np.array([0.1])))
    assert forgetting(r).shape == (0,)
    assert math.isnan(mean_forgetting(r))
    summary = summarize(RunResult(task_names=["a"], matrix=r, initial=np.array([0.1])))
    assert summary["acc"] == pytest.approx(0.8)
    assert all(math.isnan(summary[k]) for k in ("bwt", "fwt", "forgetting"))


def test_joint_run_with_only_last_row_is_nan_except_acc():
    r = np.full((3, 3), NAN)
    r[-1] = [0.7, 0.8, 0.9]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "Mean of empty slice" / "All-NaN slice" warnings either
        summary = summarize(RunResult(task_names=["a", "b", "c"], matrix=r, initial=B3))
        per_task = forgetting(r)
    assert summary["acc"] == pytest.approx(0.8)
    assert math.isnan(summary["bwt"])
    assert math.isnan(summary["fwt"])
    assert math.isnan(summary["forgetting"])
    assert per_task.shape == (2,) and np.isnan(per_task).all()


def test_missing_middle_row():
    r = R3.copy()
    r[1] = NAN
    assert average_accuracy(r) == pytest.approx(0.70)
    assert math.isnan(backward_transfer(r))  # needs R[1][1]
    assert math.isnan(forward_transfer(r, B3))  # needs R[1][2]
    # The max skips the missing row: F_0 = 0.90 - 0.60 = 0.30; task 1 was learned in the missing row and no later
    # row before the last exists, so F_1 is NaN (row 0, before task 1 was trained, does not count).
    f = forgetting(r)
    assert f[0] == pytest.approx(0.30) and math.isnan(f[1])
    assert math.isnan(mean_forgetting(r))


def test_nan_in_needed_entries_is_not_averaged_away():
    r = R3.copy()
    r[2, 1] = NAN
    assert math.isnan(average_accuracy(r))
    assert math.isnan(backward_transfer(r))
    f = forgetting(r)
    assert f[0] == pytest.approx(0.35) and math.isnan(f[1])
    assert math.isnan(mean_forgetting(r))
    b = B3.copy()
    b[2] = NAN
    assert math.isnan(forward_transfer(R3, b))


@pytest.mark.parametrize("bad", [
    np.zeros(3),
    np.zeros((2, 3)),
    np.zeros((0, 0)),
    np.zeros((2, 2, 2)),
])
@pytest.mark.parametrize("fn", [average_accuracy, backward_transfer, forgetting, mean_forgetting])
def test_bad_shapes_raise(fn, bad):
    with pytest.raises(ValueError, match="square"):
        fn(bad)


def test_bad_initial_and_task_names_raise():
    with pytest.raises(ValueError, match="initial"):
        forward_transfer(R3, np.zeros(2))
    with pytest.raises(ValueError, match="task"):
        summarize(RunResult(task_names=["a", "b"], matrix=R3))
    with pytest.raises(ValueError, match="square"):
        forward_transfer(np.zeros((2, 3)), np.zeros(2))
