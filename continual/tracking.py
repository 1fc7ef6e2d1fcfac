"""MLflow tracking at the edge of a run: one context manager that owns one MLflow run.

The tracker talks to MLflow through an explicit :class:`mlflow.tracking.MlflowClient` bound to one tracking URI, so it
neither reads nor changes MLflow's process-wide state (the global tracking URI, the fluent API's active-run stack).
A disabled tracker accepts every call and does nothing, so callers never branch on whether tracking is on.

Example::

    with ExperimentTracker("standard-order1", run_name="lora-r8", uri=None) as tracker:
        tracker.log_params({"lr": 1e-4, "tasks": ["dbpedia", "amazon"]})
        tracker.log_metrics({"acc": 0.71}, step=0)
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Optional, Union

if TYPE_CHECKING:  # mlflow takes seconds to import; it is imported when a tracker starts
    from mlflow.tracking import MlflowClient

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
MAX_PARAMS_PER_BATCH = 100  # MLflow's limit on params in one log_batch call
MAX_METRICS_PER_BATCH = 1000  # MLflow's limit on metrics in one log_batch call
MAX_PARAM_VALUE_LENGTH = 6000  # MLflow rejects longer param values
_SQLITE_PREFIX = "sqlite:///"


def _absolute_sqlite(uri: str) -> str:
    """Makes a relative ``sqlite:///file.db`` URI absolute against the current directory; other URIs pass through."""
    if not uri.startswith(_SQLITE_PREFIX):
        return uri
    location = uri[len(_SQLITE_PREFIX):]
    db_path, sep, query = location.partition("?")
    if not db_path or db_path == ":memory:" or os.path.isabs(db_path):
        return uri
    return _SQLITE_PREFIX + str(Path(db_path).resolve()) + sep + query


def resolve_tracking_uri(uri: Optional[str]) -> str:
    """Picks the tracking URI: the explicit one, else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///mlflow.db``.

    A relative SQLite path is made absolute against the current directory now, so a later ``chdir`` does not move
    the store.

    Args:
        uri: an explicit tracking URI, or None (an empty string counts as None).

    Returns:
        The tracking URI to use.
    """
    chosen = uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    return _absolute_sqlite(chosen)


def _param_value(value: Any) -> str:
    """MLflow stores params as strings of bounded length."""
    text = value if isinstance(value, str) else str(value)
    return text[:MAX_PARAM_VALUE_LENGTH]


