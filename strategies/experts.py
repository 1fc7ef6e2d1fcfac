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

Pruning (``prune_threshold > 0``; ModuleFormer: experts a task does not choose can be removed): after each task has
trained, its training data runs through the model once (eval mode, no gradients) to record how often each expert is
chosen by its real tokens; then every task expert that no task seen so far chooses for at least that share of its
tokens is removed, each task keeping at least ``k - S`` of its own (``continual.modules.experts.PruningHistory``).
Earlier tasks' usage is the one recorded after their own training (frozen history). The history is the strategy's
state (:meth:`ExpertStrategy.state_dict`), and ``after_task`` replays a restored pruning, so a resumed run rebuilds
the pruned shapes before loading the model's tensors.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from torch import nn

from continual.config import StrategyConfig
from continual.expansion import TaskInfo
from continual.modules import ModuleBank
from continual.modules.experts import (
    ExpertOptions,
    ExpertsDelta,
    PruneResult,
    PruningHistory,
    expert_deltas,
    prune_experts,
    recording_usage,
    routing_losses,
    set_slot_enabled,
    upcycle,
)
from strategies.delta import ComposedDelta, DeltaStrategy

EXPERT_PREFIX = "experts."  # task_state keys of expert tensors; head tensors keep their model state_dict names
PRUNING_PREFIX = "pruning."  # state_dict (and task_state) keys of the pruning history
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
    # Prune after each task: remove the task experts that no task seen so far chooses for at least this share of its
    # training tokens (usage recorded on each task's own training data right after it trains; every task keeps at
    # least top_k - shared of its own experts). In [0, 1); 0 keeps every expert.
    prune_threshold: float = 0.0


