"""Prompt and prefix tuning against the backbone's own mechanisms: soft tokens equal ``inputs_embeds`` with the
prompt prepended, prefix vectors equal ``past_key_values`` holding the prefix keys and values (how PEFT does
prefix tuning), and sequential composition equals concatenating the prompts of tasks ``0..j``
(Progressive Prompts)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from continual.expansion import TaskInfo
from continual.models.classifier import ContinualClassifier
from continual.modules import ModuleBank
from strategies.delta import DeltaStrategy

LABELS = [("neg", "pos"), ("a", "b", "c", "d"), ("x", "y", "z")]
TASKS = [TaskInfo(i, f"task{i}", labels) for i, labels in enumerate(LABELS)]


@pytest.fixture(scope="module")
def gpt2():
    from transformers import GPT2Config, GPT2Model

    torch.manual_seed(0)
    return GPT2Model(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=1000, bos_token_id=0, eos_token_id=0)).eval()


@pytest.fixture(scope="module")
def bert(tiny_backbone):
    from continual.models.backbone import load_backbone

    torch.manual_seed(0)
    model, _ = load_backbone(tiny_backbone["name"], random_init=True, config_overrides=tiny_backbone["config_overrides"])
    return model.eval()


def inputs(n=4, length=7, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 1000, (n, length), generator=gen)
    lengths = torch.tensor([length, length - 2, 3, length][:n])
    mask = (torch.arange(length)[None, :] < lengths[:, None]).long()
    return ids * mask, mask


def with_bank(backbone, kind, composition="isolated", n_tasks=3, **options):
    model = copy.deepcopy(backbone)
    bank = ModuleBank(composition)
    bank.attach(model, kind, **options)
    for t in range(n_tasks):
        bank.add_task(t)
    with torch.no_grad():  # distinct, non-trivial vectors per task
        gen = torch.Generator().manual_seed(5)
        for t in range(n_tasks):
            for p in bank.task_parameters(t):
                p.copy_(torch.randn(p.shape, generator=gen))
    return model, bank


def run(model, bank, ids, mask, tasks):
    with bank.route(tasks):
        ids2, mask2, pos, V = bank.prepare_inputs(ids, mask)
        out = model(input_ids=ids2, attention_mask=mask2, position_ids=pos).last_hidden_state
    return out[:, V:], V


@pytest.mark.parametrize("arch", ["gpt2", "bert"])
def test_prompt_equals_prepended_inputs_embeds(arch, gpt2, bert):
    base = {"gpt2": gpt2, "bert": bert}[arch]
    model, bank = with_bank(base, "prompt", tokens=5)
    ids, mask = inputs()
    tasks = torch.tensor([2, 0, 1, 2])
    ours, V = run(model, bank, ids, mask, tasks)
    assert V == 5
    site = bank.sites()[next(iter(bank.sites()))]
    for b in range(4):
        prompt = site.delta.vectors[int(tasks[b])][None]  # [1, 5, H]
        embeds = torch.cat([prompt, base.get_input_embeddings()(ids[b : b + 1])], dim=1)
        m = torch.cat([torch.ones(1, 5, dtype=torch.long), mask[b : b + 1]], dim=1)
        pos = torch.cat([torch.zeros(1, 5, dtype=torch.long), torch.arange(7)[None]], dim=1)
        with torch.no_grad():
            ref = base(inputs_embeds=embeds, attention_mask=m, position_ids=pos).last_hidden_state[:, 5:]
        real = mask[b].bool()
        torch.testing.assert_close(ours[b][real], ref[0][real], atol=1e-5, rtol=1e-4)


def test_sequential_prompts_equal_the_concatenation_of_earlier_tasks_prompts(gpt2):
    """Progressive Prompts: a task-1 sample reads the prompts of tasks 0 and 1, not task 2's."""
    model, bank = with_bank(gpt2, "prompt", composition="sequential", tokens=3)
    ids, mask = inputs()
    tasks = torch.tensor([1, 0, 2, 1])
    ours, V = run(model, bank, ids, mask, tasks)
    assert V == 9  # three blocks of 3, masked per sample
    vectors = bank.sites()["wte"].delta.vectors
    for b in range(4):
        j = int(tasks[b])
        prompt = torch.cat([vectors[k] for k in range(j + 1)])[None]
        P = prompt.shape[1]
        embeds = torch.cat([prompt, gpt2.wte(ids[b : b + 1])], dim=1)
        m = torch.cat([torch.ones(1, P, dtype=torch.long), mask[b : b + 1]], dim=1)
        pos = torch.cat([torch.zeros(1, P, dtype=torch.long), torch.arange(7)[None]], dim=1)
        with torch.no_grad():
            ref = gpt2(inputs_embeds=embeds, attention_mask=m, position_ids=pos).last_hidden_state[:, P:]
        real = mask[b].bool()
        torch.testing.assert_close(ours[b][real], ref[0][real], atol=1e-5, rtol=1e-4)


