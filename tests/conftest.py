"""Shared fixtures: the real CL_Benchmark folder from ../shared and a tiny random-weight backbone config."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def find_cl_root() -> Path:
    env = os.environ.get("CONTINUAL_DATA")
    candidates = ([Path(env)] if env else []) + [REPO.parent / "shared" / "data" / "cl_benchmark"]
    for candidate in candidates:
        if candidate.is_dir():
            return candidate.resolve()
    raise RuntimeError(
        "the CL_Benchmark test data was not found: set CONTINUAL_DATA or put shared/ beside the repository"
    )


@pytest.fixture(scope="session")
def cl_root() -> Path:
    return find_cl_root()


# A 2-layer, 32-wide BERT with random weights and MiniLM's tokenizer: real architecture, seconds to train.
TINY_BACKBONE = {
    "name": "minilm",
    "random_init": True,
    "config_overrides": {
        "num_hidden_layers": 2,
        "hidden_size": 32,
        "num_attention_heads": 2,
        "intermediate_size": 64,
    },
}


@pytest.fixture(scope="session")
def tiny_backbone() -> dict:
    return {**TINY_BACKBONE, "config_overrides": dict(TINY_BACKBONE["config_overrides"])}


@pytest.fixture
def tiny_experiment(tmp_path, cl_root, monkeypatch):
    """A factory of validated configs for a tiny 2-task run writing only under tmp_path."""
    from continual.recipes.run import load_config

    monkeypatch.chdir(tmp_path)

    def make(*overrides: str, **extra):
        base = {
            "stream": {
                "name": "custom",
                "tasks": ["SST-2", "agnews"],
                "data_root": str(cl_root),
                "train_per_class": 8,
                "test_per_task": 24,
                "max_length": 32,
                "cache_dir": str(tmp_path / "cache"),
            },
            "backbone": TINY_BACKBONE,
            "training": {"epochs": 1, "batch_size": 8, "lr": 1e-3, "progress": False},
            "tracking": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "output_dir": str(tmp_path / "outputs")},
        }
        for key, value in extra.items():
            base.setdefault(key, {}).update(value)
        return load_config(None, overrides=list(overrides), extra=base)

    return make


@pytest.fixture
def one_cpu_thread():
    """Run a test on one intra-op thread: tiny models gain nothing from threads, and on a shared 2-core machine extra
    threads only add contention (about 10x slower was measured). Opt in per module with
    ``pytestmark = pytest.mark.usefixtures("one_cpu_thread")``."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)

