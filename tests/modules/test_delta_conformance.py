"""One conformance table for every delta kind on tiny random backbones (BERT, GPT-2), plus the routing math and an
end-to-end run of the delta strategy.

Adding a kind to ``continual.modules.deltas`` adds it to every parametrized test here; it must also add a row to
``HAND_COUNTS`` and ``REFERENCE`` (checked by the first test).
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from continual.expansion import TaskInfo
from continual.models.classifier import ContinualClassifier
from continual.modules import DELTA_KINDS, ModuleBank, TaskModuleSite, routing_weights
from continual.modules.deltas.mixing import ACTIVATIONS
from continual.training import set_trainable
from strategies.delta import DeltaStrategy
from strategies.registry import register_strategy

# Kinds that sit on linears, embeddings or attention projections; block kinds (experts) need the FFN fused first and
# have their own table in tests/modules/test_experts.py.
KINDS = sorted(k for k in DELTA_KINDS if getattr(DELTA_KINDS[k], "wraps", "linear") != "module")
ARCHS = ["bert", "gpt2"]
COMPOSITIONS = ["isolated", "sequential", "simultaneous"]
LABELS = [("neg", "pos"), ("a", "b", "c", "d"), ("pos", "neg", "neutral")]
TASKS = [TaskInfo(i, f"task{i}", labels) for i, labels in enumerate(LABELS)]

# One task's delta parameters with the strategy defaults (r=8, bottleneck=24), counted by hand.
# BERT: 2 layers, hidden 32, FFN 64. GPT-2: 1 layer, hidden 32, FFN 128, c_attn 32 -> 96.
HAND_COUNTS = {
    ("bert", "lora"): 2 * 2 * 8 * (32 + 32),  # query, value per layer
    ("bert", "adapter"): 2 * 2 * (2 * 24 * 32 + 24 + 32),  # after attention output and FFN output (width 32)
    ("bert", "parallel_adapter"): 2 * ((24 * (32 + 32) + 24 + 32) + (24 * (64 + 32) + 24 + 32)),  # beside them
    ("bert", "bitfit"): 2 * (32 * 3 + 32 + 64 + 32),  # q, k, v, attention output, FFN in, FFN out
    ("gpt2", "lora"): 8 * (32 + 96),
    ("gpt2", "adapter"): 2 * (2 * 24 * 32 + 24 + 32),
    ("gpt2", "parallel_adapter"): (24 * (32 + 32) + 24 + 32) + (24 * (128 + 32) + 24 + 32),
    ("gpt2", "bitfit"): 96 + 32 + 128 + 32,
    ("bert", "prefix"): 2 * 2 * 6 * 32,  # 6 key and 6 value vectors per layer
    ("gpt2", "prefix"): 6 * 64,  # the key and value columns of the fused c_attn
    ("bert", "prompt"): 20 * 32,
    ("gpt2", "prompt"): 20 * 32,
    ("bert", "intrinsic"): 2 * 2 * 32,  # d = 32 at query and value per layer
    ("gpt2", "intrinsic"): 32,
    # every linear of both layers: q, k, v, attention output (32x32+32 each), FFN in (64x32+64), FFN out (32x64+32)
    ("bert", "selective"): 2 * (4 * (32 * 32 + 32) + (64 * 32 + 64) + (32 * 64 + 32)),
    ("gpt2", "selective"): (96 * 32 + 96) + (32 * 32 + 32) + (128 * 32 + 128) + (32 * 128 + 32),
    ("bert", "last_layer"): 4 * (32 * 32 + 32) + (64 * 32 + 64) + (32 * 64 + 32),  # layer 1 only
    ("gpt2", "last_layer"): (96 * 32 + 96) + (32 * 32 + 32) + (128 * 32 + 128) + (32 * 128 + 32),
}
VIRTUAL = {kind for kind in KINDS if getattr(DELTA_KINDS[kind], "virtual_tokens", False)}


def _reference_bottleneck(d, k, u, activation, scale=1.0):
    z = ACTIVATIONS[activation](u @ d.down[k].T + d.down_bias[k])
    return scale * (z @ d.up[k].T + d.up_bias[k])


# kind -> the change one slot k makes, written out independently of the batched code: (delta, k, x, h) -> [T, out]
REFERENCE = {
    "lora": lambda d, k, x, h: d.scale * (x @ d.lora_A[k].T @ d.lora_B[k].T),
    "adapter": lambda d, k, x, h: _reference_bottleneck(d, k, h, d.activation),
    "parallel_adapter": lambda d, k, x, h: _reference_bottleneck(d, k, x, d.activation, d.scale),
    "bitfit": lambda d, k, x, h: d.offset[k].expand(h.shape),
    "intrinsic": lambda d, k, x, h: ((x @ d.proj_in) * d.z[k]) @ d.proj_out.T,
    "selective": lambda d, k, x, h: x @ d.weight[k].T + d.bias[k],
    "last_layer": lambda d, k, x, h: x @ d.weight[k].T + d.bias[k],
    # Virtual-token kinds are checked against the backbone's own inputs_embeds / past_key_values paths below.
    "prefix": None,
    "prompt": None,
}


# ---------------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def backbones(tiny_backbone):
    from transformers import GPT2Config, GPT2Model

    from continual.models.backbone import load_backbone

    torch.manual_seed(0)
    bert, _ = load_backbone(tiny_backbone["name"], random_init=True, config_overrides=tiny_backbone["config_overrides"])
    gpt2 = GPT2Model(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=1000, bos_token_id=0, eos_token_id=0))
    return {"bert": bert, "gpt2": gpt2}


def build(backbones, arch, kind, composition="isolated", n_tasks=0):
    """A classifier over a fresh copy of the backbone with the delta strategy set up and n_tasks allocated."""
    model = ContinualClassifier(copy.deepcopy(backbones[arch]), LABELS, pooling="mean" if arch == "bert" else "last")
    strategy = DeltaStrategy(kinds=[kind], composition=composition)
    strategy.setup(model, TASKS)
    for task in TASKS[:n_tasks]:
        strategy.before_task(model, task)
    return model.eval(), strategy


def batch(n=6, length=9, seed=0):
    """[n, 2, length] ids (< 1000, valid for both vocabularies) over a right-padded mask of varying lengths."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 1000, (n, length), generator=gen)
    lengths = torch.randint(3, length + 1, (n,), generator=gen)
    mask = (torch.arange(length)[None, :] < lengths[:, None]).long()
    return torch.stack([ids * mask, mask], dim=1)


