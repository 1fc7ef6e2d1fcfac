"""The native ModuleFormer causal LM: config checks, losses, save/load through the Auto classes, generate, growth and
pruning on the whole model, and a short training run."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM

from continual.models.moduleformer import (
    ModuleFormerConfig,
    ModuleFormerForCausalLM,
    load_concentration_loss,
    mutual_information_loss,
)

VOCAB = 64


def tiny(**overrides) -> ModuleFormerForCausalLM:
    torch.manual_seed(0)
    return ModuleFormerForCausalLM(ModuleFormerConfig.from_size("tiny", vocab_size=VOCAB, **overrides)).eval()


def batch(B=3, T=10, seed=1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (B, T), generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------------------------------------------- config
@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"k_ffn": 5}, "k_ffn=5 exceeds n_ffn_experts=4"),
        ({"d_model": 0}, "d_model must be an integer >= 1"),
        ({"gate_hidden": -1}, "gate_hidden must be an integer >= 0"),
        ({"activation": "swish"}, "activation must be one of"),
        ({"expert_dispatch": "fast"}, "expert_dispatch must be one of"),
        ({"dropout": 1.0}, r"dropout must be in \[0, 1\)"),
        ({"ffn_expert_groups": [[4]]}, "ffn_expert_groups must list the group sizes"),
    ],
)
def test_config_rejects_bad_values_by_name(overrides, message):
    with pytest.raises(ValueError, match=message):
        ModuleFormerConfig.from_size("tiny", **overrides)
    with pytest.raises(ValueError, match="unknown ModuleFormer size 'huge'"):
        ModuleFormerConfig.from_size("huge")


def test_small_size_has_a_few_million_parameters():
    with torch.device("meta"):
        model = ModuleFormerForCausalLM(ModuleFormerConfig(vocab_size=8192))
    n = model.num_parameters()
    assert 1_000_000 < n < 10_000_000, n


# -------------------------------------------------------------------------------------------------------------- forward
def test_labels_give_shifted_cross_entropy_plus_routing_losses():
    model = tiny(mi_loss_coef=0.1, concentration_loss_coef=0.05)
    ids = batch()
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding in sample 0
    labels = ids.masked_fill(mask == 0, -100)
    out = model(ids, attention_mask=mask, labels=labels)
    lm = F.cross_entropy(out.logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.lm_loss, lm)
    layers = model.expert_layers()
    assert len(layers) == 4  # attention and FFN experts of 2 layers
    routings = [layer.last_routing for layer in layers.values()]
    mi = torch.stack([mutual_information_loss(r.probs, mask.flatten()) for r in routings]).mean()
    conc = torch.stack([load_concentration_loss(r.probs, mask.flatten()) for r in routings]).mean()
    torch.testing.assert_close(out.mi_loss, mi)
    torch.testing.assert_close(out.concentration_loss, conc)
    torch.testing.assert_close(out.aux_loss, 0.1 * mi + 0.05 * conc)
    torch.testing.assert_close(out.loss, lm + 0.1 * mi + 0.05 * conc)
    assert model(ids).loss is None and model(ids).aux_loss is not None
    as_tuple = model(ids, attention_mask=mask, labels=labels, return_dict=False)
    torch.testing.assert_close(as_tuple[0], out.loss)


def test_padding_does_not_change_real_tokens():
    model = tiny()
    ids = batch(B=1, T=8)
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], 1)
    mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 8, dtype=torch.long)], 1)
    with torch.no_grad():
        ref = model(ids).logits
        left = model(padded, attention_mask=mask).logits[:, 3:]
        right = model(torch.cat([ids, padded[:, :3]], 1), attention_mask=mask.flip(1)).logits[:, :8]
    torch.testing.assert_close(left, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(right, ref, atol=1e-5, rtol=1e-5)


def test_model_is_causal():
    model = tiny()
    ids = batch(B=2, T=12)
    changed = ids.clone()
    changed[:, 7:] = (changed[:, 7:] + 1) % VOCAB
    with torch.no_grad():
        # Not bitwise: other tokens change how many rows each expert's matmul gets, hence its rounding.
        torch.testing.assert_close(model(ids).logits[:, :7], model(changed).logits[:, :7], rtol=1e-5, atol=1e-6)
        assert not torch.allclose(model(ids).logits[:, 7:], model(changed).logits[:, 7:])


# ------------------------------------------------------------------------------------------------- save, load, generate
def test_save_load_round_trip_through_auto_classes(tmp_path):
    model = tiny()
    ids = batch()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    assert not list(tmp_path.glob("*.bin")) and not list(tmp_path.glob("*.py"))
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "moduleformer"
    assert isinstance(AutoConfig.from_pretrained(tmp_path), ModuleFormerConfig)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is ModuleFormerForCausalLM
    assert loaded.lm_head.weight is loaded.transformer.embed.weight  # tied
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)


def test_round_trip_after_growth_switch_off_and_pruning(tmp_path):
    model = tiny()
    model.add_experts(2, n_att=1)
    model.add_experts(3, enabled=False)  # no attention experts: an empty attention group keeps numbers aligned
    ffn0 = "transformer.blocks.0.ffn"
    keep = torch.ones(9, dtype=torch.bool)
    keep[[1, 5]] = False
    model.prune_experts({ffn0: keep})
    assert model.config.ffn_expert_groups == [[3, 1, 3], [4, 2, 3]]
    assert model.config.att_expert_groups == [[4, 1, 0], [4, 1, 0]]
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.expert_layers()[ffn0].group_sizes == [3, 1, 3]
    assert loaded.expert_layers()[ffn0].enabled_mask().tolist() == [True] * 4 + [False] * 3
    ids = batch()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)


def test_generate_greedy_matches_a_manual_loop():
    model = tiny()
    prompt = batch(B=2, T=5)
    out = model.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert out.shape == (2, 11) and torch.equal(out[:, :5], prompt)
    ids = prompt
    with torch.no_grad():
        for _ in range(6):
            ids = torch.cat([ids, model(ids).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, ids)


def test_generate_with_left_padding_matches_unpadded():
    model = tiny()
    prompt = batch(B=1, T=5)
    padded = torch.cat([torch.zeros(1, 2, dtype=torch.long), prompt], 1)
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1]])
    out = model.generate(padded, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
    ref = model.generate(prompt, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(out[:, 2:], ref)


# -------------------------------------------------------------------------------------------------- growth on the model
def test_model_expansion_switched_off_is_bit_identical():
    model = tiny()
    ids = batch()
    with torch.no_grad():
        before = model(ids).logits
    group = model.add_experts(3, n_att=2, enabled=False)
    assert group == 1
    assert all(l.n_groups == 2 for l in model.expert_layers().values())
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)
    for layer in model.expert_layers().values():
        layer.set_enabled(torch.arange(layer.n_experts))
        with torch.no_grad():
            layer.groups[1].router.mul_(50.0)  # make the new experts win somewhere
    with torch.no_grad():
        assert not torch.equal(model(ids).logits, before)


def test_model_prune_of_switched_off_experts_is_identical_and_counts_parameters():
    model = tiny()
    model.add_experts(2, n_att=1, enabled=False)
    ids = batch()
    with torch.no_grad():
        before = model(ids).logits
    layers = model.expert_layers()
    keep = {
        name: torch.cat([torch.ones(layer.group_sizes[0], dtype=torch.bool),
                         torch.zeros(layer.group_sizes[1], dtype=torch.bool)])
        for name, layer in layers.items()
    }
    n_before = model.num_parameters()
    removed = model.prune_experts(keep)
    cfg = model.config
    ffn_expert = 2 * cfg.d_model * cfg.ffn_hidden + cfg.gate_hidden
    att_expert = 2 * cfg.d_model * cfg.n_head * cfg.head_dim + cfg.gate_hidden
    assert removed == cfg.n_layer * (2 * ffn_expert + 1 * att_expert)
    assert n_before - model.num_parameters() == removed
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)
    with pytest.raises(ValueError, match="no expert layer named"):
        model.prune_experts({"transformer.blocks.9.ffn": keep["transformer.blocks.0.ffn"]})


def test_freeze_group_zero_then_train_new_experts():
    model = tiny()
    for p in model.parameters():
        p.requires_grad_(False)
    model.add_experts(2, n_att=1)  # new groups are trainable
    frozen = {n: p.detach().clone() for n, p in model.expert_group_parameters(0).items()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} == {id(p) for p in model.expert_group_parameters(1).values()}
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    ids = batch()
    model.train()
    for _ in range(3):
        opt.zero_grad()
        model(ids, labels=ids).loss.backward()
        opt.step()
    for name, param in model.expert_group_parameters(0).items():
        assert param.grad is None and torch.equal(param, frozen[name]), name


def test_usage_recording_on_the_model():
    model = tiny()
    model.record_expert_usage()
    ids = batch(B=2, T=6)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    with torch.no_grad():
        model(ids, attention_mask=mask)
    usage = model.expert_usage()
    assert set(usage) == set(model.expert_layers())
    assert all(u.tokens == 10 and u.counts.sum().item() == 20 for u in usage.values())
    model.reset_expert_usage()
    assert all(u.tokens == 0 for u in model.expert_usage().values())


def test_loss_drops_when_training_on_a_fixed_batch():
    model = tiny()
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = batch(B=4, T=16)
    losses = []
    for _ in range(30):
        opt.zero_grad()
        out = model(ids, labels=ids)
        out.loss.backward()
        opt.step()
        losses.append(out.lm_loss.item())
    assert losses[-1] < 0.6 * losses[0], losses
