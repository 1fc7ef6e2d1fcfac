"""The continual learner: Avalanche's SupervisedTemplate driven by an :class:`ExpansionStrategy`.

Avalanche runs the loop (experiences, epochs, mini-batches, plugins such as EWC, LwF and replay, evaluation
metrics); the strategy answers, per task, what to allocate, what trains and what to freeze. Only the parameters the
strategy names reach the optimizer; every other parameter has ``requires_grad=False``.
"""

from __future__ import annotations

import math
import re
import warnings
from typing import Dict, List, Optional, Sequence

import torch
from avalanche.evaluation.metrics import accuracy_metrics
from avalanche.training.plugins import EvaluationPlugin, SupervisedPlugin
from avalanche.training.templates import SupervisedTemplate
from torch import nn

from continual.expansion import ExpansionStrategy, TaskInfo
from continual.training import FINITE_CHECK_EVERY, FiniteLossCheck, NonFiniteLossError, set_trainable
from continual.training.distributed import DataParallel, DataParallelHooks
from continual.training.run_state import kill_point

__all__ = ["ContinualLearner", "NonFiniteLossError", "build_optimizer"]  # NonFiniteLossError: what train() raises


_ACC_KEY = re.compile(r"^Top1_Acc_Exp/eval_phase/[^/]+/Task(\d+)/Exp(\d+)$")


def build_optimizer(name: str, params: List[nn.Parameter], lr: float, weight_decay: float) -> torch.optim.Optimizer:
    if not params:
        raise ValueError("the strategy named no trainable parameters for this task")
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"training.optimizer: unknown optimizer {name!r} (adamw, sgd)")


