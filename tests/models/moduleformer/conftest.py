"""Run the tiny ModuleFormer tests on one CPU thread: their matmuls are far too small to gain from threads, and on a
shared machine extra threads only add contention (a 10x slowdown was measured on 2 busy cores)."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _every_test_on_one_thread(one_cpu_thread):
    """Every test in this folder runs on one intra-op thread (the fixture is in tests/conftest.py)."""
