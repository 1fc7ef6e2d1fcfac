"""Run by ``tests/test_distributed.py`` under ``torchrun --standalone --nproc_per_node=2 collectives_worker.py OUT``:
every check of the data-parallel collectives in one pair of gloo processes (starting them costs more than the
checks); each process writes what it found to ``OUT/rank<r>.pkl``."""

from __future__ import annotations

import pickle
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

from continual.config import ConfigError
from continual.training.distributed import DataParallelHooks, GlobalBatchShards, OwnGenerator, data_parallel
from continual.training.loop import NonFiniteLossError


def main(out: Path) -> None:
    torch.set_num_threads(1)
    found = {}
    with data_parallel() as parallel:
        rank = parallel.rank
        # Gradients: weighted sum; a gradient only one process has is summed alone; none anywhere stays None.
        params = [torch.nn.Parameter(torch.zeros(3)) for _ in range(3)]
        params[0].grad = torch.full((3,), float(rank + 1))
        params[1].grad = torch.full((3,), 10.0) if rank == 0 else None
        parallel.reduce_gradients(params, 0.75 if rank == 0 else 0.25)
        found["grads"] = [None if p.grad is None else p.grad.tolist() for p in params]
        # A process with weight 0 (no sample of its own) contributes nothing, not even its NaN.
        p = torch.nn.Parameter(torch.zeros(2))
        p.grad = torch.full((2,), float("nan") if rank == 1 else 4.0)
        parallel.reduce_gradients([p], 1.0 if rank == 0 else 0.0)
        found["weightless"] = p.grad.tolist()
        # Rank 0's values everywhere.
        t = torch.full((4,), float(rank))
        parallel.broadcast_tensors([t])
        found["broadcast"] = t.tolist()
        found["gathered"] = parallel.gather_objects(rank * 10)

        def fail():
            raise ConfigError("only rank 0 saw this")

        try:
            parallel.on_main(fail)
        except ConfigError as err:
            found["on_main"] = str(err)
        # A non-finite loss in one process's share stops both, with the same error, before any gradient is summed.
        hooks = DataParallelHooks(parallel, seed=0)
        hooks.shards = SimpleNamespace(weight=0.5)
        learner = SimpleNamespace(loss=torch.tensor([float("nan") if rank == 1 else 1.0]),
                                  current_task=SimpleNamespace(index=1, name="agnews"),
                                  clock=SimpleNamespace(train_exp_epochs=0, train_epoch_iterations=3))
        try:
            hooks.before_backward(learner)
        except NonFiniteLossError as err:
            found["nan"] = str(err)
        # Shards of every global batch; the global generator advances alike although the steps draw differently.
        torch.manual_seed(0)
        batches = [[torch.arange(8) + 10 * b, torch.arange(8)] for b in range(3)]
        batches.append([torch.tensor([99]), torch.tensor([0])])  # a last batch smaller than the processes
        shards = GlobalBatchShards(batches, parallel, OwnGenerator(1000 + rank, torch.device("cpu")))
        seen, step_draws = [], []
        for shard in shards:
            seen.append((shard[0].tolist(), shards.weight))
            step_draws.append(torch.rand(1 + rank).tolist())  # "dropout" drawing more in one process
        found["shards"], found["step_draws"], found["after"] = seen, step_draws, torch.rand(2).tolist()
        # Accuracy over processes from each one's share.
        hooks.eval_shards = {0: SimpleNamespace(samples=3 if rank == 0 else 2), 1: SimpleNamespace(samples=4)}
        found["accuracy"] = hooks.combine_accuracies({0: 2 / 3 if rank == 0 else 0.5, 1: 0.25 * (rank + 1)}, [0, 1])
    (out / f"rank{rank}.pkl").write_bytes(pickle.dumps(found))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