def perturb(bank, tasks, seed=1):
    """Give every delta of ``tasks`` non-zero values, so that tasks' modules differ."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in tasks:
            for p in bank.task_parameters(t):
                p.add_(0.2 * torch.randn(p.shape, generator=gen))


def train_steps(model, strategy, task, steps=2):
    params = set_trainable(model, strategy.trainable_parameters(model, task))
    optimizer = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
    model.train()
    x = batch(seed=10 + task.index)
    y = torch.arange(x.shape[0]) % len(task.labels)
    for _ in range(steps):
        optimizer.zero_grad()
        F.cross_entropy(model(x, task.index)[:, : len(task.labels)], y).backward()
        optimizer.step()
    model.eval()


def clones(params):
    return [p.detach().clone() for p in params]


# ---------------------------------------------------------------------------------------------------- the table
def test_every_kind_has_a_hand_count_and_a_reference():
    assert {kind for _, kind in HAND_COUNTS} == set(KINDS) == set(REFERENCE)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("kind", KINDS)
def test_zero_initialised_deltas_leave_logits_unchanged(backbones, arch, kind):
    model = ContinualClassifier(copy.deepcopy(backbones[arch]), LABELS).eval()
    x, tasks = batch(), torch.tensor([0, 1, 2, 0, 1, 2])
    before = model(x, tasks)
    if kind in VIRTUAL:
        # New virtual tokens take attention mass, so they act from the start; a sample whose task has no slot
        # sees none of them (masked) and gets the backbone's output.
        DeltaStrategy(kinds=[kind], composition="isolated").setup(model, TASKS)
        for t in range(2):
            model.bank.add_task(t)
        with torch.no_grad():
            after = model(x, tasks)
        torch.testing.assert_close(after[tasks == 2], before[tasks == 2], atol=1e-6, rtol=1e-6)
        assert not torch.allclose(after[tasks != 2], before[tasks != 2], atol=1e-4)
        return
    # Simultaneous: every allocated task's delta acts on every sample.
    DeltaStrategy(kinds=[kind], composition="simultaneous").setup(model, TASKS)
    for t in range(3):
        model.bank.add_task(t)
    assert model.bank.sites() and all(isinstance(s, TaskModuleSite) for s in model.bank.sites().values())
    assert torch.equal(model(x, tasks), before)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("kind", KINDS)
def test_trainable_parameter_count_matches_hand_count(backbones, arch, kind):
    model, strategy = build(backbones, arch, kind, n_tasks=2)
    hand = HAND_COUNTS[(arch, kind)]
    assert model.bank.parameter_count(1) == model.bank.expected_parameter_count() == hand
    head = sum(p.numel() for p in model.heads.parameters_for(1))
    assert sum(p.numel() for p in set_trainable(model, strategy.trainable_parameters(model, TASKS[1]))) == hand + head
    base = sum(p.numel() for p in backbones[arch].parameters())
    heads = sum(p.numel() for t in (0, 1) for p in model.heads.parameters_for(t))
    assert strategy.stored_parameters(model, TASKS[:2]) == base + 2 * hand + heads


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("kind", KINDS)
def test_only_the_current_tasks_deltas_receive_gradients(backbones, arch, kind):
    model, strategy = build(backbones, arch, kind, composition="sequential", n_tasks=2)
    perturb(model.bank, [0])  # task 1 trains on top of a task-0 delta that acts
    strategy.after_task(model, TASKS[0])
    current = {id(p) for p in set_trainable(model, strategy.trainable_parameters(model, TASKS[1]))}
    x = batch()
    F.cross_entropy(model(x, 1), torch.arange(x.shape[0]) % 4).backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    named = dict(model.named_parameters())
    assert all(grads[n] is not None for n, p in named.items() if id(p) in current)
    assert any(grads[n].abs().sum() > 0 for n, p in named.items() if id(p) in current)
    assert [n for n, p in named.items() if id(p) not in current and grads[n] is not None] == []


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("kind", KINDS)
def test_training_a_later_task_leaves_earlier_deltas_and_the_backbone_bit_identical(backbones, arch, kind):
    """Sequential composition: task 1 trains through task 0's frozen delta, which must not move."""
    torch.manual_seed(0)
    model, strategy = build(backbones, arch, kind, composition="sequential")
    strategy.before_task(model, TASKS[0])
    train_steps(model, strategy, TASKS[0])
    strategy.after_task(model, TASKS[0])
    delta_ids = {id(p) for p in model.bank.task_parameters(0)}
    base = [p for p in model.backbone.parameters() if id(p) not in delta_ids]
    task0, base_before = clones(model.bank.task_parameters(0)), clones(base)

    strategy.before_task(model, TASKS[1])
    task1_before = clones(model.bank.task_parameters(1))
    train_steps(model, strategy, TASKS[1])
    strategy.after_task(model, TASKS[1])

    assert all(torch.equal(a, b) for a, b in zip(task0, model.bank.task_parameters(0)))
    assert all(torch.equal(a, b) for a, b in zip(base_before, base))
    assert not all(torch.equal(a, b) for a, b in zip(task1_before, model.bank.task_parameters(1))), "task 1 trained"


