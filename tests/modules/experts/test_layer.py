"""The expert layer: equal to a dense per-token loop, and built for growth (groups, switched-off experts, pruning,
freezing, usage counters, per-sample expert masks)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from continual.modules.experts import ACTIVATIONS, ExpertLayer, expert_matmul, sort_by_expert

D, HIDDEN = 16, 24

pytestmark = pytest.mark.usefixtures("one_cpu_thread")


def make_layer(n_experts=6, k=2, gate_hidden=8, seed=0, **kw) -> ExpertLayer:
    torch.manual_seed(seed)
    # A large router std makes routing decisive, so that switching experts on visibly changes it.
    return ExpertLayer(D, HIDDEN, n_experts, k, gate_hidden=gate_hidden, init_std={"router": 1.0}, **kw)


def dense_reference(layer: ExpertLayer, x: torch.Tensor, expert_mask=None) -> torch.Tensor:
    """y_n = sum over the top-k experts e of softmax(gate(x_n))_e * W_out_e act(W_in_e x_n), token by token."""
    W_in = torch.cat([g.w_in for g in layer.groups])
    W_out = torch.cat([g.w_out for g in layer.groups])
    rows = torch.cat([g.router for g in layer.groups])
    on = torch.cat([g.enabled for g in layer.groups])
    act = ACTIVATIONS[layer.activation]
    B = x.shape[0]
    flat = x.reshape(B, -1, D)
    y = torch.zeros_like(flat)
    for b in range(B):
        for t in range(flat.shape[1]):
            xn = flat[b, t]
            logits = (layer.gate(xn) if layer.gate is not None else xn) @ rows.T
            allowed = on if expert_mask is None else on & expert_mask[b]
            probs = torch.softmax(logits.masked_fill(~allowed, float("-inf")), -1)
            gates, experts = probs.topk(layer.k)
            for g, e in zip(gates, experts):
                y[b, t] += g * (act(xn @ W_in[e]) @ W_out[e])
    return y.reshape(x.shape)


@pytest.mark.parametrize("gate_hidden", [8, 0])
@pytest.mark.parametrize("activation", ["gelu", "silu"])
def test_equals_dense_per_token_loop(gate_hidden, activation):
    layer = make_layer(gate_hidden=gate_hidden, activation=activation)
    x = torch.randn(3, 7, D)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), dense_reference(layer, x), atol=1e-5, rtol=1e-5)


def test_equals_dense_loop_with_groups_switched_off_experts_and_expert_mask():
    layer = make_layer(n_experts=4, k=2)
    layer.add_experts(3)
    layer.add_experts(2, enabled=False)
    layer.set_enabled(torch.tensor([1]), False)  # one expert of group 0 off too
    x = torch.randn(2, 9, D)
    mask = torch.ones(2, layer.n_experts, dtype=torch.bool)
    mask[0, [0, 2, 4]] = False
    with torch.no_grad():
        torch.testing.assert_close(layer(x, expert_mask=mask), dense_reference(layer, x, mask), atol=1e-5, rtol=1e-5)
    chosen = layer.last_routing.indices.view(2, 9, 2)
    assert not set(chosen[0].flatten().tolist()) & {0, 1, 2, 4, 7, 8}
    assert not set(chosen[1].flatten().tolist()) & {1, 7, 8}


def test_gates_are_not_renormalised():
    layer = make_layer(n_experts=8, k=2)
    layer(torch.randn(4, 5, D))
    r = layer.last_routing
    torch.testing.assert_close(r.gates, r.probs.gather(1, r.indices))
    assert (r.gates.sum(-1) < 1).all()
    torch.testing.assert_close(r.probs.sum(-1), torch.ones(20))


def test_dispatch_sorts_by_expert_and_multiplies_each_slice():
    indices = torch.tensor([[3, 0], [0, 2], [3, 2]])
    order, counts = sort_by_expert(indices, n_experts=5)
    assert counts == [2, 0, 2, 2, 0]
    assert indices.flatten()[order].tolist() == [0, 0, 2, 2, 3, 3]
    torch.manual_seed(0)
    groups = [torch.randn(2, 4, 3), torch.randn(0, 4, 3), torch.randn(3, 4, 3)]
    counts = [2, 0, 1, 0, 3]
    x = torch.randn(6, 4)
    owner = [0, 0, 2, 4, 4, 4]
    W = torch.cat(groups)
    ref = torch.stack([x[i] @ W[e] for i, e in enumerate(owner)])
    torch.testing.assert_close(expert_matmul(x, groups, counts, "loop"), ref)
    with pytest.raises(ValueError, match="grouped"):
        expert_matmul(x, groups, counts, "grouped")  # CPU float32 has no grouped kernel
    with pytest.raises(ValueError, match="counts has 4 entries"):
        expert_matmul(x, groups, counts[:4])


# ---------------------------------------------------------------------------------------------------- growth
def test_expansion_switched_off_is_bit_identical():
    layer = make_layer()
    x = torch.randn(3, 11, D)
    with torch.no_grad():
        before = layer(x)
        probs_before = layer.last_routing.probs.clone()
        g = layer.add_experts(4, enabled=False)
        after = layer(x)
    assert g == 1 and layer.n_experts == 10 and layer.group_sizes == [6, 4]
    assert torch.equal(before, after)
    assert torch.equal(layer.last_routing.probs[:, :6], probs_before)
    assert (layer.last_routing.probs[:, 6:] == 0).all()
    # Switching them on changes the routing (so the check above can fail).
    layer.set_enabled(torch.arange(6, 10))
    with torch.no_grad():
        assert not torch.equal(layer(x), before)
    assert (layer.last_routing.indices >= 6).any()


def test_each_group_has_its_own_parameters():
    layer = make_layer(n_experts=3)
    layer.add_experts(2)
    names = set(layer.group_parameters(1))
    assert names == {"groups.1.w_in", "groups.1.w_out", "groups.1.router"}
    assert layer.group_parameters(1)["groups.1.w_in"].shape == (2, D, HIDDEN)
    assert layer.group_parameters(1)["groups.1.router"].shape == (2, 8)
    # The shared gate layer belongs to group 0.
    assert {"gate.0.weight", "gate.0.bias", "groups.0.w_in"} <= set(layer.group_parameters(0))
    with pytest.raises(ValueError, match="group 2 does not exist"):
        layer.group_parameters(2)


def test_prune_switched_off_expert_is_bit_identical_and_counts_parameters():
    layer = make_layer(n_experts=6)
    layer.add_experts(2)
    layer.set_enabled(torch.tensor([2, 7]), False)
    x = torch.randn(2, 10, D)
    with torch.no_grad():
        before = layer(x)
    keep = torch.ones(8, dtype=torch.bool)
    keep[[2, 7]] = False
    total = sum(p.numel() for p in layer.parameters())
    removed = layer.prune(keep)
    assert removed == 2 * (D * HIDDEN + HIDDEN * D + 8)  # two experts: W_in, W_out and a router row each
    assert removed == 2 * layer.parameters_per_expert()
    assert total - sum(p.numel() for p in layer.parameters()) == removed
    assert layer.group_sizes == [5, 1]
    with torch.no_grad():
        assert torch.equal(layer(x), before)


def test_prune_never_selected_expert_keeps_the_choices_and_rescales_by_its_probability():
    """Gates are not renormalised: removing an expert that is on but never chosen keeps every choice, and each gate
    grows by 1 / (1 - p_removed) (the softmax loses that expert's share); outputs agree to that factor."""
    layer = make_layer(n_experts=8, k=1)
    layer.record_usage = True
    x = torch.randn(2, 6, D)
    with torch.no_grad():
        layer(x)
    r = layer.last_routing
    unused = int((layer.usage().counts == 0).nonzero()[0])
    keep = torch.ones(8, dtype=torch.bool)
    keep[unused] = False
    p_removed = r.probs[:, unused]
    layer.prune(keep)
    with torch.no_grad():
        layer(x)
    remap = torch.cumsum(keep.long(), 0) - 1
    assert torch.equal(layer.last_routing.indices, remap[r.indices])
    torch.testing.assert_close(layer.last_routing.gates, r.gates / (1 - p_removed)[:, None])


def test_prune_errors():
    layer = make_layer(n_experts=3, k=2)
    with pytest.raises(ValueError, match="keep at least k=2"):
        layer.prune(torch.tensor([True, False, False]))
    with pytest.raises(ValueError, match=r"shape \[3\]"):
        layer.prune(torch.tensor([True, False]))
    with pytest.raises(ValueError, match="fewer than k=2"):
        layer.set_enabled(torch.tensor([0, 1]), False)


def test_frozen_group_zero_stays_bit_identical_while_new_group_trains():
    layer = make_layer(n_experts=4)
    layer.add_experts(3)
    layer.freeze_group(0)
    frozen = {n: p.detach().clone() for n, p in layer.group_parameters(0).items()}
    new = {n: p.detach().clone() for n, p in layer.group_parameters(1).items()}
    trainable = [p for p in layer.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} == {id(p) for p in layer.group_parameters(1).values()}
    opt = torch.optim.AdamW(trainable, lr=1e-2, weight_decay=0.1)
    x, target = torch.randn(4, 8, D), torch.randn(4, 8, D)
    for _ in range(5):
        opt.zero_grad()
        F.mse_loss(layer(x), target).backward()
        opt.step()
    for name, param in layer.group_parameters(0).items():
        assert param.grad is None, name
        assert torch.equal(param, frozen[name]), name
    assert any(not torch.equal(p, new[n]) for n, p in layer.group_parameters(1).items())


# ---------------------------------------------------------------------------------------------------- usage, masks
def test_usage_counts_selections_and_gates_of_real_tokens():
    layer = make_layer(n_experts=5, k=2)
    x = torch.randn(2, 6, D)
    token_mask = torch.ones(2, 6, dtype=torch.bool)
    token_mask[1, 4:] = False
    with torch.no_grad():
        layer(x, token_mask=token_mask)  # not recorded: recording is opt-in
    assert layer.usage().tokens == 0
    layer.record_usage = True
    with torch.no_grad():
        layer(x, token_mask=token_mask)
        layer(x, token_mask=token_mask)
    r = layer.last_routing
    real = token_mask.flatten()
    usage = layer.usage()
    assert usage.tokens == 2 * 10
    expected = torch.bincount(r.indices[real].flatten(), minlength=5).double()
    torch.testing.assert_close(usage.counts, 2 * expected)
    gate_sums = torch.zeros(5, dtype=torch.float64)
    gate_sums.index_add_(0, r.indices[real].flatten(), r.gates[real].flatten().double())
    torch.testing.assert_close(usage.gate_sums, 2 * gate_sums)
    torch.testing.assert_close(usage.frequency.sum(), torch.tensor(2.0, dtype=torch.float64))
    layer.add_experts(2)
    assert layer.usage().counts.shape == (7,) and layer.usage().counts[5:].sum() == 0
    layer.reset_usage()
    assert layer.usage().tokens == 0 and layer.usage().counts.sum() == 0


def test_expert_mask_errors():
    layer = make_layer(n_experts=4, k=2)
    with pytest.raises(ValueError, match="fewer than k=2"):
        layer(torch.randn(2, 3, D), expert_mask=torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0]], dtype=torch.bool))
    with pytest.raises(ValueError, match=r"expert_mask must have shape \[B=2, E\]"):
        layer(torch.randn(2, 3, D), expert_mask=torch.ones(3, 4, dtype=torch.bool))


