"""The explicit one-step update: what it may touch, that it restores exactly, and that its gradient is autograd's
gradient with the attention probabilities held constant."""

from __future__ import annotations

import pytest
import torch

from continual.compat import attn_implementation
from continual.models.tint.attention import DETACHED, detached_attention
from continual.models.tint.layouts import layout_for, resolve_layers, update_sites
from continual.models.tint.one_step import InnerStep, applied, context_loss, one_step_update


FINAL_NORM_BIASES = {"transformer.ln_f.bias", "model.norm.bias", "transformer.norm.bias"}


def _batch(vocab: int, B=2, T=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, 12:] = 0
    loss_mask = torch.ones(B, T, dtype=torch.bool)
    return ids, mask, loss_mask


def _allowed_names(model, layers, final_norm=True):
    """Dotted parameter names of the update sites (fused GPT-2 c_attn listed once) and the sites themselves."""
    sites = update_sites(model, layers, final_norm)
    names = {name for name, p in model.named_parameters() for s in sites if p is s.param}
    return names, sites


@pytest.mark.parametrize("layers", [1, None], ids=["top1", "all"])
def test_update_touches_only_allowed_tensors_of_the_top_layers_and_restores_exactly(tiny_lm, layers):
    model = tiny_lm
    ids, mask, loss_mask = _batch(model.config.vocab_size)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    update = one_step_update(model, ids, mask, loss_mask, InnerStep(lr=0.5, layers=layers))
    # computing the update changed nothing
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert flags == {n: p.requires_grad for n, p in model.named_parameters()}

    allowed, sites = _allowed_names(model, layers)
    top = resolve_layers(model, layers)
    with applied(update):
        changed = {k for k, v in model.state_dict().items() if not torch.equal(before[k], v)}
        assert changed and changed <= allowed
        for name in allowed:  # every allowed tensor changes, and only inside the top blocks / final norm
            assert name in changed, name
            assert any(f".{i}." in name for i in top) or name in FINAL_NORM_BIASES
        if model.config.model_type == "gpt2":  # fused q|k|v: queries and keys stay, values move
            d = model.config.hidden_size
            for i in top:
                key = f"transformer.h.{i}.attn.c_attn.weight"
                new = model.state_dict()[key]
                assert torch.equal(new[:, : 2 * d], before[key][:, : 2 * d])
                assert not torch.equal(new[:, 2 * d :], before[key][:, 2 * d :])
            assert not {k for k in changed if ".ln_" in k and k.endswith(".weight")}  # norm gains never move
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # bit-exact restore

    # names the update is not allowed to touch: queries, keys, embeddings, norm weights, lower blocks
    # (ModuleFormer: the experts' queries, the shared keys, the routers and their gate layers)
    forbidden = {"q_proj", "k_proj", "wte", "wpe", "embed_tokens", "lm_head", ".w_q", ".router", "attn.gate.",
                 "ffn.gate.", "transformer.embed"}
    assert not {n for n in allowed for f in forbidden if f in n}
    assert sum(s.numel for s in sites) == update.numel


def test_restore_happens_after_an_exception_too(gpt2):
    ids, mask, loss_mask = _batch(gpt2.config.vocab_size)
    before = {k: v.clone() for k, v in gpt2.state_dict().items()}
    update = one_step_update(gpt2, ids, mask, loss_mask, InnerStep(lr=1.0, layers=2))
    with pytest.raises(RuntimeError, match="boom"):
        with applied(update):
            raise RuntimeError("boom")
    assert all(torch.equal(before[k], v) for k, v in gpt2.state_dict().items())
    assert attn_implementation(gpt2) != DETACHED


def test_zero_learning_rate_is_the_identity(tiny_lm):
    ids, mask, loss_mask = _batch(tiny_lm.config.vocab_size)
    update = one_step_update(tiny_lm, ids, mask, loss_mask, InnerStep(lr=0.0, layers=1))
    for site, value in zip(update.sites, update.values):
        assert torch.equal(site.part(site.param.detach()), value)