@pytest.mark.parametrize("composition", COMPOSITIONS)
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("kind", KINDS)
def test_mixed_task_batch_equals_per_task_batches(backbones, arch, kind, composition):
    model, _ = build(backbones, arch, kind, composition=composition, n_tasks=3)
    perturb(model.bank, range(3))
    x, tasks = batch(), torch.tensor([0, 1, 2, 2, 0, 1])
    with torch.no_grad():
        mixed = model(x, tasks)
        for t in range(3):
            rows = (tasks == t).nonzero(as_tuple=True)[0]
            torch.testing.assert_close(mixed[rows], model(x[rows], t), atol=1e-5, rtol=1e-4)
        f0, f2 = (model._features(x, torch.full((6,), t)) for t in (0, 2))
    if composition == "simultaneous":  # every sample sees every task's delta: the task id changes nothing
        torch.testing.assert_close(f0, f2)
    else:
        assert not torch.allclose(f0, f2, atol=1e-4), "tasks' deltas must make a difference"


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("kind", KINDS)
def test_all_tasks_forward_routes_each_task(backbones, arch, kind):
    model, _ = build(backbones, arch, kind, n_tasks=2)
    perturb(model.bank, range(2))
    model.known_train_tasks_labels = {0, 1}
    x = batch()
    with torch.no_grad():
        every = model(x, None)
        assert sorted(every) == [0, 1]
        for t in (0, 1):
            assert torch.equal(every[t], model(x, t))


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("kind", KINDS)
def test_task_state_round_trips_through_checkpoints(backbones, arch, kind, tmp_path):
    from continual.checkpoint import load_task_state, save_task_state

    model, strategy = build(backbones, arch, kind, composition="sequential", n_tasks=2)
    perturb(model.bank, range(2))
    for task in TASKS[:2]:
        state = strategy.task_state(model, task)
        assert all(k.startswith("deltas.") or k.startswith(f"heads.heads.{task.index}.") for k in state)
        head = sum(p.numel() for p in model.heads.parameters_for(task.index))
        assert sum(v.numel() for v in state.values()) == HAND_COUNTS[(arch, kind)] + head
        save_task_state(tmp_path, task.index, task.name, state)

    torch.manual_seed(123)  # fresh heads differ from the saved ones
    fresh, fresh_strategy = build(backbones, arch, kind, composition="sequential")
    for task in TASKS[:2]:
        fresh_strategy.load_task_state(fresh, task, load_task_state(tmp_path, task.name)[0])
    x, tasks = batch(), torch.tensor([0, 1, 1, 0, 1, 0])
    with torch.no_grad():
        assert torch.equal(fresh(x, tasks), model(x, tasks))


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("kind", KINDS)
def test_merged_weights_equal_unmerged_deltas(backbones, arch, kind):
    model, _ = build(backbones, arch, kind, composition="sequential", n_tasks=2)
    perturb(model.bank, range(2))
    if not DELTA_KINDS[kind].mergeable:
        with pytest.raises(ValueError, match="cannot be merged"):
            model.bank.merged(model.backbone, 1)
        return
    x = batch()
    for t in (0, 1):
        merged = copy.deepcopy(model)
        merged.backbone, merged.bank = model.bank.merged(model.backbone, t), None
        assert not any(isinstance(m, TaskModuleSite) for m in merged.backbone.modules())
        with torch.no_grad():
            torch.testing.assert_close(merged(x, t), model(x, t), atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------------------------------------------- one site
class FixedRouter:
    """A soft mix given in advance, as an inferred router or an expert gate would produce."""

    exclusive = False

    def __init__(self, weights):
        self.fixed = weights

    def weights(self, task_ids, n_slots):
        return self.fixed


@pytest.mark.parametrize("exclusive", [True, False])
@pytest.mark.parametrize("kind", sorted(set(KINDS) - VIRTUAL))
def test_batched_site_equals_per_sample_reference(kind, exclusive):
    """The gathered (isolated) and mixed (weighted) paths compute sum_k w[b, k] * delta_k(sample b)."""
    torch.manual_seed(0)
    linear = nn.Linear(6, 5)
    task_ids = torch.tensor([2, 0, 5, 1])  # task 5 has no slot: exactly the base output
    weights = routing_weights(task_ids, range(3), 3, "isolated") if exclusive else torch.rand(4, 3)
    bank = ModuleBank("isolated") if exclusive else ModuleBank(router=FixedRouter(weights))
    bank.attach(nn.ModuleDict({"proj": linear}), kind, ["proj"])
    site = bank.sites()["proj"]
    for t in range(3):
        bank.add_task(t)
    perturb(bank, range(3))
    x = torch.randn(4, 7, 6)
    with torch.no_grad(), bank.route(task_ids):
        out, h = site(x), linear(x)
    for b in range(4):
        expected = h[b] + sum(weights[b, k] * REFERENCE[kind](site.delta, k, x[b], h[b]) for k in range(3))
        torch.testing.assert_close(out[b], expected, atol=1e-5, rtol=1e-4)
    if exclusive:
        assert torch.equal(out[2], h[2])


def test_site_without_routing_refuses_to_guess():
    bank = ModuleBank()
    bank.attach(nn.ModuleDict({"proj": nn.Linear(4, 4)}), "lora", ["proj"])
    bank.add_task(0)
    with pytest.raises(RuntimeError, match="no routing is set"):
        bank.sites()["proj"](torch.randn(2, 3, 4))


def test_unknown_target_names_the_pattern_and_modules_that_exist(backbones):
    with pytest.raises(ValueError, match=r"'attention_nope'.*encoder\.layer\.0\.attention\.self\.query"):
        ModuleBank().attach(copy.deepcopy(backbones["bert"]), "lora", ["attention_nope"])


def test_kinds_stack_on_one_linear_and_train_together(backbones):
    model = ContinualClassifier(copy.deepcopy(backbones["bert"]), LABELS).eval()
    strategy = DeltaStrategy(kinds=["lora", "bitfit"], targets=[r"attention\.self\.query"])
    strategy.setup(model, TASKS)
    strategy.before_task(model, TASKS[0])
    query = model.backbone.encoder.layer[0].attention.self.query
    assert isinstance(query, TaskModuleSite) and isinstance(query.base, TaskModuleSite)
    assert list(model.bank.sites())[:2] == ["encoder.layer.0.attention.self.query", "encoder.layer.0.attention.self.query.base"]
    assert model.bank.parameter_count(0) == model.bank.expected_parameter_count() == 2 * (8 * (32 + 32) + 32)
    x = batch()
    with torch.no_grad():
        perturb(model.bank, [0])
        merged = copy.deepcopy(model)
        merged.backbone, merged.bank = model.bank.merged(model.backbone, 0), None
        torch.testing.assert_close(merged(x, 0), model(x, 0), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(
    "options, key",
    [({"kinds": ["lorax"]}, "strategy.kinds"), ({"kinds": []}, "strategy.kinds"),
     ({"composition": "stacked"}, "strategy.composition"), ({"rank": 0}, "strategy.rank"),
     ({"alpha": 0}, "strategy.alpha"), ({"bottleneck": 0}, "strategy.bottleneck"), ({"targets": ["("]}, "strategy.targets")],
)
def test_strategy_options_are_validated(options, key):
    with pytest.raises(ValueError, match=key):
        DeltaStrategy(**options)


# ---------------------------------------------------------------------------------------------------- routing math
@pytest.mark.parametrize(
    "mode, expected",
    [
        ("isolated", [[1, 0, 0], [0, 0, 1], [0, 1, 0], [0, 0, 0]]),
        ("sequential", [[1, 0, 0], [1, 1, 1], [1, 1, 0], [1, 1, 1]]),
        ("simultaneous", [[1, 1, 1], [1, 1, 1], [1, 1, 1], [1, 1, 1]]),
    ],
)
def test_routing_weights_per_composition(mode, expected):
    weights = routing_weights(torch.tensor([0, 2, 1, 3]), [0, 1, 2], 3, mode)
    assert weights.dtype == torch.float32
    assert weights.tolist() == expected


@pytest.mark.parametrize(
    "mode, expected",
    [("isolated", [[1, 0, 0], [0, 0, 0]]), ("sequential", [[1, 0, 0], [1, 0, 0]]), ("simultaneous", [[1, 0, 1], [1, 0, 1]])],
)
def test_routing_weights_skip_slots_that_are_not_trained(mode, expected):
    assert routing_weights(torch.tensor([0, 1]), [0, 2], 3, mode).tolist() == expected


def test_routing_weights_reject_an_unknown_mode():
    with pytest.raises(ValueError, match="composition"):
        routing_weights(torch.tensor([0]), [0], 1, "stacked")


# ---------------------------------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_delta_run_keeps_the_backbone_bit_identical(tiny_experiment, tmp_path, monkeypatch):
    from continual.checkpoint import load_task_state
    from continual.recipes.run import run_experiment

    register_strategy(DeltaStrategy)
    seen = {}
    original_setup = DeltaStrategy.setup

    def spy_setup(self, model, tasks):
        seen["model"] = model
        seen["backbone"] = [(p, p.detach().clone()) for p in model.backbone.parameters()]
        original_setup(self, model, tasks)

    monkeypatch.setattr(DeltaStrategy, "setup", spy_setup)
    cfg = tiny_experiment(
        "strategy.name=delta", "strategy.kinds=[lora,bitfit]", "strategy.composition=sequential",
        "tracking.run_name=delta", "training.checkpoint_dir=" + str(tmp_path / "ckpt"), "training.device=cpu",
    )
    result = run_experiment(cfg, echo=lambda *_: None)
    assert result.matrix.shape == (2, 2) and np.isfinite(result.matrix).all()
    assert all(torch.equal(p, before) for p, before in seen["backbone"])

    model = seen["model"]
    for index, record in enumerate(result.records):
        head = sum(p.numel() for p in model.heads.parameters_for(index))
        assert record.trainable_parameters == model.bank.parameter_count(index) + head
    state, entry = load_task_state(tmp_path / "ckpt", "SST-2")
    assert all(k.startswith("deltas.") or k.startswith("heads.heads.0.") for k in state)
    assert entry["parameters"] == model.bank.parameter_count(0) + sum(p.numel() for p in model.heads.parameters_for(0))
    assert entry["strategy"] == "delta"


@pytest.mark.parametrize("kind", sorted(k for k in KINDS if hasattr(DELTA_KINDS[k], "forward_slot")))
def test_one_task_batch_fast_path_equals_the_reference(kind):
    """A batch that is all one task runs that slot's modules directly (no gather); same numbers as the formula."""
    torch.manual_seed(0)
    linear = nn.Linear(6, 5)
    bank = ModuleBank("isolated")
    bank.attach(nn.ModuleDict({"proj": linear}), kind, ["proj"])
    site = bank.sites()["proj"]
    for t in range(3):
        bank.add_task(t)
    perturb(bank, range(3))
    x = torch.randn(4, 7, 6)
    with torch.no_grad(), bank.route(torch.full((4,), 1)):
        assert bank.routing.single_slot(3) == 1
        out, h = site(x), linear(x)
    for b in range(4):
        torch.testing.assert_close(out[b], h[b] + REFERENCE[kind](site.delta, 1, x[b], h[b]), atol=1e-5, rtol=1e-4)
    with bank.route(torch.tensor([1, 1, 0, 1])):
        assert bank.routing.single_slot(3) is None


# ---------------------------------------------------------------------------------------------------- many tasks
MANY = 12  # tasks stored; a batch uses a few of them, read from the stacked slots
MANY_LABELS = [("neg", "pos"), ("a", "b", "c"), ("x", "y", "z", "w")] * (MANY // 3) + [("yes", "no")]
MANY_TASKS = [TaskInfo(i, f"task{i}", labels) for i, labels in enumerate(MANY_LABELS)]  # one more than allocated


def build_many(backbones, kind, composition="isolated", arch="bert"):
    """A classifier with MANY tasks allocated, trained (random values) and frozen, as a long stream leaves it."""
    model = ContinualClassifier(copy.deepcopy(backbones[arch]), MANY_LABELS, pooling="mean" if arch == "bert" else "last")
    strategy = DeltaStrategy(kinds=[kind], composition=composition)
    strategy.setup(model, MANY_TASKS)
    gen = torch.Generator().manual_seed(3)
    for task in MANY_TASKS[:MANY]:
        strategy.before_task(model, task)
        with torch.no_grad():
            for p in model.bank.task_parameters(task.index) + model.heads.parameters_for(task.index):
                p.add_(0.2 * torch.randn(p.shape, generator=gen))
        strategy.after_task(model, task)
    return model.eval(), strategy


def stacks_of(model):
    """Every SlotParameters of the model's bank (the stacked storage of its slots)."""
    from continual.modules.deltas.stacking import SlotParameters

    return [m for site in model.bank.sites().values() for m in site.delta.modules() if isinstance(m, SlotParameters)]


def stacked(model) -> bool:
    """Every slot of every site is a view of its row of the site's stack."""
    from continual.modules.deltas.stacking import are_views_of

    return all(s._stack is not None and are_views_of(list(s), s._stack) for s in stacks_of(model))


@pytest.mark.parametrize("composition", ["isolated", "sequential"])
@pytest.mark.parametrize("kind", KINDS)
def test_mixed_batch_over_many_stored_tasks_equals_per_task_batches(backbones, kind, composition):
    """MANY tasks stored, a batch using 3 of them: the gathered slots give each sample its own task's output."""
    model, _ = build_many(backbones, kind, composition)
    assert stacks_of(model) and stacked(model)
    x, tasks = batch(), torch.tensor([7, 2, 11, 11, 7, 2])
    with torch.no_grad():
        mixed = model(x, tasks)
        for t in (2, 7, 11):
            rows = (tasks == t).nonzero(as_tuple=True)[0]
            torch.testing.assert_close(mixed[rows], model(x[rows], t), atol=1e-5, rtol=1e-4)
    with model.bank.route(tasks):
        used = model.bank.routing.selection(MANY)
        assert used.ids == ((2, 7, 11) if composition == "isolated" else tuple(range(12)))
        assert used.weights.shape == (6, len(used.ids)) and used.single is None


@pytest.mark.parametrize("kind", ["lora", "adapter", "prefix", "prompt"])
def test_frozen_slots_written_in_place_are_read_from_the_stack(backbones, kind):
    """An in-place write to a frozen slot (an optimizer step, copy_ from a checkpoint or a run state) lands in the
    stack the batch reads: nothing goes stale."""
    model, _ = build_many(backbones, kind)
    x = batch()
    with torch.no_grad():
        before = model(x, torch.full((6,), 5))
        for p in model.bank.task_parameters(5):
            p.mul_(-1.5)
        after = model(x, torch.tensor([5, 5, 5, 1, 1, 1]))
        assert not torch.allclose(after[:3], before[:3], atol=1e-4)
        torch.testing.assert_close(after[:3], model(x[:3], 5), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("kind", ["lora", "adapter", "prefix", "prompt"])
def test_the_stack_follows_loads_allocation_conversion_and_copies(backbones, kind):
    model, strategy = build_many(backbones, kind)
    other, _ = build_many(backbones, kind)
    with torch.no_grad():
        for p in other.bank.task_parameters(3) + other.heads.parameters_for(9):
            p.add_(1.0)
    x, tasks = batch(), torch.tensor([0, 3, 9, 9, 3, 0])
    with torch.no_grad():
        expected = other(x, tasks)
        assert not torch.allclose(model(x, tasks), expected, atol=1e-4)
        # load_state_dict copying (the default) and assigning: the batch reads the loaded values
        model.load_state_dict(other.state_dict())
        torch.testing.assert_close(model(x, tasks), expected)
        fresh, _ = build_many(backbones, kind)
        fresh(x, tasks)
        fresh.load_state_dict({k: v.clone() for k, v in other.state_dict().items()}, assign=True)
        torch.testing.assert_close(fresh(x, tasks), expected)
        assert stacked(fresh), "rebuilt on the first read"

        # a conversion converts the stack as one tensor and keeps the views
        model.double()
        assert stacked(model) and all(s._stack.dtype == torch.float64 for s in stacks_of(model))
        torch.testing.assert_close(model(x, tasks).float(), expected, atol=1e-5, rtol=1e-4)
        model.float()

        # a copy stacks its own Parameters: writing to the copy leaves the original alone
        twin = copy.deepcopy(model)
        for p in twin.bank.task_parameters(9):
            p.zero_()
        torch.testing.assert_close(model(x, tasks), expected)
        assert not torch.allclose(twin(x, tasks)[2:4], expected[2:4], atol=1e-4)

    # a task allocated after reads takes the next row of the stack
    extra = MANY_TASKS[MANY]
    strategy.before_task(model, extra)
    with torch.no_grad():
        for p in model.bank.task_parameters(MANY):
            p.add_(0.3)
    strategy.after_task(model, extra)
    with torch.no_grad():
        grown = model(x, torch.tensor([MANY, 3, 9, 9, 3, MANY]))
        torch.testing.assert_close(grown[1:5], expected[1:5], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(grown[[0, 5]], model(x[[0, 5]], MANY), atol=1e-5, rtol=1e-4)
    assert stacked(model) and all(len(s) == MANY + 1 for s in stacks_of(model))


@pytest.mark.parametrize("kind", KINDS)
def test_a_mixed_training_batch_reaches_only_the_trainable_slot(backbones, kind):
    """Frozen slots come from the stack; the slot that trains is read live, so only it (and its head) get gradients,
    equal to those of a one-task batch of its samples."""
    model, strategy = build_many(backbones, kind)
    task = MANY_TASKS[4]
    trainable = set_trainable(model, strategy.trainable_parameters(model, task))
    x, tasks = batch(), torch.tensor([4, 8, 4, 1, 8, 4])
    rows = (tasks == 4).nonzero(as_tuple=True)[0]
    y = torch.arange(6) % 2
    F.cross_entropy(model(x, tasks)[rows], y[rows], reduction="sum").backward()  # eval mode: no dropout
    mixed = {id(p): p.grad.clone() for p in trainable}
    named = dict(model.named_parameters())
    assert [n for n, p in named.items() if p.grad is not None and id(p) not in mixed] == []
    assert any(g.abs().sum() > 0 for g in mixed.values())
    for p in model.parameters():
        p.grad = None
    F.cross_entropy(model(x[rows], 4), y[rows], reduction="sum").backward()  # the one-task path
    for p in trainable:
        torch.testing.assert_close(mixed[id(p)], p.grad, atol=1e-5, rtol=1e-4)


def test_slot_parameters_grow_reserve_and_keep_their_values():
    from continual.modules.deltas.stacking import SlotParameters, are_views_of

    slots = SlotParameters()
    values = [torch.randn(3, 2) for _ in range(9)]
    for v in values:
        slots.append(nn.Parameter(v.clone()))
        assert are_views_of(list(slots), slots._stack)
    assert slots._stack.shape[0] >= 9 and torch.equal(slots.stacked(), torch.stack(values))
    slots.reserve(40)
    assert slots._stack.shape[0] == 40 and are_views_of(list(slots), slots._stack)
    slots[4] = nn.Parameter(torch.ones(3, 2), requires_grad=False)  # a replaced slot is copied into its row
    assert torch.equal(slots.stacked()[4], torch.ones(3, 2)) and are_views_of(list(slots), slots._stack)
    picked = slots.rows(torch.tensor([4, 8]), (4, 8))
    assert picked.grad_fn is not None and torch.equal(picked[1], values[8])  # slot 8 requires grad: read live
    picked.sum().backward()
    assert slots[8].grad is not None and slots[4].grad is None and slots[0].grad is None
    assert isinstance(slots[1:3], nn.ParameterList) and not isinstance(slots[1:3], SlotParameters)


def test_the_slot_selection_is_found_once_with_the_callers_value():
    from continual.modules.deltas.stacking import SlotSelection, select_slots

    weights = torch.tensor([[0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0], [0.0, 1.0, 0.0, 0.0]])
    selection, extra = select_slots(weights, True, torch.tensor(17))
    assert selection.ids == (1, 3) and selection.slots.tolist() == [1, 3] and int(extra) == 17
    assert selection.weights.tolist() == [[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]] and selection.single is None
    assert select_slots(weights[[0, 2]], True)[0].single == 1
    assert select_slots(weights[[0, 2]] * 0.5, False)[0].single is None  # one slot, but not with weight 1
    assert SlotSelection.of_all(weights, True).ids == (0, 1, 2, 3)  # every slot, no sync
    bank = ModuleBank()
    bank.attach(nn.ModuleDict({"proj": nn.Linear(4, 4)}), "lora", ["proj"])
    for t in range(4):
        bank.add_task(t)
    with bank.route(torch.tensor([3, 0, 3])):
        assert int(bank.host_value(torch.tensor(9))) == 9
        assert bank.routing.selection(4).ids == (0, 3)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("kind", KINDS)
def test_bf16_autocast_follows_fp32_and_trains_in_fp32(backbones, arch, kind):
    """``training.precision=bf16``: a mixed batch in bfloat16 autocast answers like float32 (within bf16's precision),
    returns float32 scores, and the current task's deltas get float32 gradients (parameters stay float32)."""
    model, strategy = build(backbones, arch, kind, composition="sequential", n_tasks=2)
    perturb(model.bank, [0, 1])
    strategy.after_task(model, TASKS[0])
    x, tasks = batch(), torch.tensor([0, 1, 1, 0, 1, 0])
    with torch.no_grad():
        exact = model(x, tasks)
        model.compute_dtype = torch.bfloat16
        low = model(x, tasks)
    assert low.dtype == torch.float32
    finite = torch.isfinite(exact)
    assert torch.equal(finite, torch.isfinite(low))
    torch.testing.assert_close(low[finite], exact[finite], atol=0.15, rtol=0.05)
    assert not torch.equal(low, exact), "bf16 autocast did not change the arithmetic"

    current = set_trainable(model, strategy.trainable_parameters(model, TASKS[1]))
    model.train()
    F.cross_entropy(model(x, 1)[:, :4], torch.arange(x.shape[0]) % 4).backward()
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in current)
    assert any(p.grad.abs().sum() > 0 for p in current)
