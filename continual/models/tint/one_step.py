"""Explicit one-step internal fine-tuning: dynamic evaluation with TinT's approximations
(Panigrahi et al. 2023, "Trainable Transformer in Transformer", arXiv 2307.01189).

What TinT simulates inside one forward pass, computed here directly on a Hugging Face causal LM:

1. forward the context and take the **sum**-reduced cross-entropy of its next-token predictions (every context
   token, or only the label words of the in-context examples);
2. back-propagate with **stop-gradient attention** (:mod:`.attention`) and, optionally, TinT's **first-order
   layer-norm and activation backward** (:mod:`.first_order`), through the top ``n`` blocks only;
3. take **one SGD step** with an inner learning rate on the value, output-projection and MLP weights and the norm
   biases of those blocks (and the final norm's bias) — :mod:`.layouts` says which tensors these are;
4. answer the query with the updated model, then **restore** the weights exactly (nothing is kept).

:func:`one_step_update` returns the new values of the updated tensors; :func:`applied` swaps them in for the
duration of a ``with`` block. Both are plain functions of their arguments.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Iterator, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from continual.models.tint.attention import detached_attention
from continual.models.tint.first_order import DEFAULT_N, first_order_backward
from continual.models.tint.layouts import UpdateSite, update_sites


@dataclass(frozen=True)
class InnerStep:
    """The options of one internal fine-tuning step.

    Attributes:
        lr: inner learning rate (the SGD step size on the sum-reduced loss); 0 leaves the model unchanged.
        layers: how many top blocks are back-propagated and updated; None for all of them.
        first_order: back-propagate through norms and activations by TinT's finite difference instead of exactly.
        n: the finite difference's ``N``.
        final_norm: also update the final norm's bias (TinT's construction does: it descends through ``ln_f``).
    """

    lr: float
    layers: Optional[int] = None
    first_order: bool = True
    n: float = DEFAULT_N
    final_norm: bool = True

    def __post_init__(self) -> None:
        if self.lr < 0:
            raise ValueError(f"inner learning rate must be >= 0, got {self.lr}")
        if self.layers is not None and self.layers < 1:
            raise ValueError(f"layers must be >= 1 or None (all), got {self.layers}")
        if self.n <= 0:
            raise ValueError(f"first-order N must be > 0, got {self.n}")


@dataclass
class ParameterUpdate:
    """New values for a list of update sites (``values[i]`` is shaped like ``sites[i].part(param)``)."""

    sites: List[UpdateSite]
    values: List[torch.Tensor]

    @property
    def numel(self) -> int:
        return sum(v.numel() for v in self.values)


def next_token_losses(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Per-position cross-entropy of predicting token ``t + 1`` at position ``t``.

    Args:
        logits: ``[B, L, V]``.
        input_ids: ``[B, L]``.

    Returns:
        ``[B, L - 1]`` losses (float32 at least), position ``t`` scoring target ``input_ids[:, t + 1]``.
    """
    B, L, V = logits.shape
    logits = logits[:, :-1].reshape(-1, V).to(torch.promote_types(logits.dtype, torch.float32))
    return F.cross_entropy(logits, input_ids[:, 1:].reshape(-1), reduction="none").view(B, L - 1)


def context_loss(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Sum-reduced next-token cross-entropy over the targets that ``loss_mask`` marks.

    Args:
        model: a causal LM.
        input_ids, attention_mask: ``[B, L]``, right-padded.
        loss_mask: ``[B, L]`` bool/0-1, true at the *target* tokens that count (position 0 never does).

    Returns:
        A scalar: the sum (not the mean) of the counted token losses, as TinT's gradient is a sum over tokens.
    """
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    losses = next_token_losses(logits, input_ids)
    weights = (loss_mask[:, 1:].bool() & attention_mask[:, 1:].bool()).to(losses.dtype)
    return (losses * weights).sum()


def one_step_update(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    loss_mask: torch.Tensor,
    step: InnerStep,
) -> ParameterUpdate:
    """One SGD step on the context, with TinT's approximations, returned as new tensor values (the model is left
    as it was: parameters, ``requires_grad`` flags and train/eval mode).

    Args:
        model: a Hugging Face causal LM of a supported family (see :mod:`.layouts`).
        input_ids, attention_mask: ``[B, L]`` context tokens, right-padded. With ``B > 1`` the rows' losses are
            summed (several contexts, one shared step).
        loss_mask: ``[B, L]``, true at the target tokens whose loss counts.
        step: learning rate, number of top blocks, first-order options.

    Returns:
        The new values ``theta - lr * grad`` of every update site.
    """
    sites = update_sites(model, step.layers, step.final_norm)
    params: List[nn.Parameter] = []
    for site in sites:
        if not any(p is site.param for p in params):
            params.append(site.param)
    flags = [(p, p.requires_grad) for p in model.parameters()]
    was_training = model.training
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        model.eval()  # the construction has no dropout
        first_order = first_order_backward(model, step.layers, step.n) if step.first_order else nullcontext()
        with torch.enable_grad(), detached_attention(model), first_order:
            loss = context_loss(model, input_ids, attention_mask, loss_mask)
            grads = torch.autograd.grad(loss, params, allow_unused=True)
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)
    by_param = {id(p): g for p, g in zip(params, grads)}
    values = []
    with torch.no_grad():
        for site in sites:
            grad = by_param[id(site.param)]
            current = site.part(site.param.detach())
            values.append(current.clone() if grad is None else current - step.lr * site.part(grad).to(current.dtype))
    return ParameterUpdate(sites=sites, values=values)


@contextmanager
def applied(update: ParameterUpdate) -> Iterator[None]:
    """Write ``update``'s values into the model for the ``with`` block, then put the exact previous values back
    (a copy, not a subtraction, so the restored weights are bit-identical), also after an exception."""
    saved: List[torch.Tensor] = []
    try:
        with torch.no_grad():
            for site, value in zip(update.sites, update.values):
                part = site.part(site.param.data)
                saved.append(part.clone())
                part.copy_(value)
        yield
    finally:
        with torch.no_grad():
            for site, old in zip(update.sites, saved):
                site.part(site.param.data).copy_(old)
