"""Runs that survive a crash: the run state after every task, `continual resume`, `eval`, `predict` and `load_run`.

The fault-injection test kills real processes with SIGKILL (during training, during evaluation, halfway through
writing the state) and checks that every resumed accuracy matrix equals the uninterrupted one, in one MLflow run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from continual.cli import main
from continual.config import ConfigError

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("one_cpu_thread")


def tiny_config(make, **sections) -> Path:
    """A 3-task tiny run with the prototype router by default, in the experiment "resume"."""
    return make(**{"router": {"name": "prototype"}, **sections, "tracking": {"experiment": "resume"}})


def run_dir(tmp_path: Path, name: str) -> Path:
    return tmp_path / "outputs" / "resume" / name


def matrix(folder: Path) -> list:
    return json.loads((folder / "summary.json").read_text())["result"]["matrix"]


def cli(*args: str, env: dict | None = None, cwd: Path) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "continual", *args], cwd=cwd, env=full_env, capture_output=True,
                          text=True, timeout=600)


@pytest.mark.slow
def test_runs_killed_at_several_points_resume_to_the_uninterrupted_matrix(tiny_run_yaml, tmp_path):
    from mlflow.tracking import MlflowClient

    config = tiny_config(tiny_run_yaml)
    done = cli("run", str(config), "tracking.run_name=whole", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    expected = matrix(run_dir(tmp_path, "whole"))
    trials = []
    for point in ("train:1", "eval:1", "write:1", "train:2"):
        name = "killed-" + point.replace(":", "")
        killed = cli("run", str(config), f"tracking.run_name={name}", env={"CONTINUAL_KILL_AT": point}, cwd=tmp_path)
        assert killed.returncode == -9, (point, killed.stderr[-2000:])  # SIGKILL: no cleanup ran
        assert not (run_dir(tmp_path, name) / "summary.json").exists()
        resumed = cli("resume", str(run_dir(tmp_path, name)), cwd=tmp_path)
        assert resumed.returncode == 0, (point, resumed.stderr[-2000:])
        assert "resuming" in resumed.stdout
        got = matrix(run_dir(tmp_path, name))
        trials.append((point, got == expected))
        assert got == expected, f"killed at {point}: {got} != {expected}"
        again = cli("resume", str(run_dir(tmp_path, name)), cwd=tmp_path)  # a finished run: nothing changes
        assert again.returncode == 0 and "already finished" in again.stdout
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("resume")
    runs = client.search_runs([experiment.experiment_id])
    assert sorted(r.info.run_name for r in runs) == sorted(["whole"] + [f"killed-{p.replace(':', '')}" for p, _ in trials])
    for run in runs:  # one MLflow run per run folder, each task's step logged once, finished
        assert run.info.status == "FINISHED"
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "acc/mean_seen")]
        assert sorted(steps) == [0, 1, 2], (run.info.run_name, steps)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", [
    {"name": "replay", "mem_size": 12},
    {"name": "ewc"},
    {"name": "lwf"},
    {"name": "experts", "prune_threshold": 0.3, "experts_per_task": 3},
    {"name": "joint"},
])
def test_each_strategys_own_state_resumes_exactly(tiny_run_yaml, strategy, tmp_path, monkeypatch):
    """An interruption after the first task (an exception here, in process) and a resume give the uninterrupted
    matrix: EWC's importances, the replay memory, LwF's teacher and the experts' pruning history are restored."""
    from continual.recipes.run import load_config, resume_experiment, run_experiment

    router = {"name": "oracle"} if strategy["name"] in ("replay", "ewc", "lwf", "joint") else {"name": "prototype"}
    config = tiny_config(tiny_run_yaml, strategy=strategy, router=router)
    monkeypatch.chdir(tmp_path)
    whole = run_experiment(load_config(config, ["tracking.run_name=whole"]), echo=lambda *_: None)

    class Stop(BaseException):
        pass

    def stop(point: str, task: int) -> None:
        if (point, task) == ("train", 2 if strategy["name"] == "joint" else 1):
            raise Stop()

    import continual.learner as learner_module

    monkeypatch.setattr(learner_module, "kill_point", stop)
    with pytest.raises(Stop):
        run_experiment(load_config(config, ["tracking.run_name=cut"]), echo=lambda *_: None)
    monkeypatch.undo()
    monkeypatch.chdir(tmp_path)
    resumed = resume_experiment(run_dir(tmp_path, "cut"), echo=lambda *_: None)
    np.testing.assert_array_equal(resumed.matrix, whole.matrix)
    assert [r.train_loss for r in resumed.records] == [r.train_loss for r in whole.records]


