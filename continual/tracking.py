"""MLflow tracking at the edge of a run: one context manager that owns one MLflow run, and a journal that keeps every
call when the tracking store is away.

The tracker talks to MLflow through an explicit :class:`mlflow.tracking.MlflowClient` bound to one tracking URI, so it
neither reads nor changes MLflow's process-wide state (the global tracking URI, the fluent API's active-run stack).
A disabled tracker accepts every call and does nothing, so callers never branch on whether tracking is on.

With a journal folder (``RUN_DIR/tracking``) every call is also appended to ``journal.jsonl`` there, marked with
whether the store got it. A store that cannot be reached at the start, or that fails in the middle of a run, costs one
warning: the tracker stops talking to it for the rest of the run and keeps journaling, and ``continual sync RUN_DIR``
(:mod:`continual.tracking_sync`) uploads what the store missed later. A tracker given ``run_id`` continues that run.

Example::

    with ExperimentTracker("standard-order1", run_name="lora-r8", uri=None, journal=run_dir / JOURNAL_DIR) as tracker:
        tracker.log_params({"lr": 1e-4, "tasks": ["dbpedia", "amazon"]})
        tracker.log_metrics({"acc": 0.71}, step=0)
"""

from __future__ import annotations

import json
import math
import os
import sqlite3
import time
import warnings
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ContextManager, Dict, Iterator, List, Mapping, Optional, Set, Tuple, Union

if TYPE_CHECKING:  # mlflow takes seconds to import; it is imported when a tracker starts
    from mlflow.tracking import MlflowClient

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
MAX_PARAMS_PER_BATCH = 100  # MLflow's limit on params in one log_batch call
MAX_METRICS_PER_BATCH = 1000  # MLflow's limit on metrics in one log_batch call
MAX_PARAM_VALUE_LENGTH = 6000  # MLflow rejects longer param values
_SQLITE_PREFIX = "sqlite:///"

JOURNAL_DIR = "tracking"  # the journal folder inside a run folder: RUN_DIR/tracking
JOURNAL_FILE = "journal.jsonl"
RUN_INFO_FILE = "run.json"
TEXTS_DIR = "texts"  # log_text contents, kept in the journal folder so a later sync can upload them
# MLflow's defaults (7 retries with exponential backoff, 120 s timeout) spend minutes on a dead server, per call.
# The tracker's calls use these instead (unless the user set the variables), so an outage costs seconds, once.
QUICK_HTTP_SETTINGS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
}
# Creating or migrating an SQLite store takes seconds; a process waiting longer than this reports an outage.
STORE_LOCK_TIMEOUT_S = 300.0
TERMINAL_STATUSES = ("FINISHED", "FAILED", "KILLED")


class TrackingOfflineWarning(UserWarning):
    """The tracking store could not be reached; the run goes on and its tracking calls are journaled."""


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


def same_store(a: Optional[str], b: Optional[str]) -> bool:
    """Whether two resolved tracking URIs name the same store (a trailing slash aside)."""
    return a is not None and b is not None and a.rstrip("/") == b.rstrip("/")


def _param_value(value: Any) -> str:
    """MLflow stores params as strings of bounded length."""
    text = value if isinstance(value, str) else str(value)
    return text[:MAX_PARAM_VALUE_LENGTH]


def _now_ms() -> int:
    return int(time.time() * 1000)


# -- the store: errors that mean "unreachable", bounded retries, one creator at a time ---------------------------


def store_errors() -> Tuple[type, ...]:
    """Exception types that mean the store did not take a call: MLflow's own errors (a REST call that failed after
    its retries included), connection and timeout errors (OSError covers requests' and filelock's), urllib3's HTTP
    errors, and SQLAlchemy's and sqlite3's database errors (a locked, unopenable or half-migrated SQLite file)."""
    from mlflow.exceptions import MlflowException

    errors: List[type] = [MlflowException, OSError, sqlite3.Error]
    try:
        from urllib3.exceptions import HTTPError

        errors.append(HTTPError)
    except ImportError:  # pragma: no cover - mlflow depends on requests, which depends on urllib3
        pass
    try:
        from sqlalchemy.exc import SQLAlchemyError

        errors.append(SQLAlchemyError)
    except ImportError:  # pragma: no cover - only HTTP stores then
        pass
    return tuple(errors)


