"""The experts strategy with pruning after each task: what is removed and counted, frozen usage history, the
resume contract (strategy state first, structure rebuilt by before_task/after_task, then the model's tensors),
per-task checkpoints of a pruned run, the Avalanche plugin, and a real run."""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from continual.expansion import TaskInfo
from continual.models.classifier import ContinualClassifier
from continual.modules.experts import expert_deltas
from continual.training import set_trainable
from strategies.experts import ExpertStrategy

LABELS = [("neg", "pos"), ("a", "b", "c", "d"), ("x", "y", "z")]
TASKS = [TaskInfo(i, f"task{i}", labels) for i, labels in enumerate(LABELS)]
OPTIONS = {"experts_per_task": 3, "expert_hidden": 8, "prune_threshold": 0.3}

pytestmark = pytest.mark.usefixtures("one_cpu_thread")


@pytest.fixture(scope="module")
def bert(tiny_backbone):
    from continual.models.backbone import load_backbone

    torch.manual_seed(0)
    model, _ = load_backbone(tiny_backbone["name"], random_init=True,
                             config_overrides=tiny_backbone["config_overrides"])
    return model


def setup(bert, seed=0, **options):
    torch.manual_seed(seed)
    model = ContinualClassifier(copy.deepcopy(bert), [t.labels for t in TASKS]).eval()
    strategy = ExpertStrategy(**{**OPTIONS, **options})
    strategy.setup(model, TASKS)
    return model, strategy


def batch(n=6, length=9, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 1000, (n, length), generator=gen)
    lengths = torch.randint(3, length + 1, (n,), generator=gen)
    mask = (torch.arange(length)[None, :] < lengths[:, None]).long()
    return torch.stack([ids * mask, mask], dim=1)


def task_batches(task):
    """The task's "training data" for usage recording: (x, task labels) batches."""
    return [(batch(seed=100 * task.index + i), torch.full((6,), task.index)) for i in range(2)]


def train_task(model, strategy, task, steps=3, prune=True):
    """One task as the learner runs it: allocate, train, prune (the plugin's step), freeze."""
    strategy.before_task(model, task)
    model.heads.activate(task.index)
    params = set_trainable(model, strategy.trainable_parameters(model, task))
    optimizer = torch.optim.AdamW(params, lr=3e-2)
    model.train()
    x = batch(seed=10 + task.index)
    y = torch.arange(x.shape[0]) % len(task.labels)
    for _ in range(steps):
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x, task.index)[:, : len(task.labels)], y)
        extra = strategy.auxiliary_loss(model, task)
        (loss if extra is None else loss + extra).backward()
        optimizer.step()
    model.eval()
    result = strategy.prune(model, task, task_batches(task)) if prune else None
    strategy.after_task(model, task)
    return result


def shapes(state):
    return {k: tuple(v.shape) for k, v in state.items()}


def mixed():
    return batch(seed=7), torch.tensor([0, 1, 2, 0, 1, 2])


def finite_logits(model):
    """Every sample of :func:`mixed` gets finite logits over its own task's labels."""
    x, tasks = mixed()
    with torch.no_grad():
        logits = model(x, tasks)
    return all(bool(torch.isfinite(row[: len(LABELS[t])]).all()) for row, t in zip(logits, tasks.tolist()))


# ---------------------------------------------------------------------------------------------------- options
@pytest.mark.parametrize("value", [-0.1, 1.0, 1.5, math.nan])
def test_the_threshold_is_a_share_below_one(value):
    with pytest.raises(ValueError, match=r"strategy\.prune_threshold must be in \[0, 1\)"):
        ExpertStrategy(prune_threshold=value)


def test_without_pruning_nothing_is_recorded_or_stored(bert):
    model, strategy = setup(bert, prune_threshold=0.0)
    assert strategy.avalanche_plugins() == []
    train_task(model, strategy, TASKS[0], prune=False)
    assert strategy.state_dict() == {} and strategy.task_metrics(model, TASKS[0]) == {}
    assert all(k.startswith("experts.") or k.startswith("heads.") for k in strategy.task_state(model, TASKS[0]))


