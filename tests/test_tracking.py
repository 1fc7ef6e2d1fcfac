"""MLflow tracking against real stores: an embedded SQLite store and a real `mlflow server` (continual/tracking.py)."""

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from continual.tracking import ExperimentTracker, resolve_tracking_uri

mlflow = pytest.importorskip("mlflow")
from mlflow.tracking import MlflowClient  # noqa: E402


@pytest.fixture(scope="module")
def shared_uri(tmp_path_factory):
    """One SQLite store for the tests that do not care where it lives (creating a store costs ~1.5 s)."""
    return f"sqlite:///{tmp_path_factory.mktemp('store') / 'mlflow.db'}"


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """Every test runs in its own empty folder with no tracking URI in the environment."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tmp_path


def _artifact_paths(client, run_id, path=None):
    return sorted(f.path for f in client.list_artifacts(run_id, path))


def test_run_has_name_experiment_params_metrics_and_artifacts(shared_uri, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRUNCATE_LONG_VALUES", "false")  # MLflow rejects long values: the tracker must cut
    batch_sizes = []  # params per log_batch call, as sent to MLflow (a server rejects more than 100)
    real_log_batch = MlflowClient.log_batch

    def spy_log_batch(self, run_id, metrics=(), params=(), tags=(), *args, **kwargs):
        batch_sizes.append(len(params))
        return real_log_batch(self, run_id, metrics, params, tags, *args, **kwargs)

    monkeypatch.setattr(MlflowClient, "log_batch", spy_log_batch)
    table = tmp_path / "matrix.csv"
    table.write_text("after_task,a\na,0.5\n")
    plots = tmp_path / "plots"
    plots.mkdir()
    (plots / "heat.png").write_bytes(b"png")
    uri_before = mlflow.get_tracking_uri()

    with ExperimentTracker("exp-main", run_name="lora-r8", uri=shared_uri, tags={"stream": "standard"}) as tracker:
        assert tracker.run_id is not None
        many = {f"p{i:03d}": i for i in range(150)}  # more than one batch of 100
        tracker.log_params({"lr": 1e-4, "tasks": ["dbpedia", "amazon"], "long": "x" * 7000, **many})
        tracker.log_metrics({"acc": 0.5, "bwt": float("nan"), "fwt": None}, step=0)
        tracker.log_metrics({"acc": 0.75}, step=1)
        tracker.log_metrics({"final": 0.9})
        tracker.log_text("hello table", "report/table.txt")
        tracker.log_artifact(table)
        tracker.log_artifact(table, artifact_path="csv")
        tracker.log_artifact(plots, artifact_path="plots")
        run_id = tracker.run_id

    assert mlflow.active_run() is None  # no global run left behind
    assert mlflow.get_tracking_uri() == uri_before  # global tracking URI untouched
    client = MlflowClient(shared_uri)
    run = client.get_run(run_id)
    assert run.info.run_name == "lora-r8"
    assert run.info.status == "FINISHED"
    assert client.get_experiment(run.info.experiment_id).name == "exp-main"
    assert run.data.tags["stream"] == "standard"

    params = run.data.params
    assert len(params) == 153
    assert max(batch_sizes) <= 100 and sum(batch_sizes) == 153
    assert params["lr"] == "0.0001"
    assert params["tasks"] == "['dbpedia', 'amazon']"
    assert params["long"] == "x" * 6000
    assert params["p149"] == "149"

    history = client.get_metric_history(run_id, "acc")
    assert sorted((m.step, m.value) for m in history) == [(0, 0.5), (1, 0.75)]
    assert "bwt" not in run.data.metrics and "fwt" not in run.data.metrics
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "final")] == [(0, 0.9)]

    assert _artifact_paths(client, run_id) == ["csv", "matrix.csv", "plots", "report"]
    assert _artifact_paths(client, run_id, "plots") == ["plots/heat.png"]
    assert _artifact_paths(client, run_id, "csv") == ["csv/matrix.csv"]
    text = Path(client.download_artifacts(run_id, "report/table.txt", str(tmp_path / "dl")))
    assert text.read_text() == "hello table"


def test_exception_marks_run_failed_and_propagates(shared_uri):
    tracker = ExperimentTracker("exp-main", run_name="crash", uri=shared_uri)
    with pytest.raises(ZeroDivisionError):
        with tracker:
            tracker.log_metrics({"acc": 0.1}, step=0)
            1 / 0
    run = MlflowClient(shared_uri).get_run(tracker.run_id)
    assert run.info.status == "FAILED"
    assert run.data.metrics["acc"] == 0.1
    assert mlflow.active_run() is None


def test_same_experiment_is_reused(shared_uri):
    with ExperimentTracker("exp-reused", run_name="one", uri=shared_uri) as first:
        pass
    with ExperimentTracker("exp-reused", run_name="two", uri=shared_uri) as second:
        pass
    client = MlflowClient(shared_uri)
    experiment = client.get_experiment_by_name("exp-reused")
    runs = client.search_runs([experiment.experiment_id])
    assert sorted(r.info.run_name for r in runs) == ["one", "two"]
    assert {first.run_id, second.run_id} == {r.info.run_id for r in runs}


def test_logging_outside_the_context_is_an_error(shared_uri):
    tracker = ExperimentTracker("exp-main", run_name="outside", uri=shared_uri)
    with pytest.raises(RuntimeError, match="not running"):
        tracker.log_metrics({"acc": 1.0})
    with tracker:
        pass
    with pytest.raises(RuntimeError, match="not running"):
        tracker.log_params({"a": 1})


def test_describe_names_run_experiment_and_uri(shared_uri):
    with ExperimentTracker("exp-main", run_name="described", uri=shared_uri) as tracker:
        line = tracker.describe()
    assert line == f"mlflow run {tracker.run_id} in experiment exp-main at {shared_uri}"
    assert tracker.run_url() is None  # not an HTTP server


def test_disabled_tracker_does_nothing(tmp_path):
    with ExperimentTracker("exp", run_name="off", enabled=False, tags={"a": 1}) as tracker:
        tracker.log_params({"lr": 0.1})
        tracker.log_metrics({"acc": 0.5}, step=3)
        tracker.log_text("x", "x.txt")
        tracker.log_artifact(tmp_path / "does-not-exist.csv")
    assert tracker.run_id is None
    assert tracker.run_url() is None
    assert "disabled" in tracker.describe()
    assert list(tmp_path.iterdir()) == []  # no mlflow.db, no mlruns
    with pytest.raises(KeyError):  # exceptions still propagate through a disabled tracker
        with ExperimentTracker("exp", run_name="off", enabled=False):
            raise KeyError("boom")


def test_resolve_tracking_uri(tmp_path, monkeypatch):
    default = resolve_tracking_uri(None)
    assert default == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    assert resolve_tracking_uri("") == default
    assert resolve_tracking_uri("sqlite:///sub/x.db") == f"sqlite:///{tmp_path.resolve() / 'sub' / 'x.db'}"
    assert resolve_tracking_uri("sqlite:////abs/x.db") == "sqlite:////abs/x.db"
    assert resolve_tracking_uri("http://127.0.0.1:5000") == "http://127.0.0.1:5000"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://example.invalid:5000")
    assert resolve_tracking_uri(None) == "http://example.invalid:5000"
    assert resolve_tracking_uri("sqlite:////abs/y.db") == "sqlite:////abs/y.db"  # explicit wins over env
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///rel.db")
    assert resolve_tracking_uri(None) == f"sqlite:///{tmp_path.resolve() / 'rel.db'}"


def test_default_store_is_mlflow_db_in_the_starting_folder(tmp_path, monkeypatch):
    tracker = ExperimentTracker("exp-default", run_name="default")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # the store was fixed when the tracker was built
    with tracker:
        tracker.log_metrics({"acc": 0.5})
    assert (tmp_path / "mlflow.db").is_file()
    assert not (elsewhere / "mlflow.db").exists()
    run = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_run(tracker.run_id)
    assert run.info.run_name == "default"


def test_env_tracking_uri_is_honoured(tmp_path, monkeypatch):
    env_uri = f"sqlite:///{tmp_path / 'from-env.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", env_uri)
    with ExperimentTracker("exp-env", run_name="env") as tracker:
        tracker.log_params({"source": "env"})
    assert tracker.uri == env_uri
    assert not (tmp_path / "mlflow.db").exists()
    run = MlflowClient(env_uri).get_run(tracker.run_id)
    assert run.data.params == {"source": "env"}


def test_import_does_not_load_mlflow():
    root = Path(__file__).resolve().parents[1]
    code = "import sys, continual.tracking; print('mlflow' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=root,
                         env={"PYTHONPATH": str(root), "PATH": ""})
    assert out.stdout.strip() == "False"


# -- a real tracking server -------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` on a free local port with SQLite metadata and proxied artifacts; always stopped."""
    root = tmp_path_factory.mktemp("server")
    port = _free_port()
    executable = Path(sys.executable).parent / "mlflow"
    command = [
        str(executable), "server",
        "--backend-store-uri", f"sqlite:///{root / 'srv.db'}",
        "--artifacts-destination", str(root / "art"),
        "--serve-artifacts",
        "--host", "127.0.0.1", "--port", str(port),
        "--workers", "1",
    ]
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    log = (root / "server.log").open("wb")
    # Own process group, so teardown stops the server and any worker it forked, and nothing else.
    proc = subprocess.Popen(command, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60.0
        while True:
            if proc.poll() is not None:
                pytest.fail(f"mlflow server exited with {proc.returncode}:\n{(root / 'server.log').read_text()}")
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"mlflow server not healthy after 60 s:\n{(root / 'server.log').read_text()}")
            time.sleep(0.25)
        yield url, root
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=15)
        log.close()


