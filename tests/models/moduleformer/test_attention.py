"""Stick-breaking attention against an explicit O(T^2) loop, and the mixture of attention heads against a dense
per-token loop over the chosen experts."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from continual.models.moduleformer.attention import (
    MixtureOfAttentionHeads,
    stick_breaking_attention,
    stick_breaking_weights,
)


def loop_weights(q, k, key_mask=None, attend_current=False):
    """A_ij = beta_ij * prod_{j<m<i} (1 - beta_im) over the allowed keys, straight from the formula.

    q, k: [T, d] (one head); key_mask: [T] bool. With attend_current the product also runs over m = i.
    """
    T, d = q.shape
    A = torch.zeros(T, T, dtype=torch.float64)
    q, k = q.double(), k.double()
    for i in range(T):
        last = i if attend_current else i - 1  # the nearest key the query may see
        for j in range(last + 1):
            if key_mask is not None and not key_mask[j]:
                continue
            beta = torch.sigmoid(q[i] @ k[j] / math.sqrt(d))
            stick = 1.0
            for m in range(j + 1, last + 1):
                if key_mask is None or key_mask[m]:
                    stick *= 1 - torch.sigmoid(q[i] @ k[m] / math.sqrt(d))
            A[i, j] = beta * stick
    return A


@pytest.mark.parametrize("attend_current", [False, True])
def test_weights_equal_the_formula_loop(attend_current):
    torch.manual_seed(0)
    B, H, T, d = 2, 3, 7, 4
    q, k = 2 * torch.randn(B, H, T, d), 2 * torch.randn(B, H, T, d)
    key_mask = torch.ones(B, T, dtype=torch.bool)
    key_mask[1, :2] = False  # left padding in the second sample
    key_mask[1, 4] = False  # and a hole
    A = stick_breaking_weights(q, k, key_mask, attend_current)
    for b in range(B):
        for h in range(H):
            ref = loop_weights(q[b, h], k[b, h], key_mask[b], attend_current)
            torch.testing.assert_close(A[b, h].double(), ref, atol=1e-6, rtol=1e-5)


def test_rows_sum_to_at_most_one_and_are_causal():
    torch.manual_seed(1)
    q, k = 5 * torch.randn(2, 4, 33, 8), 5 * torch.randn(2, 4, 33, 8)
    A = stick_breaking_weights(q, k)
    assert (A >= 0).all()
    assert (A.sum(-1) <= 1 + 1e-6).all()
    assert (A.triu() == 0).all()  # strictly causal: nothing on or above the diagonal
    assert (A[..., 0, :] == 0).all()  # the first token has nobody to attend to
    # With strongly positive logits the nearest earlier token takes almost the whole stick.
    ones = torch.ones(1, 1, 5, 4) * 10
    A = stick_breaking_weights(ones, ones)
    assert A[0, 0, 4, 3].item() == pytest.approx(1.0, abs=1e-6)
    assert A[0, 0, 4, :3].sum().item() < 1e-6


def test_future_tokens_do_not_change_earlier_outputs():
    torch.manual_seed(2)
    q, k, v = torch.randn(3, 10, 2, 16, 8).unbind(0)
    out, _ = stick_breaking_attention(q, k, v)
    q2, k2, v2 = q.clone(), k.clone(), v.clone()
    for t in (q2, k2, v2):
        t[..., 6:, :] = torch.randn_like(t[..., 6:, :])
    out2, _ = stick_breaking_attention(q2, k2, v2)
    torch.testing.assert_close(out[..., :6, :], out2[..., :6, :], rtol=0, atol=0)
    assert not torch.allclose(out[..., 6:, :], out2[..., 6:, :])


def test_queries_of_a_suffix_match_the_full_sequence():
    """The last Tq queries against all Tk keys (what a cache would compute) equal those rows of the full matrix."""
    torch.manual_seed(3)
    q, k = torch.randn(1, 2, 9, 4), torch.randn(1, 2, 9, 4)
    full = stick_breaking_weights(q, k)
    torch.testing.assert_close(stick_breaking_weights(q[..., 6:, :], k), full[..., 6:, :])


def test_key_mask_shape_is_checked():
    q = torch.randn(2, 1, 5, 4)
    with pytest.raises(ValueError, match="key_mask must have shape"):
        stick_breaking_weights(q, q, torch.ones(2, 4, dtype=torch.bool))


# ---------------------------------------------------------------------------------------------------- MoA
def dense_moa(layer: MixtureOfAttentionHeads, x: torch.Tensor, key_mask=None) -> torch.Tensor:
    """Per token: softmax router, top-k experts, each expert's query -> loop stick-breaking -> its output, gated."""
    B, T, d = x.shape
    H, hd = layer.n_head, layer.head_dim
    Wq = torch.cat([g.w_q for g in layer.groups])  # [E, d, H*hd]
    Wo = torch.cat([g.w_o for g in layer.groups])
    rows = torch.cat([g.router for g in layer.groups])
    y = torch.zeros(B, T, d, dtype=torch.float64)
    for b in range(B):
        keys = (x[b] @ layer.k_proj.weight.T).view(T, H, hd)
        values = (x[b] @ layer.v_proj.weight.T).view(T, H, hd)
        for i in range(T):
            h = layer.gate(x[b, i]) if layer.gate is not None else x[b, i]
            probs = torch.softmax(h @ rows.T, -1)
            gates, experts = probs.topk(layer.k)
            for g, e in zip(gates, experts):
                q = (x[b, i] @ Wq[e]).view(H, hd)
                o = torch.zeros(H, hd, dtype=torch.float64)
                for h in range(H):
                    # row i of the loop weights, with this expert's query in every query slot
                    A = loop_weights(q[h].expand(T, hd), keys[:, h], None if key_mask is None else key_mask[b],
                                     layer.attend_current)
                    o[h] = A[i] @ values[:, h].double()
                y[b, i] += g.double() * (o.reshape(-1).float() @ Wo[e]).double()
    return y


