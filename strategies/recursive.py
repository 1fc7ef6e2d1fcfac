"""A recursive backbone with per-task depth-wise LoRA (Relaxed Recursive Transformers, Bae et al. 2024,
arXiv 2410.20672, used for continual learning).

``setup`` turns the classifier's backbone into a recursive one (``K = L / R`` shared blocks; see
``continual.models.recursive``) or loads one that was uptrained and saved, then freezes it: the compact backbone
is shared by every task. Each task gets its own LoRA at the target projections of *every unrolled depth*, held
by the module bank exactly as the ``delta`` strategy holds its LoRA (one slot per task, routed by task id), so a
task's deltas are its own relaxation of the shared blocks. With ``task_init=svd`` a new task's LoRA starts from the
truncated SVD of what tying removed at that depth (``W_original[l] - W_effective[l]``): each targeted projection
starts at the rank-``r`` approximation of its pretrained weight instead of at the shared one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import torch
from torch import nn

from continual.config import StrategyConfig
from continual.expansion import TaskInfo, count
from continual.models.recursive import RecursionConfig, RelaxedLinear, convert_to_recursive, load_recursive, svd_lora_factors
from continual.modules import ModuleBank
from strategies.delta import ComposedDelta, DeltaStrategy

TASK_INITS = ("zero", "svd")


@dataclass
class RecursiveConfig(StrategyConfig):
    name: str = "recursive"
    # How the backbone becomes recursive (strategy.recursion.num_loops, .sharing, .init, .rank, ...); ignored when
    # `pretrained` names a saved recursive backbone.
    recursion: RecursionConfig = field(default_factory=RecursionConfig)
    # Folder written by save_recursive (e.g. by `continual uptrain`); empty: convert the configured backbone.
    pretrained: Optional[str] = None
    # Per-task depth-wise LoRA: rank, scale numerator (update scaled by alpha / rank), target projections (regexes on
    # dotted suffixes, as for the delta strategy; empty: the bank's LoRA defaults, attention query/value).
    rank: int = 8
    alpha: float = 16.0
    targets: List[str] = field(default_factory=list)
    # "svd": a task's LoRA starts at the rank-`rank` SVD of W_original - W_effective at each depth; "zero": B = 0.
    task_init: str = "svd"
    # Across tasks: isolated, sequential or simultaneous (see continual.modules.bank).
    composition: str = "isolated"


class RecursiveStrategy(ComposedDelta):
    """Frozen recursive backbone shared by all tasks; per task, depth-wise LoRA at every unrolled depth plus a head.

    The per-task part is the ``delta`` strategy with the LoRA kind, run on the converted backbone (composition, not
    a second implementation): the bank, routing, freezing, task state and parameter accounting are its own.
    """

    name = "recursive"
    Config = RecursiveConfig

    def __init__(
        self,
        recursion: Optional[dict] = None,
        pretrained: Optional[str] = None,
        rank: int = 8,
        alpha: float = 16.0,
        targets: Sequence[str] = (),
        task_init: str = "svd",
        composition: str = "isolated",
    ):
        try:
            self.recursion = RecursionConfig(**(recursion or {})).to_kwargs()
        except (TypeError, ValueError) as err:
            raise ValueError(f"strategy.recursion: {err}") from None
        if task_init not in TASK_INITS:
            raise ValueError(f"strategy.task_init must be one of {list(TASK_INITS)}, got {task_init!r}")
        if pretrained and task_init == "svd":
            raise ValueError(
                "strategy.task_init=svd needs the pretrained weights to take the residual from; with "
                "strategy.pretrained set, use strategy.task_init=zero"
            )
        self.deltas = DeltaStrategy(kinds=["lora"], composition=composition, targets=targets, rank=rank, alpha=alpha)
        self.pretrained, self.rank, self.alpha, self.task_init = pretrained, rank, alpha, task_init
        self._initial_slot: Dict[str, torch.Tensor] = {}  # bank task_state key -> SVD-initialised value

    def setup(self, model: nn.Module, tasks: Sequence[TaskInfo]) -> None:
        super().setup(model, tasks)
        originals: Dict[str, torch.Tensor] = {}
        if self.pretrained:
            model.backbone = _load_pretrained(self.pretrained, model.backbone)
        else:
            # Pretrained weights of every linear by module name (conversion keeps the names), for task_init=svd.
            originals = {n: m.weight.detach().clone() for n, m in model.backbone.named_modules() if isinstance(m, nn.Linear)}
            convert_to_recursive(model.backbone, **self.recursion)
        self.deltas.setup(model, tasks)  # attaches the bank at every depth's targets and freezes the backbone
        if self.task_init == "svd":
            self._initial_slot = _svd_slots(model.bank, originals, self.rank, self.alpha)

    def before_task(self, model: nn.Module, task: TaskInfo) -> None:
        fresh = task.index == model.bank.n_tasks
        self.deltas.before_task(model, task)
        if fresh and self._initial_slot:
            model.bank.load_task_state(task.index, self._initial_slot)

    def task_parameter_count(self, model: nn.Module, task: TaskInfo) -> int:
        """Parameters stored for one task: its depth-wise LoRA at every site plus its head."""
        return model.bank.parameter_count(task.index) + count(model.heads.parameters_for(task.index))


def _load_pretrained(folder: str, current: nn.Module) -> nn.Module:
    """A saved recursive backbone in place of the configured one (same architecture and width required)."""
    loaded = load_recursive(folder)
    if type(loaded) is not type(current) or loaded.config.hidden_size != current.config.hidden_size:
        raise ValueError(
            f"strategy.pretrained={folder!r} holds a {type(loaded).__name__} of width {loaded.config.hidden_size}, but "
            f"the configured backbone is a {type(current).__name__} of width {current.config.hidden_size}; set "
            "backbone.name to the model the recursive one was converted from"
        )
    if getattr(loaded, "pooler", None) is not None:
        loaded.pooler = None  # as load_backbone does: our heads pool themselves
    return loaded.to(next(current.parameters()).device)


def _svd_slots(bank: ModuleBank, originals: Dict[str, torch.Tensor], rank: int, alpha: float) -> Dict[str, torch.Tensor]:
    """Per site, LoRA factors whose update ``(alpha / r) B A`` is the rank-``r`` SVD of ``W_original - W_effective``."""
    scale = alpha / rank
    state: Dict[str, torch.Tensor] = {}
    for name, site in bank.sites().items():
        base = site.base
        effective = base.effective_weight() if isinstance(base, RelaxedLinear) else base.weight
        A, B = svd_lora_factors(originals[name] - effective.detach(), min(rank, *effective.shape))
        full_A = torch.zeros(rank, effective.shape[1])
        full_B = torch.zeros(effective.shape[0], rank)
        full_A[: A.shape[0]], full_B[:, : B.shape[1]] = A, B / scale
        state[f"{name}.lora_A"], state[f"{name}.lora_B"] = full_A, full_B
    return state
