"""Loader for folders in the CL_Benchmark layout (O-LoRA / SAPT / DEAL code bases).

Layout: ``<root>/<group>/<task>/{train,dev,test}.json`` plus ``labels.json``. Each split is a JSON array of
``{"label": str, "sentence": str}`` (JSON Lines, one object per line, is accepted too); ``labels.json`` is a JSON
list of label strings. Nothing here knows which groups or tasks exist: any folder in this layout loads.
"""

from __future__ import annotations

import json
import os
import warnings
from collections import Counter
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from streams.data import TaskData, TaskSplit
from streams.errors import StreamError, TaskNotFoundError

DATA_ENV = "CONTINUAL_DATA"
_SKIP_HINT = "stream.skip_unknown_labels=true"


def data_root_from(value: Optional[str]) -> Path:
    """The CL_Benchmark root: ``value`` if set, else ``$CONTINUAL_DATA``.

    Raises:
        StreamError: neither is set, or the folder does not exist.
    """
    source = "stream.data_root"
    if value is None or not str(value).strip():
        value = os.environ.get(DATA_ENV, "").strip() or None
        source = f"${DATA_ENV}"
    if value is None:
        raise StreamError(
            "no data folder given: set stream.data_root=<folder> or the environment variable "
            f"{DATA_ENV}=<folder> to a folder in the CL_Benchmark layout (<group>/<task>/train.json ...)"
        )
    root = Path(value).expanduser()
    if not root.is_dir():
        raise StreamError(
            f"data folder {str(root)!r} (from {source}) does not exist or is not a folder: "
            f"point stream.data_root or {DATA_ENV} at a folder in the CL_Benchmark layout"
        )
    return root


def _is_task_dir(path: Path) -> bool:
    return path.is_dir() and any(p.suffix in (".json", ".jsonl") for p in path.iterdir() if p.is_file())


def list_tasks(root: Path) -> List[str]:
    """Every task folder under ``root`` (``group/task``, or ``task`` for tasks directly under root), sorted."""
    found = []
    for path in sorted(root.iterdir()) if root.is_dir() else []:
        if _is_task_dir(path):
            found.append(path.name)
        elif path.is_dir():
            found.extend(f"{path.name}/{sub.name}" for sub in sorted(path.iterdir()) if sub.is_dir())
    return found


def _match(parent: Path, name: str) -> List[Path]:
    """Sub-folders of ``parent`` called ``name``: exact case first, else case-insensitively."""
    if not parent.is_dir():
        return []
    subs = [p for p in parent.iterdir() if p.is_dir()]
    exact = [p for p in subs if p.name == name]
    return exact or [p for p in subs if p.name.lower() == name.lower()]


def find_task_dir(root: Path, name: str) -> Path:
    """The folder of task ``name`` under ``root``.

    ``name`` is ``group/task`` (each part matched case-insensitively) or a bare task name searched as
    ``<root>/*/<name>`` and ``<root>/<name>``, case-insensitively (``sst-2`` finds ``SC/SST-2``).

    Raises:
        StreamError: no such task (the message lists the tasks that exist) or several candidates.
    """
    root = Path(root)
    if not root.is_dir():
        raise StreamError(f"data folder {str(root)!r} does not exist: point stream.data_root or {DATA_ENV} at it")
    parts = [p for p in name.replace("\\", "/").split("/") if p]
    if not parts or any(p in (".", "..") for p in parts):
        raise StreamError(f"invalid task name {name!r}: use a task folder name (agnews) or group/task (TC/agnews)")
    if len(parts) > 1:
        candidates = [root]
        for part in parts:
            candidates = [m for c in candidates for m in _match(c, part)]
    else:
        candidates = [m for group in sorted(root.iterdir()) if group.is_dir() for m in _match(group, parts[0])]
        candidates += [m for m in _match(root, parts[0]) if _is_task_dir(m)]
    candidates = sorted(set(candidates))
    if len(candidates) > 1:
        shown = ", ".join(str(c.relative_to(root).as_posix()) for c in candidates)
        raise StreamError(f"task {name!r} is ambiguous under {root}: {shown}; name it as group/task")
    if not candidates:
        existing = list_tasks(root)
        raise TaskNotFoundError(
            f"task {name!r} not found under {root}; tasks there: {', '.join(existing) or '(none)'}. "
            "Add its folder (<group>/<task>/{train,test}.json + labels.json), fix the name, "
            "or use a Hugging Face dataset (hf:<id>)"
        )
    return candidates[0]


def read_utf8(path: Path) -> str:
    """The text of a data file, which must be UTF-8 (a leading byte-order mark is dropped).

    Raises:
        StreamError: the file is not UTF-8 text, naming it and the byte offset of the first invalid byte.
    """
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        offset = err.start + len(data) - len(err.object)  # err.object may start after a byte-order mark
        line = data.count(b"\n", 0, offset) + 1
        raise StreamError(
            f"{path}: not UTF-8 text (byte 0x{data[offset]:02x} at byte offset {offset}, line {line}); "
            "re-save it as UTF-8 (from Latin-1: iconv -f latin1 -t utf-8)"
        ) from err


def read_json_items(path: Path) -> List[Any]:
    """The items of a JSON array file, or of a JSON Lines file."""
    if not path.is_file():
        raise StreamError(f"{path}: file not found; every task folder needs labels.json, train.json and the eval split")
    text = read_utf8(path)
    if not text.strip():
        raise StreamError(f"{path}: file is empty; it must hold a JSON array of {{\"label\", \"sentence\"}} objects")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        if not text.lstrip().startswith("{"):
            raise StreamError(
                f"{path}: not valid JSON (line {err.lineno}, column {err.colno}: {err.msg}); "
                "fix the file or regenerate it"
            ) from err
        return _read_json_lines(path, text)
    return [data] if isinstance(data, dict) else data


