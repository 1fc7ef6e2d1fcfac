"""Routing losses of ModuleFormer (Shen et al. 2023, "ModuleFormer: Modularity Emerges from Mixture-of-Experts",
arXiv 2306.04640), as pure functions of a router's probabilities.

Over the (non-pad) tokens ``x`` of a batch, with ``p(e|x)`` the router's softmax over experts:

- marginal ``p(e) = mean_x p(e|x)`` and its entropy ``H(e) = -sum_e p(e) log p(e)``;
- conditional entropy ``H(e|x) = -mean_x sum_e p(e|x) log p(e|x)``;
- **mutual-information (load balancing) loss** ``H(e|x) - H(e)`` (= ``-I(x; e)``): minimising it makes each token
  confident about its experts while the batch as a whole spreads over all of them;
- **load concentration loss** ``H(e)``: minimising it makes one task's tokens use few experts (fine-tuning on a new
  task, so that the rest can be pruned).

Probabilities that are exactly zero (experts switched off or masked out) contribute ``0 log 0 = 0`` and a finite
gradient.
"""

from __future__ import annotations

from typing import Iterable, Optional, Tuple

import torch


def _plogp(p: torch.Tensor) -> torch.Tensor:
    """``p log p`` with ``0 log 0 = 0`` and a finite gradient at 0 (log of a clamped value)."""
    return p * torch.log(p.clamp_min(torch.finfo(p.dtype).tiny))


def _token_weights(probs: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """``[N]`` weights summing to 1 over the kept tokens."""
    if probs.dim() != 2:
        raise ValueError(f"probs must have shape [N, E], got {tuple(probs.shape)}")
    if mask is None:
        return probs.new_full((probs.shape[0],), 1.0 / max(probs.shape[0], 1))
    mask = mask.reshape(-1)
    if mask.shape[0] != probs.shape[0]:
        raise ValueError(f"mask has {mask.shape[0]} tokens but probs has {probs.shape[0]}")
    weights = mask.to(probs.dtype)
    return weights / weights.sum().clamp_min(1.0)


def routing_entropies(probs: torch.Tensor, mask: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Marginal and conditional entropy of a router's choices over a batch of tokens.

    Args:
        probs: ``[N, E]`` router probabilities ``p(e|x)`` of ``N`` tokens (rows sum to 1).
        mask: ``[N]`` (or any shape with ``N`` elements) true/1 for tokens to count, false/0 for padding;
            None counts every token. With no token kept both entropies are 0.

    Returns:
        ``(H(e), H(e|x))``, two scalars in nats.
    """
    w = _token_weights(probs, mask)  # [N]
    p_e = (w[:, None] * probs).sum(0)  # [E]
    h_e = -_plogp(p_e).sum()
    h_e_given_x = -(w * _plogp(probs).sum(-1)).sum()
    return h_e, h_e_given_x


def mutual_information_loss(probs: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``H(e|x) - H(e)``: the load-balancing loss (the negative mutual information between tokens and experts).

    Args:
        probs: ``[N, E]`` router probabilities.
        mask: ``[N]`` tokens to count (None: all).

    Returns:
        A scalar in ``[-log E, log E]``; ``-log E`` when each token is sure of one expert and the batch uses all
        experts equally, 0 for a uniform router.
    """
    h_e, h_e_given_x = routing_entropies(probs, mask)
    return h_e_given_x - h_e


def load_concentration_loss(probs: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``H(e)``: the marginal routing entropy over the tokens of one task; small when the task uses few experts.

    Args:
        probs: ``[N, E]`` router probabilities.
        mask: ``[N]`` tokens to count (None: all).

    Returns:
        A scalar in ``[0, log E]``.
    """
    h_e, _ = routing_entropies(probs, mask)
    return h_e


def mean_routing_losses(routings: Iterable) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(mutual-information loss, load concentration loss)``, each averaged over several routers' outputs (objects
    with ``probs [N, E]`` and ``token_mask [N]`` or None, e.g. ``RouterOutput``); at least one is needed."""
    routings = list(routings)
    if not routings:
        raise ValueError("mean_routing_losses needs at least one routing")
    mi = torch.stack([mutual_information_loss(r.probs, r.token_mask) for r in routings]).mean()
    concentration = torch.stack([load_concentration_loss(r.probs, r.token_mask) for r in routings]).mean()
    return mi, concentration
