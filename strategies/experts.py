"""Per-task expert expansion of an upcycled dense backbone (ModuleFormer, Shen et al. 2023, "ModuleFormer: Modularity
Emerges from Mixture-of-Experts", arXiv 2306.04640; sparse upcycling, Komatsuzaki et al. 2023).

Every FFN of the frozen backbone becomes a routed expert layer whose shared expert is the original FFN (or equal
slices of it): outputs are unchanged at conversion (``continual.modules.experts``). For each task, ``n`` new experts
and their router rows are appended at every expert site and switched on; they and the task's head train with the
task loss plus the load-concentration loss over the routing, then they are frozen. Routing is token-level top-k over
all experts of all tasks (no task id needed at test time), or task-conditioned (a token sees its task's experts and
the shared ones): the module bank's ``simultaneous`` or ``isolated`` composition.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import torch
from torch import nn

from continual.config import StrategyConfig
from continual.expansion import BaseStrategy, TaskInfo, count
from continual.modules import ModuleBank
from continual.modules.experts import GATES, UPCYCLING, expert_deltas, routing_losses, upcycle

EXPERT_PREFIX = "experts."  # task_state keys of expert tensors; head tensors keep their model state_dict names


@dataclass
class ExpertConfig(StrategyConfig):
    name: str = "experts"
    # New experts appended at every expert site for each task.
    experts_per_task: int = 2
    # Experts per token: the top-k of the softmax over the experts the token may use (gates not renormalised).
    # At most shared experts + experts_per_task (1 + n with upcycle=copy, slices + n with upcycle=slices).
    top_k: int = 2
    # Hidden width of each new expert (W_in [d, h], W_out [h, d]); 0: a quarter of the model width.
    expert_hidden: int = 0
    # Router: "linear" (one row per expert over the token) or "mlp" (a fixed random GELU layer of gate_hidden
    # units first, frozen so that later tasks never move earlier tasks' routing).
    gate: str = "linear"
    gate_hidden: int = 64
    # The dense FFN as the shared expert(s): "copy" (the FFN itself is expert 0) or "slices" (its hidden units cut
    # into `slices` equal experts). Both leave outputs unchanged until the first task's experts switch on. The
    # slices' router rows are equal (zeros), so use top_k = slices + 1: every slice is chosen, plus a task expert.
    upcycle: str = "copy"
    slices: int = 4
    # Activation of the new experts: gelu, gelu_tanh, relu, silu.
    activation: str = "gelu"
    # Router logit (the row's bias) a new expert starts with, against 0 for the shared expert(s): at -4 the FFN
    # keeps about 96% of each token's probability when a task's 2 experts switch on, so training starts next to
    # the pretrained model; 0 starts new experts as likely as the FFN.
    start_logit: float = -4.0
    # false: every token routes over all experts of every task (no task id needed); true: over its own task's
    # experts and the shared ones (earlier tasks' outputs then never change).
    task_conditioned: bool = False
    # Weight of the load-concentration loss (entropy of the task's marginal routing distribution, averaged over
    # expert sites) added to the task loss; 0 disables.
    concentration: float = 0.01
    # Weight of the mutual-information (load-balancing) loss H(e|x) - H(e); 0 disables.
    mutual_information: float = 0.0
    # Regexes naming the fused FFN modules to upcycle (e.g. "layer\\.[45]\\.intermediate"); empty: every block's.
    targets: List[str] = field(default_factory=list)
    # Expert matmul backend: auto (grouped on CUDA bf16/fp16 where supported), loop, grouped.
    dispatch: str = "auto"


class ExpertStrategy(BaseStrategy):
    """Frozen upcycled backbone; per task, new experts at every expert site plus the task's head train, then freeze."""

    name = "experts"
    Config = ExpertConfig

    def __init__(
        self,
        experts_per_task: int = 2,
        top_k: int = 2,
        expert_hidden: int = 0,
        gate: str = "linear",
        gate_hidden: int = 64,
        upcycle: str = "copy",
        slices: int = 4,
        activation: str = "gelu",
        start_logit: float = -4.0,
        task_conditioned: bool = False,
        concentration: float = 0.01,
        mutual_information: float = 0.0,
        targets: Sequence[str] = (),
        dispatch: str = "auto",
    ):
        for key, value, low in [
            ("experts_per_task", experts_per_task, 1), ("top_k", top_k, 1), ("expert_hidden", expert_hidden, 0),
            ("gate_hidden", gate_hidden, 1), ("slices", slices, 2),
        ]:
            if value < low:
                raise ValueError(f"strategy.{key} must be >= {low}, got {value}")
        from continual.models.moduleformer.experts import ACTIVATIONS, DISPATCH_BACKENDS  # slow import: here only

        for key, value, choices in [
            ("gate", gate, GATES), ("upcycle", upcycle, UPCYCLING), ("activation", activation, sorted(ACTIVATIONS)),
            ("dispatch", dispatch, DISPATCH_BACKENDS),
        ]:
            if value not in choices:
                raise ValueError(f"strategy.{key} must be one of {list(choices)}, got {value!r}")
        shared = 1 if upcycle == "copy" else slices
        if top_k > shared + experts_per_task:
            raise ValueError(
                f"strategy.top_k={top_k} exceeds the {shared} shared + {experts_per_task} per-task experts a "
                "task-conditioned token can use (raise strategy.experts_per_task or lower strategy.top_k)"
            )
        for key, value in (("concentration", concentration), ("mutual_information", mutual_information)):
            if value < 0:
                raise ValueError(f"strategy.{key} must be >= 0, got {value}")
        targets = list(targets)
        for target in targets:
            try:
                re.compile(target)
            except re.error as err:
                raise ValueError(f"strategy.targets: {target!r} is not a valid regex: {err}") from None
        self.kind_options = {
            "n": experts_per_task, "k": top_k, "expert_hidden": expert_hidden, "gate": gate,
            "gate_hidden": gate_hidden, "upcycle": upcycle, "slices": slices, "activation": activation,
            "start_logit": float(start_logit), "dispatch": dispatch,
        }
        self.task_conditioned, self.targets = bool(task_conditioned), targets
        self.concentration, self.mutual_information = float(concentration), float(mutual_information)

    def setup(self, model: nn.Module, tasks: Sequence[TaskInfo]) -> None:
        super().setup(model, tasks)
        if getattr(model, "bank", None) is not None:
            raise ValueError("the model already has a module bank attached")
        bank = ModuleBank("isolated" if self.task_conditioned else "simultaneous")
        try:
            upcycle(model.backbone, bank, self.targets or None, **self.kind_options)
        except ValueError as err:
            raise ValueError(f"strategy: {err}") from None
        model.backbone.requires_grad_(False)
        model.bank = bank

    def before_task(self, model: nn.Module, task: TaskInfo) -> None:
        model.bank.add_task(task.index)  # switched off: nothing changes until the next line
        for delta in expert_deltas(model.bank).values():
            delta.set_slot_enabled(task.index, True)

    def trainable_parameters(self, model: nn.Module, task: TaskInfo) -> List[nn.Parameter]:
        """The task's experts and router rows at every site, and its head."""
        return model.bank.task_parameters(task.index) + model.heads.parameters_for(task.index)

    def after_task(self, model: nn.Module, task: TaskInfo) -> None:
        model.bank.freeze_task(task.index)

    def auxiliary_loss(self, model: nn.Module, task: TaskInfo) -> Optional[torch.Tensor]:
        """Routing losses of the forward just run, averaged over the expert sites that routed tokens."""
        if self.concentration == 0 and self.mutual_information == 0:
            return None
        losses = routing_losses(expert_deltas(model.bank).values())
        if losses is None:
            return None
        mi, concentration = losses
        loss = mi.new_zeros(())
        if self.concentration:
            loss = loss + self.concentration * concentration
        if self.mutual_information:
            loss = loss + self.mutual_information * mi
        return loss

    def task_state(self, model: nn.Module, task: TaskInfo) -> Dict[str, torch.Tensor]:
        experts = {EXPERT_PREFIX + key: value for key, value in model.bank.task_state(task.index).items()}
        return {**experts, **_head_state(model, task)}

    def load_task_state(self, model: nn.Module, task: TaskInfo, state: Dict[str, torch.Tensor]) -> None:
        experts = {k[len(EXPERT_PREFIX):]: v for k, v in state.items() if k.startswith(EXPERT_PREFIX)}
        heads = {k: v for k, v in state.items() if not k.startswith(EXPERT_PREFIX)}
        unexpected = sorted(set(heads) - set(_head_state(model, task)))
        if unexpected:
            raise KeyError(f"checkpoint for task {task.name!r} has unexpected tensors: {unexpected[:5]}")
        model.bank.load_task_state(task.index, experts)
        for delta in expert_deltas(model.bank).values():
            delta.set_slot_enabled(task.index, True)
        model.load_state_dict(heads, strict=False)

    def stored_parameters(self, model: nn.Module, tasks_so_far: Sequence[TaskInfo]) -> int:
        """The frozen upcycled backbone (with the shared router rows), every task's experts and heads so far."""
        backbone = count(model.backbone.parameters()) - model.bank.parameter_count()
        experts = sum(model.bank.parameter_count(t.index) for t in tasks_so_far if t.index < model.bank.n_tasks)
        heads = {id(p): p for task in tasks_so_far for p in model.heads.parameters_for(task.index)}
        return backbone + experts + count(heads.values())


def _head_state(model: nn.Module, task: TaskInfo) -> Dict[str, torch.Tensor]:
    """The tensors of the head serving ``task``, under their model state_dict names."""
    wanted = {id(p) for p in model.heads.parameters_for(task.index)}
    return {f"heads.{name}": p.detach() for name, p in model.heads.named_parameters() if id(p) in wanted}
