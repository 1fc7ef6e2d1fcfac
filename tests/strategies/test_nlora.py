"""N-LoRA on a label-word classifier (tiny random GPT-2/Llama, real CL_Benchmark data): both penalties by hand, a whole
run, and options that fail naming their key."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from continual.expansion import TaskInfo
from continual.models.backbone import load_causal_lm
from continual.models.label_word_classifier import build_label_word_classifier
from strategies.nlora import NLoRA

pytestmark = pytest.mark.usefixtures("one_cpu_thread")

NAMES = ["SST-2", "agnews"]
LABELS = [("Good", "Bad"), ("World", "Sports", "Business", "Science or Technology")]
TASKS = [TaskInfo(i, n, l) for i, (n, l) in enumerate(zip(NAMES, LABELS))]


def _two_tasks(tiny_causal_lm, **options):
    node = tiny_causal_lm("gpt2")
    torch.manual_seed(0)
    lm, tokenizer = load_causal_lm(node["name"], random_init=True, config_overrides=node["config_overrides"])
    model = build_label_word_classifier(lm, tokenizer, NAMES, LABELS, label_space="seen")
    strategy = NLoRA(rank=4, alpha=8.0, **options)
    strategy.setup(model, TASKS)
    strategy.before_task(model, TASKS[0])
    with torch.no_grad():
        for site in model.bank.sites().values():
            site.delta.slot_parameters(0)["lora_B"].normal_()
    strategy.after_task(model, TASKS[0])
    strategy.before_task(model, TASKS[1])
    with torch.no_grad():
        for site in model.bank.sites().values():
            site.delta.slot_parameters(1)["lora_B"].normal_()
    return model, strategy


def _updates(model, task):
    """``dW = (alpha / r) B A`` of every site, written out."""
    out = []
    for site in model.bank.sites().values():
        slot = site.delta.slot_parameters(task)
        out.append((8.0 / 4) * slot["lora_B"].detach() @ slot["lora_A"].detach())
    return out


def test_the_sparsity_penalty_is_the_l1_norm_of_the_new_update(tiny_causal_lm):
    model, strategy = _two_tasks(tiny_causal_lm, lambda_l1=0.01, penalty="sparsity")
    assert len(model.bank.sites()) == 2  # GPT-2's fused c_attn in 2 blocks
    by_hand = 0.01 * sum(float(dw.abs().sum()) for dw in _updates(model, 1))
    loss = strategy.auxiliary_loss(model, TASKS[1])
    assert float(loss.detach()) == pytest.approx(by_hand, rel=1e-5)
    loss.backward()
    site = next(iter(model.bank.sites().values()))
    assert site.delta.slot_parameters(1)["lora_A"].grad is not None and site.delta.slot_parameters(0)["lora_A"].grad is None


def test_the_collision_penalty_is_the_l1_norm_of_the_elementwise_product_with_earlier_updates(tiny_causal_lm):
    model, strategy = _two_tasks(tiny_causal_lm, lambda_l1=3.0, penalty="collision")
    by_hand = 3.0 * sum(float((old * new).abs().sum()) for old, new in zip(_updates(model, 0), _updates(model, 1)))
    assert float(strategy.auxiliary_loss(model, TASKS[1]).detach()) == pytest.approx(by_hand, rel=1e-5)
    assert strategy.auxiliary_loss(model, TASKS[0]) is None  # nothing earlier to collide with
    assert NLoRA(lambda_l1=0.0).auxiliary_loss(model, TASKS[1]) is None


@pytest.mark.slow
@pytest.mark.parametrize("family, penalty", [("gpt2", "sparsity"), ("llama", "collision")])
def test_an_nlora_run_on_label_words(tiny_experiment, tiny_causal_lm, family, penalty):
    from continual.recipes.run import run_experiment

    cfg = tiny_experiment("strategy.name=nlora", f"strategy.penalty={penalty}", "backbone.head=label_words",
                          "backbone.label_space=seen", "tracking.enabled=false", backbone=tiny_causal_lm(family))
    result = run_experiment(cfg, echo=lambda _: None)
    assert result.matrix.shape == (2, 2) and np.isfinite(result.matrix).all()
    assert result.records[1].stored_parameters > result.records[0].stored_parameters


@pytest.mark.parametrize("override, key", [
    ("strategy.lambda_l1=-1", "strategy.lambda_l1"),
    ("strategy.lambda_l1=lots", "strategy.lambda_l1"),
    ("strategy.penalty=l2", "strategy.penalty"),
    ("strategy.alpha=0", "strategy.alpha"),
])
def test_bad_options_fail_naming_their_key(override, key):
    from continual.recipes.run import load_config
    from strategies.registry import build_strategy

    with pytest.raises(ValueError, match=key):
        build_strategy(load_config(None, ["strategy.name=nlora", override]).strategy)
