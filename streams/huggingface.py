"""Tasks from the Hugging Face Hub (``hf:<id>``), and export of any task to the CL_Benchmark layout.

Texts are joined with the same field prefixes as the CL_Benchmark copies (``Title: ...\\nText: ...``,
``sentence 1: ...\\nsentence 2: ...``), so a model sees the same format whichever way a task was loaded. Label
names come from the dataset's ``ClassLabel`` feature. ``datasets`` is imported lazily, so that importing this
module (``continual list``) stays instant.
"""

from __future__ import annotations

import json
import os
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

from streams.data import TaskData, TaskSplit
from streams.errors import StreamError

PREFIX = "hf:"


@dataclass(frozen=True)
class HFTask:
    """How one Hub dataset becomes a task."""

    path: str  # dataset repository on the Hub
    config: Optional[str]  # dataset configuration (GLUE task), or None
    text_fields: Tuple[Tuple[str, str], ...]  # (column, prefix) pairs, joined with newlines
    label_field: str  # a ClassLabel column; its names become the task's labels
    eval_split: str  # split used for stream.eval_split=test (GLUE test labels are hidden: validation)
    dev_split: Optional[str] = None  # split used for stream.eval_split=dev; None: the same as eval_split
    train_split: str = "train"


_TITLE_TEXT = (("title", "Title: "), ("content", "Text: "))
_PAIR = (("sentence1", "sentence 1: "), ("sentence2", "sentence 2: "))
_NLI = (("premise", "sentence 1: "), ("hypothesis", "sentence 2: "))

HF_TASKS: Dict[str, HFTask] = {
    "ag_news": HFTask("fancyzhx/ag_news", None, (("text", "Text: "),), "label", "test"),
    "yelp_review_full": HFTask("Yelp/yelp_review_full", None, (("text", "Text: "),), "label", "test"),
    "amazon_polarity": HFTask("fancyzhx/amazon_polarity", None, _TITLE_TEXT, "label", "test"),
    "dbpedia_14": HFTask("fancyzhx/dbpedia_14", None, _TITLE_TEXT, "label", "test"),
    "yahoo_answers_topics": HFTask(
        "community-datasets/yahoo_answers_topics",
        None,
        (("question_title", "Title: "), ("question_content", "Question: "), ("best_answer", "Answer: ")),
        "topic",
        "test",
    ),
    "imdb": HFTask("stanfordnlp/imdb", None, (("text", ""),), "label", "test"),
    "glue/sst2": HFTask("nyu-mll/glue", "sst2", (("sentence", "Text: "),), "label", "validation"),
    "glue/cola": HFTask("nyu-mll/glue", "cola", (("sentence", "Text: "),), "label", "validation"),
    "glue/mnli": HFTask("nyu-mll/glue", "mnli", _NLI, "label", "validation_matched", "validation_mismatched"),
    "glue/rte": HFTask("nyu-mll/glue", "rte", _PAIR, "label", "validation"),
    "glue/mrpc": HFTask("nyu-mll/glue", "mrpc", _PAIR, "label", "validation"),
    "glue/qnli": HFTask(
        "nyu-mll/glue", "qnli", (("question", "sentence 1: "), ("sentence", "sentence 2: ")), "label", "validation"
    ),
    "glue/qqp": HFTask(
        "nyu-mll/glue",
        "qqp",
        (("question1", "first sentence: "), ("question2", "second sentence: ")),
        "label",
        "validation",
    ),
    "super_glue/cb": HFTask("aps/super_glue", "cb", _NLI, "label", "validation"),
    "super_glue/rte": HFTask("aps/super_glue", "rte", _NLI, "label", "validation"),
    "super_glue/boolq": HFTask(
        "aps/super_glue", "boolq", (("question", "question: "), ("passage", "passage: ")), "label", "validation"
    ),
    "super_glue/wic": HFTask(
        "aps/super_glue",
        "wic",
        (("word", "word: "), ("sentence1", "sentence 1: "), ("sentence2", "sentence 2: ")),
        "label",
        "validation",
    ),
    "super_glue/copa": HFTask(
        "aps/super_glue",
        "copa",
        (("premise", "premise: "), ("question", "question: "), ("choice1", "choice 1: "), ("choice2", "choice 2: ")),
        "label",
        "validation",
    ),
    "super_glue/multirc": HFTask(
        "aps/super_glue",
        "multirc",
        (("paragraph", "paragraph: "), ("question", "question: "), ("answer", "answer: ")),
        "label",
        "validation",
    ),
}


def is_hf_task(name: str) -> bool:
    return name.startswith(PREFIX)


