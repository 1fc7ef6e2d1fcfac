"""Experience replay through Avalanche's ReplayPlugin (a fixed-size, experience-balanced memory), on full fine-tuning."""

from __future__ import annotations

from dataclasses import dataclass
from typing import List

from torch import nn

from continual.config import StrategyConfig
from continual.expansion import BaseStrategy, TaskInfo, backbone_and_head


@dataclass
class ReplayConfig(StrategyConfig):
    name: str = "replay"
    # Total number of stored training samples, shared equally by the tasks seen so far.
    mem_size: int = 200


class Replay(BaseStrategy):
    """Full fine-tuning with Avalanche's experience replay: a fixed-size memory of earlier tasks' samples in every batch."""

    name = "replay"
    Config = ReplayConfig

    def __init__(self, mem_size: int = 200):
        if mem_size < 1:
            raise ValueError(f"strategy.mem_size must be >= 1, got {mem_size}")
        self.mem_size = mem_size

    def trainable_parameters(self, model: nn.Module, task: TaskInfo) -> List[nn.Parameter]:
        # Replayed samples of earlier tasks go through their own heads, so every head seen so far trains.
        heads = [p for t in self.tasks[: task.index + 1] for p in model.heads.parameters_for(t.index)]
        unique = {id(p): p for p in heads}
        return list(model.backbone.parameters()) + list(unique.values())

    def avalanche_plugins(self) -> list:
        from avalanche.training.plugins import ReplayPlugin

        return [ReplayPlugin(mem_size=self.mem_size)]
