"""Sequential full fine-tuning: every parameter trains on each task in turn (the lower bound on forgetting)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import List

from torch import nn

from continual.config import StrategyConfig
from continual.expansion import BaseStrategy, TaskInfo, backbone_and_head


@dataclass
class FullFinetuneConfig(StrategyConfig):
    name: str = "full_finetune"


class FullFinetune(BaseStrategy):
    """Fine-tune the whole backbone and the current task's head on each task, one after another."""

    name = "full_finetune"
    Config = FullFinetuneConfig

    def trainable_parameters(self, model: nn.Module, task: TaskInfo) -> List[nn.Parameter]:
        return backbone_and_head(model, task)