class ExpertStrategy(ComposedDelta):
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
        prune_threshold: float = 0.0,
    ):
        options = ExpertOptions(
            n=experts_per_task, k=top_k, expert_hidden=expert_hidden, gate=gate, gate_hidden=gate_hidden,
            upcycle=upcycle, slices=slices, activation=activation, start_logit=start_logit, dispatch=dispatch,
        )
        self.options = options.check(where="", keys={f: f"strategy.{OPTION_NAMES.get(f, f)}" for f in options.as_kwargs()})
        for key, value in (("concentration", concentration), ("mutual_information", mutual_information)):
            if value < 0:
                raise ValueError(f"strategy.{key} must be >= 0, got {value}")
        if not 0.0 <= prune_threshold < 1.0:
            raise ValueError(f"strategy.prune_threshold must be in [0, 1) (a share of a task's tokens; 0: no pruning), "
                             f"got {prune_threshold}")
        composition = "isolated" if task_conditioned else "simultaneous"
        self.deltas = DeltaStrategy(
            kinds=[ExpertsDelta.kind], composition=composition, targets=targets, state_prefix=EXPERT_PREFIX
        )
        self.task_conditioned, self.targets = bool(task_conditioned), list(targets)
        self.concentration, self.mutual_information = float(concentration), float(mutual_information)
        self.prune_threshold = float(prune_threshold)
        self.pruning = PruningHistory()
        self._pruned: Dict[int, PruneResult] = {}  # task -> the pruning after it, as applied to this model

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

    def after_task(self, model: nn.Module, task: TaskInfo) -> None:
        """Freeze the task's experts; replay the pruning stored for it when it was restored rather than run here."""
        if task.index in self.pruning.keep and task.index not in self._pruned:
            self._pruned[task.index] = prune_experts(expert_deltas(model.bank), self.pruning.keep[task.index])
        self.deltas.after_task(model, task)

    # ------------------------------------------------------------------ pruning
    def avalanche_plugins(self) -> list:
        """With pruning on, a plugin that prunes after each task's training (before the learner freezes it)."""
        return [_pruning_plugin(self)] if self.prune_threshold else []

    @torch.no_grad()
    def prune(
        self, model: nn.Module, task: TaskInfo, batches: Iterable[Tuple[torch.Tensor, torch.Tensor]]
    ) -> PruneResult:
        """Record which experts ``task``'s data chooses, then remove the experts no task seen so far uses enough.

        Args:
            model: the model, with ``task`` trained (and not yet pruned after).
            task: the task just trained.
            batches: its training data as ``(x [B, 2, L] ids stacked on the attention mask, task labels [B])`` on
                the model's device; they run in eval mode without gradients, and only real tokens count.
        """
        deltas = expert_deltas(model.bank)
        was_training = model.training
        model.eval()
        try:
            with recording_usage(deltas) as usage:
                for x, task_labels in batches:
                    model(x, task_labels)
        finally:
            model.train(was_training)
        result = self.pruning.prune(deltas, task.index, usage, self.prune_threshold)
        self._pruned[task.index] = result
        return result

    def task_metrics(self, model: nn.Module, task: TaskInfo) -> Dict[str, float]:
        """What the pruning after ``task`` removed (nothing without pruning): parameters, experts (over all sites)
        and the task experts left at all sites."""
        result = self._pruned.get(task.index)
        if result is None:
            return {}
        shared = {name: delta.n_shared for name, delta in expert_deltas(model.bank).items()}
        return {
            "pruned_parameters": result.parameters_removed,
            "experts_removed": sum(len(v) for v in result.experts_removed.values()),
            "experts_left": sum(n - shared.get(name, 0) for name, n in result.experts_kept.items()),
        }

    def state_dict(self) -> Dict[str, torch.Tensor]:
        """The pruning history (empty without pruning): ``pruning.usage.<task>.<site>.{counts,gate_sums,tokens}``,
        each finished task's usage as recorded after it, and ``pruning.keep.<task>.<site>``, the ``[E]`` bool keep
        mask applied after it."""
        return {PRUNING_PREFIX + key: value for key, value in self.pruning.state_dict().items()}

    def load_state_dict(self, state: Dict[str, torch.Tensor]) -> None:
        """Restore :meth:`state_dict` into a strategy just set up; each restored task's pruning is replayed by
        :meth:`after_task` when the structure is rebuilt (``before_task``, ``after_task`` per finished task)."""
        unknown = [key for key in state if not key.startswith(PRUNING_PREFIX)]
        if unknown:
            raise KeyError(f"experts strategy state: unexpected keys {unknown[:5]}")
        self.pruning.load_state_dict({key[len(PRUNING_PREFIX):]: value for key, value in state.items()})
        self._pruned = {}

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
        """The task's experts and head; with pruning, also its usage and the keep masks applied after it."""
        state = self.deltas.task_state(model, task)
        if task.index in self.pruning.keep:
            state.update({PRUNING_PREFIX + k: v for k, v in self.pruning.state_dict([task.index]).items()})
        return state

    def load_task_state(self, model: nn.Module, task: TaskInfo, state: Dict[str, torch.Tensor]) -> None:
        """Inverse of :meth:`task_state`, task after task in order: a pruned task's slot is allocated, the pruning
        stored with it replayed (shrinking earlier slots as the run did), then its tensors are loaded."""
        record = {k[len(PRUNING_PREFIX):]: v for k, v in state.items() if k.startswith(PRUNING_PREFIX)}
        if record:
            history = PruningHistory()
            history.load_state_dict(record)
            if set(history.keep) != {task.index}:
                raise KeyError(f"checkpoint for task {task.name!r} holds the pruning of tasks {sorted(history.keep)}")
            self.before_task(model, task)  # its slot, switched on: pruning checks the experts left to route over
            self.pruning.load_state_dict({**self.pruning.state_dict(), **record})
            self._pruned[task.index] = prune_experts(expert_deltas(model.bank), history.keep[task.index])
        self.deltas.load_task_state(model, task, {k: v for k, v in state.items() if not k.startswith(PRUNING_PREFIX)})
        set_slot_enabled(model.bank, task.index, True)


def _pruning_plugin(strategy: ExpertStrategy):
    """An Avalanche plugin that runs :meth:`ExpertStrategy.prune` on each experience's training data when it has
    trained (Avalanche is imported here: loading it takes seconds)."""
    from avalanche.training.plugins import SupervisedPlugin

    class PruneAfterTraining(SupervisedPlugin):
        def after_training_exp(self, learner, **kwargs):
            # In order, with its own generator: iterating a DataLoader otherwise draws a seed from the global RNG,
            # and later tasks would get other initial weights and batch orders than the same run without pruning.
            loader = torch.utils.data.DataLoader(learner.experience.dataset, batch_size=learner.eval_mb_size,
                                                 shuffle=False, generator=torch.Generator().manual_seed(0))
            batches = ((x.to(learner.device), t.to(learner.device)) for x, _, t in loader)
            strategy.prune(learner.model, strategy.tasks[learner.experience.current_experience], batches)

        def state_dict(self) -> Dict[str, torch.Tensor]:
            return {}  # the pruning history is the strategy's state

        def load_state_dict(self, state: Dict[str, torch.Tensor]) -> None:
            return None

    return PruneAfterTraining()