@pytest.mark.parametrize("gate_hidden", [16, 0])
def test_moa_equals_a_dense_per_token_loop(gate_hidden):
    torch.manual_seed(4)
    layer = MixtureOfAttentionHeads(d_model=12, n_head=2, head_dim=4, n_experts=5, k=2, gate_hidden=gate_hidden,
                                    init_std={"router": 1.0})
    x = torch.randn(2, 6, 12)
    key_mask = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1]], dtype=torch.bool)
    with torch.no_grad():
        y = layer(x, key_mask)
        ref = dense_moa(layer, x, key_mask)
    torch.testing.assert_close(y.double(), ref, atol=1e-5, rtol=1e-4)


def test_moa_is_causal_and_routes_padding_out_of_usage():
    torch.manual_seed(5)
    layer = MixtureOfAttentionHeads(d_model=16, n_head=2, head_dim=8, n_experts=4, k=2, attend_current=True)
    x = torch.randn(1, 8, 16)
    x2 = x.clone()
    x2[:, 5:] = torch.randn(1, 3, 16)
    with torch.no_grad():
        torch.testing.assert_close(layer(x)[:, :5], layer(x2)[:, :5], rtol=0, atol=0)
    layer.record_usage = True
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1]])
    with torch.no_grad():
        layer(x, mask)
    usage = layer.usage()
    assert usage.tokens == 6 and usage.counts.sum().item() == 6 * 2


def test_moa_expert_mask_restricts_routing():
    torch.manual_seed(6)
    layer = MixtureOfAttentionHeads(d_model=16, n_head=2, head_dim=8, n_experts=6, k=2)
    mask = torch.zeros(2, 6, dtype=torch.bool)
    mask[0, [0, 1]] = True
    mask[1, [3, 4, 5]] = True
    layer(torch.randn(2, 5, 16), expert_mask=mask)
    chosen = layer.last_routing.indices.view(2, 5, 2)
    assert set(chosen[0].flatten().tolist()) == {0, 1}
    assert set(chosen[1].flatten().tolist()) <= {3, 4, 5}
    assert F.relu(-layer.last_routing.probs).sum() == 0