def folder_name(hf_id: str) -> str:
    """The folder-safe task name of a Hub task (``glue/sst2`` -> ``glue_sst2``)."""
    return hf_id.replace("/", "_")


# Benchmark task names whose Hub id differs from the name ("amazon" is 5-class, unlike amazon_polarity: no alias).
_ALIASES = {
    "agnews": "ag_news", "yelp": "yelp_review_full", "dbpedia": "dbpedia_14",
    "yahoo": "yahoo_answers_topics", "boolqa": "super_glue/boolq",
}


def hf_ids_for(name: str) -> List[str]:
    """Hub ids of the task called ``name`` (``cb`` -> ``super_glue/cb``): hints for a missing folder task."""
    key = name.strip().lower().split("/")[-1].replace("-", "")
    if key in _ALIASES:
        return [_ALIASES[key]]
    return [k for k in HF_TASKS if k.split("/")[-1] == key]


def _env_true(var: str) -> bool:
    return os.environ.get(var, "").strip().upper() in {"1", "ON", "YES", "TRUE"}


@contextmanager
def _offline_from_env() -> Iterator[None]:
    """Honour HF_HUB_OFFLINE / HF_DATASETS_OFFLINE even when set after ``datasets`` was imported.

    ``datasets`` and ``huggingface_hub`` read these variables once, at import; without this an offline user
    whose variables were set later would wait through the Hub client's retries before getting an error.
    """
    import datasets.config as datasets_config
    import huggingface_hub.constants as hub_constants

    if not (_env_true("HF_HUB_OFFLINE") or _env_true("HF_DATASETS_OFFLINE")):
        yield
        return
    targets = [(datasets_config, "HF_HUB_OFFLINE"), (datasets_config, "HF_DATASETS_OFFLINE"),
               (hub_constants, "HF_HUB_OFFLINE")]
    saved = [(module, attr, getattr(module, attr)) for module, attr in targets if hasattr(module, attr)]
    for module, attr, _ in saved:
        setattr(module, attr, True)
    try:
        yield
    finally:
        for module, attr, value in saved:
            setattr(module, attr, value)


def _unreachable(hf_id: str, entry: HFTask, err: Exception) -> StreamError:
    what = entry.path + (f" (config {entry.config})" if entry.config else "")
    return StreamError(
        f"could not load {PREFIX}{hf_id} from the Hugging Face Hub dataset {what}: the Hub could not be reached "
        f"and the dataset is not in the local cache, or the Hub refused it ({type(err).__name__}: {err}). "
        "To work offline, convert it once on a machine that reaches the Hub: "
        f"export_to_cl_layout(load_hf_task('{PREFIX}{hf_id}', 'test'), Path('<folder>'), 'HF') "
        "(from streams.huggingface), copy <folder> here, point stream.data_root (or CONTINUAL_DATA) at it "
        f"and name the task {folder_name(hf_id)!r} instead of {PREFIX}{hf_id}"
    )