class ExperimentTracker:
    """Context manager owning one MLflow run; every method is a no-op when ``enabled`` is False.

    On enter it creates the experiment if needed and starts the run; on exit it ends the run as FINISHED, or as
    FAILED when an exception is propagating (the exception is never swallowed).

    Args:
        experiment: MLflow experiment name; created when missing.
        run_name: name of the run shown in the MLflow UI.
        uri: tracking URI; see :func:`resolve_tracking_uri` for the fallbacks.
        enabled: False turns every method into a no-op that touches no store.
        tags: run tags; values are stringified.
    """

    def __init__(self, experiment: str, run_name: str, uri: Optional[str] = None, enabled: bool = True,
                 tags: Optional[Mapping[str, Any]] = None):
        self.experiment = experiment
        self.run_name = run_name
        self.enabled = enabled
        self.tags = {str(k): _param_value(v) for k, v in (tags or {}).items()}
        # Resolved now (not on enter) so the store does not depend on the directory at enter time.
        self.uri = resolve_tracking_uri(uri) if enabled else None
        self._client: Optional["MlflowClient"] = None
        self._run_id: Optional[str] = None
        self._experiment_id: Optional[str] = None

    # -- lifecycle ---------------------------------------------------------------------------------------------

    def __enter__(self) -> "ExperimentTracker":
        if not self.enabled:
            return self
        if self._run_id is not None:
            raise RuntimeError("ExperimentTracker is not re-entrant: this tracker already started a run")
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=self.uri)
        self._experiment_id = self._get_or_create_experiment(client)
        run = client.create_run(self._experiment_id, run_name=self.run_name, tags=self.tags)
        self._client, self._run_id = client, run.info.run_id
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if self.enabled and self._run_id is not None and self._client is not None:
            status = "FINISHED" if exc_type is None else "FAILED"
            self._client.set_terminated(self._run_id, status=status)
            self._client = None  # the run stays readable through run_id; logging after exit is an error
        return False

    def _get_or_create_experiment(self, client: "MlflowClient") -> str:
        from mlflow.exceptions import MlflowException

        found = client.get_experiment_by_name(self.experiment)
        if found is None:
            try:
                return client.create_experiment(self.experiment)
            except MlflowException:
                # Another process created it between our lookup and create; anything else re-raises below.
                found = client.get_experiment_by_name(self.experiment)
                if found is None:
                    raise
        if found.lifecycle_stage != "active":
            raise RuntimeError(
                f"MLflow experiment {self.experiment!r} at {self.uri} is deleted; restore it "
                f"(mlflow experiments restore --experiment-id {found.experiment_id}) or pick another name"
            )
        return found.experiment_id

    def _active_client(self) -> "MlflowClient":
        if self._client is None or self._run_id is None:
            raise RuntimeError("ExperimentTracker is not running: use it as `with ExperimentTracker(...) as t:`")
        return self._client

    # -- logging -----------------------------------------------------------------------------------------------

    def log_params(self, flat: Mapping[str, Any]) -> None:
        """Logs parameters, stringified (lists included) and cut to MLflow's 6000-character limit.

        Args:
            flat: a flat mapping ``{"training.lr": 1e-4, ...}``; nest-free keys are the caller's job.
        """
        if not self.enabled:
            return
        from mlflow.entities import Param

        client = self._active_client()
        params = [Param(str(k), _param_value(v)) for k, v in flat.items()]
        for start in range(0, len(params), MAX_PARAMS_PER_BATCH):
            client.log_batch(self._run_id, params=params[start:start + MAX_PARAMS_PER_BATCH])

    def log_metrics(self, metrics: Mapping[str, Optional[float]], step: Optional[int] = None) -> None:
        """Logs metric values at one step, skipping None and NaN (metrics that are undefined for this run).

        Args:
            metrics: ``{name: value}``.
            step: the step (e.g. the task index); 0 when None, as in MLflow.
        """
        if not self.enabled:
            return
        from mlflow.entities import Metric

        client = self._active_client()
        timestamp = int(time.time() * 1000)
        entries = [
            Metric(str(k), float(v), timestamp, int(step or 0))
            for k, v in metrics.items()
            if v is not None and not math.isnan(float(v))
        ]
        for start in range(0, len(entries), MAX_METRICS_PER_BATCH):
            client.log_batch(self._run_id, metrics=entries[start:start + MAX_METRICS_PER_BATCH])

    def log_text(self, text: str, artifact_file: str) -> None:
        """Stores ``text`` as the artifact ``artifact_file`` (a path inside the run's artifacts, e.g. ``a/b.txt``)."""
        if not self.enabled:
            return
        self._active_client().log_text(self._run_id, text, artifact_file)

    def log_artifact(self, path: Union[str, Path], artifact_path: Optional[str] = None) -> None:
        """Uploads a local file (or every file under a local folder) into the run's artifacts.

        Args:
            path: local file or folder.
            artifact_path: folder inside the run's artifacts; the root when None.
        """
        if not self.enabled:
            return
        client = self._active_client()
        path = Path(path)
        if path.is_dir():
            client.log_artifacts(self._run_id, str(path), artifact_path)
        else:
            client.log_artifact(self._run_id, str(path), artifact_path)

    # -- identity ----------------------------------------------------------------------------------------------

    @property
    def run_id(self) -> Optional[str]:
        """The MLflow run id once started (still set after exit); None when disabled or not started."""
        return self._run_id

    def describe(self) -> str:
        """One line saying where the run is, e.g. ``mlflow run <id> in experiment <name> at <uri>``."""
        if not self.enabled:
            return "mlflow tracking disabled"
        if self._run_id is None:
            return f"mlflow run (not started) in experiment {self.experiment} at {self.uri}"
        return f"mlflow run {self._run_id} in experiment {self.experiment} at {self.uri}"

    def run_url(self) -> Optional[str]:
        """The run's page in the MLflow UI when the URI is an HTTP server, else None."""
        if not self.enabled or self._run_id is None or not str(self.uri).startswith(("http://", "https://")):
            return None
        return f"{str(self.uri).rstrip('/')}/#/experiments/{self._experiment_id}/runs/{self._run_id}"
