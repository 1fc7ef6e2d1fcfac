"""MLflow tracking against real stores: an embedded SQLite store and a real `mlflow server` (continual/tracking.py),
with outages, resumed runs, `continual sync` (continual/tracking_sync.py) and processes sharing one new store."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from continual.cli import main
from continual.tracking import (
    JOURNAL_DIR,
    QUICK_HTTP_SETTINGS,
    ExperimentTracker,
    Journal,
    TrackingOfflineWarning,
    bounded_http,
    resolve_tracking_uri,
)

mlflow = pytest.importorskip("mlflow")
from mlflow.exceptions import MlflowException  # noqa: E402
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


class MlflowServer:
    """A real `mlflow server` on a free local port with SQLite metadata and proxied artifacts. It can be stopped and
    started again on the same port and store (an outage)."""

    def __init__(self, root: Path):
        self.root = root
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = None

    def start(self) -> None:
        command = [
            str(Path(sys.executable).parent / "mlflow"), "server",
            "--backend-store-uri", f"sqlite:///{self.root / 'srv.db'}",
            "--artifacts-destination", str(self.root / "art"),
            "--serve-artifacts",
            "--host", "127.0.0.1", "--port", str(self.port),
            "--workers", "1",
        ]
        env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
        log_path = self.root / "server.log"
        with log_path.open("ab") as log:
            # Own process group, so stop() ends the server and any worker it forked, and nothing else.
            self.proc = subprocess.Popen(command, cwd=self.root, env=env, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        deadline = time.monotonic() + 60.0
        while True:
            if self.proc.poll() is not None:
                pytest.fail(f"mlflow server exited with {self.proc.returncode}:\n{log_path.read_text()}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"mlflow server not healthy after 60 s:\n{log_path.read_text()}")
            time.sleep(0.25)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=15)


@pytest.fixture
def mlflow_server(tmp_path_factory):
    """A started :class:`MlflowServer`, always stopped at the end."""
    server = MlflowServer(tmp_path_factory.mktemp("server"))
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.mark.slow
def test_real_server_round_trip(mlflow_server, tmp_path):
    url, root = mlflow_server.url, mlflow_server.root
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


# -- the journal, outages, resumed runs and `continual sync` ---------------------------------------------------------


def _journal(run_dir: Path):
    lines = (run_dir / "tracking" / "journal.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def _steps(client, run_id, key="acc"):
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def _sync(capsys, *args):
    """``continual sync ARGS`` in this process: (exit code, stdout, stderr)."""
    code = main(["sync", *map(str, args)])
    out = capsys.readouterr()
    return code, out.out, out.err


def _log_a_run(tracker, run_dir: Path, steps) -> None:
    (run_dir / "matrix.csv").write_text("after_task,a\na,0.5\n")
    tracker.log_params({"lr": 0.1, "tasks": ["a", "b"]})
    for step in steps:
        tracker.log_metrics({"acc": 0.1 * (step + 1)}, step=step)


def test_journal_records_every_call_and_the_run(shared_uri, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    with ExperimentTracker("exp-journal", "journaled", uri=shared_uri, tags={"stream": "s"},
                           journal=run_dir / JOURNAL_DIR) as tracker:
        _log_a_run(tracker, run_dir, steps=[0, 1])
        tracker.log_text("hello", "report/table.txt")
        tracker.log_artifact(run_dir / "matrix.csv", artifact_path="csv")
        tracker.set_tags({"phase": "done"})
    info = json.loads((run_dir / "tracking" / "run.json").read_text())
    assert {k: info[k] for k in ("experiment", "run_name", "tags", "uri", "run_id")} == {
        "experiment": "exp-journal", "run_name": "journaled", "tags": {"stream": "s"}, "uri": shared_uri,
        "run_id": tracker.run_id}
    entries = _journal(run_dir)
    assert [e["kind"] for e in entries] == ["open", "params", "metrics", "metrics", "text", "artifact", "tags", "status"]
    assert all(e["stored"] for e in entries)
    assert entries[0]["run_id"] == tracker.run_id and entries[0]["resumed"] is False
    assert entries[2]["step"] == 0 and entries[2]["metrics"] == {"acc": 0.1}
    assert entries[4]["path"] == "tracking/texts/report/table.txt"
    assert (run_dir / entries[4]["path"]).read_text() == "hello"
    assert entries[5]["path"] == "matrix.csv" and entries[5]["artifact_path"] == "csv"  # relative to the run folder
    assert entries[-1]["status"] == "FINISHED"
    assert MlflowClient(shared_uri).get_run(tracker.run_id).data.tags["phase"] == "done"


def test_store_failing_mid_run_goes_offline_once_and_sync_fills_the_run(shared_uri, tmp_path, monkeypatch, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    real_log_batch = MlflowClient.log_batch
    calls = []

    def failing_log_batch(self, run_id, metrics=(), params=(), tags=(), *args, **kwargs):
        calls.append(run_id)
        if any(m.step >= 2 for m in metrics):
            raise MlflowException("API request to http://gone failed: Connection refused")
        return real_log_batch(self, run_id, metrics, params, tags, *args, **kwargs)

    monkeypatch.setattr(MlflowClient, "log_batch", failing_log_batch)
    with pytest.warns(TrackingOfflineWarning) as caught:
        with ExperimentTracker("exp-outage", "outage", uri=shared_uri, journal=run_dir / JOURNAL_DIR) as tracker:
            _log_a_run(tracker, run_dir, steps=[0, 1, 2, 3, 4])
            tracker.log_artifact(run_dir / "matrix.csv")
            assert tracker.offline
            line = tracker.describe()
    assert len([w for w in caught if w.category is TrackingOfflineWarning]) == 1
    message = str(caught[0].message)
    assert shared_uri in message and "Connection refused" in message and f"continual sync {run_dir}" in message
    assert "offline" in line and f"continual sync {run_dir}" in line
    assert len(calls) == 4  # params, steps 0 and 1, the failing step 2; nothing after
    stored = {e["step"]: e["stored"] for e in _journal(run_dir) if e["kind"] == "metrics"}
    assert stored == {0: True, 1: True, 2: False, 3: False, 4: False}
    client = MlflowClient(shared_uri)
    assert _steps(client, tracker.run_id) == [(0, 0.1), (1, 0.2)]
    assert client.get_run(tracker.run_id).info.status == "RUNNING"  # the end never reached the store

    monkeypatch.setattr(MlflowClient, "log_batch", real_log_batch)  # the store is back
    code, out, _ = _sync(capsys, run_dir)
    assert code == 0 and "3 metric values" in out and "status FINISHED" in out
    assert [s for s, _ in _steps(client, tracker.run_id)] == [0, 1, 2, 3, 4]
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED" and run.data.params == {"lr": "0.1", "tasks": "['a', 'b']"}
    assert _artifact_paths(client, tracker.run_id) == ["matrix.csv"]
    lines = len(_journal(run_dir))
    code, out, _ = _sync(capsys, run_dir)  # twice: nothing more
    assert code == 0 and "nothing to upload" in out
    assert len(_journal(run_dir)) == lines
    assert [s for s, _ in _steps(client, tracker.run_id)] == [0, 1, 2, 3, 4]


def test_unreachable_store_from_the_start_then_sync_to_another_store(tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    dead = f"http://127.0.0.1:{_free_port()}"  # nothing listens there
    began = time.monotonic()
    with pytest.warns(TrackingOfflineWarning, match="unreachable"):
        with ExperimentTracker("exp-dead", "dead", uri=dead, tags={"stream": "s"},
                               journal=run_dir / JOURNAL_DIR) as tracker:
            _log_a_run(tracker, run_dir, steps=[0, 1, 2])
            tracker.log_text("cfg: 1", "config.yaml")
            tracker.log_artifact(run_dir / "matrix.csv", artifact_path="csv")
            assert "offline" in tracker.describe() and "not created" in tracker.describe()
    assert time.monotonic() - began < 30  # one bounded failure, not MLflow's minutes of retries
    assert tracker.run_id is None and tracker.run_url() is None
    assert not any(e.get("stored") for e in _journal(run_dir))
    assert "MLFLOW_HTTP_REQUEST_MAX_RETRIES" not in os.environ  # set for the tracker's calls only

    code, _, err = _sync(capsys, run_dir)  # its own store is still down: a clear error, no traceback
    assert code == 2 and err.startswith("error: could not sync") and dead in err and "again" in err
    other = f"sqlite:///{tmp_path / 'other.db'}"
    code, out, _ = _sync(capsys, run_dir, "--uri", other)
    assert code == 0 and "new run" in out
    client = MlflowClient(other)
    (run,) = client.search_runs([client.get_experiment_by_name("exp-dead").experiment_id])
    assert run.info.run_name == "dead" and run.info.status == "FINISHED" and run.data.tags["stream"] == "s"
    assert run.data.params == {"lr": "0.1", "tasks": "['a', 'b']"}
    assert _steps(client, run.info.run_id) == [(0, 0.1), (1, 0.2), (2, pytest.approx(0.3))]
    assert _artifact_paths(client, run.info.run_id) == ["config.yaml", "csv"]
    code, out, _ = _sync(capsys, run_dir, "--uri", other)
    assert code == 0 and "nothing to upload" in out
    assert len(client.search_runs([run.info.experiment_id])) == 1
    assert json.loads((run_dir / "tracking" / "run.json").read_text())["uri"] == dead  # the run's own store


def test_sync_to_its_own_store_creates_the_run_it_never_had(tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    db = tmp_path / "later.db"
    uri = f"sqlite:///{db}"
    db.mkdir()  # a folder where the database should be: the store cannot open
    with pytest.warns(TrackingOfflineWarning):
        with ExperimentTracker("exp-later", "later", uri=uri, journal=run_dir / JOURNAL_DIR) as tracker:
            _log_a_run(tracker, run_dir, steps=[0, 1])
    db.rmdir()
    code, out, _ = _sync(capsys, run_dir)
    assert code == 0 and "new run" in out
    run_id = json.loads((run_dir / "tracking" / "run.json").read_text())["run_id"]  # recorded for a resume
    client = MlflowClient(uri)
    assert [s for s, _ in _steps(client, run_id)] == [0, 1]
    assert client.get_run(run_id).info.status == "FINISHED"
    assert "nothing to upload" in _sync(capsys, run_dir)[1]


def test_resumed_run_continues_the_same_run_without_duplicate_steps(shared_uri, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    with pytest.raises(KeyboardInterrupt):
        with ExperimentTracker("exp-resume", "resumed", uri=shared_uri, journal=run_dir / JOURNAL_DIR) as first:
            _log_a_run(first, run_dir, steps=[0, 1])
            raise KeyboardInterrupt
    client = MlflowClient(shared_uri)
    assert client.get_run(first.run_id).info.status == "FAILED"

    with ExperimentTracker("exp-resume", "resumed", uri=shared_uri, journal=run_dir / JOURNAL_DIR,
                           run_id=first.run_id) as second:
        assert client.get_run(first.run_id).info.status == "RUNNING"
        second.log_params({"lr": 0.1, "tasks": ["a", "b"], "seed": 3})  # the same params again, and a new one
        with pytest.warns(UserWarning, match="lr"):
            second.log_params({"lr": 0.5})  # MLflow params cannot change: kept, with a warning
        second.log_metrics({"acc": 0.9, "loss": 1.0}, step=1)  # step 1 of acc was logged before the crash
        second.log_metrics({"acc": 0.3}, step=2)
    assert second.run_id == first.run_id
    run = client.get_run(first.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params == {"lr": "0.1", "tasks": "['a', 'b']", "seed": "3"}
    assert _steps(client, first.run_id) == [(0, 0.1), (1, 0.2), (2, 0.3)]
    assert _steps(client, first.run_id, "loss") == [(1, 1.0)]
    assert len(client.search_runs([run.info.experiment_id])) == 1
    opens = [e for e in _journal(run_dir) if e["kind"] == "open"]
    assert [(e["run_id"], e["resumed"]) for e in opens] == [(first.run_id, False), (first.run_id, True)]


def test_sync_refuses_a_folder_without_a_journal(tmp_path, capsys):
    code, _, err = _sync(capsys, tmp_path / "missing")
    assert code == 2 and "is not a folder" in err
    code, _, err = _sync(capsys, tmp_path)
    assert code == 2 and "no tracking journal" in err and "Traceback" not in err


def test_bounded_http_sets_mlflow_retries_only_inside_and_respects_the_user(monkeypatch):
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", raising=False)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "7")
    with bounded_http():
        assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == QUICK_HTTP_SETTINGS["MLFLOW_HTTP_REQUEST_MAX_RETRIES"]
        assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "7"
    assert "MLFLOW_HTTP_REQUEST_MAX_RETRIES" not in os.environ
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "7"


@pytest.mark.slow
def test_server_stopped_mid_run_then_sync_fills_the_same_run(mlflow_server, tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    url = mlflow_server.url
    with pytest.warns(TrackingOfflineWarning) as caught:
        with ExperimentTracker("exp-served", "served", uri=url, journal=run_dir / JOURNAL_DIR) as tracker:
            _log_a_run(tracker, run_dir, steps=[0, 1])
            tracker.log_artifact(run_dir / "matrix.csv", artifact_path="csv")
            mlflow_server.stop()
            for step in (2, 3, 4):
                tracker.log_metrics({"acc": 0.1 * (step + 1)}, step=step)
            tracker.log_text("after the outage", "report/late.txt")
    assert len([w for w in caught if w.category is TrackingOfflineWarning]) == 1
    assert url in str(caught[0].message) and f"continual sync {run_dir}" in str(caught[0].message)
    stored = {e["step"]: e["stored"] for e in _journal(run_dir) if e["kind"] == "metrics"}
    assert stored == {0: True, 1: True, 2: False, 3: False, 4: False}

    mlflow_server.start()  # same port, same store
    code, out, _ = _sync(capsys, run_dir)
    assert code == 0 and f"run {tracker.run_id}" in out and "new run" not in out
    client = MlflowClient(url)
    assert [s for s, _ in _steps(client, tracker.run_id)] == [0, 1, 2, 3, 4]  # every step exactly once
    assert client.get_run(tracker.run_id).info.status == "FINISHED"
    assert _artifact_paths(client, tracker.run_id) == ["csv", "report"]
    assert "nothing to upload" in _sync(capsys, run_dir)[1]
    assert [s for s, _ in _steps(client, tracker.run_id)] == [0, 1, 2, 3, 4]


_RACER = """
import sys, time
from pathlib import Path
import mlflow.tracking  # the slow import first, so the processes reach the store together
from continual.tracking import ExperimentTracker
folder, index = Path(sys.argv[1]), sys.argv[2]
(folder / f"ready-{index}").touch()
while not (folder / "go").exists():
    time.sleep(0.01)
