"""The ``recursive`` strategy: a frozen recursive backbone with per-task depth-wise LoRA from the module bank."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from continual.config import ConfigError
from continual.expansion import TaskInfo
from continual.models.classifier import ContinualClassifier
from continual.models.recursive import RelaxedLinear, convert_to_recursive, save_recursive
from continual.recipes.run import load_config
from continual.training import set_trainable
from strategies.delta import DeltaStrategy
from strategies.registry import build_strategy, get_strategy_class
from strategies.recursive import RecursiveStrategy

LABELS = [("neg", "pos"), ("a", "b", "c")]
TASKS = [TaskInfo(i, f"task{i}", labels) for i, labels in enumerate(LABELS)]
WIDTH, FFN, LAYERS = 32, 48, 4


@pytest.fixture(scope="module")
def bert():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(vocab_size=97, hidden_size=WIDTH, intermediate_size=FFN, num_hidden_layers=LAYERS,
                        num_attention_heads=4, max_position_embeddings=32)
    model = BertModel(config, add_pooling_layer=False).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "LayerNorm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def batch(n=6, length=9, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 97, (n, length), generator=gen)
    lengths = torch.randint(3, length + 1, (n,), generator=gen)
    mask = (torch.arange(length)[None, :] < lengths[:, None]).long()
    return torch.stack([ids * mask, mask], dim=1)


def classifier(bert, **options):
    model = ContinualClassifier(copy.deepcopy(bert), LABELS)
    strategy = RecursiveStrategy(**options)
    strategy.setup(model, TASKS)
    return model.eval(), strategy


def test_registered_under_its_name():
    assert get_strategy_class("recursive") is RecursiveStrategy


def test_setup_ties_the_backbone_and_attaches_lora_at_every_depth(bert):
    model, strategy = classifier(bert, recursion={"num_loops": 2, "init": "average"}, rank=4, task_init="zero")
    layers = model.backbone.encoder.layer
    assert layers[0].attention.self.query.weight is layers[2].attention.self.query.weight  # CYCLE: K = 2
    sites = model.bank.sites()
    assert len(sites) == LAYERS * 2  # query and value of every unrolled depth
    assert all(not p.requires_grad for p in model.backbone.parameters())
    strategy.before_task(model, TASKS[0])
    per_task = LAYERS * 2 * 4 * (WIDTH + WIDTH)
    assert model.bank.parameter_count(0) == per_task
    head = sum(p.numel() for p in model.heads.parameters_for(0))
    assert strategy.task_parameter_count(model, TASKS[0]) == per_task + head
    trainable = set_trainable(model, strategy.trainable_parameters(model, TASKS[0]))
    assert sum(p.numel() for p in trainable) == per_task + head


def test_stored_parameters_count_the_shared_blocks_once(bert):
    model, strategy = classifier(bert, recursion={"num_loops": 2}, rank=4, task_init="zero")
    full, delta = ContinualClassifier(copy.deepcopy(bert), LABELS), DeltaStrategy(rank=4)
    delta.setup(full, TASKS)
    for task in TASKS:
        strategy.before_task(model, task)
        delta.before_task(full, task)
    layer = sum(p.numel() for p in bert.encoder.layer[0].parameters())
    # Same per-task LoRA and heads; the recursive backbone keeps K = 2 of the 4 layers.
    assert delta.stored_parameters(full, TASKS) - strategy.stored_parameters(model, TASKS) == 2 * layer
    embeddings = sum(p.numel() for p in bert.embeddings.parameters())
    heads = sum(p.numel() for t in TASKS for p in model.heads.parameters_for(t.index))
    assert strategy.stored_parameters(model, TASKS) == embeddings + 2 * layer + 2 * model.bank.parameter_count(0) + heads


def test_full_rank_svd_task_init_starts_each_task_at_the_pretrained_model(bert):
    """Every projection targeted at full rank, own norms and biases: a new task's LoRA restores the original exactly."""
    x = batch()
    original = ContinualClassifier(copy.deepcopy(bert), LABELS).eval()
    model, strategy = classifier(
        bert, recursion={"num_loops": 2, "init": "stepwise", "share_norms": False, "share_biases": False},
        rank=WIDTH, alpha=8.0, targets=["query", "key", "value", r"attention\.output\.dense", r"intermediate\.dense",
                                        r"layer\.\d+\.output\.dense"], task_init="svd",
    )
    model.heads.load_state_dict(original.heads.state_dict())
    strategy.before_task(model, TASKS[0])
    strategy.before_task(model, TASKS[1])
    for t in (0, 1):
        with torch.no_grad():
            assert torch.allclose(model(x, t), original(x, t), atol=1e-4)
    plain, _ = classifier(bert, recursion={"num_loops": 2, "init": "stepwise"}, rank=WIDTH, task_init="zero")
    plain.heads.load_state_dict(original.heads.state_dict())
    plain.bank.add_task(0)
    with torch.no_grad():
        assert not torch.allclose(plain(x, 0), original(x, 0), atol=1e-3)


