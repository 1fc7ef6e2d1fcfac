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

``keys``: one key per task matched by cosine similarity against the input's feature (L2P / MoCL key-query
matching). ``entropy``: every candidate task's modules and head run (batched), the most confident one wins.

Routers are registered by name with their typed options (:func:`register_router`; third-party routers through
the ``continual.routers`` entry-point group, each entry a :class:`RouterSpec`).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Protocol, Tuple, runtime_checkable

import torch

from continual.config import RouterConfig


@runtime_checkable
class InferringRouter(Protocol):
    """Scores over task slots from the input alone.

    A feature router implements ``scores(features [B, F]) -> [B, K]``; a router that reads the candidate tasks'
    own predictions sets ``reads_candidates = True`` and implements ``scores_from_logits(logits [K, B, C]) ->
    [B, K]``. Scores are over the fitted tasks in increasing task order; higher is more likely.
    """

    name: str
    tasks: Dict[int, object]  # the fitted tasks (task index -> what is kept for it)

    def fit_task(self, task: int, features: torch.Tensor, labels: torch.Tensor) -> None:
        """Learn task ``task``'s statistics from its training features ``[N, F]`` and labels ``[N]``; once per task."""

    def stored_bytes(self, task: int) -> int:
        """Bytes kept for task ``task`` (a share of anything shared across tasks is counted at the first task)."""

    def state_dict(self) -> Dict[str, torch.Tensor]:
        """Everything fitted so far, as named tensors (saved with a run's state, so a run can resume and reload)."""

    def load_state_dict(self, state: Dict[str, torch.Tensor]) -> None:
        """Inverse of :meth:`state_dict`, on a router built with the same options."""


def _check_new_task(router, task: int, features: torch.Tensor) -> None:
    if task in router.tasks:
        raise ValueError(f"router {router.name}: task {task} was already fitted; a task's statistics are frozen after it")
    if features.shape[0] == 0:
        raise ValueError(f"router {router.name}: task {task} has no training samples to fit its statistics from")


def _nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


