"""Runs that infer the task: every router end to end on a tiny model with real data, evaluated routed and with the
task id given in the same run, with routing matrices in the artifacts, MLflow and summary.json."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from continual.config import ConfigError

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_cpu_thread")]


@pytest.mark.parametrize("router, kinds", [
    ("prototype", "[lora]"),
    ("keys", "[prompt]"),
    ("entropy", "[lora]"),
    ("prototype", "[intrinsic]"),
])
def test_a_routed_run_reports_routed_and_oracle_accuracy_and_routing(tiny_experiment, router, kinds):
    from continual.recipes.run import run_experiment

    cfg = tiny_experiment("strategy.name=delta", f"strategy.kinds={kinds}", f"router.name={router}")
    result = run_experiment(cfg, echo=lambda *_: None)
    T = len(result.task_names)
    assert result.oracle_matrix.shape == (T, T) and result.routing_matrix.shape == (T, T)
    final_routing = result.routing_matrix[-1]
    assert np.all((0 <= final_routing) & (final_routing <= 1))
    assert np.isnan(result.routing_matrix[0, 1])  # task 1 is not learnt after task 0: nothing is routed to it
    assert result.routing_confusion.sum() == cfg.stream.test_per_task * T
    summary = json.loads((result.output_dir / "summary.json").read_text())["summary"]
    assert {"acc", "acc_oracle", "routing_acc"} <= set(summary)
    assert summary["routing_acc"] == pytest.approx(float(np.mean(final_routing)))
    for name in ("routing_matrix.csv", "routing_matrix.png", "routing_confusion.csv", "routing_confusion.png",
                 "accuracy_matrix_oracle.csv"):
        assert (result.output_dir / name).is_file(), name
    expected_bytes = 0 if router == "entropy" else 1
    assert all((rec.router_bytes > 0) == bool(expected_bytes) for rec in result.records)


def test_soft_mode_with_a_sharp_temperature_answers_as_the_top_task(tiny_experiment):
    # top_k=2 mixes two tasks' modules and heads; at a vanishing temperature the top task has weight 1, so the answers
    # are those of the hard route (the same run otherwise).
    from continual.recipes.run import run_experiment

    common = ("strategy.name=delta", "strategy.kinds=[lora]", "router.name=prototype")
    hard = run_experiment(tiny_experiment(*common), echo=lambda *_: None)
    soft = run_experiment(tiny_experiment(*common, "router.top_k=2", "router.temperature=1e-6"), echo=lambda *_: None)
    np.testing.assert_array_equal(soft.matrix, hard.matrix)
    np.testing.assert_array_equal(soft.routing_matrix, hard.routing_matrix)
    mixed = run_experiment(tiny_experiment(*common, "router.top_k=2", "router.temperature=1e6"), echo=lambda *_: None)
    assert np.isfinite(mixed.matrix).all()


@pytest.mark.parametrize("overrides", [
    ("strategy.name=experts", "strategy.task_conditioned=true", "strategy.experts_per_task=1", "strategy.top_k=1"),
    ("strategy.name=recursive", "strategy.recursion.num_loops=2"),
])
def test_routers_serve_experts_and_recursive_runs(tiny_experiment, overrides):
    from continual.recipes.run import run_experiment

    result = run_experiment(tiny_experiment(*overrides, "router.name=prototype"), echo=lambda *_: None)
    assert np.isfinite(result.matrix[-1]).all() and np.isfinite(result.routing_matrix[-1]).all()
    assert np.isfinite(result.oracle_matrix[-1]).all()


def _route_with(monkeypatch, choose):
    """Replace task inference by ``choose(true task ids [B]) -> routed ids [B]`` (the true ids are read from the
    evaluation's forward call, which the routed path ignores for routing)."""
    from continual.models.classifier import ContinualClassifier

    forward, seen = ContinualClassifier.forward, {}

    def remember(self, x, task_labels):
        if task_labels is not None:
            seen["ids"] = task_labels if torch.is_tensor(task_labels) else torch.full(
                (x.shape[0],), int(task_labels), dtype=torch.long, device=x.device)
        return forward(self, x, task_labels)

    monkeypatch.setattr(ContinualClassifier, "forward", remember)
    monkeypatch.setattr(ContinualClassifier, "infer_tasks", lambda self, x: choose(seen["ids"].to(x.device)))


def test_with_a_perfect_route_routed_accuracy_equals_the_oracle(tiny_experiment, monkeypatch):
    # A route that names the true task must reproduce the oracle row exactly: the routed path (routed modules and
    # heads, mapping into the gold label space) adds nothing of its own.
    from continual.recipes.run import run_experiment

    _route_with(monkeypatch, lambda gold: gold)
    result = run_experiment(tiny_experiment("strategy.name=delta", "router.name=prototype"), echo=lambda *_: None)
    np.testing.assert_array_equal(result.matrix, result.oracle_matrix)
    assert np.all(result.routing_matrix[-1] == 1.0)


def test_a_wrong_route_is_wrong_even_when_the_label_index_matches(tiny_experiment, monkeypatch):
    # SST-2 (negative/positive) and agnews (4 topics) share no label string: routing every sample to the other task
    # must score 0, not the chance that the other head's label index equals the gold one.
    from continual.recipes.run import run_experiment

    _route_with(monkeypatch, lambda gold: 1 - gold)
    result = run_experiment(tiny_experiment("strategy.name=delta", "router.name=prototype"), echo=lambda *_: None)
    np.testing.assert_array_equal(result.matrix[-1], [0.0, 0.0])
    np.testing.assert_array_equal(result.routing_matrix[-1], [0.0, 0.0])
    assert result.oracle_matrix[-1].min() > 0.0


@pytest.mark.parametrize("overrides, message", [
    (["router.name=psychic"], r"router.name: unknown router 'psychic'; registered: oracle, entropy, keys, prototype"),
    (["router.name=prototype", "router.shrinkage=lots"], r"router.shrinkage"),
    (["router.name=prototype", "router.shrinkage=3"], r"shrinkage must be in \[0, 1\]"),
    (["router.name=prototype"], r"strategy 'full_finetune' keeps no per-task modules"),
    (["router.name=prototype", "strategy.name=delta", "backbone.head=shared"], r"needs backbone.head=task"),
    (["router.name=prototype", "strategy.name=delta", "router.layers=[9]"], r"router.layers: \[9\] out of range"),
])
def test_bad_router_input_is_named(tiny_experiment, overrides, message):
    from continual.recipes.run import run_experiment

    with pytest.raises(ConfigError, match=message):
        run_experiment(tiny_experiment(*overrides), echo=lambda *_: None)


def test_a_routed_run_trains_exactly_as_the_oracle_run(tiny_experiment):
    # Fitting the router must not consume the global RNG: the oracle row of a routed run equals a plain run.
    from continual.recipes.run import run_experiment

    common = ("strategy.name=delta", "strategy.kinds=[lora]")
    plain = run_experiment(tiny_experiment(*common), echo=lambda *_: None)
    routed = run_experiment(tiny_experiment(*common, "router.name=prototype"), echo=lambda *_: None)
    np.testing.assert_array_equal(routed.oracle_matrix[1:], plain.matrix[1:])


def test_evaluating_the_seen_tasks_only_gives_the_same_metrics(tiny_experiment):
    # training.eval_tasks=seen evaluates, after task i, tasks 0..i+1 only: the cells every metric reads are the same
    # as with the whole matrix (evaluation draws nothing from the training RNG), the others stay empty, and nothing
    # that was not evaluated is logged.
    from mlflow.tracking import MlflowClient

    from continual.recipes.run import run_experiment

    common = ("strategy.name=delta", "strategy.kinds=[lora]", "router.name=prototype")
    three = {"stream": {"tasks": ["SST-2", "agnews", "yahoo"]}}
    full = run_experiment(tiny_experiment(*common, **three), echo=lambda *_: None)
    cfg = tiny_experiment(*common, "training.eval_tasks=seen", "tracking.run_name=seen", **three)
    seen = run_experiment(cfg, echo=lambda *_: None)
    wanted = np.tril(np.ones((3, 3), dtype=bool), k=1)  # trained so far and the next task
    for name in ("matrix", "oracle_matrix"):
        a, b = getattr(full, name), getattr(seen, name)
        np.testing.assert_array_equal(b[wanted], a[wanted])
        assert np.isnan(b[0, 2]) and not np.isnan(a[0, 2])
    np.testing.assert_array_equal(seen.routing_matrix, full.routing_matrix)
    np.testing.assert_array_equal(seen.routing_confusion, full.routing_confusion)  # the last row sees every task
    assert seen.eval_seconds["oracle"] > 0
    summaries = [json.loads((r.output_dir / "summary.json").read_text())["summary"] for r in (full, seen)]
    assert summaries[1] == pytest.approx(summaries[0], nan_ok=True)
    client = MlflowClient(cfg.tracking.uri)
    experiment = client.get_experiment_by_name(seen.output_dir.parent.name)  # the run folder is <experiment>/<run>
    run = client.search_runs([experiment.experiment_id], f"attributes.run_name = '{seen.output_dir.name}'")[0]
    steps = {m.step for m in client.get_metric_history(run.info.run_id, "acc/yahoo")}
    assert steps == {1, 2}  # yahoo is evaluated from the row where it is the next task


def test_eval_tasks_must_be_all_or_seen(tiny_experiment):
    with pytest.raises(ConfigError, match="training.eval_tasks"):
        tiny_experiment("training.eval_tasks=some")
