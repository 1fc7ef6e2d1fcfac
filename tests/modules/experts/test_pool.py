"""The expert pool's public operations (top-k, switching groups, replacing and adding groups, router bias), the one
feed-forward dispatch, and the grouped-matmul dispatch path run on CPU."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from continual.models.moduleformer.attention import MixtureOfAttentionHeads
from continual.modules.experts import (
    ACTIVATIONS,
    Dispatch,
    ExpertGroup,
    ExpertLayer,
    ExpertPool,
    expert_matmul,
    feed_forward_experts,
)
from continual.modules.experts import pool as pool_module

D, HIDDEN = 16, 24
SHAPES = {"w_in": (D, HIDDEN), "w_out": (HIDDEN, D)}

pytestmark = pytest.mark.usefixtures("one_cpu_thread")


def make_pool(sizes=(3,), k=2, **kw) -> ExpertPool:
    torch.manual_seed(0)
    return ExpertPool(D, SHAPES, list(sizes), k, gate_hidden=0, init_std={"router": 1.0}, **kw)


# ---------------------------------------------------------------------------------------------------- operations
def test_set_top_k_checks_the_switched_on_experts_unless_told_fewer_are_fine():
    pool = make_pool(sizes=(3, 2))
    pool.set_top_k(5)
    assert pool.k == 5
    with pytest.raises(ValueError, match="at most the 5 experts switched on"):
        pool.set_top_k(6)
    with pytest.raises(ValueError, match="k must be >= 1"):
        pool.set_top_k(0, allow_fewer_enabled=True)
    pool.set_top_k(7, allow_fewer_enabled=True)  # more than the pool holds: it may grow first
    pool.set_group_enabled(1, False)  # allowed now: only 3 on
    assert pool.enabled_mask().tolist() == [True, True, True, False, False]
    with pytest.raises(ValueError, match="only 3 experts are switched on, fewer than k=7"):
        pool.route(torch.randn(4, D))


def test_set_group_enabled_switches_exactly_that_group_and_keeps_the_k_check():
    pool = make_pool(sizes=(2, 3, 0))
    pool.set_group_enabled(1, False)
    assert pool.enabled_mask().tolist() == [True, True, False, False, False]
    pool.set_group_enabled(2, False)  # an empty group: nothing to switch
    with pytest.raises(ValueError, match="fewer than k=2"):
        pool.set_group_enabled(0, False)
    pool.set_group_enabled(1)
    assert bool(pool.enabled_mask().all())
    with pytest.raises(ValueError, match="group 3 does not exist"):
        pool.set_group_enabled(3)


def test_allowed_groups_become_each_samples_expert_mask_and_restrict_its_routing():
    pool = make_pool(sizes=(3, 2, 2), k=2)
    groups = torch.tensor([[True, True, False], [True, False, True]])
    mask = pool.group_expert_mask(groups)
    assert mask.tolist() == [[True] * 3 + [True] * 2 + [False] * 2, [True] * 3 + [False] * 2 + [True] * 2]
    x = torch.randn(2, 5, D)
    routing = pool.route(x.reshape(-1, D), mask.repeat_interleave(5, dim=0))
    chosen = routing.indices.reshape(2, -1)
    assert not bool(((chosen >= 5) & (chosen < 7))[0].any()) and not bool(((chosen >= 3) & (chosen < 5))[1].any())
    assert torch.equal(pool.route(x.reshape(-1, D), pool.group_expert_mask(torch.ones(10, 3, dtype=torch.bool))).probs,
                       pool.route(x.reshape(-1, D)).probs), "allowing every group is no restriction"
    with pytest.raises(ValueError, match=r"shape \[B, 3\]"):
        pool.group_expert_mask(torch.ones(2, 2, dtype=torch.bool))


@pytest.mark.parametrize("gate_hidden", [0, 8])
def test_routing_each_sample_to_its_own_group_equals_masking_the_batchs_columns(gate_hidden):
    """route_own scores every token against the first group and its sample's group only; it chooses what route_among
    chooses under that mask (indices, gates, probs over the batch's columns), and never reads the router rows of a
    group outside the batch (poisoned with NaN here) nor picks a switched-off expert."""
    torch.manual_seed(0)
    pool = ExpertPool(D, SHAPES, [1, 2, 2, 2, 2, 2], 2, gate_hidden=gate_hidden, init_std={"router": 1.0},
                      router_bias=True)
    pool.set_enabled(torch.tensor([4]), False)  # group 2's first expert is off
    with torch.no_grad():
        pool.groups[3].router.fill_(float("nan"))  # not in the batch
    among = pool.columns_of([0, 1, 2, 4, 5])
    B, T = 5, 7
    sample_group = torch.tensor([3, 1, 2, 3, 4])  # positions in among.groups
    x = torch.randn(B * T, D)
    token_mask = torch.rand(B * T) > 0.2
    own = pool.route_own(x, among, sample_group, token_mask)
    allowed = (among.column_group[None, :] == 0) | (among.column_group[None, :] == sample_group[:, None])
    allowed = (allowed & among.enabled[None, :]).repeat_interleave(T, dim=0)
    masked = pool.route_among(x, among, allowed, token_mask)
    assert torch.equal(own.indices, masked.indices)
    torch.testing.assert_close(own.gates, masked.gates)
    torch.testing.assert_close(own.probs, masked.probs)
    assert own.groups == masked.groups and torch.equal(own.columns, masked.columns)
    assert torch.equal(own.token_mask, token_mask) and pool.last_routing is masked
    assert 4 not in own.indices.tolist() and bool(torch.isfinite(own.probs).all())
    with pytest.raises(ValueError, match="equal size"):
        pool.add_experts(3)
        pool.route_own(x, pool.columns_of([0, 1, 6]), torch.tensor([1, 2, 1, 2, 1]))


@pytest.mark.parametrize("counts", [(1, 1, 1, 1), (2, 2, 2), (5, 1, 1), (1, 3)])
def test_chunk_plan_puts_each_sample_in_a_chunk_of_its_own_group(counts):
    sample_group = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
    sample_group = sample_group[torch.randperm(len(sample_group), generator=torch.Generator().manual_seed(0))]
    for tokens in (1, 64):
        plan = pool_module.chunk_plan(sample_group, len(counts), tokens)
        assert len(set(plan.position.tolist())) == len(sample_group), "one row per sample"
        chunk_of = plan.position // plan.size
        assert [plan.chunks[c] for c in chunk_of.tolist()] == sample_group.tolist()
        assert len(plan.chunks) * plan.size >= len(sample_group)
    if len(set(counts)) == 1:  # as many samples of every task: one chunk per task, no padding
        assert plan.size == counts[0] and len(plan.chunks) == len(counts)
    assert pool_module.chunk_plan(torch.tensor([0, 0, 0, 0, 1]), 2, 1000).size == 1, "long samples: no padding"


@pytest.mark.parametrize("grad", [False, True])
def test_own_group_experts_is_the_token_dispatch(grad):
    """Every sample through all experts of its group, scaled by its gates (0 where not chosen), equals the token
    dispatch of the same choices; with autograd the gradients reach the groups' weights alike."""
    torch.manual_seed(0)
    pool = ExpertPool(D, SHAPES, [1, 2, 2, 2, 2], 2, gate_hidden=0, init_std={"router": 1.0}, router_bias=True)
    among = pool.columns_of([0, 1, 2, 3, 4])
    B, T = 7, 5
    sample_group = torch.tensor([2, 1, 2, 2, 4, 1, 2])  # positions in among.groups
    x = torch.randn(B, T, D)
    with torch.no_grad():
        routing = pool.route_own(x.reshape(-1, D), among, sample_group)
    local = torch.searchsorted(among.columns, routing.indices)
    first = (1 + (sample_group - 1) * 2).repeat_interleave(T)
    rel = local - first[:, None]
    inside = (rel >= 0) & (rel < 2)
    gates = torch.zeros(B * T, 2).scatter_add(1, rel.clamp(0, 1), routing.gates * inside).view(B, T, 2)
    act = ACTIVATIONS["gelu"]

    def run(fn):
        for p in pool.parameters():
            p.grad = None
        with torch.set_grad_enabled(grad):
            out = fn()
            if grad:
                (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        return out.detach(), [None if p.grad is None else p.grad.clone() for p in pool.parameters()]

    batched, batched_grads = run(lambda: pool_module.own_group_experts(
        pool, x, among.groups[1:], sample_group - 1, gates, act).reshape(B * T, D))
    dispatched, dispatched_grads = run(lambda: feed_forward_experts(pool, x.reshape(-1, D), routing, act, 1))
    torch.testing.assert_close(batched, dispatched, atol=1e-5, rtol=1e-5)
    for a, b in zip(batched_grads, dispatched_grads):
        if a is None or b is None:
            continue
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    if grad:
        names = [name for name, _ in pool.named_parameters()]
        assert batched_grads[names.index("groups.3.w_in")] is None, "group 3 serves no sample"
        assert batched_grads[names.index("groups.2.w_in")].abs().sum() > 0


def test_replace_group_keeps_the_layout_and_accepts_router_rows_only():
    pool = make_pool(sizes=(2, 3))
    rows_only = ExpertGroup(2, {}, pool.router_dim, {"router": 0.0})
    pool.replace_group(0, rows_only)
    assert pool.groups[0] is rows_only and pool.group_sizes == [2, 3]
    assert set(pool.group_parameters(0)) == {"groups.0.router"}
    with pytest.raises(ValueError, match="group 1 holds 3 experts; its replacement has 2"):
        pool.replace_group(1, ExpertGroup(2, SHAPES, pool.router_dim, pool.init_std))
    with pytest.raises(ValueError, match=f"router rows must be {D} wide"):
        pool.replace_group(1, ExpertGroup(3, SHAPES, D + 1, pool.init_std))
    with pytest.raises(ValueError, match="holds the roles"):
        pool.replace_group(1, ExpertGroup(3, {"w_in": (D, HIDDEN)}, pool.router_dim, pool.init_std))


@pytest.mark.parametrize("gate_hidden", [0, 8])
def test_router_bias_makes_the_last_entry_of_every_row_a_bias(gate_hidden):
    torch.manual_seed(0)
    pool = ExpertPool(D, SHAPES, 2, 1, gate_hidden=gate_hidden, router_bias=True)
    assert pool.router_dim == (gate_hidden or D + 1)
    with pytest.raises(ValueError, match="router_bias needs a pool built with router_bias=True"):
        make_pool().add_experts(1, router_bias=-3.0)
    group = pool.add_experts(2, router_bias=-3.0)
    rows = pool.groups[group].router
    with torch.no_grad():
        rows[:, :-1].zero_()  # only the bias is left: every token gets logit -3 for the new experts
        pool.groups[0].router.zero_()
    pool.set_top_k(4)
    routing = pool.route(torch.randn(5, D))
    expected = torch.softmax(torch.tensor([0.0, 0.0, -3.0, -3.0]), dim=0)
    torch.testing.assert_close(routing.probs, expected.expand(5, 4))


# ---------------------------------------------------------------------------------------------------- dispatch
def test_dispatch_leaves_out_the_skipped_experts_and_combines_gated_rows():
    indices = torch.tensor([[3, 0], [1, 2], [0, 3]])
    plan = Dispatch.of(indices, n_experts=4, skip=2)
    assert plan.counts == [1, 2]
    assert indices.flatten()[plan.order].tolist() == [2, 3, 3] and plan.token_of.tolist() == [1, 0, 2]
    gates = torch.tensor([[0.5, 0.1], [0.2, 0.3], [0.4, 0.6]])
    combined = plan.combine(torch.ones(3, 2), gates, 3)
    torch.testing.assert_close(combined, torch.tensor([[0.5, 0.5], [0.3, 0.3], [0.6, 0.6]]))


def test_feed_forward_experts_from_a_later_group_is_the_full_sum_less_the_earlier_groups():
    torch.manual_seed(0)
    layer = ExpertLayer(D, HIDDEN, 3, 3, gate_hidden=0, init_std={"router": 1.0})
    layer.add_experts(2)
    x = torch.randn(12, D)
    act = ACTIVATIONS[layer.activation]
    with torch.no_grad():
        routing = layer.route(x)
        full = feed_forward_experts(layer, x, routing, act)
        later = feed_forward_experts(layer, x, routing, act, first_group=1)
    W_in, W_out = layer.groups[0].w_in, layer.groups[0].w_out
    earlier = torch.zeros_like(x)
    for n in range(12):
        for gate, e in zip(routing.gates[n], routing.indices[n]):
            if e < 3:
                earlier[n] += gate * (act(x[n] @ W_in[e]) @ W_out[e])
    torch.testing.assert_close(later, full - earlier, atol=1e-5, rtol=1e-5)
    assert torch.equal(feed_forward_experts(layer, x, routing, act, first_group=2), torch.zeros_like(x)), "no group"


# ---------------------------------------------------------------------------------------------------- grouped on CPU
@pytest.fixture
def grouped_on_cpu(monkeypatch):
    """Let the grouped backend run on CPU (torch's grouped matmul has a CPU implementation in recent releases)."""
    if not hasattr(F, "grouped_mm"):
        pytest.skip("this torch has no torch.nn.functional.grouped_mm")
    try:
        F.grouped_mm(torch.ones(2, 8, dtype=torch.bfloat16), torch.ones(1, 8, 8, dtype=torch.bfloat16),
                     offs=torch.tensor([2], dtype=torch.int32))
    except (RuntimeError, NotImplementedError) as err:
        pytest.skip(f"grouped_mm does not run on CPU in this torch: {err}")
    monkeypatch.setattr(pool_module, "GROUPED_DEVICE_TYPES", ("cuda", "cpu"))


def outputs_and_gradients(run, inputs):
    """``run()``'s output and the gradients of ``sum(output^2)`` with respect to ``inputs``, as float32."""
    y = run()
    grads = torch.autograd.grad(y.float().square().sum(), inputs)
    return [t.detach().float() for t in (y, *grads)]


def test_grouped_matmul_equals_the_loop_on_cpu_with_empty_experts_and_groups(grouped_on_cpu):
    torch.manual_seed(0)
    weights = [torch.randn(n, 16, 24, dtype=torch.bfloat16, requires_grad=True) for n in (3, 0, 2)]
    counts = [4, 0, 3, 0, 5]
    x = torch.randn(12, 16, dtype=torch.bfloat16, requires_grad=True)
    grouped, loop = (
        outputs_and_gradients(lambda: expert_matmul(x, weights, counts, backend), [x, weights[0], weights[2]])
        for backend in ("grouped", "loop")
    )
    for got, ref in zip(grouped, loop):
        torch.testing.assert_close(got, ref, atol=2e-2, rtol=2e-2)
    with pytest.raises(ValueError, match="widths divisible by 8"):
        expert_matmul(x[:, :12], [w[:, :12] for w in weights], counts, "grouped")


@pytest.mark.parametrize("kind", ["ffn", "attention"])
def test_grouped_dispatch_equals_loop_dispatch_on_cpu(grouped_on_cpu, kind):
    """The CPU counterpart of the CUDA test (tests/modules/experts/test_layer.py), for both expert layers."""
    torch.manual_seed(0)
    if kind == "ffn":
        layer = ExpertLayer(64, 128, 8, 2, gate_hidden=32)
    else:
        layer = MixtureOfAttentionHeads(64, 2, 16, 8, 2, gate_hidden=32)
    layer.add_experts(4)
    layer.add_experts(0)
    layer = layer.to(torch.bfloat16)
    x = torch.randn(2, 24, 64, dtype=torch.bfloat16, requires_grad=True)
    new_group = layer.groups[1]
    inputs = [x] + [new_group.weight(role) for role in new_group.roles]
    results = {}
    for backend in ("grouped", "loop"):
        layer.dispatch = backend
        results[backend] = outputs_and_gradients(lambda: layer(x), inputs)
    for got, ref in zip(results["grouped"], results["loop"]):
        torch.testing.assert_close(got, ref, atol=2e-2, rtol=2e-2)


def test_gather_buffers_are_kept_per_thread_and_released_on_request():
    """The batched path's reused buffer: the same one for a thread's later batches, another for another thread (two
    threads serving mixed batches never write into one), and freed by release_gather_buffers."""
    import threading

    from continual.modules.experts import release_gather_buffers

    release_gather_buffers()
    like = torch.zeros(1)
    first = pool_module._gather_buffer(64, like)
    assert pool_module._gather_buffer(32, like).data_ptr() == first.data_ptr(), "reused, not reallocated"
    other = {}
    thread = threading.Thread(target=lambda: other.update(ptr=pool_module._gather_buffer(64, like).data_ptr()))
    thread.start()
    thread.join()
    assert other["ptr"] != first.data_ptr()
    release_gather_buffers()
    assert not pool_module._GATHER_BUFFERS