@dataclass
class PrototypeRouter:
    """Mahalanobis distance to every task's class means under one shared, shrunk covariance.

    Per task: the class means ``[C, F]`` and counts. Shared: the pooled within-class scatter ``[F, F]`` (each task
    adds its own data's share once, at its fit) and the pooled degrees of freedom.

    Args:
        shrinkage: weight of the scaled identity in the covariance, ``(1 - s) S + s (tr S / F) I``, in [0, 1].
    """

    shrinkage: float = 0.1
    name: str = "prototype"
    reads_candidates: bool = False
    tasks: Dict[int, Tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # task -> (means, counts)

    def __post_init__(self):
        if not 0.0 <= self.shrinkage <= 1.0:
            raise ValueError(f"router.shrinkage must be in [0, 1], got {self.shrinkage}")
        self.scatter: Optional[torch.Tensor] = None  # [F, F] float64
        self.dof = 0.0  # samples minus classes, over every task
        self._precision: Optional[torch.Tensor] = None

    def fit_task(self, task: int, features: torch.Tensor, labels: torch.Tensor) -> None:
        _check_new_task(self, task, features)
        x = features.detach().double().cpu()
        labels = labels.cpu()
        classes = torch.unique(labels)
        means = torch.stack([x[labels == c].mean(0) for c in classes])
        counts = torch.stack([(labels == c).sum() for c in classes]).double()
        centred = x - means[torch.searchsorted(classes, labels)]
        share = centred.T @ centred
        self.scatter = share if self.scatter is None else self.scatter + share
        self.dof += float(x.shape[0] - classes.numel())
        self.tasks[task] = (means.float(), counts)
        self._precision = None

    def _shared_precision(self) -> torch.Tensor:
        if self._precision is None:
            cov = self.scatter / max(self.dof, 1.0)
            f = cov.shape[0]
            cov = (1 - self.shrinkage) * cov + self.shrinkage * (torch.trace(cov) / f) * torch.eye(f, dtype=cov.dtype)
            self._precision = torch.linalg.pinv(cov, hermitian=True).float()
        return self._precision

    def scores(self, features: torch.Tensor) -> torch.Tensor:
        if not self.tasks:
            raise RuntimeError(f"router {self.name}: no task fitted yet")
        precision = self._shared_precision().to(features.device)
        x = features.float()
        out: List[torch.Tensor] = []
        for task in sorted(self.tasks):
            diff = x[:, None, :] - self.tasks[task][0].to(x.device)[None]  # [B, C, F]
            distance = torch.einsum("bcf,fg,bcg->bc", diff, precision, diff)  # [B, C]
            out.append(-distance.min(1).values)
        return torch.stack(out, 1)

    def stored_bytes(self, task: int) -> int:
        shared = _nbytes(self.scatter) if task == min(self.tasks) else 0
        return _nbytes(*self.tasks[task]) + shared

    def state_dict(self) -> Dict[str, torch.Tensor]:
        state = {"tasks": torch.tensor(sorted(self.tasks), dtype=torch.long), "dof": torch.tensor(self.dof)}
        if self.scatter is not None:
            state["scatter"] = self.scatter
        for task, (means, counts) in self.tasks.items():
            state[f"{task}.means"], state[f"{task}.counts"] = means, counts
        return state

    def load_state_dict(self, state: Dict[str, torch.Tensor]) -> None:
        self.tasks = {int(t): (state[f"{int(t)}.means"].clone(), state[f"{int(t)}.counts"].clone())
                      for t in state["tasks"].tolist()}
        self.scatter = state["scatter"].clone() if "scatter" in state else None
        self.dof, self._precision = float(state["dof"]), None


@dataclass
class KeysRouter:
    """One key vector per task matched against the input's query feature by cosine similarity (L2P, Wang et al.
    2022; MoCL, Wang et al. 2024).

    The key of task ``j`` minimises the key-matching loss ``mean_x (1 - cos(q(x), k_j))`` over task ``j``'s
    training queries; its minimiser is the direction of their mean, which is what ``fit_task`` stores (computed in
    closed form rather than by gradient steps).
    """

    name: str = "keys"
    reads_candidates: bool = False
    tasks: Dict[int, torch.Tensor] = field(default_factory=dict)  # task -> key [F]

    def fit_task(self, task: int, features: torch.Tensor, labels: torch.Tensor) -> None:
        _check_new_task(self, task, features)
        q = torch.nn.functional.normalize(features.detach().float().cpu(), dim=-1)
        self.tasks[task] = torch.nn.functional.normalize(q.mean(0), dim=0)

    def scores(self, features: torch.Tensor) -> torch.Tensor:
        if not self.tasks:
            raise RuntimeError(f"router {self.name}: no task fitted yet")
        keys = torch.stack([self.tasks[t] for t in sorted(self.tasks)]).to(features.device)  # [K, F]
        return torch.nn.functional.normalize(features.float(), dim=-1) @ keys.T

    def stored_bytes(self, task: int) -> int:
        return _nbytes(self.tasks[task])

    def state_dict(self) -> Dict[str, torch.Tensor]:
        return {"tasks": torch.tensor(sorted(self.tasks), dtype=torch.long),
                **{f"{task}.key": key for task, key in self.tasks.items()}}

    def load_state_dict(self, state: Dict[str, torch.Tensor]) -> None:
        self.tasks = {int(t): state[f"{int(t)}.key"].clone() for t in state["tasks"].tolist()}


@dataclass
class EntropyRouter:
    """Run every candidate task's modules and head and pick the most confident: the lowest predictive entropy.

    Stores nothing per task. Costs one forward of ``B x K`` samples for ``K`` candidate tasks (batched through the
    module bank), against one for the oracle route.
    """

    name: str = "entropy"
    reads_candidates: bool = True
    tasks: Dict[int, None] = field(default_factory=dict)

    def fit_task(self, task: int, features: torch.Tensor, labels: torch.Tensor) -> None:
        if task in self.tasks:
            raise ValueError(f"router {self.name}: task {task} was already fitted")
        self.tasks[task] = None

    def scores_from_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """``[K, B, C]`` candidate logits (``-inf`` on a head's padding) -> ``[B, K]`` minus the entropy."""
        logp = torch.log_softmax(logits.float(), -1)
        entropy = -(logp.exp() * logp.nan_to_num(neginf=0.0)).sum(-1)  # [K, B]
        return -entropy.T

    def stored_bytes(self, task: int) -> int:
        return 0

    def state_dict(self) -> Dict[str, torch.Tensor]:
        return {"tasks": torch.tensor(sorted(self.tasks), dtype=torch.long)}

    def load_state_dict(self, state: Dict[str, torch.Tensor]) -> None:
        self.tasks = {int(t): None for t in state["tasks"].tolist()}


# ---------------------------------------------------------------------------------------------------- configs
@dataclass
class InferringRouterConfig(RouterConfig):
    # 1: each sample uses its top task's modules and head. k > 1 (soft mode, for simultaneous composition): the
    # top-k tasks' modules act together with weights softmax(score / temperature) renormalised over the k, and the
    # answer mixes those tasks' heads' probabilities with the same weights.
    top_k: int = 1
    temperature: float = 1.0


@dataclass
class FeatureRouterConfig(InferringRouterConfig):
    # Hidden states the router reads, mean-pooled over tokens and concatenated: indices into the backbone's
    # hidden_states (0 = embeddings, -1 = last layer). Empty: up to three evenly spaced layers ending at the last
    # (MiniLM: 2, 4, 6), which identify tasks far better than the last layer alone.
    layers: List[int] = field(default_factory=list)


@dataclass
class PrototypeConfig(FeatureRouterConfig):
    name: str = "prototype"
    # Weight of the scaled identity in the shared covariance, in [0, 1].
    shrinkage: float = 0.1


@dataclass
class KeysConfig(FeatureRouterConfig):
    name: str = "keys"


@dataclass
class EntropyConfig(InferringRouterConfig):
    name: str = "entropy"


def default_layers(n_hidden_states: int, count: int = 3) -> List[int]:
    """Up to ``count`` evenly spaced hidden-state indices ending at the last layer (index 0, the embeddings, never)."""
    layers = n_hidden_states - 1
    step = max(layers // count, 1)
    return sorted({layers - i * step for i in range(count) if layers - i * step >= 1})


# ---------------------------------------------------------------------------------------------------- registry
@dataclass
class RouterSpec:
    """A registered router: its factory and the typed config of its options (a ``continual.config.RouterConfig``)."""

    factory: Callable[..., InferringRouter]
    config: type
    needs_features: bool = True  # whether fit_task reads routing features (False: entropy)


ROUTERS: Dict[str, RouterSpec] = {}
_BROKEN: Dict[str, str] = {}  # entry-point name -> why it could not be registered (warned once, then skipped)
_LOADED_ENTRY_POINTS = False


def register_router(name: str, factory: Callable[..., InferringRouter], config: type, needs_features: bool = True) -> None:
    """Register a router under ``name`` (``router.name=<name>``); ``config`` is its options' dataclass."""
    if name in ROUTERS and ROUTERS[name].factory is not factory:
        raise ValueError(f"a router named {name!r} is already registered")
    ROUTERS[name] = RouterSpec(factory, config, needs_features)


def _load_entry_points() -> None:
    from importlib.metadata import entry_points

    global _LOADED_ENTRY_POINTS
    if _LOADED_ENTRY_POINTS:
        return
    _LOADED_ENTRY_POINTS = True
    for point in entry_points(group="continual.routers"):
        if point.name in ROUTERS:
            continue
        # A broken plugin must not take the other routers down with it: warn once, skip it, and say why when the
        # router is asked for by name.
        try:
            spec = point.load()  # a RouterSpec
            register_router(point.name, spec.factory, spec.config, spec.needs_features)
        except Exception as err:
            _BROKEN[point.name] = f"router entry point {point.name!r} ({point.value}) failed to import: {type(err).__name__}: {err}"
            warnings.warn(f"{_BROKEN[point.name]}; skipped it", RuntimeWarning, stacklevel=2)


def router_names() -> List[str]:
    _load_entry_points()
    return ["oracle"] + sorted(ROUTERS)


def router_spec(name: str) -> RouterSpec:
    """The registered router ``name``; KeyError listing the registered ones (``oracle`` is the given task id)."""
    if name not in ROUTERS:
        _load_entry_points()
    if name not in ROUTERS:
        if name in _BROKEN:
            raise KeyError(_BROKEN[name])
        raise KeyError(f"unknown router {name!r}; registered: {', '.join(router_names())}")
    return ROUTERS[name]


def build_router(name: str, **options) -> InferringRouter:
    """A registered router by name with its options; ValueError listing the registered ones."""
    try:
        spec = router_spec(name)
    except KeyError as err:
        raise ValueError(f"router.name: {err.args[0]}") from None
    return spec.factory(**options)


# Options the classifier applies (which features, how many tasks mix), not arguments of a router's factory.
MODEL_SIDE_OPTIONS = ("name", "layers", "top_k", "temperature")


def mixing_weights(scores: torch.Tensor, top_k: int, temperature: float) -> torch.Tensor:
    """``[B, K]`` scores -> ``[B, K]`` weights: softmax(score / temperature) over each sample's top ``k`` tasks
    (renormalised), 0 elsewhere."""
    k = min(top_k, scores.shape[1])
    top = scores.topk(k, dim=1)
    weights = torch.softmax(top.values / temperature, dim=1)
    return torch.zeros_like(scores, dtype=weights.dtype).scatter(1, top.indices, weights)


def router_options(cfg) -> dict:
    """A router config node -> the keyword arguments of its factory (see ``MODEL_SIDE_OPTIONS``)."""
    from omegaconf import OmegaConf

    options = OmegaConf.to_container(cfg, resolve=True) if not isinstance(cfg, dict) else dict(cfg)
    return {k: v for k, v in options.items() if k not in MODEL_SIDE_OPTIONS}


register_router("prototype", PrototypeRouter, PrototypeConfig)
register_router("keys", KeysRouter, KeysConfig)
register_router("entropy", EntropyRouter, EntropyConfig, needs_features=False)
