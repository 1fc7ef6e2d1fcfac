"""Every preset of configs/peers/ end to end at toy scale: the preset's strategy, label words, label space and router as
shipped, on a tiny random Llama or GPT-2 over two real CL_Benchmark tasks (SmolLM2 and standard order 1 swapped for
speed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
PEERS = sorted((REPO / "configs" / "peers").glob("*.yaml"))

pytestmark = pytest.mark.usefixtures("one_cpu_thread")


def test_the_compare_preset_lists_every_peer_preset():
    from continual.recipes.compare import load_compare_config

    cfg = load_compare_config(REPO / "configs" / "compare" / "peers.yaml")
    assert sorted({Path(run.preset).name for run in cfg.runs}) == [p.name for p in PEERS]  # each at least once


@pytest.mark.slow
@pytest.mark.parametrize("preset", PEERS, ids=lambda p: p.stem)
def test_each_peer_preset_runs_two_tasks_on_a_tiny_causal_lm(preset, tmp_path, cl_root, tiny_causal_lm, monkeypatch):
    from continual.recipes.run import load_config, run_experiment

    monkeypatch.chdir(tmp_path)
    family = "gpt2" if preset.stem in ("nlora", "replay", "progressive_prompts") else "llama"
    extra = {
        "stream": {"name": "custom", "order": None, "tasks": ["SST-2", "agnews"], "data_root": str(cl_root),
                   "train_per_class": 6, "test_per_task": 12, "max_length": 32, "cache_dir": str(tmp_path / "cache")},
        "backbone": tiny_causal_lm(family),
        "training": {"progress": False, "device": "cpu"},
        "tracking": {"enabled": False, "output_dir": str(tmp_path / "outputs")},
    }
    cfg = load_config(preset, extra=extra)
    assert cfg.backbone.head == "label_words" and cfg.backbone.label_space == "seen"
    result = run_experiment(cfg, echo=lambda _: None)
    rows = 1 if cfg.strategy.name == "joint" else 2
    assert np.isfinite(result.matrix[-rows:]).all() and ((0 <= result.matrix[-1]) & (result.matrix[-1] <= 1)).all()
    if cfg.router.name != "oracle":
        assert np.isfinite(result.oracle_matrix[-1]).all() and np.isfinite(result.routing_matrix[-1, :2]).all()
