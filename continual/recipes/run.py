"""The classification recipe: setup -> (expand, train, freeze, evaluate, log) per task -> report.

A stream of classification tasks is learnt one after the other (or jointly) by the learner and an expansion strategy.
Reads top to bottom; everything with side effects (MLflow, files, the terminal) happens here or at the edges it calls.

Run: ``continual run CONFIG.yaml [key=value ...]`` (presets in ``configs/``).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
from omegaconf import DictConfig

from continual.config import flatten, to_yaml
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

    After every task the run folder keeps the run's state (``state/``), so ``continual resume RUN_DIR`` continues a
    killed run from its last finished task.

    Under ``torchrun --nproc_per_node=N -m continual run ...`` each task trains data-parallel on N processes (see
    :mod:`continual.training.distributed`); rank 0 alone writes the run folder, MLflow and checkpoints.

    Raises:
        NonFiniteLossError: after logging everything finished before the loss diverged.
    """
    from continual.training.distributed import data_parallel

    with data_parallel() as parallel:
        return _run(cfg, echo, parallel)


def resume_experiment(run_dir: str | Path, overrides: Sequence[str] = (), previous: bool = False,
                      echo: Callable[[str], None] = print) -> RunResult:
    """Continue a killed run from its last finished task, in the same folder and the same MLflow run.

    The run's own ``config.yaml`` is loaded (``overrides`` may change only keys that change no result, such as
    ``training.device`` or ``training.progress``). The resumed run ends with the accuracy matrix an uninterrupted
    run with the same seed would have given (identical on CPU). A finished run is reported and left as it is.

    Under torchrun, every process reads the run folder (a shared filesystem across machines); the number of
    processes may differ from the run's.

    Args:
        previous: continue from the generation before the last (when the last one is corrupt).

    Raises:
        RunStateError: not a run folder, no finished task, a corrupt state file (named; nothing is deleted), or a
            config that differs from the run's (the keys are named).
    """
    from continual.training.distributed import data_parallel

    with data_parallel() as parallel:
        return _resume(Path(run_dir), overrides, previous, echo if parallel.is_main else _quiet, parallel)


def _quiet(*_) -> None:
    """The echo of processes other than rank 0."""


def _resume(run_dir: Path, overrides: Sequence[str], previous: bool, echo: Callable[[str], None],
            parallel) -> RunResult:
    from continual.training.run_state import RunStateError, config_changes, has_state, read_state

    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise RunStateError(f"{run_dir} is not a run folder (it has no config.yaml)")
    cfg = load_config(run_dir / "config.yaml", list(overrides))
    own_uri = not any(o.split("=", 1)[0].strip() == "tracking.uri" for o in overrides)
    if not has_state(run_dir):  # killed before its first task finished: start again, in the same folder and run
        saved = flatten(load_config(run_dir / "config.yaml", []))
        changes = config_changes(saved, flatten(cfg))
        if changes:
            raise RunStateError(f"{run_dir}: the config differs from the run's in {', '.join(changes)}")
        echo(f"{run_dir}: no task had finished when the run stopped; starting it again in the same folder")
        return _run(cfg, echo, parallel, resume=(run_dir, None, own_uri))
    state = read_state(run_dir, previous=previous)
    changes = config_changes(state.config, flatten(cfg))
    if changes:
        shown = "; ".join(f"{k}: run {state.config.get(k)!r}, now {flatten(cfg).get(k)!r}" for k in changes[:8])
        raise RunStateError(f"{run_dir}: the config differs from the run's in {', '.join(changes)} ({shown}); a run "
                            "resumes with its own config (only training.device, training.progress, "
                            "training.eval_batch_size and tracking.uri/enabled may change)")
    if state.status == "finished":
        from continual.metrics import summarize
        from continual.report import format_table

        result = RunResult.from_dict(state.data["result"], output_dir=run_dir)
        echo(f"{run_dir}: the run already finished all {len(result.task_names)} tasks; nothing to resume")
        echo(format_table(result, summarize(result)))
        return result
    return _run(cfg, echo, parallel, resume=(run_dir, state, own_uri))


