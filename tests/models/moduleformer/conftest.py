"""Run the tiny ModuleFormer tests on one CPU thread: their matmuls are far too small to gain from threads, and on a
shared machine extra threads only add contention (a 10x slowdown was measured on 2 busy cores)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def one_cpu_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