class _FixedProbabilities:
    """An attention function replaying recorded probabilities as constant tensors (per layer)."""

    def __init__(self):
        self.recorded = {}
        self.replay = False

    def __call__(self, module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        groups = int(getattr(module, "num_key_value_groups", 1))
        key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
        if self.replay:
            probs = self.recorded[module.layer_idx]  # a constant: autograd cannot see how it was made
        else:
            scaling = query.shape[-1] ** -0.5 if scaling is None else scaling  # transformers 5.0 GPT-2 passes None
            scores = torch.matmul(query, key.transpose(-1, -2)) * scaling + attention_mask
            probs = torch.softmax(scores, dim=-1).detach().clone()
            self.recorded[module.layer_idx] = probs
        return torch.matmul(probs, value).transpose(1, 2).contiguous(), probs


@pytest.fixture(params=["gpt2", "llama"])
def interface_lm(request):
    """The families whose attention goes through transformers' AttentionInterface."""
    return request.getfixturevalue(request.param)


def test_gradient_with_detached_attention_equals_autograd_with_constant_probabilities(interface_lm):
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    model = interface_lm
    ids, mask, loss_mask = _batch(model.config.vocab_size)
    lr = 1.0
    step = InnerStep(lr=lr, layers=None, first_order=False, final_norm=True)
    update = one_step_update(model, ids, mask, loss_mask, step)
    ours = [(site.part(site.param.detach()) - value) / lr for site, value in zip(update.sites, update.values)]

    fixed = _FixedProbabilities()
    AttentionInterface.register("test_fixed_probs", fixed)
    AttentionMaskInterface.register("test_fixed_probs", eager_mask)
    previous = attn_implementation(model)
    model.set_attn_implementation("test_fixed_probs")
    try:
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask)  # record the probabilities
        fixed.replay = True
        params = list(dict.fromkeys(s.param for s in update.sites))
        for p in params:
            p.requires_grad_(True)
        loss = context_loss(model, ids, mask, loss_mask)
        grads = dict(zip(map(id, params), torch.autograd.grad(loss, params)))
        # queries and keys: zero gradient once the probabilities are constants
        all_params = dict(model.named_parameters())
        qk = [p for n, p in all_params.items() if "q_proj" in n or "k_proj" in n]
        for p in qk:
            p.requires_grad_(True)
        if qk:
            qk_grads = torch.autograd.grad(context_loss(model, ids, mask, loss_mask), qk, allow_unused=True)
            assert all(g is None or torch.count_nonzero(g) == 0 for g in qk_grads)
    finally:
        model.set_attn_implementation(previous)
        model.requires_grad_(False)
    for site, g in zip(update.sites, ours):
        torch.testing.assert_close(g, site.part(grads[id(site.param)]), rtol=1e-4, atol=1e-6)
    assert any(torch.count_nonzero(g) for g in ours)


def test_detached_gradient_differs_from_the_full_gradient(gpt2):
    """The approximation is real: ordinary back-propagation through the softmax gives another gradient."""
    ids, mask, loss_mask = _batch(gpt2.config.vocab_size)
    update = one_step_update(gpt2, ids, mask, loss_mask, InnerStep(lr=1.0, layers=None, first_order=False))
    params = list(dict.fromkeys(s.param for s in update.sites))
    for p in params:
        p.requires_grad_(True)
    try:
        grads = dict(zip(map(id, params), torch.autograd.grad(context_loss(gpt2, ids, mask, loss_mask), params)))
    finally:
        gpt2.requires_grad_(False)
    site = update.sites[0]  # the value slice of the bottom block's c_attn: its input also feeds queries and keys
    detached = site.part(site.param.detach()) - update.values[0]
    assert not torch.allclose(detached, site.part(grads[id(site.param)]), rtol=1e-3, atol=1e-6)


def test_moduleformer_gradient_equals_autograd_with_constant_attention_weights_and_gates(moduleformer, monkeypatch):
    """ModuleFormer's stop-gradient covers both of its mixing weights: the stick-breaking attention weights and the
    routers' gates. Reference: record both in a plain forward, replay them as constants, back-propagate."""
    import continual.models.moduleformer.attention as mf_attention
    import continual.modules.experts.pool as mf_experts

    model = moduleformer
    ids, mask, loss_mask = _batch(model.config.vocab_size)
    update = one_step_update(model, ids, mask, loss_mask, InnerStep(lr=1.0, layers=None, first_order=False))
    ours = [site.part(site.param.detach()) - value for site, value in zip(update.sites, update.values)]

    recorded = {"weights": [], "gates": []}
    replay = {"on": False, "weights": 0, "gates": 0}
    real_weights, real_gating = mf_attention.stick_breaking_weights, mf_experts.top_k_gating

    def weights(*args, **kwargs):
        if replay["on"]:
            replay["weights"] += 1
            return recorded["weights"][replay["weights"] - 1]
        out = real_weights(*args, **kwargs)
        recorded["weights"].append(out.detach())
        return out

    def gating(logits, k, allowed=None):
        probs, gates, indices = real_gating(logits, k, allowed)
        if replay["on"]:
            replay["gates"] += 1
            return probs, recorded["gates"][replay["gates"] - 1], indices
        recorded["gates"].append(gates.detach())
        return probs, gates, indices

    monkeypatch.setattr(mf_attention, "stick_breaking_weights", weights)
    monkeypatch.setattr(mf_experts, "top_k_gating", gating)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    assert len(recorded["weights"]) == 2 and len(recorded["gates"]) == 4  # 2 blocks x (attention, FFN router)
    replay["on"] = True
    params = list(dict.fromkeys(s.param for s in update.sites))
    others = [p for n, p in model.named_parameters() if ".w_q" in n or "k_proj" in n or ".router" in n or ".gate." in n]
    try:
        for p in params + others:
            p.requires_grad_(True)
        grads = torch.autograd.grad(context_loss(model, ids, mask, loss_mask), params + others, allow_unused=True)
    finally:
        model.requires_grad_(False)
    assert replay["weights"] == 2 and replay["gates"] == 4
    by_param = dict(zip(map(id, params), grads))
    for site, g in zip(update.sites, ours):
        torch.testing.assert_close(g, site.part(by_param[id(site.param)]), rtol=1e-4, atol=1e-6)
    assert any(torch.count_nonzero(g) for g in ours)
    # queries, keys and routers get nothing once the mixing weights are constants
    assert all(g is None or torch.count_nonzero(g) == 0 for g in grads[len(params):])