def test_training_a_task_moves_only_its_lora_and_head(bert):
    torch.manual_seed(0)
    model, strategy = classifier(bert, recursion={"num_loops": 2, "rank": 2}, rank=4)
    strategy.before_task(model, TASKS[0])
    strategy.after_task(model, TASKS[0])
    strategy.before_task(model, TASKS[1])
    frozen = {n: p.detach().clone() for n, p in model.named_parameters()}
    params = set_trainable(model, strategy.trainable_parameters(model, TASKS[1]))
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    model.train()
    x = batch(seed=1)
    for _ in range(2):
        optimizer.zero_grad()
        F.cross_entropy(model(x, 1)[:, :3], torch.arange(6) % 3).backward()
        optimizer.step()
    current = {id(p) for p in params}
    moved = [n for n, p in model.named_parameters() if not torch.equal(p.detach(), frozen[n])]
    assert moved and all(id(dict(model.named_parameters())[n]) in current for n in moved)
    relaxed = model.backbone.encoder.layer[1].attention.self.query.base
    assert isinstance(relaxed, RelaxedLinear)  # the bank wrapped the relaxed linear as its site base


def test_task_state_round_trips_through_a_fresh_model(bert):
    model, strategy = classifier(bert, recursion={"num_loops": 2}, rank=4)
    strategy.before_task(model, TASKS[0])
    state = strategy.task_state(model, TASKS[0])
    assert all(k.startswith(("deltas.", "heads.")) for k in state)
    assert sum(v.numel() for v in state.values()) == strategy.task_parameter_count(model, TASKS[0])
    other, other_strategy = classifier(bert, recursion={"num_loops": 2}, rank=4, task_init="zero")
    other_strategy.load_task_state(other, TASKS[0], state)
    x = batch()
    with torch.no_grad():
        assert torch.allclose(other(x, 0), model(x, 0), atol=1e-6)


def test_pretrained_recursive_backbone_is_loaded_from_a_folder(bert, tmp_path):
    saved = convert_to_recursive(copy.deepcopy(bert), num_loops=2, init="lower", rank=3)
    save_recursive(saved, tmp_path / "rec")
    model, strategy = classifier(bert, pretrained=str(tmp_path / "rec"), task_init="zero")
    layers = model.backbone.encoder.layer
    assert layers[1].attention.self.key.weight is layers[3].attention.self.key.weight
    assert torch.equal(layers[1].attention.self.key.relax_A, saved.encoder.layer[1].attention.self.key.relax_A)
    with pytest.raises(ValueError, match="task_init=zero"):
        RecursiveStrategy(pretrained=str(tmp_path / "rec"))


def test_config_errors_name_the_key(tmp_path):
    base = {"strategy": {"name": "recursive"}}
    with pytest.raises(ConfigError, match="strategy.recursion.loops"):
        load_config(None, ["strategy.recursion.loops=2"], extra=base)
    with pytest.raises(ConfigError, match="strategy.recursion: sharing must be one of"):  # the constructor's check,
        load_config(None, ["strategy.recursion.sharing=ring"], extra=base)  # made when the config loads
    with pytest.raises(ConfigError, match="strategy.recursion: sharing must be one of"):
        build_strategy({"name": "recursive", "recursion": {"sharing": "ring"}})
    with pytest.raises(ValueError, match="task_init"):
        RecursiveStrategy(task_init="pissa")
    with pytest.raises(ValueError, match="strategy.rank"):
        RecursiveStrategy(rank=0)


@pytest.mark.slow
def test_end_to_end_run_on_real_data(tiny_experiment, tmp_path):
    """Tiny 2-layer BERT from the shared fixture: R = 2 leaves one shared block looped twice."""
    from continual.checkpoint import load_task_state
    from continual.recipes.run import run_experiment

    cfg = tiny_experiment(
        "strategy.name=recursive", "strategy.recursion.init=average", "strategy.rank=4",
        "tracking.run_name=recursive", "training.checkpoint_dir=" + str(tmp_path / "ckpt"),
    )
    result = run_experiment(cfg, echo=lambda *_: None)
    assert result.matrix.shape == (2, 2) and np.isfinite(result.matrix).all()
    first, second = result.records
    assert second.stored_parameters > first.stored_parameters
    state, entry = load_task_state(tmp_path / "ckpt", "SST-2")
    lora = [k for k in state if k.startswith("deltas.")]
    assert len(lora) == 2 * 2 * 2  # lora_A and lora_B at query and value of both unrolled depths
    assert entry["parameters"] == sum(v.numel() for v in state.values())