def test_prefix_equals_past_key_values(gpt2):
    from transformers import DynamicCache

    P = 4
    model, bank = with_bank(gpt2, "prefix", tokens=P)
    ids, mask = inputs()
    tasks = torch.tensor([0, 2, 1, 0])
    ours, _ = run(model, bank, ids, mask, tasks)
    H, heads = 32, 2
    for b in range(4):
        cache = DynamicCache()
        for layer in range(2):
            vec = bank.sites()[f"h.{layer}.attn.c_attn"].delta.vectors[int(tasks[b])]  # [P, 2H]: keys then values
            k = vec[:, :H].reshape(1, P, heads, H // heads).transpose(1, 2)
            v = vec[:, H:].reshape(1, P, heads, H // heads).transpose(1, 2)
            cache.update(k, v, layer)
        m = torch.cat([torch.ones(1, P, dtype=torch.long), mask[b : b + 1]], dim=1)
        with torch.no_grad():
            ref = gpt2(
                input_ids=ids[b : b + 1], attention_mask=m, past_key_values=cache, position_ids=torch.arange(7)[None]
            ).last_hidden_state
        real = mask[b].bool()
        torch.testing.assert_close(ours[b][real], ref[0][real], atol=1e-5, rtol=1e-4)


def test_prefix_reparameterisation_trains_an_mlp_and_folds_into_vectors(bert):
    model = ContinualClassifier(copy.deepcopy(bert), LABELS).eval()
    strategy = DeltaStrategy(kinds=["prefix"], prefix_tokens=3, prefix_reparam=16)
    strategy.setup(model, TASKS)
    strategy.before_task(model, TASKS[0])
    sites = len(model.bank.sites())
    stored = sites * 3 * 32
    mlp = sites * (32 * 16 + 16 + 16 * 32 + 32)
    assert model.bank.parameter_count(0) == stored + mlp  # while training: vectors + reparameterisation
    with torch.no_grad():
        for p in model.bank.task_parameters(0):
            p.add_(0.3 * torch.randn_like(p))
    ids, mask = inputs()
    x = torch.stack([ids, mask], dim=1)
    before = model(x, 0)
    strategy.after_task(model, TASKS[0])
    assert model.bank.parameter_count(0) == model.bank.expected_parameter_count() == stored
    assert set(k.rsplit(".", 1)[-1] for k in model.bank.task_state(0)) == {"vectors"}
    torch.testing.assert_close(model(x, 0), before, atol=1e-6, rtol=1e-5)


def test_virtual_tokens_are_attached_after_linear_kinds_and_cannot_be_wrapped(bert):
    model = ContinualClassifier(copy.deepcopy(bert), LABELS)
    DeltaStrategy(kinds=["prefix", "lora"], targets=[r"attention\.self\.value"]).setup(model, TASKS)
    value = model.backbone.encoder.layer[0].attention.self.value
    assert value.delta.kind == "prefix" and value.base.delta.kind == "lora"  # prefix outermost
    with pytest.raises(ValueError, match="attach prompt/prefix kinds after"):
        model.bank.attach(model.backbone, "bitfit", [r"attention\.self\.value"])


def test_virtual_tokens_need_prepared_inputs(gpt2):
    model, bank = with_bank(gpt2, "prefix", n_tasks=1)
    ids, mask = inputs()
    with bank.route(torch.zeros(4, dtype=torch.long)), pytest.raises(RuntimeError, match="prepare_inputs"):
        model(input_ids=ids, attention_mask=mask)


def test_prompt_takes_no_targets(bert):
    with pytest.raises(ValueError, match="takes no targets"):
        ModuleBank().attach(copy.deepcopy(bert), "prompt", [r"query"])
