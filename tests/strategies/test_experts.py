"""The experts strategy: per-task expert expansion with frozen earlier experts, the routing losses, stored state,
and an end-to-end run on real data."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from continual.expansion import TaskInfo
from continual.models.classifier import ContinualClassifier
from continual.modules.experts import expert_deltas
from continual.training import set_trainable
from strategies.experts import ExpertStrategy

LABELS = [("neg", "pos"), ("a", "b", "c", "d")]
TASKS = [TaskInfo(i, f"task{i}", labels) for i, labels in enumerate(LABELS)]
D = 32


pytestmark = pytest.mark.usefixtures("one_cpu_thread")


@pytest.fixture(scope="module")
def bert(tiny_backbone):
    from continual.models.backbone import load_backbone

    torch.manual_seed(0)
    model, _ = load_backbone(tiny_backbone["name"], random_init=True, config_overrides=tiny_backbone["config_overrides"])
    return model


def setup(bert, **options):
    model = ContinualClassifier(copy.deepcopy(bert), LABELS).eval()
    strategy = ExpertStrategy(**options)
    strategy.setup(model, TASKS)
    return model, strategy


def batch(n=6, length=9, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 1000, (n, length), generator=gen)
    lengths = torch.randint(3, length + 1, (n,), generator=gen)
    mask = (torch.arange(length)[None, :] < lengths[:, None]).long()
    return torch.stack([ids * mask, mask], dim=1)


def train_steps(model, strategy, task, steps=3, lr=1e-2):
    """A few AdamW steps on the task loss plus the strategy's auxiliary loss, as the learner runs them."""
    params = set_trainable(model, strategy.trainable_parameters(model, task))
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.1)
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


def clones(params):
    return [p.detach().clone() for p in params]


@pytest.mark.parametrize(
    "options, key",
    [({"experts_per_task": 0}, "strategy.experts_per_task"), ({"top_k": 4}, "strategy.top_k"),
     ({"upcycle": "split"}, "strategy.upcycle"), ({"gate": "deep"}, "strategy.gate"),
     ({"activation": "tanh"}, "strategy.activation"), ({"dispatch": "fast"}, "strategy.dispatch"),
     ({"concentration": -1.0}, "strategy.concentration"), ({"targets": ["("]}, "strategy.targets"),
     ({"slices": 1}, "strategy.slices")],
)
def test_options_are_validated(options, key):
    with pytest.raises(ValueError, match=key):
        ExpertStrategy(**options)


def test_targets_that_match_nothing_are_named(bert):
    with pytest.raises(ValueError, match="strategy: target 'nowhere'"):
        setup(bert, targets=["nowhere"])


@pytest.mark.parametrize("task_conditioned", [False, True])
def test_only_the_current_tasks_experts_and_rows_get_gradients(bert, task_conditioned):
    model, strategy = setup(bert, task_conditioned=task_conditioned)
    strategy.before_task(model, TASKS[0])
    train_steps(model, strategy, TASKS[0])
    strategy.after_task(model, TASKS[0])
    strategy.before_task(model, TASKS[1])
    current = {id(p) for p in set_trainable(model, strategy.trainable_parameters(model, TASKS[1]))}
    assert current == {id(p) for p in model.bank.task_parameters(1) + model.heads.parameters_for(1)}
    model.train()
    model.zero_grad(set_to_none=True)  # task 0's last step left its gradients
    x = batch()
    loss = F.cross_entropy(model(x, 1), torch.arange(6) % 4) + strategy.auxiliary_loss(model, TASKS[1])
    loss.backward()
    named = dict(model.named_parameters())
    assert all(named[n].grad is not None for n, p in named.items() if id(p) in current)
    routers = [p for name, p in model.bank._task_named_parameters(1).items() if name.endswith(".router")]
    assert all(p.grad.abs().sum() > 0 for p in routers), "router rows learn"
    assert [n for n, p in named.items() if id(p) not in current and p.grad is not None] == []


