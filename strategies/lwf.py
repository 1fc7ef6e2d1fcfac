"""Learning without Forgetting (Li & Hoiem 2016) through Avalanche's LwFPlugin, on full fine-tuning."""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Sequence

from torch import nn

from continual.config import StrategyConfig
from continual.expansion import BaseStrategy, TaskInfo, backbone_and_head, count


@dataclass
class LwFConfig(StrategyConfig):
    name: str = "lwf"
    # Weight of the distillation loss towards the previous model's outputs on earlier tasks' heads.
    alpha: float = 1.0
    # Softmax temperature of the distillation.
    temperature: float = 2.0


class LwF(BaseStrategy):
    """Full fine-tuning with Avalanche's LwF: distillation of the previous model's outputs on the new task's inputs."""

    name = "lwf"
    Config = LwFConfig

    def __init__(self, alpha: float = 1.0, temperature: float = 2.0):
        self.alpha, self.temperature = alpha, temperature

    def trainable_parameters(self, model: nn.Module, task: TaskInfo) -> List[nn.Parameter]:
        return backbone_and_head(model, task)

    def avalanche_plugins(self) -> list:
        from avalanche.training.plugins import LwFPlugin

        return [LwFPlugin(alpha=self.alpha, temperature=self.temperature)]

    def stored_parameters(self, model: nn.Module, tasks_so_far: Sequence[TaskInfo]) -> int:
        # The model and the frozen copy of it that teaches the next task.
        return 2 * count(model.parameters())