def test_moduleformer_detached_gradient_differs_from_the_full_gradient(moduleformer):
    ids, mask, loss_mask = _batch(moduleformer.config.vocab_size)
    update = one_step_update(moduleformer, ids, mask, loss_mask, InnerStep(lr=1.0, layers=None, first_order=False))
    site = update.sites[0]  # the bottom block's shared value projection: its output also feeds the routers above
    assert site.name == "transformer.blocks.0.attn.v_proj.weight"
    site.param.requires_grad_(True)
    try:
        (full,) = torch.autograd.grad(context_loss(moduleformer, ids, mask, loss_mask), [site.param])
    finally:
        moduleformer.requires_grad_(False)
    assert not torch.allclose(site.param.detach() - update.values[0], full, rtol=1e-3, atol=1e-6)


def test_detached_attention_keeps_the_forward_and_restores_the_implementation(tiny_lm):
    ids, mask, _ = _batch(tiny_lm.config.vocab_size)
    previous = attn_implementation(tiny_lm)
    moduleformer = tiny_lm.config.model_type == "moduleformer"  # its own attention: a flag on every expert pool
    flags = lambda: [pool.stop_gradient_mixing for pool in tiny_lm.expert_layers().values()]
    with torch.no_grad():
        reference = tiny_lm(input_ids=ids, attention_mask=mask).logits
        with detached_attention(tiny_lm):
            if moduleformer:
                assert all(flags())
            else:
                assert attn_implementation(tiny_lm) == DETACHED
            ours = tiny_lm(input_ids=ids, attention_mask=mask).logits
    assert attn_implementation(tiny_lm) == previous
    assert not moduleformer or not any(flags())
    real = mask.bool()
    torch.testing.assert_close(ours[real], reference[real], rtol=1e-5, atol=1e-5)


def test_unsupported_architectures_fail_clearly():
    from transformers import BertConfig, BertLMHeadModel

    bert = BertLMHeadModel(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                      intermediate_size=32, is_decoder=True))
    with pytest.raises(ValueError, match="model types gpt2, llama"):
        with detached_attention(bert):
            pass
    with pytest.raises(ValueError, match="supported model types"):
        layout_for(bert)


def test_layers_out_of_range_fail_clearly(gpt2):
    with pytest.raises(ValueError, match="choose 1..2"):
        resolve_layers(gpt2, 3)
    with pytest.raises(ValueError, match="layers must be >= 1"):
        InnerStep(lr=1.0, layers=0)
    with pytest.raises(ValueError, match="learning rate"):
        InnerStep(lr=-1.0)


def test_first_order_mode_is_close_to_exact_backward(tiny_lm):
    ids, mask, loss_mask = _batch(tiny_lm.config.vocab_size)
    exact = one_step_update(tiny_lm, ids, mask, loss_mask, InnerStep(lr=1.0, layers=None, first_order=False))
    approx = one_step_update(tiny_lm, ids, mask, loss_mask, InnerStep(lr=1.0, layers=None, first_order=True))
    for site, a, b in zip(exact.sites, exact.values, approx.values):
        step = (site.part(site.param.detach()) - a).abs().max()
        # float32 finite differences with N = 1000: within a few percent of the step, never identical
        assert (a - b).abs().max() <= 0.05 * step + 1e-6, site.name
    assert any(not torch.equal(a, b) for a, b in zip(exact.values, approx.values))