@pytest.mark.parametrize("task_conditioned", [False, True])
def test_training_a_later_task_leaves_earlier_experts_and_the_backbone_bit_identical(bert, task_conditioned):
    torch.manual_seed(0)
    model, strategy = setup(bert, task_conditioned=task_conditioned)
    strategy.before_task(model, TASKS[0])
    start0 = clones(model.bank.task_parameters(0))
    train_steps(model, strategy, TASKS[0])
    strategy.after_task(model, TASKS[0])
    assert not all(torch.equal(a, b) for a, b in zip(start0, model.bank.task_parameters(0))), "task 0 trained"
    expert_ids = {id(p) for p in model.bank.task_parameters(0)}
    base = [p for p in model.backbone.parameters() if id(p) not in expert_ids]
    task0, base_before, head0 = clones(model.bank.task_parameters(0)), clones(base), clones(model.heads.parameters_for(0))
    x = batch()
    with torch.no_grad():
        task0_logits = model(x, 0)

    strategy.before_task(model, TASKS[1])
    task1_before = clones(model.bank.task_parameters(1))
    train_steps(model, strategy, TASKS[1])
    strategy.after_task(model, TASKS[1])

    assert all(torch.equal(a, b) for a, b in zip(task0, model.bank.task_parameters(0)))
    assert all(torch.equal(a, b) for a, b in zip(head0, model.heads.parameters_for(0)))
    assert all(torch.equal(a, b) for a, b in zip(base_before, base))
    assert not all(torch.equal(a, b) for a, b in zip(task1_before, model.bank.task_parameters(1))), "task 1 trained"
    assert not any(p.requires_grad for p in model.bank.task_parameters(1)), "frozen after its task"
    with torch.no_grad():
        if task_conditioned:  # task 0's tokens cannot reach task 1's experts
            assert torch.equal(model(x, 0), task0_logits)
        else:  # token-level routing: task 1's experts also take task 0's tokens
            assert not torch.equal(model(x, 0), task0_logits)


def test_concentration_loss_is_the_mean_marginal_entropy_over_sites_of_real_tokens(bert):
    from continual.modules.experts import load_concentration_loss, routing_entropies

    model, strategy = setup(bert, concentration=0.5, mutual_information=0.25)
    strategy.before_task(model, TASKS[0])
    x = batch()
    model(x, 0)
    deltas = list(expert_deltas(model.bank).values())
    T = int(x[:, 1].sum(1).max())
    real = x[:, 1, :T].bool().reshape(-1)
    expected = []
    for delta in deltas:
        routing = delta.last_routing
        assert torch.equal(routing.token_mask, real), "padding is masked"
        h_e, h_e_x = routing_entropies(routing.probs, real)
        expected.append(0.5 * h_e + 0.25 * (h_e_x - h_e))
        assert not torch.allclose(load_concentration_loss(routing.probs), h_e), "padding would change it"
    torch.testing.assert_close(strategy.auxiliary_loss(model, TASKS[0]), torch.stack(expected).mean())
    quiet, quiet_strategy = setup(bert, concentration=0.0)
    quiet_strategy.before_task(quiet, TASKS[0])
    quiet(x, 0)
    assert quiet_strategy.auxiliary_loss(quiet, TASKS[0]) is None


def test_trainable_and_stored_parameters_follow_the_hand_count(bert):
    model, strategy = setup(bert, experts_per_task=3, expert_hidden=6)
    for task in TASKS:
        strategy.before_task(model, task)
    per_task = 2 * 3 * (2 * D * 6 + D + 1)  # 2 layers x 3 experts x (W_in, W_out, a router row with its bias)
    head = sum(p.numel() for p in model.heads.parameters_for(1))
    assert sum(p.numel() for p in set_trainable(model, strategy.trainable_parameters(model, TASKS[1]))) == per_task + head
    dense = sum(p.numel() for p in bert.parameters())
    shared_rows = 2 * (D + 1)  # the shared expert's (zero, frozen) router row at each layer
    heads = sum(p.numel() for t in (0, 1) for p in model.heads.parameters_for(t))
    assert strategy.stored_parameters(model, TASKS) == dense + shared_rows + 2 * per_task + heads