@pytest.mark.slow
def test_real_server_round_trip(mlflow_server, tmp_path):
    url, root = mlflow_server
    table = tmp_path / "matrix.csv"
    table.write_text("after_task,a\na,0.5\n")
    with ExperimentTracker("exp-server", run_name="served", uri=url) as tracker:
        tracker.log_params({"lr": 3e-4, "tasks": ["a", "b"]})
        tracker.log_metrics({"acc": 0.4, "fwt": float("nan")}, step=0)
        tracker.log_metrics({"acc": 0.6}, step=1)
        tracker.log_text("served table", "report/table.txt")
        tracker.log_artifact(table, artifact_path="csv")
    assert tracker.run_url().startswith(f"{url}/#/experiments/")
    assert tracker.describe() == f"mlflow run {tracker.run_id} in experiment exp-server at {url}"

    client = MlflowClient(url)
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "served"
    assert client.get_experiment(run.info.experiment_id).name == "exp-server"
    assert run.data.params == {"lr": "0.0003", "tasks": "['a', 'b']"}
    assert sorted((m.step, m.value) for m in client.get_metric_history(tracker.run_id, "acc")) == [(0, 0.4), (1, 0.6)]
    assert "fwt" not in run.data.metrics
    assert _artifact_paths(client, tracker.run_id) == ["csv", "report"]
    assert _artifact_paths(client, tracker.run_id, "csv") == ["csv/matrix.csv"]
    # The artifacts went through the server into its artifact destination, not into this folder.
    stored = [p.relative_to(root / "art") for p in (root / "art").rglob("*") if p.is_file()]
    assert any(p.parts[-2:] == ("csv", "matrix.csv") for p in stored)
    assert not (tmp_path / "mlruns").exists()

    with pytest.raises(RuntimeError):
        with ExperimentTracker("exp-server", run_name="served-crash", uri=url) as failing:
            raise RuntimeError("boom")
    assert client.get_run(failing.run_id).info.status == "FAILED"
