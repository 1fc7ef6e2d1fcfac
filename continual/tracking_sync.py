"""``continual sync RUN_DIR [--uri URI]``: uploads what a run's tracking store did not get, from the run's journal.

A run logs through :class:`continual.tracking.ExperimentTracker`, which journals every call in ``RUN_DIR/tracking``
whether or not the store took it. Syncing to the run's own store fills its MLflow run (creating it when the store was
unreachable from the start, then recording the new run id in ``run.json``); syncing to another store (``--uri``)
creates a run there with everything. Artifacts are uploaded from the run folder. Each sync appends a ``sync`` line
naming the lines it delivered, so a second sync uploads nothing; metric steps already in the target run are never sent
again, even after a sync that was cut off.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Set, Tuple, Union

from continual.config import ConfigError
from continual.tracking import (
    JOURNAL_DIR,
    TERMINAL_STATUSES,
    Journal,
    as_ranges,
    bounded_http,
    error_line,
    get_or_create_experiment,
    lines_in_run,
    metric_batches,
    open_client,
    param_batches,
    resolve_tracking_uri,
    same_store,
    store_errors,
    store_lock,
)


class SyncError(ConfigError):
    """A run folder cannot be synced: no journal, or the target store failed (the message says which)."""


@dataclass
class SyncReport:
    """What one sync did."""

    run_dir: Path
    uri: str
    run_id: str
    created: bool = False  # a new MLflow run was created for this sync
    params: int = 0
    tags: int = 0
    metrics: int = 0  # metric points sent
    texts: int = 0
    artifacts: int = 0
    status: Optional[str] = None  # terminal status set on the run
    kept_params: List[str] = field(default_factory=list)  # held by the run with another value: left as they are
    missing: List[str] = field(default_factory=list)  # artifact files no longer in the run folder

    @property
    def uploaded(self) -> int:
        return self.params + self.tags + self.metrics + self.texts + self.artifacts + (self.status is not None)

    def describe(self) -> str:
        """A few lines for the terminal."""
        run = f"{'new ' if self.created else ''}run {self.run_id} at {self.uri}"
        if not self.uploaded and not self.created:
            lines = [f"{self.run_dir}: nothing to upload; {run} has everything the journal holds"]
        else:
            what = (f"{self.params} params, {self.metrics} metric values, {self.tags} tags, {self.texts} texts, "
                    f"{self.artifacts} artifacts" + (f", status {self.status}" if self.status else ""))
            lines = [f"{self.run_dir}: uploaded {what} to {run}"]
        if self.kept_params:
            lines.append(f"  params the run holds with other values, left as they are: {', '.join(self.kept_params)}")
        if self.missing:
            lines.append(f"  artifacts no longer in the run folder, not uploaded: {', '.join(self.missing)}")
        return "\n".join(lines)


def sync_run(run_dir: Union[str, Path], uri: Optional[str] = None) -> SyncReport:
    """Uploads what the tracking store did not get from ``run_dir``'s journal.

    Args:
        run_dir: a run folder holding ``tracking/journal.jsonl`` and ``tracking/run.json``.
        uri: the store to upload to; the run's own store (``run.json``) when None. A relative SQLite path is taken
            against the current directory.

    Returns:
        What was uploaded where.

    Raises:
        SyncError: no journal there, or the store failed (what was delivered before is recorded: run it again).
    """
    run_dir = Path(run_dir)
    journal = Journal(run_dir / JOURNAL_DIR)
    if not run_dir.is_dir():
        raise SyncError(f"{run_dir} is not a folder: give the run folder of a `continual run`")
    if not journal.path.is_file() or not journal.info_path.is_file():
        raise SyncError(f"{run_dir} has no tracking journal ({journal.path} and {journal.info_path.name}): it is not "
                        "a run folder, or its run was started without a journal")
    info = journal.read_info()
    target = resolve_tracking_uri(uri) if uri else info.get("uri")
    if not target:
        raise SyncError(f"{journal.info_path} names no tracking URI: give one with --uri")
    own_store = same_store(target, info.get("uri"))
    entries = journal.entries()
    try:
        with store_lock(target), bounded_http():  # a new SQLite store is created here, by one process at a time
            client = open_client(target)
            run_id, created = _target_run(client, journal, info, entries, target, own_store)
        report = SyncReport(run_dir, target, run_id, created)
        done: Set[int] = set()
        try:
            with bounded_http():
                _upload(client, journal, entries, report, done)
        finally:
            if done or created:
                journal.append("sync", uri=target, run_id=run_id, created=created, lines=as_ranges(done))
    except RuntimeError as err:  # the experiment is deleted there
        raise SyncError(str(err)) from err
    except store_errors() as err:
        raise SyncError(f"could not sync {run_dir} to {target}: {error_line(err)}. What was uploaded is recorded in "
                        f"the journal: run `continual sync` again when the store answers") from err
    return report


def _target_run(client, journal: Journal, info: dict, entries: List[Tuple[int, dict]], target: str,
                own_store: bool) -> Tuple[str, bool]:
    """The run to fill: the run's own one (own store), or the one an earlier sync created there; else a new run."""
    if own_store:
        candidate = info.get("run_id")
    else:
        earlier = [e for _, e in entries if e["kind"] == "sync" and same_store(e.get("uri"), target)]
        candidate = earlier[-1]["run_id"] if earlier else None
    if candidate is not None and _run_exists(client, candidate):
        return candidate, False
    experiment_id = get_or_create_experiment(client, info["experiment"], target)
    run = client.create_run(experiment_id, start_time=info.get("start_time"), tags=info.get("tags") or {},
                            run_name=info.get("run_name"))
    if own_store:  # the run's store now has its run: a resumed run continues this one
        journal.write_info({**info, "run_id": run.info.run_id, "experiment_id": experiment_id})
    return run.info.run_id, True