def test_resume_refuses_a_changed_config_and_names_the_keys(tiny_run_yaml, tmp_path, capsys):
    config = tiny_config(tiny_run_yaml, router={"name": "oracle"})
    os.chdir(tmp_path)
    assert main(["run", str(config), "tracking.run_name=r"]) == 0
    folder = run_dir(tmp_path, "r")
    manifest = (folder / "state" / "manifest.json").read_text()
    capsys.readouterr()
    assert main(["resume", str(folder), "training.lr=0.5", "strategy.rank=4"]) == 2
    err = capsys.readouterr().err
    assert "training.lr" in err and "strategy.rank" in err and "Traceback" not in err
    assert (folder / "state" / "manifest.json").read_text() == manifest  # nothing changed
    # Keys that change no result may differ.
    assert main(["resume", str(folder), "training.progress=true"]) == 0
    assert "already finished" in capsys.readouterr().out


def test_a_corrupt_state_file_is_named_and_the_previous_state_is_kept(tiny_run_yaml, tmp_path, capsys,
                                                                     monkeypatch):
    import continual.training.run_state as run_state
    from continual.recipes.run import load_config, resume_experiment, run_experiment

    config = tiny_config(tiny_run_yaml, router={"name": "oracle"})
    monkeypatch.chdir(tmp_path)
    whole = run_experiment(load_config(config, ["tracking.run_name=whole"]), echo=lambda *_: None)

    class Stop(BaseException):
        pass

    def stop(point, task):
        if (point, task) == ("train", 2):
            raise Stop()

    import continual.learner as learner_module

    monkeypatch.setattr(learner_module, "kill_point", stop)
    with pytest.raises(Stop):
        run_experiment(load_config(config, ["tracking.run_name=cut"]), echo=lambda *_: None)
    monkeypatch.undo()
    monkeypatch.chdir(tmp_path)
    folder = run_dir(tmp_path, "cut")
    manifest = json.loads((folder / "state" / "manifest.json").read_text())
    assert manifest["latest"]["finished"] == 2 and manifest["previous"]["finished"] == 1
    latest = folder / "state" / manifest["latest"]["folder"] / "model.safetensors"
    latest.write_bytes(latest.read_bytes()[:-7])  # truncated
    assert main(["resume", str(folder)]) == 2
    err = capsys.readouterr().err
    assert str(latest) in err and "corrupt or truncated" in err and "--previous" in err
    assert latest.exists() and (folder / "state" / manifest["previous"]["folder"]).is_dir()  # nothing deleted
    with pytest.raises(run_state.RunStateError, match="corrupt"):
        run_state.read_state(folder)
    resumed = resume_experiment(folder, previous=True, echo=lambda *_: None)  # one task more to redo, same end
    np.testing.assert_array_equal(resumed.matrix, whole.matrix)


def test_not_a_run_folder_and_a_state_from_another_backbone(tmp_path, capsys):
    from continual.training.run_state import RunStateError, load_model_tensors
    import torch

    assert main(["resume", str(tmp_path)]) == 2
    assert "is not a run folder" in capsys.readouterr().err
    assert main(["eval", str(tmp_path)]) == 2
    assert "is not a run folder" in capsys.readouterr().err
    model = torch.nn.Linear(4, 2)
    with pytest.raises(RunStateError, match="backbone 'other'.*shapes differ"):
        load_model_tensors(model, {"weight": torch.zeros(3, 4)}, "other")
    with pytest.raises(RunStateError, match="does not have"):
        load_model_tensors(model, {"lora.weight": torch.zeros(3, 4)}, "other")


