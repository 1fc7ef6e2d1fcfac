"""End to end: the Avalanche learner with every baseline on a tiny random BERT and real CL_Benchmark data."""

from __future__ import annotations

import json
from dataclasses import dataclass

import mlflow
import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from continual.config import StrategyConfig
from continual.expansion import BaseStrategy, backbone_and_head
from continual.learner import NonFiniteLossError
from continual.recipes.run import run_experiment
from strategies.registry import register_strategy


def _run(cfg):
    return run_experiment(cfg, echo=lambda *_: None)


def _mlflow_run(cfg):
    client = MlflowClient(cfg.tracking.uri)
    experiment = client.get_experiment_by_name("custom")
    (run,) = client.search_runs([experiment.experiment_id], filter_string=f"tags.mlflow.runName = '{cfg.tracking.run_name}'")
    return client, run


@pytest.mark.slow
def test_full_finetune_fills_the_matrix_and_logs_everything(tiny_experiment, tmp_path):
    cfg = tiny_experiment("tracking.run_name=ft", "training.checkpoint_dir=" + str(tmp_path / "ckpt"))
    result = _run(cfg)
    assert result.matrix.shape == (2, 2) and np.isfinite(result.matrix).all()
    assert result.initial is not None and np.isfinite(result.initial).all()
    assert [r.task for r in result.records] == ["SST-2", "agnews"]
    for record in result.records:
        assert record.trainable_parameters > 0 and record.wall_time_s > 0 and record.peak_memory_mb > 0
        assert np.isfinite(record.train_loss) and record.stored_bytes > 0

    client, run = _mlflow_run(cfg)
    assert run.info.status == "FINISHED"
    assert run.data.params["strategy.name"] == "full_finetune"
    assert run.data.params["training.lr"] == "0.001"
    history = client.get_metric_history(run.info.run_id, "acc/SST-2")
    assert [m.step for m in history] == [0, 1]
    assert history[1].value == pytest.approx(result.matrix[1, 0])
    assert "final/acc" in run.data.metrics
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"accuracy_matrix.csv", "accuracy_matrix.png", "forgetting_curves.png", "summary.json", "config.yaml"} <= artifacts

    assert result.output_dir == tmp_path / "outputs" / "custom" / "ft"
    summary = json.loads((result.output_dir / "summary.json").read_text())
    assert summary["extra"]["failed"] is False


@pytest.mark.slow
def test_only_the_strategy_parameters_train_and_checkpoints_reload(tiny_experiment, tmp_path):
    from continual.checkpoint import load_task_state

    seen = {}

    @dataclass
    class SpyConfig(StrategyConfig):
        name: str = "spy_full_finetune"

    @register_strategy
    class Spy(BaseStrategy):
        name = "spy_full_finetune"
        Config = SpyConfig

        def trainable_parameters(self, model, task):
            return backbone_and_head(model, task)

        def after_task(self, model, task):
            seen[task.index] = {
                "other_head_requires_grad": [p.requires_grad for p in model.heads.parameters_for(1 - task.index)],
                "head0": [p.detach().clone() for p in model.heads.parameters_for(0)],
            }

    cfg = tiny_experiment("strategy.name=spy_full_finetune", "training.checkpoint_dir=" + str(tmp_path / "ckpt"))
    _run(cfg)
    assert seen[0]["other_head_requires_grad"] == [False, False]
    assert seen[1]["other_head_requires_grad"] == [False, False]
    # Training the second task never touches the first task's head.
    for before, after in zip(seen[0]["head0"], seen[1]["head0"]):
        assert torch.equal(before, after)
    state, entry = load_task_state(tmp_path / "ckpt", "SST-2")
    assert torch.equal(state["heads.heads.0.weight"], seen[0]["head0"][0])
    assert torch.equal(state["heads.heads.0.bias"], seen[0]["head0"][1])
    assert entry["bytes"] > 0 and entry["strategy"] == "spy_full_finetune"


@pytest.mark.slow
def test_joint_trains_once_and_leaves_bwt_undefined(tiny_experiment):
    from continual.metrics import summarize

    result = _run(tiny_experiment("strategy.name=joint", "tracking.run_name=joint"))
    assert np.isnan(result.matrix[0]).all() and np.isfinite(result.matrix[1]).all()
    assert len(result.records) == 1
    summary = summarize(result)
    assert np.isfinite(summary["acc"]) and np.isnan(summary["bwt"])


@pytest.mark.slow
@pytest.mark.parametrize(
    "strategy, options",
    [("ewc", ["strategy.ewc_lambda=1e7"]), ("lwf", ["strategy.alpha=5"]), ("replay", ["strategy.mem_size=16"])],
)
def test_each_avalanche_baseline_changes_training(tiny_experiment, strategy, options):
    """Same seed and data as full fine-tuning: the first task is identical, the second must differ."""
    base = _run(tiny_experiment("tracking.run_name=base"))
    other = _run(tiny_experiment(f"strategy.name={strategy}", f"tracking.run_name={strategy}", *options))
    assert other.records[0].train_loss == pytest.approx(base.records[0].train_loss)
    assert other.records[1].train_loss != pytest.approx(base.records[1].train_loss, rel=1e-4)
    assert other.records[1].stored_parameters >= base.records[1].stored_parameters


@dataclass
class _NaNConfig(StrategyConfig):
    name: str = "nan_on_second_task"


@register_strategy
class _NaNOnSecondTask(BaseStrategy):
    """Full fine-tuning that poisons a weight when the second task starts."""

    name = "nan_on_second_task"
    Config = _NaNConfig

    def before_task(self, model, task):
        if task.index == 1:
            with torch.no_grad():
                next(model.backbone.parameters()).fill_(float("nan"))

    def trainable_parameters(self, model, task):
        return backbone_and_head(model, task)


@pytest.mark.slow
def test_nan_loss_stops_the_task_and_keeps_what_was_logged(tiny_experiment, tmp_path):
    cfg = tiny_experiment("strategy.name=nan_on_second_task", "tracking.run_name=nan")
    with pytest.raises(NonFiniteLossError, match="agnews"):
        _run(cfg)
    client, run = _mlflow_run(cfg)
    assert run.info.status == "FAILED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "acc/SST-2")] == [0]
    summary = json.loads((tmp_path / "outputs" / "custom" / "nan" / "summary.json").read_text())
    assert summary["extra"]["failed"] is True
    matrix = summary["result"]["matrix"]
    assert matrix[0][0] is not None and matrix[1][0] is None
    assert mlflow.active_run() is None


@pytest.mark.slow
def test_shared_head_runs_task_agnostic(tiny_experiment):
    result = _run(tiny_experiment("backbone.head=shared", "tracking.run_name=shared"))
    assert np.isfinite(result.matrix).all()
    # Before any training nothing is masked; afterwards agnews's labels are unseen until its task: its accuracy
    # after SST-2 is 0 (no agnews label can be predicted in a shared head yet).
    assert result.matrix[0, 1] == 0.0
