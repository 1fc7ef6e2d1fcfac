"""Data-parallel training on torch.distributed: one process per device, each computing its share of every global
batch, the gradients summed over processes after each backward, rank 0 alone writing.

Launch (the ``run`` and ``resume`` commands; every process reads the same config, data and run folder)::

    torchrun --standalone --nproc_per_node=N -m continual run CONFIG.yaml [key=value ...]
    torchrun --nnodes=2 --node_rank=R --nproc_per_node=N --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 \\
        -m continual run CONFIG.yaml

How N processes take the one-process step, so that results do not depend on N beyond floating-point order:

- Every process seeds alike, builds the same model and loaders, and draws every global batch of
  ``training.batch_size``; process r keeps samples r, r + N, r + 2N... (:class:`GlobalBatchShards`). Avalanche's own
  distributed samplers are switched off (:func:`continual.compat.avalanche_sees_one_process`): each process would
  draw its own order and pad the data to a multiple of N.
- After backward, each trainable gradient is weighted by the process's share of the batch and summed over processes
  (:meth:`DataParallel.reduce_gradients`): the gradient of the global batch's mean loss, whatever the split. An
  explicit all-reduce rather than ``DistributedDataParallel``: the trainable set changes at every task and stage
  (new modules, frozen old ones, experts no token chose), Avalanche's plugins run their own forward and backward
  passes (EWC's importances, LwF's teacher) and the model must stay the bare module the strategy and the router
  look into; a parameter no process gave a gradient keeps none (AdamW then skips it, as in one process).
- The global torch generator (data order, new modules' initial weights, replay draws) advances alike in every
  process: between two draws of the loader, each process runs on a generator of its own (dropout), seeded per task.
  With dropout, N processes draw other masks than one process: the same distribution, not the same numbers.
- Evaluation: process r evaluates batches r, r + N... of each test set; correct answers are summed over processes.
  Routers fit on features gathered from every process; replay memories and EWC importances are computed alike in
  every process and compared after each task (rank 0's state is broadcast when they differ, e.g. by GPU rounding).
- Batch-level auxiliary losses (the experts' routing losses) are computed on each process's share of the batch, as
  ``DistributedDataParallel`` does with batch statistics.
"""

from __future__ import annotations

import math
import os
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as dist
from avalanche.training.plugins import SupervisedPlugin
from torch import nn

from continual.config import ConfigError
from continual.training.environment import resolve_device
from continual.training.loop import NonFiniteLossError

BUCKET_ELEMENTS = 1 << 24  # gradients are summed in buckets of at most this many elements (64 MB in float32)


