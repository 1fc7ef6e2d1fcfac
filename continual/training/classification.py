"""The parts of a classification run, built from its config, and rebuilt from a run folder's state.

``continual run`` builds them once and trains; ``continual resume``, ``continual eval``, ``continual predict`` and
:func:`continual.load_run` rebuild the same model from the run's ``config.yaml`` and its state (see
:mod:`continual.training.run_state`): the model is built exactly as the run built it, each finished task's modules
are allocated and frozen again in order (no training), and then the saved tensors, the strategy's and router's state
are loaded over it.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional

import torch
from omegaconf import DictConfig
from torch import nn

from continual.config import ConfigError


@dataclass
class ClassificationParts:
    """Everything a classification run is made of, before any task is trained."""

    cfg: DictConfig
    device: torch.device
    strategy: Any
    router: Any  # a task-inferring router, or None (the task id routes: oracle)
    tokenizer: Any
    stream: Any  # streams.build.Stream
    tasks: list  # TaskInfo per task
    model: nn.Module
    train_exps: list = field(default_factory=list)
    test_exps: list = field(default_factory=list)
    baseline: dict = field(default_factory=dict)  # fingerprints of the freshly built model (run_state)
    precision: str = "fp32"  # the arithmetic the model runs in ("auto" resolved for this device and model)


@contextmanager
def as_config_error():
    """A ValueError raised while building the model from the config becomes a ConfigError (printed by the CLI
    without a traceback); its message already names the config key."""
    try:
        yield
    except ConfigError:
        raise
    except ValueError as err:
        raise ConfigError(str(err)) from err


def build_parts(cfg: DictConfig, device: Optional[torch.device] = None) -> ClassificationParts:
    """Seed, build the strategy and router (options checked first), load the backbone, build the stream and the model,
    and set the strategy and router up on it (on ``device``; default: the one ``training.device`` names)."""
    from continual.models.backbone import load_backbone, load_causal_lm
    from continual.models.backbone import load_config as load_backbone_config
    from continual.models.classifier import ContinualClassifier
    from continual.models.label_word_classifier import build_label_word_classifier, check_causal_lm
    from continual.training.environment import PRECISION_DTYPES, resolve_device, resolve_precision, seed_everything
    from continual.training.routing import attach_router, make_router
    from continual.training.run_state import parameter_fingerprints
    from streams.avalanche import to_avalanche_benchmark
    from streams.build import build_stream
    from strategies.registry import build_strategy

    seed_everything(cfg.seed)
    device = device if device is not None else resolve_device(cfg.training.device)
    strategy = build_strategy(cfg.strategy)  # fail on bad strategy options before loading anything heavy
    router = make_router(cfg.router)  # the same for the router's options
    # A strategy may ask for a causal LM and build its own model (TinT); label words score with a causal LM's head;
    # the default is an encoder classifier.
    label_words = cfg.backbone.head == "label_words"
    if label_words:  # an encoder named by mistake fails here, before its weights are read
        _, backbone_config = load_backbone_config(
            cfg.backbone.name, dict(cfg.backbone.config_overrides), cfg.backbone.trust_remote_code
        )
        with as_config_error():
            check_causal_lm(backbone_config, cfg.backbone.name)
    causal = label_words or getattr(strategy, "backbone_kind", "encoder") == "causal_lm"
    load = load_causal_lm if causal else load_backbone
    backbone, tokenizer = load(
        cfg.backbone.name,
        random_init=cfg.backbone.random_init,
        config_overrides=dict(cfg.backbone.config_overrides),
        trust_remote_code=cfg.backbone.trust_remote_code,
    )
    stream = build_stream(cfg.stream, tokenizer, progress=cfg.training.progress)
    tasks = stream.task_infos
    build_model = getattr(strategy, "build_model", None)
    model = build_model(backbone, tokenizer, stream, cfg.backbone) if build_model is not None else None
    if model is None and label_words:
        with as_config_error():  # unusable label words or templates: the message names the key
            model = build_label_word_classifier(
                backbone, tokenizer, [t.name for t in tasks], [t.labels for t in tasks], name=cfg.backbone.name,
                label_space=cfg.backbone.label_space, label_loss=cfg.backbone.label_loss,
                template=cfg.backbone.template,
                task_templates=dict(cfg.backbone.task_templates),
                label_words={task: dict(words) for task, words in cfg.backbone.label_words.items()},
            )
    if model is None:
        model = ContinualClassifier(backbone, [t.labels for t in tasks], head=cfg.backbone.head, pooling=cfg.backbone.pooling)
    precision = resolve_precision(cfg.training.precision, device)
    if precision != "fp32" and not hasattr(model, "compute_dtype"):  # a model that cannot autocast (TinT)
        if cfg.training.precision != "auto":
            raise ConfigError(f"training.precision: {precision!r} is not supported by strategy "
                              f"{cfg.strategy.name!r} (its model runs in float32 only); use training.precision=fp32")
        precision = "fp32"
    if hasattr(model, "compute_dtype"):
        model.compute_dtype = PRECISION_DTYPES[precision]
    baseline = parameter_fingerprints(model)  # before the strategy touches it: setup is replayed on a rebuild
    strategy.setup(model, tasks)
    router = attach_router(model, router, cfg.router, cfg.strategy.name)  # None: the task id routes (oracle)
    benchmark = to_avalanche_benchmark(stream, model.heads.target_index)
    return ClassificationParts(
        cfg=cfg, device=device, strategy=strategy, router=router, tokenizer=tokenizer, stream=stream, tasks=tasks,
        model=model, train_exps=list(benchmark.train_stream), test_exps=list(benchmark.test_stream), baseline=baseline,
        precision=precision,
    )


def make_learner(parts: ClassificationParts, parallel=None):
    """The Avalanche learner over the parts, with the run's training options; with ``parallel`` (a
    :class:`continual.training.distributed.DataParallel` of several processes), data-parallel.

    Raises:
        ConfigError: the run cannot train data-parallel
            (see :func:`continual.training.distributed.check_data_parallel`).
    """
    from continual.learner import ContinualLearner
    from continual.training.distributed import check_data_parallel

    cfg = parts.cfg
    learner = ContinualLearner(
        model=parts.model,
        strategy=parts.strategy,
        tasks=parts.tasks,
        lr=cfg.training.lr,
        weight_decay=cfg.training.weight_decay,
        optimizer=cfg.training.optimizer,
        max_grad_norm=cfg.training.max_grad_norm,
        train_mb_size=cfg.training.batch_size,
        train_epochs=cfg.training.epochs,
        eval_mb_size=cfg.training.eval_batch_size,
        device=parts.device,
        progress=cfg.training.progress and (parallel is None or parallel.is_main),
        parallel=parallel,
        seed=cfg.seed,
    )
    if parallel is not None:
        check_data_parallel(parallel, cfg.training.batch_size, cfg.strategy.name, learner.strategy_plugins)
    return learner


def state_tensors(parts: ClassificationParts, learner=None) -> tuple:
    """(tensor groups, JSON) of what the run state keeps besides results: the model tensors that differ from a fresh
    build, the strategy's and router's state, the Avalanche plugins' state and the RNGs.

    A plugin or router whose state cannot be saved leaves the state usable for ``eval`` and ``predict`` but marked
    not resumable, with the reason."""
    from continual.training.run_state import RunStateError, changed_tensors, plugin_state, rng_state

    model = parts.model
    trained = set(getattr(learner, "trained_names", ()) or ())
    groups = {"model": changed_tensors(model, parts.baseline, trained)}
    data: dict = {"model_keys": sorted(groups["model"]), "backbone": parts.cfg.backbone.name}
    own = getattr(parts.strategy, "state_dict", None)
    if callable(own):
        groups["strategy"] = dict(own())
    if parts.router is not None:
        saver = getattr(parts.router, "state_dict", None)
        if callable(saver):
            groups["router"] = dict(saver())
        else:
            data["not_resumable"] = f"router {parts.router.name!r} has no state_dict; its statistics cannot be saved"
    if learner is not None:
        try:
            groups["plugins"], data["plugins"] = plugin_state(learner.strategy_plugins)
        except RunStateError as err:
            data["not_resumable"] = str(err)
        groups["rng"], data["rng"] = rng_state(parts.device)
        data["learner"] = {"train_exp_counter": int(learner.clock.train_exp_counter),
                           "train_iterations": int(learner.clock.train_iterations),
                           "total_iterations": int(learner.clock.total_iterations)}
    return groups, data


def restore(parts: ClassificationParts, state, learner=None) -> None:
    """Rebuild a run's model (and learner) as it was after ``state.finished`` tasks.

    The strategy's state is loaded first (it may say how to rebuild, e.g. experts pruned after a task), each
    finished task's modules are allocated and frozen again in order, then the saved tensors are loaded over them,
    the router's statistics restored and, with a learner, the plugins' state, Avalanche's clock and the RNGs.

    Raises:
        RunStateError: the state does not fit the model built from the config.
    """
    from continual.training.run_state import RunStateError, load_model_tensors, load_plugin_state, set_rng_state
    from streams.avalanche import dataset_from_tensors

    model, strategy = parts.model, parts.strategy
    finished = min(state.finished, len(parts.tasks))
    if "strategy" in state.tensors:
        loader = getattr(strategy, "load_state_dict", None)
        if not callable(loader):
            raise RunStateError(f"the state has strategy tensors but strategy {parts.cfg.strategy.name!r} cannot load them")
        loader(state.tensors["strategy"])
    done = parts.tasks if strategy.trains_jointly and finished else parts.tasks[:finished]
    for task in done:  # the structure the run had: each task's modules allocated, activated and frozen
        strategy.before_task(model, task)
        model.heads.activate(task.index)
        strategy.after_task(model, task)
    model.to(parts.device)
    load_model_tensors(model, state.tensors.get("model", {}), parts.cfg.backbone.name)
    if hasattr(model, "known_train_tasks_labels"):  # Avalanche's record of the tasks trained (LwF reads it)
        model.known_train_tasks_labels = set(t.index for t in done)
    if parts.router is not None:
        saved = state.tensors.get("router")
        loader = getattr(parts.router, "load_state_dict", None)
        if saved is None or not callable(loader):
            raise RunStateError(f"the state keeps no statistics for router {parts.router.name!r}")
        loader(saved)
    if learner is None:
        return
    if state.data.get("not_resumable"):
        raise RunStateError(f"this run cannot be resumed: {state.data['not_resumable']}")
    learner.trained_names = set(state.data.get("model_keys", []))
    load_plugin_state(learner.strategy_plugins, state.tensors.get("plugins", {}), state.data.get("plugins", {}),
                      model, dataset_from_tensors)
    clock = learner.clock
    for key, value in state.data.get("learner", {}).items():
        setattr(clock, key, value)
    set_rng_state(state.tensors["rng"], state.data["rng"])


def task_subset(experience, task):
    """The samples of ``task`` in a joint experience (its task label), for fitting a router after joint training."""
    dataset = experience.dataset
    keep = [i for i, t in enumerate(dataset.targets_task_labels) if int(t) == task.index]
    return dataset.subset(keep)

