"""Delta tuning per task (Ding et al. 2023, "Parameter-efficient fine-tuning of large-scale pre-trained language
models"): the backbone stays frozen, each task trains its own small delta modules (addition: adapters, prefix,
prompt; specification: BitFit, last-layer, selective; reparameterisation: LoRA, intrinsic subspace) and its head,
then they are frozen. How tasks' deltas combine is the bank's composition (see ``continual.modules.bank``); several
kinds per task train together or in stages (``within_task``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Sequence

import torch
from torch import nn

from continual.config import StrategyConfig
from continual.expansion import BaseStrategy, TaskInfo, count
from continual.modules import COMPOSITIONS, DELTA_KINDS, ModuleBank, get_delta_kind

DELTA_PREFIX = "deltas."  # task_state keys of delta tensors; head tensors keep their model state_dict names


WITHIN_TASK = ("simultaneous", "sequential")


@dataclass
class DeltaConfig(StrategyConfig):
    name: str = "delta"
    # Delta kinds per task: lora, adapter, parallel_adapter, bitfit, prefix, prompt, intrinsic, selective,
    # last_layer (or any registered kind). Prompt and prefix are attached after the others.
    kinds: List[str] = field(default_factory=lambda: ["lora"])
    # Across tasks: isolated (a task uses its own deltas), sequential (tasks <= its own, earlier ones frozen),
    # simultaneous (every trained task's deltas, summed).
    composition: str = "isolated"
    # Within a task, with several kinds: simultaneous (all train together) or sequential (stages in the order
    # of `kinds`: train one kind for training.epochs, freeze it, train the next).
    within_task: str = "simultaneous"
    # Regexes matching dotted suffixes of backbone module names, for every kind that sits on linears ("{last}" is
    # the last layer's index); empty: each kind's defaults for the backbone's architecture.
    targets: List[str] = field(default_factory=list)
    # Per-kind targets, overriding `targets` for that kind (e.g. {lora: ["attention\\.self\\.query"]}).
    kind_targets: Dict[str, List[str]] = field(default_factory=dict)
    # Selective module tuning: keep only this many of the matched modules of each kind, drawn at random with
    # select_seed (0 keeps all).
    select: int = 0
    select_seed: int = 0
    # LoRA rank r and scale numerator alpha (the update is scaled by alpha / r).
    rank: int = 8
    alpha: float = 16.0
    # Hidden width of adapters and parallel adapters.
    bottleneck: int = 24
    # Prompt tuning: soft tokens per task, initialised from random vocabulary embeddings ("vocab") or N(0, 0.02).
    prompt_tokens: int = 20
    prompt_init: str = "vocab"
    # Prefix tuning: key/value vectors per task and layer; reparameterisation MLP width while training (0: none).
    prefix_tokens: int = 6
    prefix_reparam: int = 0
    # Intrinsic subspace: trainable dimensions per site (the projection is fixed and random, from `seed`).
    intrinsic_dim: int = 32
    seed: int = 0
    # Train every task's deltas together on mixed batches of all tasks (the upper bound of simultaneous
    # composition; one accuracy row).
    joint: bool = False


class DeltaStrategy(BaseStrategy):
    """Frozen backbone; per task, fresh delta modules at every site plus the task's head train, then freeze."""

    name = "delta"
    Config = DeltaConfig

    def __init__(
        self,
        kinds: Sequence[str] = ("lora",),
        composition: str = "isolated",
        within_task: str = "simultaneous",
        targets: Sequence[str] = (),
        kind_targets: Optional[Mapping[str, Sequence[str]]] = None,
        select: int = 0,
        select_seed: int = 0,
        rank: int = 8,
        alpha: float = 16.0,
        bottleneck: int = 24,
        prompt_tokens: int = 20,
        prompt_init: str = "vocab",
        prefix_tokens: int = 6,
        prefix_reparam: int = 0,
        intrinsic_dim: int = 32,
        seed: int = 0,
        joint: bool = False,
        state_prefix: str = DELTA_PREFIX,
    ):
        """The options of :class:`DeltaConfig`, plus ``state_prefix``: what :meth:`task_state` keys of the bank's
        tensors start with (a strategy built on this one, e.g. ``experts``, keeps its own)."""
        kinds, targets = list(kinds), list(targets)
        kind_targets = {k: list(v) for k, v in (kind_targets or {}).items()}
        if not kinds:
            raise ValueError("strategy.kinds: name at least one delta kind")
        for kind in kinds:
            if kind not in DELTA_KINDS:
                raise ValueError(f"strategy.kinds: unknown kind {kind!r}; known kinds: {', '.join(sorted(DELTA_KINDS))}")
        if len(set(kinds)) != len(kinds):
            raise ValueError(f"strategy.kinds: each kind at most once, got {kinds}")
        if composition not in COMPOSITIONS:
            raise ValueError(f"strategy.composition must be one of {list(COMPOSITIONS)}, got {composition!r}")
        if within_task not in WITHIN_TASK:
            raise ValueError(f"strategy.within_task must be one of {list(WITHIN_TASK)}, got {within_task!r}")
        for kind in kind_targets:
            if kind not in kinds:
                raise ValueError(f"strategy.kind_targets.{kind}: {kind!r} is not one of strategy.kinds {kinds}")
        for key, patterns in [("targets", targets)] + [(f"kind_targets.{k}", v) for k, v in kind_targets.items()]:
            for target in patterns:
                try:
                    re.compile(target.replace("{last}", "0"))
                except re.error as err:
                    raise ValueError(f"strategy.{key}: {target!r} is not a valid regex: {err}") from None
        for key, value, low in [
            ("select", select, 0), ("rank", rank, 1), ("bottleneck", bottleneck, 1), ("prompt_tokens", prompt_tokens, 1),
            ("prefix_tokens", prefix_tokens, 1), ("prefix_reparam", prefix_reparam, 0), ("intrinsic_dim", intrinsic_dim, 1),
        ]:
            if value < low:
                raise ValueError(f"strategy.{key} must be >= {low}, got {value}")
        if alpha <= 0:
            raise ValueError(f"strategy.alpha must be > 0, got {alpha}")
        if prompt_init not in ("vocab", "normal"):
            raise ValueError(f"strategy.prompt_init must be 'vocab' or 'normal', got {prompt_init!r}")
        # Virtual-token kinds go last: a linear kind must never wrap (and shift) a prefix site's written positions.
        self.kinds = sorted(kinds, key=lambda k: bool(getattr(get_delta_kind(k), "virtual_tokens", False)))
        self.stage_order = kinds  # the user's order: the stages of within_task=sequential
        self.composition, self.within_task, self.targets, self.kind_targets = composition, within_task, targets, kind_targets
        self.select, self.select_seed = select, select_seed
        self.trains_jointly = bool(joint)
        if joint and within_task == "sequential":
            raise ValueError("strategy.within_task=sequential trains kinds in stages per task; it cannot be joint")
        self.kind_option_values = {
            "lora": {"r": rank, "alpha": alpha},
            "prompt": {"tokens": prompt_tokens, "init": prompt_init, "seed": seed},
            "prefix": {"tokens": prefix_tokens, "reparam_hidden": prefix_reparam},
            "intrinsic": {"dim": intrinsic_dim, "seed": seed},
        }
        # Options a kind not listed above takes by these names (adapters; third-party kinds).
        self.shared_options = {"r": rank, "alpha": alpha, "bottleneck": bottleneck, "seed": seed}
        self.state_prefix = state_prefix

    def options_for(self, kind: str) -> Dict[str, object]:
        """The constructor options ``kind`` gets from this strategy's settings."""
        accepted = get_delta_kind(kind).options
        given = self.kind_option_values.get(kind, self.shared_options)
        return {k: v for k, v in given.items() if k in accepted}

    def setup(self, model: nn.Module, tasks: Sequence[TaskInfo]) -> None:
        super().setup(model, tasks)
        if getattr(model, "bank", None) is not None:
            raise ValueError("the model already has a module bank attached")
        bank = ModuleBank(self.composition)
        for kind in self.kinds:
            targets = self.kind_targets.get(kind, self.targets)
            if getattr(get_delta_kind(kind), "wraps", "linear") == "embedding":
                targets = []  # prompt tuning sits on the input embedding, whatever the linear targets say
            try:
                bank.attach(model.backbone, kind, targets or None, select=self.select, select_seed=self.select_seed,
                            **self.options_for(kind))
            except ValueError as err:
                raise ValueError(f"strategy.kinds: {kind}: {err}") from None
        bank.reserve(len(tasks))  # every task's slots stored side by side from the start (no copy as they come)
        model.backbone.requires_grad_(False)
        model.bank = bank

    def before_task(self, model: nn.Module, task: TaskInfo) -> None:
        model.bank.add_task(task.index)

    def training_stages(self, task: TaskInfo) -> int:
        return len(self.stage_order) if self.within_task == "sequential" else 1

    def trainable_parameters(self, model: nn.Module, task: TaskInfo, stage: Optional[int] = None) -> List[nn.Parameter]:
        """The task's deltas (of the stage's kind only, when the task trains in stages) and its head."""
        kind = None if stage is None else self.stage_order[stage]
        tasks = self.tasks if self.trains_jointly else [task]
        params = [p for t in tasks for p in model.bank.task_parameters(t.index, kind) + model.heads.parameters_for(t.index)]
        return list({id(p): p for p in params}.values())

    def after_stage(self, model: nn.Module, task: TaskInfo, stage: int) -> None:
        model.bank.freeze_task(task.index, self.stage_order[stage])

    def after_task(self, model: nn.Module, task: TaskInfo) -> None:
        model.bank.freeze_task(task.index)

    def task_state(self, model: nn.Module, task: TaskInfo) -> Dict[str, torch.Tensor]:
        deltas = {self.state_prefix + key: value for key, value in model.bank.task_state(task.index).items()}
        return {**deltas, **_head_state(model, task)}

    def load_task_state(self, model: nn.Module, task: TaskInfo, state: Dict[str, torch.Tensor]) -> None:
        prefix = self.state_prefix
        deltas = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        heads = {k: v for k, v in state.items() if not k.startswith(prefix)}
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


