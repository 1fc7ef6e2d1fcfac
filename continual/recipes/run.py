"""The classification recipe: setup -> (expand, train, freeze, evaluate, log) per task -> report.

A stream of classification tasks is learnt one after the other (or jointly) by the learner and an expansion strategy.
Reads top to bottom; everything with side effects (MLflow, files, the terminal) happens here or at the edges it calls.

Run: ``continual run CONFIG.yaml [key=value ...]`` (presets in ``configs/``).
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Sequence

import numpy as np
from omegaconf import DictConfig

from continual.config import ConfigError, flatten, to_yaml
from continual.results import RunResult, TaskRecord
from continual.training.experiment import load_run_config


# The run's config loader lives in the training kit (the compare recipe loads run configs too); kept here by name.
load_config = load_run_config


def default_names(cfg: DictConfig) -> tuple[str, str]:
    """(experiment, run name) from the stream, order, strategy, backbone and seed."""
    stream = cfg.stream.name if cfg.stream.name != "custom" or not cfg.stream.tasks else "custom"
    order = f"-order{cfg.stream.order}" if cfg.stream.order is not None and not cfg.stream.tasks else ""
    experiment = cfg.tracking.experiment or f"{stream}{order}"
    backbone = Path(cfg.backbone.name).name if Path(cfg.backbone.name).exists() else cfg.backbone.name
    run_name = cfg.tracking.run_name or f"{cfg.strategy.name}-{backbone.replace('/', '_')}-{cfg.backbone.head}head-seed{cfg.seed}"
    return experiment, run_name


def run_experiment(cfg: DictConfig, echo: Callable[[str], None] = print) -> RunResult:
    """Run one continual experiment described by a validated config; returns the accuracy matrix and records.

    Raises:
        NonFiniteLossError: after logging everything finished before the loss diverged.
    """
    from continual.checkpoint import save_task_state
    from continual.learner import ContinualLearner
    from continual.metrics import summarize
    from continual.models.backbone import load_backbone, load_causal_lm
    from continual.models.backbone import load_config as load_backbone_config
    from continual.models.classifier import ContinualClassifier
    from continual.models.label_word_classifier import build_label_word_classifier, check_causal_lm
    from continual.report import format_table
    from continual.resources import ResourceMonitor
    from continual.tracking import ExperimentTracker
    from continual.training import artifacts_on_failure, open_run_dir, resolve_device, seed_everything
    from continual.training.routing import attach_router, fit_router, make_router, take_routing_counts
    from streams.avalanche import joint_experience, to_avalanche_benchmark
    from streams.build import build_stream
    from strategies.registry import build_strategy
    from tqdm.auto import tqdm

    # ---------------------------------------------------------------- setup
    seed_everything(cfg.seed)
    device = resolve_device(cfg.training.device)
    strategy = build_strategy(cfg.strategy)  # fail on bad strategy options before loading anything heavy
    router = make_router(cfg.router)  # the same for the router's options
    # A strategy may ask for a causal LM and build its own model (TinT); label words score with a causal LM's head;
    # the default is an encoder classifier.
    label_words = cfg.backbone.head == "label_words"
    if label_words:  # an encoder named by mistake fails here, before its weights are read
        _, backbone_config = load_backbone_config(
            cfg.backbone.name, dict(cfg.backbone.config_overrides), cfg.backbone.trust_remote_code
        )
        with _as_config_error():
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
        with _as_config_error():  # unusable label words or templates: the message names the key
            model = build_label_word_classifier(
                backbone, tokenizer, [t.name for t in tasks], [t.labels for t in tasks], name=cfg.backbone.name,
                label_space=cfg.backbone.label_space, template=cfg.backbone.template,
                task_templates=dict(cfg.backbone.task_templates),
                label_words={task: dict(words) for task, words in cfg.backbone.label_words.items()},
            )
    if model is None:
        model = ContinualClassifier(backbone, [t.labels for t in tasks], head=cfg.backbone.head, pooling=cfg.backbone.pooling)
    strategy.setup(model, tasks)
    router = attach_router(model, router, cfg.router, cfg.strategy.name)  # None: the task id routes (oracle)
    benchmark = to_avalanche_benchmark(stream, model.heads.target_index)
    train_exps, test_exps = list(benchmark.train_stream), list(benchmark.test_stream)
    learner = ContinualLearner(
        model=model,
        strategy=strategy,
        tasks=tasks,
        lr=cfg.training.lr,
        weight_decay=cfg.training.weight_decay,
        optimizer=cfg.training.optimizer,
        max_grad_norm=cfg.training.max_grad_norm,
        train_mb_size=cfg.training.batch_size,
        train_epochs=cfg.training.epochs,
        eval_mb_size=cfg.training.eval_batch_size,
        device=device,
        progress=cfg.training.progress,
    )

    experiment, run_name = default_names(cfg)
    output_dir = open_run_dir(Path(cfg.tracking.output_dir) / experiment, run_name, cfg)
    run_name = output_dir.name  # the MLflow run and its folder share a name, suffixed when an earlier run had it
    names = [t.name for t in tasks]
    T = len(tasks)
    result = RunResult(task_names=names, matrix=np.full((T, T), np.nan), output_dir=output_dir)
    if router is not None:  # a routed run is evaluated both ways: routed (the matrix) and with the task id given
        result.oracle_matrix = np.full((T, T), np.nan)
        result.routing_matrix = np.full((T, T), np.nan)
        result.eval_seconds = {"routed": 0.0, "oracle": 0.0}
    tags = {"stream": stream.name, "strategy": cfg.strategy.name, "backbone": cfg.backbone.name, "seed": str(cfg.seed),
            "router": cfg.router.name}
    if cfg.tracking.parent_run_id:  # a cell of `continual compare`: nested under its parent run
        tags["mlflow.parentRunId"] = cfg.tracking.parent_run_id

    def evaluate_row(row: Optional[int] = None) -> np.ndarray:
        """Accuracy on every task's test set; with a router, also the oracle row and the routing row of ``row``."""
        started = time.perf_counter()
        accs = learner.evaluate(test_exps)
        routed = np.array([accs[j] for j in range(T)])
        counts = take_routing_counts(model, T) if router is not None else None
        if counts is None or row is None:
            return routed
        result.eval_seconds["routed"] += time.perf_counter() - started
        model.route_inferred, started = False, time.perf_counter()
        try:
            accs = learner.evaluate(test_exps)
        finally:
            model.route_inferred = True
        result.eval_seconds["oracle"] += time.perf_counter() - started
        result.oracle_matrix[row] = [accs[j] for j in range(T)]
        routing = np.diag(counts) / np.maximum(counts.sum(1), 1)
        if not strategy.trains_jointly:
            routing[row + 1:] = np.nan  # tasks not learnt yet: nothing can be routed to them
        result.routing_matrix[row] = routing
        result.routing_confusion = counts
        return routed

    def finish(tracker, failed: bool = False) -> dict:
        """Write every artifact of what has been measured so far (also after a failure)."""
        from continual.report import (
            plot_accuracy_matrix, plot_forgetting_curves, plot_routing_confusion, save_matrix_csv, write_summary_json,
        )

        summary = summarize(result)
        tracker.log_metrics({f"final/{k}": v for k, v in summary.items()})
        save_matrix_csv(result, output_dir / "accuracy_matrix.csv")
        write_summary_json(result, summary, output_dir / "summary.json", extra={"failed": failed, "config": flatten(cfg)})
        if not np.isnan(result.matrix).all():
            plot_accuracy_matrix(result, output_dir / "accuracy_matrix.png")
            plot_forgetting_curves(result, output_dir / "forgetting_curves.png")
        if result.routing_matrix is not None and not np.isnan(result.routing_matrix).all():
            oracle = RunResult(task_names=names, matrix=result.oracle_matrix, initial=result.initial)
            save_matrix_csv(oracle, output_dir / "accuracy_matrix_oracle.csv")
            routing = RunResult(task_names=names, matrix=result.routing_matrix)
            save_matrix_csv(routing, output_dir / "routing_matrix.csv")
            plot_accuracy_matrix(routing, output_dir / "routing_matrix.png", title="Routing accuracy (%)")
            plot_routing_confusion(result.routing_confusion, names, output_dir / "routing_confusion.png",
                                   csv_path=output_dir / "routing_confusion.csv")
        for path in sorted(output_dir.iterdir()):
            tracker.log_artifact(path)
        return summary

    # ---------------------------------------------------------------- train and evaluate
    with ExperimentTracker(experiment, run_name, uri=cfg.tracking.uri, enabled=cfg.tracking.enabled, tags=tags) as tracker:
        tracker.log_params(flatten(cfg))
        tracker.log_text(to_yaml(cfg), "config.yaml")
        echo(f"{experiment} / {run_name}: {T} tasks ({', '.join(names)}) on {device}; {tracker.describe()}")
        if cfg.training.eval_before_training:
            result.initial = evaluate_row()
            tracker.log_metrics({f"initial_acc/{n}": float(a) for n, a in zip(names, result.initial)})

        phases = [("all tasks", joint_experience(train_exps), T - 1)] if strategy.trains_jointly else [
            (t.name, exp, t.index) for t, exp in zip(tasks, train_exps)
        ]
        with artifacts_on_failure(lambda: finish(tracker, failed=True)):
            for label, experience, row in tqdm(phases, desc="tasks", unit="task", disable=not cfg.training.progress):
                with ResourceMonitor(device) as monitor:
                    learner.train(experience)
                seen = tasks if strategy.trains_jointly else tasks[: row + 1]
                router_bytes = 0
                if router is not None:  # each task's routing statistics from its own training data, then frozen
                    for task in seen if strategy.trains_jointly else [tasks[row]]:
                        router_bytes += fit_router(model, task.index, task.name, train_exps[task.index].dataset
                                                   if not strategy.trains_jointly else _task_subset(experience, task),
                                                   cfg.training.eval_batch_size, device)
                result.matrix[row] = evaluate_row(row)
                stored_bytes = 0
                if cfg.training.checkpoint_dir:
                    for task in seen if strategy.trains_jointly else [tasks[row]]:
                        stored_bytes += save_task_state(
                            cfg.training.checkpoint_dir, task.index, task.name, strategy.task_state(model, task),
                            meta={"strategy": cfg.strategy.name},
                        )
                record = TaskRecord(
                    task=label,
                    trainable_parameters=learner.trainable_count,
                    stored_parameters=strategy.stored_parameters(model, seen),
                    wall_time_s=monitor.wall_time_s,
                    peak_memory_mb=monitor.peak_memory_mb,
                    train_loss=learner.last_epoch_loss,
                    stored_bytes=stored_bytes,
                    router_bytes=router_bytes,
                )
                result.records.append(record)
                tracker.log_metrics(
                    {
                        **{f"acc/{n}": float(a) for n, a in zip(names, result.matrix[row])},
                        "acc/mean_seen": float(np.mean(result.matrix[row, : row + 1])),
                        "train_loss": record.train_loss,
                        "trainable_parameters": record.trainable_parameters,
                        "stored_parameters": record.stored_parameters,
                        "wall_time_s": record.wall_time_s,
                        "peak_memory_mb": record.peak_memory_mb,
                        "stored_bytes": record.stored_bytes,
                    },
                    step=row,
                )
                if router is not None:
                    tracker.log_metrics(
                        {
                            **{f"acc_oracle/{n}": float(a) for n, a in zip(names, result.oracle_matrix[row])},
                            **{f"routing_acc/{n}": float(a) for n, a in zip(names[: row + 1], result.routing_matrix[row])},
                            "router_bytes": record.router_bytes,
                        },
                        step=row,
                    )
        summary = finish(tracker)
    echo(format_table(result, summary))
    echo(f"artifacts: {output_dir}")
    return result


@contextmanager
def _as_config_error():
    """A ValueError raised while building the model from the config becomes a ConfigError (printed by the CLI
    without a traceback); its message already names the config key."""
    try:
        yield
    except ConfigError:
        raise
    except ValueError as err:
        raise ConfigError(str(err)) from err


def _task_subset(experience, task):
    """The samples of ``task`` in a joint experience (its task label), for fitting a router after joint training."""
    dataset = experience.dataset
    keep = [i for i, t in enumerate(dataset.targets_task_labels) if int(t) == task.index]
    return dataset.subset(keep)