# ---------------------------------------------------------------------------------------------------- live pruning
@pytest.mark.parametrize("task_conditioned", [False, True])
def test_pruning_after_each_task_removes_unused_experts_and_counts_them(bert, task_conditioned):
    model, strategy = setup(bert, task_conditioned=task_conditioned)
    deltas = expert_deltas(model.bank)
    removed_total = 0
    for task in TASKS:
        seen = TASKS[: task.index + 1]
        result = train_task(model, strategy, task)
        metrics = strategy.task_metrics(model, task)
        assert set(metrics) == {"pruned_parameters", "experts_removed", "experts_left"}
        assert metrics["pruned_parameters"] == result.parameters_removed
        assert metrics["experts_removed"] == sum(len(v) for v in result.experts_removed.values())
        assert metrics["experts_left"] == sum(d.pool.n_experts - d.n_shared for d in deltas.values())
        removed_total += result.parameters_removed
        # stored_parameters is the pruned model: the unpruned count minus everything removed so far.
        unpruned = (sum(p.numel() for p in model.backbone.parameters()) - model.bank.parameter_count()
                    + len(seen) * model.bank.expected_parameter_count()
                    + sum(p.numel() for t in seen for p in model.heads.parameters_for(t.index)))
        assert strategy.stored_parameters(model, seen) == unpruned - removed_total
        for delta in deltas.values():  # each task keeps at least k - S experts of its own
            slots = delta.expert_slots()
            assert all(int((slots == t.index).sum()) >= delta.k - delta.n_shared for t in seen)
    assert removed_total > 0, "the threshold removes experts on this model"
    assert not any(p.requires_grad for t in TASKS for p in model.bank.task_parameters(t.index)), "all frozen"
    assert finite_logits(model)


def test_earlier_tasks_usage_is_the_one_recorded_after_their_own_training(bert):
    model, strategy = setup(bert)
    train_task(model, strategy, TASKS[0])
    first = {k: v.clone() for k, v in strategy.state_dict().items()}
    train_task(model, strategy, TASKS[1])
    after = strategy.state_dict()
    assert all(torch.equal(after[k], v) for k, v in first.items()), "task 0's usage and keep masks never change"
    assert {k.split(".")[2] for k in after} == {"0", "1"}
    # A site's recorded usage covers the experts of its moment: shared + 3 for task 0, then what was left + 3.
    site = next(iter(expert_deltas(model.bank)))
    kept0 = int(after[f"pruning.keep.0.{site}"].sum())
    assert after[f"pruning.usage.0.{site}.counts"].shape == (4,)
    assert after[f"pruning.usage.1.{site}.counts"].shape == (kept0 + 3,)
    assert after[f"pruning.keep.1.{site}"].shape == (kept0 + 3,)


def test_a_high_threshold_leaves_each_task_k_minus_s_experts_and_task_conditioned_routing_works(bert):
    model, strategy = setup(bert, task_conditioned=True, prune_threshold=0.99)
    for task in TASKS:
        train_task(model, strategy, task)
    for delta in expert_deltas(model.bank).values():
        assert delta.pool.group_sizes == [1, 1, 1, 1]  # the shared FFN and one expert per task (k - S = 1)
    assert finite_logits(model)


# ---------------------------------------------------------------------------------------------------- resume
def test_resume_rebuilds_the_pruned_structure_and_continues_exactly(bert, tmp_path):
    """The resume recipe's sequence: a fresh model set up as the run did, ``strategy.load_state_dict`` first, then
    ``before_task``, ``heads.activate``, ``after_task`` per finished task, then the saved model tensors."""
    from safetensors.torch import load_file, save_file

    live, strategy = setup(bert)
    for task in TASKS[:2]:
        train_task(live, strategy, task)
    save_file({k: v.contiguous() for k, v in strategy.state_dict().items()}, tmp_path / "strategy.safetensors")
    save_file({k: v.contiguous() for k, v in live.state_dict().items()}, tmp_path / "model.safetensors")
    live_shapes = shapes(live.state_dict())
    x, tasks = mixed()
    with torch.no_grad():
        live_logits = live(x, tasks)
    assert sum(strategy.task_metrics(live, t)["experts_removed"] for t in TASKS[:2]) > 0

    rebuilt, resumed = setup(bert, seed=123)  # fresh weights: everything must come from the saved files
    resumed.load_state_dict(load_file(tmp_path / "strategy.safetensors"))
    for task in TASKS[:2]:
        resumed.before_task(rebuilt, task)
        rebuilt.heads.activate(task.index)
        resumed.after_task(rebuilt, task)
    assert shapes(rebuilt.state_dict()) == live_shapes
    saved = load_file(tmp_path / "model.safetensors")
    missing, unexpected = rebuilt.load_state_dict(saved, strict=False)
    assert unexpected == []
    with torch.no_grad():
        assert torch.equal(rebuilt(x, tasks), live_logits)
    for task in TASKS[:2]:
        assert resumed.task_metrics(rebuilt, task) == strategy.task_metrics(live, task)
    assert resumed.stored_parameters(rebuilt, TASKS[:2]) == strategy.stored_parameters(live, TASKS[:2])

    # The next task prunes with the restored history exactly as the uninterrupted run does.
    torch.manual_seed(5)
    train_task(live, strategy, TASKS[2])
    torch.manual_seed(5)
    train_task(rebuilt, resumed, TASKS[2])
    assert shapes(rebuilt.state_dict()) == shapes(live.state_dict())
    assert all(torch.equal(v, live.state_dict()[k]) for k, v in rebuilt.state_dict().items())
    assert resumed.state_dict().keys() == strategy.state_dict().keys()
    assert all(torch.equal(v, strategy.state_dict()[k]) for k, v in resumed.state_dict().items())