class ComposedDelta(BaseStrategy):
    """A strategy built on the ``delta`` strategy: ``self.deltas`` (a :class:`DeltaStrategy` the subclass creates)
    allocates, freezes, stores and counts the per-task modules, and these hooks hand over to it; a subclass overrides
    the hooks where it adds something (``setup`` is always its own: what it builds before the bank differs)."""

    deltas: DeltaStrategy

    def before_task(self, model: nn.Module, task: TaskInfo) -> None:
        self.deltas.before_task(model, task)

    def trainable_parameters(self, model: nn.Module, task: TaskInfo) -> List[nn.Parameter]:
        """The new task's modules at every site (and its head, when the model has per-task heads)."""
        return self.deltas.trainable_parameters(model, task)

    def after_task(self, model: nn.Module, task: TaskInfo) -> None:
        self.deltas.after_task(model, task)

    def task_state(self, model: nn.Module, task: TaskInfo) -> Dict[str, torch.Tensor]:
        return self.deltas.task_state(model, task)

    def load_task_state(self, model: nn.Module, task: TaskInfo, state: Dict[str, torch.Tensor]) -> None:
        self.deltas.load_task_state(model, task, state)

    def stored_parameters(self, model: nn.Module, tasks_so_far: Sequence[TaskInfo]) -> int:
        """The frozen backbone and every task's modules so far (and heads, when there are any)."""
        return self.deltas.stored_parameters(model, tasks_so_far)