def test_eval_reproduces_the_last_row_and_predict_answers_with_the_router(tiny_run_yaml, tmp_path, capsys):
    import continual

    config = tiny_config(tiny_run_yaml)
    os.chdir(tmp_path)
    assert main(["run", str(config), "tracking.run_name=routed"]) == 0
    folder = run_dir(tmp_path, "routed")
    capsys.readouterr()
    assert main(["eval", str(folder)]) == 0
    saved = json.loads((folder / "eval.json").read_text())["accuracy"]
    last = matrix(folder)[-1]
    assert [saved[t] for t in ("SST-2", "agnews", "yahoo")] == last  # exactly the run's last row
    # Another split size: evaluated, not refused.
    assert main(["eval", str(folder), "stream.test_per_task=8"]) == 0
    # Predict: three lines of text, the router picks the task.
    inputs = tmp_path / "in.jsonl"
    inputs.write_text('{"text": "a wonderful, moving film"}\n"Stocks fell on Wall Street"\n{"sentence": "Who wrote the Iliad?"}\n')
    out = tmp_path / "out.jsonl"
    assert main(["predict", str(folder), "--input", str(inputs), "--output", str(out)]) == 0
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(lines) == 3
    run = continual.load_run(folder)
    for line in lines:
        assert line["task"] in ("SST-2", "agnews", "yahoo")
        labels = run.parts.tasks[run.task_names.index(line["task"])].labels
        assert line["label"] in labels and 0 < line["confidence"] <= 1
    # The Python API gives the same answers; a given task answers in that task's labels.
    same = run.predict(["a wonderful, moving film", "Stocks fell on Wall Street", "Who wrote the Iliad?"])
    assert [p.to_dict() for p in same] == [{k: v for k, v in line.items() if k != "text"} for line in lines]
    given = run.predict(["Stocks fell on Wall Street"], task="agnews")
    assert given[0].task == "agnews" and given[0].label in run.parts.tasks[1].labels
    with pytest.raises(ConfigError, match="not learnt"):
        run.predict(["x"], task="dbpedia")


def test_predict_without_a_task_on_an_oracle_run_asks_for_one(tiny_run_yaml, tmp_path, capsys):
    config = tiny_config(tiny_run_yaml, router={"name": "oracle"})
    os.chdir(tmp_path)
    assert main(["run", str(config), "tracking.run_name=oracle"]) == 0
    inputs = tmp_path / "in.jsonl"
    inputs.write_text('"some text"\n')
    capsys.readouterr()
    assert main(["predict", str(run_dir(tmp_path, "oracle")), "--input", str(inputs)]) == 2
    assert "--task" in capsys.readouterr().err
    assert main(["predict", str(run_dir(tmp_path, "oracle")), "--input", str(inputs), "--task", "yahoo"]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["task"] == "yahoo"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"txt": 1}\n')
    assert main(["predict", str(run_dir(tmp_path, "oracle")), "--input", str(bad), "--task", "yahoo"]) == 2
    assert "line 1" in capsys.readouterr().err


def test_state_writes_are_atomic_generations(tmp_path):
    import torch

    from continual.training.run_state import read_state, write_state

    (tmp_path / "config.yaml").write_text("seed: 0\n")
    write_state(tmp_path, 1, {"model": {"a": torch.ones(2)}}, {"result": {}}, {"seed": 0})
    write_state(tmp_path, 2, {"model": {"a": torch.full((2,), 2.0)}}, {"result": {}}, {"seed": 0})
    write_state(tmp_path, 3, {"model": {"a": torch.full((2,), 3.0)}}, {"result": {}}, {"seed": 0})
    folders = sorted(p.name for p in (tmp_path / "state").iterdir() if p.is_dir())
    assert len(folders) == 2  # the newest and the one before it
    assert read_state(tmp_path).finished == 3 and read_state(tmp_path, previous=True).finished == 2
    assert float(read_state(tmp_path).tensors["model"]["a"][0]) == 3.0
    # A write killed halfway leaves a temporary folder and the manifest untouched: the state is still the last one.
    (tmp_path / "state" / ".tmp-dead").mkdir()
    assert read_state(tmp_path).finished == 3
