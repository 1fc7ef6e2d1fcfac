"""The interface between the learner and an expansion strategy.

The learner owns the loop (expand -> train -> freeze -> evaluate -> log); a strategy only answers questions about
one task at a time: which modules to allocate, which parameters train, what to freeze and what to store. State is
passed explicitly: hooks receive the model and the task and return what they produce.
"""

from __future__ import annotations

from typing import ClassVar, Dict, Iterable, List, Optional, Protocol, Sequence, runtime_checkable

import torch
from torch import nn

from continual.config import StrategyConfig
from streams.data import TaskInfo  # re-exported: strategies see a stream's tasks through this interface

__all__ = ["BaseStrategy", "ExpansionStrategy", "TaskInfo", "backbone_and_head", "count"]


@runtime_checkable
class ExpansionStrategy(Protocol):
    """What the learner asks of a strategy. Implementations register with ``strategies.registry``."""

    name: ClassVar[str]
    Config: ClassVar[type]
    # Train once on all tasks together (the multi-task upper bound) instead of one task after another.
    trains_jointly: ClassVar[bool]
    # What the run recipe loads as the backbone: "encoder" (AutoModel) or "causal_lm" (AutoModelForCausalLM + LM head).
    backbone_kind: ClassVar[str]

    def build_model(self, backbone: nn.Module, tokenizer, stream, backbone_cfg) -> Optional[nn.Module]:
        """The model to train and evaluate, built from the loaded backbone, its tokenizer, the tokenized stream
        (``streams.build.Stream``) and the ``backbone`` config node; None for the default ``ContinualClassifier``.
        A model built here answers ``forward(x, task_labels)`` with ``[B, C]`` logits (``x: [B, 2, L]`` ids stacked
        on the attention mask) and has ``heads`` with ``target_index(task)`` and ``activate(task)``, like
        ``ContinualClassifier``. When ``trainable_parameters`` returns nothing, the learner trains nothing on that
        task (its hooks still run) and only evaluates."""

    def setup(self, model: nn.Module, tasks: Sequence[TaskInfo]) -> None:
        """Called once before the stream, with every task the stream will present."""

    def before_task(self, model: nn.Module, task: TaskInfo) -> None:
        """Allocate whatever the new task needs (modules, heads)."""

    def trainable_parameters(self, model: nn.Module, task: TaskInfo) -> List[nn.Parameter]:
        """The parameters that train on ``task``; only these reach the optimizer and have requires_grad."""

    def after_task(self, model: nn.Module, task: TaskInfo) -> None:
        """Freeze what the task trained."""

    def training_stages(self, task: TaskInfo) -> int:
        """How many stages ``task`` trains in (usually 1). With more, the learner runs the epochs once per stage
        and asks ``trainable_parameters(model, task, stage=s)`` for each, calling ``after_stage`` in between."""

    def after_stage(self, model: nn.Module, task: TaskInfo, stage: int) -> None:
        """Freeze what ``stage`` of a multi-stage task trained."""

    def auxiliary_loss(self, model: nn.Module, task: TaskInfo) -> Optional[torch.Tensor]:
        """A loss added to the task loss of the forward pass just run while training (None: nothing)."""

    def avalanche_plugins(self) -> list:
        """Avalanche plugins that take part in training (EWC, LwF, replay...)."""

    def task_state(self, model: nn.Module, task: TaskInfo) -> Dict[str, torch.Tensor]:
        """The tensors that must be stored for ``task`` (saved as safetensors)."""

    def load_task_state(self, model: nn.Module, task: TaskInfo, state: Dict[str, torch.Tensor]) -> None:
        """Inverse of :meth:`task_state`."""

    def stored_parameters(self, model: nn.Module, tasks_so_far: Sequence[TaskInfo]) -> int:
        """Number of parameters that must be kept to serve every task seen so far."""


def count(params: Iterable[nn.Parameter]) -> int:
    return sum(p.numel() for p in params)


class BaseStrategy:
    """Defaults shared by strategies: nothing allocated, nothing frozen, no plugins.

    Subclasses set ``name`` and ``Config`` and override what they change. One level of inheritance only.
    """

    name: ClassVar[str] = ""
    Config: ClassVar[type] = StrategyConfig
    trains_jointly: ClassVar[bool] = False
    backbone_kind: ClassVar[str] = "encoder"

    def build_model(self, backbone: nn.Module, tokenizer, stream, backbone_cfg) -> Optional[nn.Module]:
        return None

    def setup(self, model: nn.Module, tasks: Sequence[TaskInfo]) -> None:
        self.tasks = list(tasks)

    def before_task(self, model: nn.Module, task: TaskInfo) -> None:
        return None

    def trainable_parameters(self, model: nn.Module, task: TaskInfo) -> List[nn.Parameter]:
        raise NotImplementedError

    def after_task(self, model: nn.Module, task: TaskInfo) -> None:
        return None

    def training_stages(self, task: TaskInfo) -> int:
        return 1

    def after_stage(self, model: nn.Module, task: TaskInfo, stage: int) -> None:
        return None

    def auxiliary_loss(self, model: nn.Module, task: TaskInfo) -> Optional[torch.Tensor]:
        return None

    def avalanche_plugins(self) -> list:
        return []

    def task_state(self, model: nn.Module, task: TaskInfo) -> Dict[str, torch.Tensor]:
        return {k: v for k, v in model.state_dict().items()}

    def load_task_state(self, model: nn.Module, task: TaskInfo, state: Dict[str, torch.Tensor]) -> None:
        missing, unexpected = model.load_state_dict(state, strict=False)
        if unexpected:
            raise KeyError(f"checkpoint for task {task.name!r} has unexpected tensors: {unexpected[:5]}")

    def stored_parameters(self, model: nn.Module, tasks_so_far: Sequence[TaskInfo]) -> int:
        return count(model.parameters())


def backbone_and_head(model: nn.Module, task: TaskInfo) -> List[nn.Parameter]:
    """Every backbone parameter plus the head that serves ``task`` (what full fine-tuning trains)."""
    return list(model.backbone.parameters()) + model.heads.parameters_for(task.index)