@contextmanager
def bounded_http() -> Iterator[None]:
    """Applies :data:`QUICK_HTTP_SETTINGS` to MLflow's HTTP calls made inside the block; the environment is as before
    afterwards. A variable the user has set is left as it is."""
    added = [name for name in QUICK_HTTP_SETTINGS if name not in os.environ]
    for name in added:
        os.environ[name] = QUICK_HTTP_SETTINGS[name]
    try:
        yield
    finally:
        for name in added:
            os.environ.pop(name, None)


def sqlite_path(uri: str) -> Optional[Path]:
    """The database file of a ``sqlite:///`` URI; None for other stores and in-memory databases."""
    if not uri.startswith(_SQLITE_PREFIX):
        return None
    db_path = uri[len(_SQLITE_PREFIX):].partition("?")[0]
    if not db_path or db_path == ":memory:":
        return None
    return Path(db_path)


def store_lock(uri: str) -> ContextManager[Any]:
    """An inter-process lock (``<db>.lock``) for a block that may create or migrate an SQLite store.

    MLflow creates the tables of a new SQLite file, and migrates an old one, when the first client opens it; several
    processes doing that at once leave it half-migrated (``table _alembic_tmp_... already exists``). Other stores need
    no lock: the block runs as is.
    """
    path = sqlite_path(uri)
    if path is None:
        return nullcontext()
    from filelock import FileLock

    path.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(str(path) + ".lock", timeout=STORE_LOCK_TIMEOUT_S)


def open_client(uri: str) -> "MlflowClient":
    """An MLflow client whose store exists and is migrated. Call it inside ``store_lock(uri)`` and
    ``bounded_http()``: a new SQLite store is created here."""
    from mlflow.tracking import MlflowClient

    path = sqlite_path(uri)
    if path is not None:
        # MLflow retries a database it cannot open for about 100 s; sqlite3 says at once why (creating the file is
        # what MLflow would do next anyway).
        sqlite3.connect(str(path)).close()
    client = MlflowClient(tracking_uri=uri)
    # Older MLflow builds the store on the first call, not in the constructor: make one now, inside the lock.
    client.get_experiment_by_name("Default")
    return client


def get_or_create_experiment(client: "MlflowClient", name: str, uri: str) -> str:
    """The id of the active experiment ``name``, created when missing (a concurrent creation is fine).

    Raises:
        RuntimeError: the experiment exists but is deleted.
    """
    from mlflow.exceptions import MlflowException

    found = client.get_experiment_by_name(name)
    if found is None:
        try:
            return client.create_experiment(name)
        except MlflowException:
            # Another process created it between our lookup and create; anything else re-raises below.
            found = client.get_experiment_by_name(name)
            if found is None:
                raise
    if found.lifecycle_stage != "active":
        raise RuntimeError(
            f"MLflow experiment {name!r} at {uri} is deleted; restore it "
            f"(mlflow experiments restore --experiment-id {found.experiment_id}) or pick another name"
        )
    return found.experiment_id


def param_batches(params: Mapping[str, str]) -> Iterator[list]:
    """``Param`` entities in batches of at most :data:`MAX_PARAMS_PER_BATCH`."""
    from mlflow.entities import Param

    entries = [Param(k, v) for k, v in params.items()]
    for start in range(0, len(entries), MAX_PARAMS_PER_BATCH):
        yield entries[start:start + MAX_PARAMS_PER_BATCH]


def metric_batches(points: List[Tuple[str, float, int, int]]) -> Iterator[list]:
    """``Metric`` entities from ``(key, value, timestamp_ms, step)`` in batches of :data:`MAX_METRICS_PER_BATCH`."""
    from mlflow.entities import Metric

    entries = [Metric(key, value, timestamp, step) for key, value, timestamp, step in points]
    for start in range(0, len(entries), MAX_METRICS_PER_BATCH):
        yield entries[start:start + MAX_METRICS_PER_BATCH]


