"""Data-parallel runs (continual/training/distributed.py): the collectives on two gloo processes, and whole runs
under ``torchrun --nproc_per_node=2`` against one process with the same global batch.

The tiny backbone runs without dropout here: with dropout, N processes draw other masks than one process (the same
distribution, other numbers), and only then do their results differ beyond floating-point order.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from continual.config import ConfigError
from continual.training.distributed import DataParallel, check_data_parallel, shard_of

pytestmark = pytest.mark.usefixtures("one_cpu_thread")

NO_DROPOUT = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}


def test_a_global_batch_is_split_by_stride_and_weighted_by_share():
    assert shard_of(8, 0, 2) == ([0, 2, 4, 6], 0.5)
    assert shard_of(5, 0, 2) == ([0, 2, 4], 0.6) and shard_of(5, 1, 2) == ([1, 3], 0.4)
    # A process left without a sample computes sample 0 with weight 0 (it still takes part in the collectives).
    assert shard_of(1, 1, 2) == ([0], 0.0)
    assert sorted(i for r in range(3) for i in shard_of(7, r, 3)[0]) == list(range(7))


def test_what_cannot_run_data_parallel_is_refused_at_start():
    two = DataParallel(rank=0, world_size=2)
    with pytest.raises(ConfigError, match="training.batch_size=1 .* at least 2"):
        check_data_parallel(two, 1, "full_finetune", [])

    class Opaque:  # an Avalanche plugin keeping state nobody can read
        pass

    with pytest.raises(ConfigError, match="strategy.name=mine cannot run data-parallel yet.*Opaque"):
        check_data_parallel(two, 8, "mine", [Opaque()])
    check_data_parallel(DataParallel(), 1, "mine", [Opaque()])  # one process: nothing to refuse
    with pytest.raises(ConfigError, match="training.device=cuda:1 names one GPU"):
        two.device("cuda:1")
    assert DataParallel(rank=1, world_size=2, local_rank=1).device("cuda") == torch.device("cuda", 1)


def test_commands_other_than_run_and_resume_refuse_torchrun(monkeypatch, capsys):
    from continual.cli import main

    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["eval", "some/run"]) == 2
    assert "continual eval does not run data-parallel" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ two gloo processes


def torchrun_script(script: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return _torchrun([str(script), *args], cwd)


def torchrun(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node=2 -m continual ARGS``."""
    return _torchrun(["-m", "continual", *args], cwd)