def _run(cfg: DictConfig, echo: Callable[[str], None], parallel, resume: Optional[tuple] = None) -> RunResult:
    from continual.checkpoint import save_task_state
    from continual.metrics import summarize
    from continual.report import format_table
    from continual.resources import ResourceMonitor
    from continual.tracking import JOURNAL_DIR, ExperimentTracker, Journal
    from continual.training import artifacts_on_failure, open_run_dir
    from continual.training.classification import build_parts, make_learner, restore, state_tensors, task_subset
    from continual.training.routing import fit_router, take_routing_counts
    from continual.training.run_state import kill_point, mark_finished, write_state
    from streams.avalanche import joint_experience
    from tqdm.auto import tqdm

    # ---------------------------------------------------------------- setup
    # Data parallel (`parallel`: this process among those torchrun started): every process builds the same parts
    # (rank 0 first, filling the tokenization cache) and trains its share of each batch; rank 0 alone writes.
    echo = echo if parallel.is_main else _quiet
    with parallel.main_first():
        parts = build_parts(cfg, device=parallel.device(cfg.training.device))
    model, strategy, router, tasks, device = parts.model, parts.strategy, parts.router, parts.tasks, parts.device
    train_exps, test_exps = parts.train_exps, parts.test_exps
    learner = make_learner(parts, parallel)
    names = [t.name for t in tasks]
    T = len(tasks)
    flat = flatten(cfg)
    uri = cfg.tracking.uri
    if resume is None:
        experiment, run_name = default_names(cfg)
        output_dir = parallel.on_main(lambda: open_run_dir(Path(cfg.tracking.output_dir) / experiment, run_name, cfg))
        run_name = output_dir.name  # the MLflow run and its folder share a name, suffixed when an earlier run had it
        result, done, run_id = _empty_result(names, output_dir, routed=router is not None), 0, None
    else:  # continue in the run's folder and MLflow run (journal: what the tracker knew when the run stopped)
        output_dir, state, own_uri = resume
        info = Journal(output_dir / JOURNAL_DIR).read_info()
        experiment = info.get("experiment") or default_names(cfg)[0]
        run_name = info.get("run_name") or output_dir.name
        run_id = info.get("run_id") or (state.data.get("run_id") if state is not None else None)
        if own_uri and info.get("uri"):  # resolved when the run started: the same store from any directory
            uri = info["uri"]
        if state is None:
            result, done = _empty_result(names, output_dir, routed=router is not None), 0
        else:
            restore(parts, state, learner)  # the model, strategy, router, plugins and RNGs after the last finished task
            result = RunResult.from_dict(state.data["result"], output_dir=output_dir)
            done = state.finished
    tags = {"stream": parts.stream.name, "strategy": cfg.strategy.name, "backbone": cfg.backbone.name,
            "seed": str(cfg.seed), "router": cfg.router.name,
            "precision": parts.precision}
    if cfg.tracking.parent_run_id:  # a cell of `continual compare`: nested under its parent run
        tags["mlflow.parentRunId"] = cfg.tracking.parent_run_id

    def evaluate_row(row: Optional[int] = None) -> np.ndarray:
        """Accuracy on every task's test set (with ``training.eval_tasks=seen``, on the tasks up to ``row + 1`` only;
        NaN for the others); with a router, also the oracle row and the routing row of ``row``."""
        wanted = test_exps
        if row is not None and cfg.training.eval_tasks == "seen" and not strategy.trains_jointly:
            wanted = test_exps[: row + 2]  # the tasks trained so far and the next one (FWT reads it)
        started = time.perf_counter()
        accs = learner.evaluate(wanted)
        if row is not None:
            kill_point("eval", row)  # fault-injection tests: a kill during evaluation
        routed = np.array([accs.get(j, np.nan) for j in range(T)])
        counts = take_routing_counts(model, T, parallel) if router is not None else None
        if counts is None or row is None:
            return routed
        result.eval_seconds["routed"] += time.perf_counter() - started
        model.route_inferred, started = False, time.perf_counter()
        try:
            accs = learner.evaluate(wanted)
        finally:
            model.route_inferred = True
        result.eval_seconds["oracle"] += time.perf_counter() - started
        result.oracle_matrix[row] = [accs.get(j, np.nan) for j in range(T)]
        routing = np.diag(counts) / np.maximum(counts.sum(1), 1)
        if not strategy.trains_jointly:
            routing[row + 1:] = np.nan  # tasks not learnt yet: nothing can be routed to them
        result.routing_matrix[row] = routing
        result.routing_confusion = counts
        return routed

    def log_row(tracker, row: int, index: int) -> None:
        """Log row ``row`` of the matrices and record ``index`` (a resumed run logs again what the tracker may have
        missed; steps it already has are skipped)."""
        record = result.records[index]
        tracker.log_metrics(
            {
                **{f"acc/{n}": float(a) for n, a in zip(names, result.matrix[row]) if not np.isnan(a)},
                "acc/mean_seen": float(np.mean(result.matrix[row, : row + 1])),
                "train_loss": record.train_loss,
                "trainable_parameters": record.trainable_parameters,
                "stored_parameters": record.stored_parameters,
                "wall_time_s": record.wall_time_s,
                "peak_memory_mb": record.peak_memory_mb,
                "stored_bytes": record.stored_bytes,
                **{f"strategy/{k}": v for k, v in record.strategy_metrics.items()},
            },
            step=row,
        )
        if router is not None:
            tracker.log_metrics(
                {
                    **{f"acc_oracle/{n}": float(a) for n, a in zip(names, result.oracle_matrix[row])
                       if not np.isnan(a)},
                    **{f"routing_acc/{n}": float(a) for n, a in zip(names[: row + 1], result.routing_matrix[row])},
                    "router_bytes": record.router_bytes,
                },
                step=row,
            )

    def save_state(finished: int, tracker) -> None:
        if not parallel.is_main:
            return
        groups, data = state_tensors(parts, learner)
        data.update(result=result.to_dict(), experiment=experiment, run_name=run_name, run_id=tracker.run_id)
        write_state(output_dir, finished, groups, data, flat)

    def finish(tracker, failed: bool = False) -> dict:
        """Write every artifact of what has been measured so far (also after a failure)."""
        from continual.report import (
            plot_accuracy_matrix, plot_forgetting_curves, plot_routing_confusion, save_matrix_csv, write_summary_json,
        )

        summary = summarize(result)
        if not parallel.is_main:
            return summary
        tracker.log_metrics({f"final/{k}": v for k, v in summary.items()})
        save_matrix_csv(result, output_dir / "accuracy_matrix.csv")
        write_summary_json(result, summary, output_dir / "summary.json", extra={"failed": failed, "config": flat})
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
            if path.is_file():  # the run state and the tracking journal stay in the run folder
                tracker.log_artifact(path)
        return summary

    # ---------------------------------------------------------------- train and evaluate
    tracker_args = dict(uri=uri, enabled=cfg.tracking.enabled and parallel.is_main, tags=tags,
                        journal=output_dir / JOURNAL_DIR, run_id=run_id)
    with ExperimentTracker(experiment, run_name, **tracker_args) as tracker:
        if not done:
            tracker.log_params(flat)  # a run started again logs them again: the tracker skips what it already has
            tracker.log_text(to_yaml(cfg), "config.yaml")
        echo(f"{experiment} / {run_name}: {T} tasks ({', '.join(names)}) on {device}"
             f"{' x ' + parallel.describe() if parallel.active else ''}; {tracker.describe()}")
        if done:
            echo(f"resuming {output_dir} after {done} of {T} tasks")
            for index, row in enumerate(_finished_rows(result, strategy.trains_jointly, T)):
                log_row(tracker, row, index)  # whatever the tracker did not get before the kill
        if cfg.training.eval_before_training and not done:
            result.initial = evaluate_row()
            tracker.log_metrics({f"initial_acc/{n}": float(a) for n, a in zip(names, result.initial)})

        phases = [("all tasks", joint_experience(train_exps), T - 1)] if strategy.trains_jointly else [
            (t.name, exp, t.index) for t, exp in zip(tasks, train_exps)
        ]
        phases = phases[done:] if not strategy.trains_jointly else (phases if done == 0 else [])
        with artifacts_on_failure(lambda: finish(tracker, failed=True)):
            for label, experience, row in tqdm(phases, desc="tasks", unit="task",
                                               disable=not (cfg.training.progress and parallel.is_main),
                                               initial=done, total=done + len(phases)):
                with ResourceMonitor(device) as monitor:
                    learner.train(experience)
                seen = tasks if strategy.trains_jointly else tasks[: row + 1]
                router_bytes = 0
                if router is not None:  # each task's routing statistics from its own training data, then frozen
                    for task in seen if strategy.trains_jointly else [tasks[row]]:
                        router_bytes += fit_router(model, task.index, task.name, train_exps[task.index].dataset
                                                   if not strategy.trains_jointly else task_subset(experience, task),
                                                   cfg.training.eval_batch_size, device, parallel)
                result.matrix[row] = evaluate_row(row)
                stored_bytes = 0
                if cfg.training.checkpoint_dir and parallel.is_main:
                    for task in seen if strategy.trains_jointly else [tasks[row]]:
                        stored_bytes += save_task_state(
                            cfg.training.checkpoint_dir, task.index, task.name, strategy.task_state(model, task),
                            meta={"strategy": cfg.strategy.name},
                        )
                metrics = getattr(strategy, "task_metrics", None)
                record = TaskRecord(
                    task=label,
                    trainable_parameters=learner.trainable_count,
                    stored_parameters=strategy.stored_parameters(model, seen),
                    wall_time_s=monitor.wall_time_s,
                    peak_memory_mb=monitor.peak_memory_mb,
                    train_loss=learner.last_epoch_loss,
                    stored_bytes=stored_bytes,
                    router_bytes=router_bytes,
                    strategy_metrics={k: float(v) for k, v in (metrics(model, tasks[row]) if metrics else {}).items()},
                )
                result.records.append(record)
                save_state(row + 1, tracker)  # from here on a kill loses nothing of this task
                log_row(tracker, row, len(result.records) - 1)
        summary = finish(tracker)
    if parallel.is_main:
        mark_finished(output_dir)
    echo(format_table(result, summary))
    echo(f"artifacts: {output_dir}")
    return result


def _empty_result(names: list, output_dir: Path, routed: bool) -> RunResult:
    """A run's result before any task: NaN matrices (a routed run is evaluated both ways: routed, the matrix, and with
    the task id given)."""
    T = len(names)
    result = RunResult(task_names=names, matrix=np.full((T, T), np.nan), output_dir=output_dir)
    if routed:
        result.oracle_matrix = np.full((T, T), np.nan)
        result.routing_matrix = np.full((T, T), np.nan)
        result.eval_seconds = {"routed": 0.0, "oracle": 0.0}
    return result


def _finished_rows(result: RunResult, joint: bool, T: int) -> list:
    """The matrix rows of the records a run holds, in order (a joint run's one record is its last row)."""
    return [T - 1] * len(result.records) if joint else list(range(len(result.records)))
