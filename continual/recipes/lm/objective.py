"""The objective a domain (or the pretraining phase) trains on: next-token prediction plus the routing losses of a
routed model (ModuleFormer's mutual-information loss and load concentration loss, Shen et al. 2023, arXiv 2306.04640).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from continual.training import BlockLoss, next_token_loss


def training_objective(out, input_ids: torch.Tensor, mi_coef: float, concentration_coef: float) -> torch.Tensor:
    """Next-token loss plus the routing losses that a routed model's output carries (a ModuleFormer's, an upcycled
    LM's once its experts are on; others have none).

    Args:
        out: the model's output for ``input_ids [B, T]`` (``logits``; ``mi_loss``/``concentration_loss`` if routed).
        mi_coef: weight of the mutual-information loss ``H(e|x) - H(e)``.
        concentration_coef: weight of the load concentration loss ``H(e)``.
    """
    loss = next_token_loss(out.logits, input_ids)
    if getattr(out, "mi_loss", None) is not None and mi_coef:
        loss = loss + mi_coef * out.mi_loss
    if getattr(out, "concentration_loss", None) is not None and concentration_coef:
        loss = loss + concentration_coef * out.concentration_loss
    return loss


def block_objective(mi_coef: float, concentration_coef: float,
                    expert_groups: Optional[torch.Tensor] = None) -> BlockLoss:
    """:func:`training_objective` with these weights as a ``loss(model, input_ids [B, T])`` for the training loop.

    Args:
        expert_groups: ``[G]`` bool, the expert groups every block may route to (a domain's own and the shared ones,
            while the domain trains under a domain router); None: the model routes as it is (every group).
    """

    def loss(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
        if expert_groups is None:
            return training_objective(model(input_ids=input_ids), input_ids, mi_coef, concentration_coef)
        groups = expert_groups.to(input_ids.device)[None].expand(input_ids.shape[0], -1)
        out = model(input_ids=input_ids, expert_groups=groups)
        return training_objective(out, input_ids, mi_coef, concentration_coef)

    return loss