class ContinualLearner(SupervisedTemplate):
    """Avalanche strategy whose per-task hooks call an expansion strategy.

    Args:
        model: a ``ContinualClassifier`` (Avalanche ``MultiTaskModule``).
        strategy: the expansion strategy.
        tasks: every task of the stream, in order (experience i is task i).
        optimizer: "adamw" or "sgd"; a fresh optimizer over the trainable parameters is made for every task.
        progress: show a tqdm bar over mini-batches.
        parallel: the processes of a data-parallel run (``continual.training.distributed``): each computes its
            share of every batch of ``train_mb_size`` and of the evaluation batches; None (or one process): all here.
        seed: the run's seed (a data-parallel process's own random stream is drawn from it).
    """

    def __init__(
        self,
        *,
        model: nn.Module,
        strategy: ExpansionStrategy,
        tasks: Sequence[TaskInfo],
        lr: float,
        weight_decay: float = 0.0,
        optimizer: str = "adamw",
        max_grad_norm: float = 0.0,
        train_mb_size: int = 16,
        train_epochs: int = 1,
        eval_mb_size: int = 64,
        device: torch.device | str = "cpu",
        plugins: Optional[list] = None,
        progress: bool = True,
        parallel: Optional[DataParallel] = None,
        seed: int = 0,
    ):
        self.strategy = strategy
        self.tasks = list(tasks)
        self.lr, self.weight_decay, self.optimizer_name = lr, weight_decay, optimizer
        self.max_grad_norm = max_grad_norm
        self.progress = progress
        self.epochs_per_stage = train_epochs  # train_epochs itself is set per task (stages x epochs, see _LearnerHooks)
        self._prepared_task: Optional[int] = None
        self._stage = 0  # training stage within the current task (see _LearnerHooks)
        self._bar = None
        self._loss_sum, self._loss_count = 0.0, 0
        # Each step's loss is checked to be finite: read every step on the CPU, every FINITE_CHECK_EVERY steps (one
        # device sync) on an accelerator, so the step does not wait for the device.
        self._losses = FiniteLossCheck(
            "training of this task was stopped. Lower training.lr or enable training.max_grad_norm; earlier tasks' "
            "results are kept in the run.",
            every=1 if torch.device(device).type == "cpu" else FINITE_CHECK_EVERY,
        )
        self.last_epoch_loss = math.nan
        with warnings.catch_warnings():  # "no loggers": on purpose, results go to MLflow through the run recipe
            warnings.simplefilter("ignore", UserWarning)
            evaluator = EvaluationPlugin(accuracy_metrics(experience=True), loggers=[])
        # Avalanche wants an optimizer up front; the real one is made per task in make_optimizer.
        placeholder = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=lr)
        # The strategy's Avalanche plugins (their state is part of a run's state) and the names of every parameter
        # that has trained so far (what a run state must keep besides the modules allocated per task).
        self.strategy_plugins = list(strategy.avalanche_plugins())
        self.trained_names: set = set()
        # Data parallel: shards batches, sums gradients and losses over processes (after the strategy's plugins, so
        # their losses and state are included).
        self.data_parallel = DataParallelHooks(parallel, seed) if parallel is not None and parallel.active else None
        parallel_hooks = [self.data_parallel] if self.data_parallel is not None else []
        super().__init__(
            model=model,
            optimizer=placeholder,
            criterion=nn.CrossEntropyLoss(),
            train_mb_size=train_mb_size,
            train_epochs=train_epochs,
            eval_mb_size=eval_mb_size,
            device=device,
            # The learner's own hooks come last, so EWC/LwF/replay see the model as trained before it is frozen.
            plugins=list(plugins or []) + self.strategy_plugins + parallel_hooks + [_LearnerHooks()],
            evaluator=evaluator,
        )

    # ------------------------------------------------------------------ task boundaries
    @property
    def current_task(self) -> TaskInfo:
        if self.strategy.trains_jointly:  # one experience holds every task; report it as the last one
            return self.tasks[-1]
        return self.tasks[self.experience.current_experience]

    def check_model_and_optimizer(self, **kwargs):
        task = self.current_task
        if self._prepared_task != task.index:
            self.model = self.model_adaptation()  # Avalanche's dynamic-module adaptation (known task labels)
            if self.strategy.trains_jointly:
                for each in self.tasks:
                    self.strategy.before_task(self.model, each)
                    self.model.heads.activate(each.index)
            else:
                self.strategy.before_task(self.model, task)
                self.model.heads.activate(task.index)
            self.model.to(self.device)
            self._prepared_task = task.index
        self.make_optimizer()

    def make_optimizer(self, **kwargs):
        task = self.current_task
        if self.strategy.training_stages(task) > 1:
            wanted = self.strategy.trainable_parameters(self.model, task, stage=self._stage)
        else:
            wanted = self.strategy.trainable_parameters(self.model, task)
        params = set_trainable(self.model, wanted)
        self.trainable_count = sum(p.numel() for p in params)
        chosen = {id(p) for p in params}
        self.trained_names.update(name for name, p in self.model.named_parameters() if id(p) in chosen)
        if params:  # nothing to train (a test-time strategy such as TinT): the task runs no epoch
            self.optimizer = build_optimizer(self.optimizer_name, params, self.lr, self.weight_decay)

    def criterion(self):
        """The task loss, plus the strategy's auxiliary loss of this forward while training (e.g. expert routing
        losses); evaluation reports the task loss only."""
        loss = super().criterion()
        if self.is_training:
            extra = self.strategy.auxiliary_loss(self.model, self.current_task)
            if extra is not None:
                loss = loss + extra
        return loss

    # ------------------------------------------------------------------ one step
    def backward(self):
        task, clock = self.current_task, self.clock
        self._losses.add(
            self.loss.detach(),
            f"on task {task.index} ({task.name!r}), epoch {clock.train_exp_epochs}, iteration {clock.train_epoch_iterations}",
        )
        self._loss_sum, self._loss_count = self._losses.total, self._losses.count  # the losses read so far
        super().backward()

    def optimizer_step(self):
        if self.max_grad_norm > 0:
            params = [p for group in self.optimizer.param_groups for p in group["params"]]
            torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm)
        super().optimizer_step()

    def train(self, experiences, eval_streams=None, **kwargs):
        try:
            return super().train(experiences, eval_streams, **kwargs)
        finally:  # an exception (a non-finite loss...) may leave a progress bar open and a task's epoch count set
            self.train_epochs = self.epochs_per_stage
            if self._bar is not None:
                self._bar.close()
                self._bar = None

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, experiences) -> Dict[int, float]:
        """Accuracy (0..1) per experience index of ``experiences``, read from Avalanche's accuracy metric (its last
        values also hold experiences of earlier evaluations: only those evaluated now are read)."""
        results = self.eval(experiences)
        asked = {exp.current_experience for exp in experiences}
        out: Dict[int, float] = {}
        for key, value in results.items():
            match = _ACC_KEY.match(key)
            if match and int(match.group(2)) in asked:
                out[int(match.group(2))] = float(value)
        if self.data_parallel is not None:  # this process evaluated its share of the batches: sum over processes
            out = self.data_parallel.combine_accuracies(out, [exp.current_experience for exp in experiences])
        missing = [exp.current_experience for exp in experiences if exp.current_experience not in out]
        if missing:
            raise RuntimeError(f"Avalanche reported no accuracy for experiences {missing}")
        return out


