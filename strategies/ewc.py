"""Elastic Weight Consolidation (Kirkpatrick et al. 2017) through Avalanche's EWCPlugin, on full fine-tuning."""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence

from torch import nn

from continual.config import StrategyConfig
from continual.expansion import BaseStrategy, TaskInfo, backbone_and_head, count


@dataclass
class EWCConfig(StrategyConfig):
    name: str = "ewc"
    # Penalty weight. Fisher values of a pretrained transformer are tiny: useful values are large (1e3..1e7).
    ewc_lambda: float = 1.0e5
    # "separate" keeps one penalty per past task; "online" keeps a decayed running one.
    mode: str = "separate"
    # Decay of the online penalty (mode=online only).
    decay_factor: Optional[float] = None


class EWC(BaseStrategy):
    """Full fine-tuning with Avalanche's EWC penalty (Fisher-weighted distance to earlier tasks' weights)."""

    name = "ewc"
    Config = EWCConfig

    def __init__(self, ewc_lambda: float = 1.0e5, mode: str = "separate", decay_factor: Optional[float] = None):
        if mode not in ("separate", "online"):
            raise ValueError(f"strategy.mode must be 'separate' or 'online', got {mode!r}")
        if mode == "online" and decay_factor is None:
            raise ValueError("strategy.decay_factor is required when strategy.mode=online")
        self.ewc_lambda, self.mode, self.decay_factor = ewc_lambda, mode, decay_factor

    def trainable_parameters(self, model: nn.Module, task: TaskInfo) -> List[nn.Parameter]:
        return backbone_and_head(model, task)

    def avalanche_plugins(self) -> list:
        from avalanche.training.plugins import EWCPlugin

        return [EWCPlugin(self.ewc_lambda, mode=self.mode, decay_factor=self.decay_factor)]

    def stored_parameters(self, model: nn.Module, tasks_so_far: Sequence[TaskInfo]) -> int:
        # The model plus, per consolidated task (one in online mode), a copy of the weights and their importances.
        penalties = len(tasks_so_far) if self.mode == "separate" else min(1, len(tasks_so_far))
        return count(model.parameters()) * (1 + 2 * penalties)