def launched_world_size() -> int:
    """The number of processes a launcher (torchrun, ``accelerate launch``) started, from ``$WORLD_SIZE``."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def shard_of(batch_size: int, rank: int, world_size: int) -> Tuple[List[int], float]:
    """Which samples of a global batch process ``rank`` computes, and its share of the batch.

    Returns:
        (indices, weight): samples ``rank, rank + N, ...`` and ``len(indices) / batch_size``. A process left without
        a sample (a batch smaller than N) computes sample 0 with weight 0, so that every process runs the same
        collective calls.
    """
    indices = list(range(rank, batch_size, world_size))
    if not indices:
        return [0], 0.0
    return indices, len(indices) / batch_size


@dataclass(frozen=True)
class DataParallel:
    """This process's place among the processes of a data-parallel run (rank 0 of 1 without a launcher).

    Args:
        rank: global rank (0 writes the run folder, MLflow and checkpoints).
        world_size: number of processes.
        local_rank: rank on this machine (the GPU it uses).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    def describe(self) -> str:
        return f"{self.world_size} processes ({dist.get_backend()})" if self.active else "1 process"

    def device(self, name: str) -> torch.device:
        """The device ``training.device`` names for this process: each process takes GPU ``local_rank``.

        Raises:
            ConfigError: a GPU index is named (``cuda:1``) while several processes run.
        """
        device = resolve_device(name)
        if not self.active or device.type != "cuda":
            return device
        if device.index is not None:
            raise ConfigError(f"training.device={name} names one GPU, but {self.world_size} processes run: use "
                              "training.device=cuda (each process takes the GPU of its local rank)")
        return torch.device("cuda", self.local_rank)

    # ------------------------------------------------------------------ collectives (no-ops in one process)
    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    @contextmanager
    def main_first(self) -> Iterator[None]:
        """Rank 0 runs the body first (filling caches: tokenized data), the other processes after it."""
        if not self.is_main:
            self.barrier()
        yield
        if self.is_main:
            self.barrier()

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's ``obj`` in every process (pickled)."""
        if not self.active:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather_objects(self, obj: Any) -> List[Any]:
        """Every process's ``obj``, in rank order, in every process."""
        if not self.active:
            return [obj]
        out: List[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def on_main(self, fn: Callable[[], Any]) -> Any:
        """``fn()`` run by rank 0 alone; its value (or the exception it raised) in every process."""
        if not self.active:
            return fn()
        outcome: Tuple[bool, Any] = (True, None)
        if self.is_main:
            try:
                outcome = (True, fn())
            except Exception as err:  # every process raises it, so none waits for a collective the others skip
                outcome = (False, err)
        ok, value = self.broadcast_object(outcome)
        if not ok:
            raise value
        return value

    def sum(self, values: Sequence[float]) -> np.ndarray:
        """Element-wise sum over processes of a float vector (float64)."""
        tensor = torch.tensor(list(values), dtype=torch.float64)
        if self.active:
            dist.all_reduce(tensor)
        return tensor.numpy()

    def broadcast_tensors(self, tensors: Sequence[torch.Tensor]) -> None:
        """Overwrite ``tensors`` (in place) with rank 0's."""
        if not self.active:
            return
        for bucket in _buckets(list(tensors)):
            flat = torch.cat([t.detach().reshape(-1) for t in bucket])
            dist.broadcast(flat, src=0)
            offset = 0
            with torch.no_grad():
                for t in bucket:
                    t.copy_(flat[offset:offset + t.numel()].view_as(t))
                    offset += t.numel()

    def reduce_gradients(self, params: Sequence[nn.Parameter], weight: float) -> None:
        """Replace each parameter's gradient by ``sum over processes of weight_r * grad_r``.

        With ``weight_r`` process r's share of the global batch, and each process's loss the mean over its share,
        this is the gradient of the global batch's mean loss. A parameter that no process gave a gradient keeps
        ``grad=None``; one that only some did gets the sum of theirs.
        """
        if not self.active:
            return
        for bucket in _buckets(list(params)):
            present = [p.grad is not None and weight > 0 for p in bucket]
            flat = torch.cat(
                [p.grad.reshape(-1) * weight if has else p.new_zeros(p.numel()) for p, has in zip(bucket, present)]
                + [torch.tensor(present, dtype=bucket[0].dtype, device=bucket[0].device)]
            )
            dist.all_reduce(flat)
            offset, flags = 0, flat[-len(bucket):].tolist()
            for p, flag in zip(bucket, flags):
                p.grad = flat[offset:offset + p.numel()].view_as(p) if flag > 0 else None
                offset += p.numel()


def _buckets(tensors: List[torch.Tensor]) -> Iterator[List[torch.Tensor]]:
    """Consecutive runs of tensors of one dtype and device, each of at most :data:`BUCKET_ELEMENTS` elements (or one
    larger tensor)."""
    bucket: List[torch.Tensor] = []
    size = 0
    for t in tensors:
        other = bucket and (t.dtype != bucket[0].dtype or t.device != bucket[0].device)
        if bucket and (other or size + t.numel() > BUCKET_ELEMENTS):
            yield bucket
            bucket, size = [], 0
        bucket.append(t)
        size += t.numel()
    if bucket:
        yield bucket


@contextmanager
def data_parallel(timeout_minutes: float = 30.0) -> Iterator[DataParallel]:
    """This process's :class:`DataParallel`: under a launcher (``$WORLD_SIZE`` > 1) the process group is joined
    (gloo for CPU tensors, NCCL for GPU ones) and left at the end; otherwise rank 0 of 1, and nothing happens.

    While the group is up, Avalanche builds unsharded loaders (the learner shards each global batch itself)."""
    from continual.compat import avalanche_sees_one_process

    world_size = launched_world_size()
    if world_size <= 1:
        yield DataParallel()
        return
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    owner = not dist.is_initialized()
    if owner:
        cuda = torch.cuda.is_available() and local_rank < torch.cuda.device_count()
        if cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group("cpu:gloo,cuda:nccl" if cuda else "gloo", timeout=timedelta(minutes=timeout_minutes))
    try:
        with avalanche_sees_one_process():
            yield DataParallel(rank=rank, world_size=world_size, local_rank=local_rank)
    finally:
        if owner:
            dist.destroy_process_group()


def check_data_parallel(parallel: DataParallel, batch_size: int, strategy_name: str, plugins: Sequence[Any]) -> None:
    """Refuse, before anything trains, what cannot run on ``parallel.world_size`` processes yet.

    Raises:
        ConfigError: a global batch smaller than the number of processes, or a strategy whose Avalanche plugins keep
            state that cannot be compared across processes (it has no ``state_dict``).
    """
    from continual.training.run_state import RunStateError, plugin_state

    if not parallel.active:
        return
    if batch_size < parallel.world_size:
        raise ConfigError(f"training.batch_size={batch_size} is the global batch, split across the "
                          f"{parallel.world_size} processes: it must be at least {parallel.world_size}")
    try:
        plugin_state(plugins)
    except RunStateError as err:
        raise ConfigError(f"strategy.name={strategy_name} cannot run data-parallel yet ({err}); run it in one "
                          "process, without torchrun") from err


class GlobalBatchShards:
    """This process's share (samples ``rank, rank + N, ...``) of every batch of a training loader that every
    process iterates alike.

    The loader draws (its order, a replay memory's) on the global generator, which therefore advances alike in every
    process; the training step between two draws (dropout) runs on this process's own generator, swapped in after
    each draw and out before the next.

    Attributes:
        weight: the share of the global batch of the step being run (``len(shard) / len(batch)``; 0 for a process
            left without a sample, which computes sample 0 only to take part in the collectives).
    """

    def __init__(self, loader, parallel: DataParallel, own_rng: "OwnGenerator"):
        self.loader, self.parallel, self.own_rng = loader, parallel, own_rng
        self.weight = 1.0

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        batches = iter(self.loader)
        while True:
            try:
                batch = next(batches)
            except StopIteration:
                return
            indices, self.weight = shard_of(len(batch[0]), self.parallel.rank, self.parallel.world_size)
            index = torch.tensor(indices)
            self.own_rng.swap()
            try:
                yield [t[index] for t in batch]
            finally:
                self.own_rng.swap()


class EvalBatchShards:
    """Batches ``rank, rank + N, ...`` of an evaluation loader (each one whole, as one process evaluates it)."""

    def __init__(self, loader, parallel: DataParallel):
        self.loader, self.parallel = loader, parallel
        self.samples = 0  # evaluated by this process

    def __len__(self) -> int:
        return len(range(self.parallel.rank, len(self.loader), self.parallel.world_size))

    def __iter__(self):
        self.samples = 0
        for i, batch in enumerate(self.loader):
            if i % self.parallel.world_size == self.parallel.rank:
                self.samples += len(batch[0])
                yield batch


class OwnGenerator:
    """A process's own random stream (CPU, and the GPU's when training there), exchanged with the global one by
    :meth:`swap`."""

    def __init__(self, seed: int, device: torch.device):
        self.device = device if device.type == "cuda" else None
        self.cpu = torch.Generator().manual_seed(seed).get_state()
        self.gpu = None
        if self.device is not None:
            generator = torch.Generator(device=self.device)
            generator.manual_seed(seed)
            self.gpu = generator.get_state()

    def swap(self) -> None:
        self.cpu, cpu = torch.get_rng_state(), self.cpu
        torch.set_rng_state(cpu)
        if self.device is not None:
            self.gpu, gpu = torch.cuda.get_rng_state(self.device), self.gpu
            torch.cuda.set_rng_state(gpu, self.device)


def _fingerprints(tensors: Dict[str, torch.Tensor]) -> Dict[str, Tuple[float, float]]:
    with torch.no_grad():
        return {k: (float(v.double().sum()), float((v.double() ** 2).sum())) for k, v in sorted(tensors.items())}


class DataParallelHooks(SupervisedPlugin, supports_distributed=True):
    """The learner's data-parallel steps, through Avalanche's plugin callbacks (placed after the strategy's plugins,
    so that the loss they add is in the reduced loss and the state they compute after a task is compared).

    Args:
        parallel: the processes.
        seed: the run's seed (each process's own generator is seeded from it, the task and the rank).
    """

    def __init__(self, parallel: DataParallel, seed: int):
        super().__init__()
        self.parallel, self.seed = parallel, int(seed)
        self.shards: Optional[GlobalBatchShards] = None
        self.eval_shards: Dict[int, EvalBatchShards] = {}
        self._optimizer = None
        self.loss_sum, self.loss_steps = 0.0, 0  # the epoch's global-batch losses

    def before_training_exp(self, strategy, **kwargs):
        task = int(strategy.current_task.index)
        seed = int(np.random.SeedSequence([self.seed, task, self.parallel.rank]).generate_state(1)[0])
        self.shards = GlobalBatchShards(strategy.dataloader, self.parallel, OwnGenerator(seed, strategy.device))
        strategy.dataloader = self.shards  # as Avalanche's replay plugin does: the task's loader, replaced once
        self._optimizer = None

    def before_training_epoch(self, strategy, **kwargs):
        self.loss_sum, self.loss_steps = 0.0, 0

    def before_training_iteration(self, strategy, **kwargs):
        if strategy.optimizer is not self._optimizer:  # a new task or stage: start from rank 0's values, as DDP does
            self._optimizer = strategy.optimizer
            self.parallel.broadcast_tensors([p for group in strategy.optimizer.param_groups for p in group["params"]])

    def before_backward(self, strategy, **kwargs):
        """The global batch's loss: checked here in every process at once (a NaN in one process's share stops all of
        them with the same error, and none waits for the others' gradients), and kept for the epoch's mean."""
        weight = self.shards.weight
        local = float(strategy.loss.detach()) * weight if weight else 0.0
        value = float(self.parallel.sum([local])[0])
        if not math.isfinite(value):
            task, clock = strategy.current_task, strategy.clock
            raise NonFiniteLossError(
                value, f"on task {task.index} ({task.name!r}), epoch {clock.train_exp_epochs}, iteration "
                f"{clock.train_epoch_iterations} (the global batch over {self.parallel.world_size} processes)",
                "training of this task was stopped. Lower training.lr or enable training.max_grad_norm; earlier tasks' "
                "results are kept in the run.",
            )
        self.loss_sum += value
        self.loss_steps += 1

    def after_backward(self, strategy, **kwargs):
        params = [p for group in strategy.optimizer.param_groups for p in group["params"]]
        self.parallel.reduce_gradients(params, self.shards.weight)

    def after_training_exp(self, strategy, **kwargs):
        """The strategy's plugins' state (EWC importances, the replay memory...) was computed alike in every process;
        where it came out different (GPU rounding), rank 0's replaces the others'."""
        from continual.training.run_state import load_plugin_state, plugin_state
        from streams.avalanche import dataset_from_tensors

        self.shards = None
        if not strategy.strategy_plugins:
            return
        tensors, meta = plugin_state(strategy.strategy_plugins)
        prints = self.parallel.gather_objects((_fingerprints(tensors), meta))
        if all(p == prints[0] for p in prints):
            return
        tensors, meta = self.parallel.broadcast_object((tensors, meta) if self.parallel.is_main else None)
        if not self.parallel.is_main:
            load_plugin_state(strategy.strategy_plugins, tensors, meta, strategy.model, dataset_from_tensors)

    def before_eval_exp(self, strategy, **kwargs):
        shards = EvalBatchShards(strategy.dataloader, self.parallel)
        self.eval_shards[int(strategy.experience.current_experience)] = shards
        strategy.dataloader = shards

    def combine_accuracies(self, local: Dict[int, float], experiences: Sequence[int]) -> Dict[int, float]:
        """Accuracy per experience over every process's batches, from each process's accuracy on its own."""
        counts = [self.eval_shards[e].samples if e in self.eval_shards else 0 for e in experiences]
        missing = [e for e, n in zip(experiences, counts) if n and e not in local]
        if missing:
            raise RuntimeError(f"Avalanche reported no accuracy for experiences {missing} (rank {self.parallel.rank})")
        correct = [round(local.get(e, 0.0) * n) for e, n in zip(experiences, counts)]
        totals = self.parallel.sum(correct + counts)
        k = len(experiences)
        self.eval_shards = {}
        return {e: float(totals[i] / totals[k + i]) for i, e in enumerate(experiences) if totals[k + i] > 0}
