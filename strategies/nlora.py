"""N-LoRA: non-collision low-rank adaptation (Yang et al. 2025, "Is Parameter Collision Hindering Continual Learning in
LLMs?", COLING, arXiv 2410.10179).

Like O-LoRA (``strategies/olora.py``) every task gets a new LoRA, earlier ones are frozen, and all of them act
together at test time with no task id (the module bank's ``simultaneous`` composition, which equals merging every
task's update into the weights). N-LoRA's observation is that two tasks' updates interfere where they *collide*,
where both change the same weight entries, and that sparse updates rarely collide (non-collision implies the
orthogonality O-LoRA asks for, not the reverse). So instead of an orthogonality loss it makes each task's update
``dW_t = (alpha / r) B_t A_t`` sparse:

    penalty = "sparsity":   L = L_task + lambda_l1 * sum_sites ||dW_t||_1                        (N-LoRA)
    penalty = "collision":  L = L_task + lambda_l1 * sum_sites sum_{i<t} ||dW_i (.) dW_t||_1      (the collision itself)

where ``(.)`` is the elementwise product. The first is the paper's loss (an l1 penalty on the new task's update; the
earlier tasks' terms are constants once they are frozen); the second penalises the quantity the paper measures,
overlap with earlier updates, directly (0 on the first task). The two live on very different scales (the second is a
sum of products of small numbers), so each needs its own ``lambda_l1``.

Why this method among the later subspace methods: it is a loss on the bank's own tensors, the per-task LoRA slots,
and needs nothing else. InfLoRA (Liang & Li, CVPR 2024), the projection alternative, fixes each task's down-projection
from the new task's input activations projected onto the complement of earlier tasks' input subspaces (a DualGPM
memory updated after every task): it needs the new task's data before training starts and a pass collecting every
site's inputs, which the strategy interface (``before_task(model, task)``, no data) does not give a strategy today.

This is the ``delta`` strategy with one kind (LoRA) and simultaneous composition, plus the penalty through the
``auxiliary_loss`` hook.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Sequence

import torch
from torch import nn

from continual.config import StrategyConfig
from continual.expansion import TaskInfo
from strategies.delta import PenalizedLoRA

PENALTIES = ("sparsity", "collision")


@dataclass
class NLoRAConfig(StrategyConfig):
    name: str = "nlora"
    # Weight of the l1 penalty. Its scale depends on the model's width and the number of sites: with "sparsity" the
    # term sums |dW_t| over every entry of every adapted matrix (SmolLM2-135M, r=8 on q/v: 60 matrices, 16M entries).
    lambda_l1: float = 1.0e-4
    # "sparsity": ||dW_t||_1 (N-LoRA); "collision": sum over earlier tasks of ||dW_i (.) dW_t||_1.
    penalty: str = "sparsity"
    # LoRA rank r and scale numerator alpha (the update is scaled by alpha / r).
    rank: int = 8
    alpha: float = 16.0
    # Regexes naming the linears that get a LoRA; empty: the family's query and value projections.
    targets: List[str] = field(default_factory=list)


def lora_update(A: torch.Tensor, B: torch.Tensor, scale: float) -> torch.Tensor:
    """``dW = scale * B A``: ``[out, r] x [r, in] -> [out, in]``."""
    return scale * (B @ A)


def sparsity_loss(new: torch.Tensor) -> torch.Tensor:
    """``||dW_t||_1`` of one site's new update ``[out, in]``."""
    return new.abs().sum()


def collision_loss(earlier: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """``sum_i ||dW_i (.) dW_t||_1``: ``earlier [K, out, in]`` (frozen), ``new [out, in]`` -> a scalar."""
    return (earlier * new).abs().sum()


class NLoRA(PenalizedLoRA):
    """Per task a new LoRA (earlier ones frozen, all acting together), trained with an l1 penalty on its update."""

    name = "nlora"
    Config = NLoRAConfig

    def __init__(
        self,
        lambda_l1: float = 1.0e-4,
        penalty: str = "sparsity",
        rank: int = 8,
        alpha: float = 16.0,
        targets: Sequence[str] = (),
    ):
        if lambda_l1 < 0:
            raise ValueError(f"strategy.lambda_l1 must be >= 0, got {lambda_l1}")
        if penalty not in PENALTIES:
            raise ValueError(f"strategy.penalty must be one of {list(PENALTIES)}, got {penalty!r}")
        super().__init__(rank, alpha, targets)
        self.lambda_l1, self.penalty = float(lambda_l1), penalty

    def auxiliary_loss(self, model: nn.Module, task: TaskInfo) -> Optional[torch.Tensor]:
        """``lambda_l1`` times the penalty summed over the LoRA sites (None when it is 0 by construction)."""
        t = task.index
        if self.lambda_l1 == 0 or (self.penalty == "collision" and t == 0):
            return None
        loss = None
        for delta in self.lora_sites(model):
            slot = delta.slot_parameters(t)
            new = lora_update(slot["lora_A"], slot["lora_B"], delta.scale)
            if self.penalty == "sparsity":
                term = sparsity_loss(new)
            else:
                with torch.no_grad():  # earlier tasks are frozen: their updates are constants
                    earlier = torch.stack([
                        lora_update(delta.slot_parameters(i)["lora_A"], delta.slot_parameters(i)["lora_B"], delta.scale)
                        for i in range(t)
                    ])
                term = collision_loss(earlier, new)
            loss = term if loss is None else loss + term
        return None if loss is None else self.lambda_l1 * loss
