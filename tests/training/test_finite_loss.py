"""The finite-loss check of the training kit: every step on the CPU, batched reads (one device sync each) on an
accelerator, and the error names the first non-finite step either way."""

from __future__ import annotations

import math

import pytest
import torch

from continual.training import FiniteLossCheck, NonFiniteLossError


def test_every_step_is_read_as_it_comes_with_every_one():
    check = FiniteLossCheck("lower the learning rate")
    check.add(torch.tensor(2.0), "at step 0")
    assert (check.total, check.count, check.mean) == (2.0, 1, 2.0)
    with pytest.raises(NonFiniteLossError, match="loss became nan at step 1: lower the learning rate"):
        check.add(torch.tensor(float("nan")), "at step 1")


def test_batched_reads_name_the_first_non_finite_step_and_keep_the_sum_before_it():
    check = FiniteLossCheck("advice", every=4)
    for step, value in enumerate([1.0, 3.0]):
        check.add(torch.tensor(value), f"at step {step}")
    assert check.count == 0 and math.isnan(check.mean), "nothing read before the batch is full"
    check.add(torch.tensor(float("inf")), "at step 2")
    with pytest.raises(NonFiniteLossError, match="loss became inf at step 2: advice"):
        check.add(torch.tensor(float("nan")), "at step 3")
    assert (check.total, check.count) == (4.0, 2)
    check.reset()
    check.add(torch.tensor(5.0), "at step 0")
    check.flush()  # the epoch's end reads what is pending
    assert (check.total, check.count) == (5.0, 1)
