"""Routing losses of ModuleFormer against hand computations."""

from __future__ import annotations

import math

import pytest
import torch

from continual.modules.experts import (
    load_concentration_loss,
    mutual_information_loss,
    routing_entropies,
)

pytestmark = pytest.mark.usefixtures("one_cpu_thread")


def test_uniform_router_has_full_marginal_and_conditional_entropy():
    E = 8
    probs = torch.full((5, E), 1.0 / E)
    h_e, h_e_given_x = routing_entropies(probs)
    assert h_e.item() == pytest.approx(math.log(E), abs=1e-6)
    assert h_e_given_x.item() == pytest.approx(math.log(E), abs=1e-6)
    assert mutual_information_loss(probs).item() == pytest.approx(0.0, abs=1e-6)
    assert load_concentration_loss(probs).item() == pytest.approx(math.log(E), abs=1e-6)


def test_one_hot_router_has_zero_conditional_entropy():
    E = 4
    probs = torch.eye(E)  # token i -> expert i: every expert used once
    h_e, h_e_given_x = routing_entropies(probs)
    assert h_e_given_x.item() == 0.0
    assert h_e.item() == pytest.approx(math.log(E), abs=1e-6)
    assert mutual_information_loss(probs).item() == pytest.approx(-math.log(E), abs=1e-6)
    # All tokens on one expert: nothing left to balance, H(e) = 0.
    collapsed = torch.zeros(6, E)
    collapsed[:, 2] = 1.0
    assert load_concentration_loss(collapsed).item() == 0.0
    assert mutual_information_loss(collapsed).item() == 0.0


def test_hand_computation_on_a_small_batch():
    probs = torch.tensor([[0.5, 0.25, 0.25], [0.1, 0.6, 0.3]])
    p_e = [(0.5 + 0.1) / 2, (0.25 + 0.6) / 2, (0.25 + 0.3) / 2]
    h_e = -sum(p * math.log(p) for p in p_e)
    h_x = [-sum(p * math.log(p) for p in row) for row in probs.tolist()]
    expected = sum(h_x) / 2 - h_e
    assert mutual_information_loss(probs).item() == pytest.approx(expected, abs=1e-6)
    assert load_concentration_loss(probs).item() == pytest.approx(h_e, abs=1e-6)


def test_mask_leaves_padding_out():
    probs = torch.tensor([[0.5, 0.25, 0.25], [0.1, 0.6, 0.3], [0.0, 0.0, 1.0]])
    mask = torch.tensor([True, True, False])
    assert mutual_information_loss(probs, mask).item() == pytest.approx(mutual_information_loss(probs[:2]).item())
    expected = load_concentration_loss(probs[:2]).item()
    assert load_concentration_loss(probs, mask.long()).item() == pytest.approx(expected)


def test_zero_probabilities_give_finite_gradients():
    logits = torch.randn(6, 5, requires_grad=True)
    off = torch.tensor([False, True, False, False, True])
    probs = torch.softmax(logits.masked_fill(off, float("-inf")), dim=-1)  # exact zeros in two columns
    loss = mutual_information_loss(probs) + load_concentration_loss(probs)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()


def test_bad_shapes_are_rejected():
    with pytest.raises(ValueError, match=r"\[N, E\]"):
        mutual_information_loss(torch.ones(2, 3, 4))
    with pytest.raises(ValueError, match="mask has 2 tokens"):
        load_concentration_loss(torch.ones(3, 4) / 4, torch.ones(2))