def _torchrun(args: list, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_collectives_on_two_gloo_processes(tmp_path):
    done = torchrun_script(Path(__file__).with_name("collectives_worker.py"), str(tmp_path), cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [pickle.loads((tmp_path / f"rank{r}.pkl").read_bytes()) for r in range(2)]
    torch.manual_seed(0)
    reference_after = torch.rand(2).tolist()  # one process whose steps draw nothing from the global generator
    for r, found in enumerate(ranks):
        assert found["grads"] == [[1.25] * 3, [7.5] * 3, None], r  # 0.75 * 1 + 0.25 * 2; 0.75 * 10; nobody
        assert found["weightless"] == [4.0, 4.0]
        assert found["broadcast"] == [0.0] * 4
        assert found["gathered"] == [0, 10]
        assert found["on_main"] == "only rank 0 saw this"
        assert "loss became nan on task 1 ('agnews')" in found["nan"] and "2 processes" in found["nan"]
        assert found["after"] == pytest.approx(reference_after)
        assert found["accuracy"] == {0: pytest.approx(3 / 5), 1: pytest.approx(3 / 8)}
    assert ranks[0]["shards"] == [([0, 2, 4, 6], 0.5), ([10, 12, 14, 16], 0.5), ([20, 22, 24, 26], 0.5), ([99], 1.0)]
    assert ranks[1]["shards"] == [([1, 3, 5, 7], 0.5), ([11, 13, 15, 17], 0.5), ([21, 23, 25, 27], 0.5), ([99], 0.0)]
    assert ranks[0]["step_draws"][0][0] != ranks[1]["step_draws"][0][0]  # each process's own stream (dropout)


# ------------------------------------------------------------------------------------------ whole runs


def tiny_config(make, tiny_backbone: dict, **sections) -> Path:
    """A 3-task tiny run without dropout, in the experiment "dp"."""
    backbone = {**tiny_backbone, "config_overrides": {**tiny_backbone["config_overrides"], **NO_DROPOUT}}
    return make(**sections, backbone=backbone, tracking={"experiment": "dp"})




def trained(folder: Path):
    from continual.training.run_state import read_state

    state = read_state(folder)
    return np.array(state.data["result"]["matrix"], dtype=float), state.tensors["model"]


def assert_same_run(one: Path, two: Path, atol: float) -> None:
    matrix_one, weights_one = trained(one)
    matrix_two, weights_two = trained(two)
    np.testing.assert_allclose(matrix_two, matrix_one, rtol=0, atol=1e-12)
    assert sorted(weights_two) == sorted(weights_one)
    worst = max(float((weights_one[k].double() - weights_two[k].double()).abs().max()) for k in weights_one)
    assert worst < atol, worst


@pytest.mark.slow
@pytest.mark.parametrize("strategy, router, atol", [
    ({"name": "full_finetune"}, "oracle", 1e-4),  # Adam's normalisation magnifies rounding of the summed gradient
    ({"name": "delta", "kinds": ["lora"]}, "prototype", 1e-5),
    ({"name": "experts", "concentration": 0.0}, "prototype", 1e-5),  # routing losses are per process's share
], ids=["full_finetune", "lora", "experts"])
def test_two_gloo_processes_train_as_one_process(tiny_run_yaml, strategy, router, atol, tmp_path, tiny_backbone,
                                                 monkeypatch):
    """Same global batch: the same accuracy matrix and trained weights equal within float tolerance; exactly one
    MLflow run and one run folder come out of the two processes."""
    from mlflow.tracking import MlflowClient

    from continual.recipes.run import load_config, run_experiment

    config = tiny_config(tiny_run_yaml, tiny_backbone, strategy=strategy, router={"name": router})
    monkeypatch.chdir(tmp_path)
    run_experiment(load_config(config, ["tracking.run_name=one"]), echo=lambda *_: None)
    done = torchrun("run", str(config), "tracking.run_name=two", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "x 2 processes (gloo)" in done.stdout
    outputs = tmp_path / "outputs" / "dp"
    assert_same_run(outputs / "one", outputs / "two", atol)
    assert sorted(p.name for p in outputs.iterdir()) == ["one", "two"]  # no folder of rank 1's
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("dp").experiment_id])
    assert sorted(r.info.run_name for r in runs) == ["one", "two"]
    two = next(r for r in runs if r.info.run_name == "two")
    assert two.info.status == "FINISHED"
    assert sorted(m.step for m in client.get_metric_history(two.info.run_id, "acc/mean_seen")) == [0, 1, 2]
    summary = json.loads((outputs / "two" / "summary.json").read_text())
    losses = [r["train_loss"] for r in summary["result"]["records"]]
    one = json.loads((outputs / "one" / "summary.json").read_text())
    expected = [r["train_loss"] for r in one["result"]["records"]]
    assert losses == pytest.approx(expected, rel=1e-5)  # the global batches' losses, not one process's shares


@pytest.mark.slow
def test_a_run_killed_in_one_process_resumes_on_two(tiny_run_yaml, tmp_path, tiny_backbone, monkeypatch):
    """A resumed run may use another number of processes: killed during task 1 in one process, resumed under torchrun
    with two, it ends with the uninterrupted run's matrix (router statistics and run state included)."""
    from continual.recipes.run import load_config, run_experiment

    config = tiny_config(tiny_run_yaml, tiny_backbone, router={"name": "prototype"})
    monkeypatch.chdir(tmp_path)
    run_experiment(load_config(config, ["tracking.run_name=whole"]), echo=lambda *_: None)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CONTINUAL_KILL_AT": "train:1"}
    killed = subprocess.run([sys.executable, "-m", "continual", "run", str(config), "tracking.run_name=killed"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert killed.returncode == -9, killed.stderr[-2000:]
    resumed = torchrun("resume", str(tmp_path / "outputs" / "dp" / "killed"), cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming" in resumed.stdout and "x 2 processes" in resumed.stdout
    assert_same_run(tmp_path / "outputs" / "dp" / "whole", tmp_path / "outputs" / "dp" / "killed", 1e-5)