class _LearnerHooks(SupervisedPlugin):
    """The learner's per-task and per-epoch steps, through Avalanche's public plugin callbacks (no private template
    method is overridden).

    Staged training (train one module kind, freeze it, train the next) runs ``train_epochs`` epochs per stage: the
    task's epoch count is multiplied by the number of stages, and each stage boundary calls the strategy's
    ``after_stage`` and makes a fresh optimizer over the next stage's parameters. A task with nothing to train (a
    test-time strategy) runs no epoch at all.
    """

    def before_training_exp(self, strategy: "ContinualLearner", **kwargs):
        stages = 1 if strategy.strategy.trains_jointly else strategy.strategy.training_stages(strategy.current_task)
        strategy.train_epochs = strategy.epochs_per_stage * stages if strategy.trainable_count else 0
        strategy.last_epoch_loss = math.nan

    def before_training_epoch(self, strategy: "ContinualLearner", **kwargs):
        epoch = strategy.clock.train_exp_epochs  # epochs finished in this task
        if epoch and strategy.epochs_per_stage and epoch % strategy.epochs_per_stage == 0:
            strategy.strategy.after_stage(strategy.model, strategy.current_task, strategy._stage)
            strategy._stage += 1
            strategy.make_optimizer()
        strategy._loss_sum, strategy._loss_count = 0.0, 0
        strategy._losses.reset()
        if strategy.progress:
            from tqdm.auto import tqdm

            name = "all tasks" if strategy.strategy.trains_jointly else strategy.current_task.name
            stage = f" stage {strategy._stage + 1}" if strategy.train_epochs > strategy.epochs_per_stage else ""
            strategy._bar = tqdm(
                total=len(strategy.dataloader),
                desc=f"  {name}{stage} epoch {epoch % max(strategy.epochs_per_stage, 1) + 1}/{strategy.epochs_per_stage}",
                leave=False,
                unit="batch",
            )

    def after_training_iteration(self, strategy: "ContinualLearner", **kwargs):
        kill_point("train", strategy.current_task.index)  # fault-injection tests: a kill during training
        if strategy._bar is not None:
            strategy._bar.update(1)
            mean = strategy._loss_sum / max(strategy._loss_count, 1)
            strategy._bar.set_postfix(loss=f"{mean:.4f}", refresh=False)

    def after_training_epoch(self, strategy: "ContinualLearner", **kwargs):
        strategy._losses.flush()  # the epoch's last losses, checked before it counts as trained
        strategy._loss_sum, strategy._loss_count = strategy._losses.total, strategy._losses.count
        loss_sum, count = strategy._loss_sum, strategy._loss_count
        if strategy.data_parallel is not None:  # the losses of the global batches, not of this process's shares
            loss_sum, count = strategy.data_parallel.loss_sum, strategy.data_parallel.loss_steps
        strategy.last_epoch_loss = loss_sum / count if count else math.nan
        if strategy._bar is not None:
            strategy._bar.close()
            strategy._bar = None

    def after_training_exp(self, strategy: "ContinualLearner", **kwargs):
        strategy.train_epochs = strategy.epochs_per_stage
        strategy._stage = 0
        tasks = strategy.tasks if strategy.strategy.trains_jointly else [strategy.current_task]
        for task in tasks:
            strategy.strategy.after_task(strategy.model, task)
        strategy._prepared_task = None