def _run_exists(client, run_id: str) -> bool:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_run(run_id).info.lifecycle_stage == "active"
    except MlflowException as err:
        if getattr(err, "error_code", None) == "RESOURCE_DOES_NOT_EXIST":
            return False
        raise


def _upload(client, journal: Journal, entries: List[Tuple[int, dict]], report: SyncReport, done: Set[int]) -> None:
    """Sends the entries the target run does not hold, in journal order per kind; ``done`` collects the lines
    delivered (or found already there) as it goes."""
    from mlflow.entities import RunTag

    run_id = report.run_id
    held = lines_in_run(entries, report.uri, run_id)
    pending = [(n, e) for n, e in entries if n not in held]
    in_store = None if report.created else client.get_run(run_id)

    # Params: the first value logged wins, as in MLflow; the run's own values are never changed.
    params: Dict[str, str] = {}
    for _, entry in pending:
        if entry["kind"] == "params":
            for key, value in entry.get("params", {}).items():
                params.setdefault(key, value)
    existing = dict(in_store.data.params) if in_store is not None else {}
    report.kept_params = sorted(k for k, v in params.items() if k in existing and existing[k] != v)
    to_send = {k: v for k, v in params.items() if k not in existing}
    for batch in param_batches(to_send):
        client.log_batch(run_id, params=batch)
    report.params = len(to_send)
    done.update(n for n, e in pending if e["kind"] == "params")

    tags: Dict[str, str] = {}
    for _, entry in pending:
        if entry["kind"] == "tags":
            tags.update(entry.get("tags", {}))
    if tags:
        client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])
    report.tags = len(tags)
    done.update(n for n, e in pending if e["kind"] == "tags")

    report.metrics = _upload_metrics(client, entries, held, pending, run_id, in_store is not None)
    done.update(n for n, e in pending if e["kind"] == "metrics")

    # Texts and artifacts: each (local path, place in the artifacts) once.
    files: Dict[Tuple[str, Optional[str]], Tuple[str, List[int]]] = {}
    for number, entry in pending:
        if entry["kind"] == "text" and entry.get("path"):
            parent = str(Path(entry["artifact_file"]).parent)
            place = (entry["path"], None if parent == "." else parent)
        elif entry["kind"] == "artifact":
            place = (entry["path"], entry.get("artifact_path"))
        else:
            continue
        files.setdefault(place, (entry["kind"], []))[1].append(number)
    for (recorded, artifact_path), (kind, numbers) in files.items():
        local = journal.local_path(recorded)
        if not local.exists():
            report.missing.append(recorded)
            continue
        if local.is_dir():
            client.log_artifacts(run_id, str(local), artifact_path)
        else:
            client.log_artifact(run_id, str(local), artifact_path)
        report.texts += kind == "text"
        report.artifacts += kind == "artifact"
        done.update(numbers)

    # Status: the journal's last word on the run. A run whose process died never wrote one: a run created here is
    # marked KILLED (a resumed or finished run later sets its own status).
    states = [(n, e) for n, e in entries if e["kind"] in ("open", "status")]
    last_number, last = states[-1] if states else (None, None)
    if last is not None and last["kind"] == "status" and last_number not in held:
        if last["status"] in TERMINAL_STATUSES:
            client.set_terminated(run_id, status=last["status"], end_time=last.get("time"))
            report.status = last["status"]
    elif report.created and entries:
        client.set_terminated(run_id, status="KILLED", end_time=entries[-1][1].get("time"))
        report.status = "KILLED"
    done.update(n for n, e in pending if e["kind"] == "status")


def _upload_metrics(client, entries: List[Tuple[int, dict]], held: Set[int], pending: List[Tuple[int, dict]],
                    run_id: str, existing_run: bool) -> int:
    """Sends each (key, step) the run lacks once: the value the store confirmed if any, else the first one journaled.
    Steps already in the target run (per journal, or per its metric history) are not sent."""
    have: Set[Tuple[str, int]] = set()
    for number, entry in entries:
        if number in held and entry["kind"] == "metrics":
            have.update((key, int(entry.get("step", 0))) for key in entry.get("metrics", {}))
    chosen: Dict[Tuple[str, int], Tuple[float, int, bool]] = {}
    for _, entry in pending:
        if entry["kind"] != "metrics":
            continue
        step, stored = int(entry.get("step", 0)), bool(entry.get("stored"))
        for key, value in entry.get("metrics", {}).items():
            pair = (key, step)
            if pair in have:
                continue
            if pair not in chosen or (stored and not chosen[pair][2]):
                chosen[pair] = (float(value), int(entry.get("time") or 0), stored)
    if existing_run:  # a call the store took but never confirmed (a timeout) must not be doubled
        for key in sorted({key for key, _ in chosen}):
            for point in client.get_metric_history(run_id, key):
                chosen.pop((key, int(point.step)), None)
    points = [(key, value, timestamp, step) for (key, step), (value, timestamp, _) in chosen.items()]
    for batch in metric_batches(points):
        client.log_batch(run_id, metrics=batch)
    return len(points)