def _read_json_lines(path: Path, text: str) -> List[Any]:
    items = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            items.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise StreamError(
                f"{path}: not valid JSON Lines (line {lineno}, column {err.colno}: {err.msg}); "
                "fix the file or regenerate it"
            ) from err
    return items


def read_labels(path: Path) -> Tuple[str, ...]:
    """The label strings of ``labels.json``."""
    labels = read_json_items(path)
    if not isinstance(labels, list) or not labels:
        raise StreamError(f"{path}: must be a non-empty JSON list of label strings, e.g. [\"negative\", \"positive\"]")
    bad = [x for x in labels if not isinstance(x, str)]
    if bad:
        raise StreamError(f"{path}: labels must be strings, found {bad[0]!r}")
    dupes = sorted(k for k, v in Counter(labels).items() if v > 1)
    if dupes:
        raise StreamError(f"{path}: duplicate labels {dupes}; each label must appear once")
    return tuple(labels)


def read_split(path: Path, labels: Tuple[str, ...], skip_unknown_labels: bool = False) -> Tuple[TaskSplit, int]:
    """Read one split file; returns the split and the number of rows skipped for unknown labels.

    Raises:
        StreamError: a malformed file or row, or labels not in ``labels`` unless ``skip_unknown_labels``.
    """
    items = read_json_items(path)
    if not isinstance(items, list):
        raise StreamError(
            f"{path}: must be a JSON array of {{\"label\", \"sentence\"}} objects, got {type(items).__name__}"
        )
    index = {label: i for i, label in enumerate(labels)}
    texts: List[str] = []
    ids: List[int] = []
    unknown: Counter = Counter()
    for row, item in enumerate(items):
        if not isinstance(item, dict):
            raise StreamError(
                f"{path}: item {row} is a {type(item).__name__}, expected an object with label and sentence"
            )
        missing = [k for k in ("sentence", "label") if k not in item]
        if missing:
            raise StreamError(
                f"{path}: item {row} has no {' or '.join(repr(m) for m in missing)} "
                f"(keys: {sorted(item)}); every item needs \"label\" and \"sentence\""
            )
        sentence, label = item["sentence"], item["label"]
        if not isinstance(sentence, str):
            raise StreamError(f"{path}: item {row} has a sentence of type {type(sentence).__name__}, expected a string")
        if isinstance(label, (bool, int)):
            label = str(label)  # some copies store labels as numbers or booleans
        if not isinstance(label, str):
            raise StreamError(f"{path}: item {row} has a label of type {type(label).__name__}, expected a string")
        if label not in index:
            unknown[label] += 1
            continue
        texts.append(sentence)
        ids.append(index[label])
    skipped = sum(unknown.values())
    if skipped:
        values = ", ".join(f"{label!r} ({n} rows)" for label, n in unknown.most_common())
        where = f"{path}: {skipped} rows have labels not in labels.json {list(labels)}: {values}"
        if not skip_unknown_labels:
            raise StreamError(
                f"{where}. Fix the file or labels.json, or set {_SKIP_HINT} to skip these rows (they are reported)"
            )
        warnings.warn(f"{where}; skipped them ({_SKIP_HINT})", stacklevel=3)
    return TaskSplit(texts, ids), skipped


def split_file(task_dir: Path, split: str) -> Path:
    """The file of one split in a task folder: ``<split>.json``, else ``<split>.jsonl``; the ``.json`` path when
    neither exists (reading it then reports the missing file)."""
    for suffix in (".json", ".jsonl"):
        path = task_dir / f"{split}{suffix}"
        if path.is_file():
            return path
    return task_dir / f"{split}.json"


def load_cl_task(root: Path, name: str, eval_split: str = "test", skip_unknown_labels: bool = False) -> TaskData:
    """Load task ``name`` (bare task or ``group/task``) from a CL_Benchmark-layout folder.

    Args:
        root: the layout's root folder.
        name: task name, found with :func:`find_task_dir`.
        eval_split: the split file used for evaluation (``test`` or ``dev``; a warning when dev is a copy of test),
            or ``heldout``: the training file.
        skip_unknown_labels: skip (and report with a warning) rows whose label is not in labels.json instead of
            failing.

    Raises:
        StreamError: naming the file, for a missing file, invalid JSON, malformed items or unknown labels.
    """
    task_dir = find_task_dir(Path(root), name)
    labels = read_labels(task_dir / "labels.json")
    if eval_split == "dev":
        dev, test = split_file(task_dir, "dev"), split_file(task_dir, "test")
        if (dev.is_file() and test.is_file() and dev.stat().st_size == test.stat().st_size
                and dev.read_bytes() == test.read_bytes()):
            warnings.warn(f"{dev} is identical to {test}: scores on stream.eval_split=dev are test scores; "
                          "stream.eval_split=heldout evaluates on training rows left out of training instead",
                          stacklevel=2)
    skipped: Dict[str, int] = {}
    splits = {}
    eval_split = "train" if eval_split == "heldout" else eval_split  # rows of the training file, kept apart later
    for split in dict.fromkeys(("train", eval_split)):  # each file read once
        path = split_file(task_dir, split)
        splits[split], n = read_split(path, labels, skip_unknown_labels)
        if n:
            skipped[str(path)] = n
    return TaskData(
        name=task_dir.name,
        source=str(task_dir),
        labels=labels,
        train=splits["train"],
        test=splits[eval_split],
        skipped=skipped,
    )