@pytest.mark.parametrize("mode", ["copy", "slices"])
def test_task_state_round_trips_through_checkpoints(bert, tmp_path, mode):
    from continual.checkpoint import load_task_state, save_task_state

    model, strategy = setup(bert, upcycle=mode)
    for task in TASKS:
        strategy.before_task(model, task)
        train_steps(model, strategy, task, steps=1)
        strategy.after_task(model, task)
        state = strategy.task_state(model, task)
        assert all(k.startswith("experts.") or k.startswith(f"heads.heads.{task.index}.") for k in state)
        assert sum(v.numel() for v in state.values()) == model.bank.parameter_count(task.index) + sum(
            p.numel() for p in model.heads.parameters_for(task.index))
        save_task_state(tmp_path, task.index, task.name, state)

    torch.manual_seed(123)  # fresh experts and heads differ from the saved ones
    fresh, fresh_strategy = setup(bert, upcycle=mode)
    for task in TASKS:
        fresh_strategy.load_task_state(fresh, task, load_task_state(tmp_path, task.name)[0])
    x, tasks = batch(), torch.tensor([0, 1, 1, 0, 1, 0])
    with torch.no_grad():
        assert torch.equal(fresh(x, tasks), model(x, tasks))


@pytest.mark.slow
def test_experts_run_end_to_end_keeps_the_backbone_bit_identical(tiny_experiment, tmp_path, monkeypatch):
    from continual.checkpoint import load_task_state
    from continual.recipes.run import run_experiment

    seen = {"aux": 0}
    original_setup, original_aux = ExpertStrategy.setup, ExpertStrategy.auxiliary_loss

    def spy_setup(self, model, tasks):
        seen["model"] = model
        seen["backbone"] = [(p, p.detach().clone()) for p in model.backbone.parameters()]
        original_setup(self, model, tasks)

    def spy_aux(self, model, task):
        loss = original_aux(self, model, task)
        seen["aux"] += loss is not None and bool(torch.isfinite(loss)) and loss.requires_grad
        return loss

    monkeypatch.setattr(ExpertStrategy, "setup", spy_setup)
    monkeypatch.setattr(ExpertStrategy, "auxiliary_loss", spy_aux)
    cfg = tiny_experiment(
        "strategy.name=experts", "strategy.task_conditioned=true",
        "tracking.run_name=experts", "training.checkpoint_dir=" + str(tmp_path / "ckpt"), "training.device=cpu",
    )
    result = run_experiment(cfg, echo=lambda *_: None)
    assert result.matrix.shape == (2, 2) and np.isfinite(result.matrix).all()
    assert seen["aux"] > 0, "the routing loss joined training"
    model = seen["model"]
    expert_ids = {id(p) for t in range(2) for p in model.bank.task_parameters(t)}
    assert all(torch.equal(p, before) for p, before in seen["backbone"] if id(p) not in expert_ids)
    for index, record in enumerate(result.records):
        head = sum(p.numel() for p in model.heads.parameters_for(index))
        assert record.trainable_parameters == model.bank.parameter_count(index) + head
    state, entry = load_task_state(tmp_path / "ckpt", "SST-2")
    assert all(k.startswith("experts.") or k.startswith("heads.heads.0.") for k in state)
    assert entry["strategy"] == "experts"


def test_the_strategys_option_defaults_are_the_expert_kinds():
    from dataclasses import fields

    from continual.modules.experts import ExpertOptions
    from strategies.experts import OPTION_NAMES, ExpertConfig

    config = ExpertConfig()
    for option in fields(ExpertOptions):
        assert getattr(config, OPTION_NAMES.get(option.name, option.name)) == option.default, option.name
