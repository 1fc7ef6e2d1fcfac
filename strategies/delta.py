"""Delta tuning per task (Ding et al. 2023, "Parameter-efficient fine-tuning of large-scale pre-trained language
models"): the backbone stays frozen, each task trains its own small delta modules (LoRA, adapters, BitFit) and its
head, then they are frozen. How tasks' deltas combine is the bank's composition (see ``continual.modules.bank``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Dict, List, Sequence

import torch
from torch import nn

from continual.config import StrategyConfig
from continual.expansion import BaseStrategy, TaskInfo, count
from continual.modules import COMPOSITIONS, DELTA_KINDS, ModuleBank, get_delta_kind

DELTA_PREFIX = "deltas."  # task_state keys of delta tensors; head tensors keep their model state_dict names


@dataclass
class DeltaConfig(StrategyConfig):
    name: str = "delta"
    # Delta kinds, each attached at its own sites: lora, adapter, parallel_adapter, bitfit (all train together).
    kinds: List[str] = field(default_factory=lambda: ["lora"])
    # Across tasks: isolated (a task uses its own deltas), sequential (tasks <= its own, earlier ones frozen),
    # simultaneous (every trained task's deltas, summed).
    composition: str = "isolated"
    # Regexes matching dotted suffixes of backbone module names, for every kind; empty: each kind's defaults for
    # the backbone's architecture (e.g. LoRA on attention query/value).
    targets: List[str] = field(default_factory=list)
    # LoRA rank r and scale numerator alpha (the update is scaled by alpha / r).
    rank: int = 8
    alpha: float = 16.0
    # Hidden width of adapters and parallel adapters.
    bottleneck: int = 24


class DeltaStrategy(BaseStrategy):
    """Frozen backbone; per task, fresh delta modules at every site plus the task's head train, then freeze."""

    name = "delta"
    Config = DeltaConfig

    def __init__(
        self,
        kinds: Sequence[str] = ("lora",),
        composition: str = "isolated",
        targets: Sequence[str] = (),
        rank: int = 8,
        alpha: float = 16.0,
        bottleneck: int = 24,
    ):
        kinds, targets = list(kinds), list(targets)
        if not kinds:
            raise ValueError("strategy.kinds: name at least one delta kind")
        for kind in kinds:
            if kind not in DELTA_KINDS:
                raise ValueError(f"strategy.kinds: unknown kind {kind!r}; known kinds: {', '.join(sorted(DELTA_KINDS))}")
        if len(set(kinds)) != len(kinds):
            raise ValueError(f"strategy.kinds: each kind at most once, got {kinds}")
        if composition not in COMPOSITIONS:
            raise ValueError(f"strategy.composition must be one of {list(COMPOSITIONS)}, got {composition!r}")
        for target in targets:
            try:
                re.compile(target)
            except re.error as err:
                raise ValueError(f"strategy.targets: {target!r} is not a valid regex: {err}") from None
        if rank < 1:
            raise ValueError(f"strategy.rank must be >= 1, got {rank}")
        if alpha <= 0:
            raise ValueError(f"strategy.alpha must be > 0, got {alpha}")
        if bottleneck < 1:
            raise ValueError(f"strategy.bottleneck must be >= 1, got {bottleneck}")
        self.kinds, self.composition, self.targets = kinds, composition, targets
        self.shared_options = {"r": rank, "alpha": alpha, "bottleneck": bottleneck}

    def setup(self, model: nn.Module, tasks: Sequence[TaskInfo]) -> None:
        super().setup(model, tasks)
        if getattr(model, "bank", None) is not None:
            raise ValueError("the model already has a module bank attached")
        bank = ModuleBank(self.composition)
        for kind in self.kinds:
            options = {k: v for k, v in self.shared_options.items() if k in get_delta_kind(kind).options}
            bank.attach(model.backbone, kind, self.targets or None, **options)
        model.backbone.requires_grad_(False)
        model.bank = bank

    def before_task(self, model: nn.Module, task: TaskInfo) -> None:
        model.bank.add_task(task.index)

    def trainable_parameters(self, model: nn.Module, task: TaskInfo) -> List[nn.Parameter]:
        return model.bank.task_parameters(task.index) + model.heads.parameters_for(task.index)

    def after_task(self, model: nn.Module, task: TaskInfo) -> None:
        model.bank.freeze_task(task.index)

    def task_state(self, model: nn.Module, task: TaskInfo) -> Dict[str, torch.Tensor]:
        deltas = {DELTA_PREFIX + key: value for key, value in model.bank.task_state(task.index).items()}
        return {**deltas, **_head_state(model, task)}

    def load_task_state(self, model: nn.Module, task: TaskInfo, state: Dict[str, torch.Tensor]) -> None:
        deltas = {k[len(DELTA_PREFIX):]: v for k, v in state.items() if k.startswith(DELTA_PREFIX)}
        heads = {k: v for k, v in state.items() if not k.startswith(DELTA_PREFIX)}
        unexpected = sorted(set(heads) - set(_head_state(model, task)))
        if unexpected:
            raise KeyError(f"checkpoint for task {task.name!r} has unexpected tensors: {unexpected[:5]}")
        model.bank.load_task_state(task.index, deltas)
        model.load_state_dict(heads, strict=False)

    def stored_parameters(self, model: nn.Module, tasks_so_far: Sequence[TaskInfo]) -> int:
        backbone = count(model.backbone.parameters()) - model.bank.parameter_count()  # the frozen base weights
        deltas = sum(model.bank.parameter_count(task.index) for task in tasks_so_far if task.index < model.bank.n_tasks)
        heads = {id(p): p for task in tasks_so_far for p in model.heads.parameters_for(task.index)}
        return backbone + deltas + count(heads.values())


def _head_state(model: nn.Module, task: TaskInfo) -> Dict[str, torch.Tensor]:
    """The tensors of the head serving ``task``, under their model state_dict names (``heads.heads.0.weight``)."""
    wanted = {id(p) for p in model.heads.parameters_for(task.index)}
    return {f"heads.{name}": p.detach() for name, p in model.heads.named_parameters() if id(p) in wanted}