with ExperimentTracker("exp-race", f"racer-{index}", uri=sys.argv[3]) as tracker:
    tracker.log_metrics({"acc": float(index)}, step=0)
"""


@pytest.mark.slow
def test_processes_creating_one_sqlite_store_at_once_all_succeed(tmp_path):
    uri = f"sqlite:///{tmp_path / 'fresh.db'}"  # no store there yet: every process would create and migrate it
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root)}
    racers = [subprocess.Popen([sys.executable, "-c", _RACER, str(tmp_path), str(i), uri], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for i in range(4)]
    try:
        deadline = time.monotonic() + 120
        while len(list(tmp_path.glob("ready-*"))) < len(racers) and time.monotonic() < deadline:
            time.sleep(0.05)
        (tmp_path / "go").touch()
        outputs = [racer.communicate(timeout=120)[0].decode() for racer in racers]
    finally:
        for racer in racers:
            if racer.poll() is None:
                racer.kill()
    assert [racer.returncode for racer in racers] == [0] * 4, "\n".join(outputs)
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("exp-race").experiment_id])
    assert sorted(r.info.run_name for r in runs) == [f"racer-{i}" for i in range(4)]
    assert all(r.info.status == "FINISHED" for r in runs)
    assert sorted(r.data.metrics["acc"] for r in runs) == [0.0, 1.0, 2.0, 3.0]


def test_sync_of_a_run_still_going_marks_it_killed_until_its_end_is_synced(tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    db = tmp_path / "unopenable.db"
    db.mkdir()  # the run's own store cannot open: offline from the start
    tracker = ExperimentTracker("exp-going", "going", uri=f"sqlite:///{db}", journal=run_dir / JOURNAL_DIR)
    with pytest.warns(TrackingOfflineWarning):
        tracker.__enter__()
    _log_a_run(tracker, run_dir, steps=[0, 1])
    other = f"sqlite:///{tmp_path / 'other.db'}"
    code, out, _ = _sync(capsys, run_dir, "--uri", other)  # as if the process had died here
    assert code == 0 and "status KILLED" in out
    client = MlflowClient(other)
    (run,) = client.search_runs([client.get_experiment_by_name("exp-going").experiment_id])
    assert run.info.status == "KILLED"

    tracker.log_metrics({"acc": 0.3}, step=2)
    tracker.__exit__(None, None, None)
    code, out, _ = _sync(capsys, run_dir, "--uri", other)  # the same run there gets the rest
    assert code == 0 and "1 metric values" in out and "0 params" in out and "new run" not in out
    assert client.get_run(run.info.run_id).info.status == "FINISHED"
    assert [s for s, _ in _steps(client, run.info.run_id)] == [0, 1, 2]


def test_journal_survives_a_line_torn_by_a_crash(tmp_path):
    journal = Journal(tmp_path / "run" / JOURNAL_DIR)
    journal.start()
    journal.append("metrics", step=0, metrics={"acc": 0.5}, stored=False)
    with journal.path.open("a") as f:
        f.write('{"kind":"metrics","st')  # the process died in the middle of a write
    journal.start()  # the next tracker on this journal
    journal.append("status", status="FINISHED", stored=False)
    assert [(n, e["kind"]) for n, e in journal.entries()] == [(0, "metrics"), (2, "status")]
    journal.write_info({"run_id": "abc"})
    assert journal.read_info() == {"run_id": "abc"}
    assert sorted(p.name for p in journal.folder.iterdir()) == ["journal.jsonl", "run.json"]  # no temporary left