def error_line(err: BaseException) -> str:
    """``Type: first line of the message``, cut to 300 characters."""
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0] if lines else ''}"[:300]


# -- the journal ---------------------------------------------------------------------------------------------------


class Journal:
    """What one run asked its tracking store to keep: ``journal.jsonl`` (one JSON object a line) and ``run.json``.

    Lines have a ``kind``: ``open`` (a tracker started: uri, run_id, resumed), ``params``, ``metrics`` (step, time,
    metrics), ``tags``, ``text`` (artifact_file and the path of its copy), ``artifact`` (path, artifact_path),
    ``status``, ``offline`` (the error that stopped the tracker talking to the store) and ``sync`` (which lines a
    ``continual sync`` delivered to which run). Calls carry ``stored``: whether the store confirmed them. Paths are
    relative to the run folder (the journal folder's parent) when they lie inside it, so the folder can move.
    ``run.json`` holds the experiment name, run name, tags, URI and MLflow run id; it is replaced atomically.

    Args:
        folder: the journal folder, ``RUN_DIR/tracking``.
    """

    def __init__(self, folder: Union[str, Path]):
        self.folder = Path(folder)
        self.path = self.folder / JOURNAL_FILE
        self.info_path = self.folder / RUN_INFO_FILE

    @property
    def run_dir(self) -> Path:
        return self.folder.parent

    def start(self) -> None:
        """Creates the folder; ends a line torn by a crash so the next line starts clean."""
        self.folder.mkdir(parents=True, exist_ok=True)
        if self.path.is_file() and self.path.stat().st_size:
            with self.path.open("rb+") as f:
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    f.write(b"\n")

    def append(self, kind: str, **fields: Any) -> None:
        line = json.dumps({"kind": kind, "time": fields.pop("time", None) or _now_ms(), **fields},
                          separators=(",", ":"))
        with self.path.open("a", encoding="utf-8") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())

    def entries(self) -> List[Tuple[int, dict]]:
        """``(line number, entry)`` for every readable line (a line torn by a crash is skipped)."""
        if not self.path.is_file():
            return []
        found = []
        for number, line in enumerate(self.path.read_text(encoding="utf-8").splitlines()):
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if isinstance(entry, dict) and "kind" in entry:
                found.append((number, entry))
        return found

    def read_info(self) -> Dict[str, Any]:
        return json.loads(self.info_path.read_text(encoding="utf-8")) if self.info_path.is_file() else {}

    def write_info(self, info: Mapping[str, Any]) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.info_path.with_name(self.info_path.name + ".tmp")
        with tmp.open("w", encoding="utf-8") as f:
            json.dump(dict(info), f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.info_path)

    def record_path(self, path: Union[str, Path]) -> str:
        """How a local path is written in the journal: relative to the run folder when inside it."""
        absolute = Path(path).resolve()
        try:
            return absolute.relative_to(self.run_dir.resolve()).as_posix()
        except ValueError:
            return str(absolute)

    def local_path(self, recorded: str) -> Path:
        path = Path(recorded)
        return path if path.is_absolute() else self.run_dir / path

    def save_text(self, text: str, artifact_file: str) -> str:
        """Keeps a ``log_text`` content under ``texts/`` and returns its recorded path."""
        relative = Path(artifact_file)
        if relative.is_absolute() or ".." in relative.parts:
            raise ValueError(f"artifact_file must be a relative path inside the run's artifacts, got {artifact_file!r}")
        target = self.folder / TEXTS_DIR / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text, encoding="utf-8")
        return self.record_path(target)


def lines_in_run(entries: List[Tuple[int, dict]], uri: str, run_id: Optional[str]) -> Set[int]:
    """Line numbers of the journal entries that the run ``run_id`` at ``uri`` already holds: those the store confirmed
    while a tracker logged into that run, and those a ``continual sync`` delivered to it."""
    held: Set[int] = set()
    if run_id is None:
        return held
    current = False  # whether the tracker that wrote the lines below logged into this run
    for number, entry in entries:
        kind = entry["kind"]
        if kind == "open":
            current = entry.get("run_id") == run_id and same_store(entry.get("uri"), uri)
        elif kind == "sync":
            if entry.get("run_id") == run_id and same_store(entry.get("uri"), uri):
                for first, last in entry.get("lines", []):
                    held.update(range(first, last + 1))
        elif current and entry.get("stored"):
            held.add(number)
    return held


