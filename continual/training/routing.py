"""Task inference in a classification run: attach a router, fit it on each task's own training data after the
task, and read what it did during evaluation (routing-accuracy rows and the confusion between tasks).

The router math lives in :mod:`continual.modules.routers`; the classifier runs it
(:meth:`continual.models.classifier.ContinualClassifier.infer_tasks`). ``router.name=oracle`` attaches nothing.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from torch import nn

from continual.config import ConfigError
from continual.modules.routers import build_router, default_layers, router_options, router_spec


def make_router(cfg):
    """The router ``cfg`` names, built from its options (checked before anything heavy is loaded); None for the
    oracle.

    Raises:
        ConfigError: an invalid router option, naming it.
    """
    if cfg.name == "oracle":
        return None
    try:
        return build_router(cfg.name, **router_options(cfg))
    except (TypeError, ValueError) as err:
        message = str(err)
        raise ConfigError(message if message.startswith("router") else f"router: {message}") from err


def attach_router(model: nn.Module, router, cfg, strategy_name: str):
    """Attach ``router`` (from :func:`make_router`) to ``model``; returns it (None for the oracle).

    Raises:
        ConfigError: the strategy keeps no per-task modules (nothing to route between), the model's head is shared
            (a routed sample is answered by its routed task's own head), ``router.layers`` is out of range, or soft
            routing (``top_k > 1``) is asked of label words.
    """
    if router is None:
        return None
    if getattr(model, "bank", None) is None or not hasattr(model, "infer_tasks"):
        raise ConfigError(
            f"router.name={cfg.name}: strategy {strategy_name!r} keeps no per-task modules, so there is nothing to "
            "route between; use a strategy with a module bank (delta, experts, recursive) or router.name=oracle"
        )
    if model.heads.mode not in ("task", "label_words"):
        raise ConfigError(
            f"router.name={cfg.name} needs backbone.head=task or label_words: a routed sample is answered by the task "
            "it is routed to (its own head, frozen after its task, or label words, which no task trains), so a new "
            "task cannot overwrite earlier ones"
        )
    n_states = int(model.backbone.config.num_hidden_layers) + 1
    layers = list(getattr(cfg, "layers", None) or default_layers(n_states))
    bad = [i for i in layers if not -n_states <= i < n_states]
    if bad:
        raise ConfigError(f"router.layers: {bad} out of range for a backbone with {n_states} hidden states")
    top_k, temperature = int(getattr(cfg, "top_k", 1)), float(getattr(cfg, "temperature", 1.0))
    if top_k < 1:
        raise ConfigError(f"router.top_k: must be >= 1, got {top_k}")
    if temperature <= 0:
        raise ConfigError(f"router.temperature: must be > 0, got {temperature}")
    if top_k > 1 and model.heads.mode == "label_words":
        raise ConfigError("router.top_k: label words answer with one routed task's modules; use router.top_k=1")
    model.task_router, model.router_layers = router, [i % n_states for i in layers]
    model.router_top_k, model.router_temperature = top_k, temperature
    return router


@torch.no_grad()
def fit_router(model: nn.Module, task_index: int, task_name: str, dataset, batch_size: int,
               device: torch.device, parallel=None) -> int:
    """Fit the model's router on one task's training data (its frozen statistics); returns the bytes it keeps.

    With ``parallel`` (a ``continual.training.distributed.DataParallel``), process r computes the features of batches
    r, r + N, ... and every process fits on all of them, gathered in order: the same statistics as one process.

    Raises:
        ValueError: the task has no training samples and the router needs them.
    """
    router = model.task_router
    if not router_spec(router.name).needs_features:
        router.fit_task(task_index, torch.zeros(0, 0), torch.zeros(0, dtype=torch.long))
        return router.stored_bytes(task_index)
    if len(dataset) == 0:
        raise ValueError(f"router {router.name}: task {task_name!r} has no training samples to fit its statistics")
    was_training = model.training
    model.eval()
    features, labels, batches = [], [], []
    # An own generator: iterating a DataLoader draws a seed from the global RNG, which would change the shuffling of
    # every later task, so a routed run would not train exactly as the same run with router.name=oracle.
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False,
                                         generator=torch.Generator().manual_seed(0))
    rank, world_size = (parallel.rank, parallel.world_size) if parallel is not None else (0, 1)
    for i, batch in enumerate(loader):
        if i % world_size == rank:
            features.append(model.routing_features(batch[0].to(device)).cpu())
            labels.append(torch.as_tensor(batch[1]))
            batches.append(i)
    model.train(was_training)
    if world_size > 1:
        shares = sorted((share for part in parallel.gather_objects(list(zip(batches, features, labels)))
                         for share in part), key=lambda share: share[0])
        features, labels = [f for _, f, _ in shares], [y for _, _, y in shares]
    router.fit_task(task_index, torch.cat(features), torch.cat(labels))
    return router.stored_bytes(task_index)


def take_routing_counts(model: nn.Module, n_tasks: int, parallel=None) -> Optional[np.ndarray]:
    """``[T, T]`` counts of test samples of true task i routed to task j since the last call (the log is emptied);
    None when nothing was routed. With ``parallel``, summed over the processes (each logged its share)."""
    log = getattr(model, "routing_log", None)
    counts = np.zeros((n_tasks, n_tasks))
    for gold, routed in log or []:
        np.add.at(counts, (gold.numpy(), routed.numpy()), 1)
    if log:
        log.clear()
    if parallel is not None and parallel.active:
        counts = parallel.sum(counts.reshape(-1)).reshape(n_tasks, n_tasks)
    return counts if counts.sum() else None
