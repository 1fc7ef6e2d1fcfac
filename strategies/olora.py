"""O-LoRA: orthogonal low-rank adaptation (Wang et al. 2023, "Orthogonal Subspace Learning for Language Model
Continual Learning", EMNLP Findings, arXiv 2310.14152).

Every task gets a new LoRA at every target (the attention query and value projections by default, as in the paper);
earlier tasks' LoRAs are frozen and keep acting, and at test time all of them act together with no task id and no
router (the module bank's ``simultaneous`` composition). While task ``t`` trains, its LoRA's input subspace is pushed
away from every earlier task's:

    L = L_task + lambda_orth * sum_sites sum_{i<t} sum_{j,k} O_{i,t}[j, k]^2  +  lambda_l2 * sum_sites ||theta_t||^2

with ``O_{i,t} = A_i A_t^T`` (``[r, r]``; our ``A`` is ``[r, in]``, the transpose of the paper's ``A``, so this is the
paper's ``A_i^T A_t``) and ``theta_t`` the new task's ``A`` and ``B``. The squared entries are the paper's
``L_orth``; its released code sums absolute values instead (``orth_norm: abs``) and adds the unsquared norm of each
new tensor for the second term, whose weight the paper's runs mostly set to 0.

This is the ``delta`` strategy with one kind (LoRA) and simultaneous composition (allocation, freezing, task state and
parameter accounting are its), plus the penalty through the ``auxiliary_loss`` hook.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Sequence

import torch
from torch import nn

from continual.config import StrategyConfig
from continual.expansion import TaskInfo
from strategies.delta import PenalizedLoRA

ORTH_NORMS = ("squared", "abs")


@dataclass
class OLoRAConfig(StrategyConfig):
    name: str = "olora"
    # Weight of the orthogonality loss between the new task's A and every earlier task's A (the paper's lambda_1).
    lambda_orth: float = 0.5
    # Weight of the squared L2 norm of the new task's LoRA parameters (lambda_2; the paper's runs mostly use 0).
    lambda_l2: float = 0.0
    # How O = A_i A_t^T is reduced: "squared" (sum of squared entries, the paper) or "abs" (the released code).
    orth_norm: str = "squared"
    # LoRA rank r and scale numerator alpha (the update is scaled by alpha / r).
    rank: int = 8
    alpha: float = 16.0
    # Regexes naming the linears that get a LoRA; empty: the family's query and value projections.
    targets: List[str] = field(default_factory=list)


def orthogonality_loss(earlier: torch.Tensor, new: torch.Tensor, norm: str = "squared") -> torch.Tensor:
    """O-LoRA's ``sum_i sum_{j,k} |O_{i,t}[j, k]|^p`` at one site.

    Args:
        earlier: ``[K, r, in]`` the earlier tasks' ``A`` (frozen).
        new: ``[r, in]`` the new task's ``A``.
        norm: "squared" (``p = 2``) or "abs" (``p = 1``).

    Returns:
        A scalar.
    """
    overlap = earlier @ new.T  # [K, r, r]: O_{i,t} = A_i A_t^T
    return overlap.pow(2).sum() if norm == "squared" else overlap.abs().sum()


class OLoRA(PenalizedLoRA):
    """Per task a new LoRA (earlier ones frozen, all acting together), kept orthogonal to the earlier ones."""

    name = "olora"
    Config = OLoRAConfig

    def __init__(
        self,
        lambda_orth: float = 0.5,
        lambda_l2: float = 0.0,
        orth_norm: str = "squared",
        rank: int = 8,
        alpha: float = 16.0,
        targets: Sequence[str] = (),
    ):
        for key, value in (("lambda_orth", lambda_orth), ("lambda_l2", lambda_l2)):
            if value < 0:
                raise ValueError(f"strategy.{key} must be >= 0, got {value}")
        if orth_norm not in ORTH_NORMS:
            raise ValueError(f"strategy.orth_norm must be one of {list(ORTH_NORMS)}, got {orth_norm!r}")
        super().__init__(rank, alpha, targets)
        self.lambda_orth, self.lambda_l2, self.orth_norm = float(lambda_orth), float(lambda_l2), orth_norm

    def auxiliary_loss(self, model: nn.Module, task: TaskInfo) -> Optional[torch.Tensor]:
        """``lambda_orth * L_orth + lambda_l2 * ||theta_t||^2`` summed over the LoRA sites (None when it is 0 by
        construction: the first task with ``lambda_l2 = 0``)."""
        t = task.index
        orth = self.lambda_orth > 0 and t > 0
        if not orth and self.lambda_l2 == 0:
            return None
        loss = None
        for delta in self.lora_sites(model):
            new = delta.slot_parameters(t)
            term = 0.0
            if orth:
                earlier = torch.stack([delta.slot_parameters(i)["lora_A"] for i in range(t)])
                term = self.lambda_orth * orthogonality_loss(earlier, new["lora_A"], self.orth_norm)
            if self.lambda_l2:
                term = term + self.lambda_l2 * (new["lora_A"].pow(2).sum() + new["lora_B"].pow(2).sum())
            loss = term if loss is None else loss + term
        return loss