def as_ranges(numbers: Set[int]) -> List[List[int]]:
    """``{1, 2, 3, 7}`` -> ``[[1, 3], [7, 7]]``: line numbers written compactly in a sync line."""
    ranges: List[List[int]] = []
    for number in sorted(numbers):
        if ranges and ranges[-1][1] == number - 1:
            ranges[-1][1] = number
        else:
            ranges.append([number, number])
    return ranges


# -- the tracker ---------------------------------------------------------------------------------------------------


class ExperimentTracker:
    """Context manager owning one MLflow run; every method is a no-op when ``enabled`` is False.

    On enter it creates the experiment if needed and starts the run (or, given ``run_id``, sets that run back to
    RUNNING); on exit it ends the run as FINISHED, or as FAILED when an exception is propagating (the exception is
    never swallowed). When the store cannot be reached, at enter or later, the tracker warns once
    (:class:`TrackingOfflineWarning`), stops calling the store and goes on journaling: an outage never stops a
    run.

    Args:
        experiment: MLflow experiment name; created when missing.
        run_name: name of the run shown in the MLflow UI.
        uri: tracking URI; see :func:`resolve_tracking_uri` for the fallbacks.
        enabled: False turns every method into a no-op that touches no store and writes no journal.
        tags: run tags; values are stringified.
        journal: the journal folder (``RUN_DIR / JOURNAL_DIR``), or None for no journal. An existing journal is
            appended to.
        run_id: continue this MLflow run instead of creating one (a resumed run). Metric (key, step) pairs and params
            that the journal shows this run already holds are not logged again.
    """

    def __init__(self, experiment: str, run_name: str, uri: Optional[str] = None, enabled: bool = True,
                 tags: Optional[Mapping[str, Any]] = None, journal: Optional[Union[str, Path]] = None,
                 run_id: Optional[str] = None):
        self.experiment = experiment
        self.run_name = run_name
        self.enabled = enabled
        self.tags = {str(k): _param_value(v) for k, v in (tags or {}).items()}
        # Resolved now (not on enter) so the store does not depend on the directory at enter time.
        self.uri = resolve_tracking_uri(uri) if enabled else None
        self.journal = Journal(journal) if enabled and journal is not None else None
        self.resumed = run_id is not None
        self._client: Optional["MlflowClient"] = None
        self._run_id: Optional[str] = run_id if enabled else None
        self._experiment_id: Optional[str] = None
        self._entered = False
        self._running = False
        self._offline: Optional[str] = None  # why the store is not called any more
        self._held_steps: Set[Tuple[str, int]] = set()  # what a resumed run already holds
        self._held_params: Dict[str, str] = {}

    # -- lifecycle ---------------------------------------------------------------------------------------------

    def __enter__(self) -> "ExperimentTracker":
        if not self.enabled:
            return self
        if self._entered:
            raise RuntimeError("ExperimentTracker is not re-entrant: this tracker already started a run")
        self._entered = True
        if self.journal is not None:
            self.journal.start()
            if self.resumed:
                self._load_held()
        failure: Optional[BaseException] = None
        try:
            with store_lock(self.uri), bounded_http():
                client = open_client(self.uri)
                if self.resumed:
                    run = client.get_run(self._run_id)
                    self._experiment_id = run.info.experiment_id
                    client.update_run(self._run_id, status="RUNNING")
                else:
                    self._experiment_id = get_or_create_experiment(client, self.experiment, self.uri)
                    run = client.create_run(self._experiment_id, run_name=self.run_name, tags=self.tags)
                    self._run_id = run.info.run_id
            self._client = client
        except store_errors() as err:
            failure = err
        self._running = True
        if self.journal is not None:
            started = self.journal.read_info().get("start_time") if self.resumed else None
            self.journal.write_info({
                "experiment": self.experiment, "run_name": self.run_name, "tags": self.tags, "uri": self.uri,
                "run_id": self._run_id, "experiment_id": self._experiment_id, "start_time": started or _now_ms(),
            })
            self.journal.append("open", uri=self.uri, run_id=self._run_id, resumed=self.resumed,
                                stored=failure is None)
        if failure is not None:
            self._go_offline(failure)
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if self.enabled and self._running:
            status = "FINISHED" if exc_type is None else "FAILED"
            stored = self._deliver(lambda client: client.set_terminated(self._run_id, status=status))
            self._journal("status", stored, status=status)
            self._running = False
            self._client = None  # the run stays readable through run_id; logging after exit is an error
        return False

    def _load_held(self) -> None:
        """What the resumed run already holds, from the journal: skipped when logged again."""
        entries = self.journal.entries()
        held = lines_in_run(entries, self.uri, self._run_id)
        for number, entry in entries:
            if number not in held:
                continue
            if entry["kind"] == "metrics":
                self._held_steps.update((key, int(entry.get("step", 0))) for key in entry.get("metrics", {}))
            elif entry["kind"] == "params":
                for key, value in entry.get("params", {}).items():
                    self._held_params.setdefault(key, value)

    def _go_offline(self, err: BaseException) -> None:
        """Stops calling the store for the rest of the run; warns once."""
        if self._offline is not None:
            return
        self._client = None
        self._offline = error_line(err)
        self._journal("offline", None, error=self._offline)
        if self.journal is not None:
            then = (f"its tracking calls are journaled in {self.journal.folder}, and "
                    f"`continual sync {self.journal.run_dir}` uploads them later")
        else:
            then = "it has no journal, so what it logs from now on reaches no store"
        warnings.warn(f"MLflow tracking store {self.uri} is unreachable ({self._offline}). The run goes on offline: "
                      f"{then}.", TrackingOfflineWarning, stacklevel=3)

    def _deliver(self, send: Callable[["MlflowClient"], object]) -> bool:
        """Runs one store call; False (and offline from now on) when the store fails, or when already offline."""
        if self._client is None:
            return False
        try:
            with bounded_http():
                send(self._client)
            return True
        except store_errors() as err:
            self._go_offline(err)
            return False

    def _journal(self, kind: str, stored: Optional[bool], **fields: Any) -> None:
        if self.journal is not None:
            self.journal.append(kind, **fields, **({} if stored is None else {"stored": stored}))

    def _require_running(self) -> None:
        if not self._running:
            raise RuntimeError("ExperimentTracker is not running: use it as `with ExperimentTracker(...) as t:`")

    # -- logging -----------------------------------------------------------------------------------------------

    def log_params(self, flat: Mapping[str, Any]) -> None:
        """Logs parameters, stringified (lists included) and cut to MLflow's 6000-character limit.

        In a resumed run, params the run already holds are skipped; one the run holds with another value is kept as
        it was (MLflow params cannot change) and a warning names it.

        Args:
            flat: a flat mapping ``{"training.lr": 1e-4, ...}``; nest-free keys are the caller's job.
        """
        if not self.enabled:
            return
        self._require_running()
        params = {str(k): _param_value(v) for k, v in flat.items()}
        changed = sorted(k for k, v in params.items() if k in self._held_params and self._held_params[k] != v)
        if changed:
            warnings.warn(f"params {changed} were logged with other values before this run resumed; MLflow keeps "
                          "the first values", UserWarning, stacklevel=2)
        params = {k: v for k, v in params.items() if k not in self._held_params}
        if not params:
            return

        def send(client: "MlflowClient") -> None:
            for batch in param_batches(params):
                client.log_batch(self._run_id, params=batch)

        self._journal("params", self._deliver(send), params=params)

    def log_metrics(self, metrics: Mapping[str, Optional[float]], step: Optional[int] = None) -> None:
        """Logs metric values at one step, skipping None and NaN (metrics that are undefined for this run).

        In a resumed run, (key, step) pairs the run already holds are skipped, so a step run again is not doubled.

        Args:
            metrics: ``{name: value}``.
            step: the step (e.g. the task index); 0 when None, as in MLflow.
        """
        if not self.enabled:
            return
        self._require_running()
        step = int(step or 0)
        values = {
            str(k): float(v) for k, v in metrics.items()
            if v is not None and not math.isnan(float(v)) and (str(k), step) not in self._held_steps
        }
        if not values:
            return
        timestamp = _now_ms()
        points = [(key, value, timestamp, step) for key, value in values.items()]

        def send(client: "MlflowClient") -> None:
            for batch in metric_batches(points):
                client.log_batch(self._run_id, metrics=batch)

        self._journal("metrics", self._deliver(send), step=step, time=timestamp, metrics=values)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Sets run tags (values stringified); a tag set again takes the new value."""
        if not self.enabled:
            return
        self._require_running()
        values = {str(k): _param_value(v) for k, v in tags.items()}

        def send(client: "MlflowClient") -> None:
            from mlflow.entities import RunTag

            client.log_batch(self._run_id, tags=[RunTag(k, v) for k, v in values.items()])

        self._journal("tags", self._deliver(send), tags=values)

    def log_text(self, text: str, artifact_file: str) -> None:
        """Stores ``text`` as the artifact ``artifact_file`` (a path inside the run's artifacts, e.g. ``a/b.txt``);
        with a journal, a copy is kept in its ``texts/`` folder."""
        if not self.enabled:
            return
        self._require_running()
        recorded = self.journal.save_text(text, artifact_file) if self.journal is not None else None
        stored = self._deliver(lambda client: client.log_text(self._run_id, text, artifact_file))
        self._journal("text", stored, artifact_file=artifact_file, path=recorded)

    def log_artifact(self, path: Union[str, Path], artifact_path: Optional[str] = None) -> None:
        """Uploads a local file (or every file under a local folder) into the run's artifacts. The journal records
        the local path: the file must stay where it is (in the run folder) for a later sync.

        Args:
            path: local file or folder.
            artifact_path: folder inside the run's artifacts; the root when None.

        Raises:
            FileNotFoundError: ``path`` does not exist.
        """
        if not self.enabled:
            return
        self._require_running()
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"no file or folder to log as an artifact at {path}")

        def send(client: "MlflowClient") -> None:
            if path.is_dir():
                client.log_artifacts(self._run_id, str(path), artifact_path)
            else:
                client.log_artifact(self._run_id, str(path), artifact_path)

        stored = self._deliver(send)
        if self.journal is not None:
            self._journal("artifact", stored, path=self.journal.record_path(path), artifact_path=artifact_path)

    # -- identity ----------------------------------------------------------------------------------------------

    @property
    def run_id(self) -> Optional[str]:
        """The MLflow run id once started (still set after exit); None when disabled, not started, or when the store
        was unreachable from the start of a new run."""
        return self._run_id

    @property
    def offline(self) -> bool:
        """True once the store could not be reached: calls are journaled, not sent."""
        return self._offline is not None

    def describe(self) -> str:
        """One line saying where the run is, e.g. ``mlflow run <id> in experiment <name> at <uri>``."""
        if not self.enabled:
            return "mlflow tracking disabled"
        if not self._entered:
            return f"mlflow run (not started) in experiment {self.experiment} at {self.uri}"
        if self._offline is None:
            return f"mlflow run {self._run_id} in experiment {self.experiment} at {self.uri}"
        run = f"run {self._run_id}" if self._run_id else "run (not created)"
        where = (f"journaled in {self.journal.folder}; `continual sync {self.journal.run_dir}` uploads it"
                 if self.journal is not None else "not journaled")
        return (f"mlflow offline: {run} in experiment {self.experiment}, store {self.uri} unreachable "
                f"({self._offline}); {where}")

    def run_url(self) -> Optional[str]:
        """The run's page in the MLflow UI when the URI is an HTTP server, else None."""
        if (not self.enabled or self._run_id is None or self._experiment_id is None
                or not str(self.uri).startswith(("http://", "https://"))):
            return None
        return f"{str(self.uri).rstrip('/')}/#/experiments/{self._experiment_id}/runs/{self._run_id}"
