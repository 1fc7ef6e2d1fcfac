"""Head only: the backbone stays frozen and each task trains its own classification head (a linear probe on frozen
features). The baseline every expansion method must beat: whatever a method adds per task should buy more than a
head alone."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Sequence

import torch
from torch import nn

from continual.config import StrategyConfig
from continual.expansion import BaseStrategy, TaskInfo, count


@dataclass
class HeadOnlyConfig(StrategyConfig):
    name: str = "head_only"


class HeadOnly(BaseStrategy):
    """Frozen backbone; each task trains only its own head (a linear probe on frozen features)."""

    name = "head_only"
    Config = HeadOnlyConfig

    def trainable_parameters(self, model: nn.Module, task: TaskInfo) -> List[nn.Parameter]:
        return model.heads.parameters_for(task.index)

    def task_state(self, model: nn.Module, task: TaskInfo) -> Dict[str, torch.Tensor]:
        return {f"head.{i}": p.detach() for i, p in enumerate(model.heads.parameters_for(task.index))}

    def load_task_state(self, model: nn.Module, task: TaskInfo, state: Dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for i, p in enumerate(model.heads.parameters_for(task.index)):
                p.copy_(state[f"head.{i}"])

    def stored_parameters(self, model: nn.Module, tasks_so_far: Sequence[TaskInfo]) -> int:
        heads = {id(p): p for t in tasks_so_far for p in model.heads.parameters_for(t.index)}
        return count(model.backbone.parameters()) + count(heads.values())
