"""Per-task expert expansion of an upcycled dense backbone (ModuleFormer, Shen et al. 2023, "ModuleFormer: Modularity
Emerges from Mixture-of-Experts", arXiv 2306.04640; sparse upcycling, Komatsuzaki et al. 2023).

Every FFN of the frozen backbone becomes a routed expert layer whose shared expert is the original FFN (or equal
slices of it): outputs are unchanged at conversion (``continual.modules.experts``). For each task, ``n`` new experts
and their router rows are appended at every expert site and switched on; they and the task's head train with the
task loss plus the load-concentration loss over the routing, then they are frozen. Routing is token-level top-k over
all experts of all tasks (no task id needed at test time), or task-conditioned (a token sees its task's experts and
the shared ones): the module bank's ``simultaneous`` or ``isolated`` composition.

This is the ``delta`` strategy with the ``experts`` kind (composition, not a second implementation: allocation,
freezing, task state and parameter accounting are its own), plus upcycling the backbone, switching each task's
experts on and the routing losses.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import torch
from torch import nn

from continual.config import StrategyConfig
from continual.expansion import BaseStrategy, TaskInfo
from continual.modules import ModuleBank
from continual.modules.experts import (
    ExpertOptions,
    ExpertsDelta,
    expert_deltas,
    routing_losses,
    set_slot_enabled,
    upcycle,
)
from strategies.delta import DeltaStrategy

EXPERT_PREFIX = "experts."  # task_state keys of expert tensors; head tensors keep their model state_dict names
# ExpertOptions field -> this strategy's option name, where they differ.
OPTION_NAMES = {"n": "experts_per_task", "k": "top_k"}


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
        options = ExpertOptions(
            n=experts_per_task, k=top_k, expert_hidden=expert_hidden, gate=gate, gate_hidden=gate_hidden,
            upcycle=upcycle, slices=slices, activation=activation, start_logit=start_logit, dispatch=dispatch,
        )
        self.options = options.check(where="", keys={f: f"strategy.{OPTION_NAMES.get(f, f)}" for f in options.as_kwargs()})
        for key, value in (("concentration", concentration), ("mutual_information", mutual_information)):
            if value < 0:
                raise ValueError(f"strategy.{key} must be >= 0, got {value}")
        composition = "isolated" if task_conditioned else "simultaneous"
        self.deltas = DeltaStrategy(
            kinds=[ExpertsDelta.kind], composition=composition, targets=targets, state_prefix=EXPERT_PREFIX
        )
        self.task_conditioned, self.targets = bool(task_conditioned), list(targets)
        self.concentration, self.mutual_information = float(concentration), float(mutual_information)

    def setup(self, model: nn.Module, tasks: Sequence[TaskInfo]) -> None:
        """Upcycle the backbone: every targeted FFN becomes an expert site of a new bank (outputs unchanged)."""
        super().setup(model, tasks)
        if getattr(model, "bank", None) is not None:
            raise ValueError("the model already has a module bank attached")
        bank = ModuleBank(self.deltas.composition)
        try:
            upcycle(model.backbone, bank, self.targets or None, **self.options.as_kwargs())
        except ValueError as err:
            raise ValueError(f"strategy: {err}") from None
        model.backbone.requires_grad_(False)
        model.bank = bank

    def before_task(self, model: nn.Module, task: TaskInfo) -> None:
        self.deltas.before_task(model, task)  # allocated switched off: nothing changes until the next line
        set_slot_enabled(model.bank, task.index, True)

    def trainable_parameters(self, model: nn.Module, task: TaskInfo) -> List[nn.Parameter]:
        """The task's experts and router rows at every site, and its head."""
        return self.deltas.trainable_parameters(model, task)

    def after_task(self, model: nn.Module, task: TaskInfo) -> None:
        self.deltas.after_task(model, task)

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
        return self.deltas.task_state(model, task)

    def load_task_state(self, model: nn.Module, task: TaskInfo, state: Dict[str, torch.Tensor]) -> None:
        self.deltas.load_task_state(model, task, state)
        set_slot_enabled(model.bank, task.index, True)

    def stored_parameters(self, model: nn.Module, tasks_so_far: Sequence[TaskInfo]) -> int:
        """The frozen upcycled backbone (with the shared router rows), every task's experts and heads so far."""
        return self.deltas.stored_parameters(model, tasks_so_far)
