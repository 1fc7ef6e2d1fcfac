"""Multi-task (joint) training on all tasks at once: the usual upper bound of a stream."""

from __future__ import annotations

from dataclasses import dataclass
from typing import List

from torch import nn

from continual.config import StrategyConfig
from continual.expansion import BaseStrategy, TaskInfo


@dataclass
class JointConfig(StrategyConfig):
    name: str = "joint"


class Joint(BaseStrategy):
    """Train the backbone and every task's head on the union of all tasks' training data, in mixed batches.

    The accuracy matrix of a joint run has one evaluated row (after the single training phase); BWT and
    forgetting are therefore undefined (NaN) for it.
    """

    name = "joint"
    Config = JointConfig
    trains_jointly = True

    def trainable_parameters(self, model: nn.Module, task: TaskInfo) -> List[nn.Parameter]:
        heads = [p for t in self.tasks for p in model.heads.parameters_for(t.index)]
        unique = {id(p): p for p in heads}
        return list(model.backbone.parameters()) + list(unique.values())
