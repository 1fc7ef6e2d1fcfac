"""Routers that infer an input's task: statistics of frozen features per task, frozen once the task is learned.

The module bank routes by a task id (:class:`continual.modules.bank.TaskIdRouter`, the ``oracle``). An *inferring*
router gives each sample scores over the task slots from the input alone. What it keeps for task ``j`` comes from
task ``j``'s training data only and is frozen after task ``j`` (``fit_task`` once per task); its bytes count in the
task's stored bytes.

``prototype``: class-conditional Gaussians over frozen backbone features with one shared covariance (linear
discriminant analysis): per task, the class means and counts, and the task's within-class scatter; the shared
covariance is the pooled scatter of every task so far (each task's share from its own data), shrunk towards a
scaled identity. A sample's score for task ``j`` is minus its smallest Mahalanobis distance to task ``j``'s class
means. Task prediction by Mahalanobis distance to class statistics follows EPI (Wang et al. 2023, "Rehearsal-free
Continual Language Learning via Efficient Parameter Isolation") and KLDA-style task prediction.

Routers are registered by name (:func:`register_router`; third-party routers through the
``continual.routers`` entry-point group).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Protocol, runtime_checkable

import torch


@runtime_checkable
class InferringRouter(Protocol):
    """Scores over task slots from features of the input alone."""

    name: str

    def fit_task(self, task: int, features: torch.Tensor, labels: torch.Tensor) -> None:
        """Learn task ``task``'s statistics from its training features ``[N, H]`` and labels ``[N]``; once per task."""

    def scores(self, features: torch.Tensor) -> torch.Tensor:
        """``[B, H]`` -> ``[B, K]`` scores over the tasks fitted so far (higher is more likely), in task order."""

    def stored_bytes(self, task: int) -> int:
        """Bytes kept for task ``task``."""


@dataclass
class _TaskStats:
    means: torch.Tensor  # [C, H]
    counts: torch.Tensor  # [C]
    scatter: torch.Tensor  # [H, H] within-class scatter of the task's training features


@dataclass
class PrototypeRouter:
    """Mahalanobis distance to per-task class means under one shared, shrunk covariance.

    Args:
        shrinkage: weight of the scaled identity in the covariance, ``(1 - s) S + s (tr S / H) I``, in [0, 1].
    """

    shrinkage: float = 0.1
    name: str = "prototype"
    tasks: Dict[int, _TaskStats] = field(default_factory=dict)

    def __post_init__(self):
        if not 0.0 <= self.shrinkage <= 1.0:
            raise ValueError(f"router.shrinkage must be in [0, 1], got {self.shrinkage}")
        self._precision = None

    def fit_task(self, task: int, features: torch.Tensor, labels: torch.Tensor) -> None:
        if task in self.tasks:
            raise ValueError(f"router: task {task} was already fitted; a task's statistics are frozen after it")
        if features.shape[0] == 0:
            raise ValueError(f"router: task {task} has no training samples to fit its statistics from")
        x = features.detach().double()
        classes = torch.unique(labels)
        means = torch.stack([x[labels == c].mean(0) for c in classes])
        counts = torch.stack([(labels == c).sum() for c in classes]).double()
        centred = x - means[torch.searchsorted(classes, labels)]
        self.tasks[task] = _TaskStats(means.float(), counts, centred.T @ centred)
        self._precision = None

    def _shared_precision(self) -> torch.Tensor:
        if self._precision is None:
            scatter = sum(stats.scatter for stats in self.tasks.values())
            n = sum(float(stats.counts.sum()) for stats in self.tasks.values())
            c = sum(stats.counts.numel() for stats in self.tasks.values())
            cov = scatter / max(n - c, 1.0)
            h = cov.shape[0]
            cov = (1 - self.shrinkage) * cov + self.shrinkage * (torch.trace(cov) / h) * torch.eye(h, dtype=cov.dtype)
            self._precision = torch.linalg.pinv(cov, hermitian=True).float()
        return self._precision

    def scores(self, features: torch.Tensor) -> torch.Tensor:
        if not self.tasks:
            raise RuntimeError("router: no task fitted yet")
        precision = self._shared_precision().to(features.device)
        x = features.float()
        out: List[torch.Tensor] = []
        for task in sorted(self.tasks):
            diff = x[:, None, :] - self.tasks[task].means.to(x.device)[None]  # [B, C, H]
            distance = torch.einsum("bch,hk,bck->bc", diff, precision, diff)  # [B, C]
            out.append(-distance.min(1).values)
        return torch.stack(out, 1)

    def stored_bytes(self, task: int) -> int:
        stats = self.tasks[task]
        return sum(t.numel() * t.element_size() for t in (stats.means, stats.counts, stats.scatter))


ROUTERS: Dict[str, Callable[..., InferringRouter]] = {}


def register_router(name: str, factory: Callable[..., InferringRouter]) -> None:
    if name in ROUTERS and ROUTERS[name] is not factory:
        raise ValueError(f"a router named {name!r} is already registered")
    ROUTERS[name] = factory


def build_router(name: str, **options) -> InferringRouter:
    """A registered router by name; ValueError listing the registered ones (``oracle`` is the task id itself)."""
    if name not in ROUTERS:
        raise ValueError(f"router.name: unknown router {name!r}; registered: {', '.join(['oracle'] + sorted(ROUTERS))}")
    return ROUTERS[name](**options)


register_router("prototype", PrototypeRouter)