def _unicode_error(err: BaseException) -> Optional[UnicodeDecodeError]:
    """The UnicodeDecodeError ``err`` is, or was raised from (``datasets`` wraps a builder's errors), else None."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, UnicodeDecodeError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


def load_hf_task(
    spec: str,
    eval_split: str = "test",
    skip_unknown_labels: bool = False,
    cache_dir: Optional[str] = None,
) -> TaskData:
    """Load a Hub task named ``hf:<id>`` (an id of :data:`HF_TASKS`).

    Args:
        spec: ``hf:<id>``, e.g. ``hf:ag_news`` or ``hf:glue/sst2`` (the prefix may be left out).
        eval_split: ``test`` (the table's evaluation split), ``dev`` (its dev split), ``heldout`` (its training
            split), or a literal split name.
        skip_unknown_labels: skip (with a warning) rows without a valid label (-1 in GLUE test splits) instead
            of failing.
        cache_dir: ``datasets`` cache folder (default: the Hugging Face cache).

    Raises:
        StreamError: unknown id (lists the known ones); the dataset could not be loaded (the original error is
            chained); unlabelled rows without ``skip_unknown_labels``.
    """
    hf_id = spec[len(PREFIX):] if is_hf_task(spec) else spec
    if hf_id not in HF_TASKS:
        raise StreamError(
            f"unknown Hugging Face task {spec!r}: known ids are {', '.join(PREFIX + k for k in HF_TASKS)}; "
            "for another dataset export it to the CL_Benchmark layout and load it as a folder"
        )
    entry = HF_TASKS[hf_id]
    split_name = {"test": entry.eval_split, "dev": entry.dev_split or entry.eval_split,
                  "heldout": entry.train_split}.get(eval_split, eval_split)
    if eval_split == "dev" and entry.dev_split is None:
        warnings.warn(f"{PREFIX}{hf_id} has no dev split of its own: stream.eval_split=dev evaluates on "
                      f"{entry.eval_split!r}, its test split; stream.eval_split=heldout evaluates on training rows "
                      "left out of training instead", stacklevel=2)

    import datasets

    try:
        with _offline_from_env():
            loaded = datasets.load_dataset(entry.path, entry.config, cache_dir=cache_dir)
    except Exception as err:  # offline, no cache, Hub error: all mean "get the data another way"
        undecodable = _unicode_error(err)
        if undecodable is not None:  # the data was found but one of its files is not text in its encoding
            raise StreamError(
                f"{PREFIX}{hf_id}: a data file of {entry.path} is not UTF-8 text ({undecodable}); "
                f"delete its copy in the datasets cache ({cache_dir or 'the Hugging Face cache'}) and load it again"
            ) from err
        raise _unreachable(hf_id, entry, err) from err

    for split in (entry.train_split, split_name):
        if split not in loaded:
            raise StreamError(f"{PREFIX}{hf_id}: no split {split!r}; the dataset has {sorted(loaded)}")
    features = loaded[entry.train_split].features
    names = getattr(features.get(entry.label_field), "names", None)
    if not names:
        raise StreamError(
            f"{PREFIX}{hf_id}: column {entry.label_field!r} is not a ClassLabel with names; fix HF_TASKS[{hf_id!r}]"
        )
    skipped: Dict[str, int] = {}
    splits = {}
    for split in dict.fromkeys((entry.train_split, split_name)):  # each split converted once
        splits[split], n = _to_split(loaded[split], entry, len(names), f"{PREFIX}{hf_id}/{split}", skip_unknown_labels)
        if n:
            skipped[f"{PREFIX}{hf_id}/{split}"] = n
    return TaskData(
        name=folder_name(hf_id),
        source=f"{PREFIX}{hf_id}",
        labels=tuple(str(n) for n in names),
        train=splits[entry.train_split],
        test=splits[split_name],
        skipped=skipped,
    )


def _to_split(dataset, entry: HFTask, num_labels: int, where: str, skip_unknown: bool) -> Tuple[TaskSplit, int]:
    missing = [c for c, _ in entry.text_fields if c not in dataset.column_names]
    if missing:
        raise StreamError(f"{where}: columns {missing} not found (has {dataset.column_names})")
    columns = [[prefix + (value or "") for value in dataset[column]] for column, prefix in entry.text_fields]
    texts: List[str] = []
    labels: List[int] = []
    bad = 0
    for parts, label in zip(zip(*columns), dataset[entry.label_field]):
        if label is None or not 0 <= label < num_labels:
            bad += 1
            continue
        texts.append("\n".join(parts))
        labels.append(int(label))
    if bad:
        message = f"{where}: {bad} rows have no valid label (e.g. -1 in hidden-label test splits)"
        if not skip_unknown:
            raise StreamError(f"{message}; use another split or set stream.skip_unknown_labels=true to skip them")
        warnings.warn(f"{message}; skipped them (stream.skip_unknown_labels=true)", stacklevel=3)
    return TaskSplit(texts, labels), bad


def export_to_cl_layout(task: TaskData, root: Path, group: str, name: Optional[str] = None) -> Path:
    """Write ``task`` as ``<root>/<group>/<name>/{train,test}.json`` plus ``labels.json``.

    Args:
        task: a loaded task (from the Hub or elsewhere).
        root: the CL_Benchmark root to write into (created if needed).
        group: the group folder, e.g. ``"HF"``.
        name: the task folder; default ``task.name``.

    Returns:
        The task folder, loadable with :func:`streams.cl_benchmark.load_cl_task`.
    """
    name = name or task.name
    for part, what in ((group, "group"), (name, "task name")):
        if not part or "/" in part or "\\" in part or part in (".", ".."):
            raise StreamError(f"export: {what} {part!r} must be a single folder name")
    folder = Path(root) / group / name
    folder.mkdir(parents=True, exist_ok=True)
    _write_json(folder / "labels.json", list(task.labels))
    for split_name, split in (("train", task.train), ("test", task.test)):
        rows = [{"label": task.labels[label], "sentence": text} for text, label in zip(split.texts, split.labels)]
        _write_json(folder / f"{split_name}.json", rows)
    return folder


def _write_json(path: Path, value) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(value, ensure_ascii=False), encoding="utf-8")
    tmp.replace(path)