def test_constructor_errors_name_the_value():
    with pytest.raises(ValueError, match=r"k must be in \[1, 3\]"):
        ExpertLayer(D, HIDDEN, 3, 4)
    with pytest.raises(ValueError, match="dispatch must be one of"):
        ExpertLayer(D, HIDDEN, 3, 2, dispatch="fast")
    with pytest.raises(ValueError, match="activation must be one of"):
        ExpertLayer(D, HIDDEN, 3, 2, activation="swish")
    with pytest.raises(ValueError, match=r"init_std: unknown role\(s\) \['w_q'\]"):
        ExpertLayer(D, HIDDEN, 3, 2, init_std={"w_q": 0.1})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_grouped_dispatch_equals_loop_dispatch_on_cuda():
    torch.manual_seed(0)
    layer = ExpertLayer(64, 128, 8, 2, gate_hidden=32).cuda().to(torch.bfloat16)
    layer.add_experts(4)
    layer.add_experts(0)
    x = torch.randn(4, 96, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    results = {}
    for backend in ("grouped", "loop"):
        layer.dispatch = backend
        layer.zero_grad(set_to_none=True)
        x.grad = None
        y = layer(x)
        y.float().square().sum().backward()
        results[backend] = (y.detach(), x.grad.clone(), layer.groups[1].w_in.grad.clone())
    for got, ref in zip(results["grouped"], results["loop"]):
        torch.testing.assert_close(got.float(), ref.float(), atol=2e-2, rtol=2e-2)