class PenalizedLoRA(ComposedDelta):
    """One LoRA per task, earlier ones frozen, all acting together (``delta`` with kind ``lora`` and ``simultaneous``
    composition), plus a penalty on the new task's LoRA that a subclass gives through :meth:`auxiliary_loss`
    (O-LoRA, N-LoRA)."""

    def __init__(self, rank: int, alpha: float, targets: Sequence[str]):
        self.deltas = DeltaStrategy(kinds=["lora"], composition="simultaneous", targets=targets, rank=rank, alpha=alpha)

    @staticmethod
    def lora_sites(model: nn.Module):
        """The bank's LoRA deltas, one per adapted linear."""
        return [site.delta for site in model.bank.sites().values() if site.delta.kind == "lora"]

    def setup(self, model: nn.Module, tasks: Sequence[TaskInfo]) -> None:
        super().setup(model, tasks)
        self.deltas.setup(model, tasks)


def _head_state(model: nn.Module, task: TaskInfo) -> Dict[str, torch.Tensor]:
    """The tensors of the head serving ``task``, under their model state_dict names (``heads.heads.0.weight``)."""
    wanted = {id(p) for p in model.heads.parameters_for(task.index)}
    return {f"heads.{name}": p.detach() for name, p in model.heads.named_parameters() if id(p) in wanted}
