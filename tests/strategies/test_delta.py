"""The delta strategy's options: selective and last-layer targets, per-kind targets, and within-task stages."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from continual.expansion import TaskInfo
from continual.models.classifier import ContinualClassifier
from strategies.delta import DeltaStrategy

LABELS = [("neg", "pos"), ("a", "b", "c", "d")]
TASKS = [TaskInfo(i, f"task{i}", labels) for i, labels in enumerate(LABELS)]


@pytest.fixture(scope="module")
def bert(tiny_backbone):
    from continual.models.backbone import load_backbone

    torch.manual_seed(0)
    model, _ = load_backbone(tiny_backbone["name"], random_init=True, config_overrides=tiny_backbone["config_overrides"])
    return model


def setup(bert, **options):
    model = ContinualClassifier(copy.deepcopy(bert), LABELS)
    strategy = DeltaStrategy(**options)
    strategy.setup(model, TASKS)
    return model, strategy


def test_last_layer_sites_are_the_last_layers_linears_only(bert):
    model, _ = setup(bert, kinds=["last_layer"])
    names = list(model.bank.sites())
    assert len(names) == 6 and all(n.startswith("encoder.layer.1.") for n in names)


def test_selective_draws_a_reproducible_random_subset(bert):
    a, _ = setup(bert, kinds=["selective"], select=3, select_seed=7)
    b, _ = setup(bert, kinds=["selective"], select=3, select_seed=7)
    c, _ = setup(bert, kinds=["selective"], select=3, select_seed=8)
    assert list(a.bank.sites()) == list(b.bank.sites()) and len(a.bank.sites()) == 3
    assert list(a.bank.sites()) != list(c.bank.sites())
    with pytest.raises(ValueError, match="select=99 but only 12 modules match"):
        setup(bert, kinds=["selective"], select=99)


def test_kind_targets_override_the_shared_targets(bert):
    model, _ = setup(
        bert, kinds=["lora", "bitfit"], targets=[r"attention\.self\.query"], kind_targets={"bitfit": [r"intermediate\.dense"]}
    )
    kinds = {name: site.delta.kind for name, site in model.bank.sites().items()}
    assert sorted(n for n, k in kinds.items() if k == "lora") == [f"encoder.layer.{i}.attention.self.query" for i in (0, 1)]
    assert sorted(n for n, k in kinds.items() if k == "bitfit") == [f"encoder.layer.{i}.intermediate.dense" for i in (0, 1)]


@pytest.mark.parametrize(
    "options, key",
    [({"within_task": "both"}, "strategy.within_task"), ({"kind_targets": {"adapter": ["x"]}}, "strategy.kind_targets.adapter"),
     ({"select": -1}, "strategy.select"), ({"prompt_tokens": 0}, "strategy.prompt_tokens"),
     ({"prefix_reparam": -2}, "strategy.prefix_reparam"), ({"intrinsic_dim": 0}, "strategy.intrinsic_dim"),
     ({"prompt_init": "zeros"}, "strategy.prompt_init")],
)
def test_new_options_are_validated(options, key):
    with pytest.raises(ValueError, match=key):
        DeltaStrategy(**options)


def test_a_kind_that_matches_nothing_names_the_kind(bert):
    with pytest.raises(ValueError, match="strategy.kinds: lora: target 'nothing_here'"):
        setup(bert, kinds=["lora"], targets=["nothing_here"])


@pytest.mark.slow
def test_sequential_within_task_trains_one_kind_per_stage(tiny_experiment, monkeypatch):
    """bitfit trains in stage 0 and is then frozen; lora trains in stage 1 only (its B stays 0 during stage 0)."""
    from continual.recipes.run import run_experiment

    snapshots = {}
    original_after_stage = DeltaStrategy.after_stage
    original_after_task = DeltaStrategy.after_task

    def state_of(model, task, kind):
        return [p.detach().clone() for p in model.bank.task_parameters(task.index, kind)]

    def after_stage(self, model, task, stage):
        snapshots[(task.index, "after_stage")] = {k: state_of(model, task, k) for k in ("bitfit", "lora")}
        original_after_stage(self, model, task, stage)

    def after_task(self, model, task):
        snapshots[(task.index, "after_task")] = {k: state_of(model, task, k) for k in ("bitfit", "lora")}
        original_after_task(self, model, task)

    monkeypatch.setattr(DeltaStrategy, "after_stage", after_stage)
    monkeypatch.setattr(DeltaStrategy, "after_task", after_task)
    cfg = tiny_experiment(
        "strategy.name=delta", "strategy.kinds=[bitfit,lora]", "strategy.within_task=sequential",
        "tracking.run_name=staged", "training.device=cpu",
    )
    result = run_experiment(cfg, echo=lambda *_: None)
    assert np.isfinite(result.matrix).all()
    for t in range(2):
        mid, end = snapshots[(t, "after_stage")], snapshots[(t, "after_task")]
        assert any(p.abs().sum() > 0 for p in mid["bitfit"]), "bitfit trained in stage 0"
        assert all(torch.equal(a, b) for a, b in zip(mid["bitfit"], end["bitfit"])), "bitfit frozen in stage 1"
        lora_B = [p for p in mid["lora"] if p.dim() == 2 and p.shape[1] == 8]
        assert lora_B and all(p.abs().sum() == 0 for p in lora_B), "lora untouched in stage 0"
        assert not all(torch.equal(a, b) for a, b in zip(mid["lora"], end["lora"])), "lora trained in stage 1"


@pytest.mark.slow
def test_joint_delta_training_trains_every_tasks_deltas_on_mixed_batches(tiny_experiment, monkeypatch):
    from continual.recipes.run import run_experiment

    seen = {}
    original_setup = DeltaStrategy.setup

    def spy_setup(self, model, tasks):
        seen["model"] = model
        original_setup(self, model, tasks)

    monkeypatch.setattr(DeltaStrategy, "setup", spy_setup)
    cfg = tiny_experiment("strategy.name=delta", "strategy.joint=true", "tracking.run_name=joint", "training.device=cpu")
    result = run_experiment(cfg, echo=lambda *_: None)
    assert np.isfinite(result.matrix[-1]).all() and np.isnan(result.matrix[0]).all()  # one row, as joint
    bank = seen["model"].bank
    for t in range(2):
        lora_B = [p for p in bank.task_parameters(t) if p.shape[-1] == 8]
        assert any(p.abs().sum() > 0 for p in lora_B), f"task {t}'s LoRA trained"
        assert not any(p.requires_grad for p in bank.task_parameters(t)), "frozen afterwards"