def test_strategy_state_with_foreign_keys_is_refused(bert):
    _, strategy = setup(bert)
    with pytest.raises(KeyError, match="unexpected keys"):
        strategy.load_state_dict({"ewc.saved": torch.zeros(1)})


@pytest.mark.parametrize("mode", ["copy", "slices"])
def test_per_task_checkpoints_of_a_pruned_run_load_task_by_task(bert, tmp_path, mode):
    from continual.checkpoint import load_task_state, save_task_state

    options = {"upcycle": mode, "top_k": 5, "slices": 4} if mode == "slices" else {}
    live, strategy = setup(bert, **options)
    for task in TASKS:
        train_task(live, strategy, task)
        save_task_state(tmp_path, task.index, task.name, strategy.task_state(live, task))
    fresh, fresh_strategy = setup(bert, seed=123, **options)
    for task in TASKS:
        fresh_strategy.load_task_state(fresh, task, load_task_state(tmp_path, task.name)[0])
        fresh.heads.activate(task.index)
    assert shapes(fresh.state_dict()) == shapes(live.state_dict())
    x, tasks = mixed()
    with torch.no_grad():
        assert torch.equal(fresh(x, tasks), live(x, tasks))
    assert fresh_strategy.state_dict().keys() == strategy.state_dict().keys()


# ---------------------------------------------------------------------------------------------------- the plugin
def test_the_plugin_prunes_on_the_experiences_training_data_without_touching_the_global_rng(bert):
    model, strategy = setup(bert)
    task = TASKS[0]
    strategy.before_task(model, task)
    (plugin,) = strategy.avalanche_plugins()
    x = torch.cat([b for b, _ in task_batches(task)])
    dataset = [(x[i], 0, task.index) for i in range(x.shape[0])]  # Avalanche's (x, y, task label) samples
    learner = SimpleNamespace(model=model.train(), device=torch.device("cpu"), eval_mb_size=5,
                              experience=SimpleNamespace(dataset=dataset, current_experience=task.index))
    expected, expected_strategy = setup(bert)
    expected_strategy.before_task(expected, task)
    expected_strategy.prune(expected, task, task_batches(task))

    rng = torch.random.get_rng_state()
    plugin.after_training_exp(learner)
    assert torch.equal(torch.random.get_rng_state(), rng)
    assert model.training, "the model's mode is restored"
    assert plugin.state_dict() == {}
    assert strategy.task_metrics(model, task) == expected_strategy.task_metrics(expected, task)
    assert all(torch.equal(v, expected_strategy.state_dict()[k]) for k, v in strategy.state_dict().items())


# ---------------------------------------------------------------------------------------------------- a real run
@pytest.mark.slow
def test_a_pruned_experts_run_removes_parameters_and_evaluates(tiny_experiment, tmp_path, monkeypatch):
    from continual.checkpoint import load_task_state
    from continual.recipes.run import run_experiment

    seen = {}
    original_setup = ExpertStrategy.setup

    def spy_setup(self, model, tasks):
        seen["model"], seen["strategy"] = model, self
        original_setup(self, model, tasks)

    monkeypatch.setattr(ExpertStrategy, "setup", spy_setup)
    cfg = tiny_experiment(
        "strategy.name=experts", "strategy.prune_threshold=0.3", "strategy.experts_per_task=3",
        "tracking.run_name=pruned", "training.checkpoint_dir=" + str(tmp_path / "ckpt"), "training.device=cpu",
    )
    result = run_experiment(cfg, echo=lambda *_: None)
    assert result.matrix.shape == (2, 2) and np.isfinite(result.matrix).all()
    model, strategy = seen["model"], seen["strategy"]
    tasks = strategy.tasks
    removed = [strategy.task_metrics(model, t)["pruned_parameters"] for t in tasks]
    assert sum(removed) > 0
    unpruned = (sum(p.numel() for p in model.backbone.parameters()) - model.bank.parameter_count()
                + len(tasks) * model.bank.expected_parameter_count()
                + sum(p.numel() for t in tasks for p in model.heads.parameters_for(t.index)))
    assert result.records[-1].stored_parameters == unpruned - sum(removed)
    state, _ = load_task_state(tmp_path / "ckpt", "agnews")
    assert any(k.startswith("pruning.keep.1.") for k in state)


def test_an_invalid_threshold_is_reported_before_anything_loads(capsys):
    from continual.cli import main

    assert main(["run", "quickstart", "strategy.name=experts", "strategy.prune_threshold=1.5"]) == 2
    err = capsys.readouterr().err
    assert "strategy.prune_threshold" in err and "[0, 1)" in err
