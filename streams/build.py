"""Turn a ``stream`` config node into tokenized tasks, in stream order.

Every task is loaded, capped and checked before any is tokenized, so a bad fourth task fails in seconds instead of
after three tokenizations.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, List, Optional

from streams.cl_benchmark import data_root_from, load_cl_task
from streams.data import TaskData, TaskInfo
from streams.errors import StreamError, TaskNotFoundError
from streams.huggingface import hf_ids_for, is_hf_task, load_hf_task
from streams.orders import resolve_order, resolve_task_names
from streams.sampling import cap_per_class, cap_total, split_per_class
from streams.tokenize import default_cache_dir, tokenize_split


@dataclass
class StreamTask:
    """One task of a stream: what the learner sees, the tokenized splits, and the (capped) raw data."""

    info: TaskInfo
    train: Any  # datasets.Dataset, torch format: input_ids, attention_mask, label
    test: Any  # datasets.Dataset, same columns; the stream.eval_split split
    data: TaskData  # texts and labels after capping (what train/test were tokenized from)


@dataclass
class Stream:
    name: str
    order: Optional[int]  # None for custom streams and explicit task lists
    tasks: List[StreamTask]

    @property
    def task_infos(self) -> List[TaskInfo]:
        return [task.info for task in self.tasks]


# stream.eval_split=heldout: evaluation rows come from the training file, from the rows not drawn for training.
HELDOUT = "heldout"


def load_task(name: str, root: Optional[Path], eval_split: str, skip_unknown_labels: bool) -> TaskData:
    """Load one task: ``hf:<id>`` from the Hub, anything else from the CL_Benchmark folder ``root``. With
    ``eval_split="heldout"`` both loaders return the training split as the evaluation split (:func:`_capped` keeps
    the two apart)."""
    if is_hf_task(name):
        return load_hf_task(name, eval_split, skip_unknown_labels=skip_unknown_labels)
    if root is None:
        raise StreamError(f"task {name!r} is read from a folder: set stream.data_root or CONTINUAL_DATA")
    try:
        return load_cl_task(root, name, eval_split=eval_split, skip_unknown_labels=skip_unknown_labels)
    except TaskNotFoundError as err:
        hints = hf_ids_for(name)
        if hints:
            also = ", ".join(f"hf:{h}" for h in hints)
            raise TaskNotFoundError(f"{err}; this task is also on the Hub as {also}") from err
        raise


def _check_unique(names: List[str], sources: List[str]) -> None:
    seen: dict = {}
    for name, source in zip(names, sources):
        key = source.lower()
        if key in seen:
            raise StreamError(
                f"task {name!r} appears twice in the stream (also as {seen[key]!r}; both are {source}); "
                "each task may appear once: remove the duplicate from stream.tasks"
            )
        seen[key] = name


def _capped(name: str, data: TaskData, eval_split: str, train_per_class: Optional[int],
            test_per_task: Optional[int], seed: int) -> TaskData:
    for split_name, split in (("train", data.train), (eval_split, data.test)):
        if len(split) == 0:
            skipped = f" ({sum(data.skipped.values())} rows skipped for unknown labels)" if data.skipped else ""
            raise StreamError(f"task {name!r}: the {split_name} split of {data.source} has no rows{skipped}")
    if eval_split == HELDOUT:
        if train_per_class is None:
            raise StreamError(f"task {name!r}: stream.eval_split=heldout evaluates on training rows left out of "
                              "training, so it needs stream.train_per_class set (with none, every row trains)")
        train, rest = split_per_class(data.train, train_per_class, seed)
        test = cap_total(rest, test_per_task, seed)
    else:
        train = cap_per_class(data.train, train_per_class, seed)
        test = cap_total(data.test, test_per_task, seed)
    for split_name, split, cap in (("train", train, f"train_per_class={train_per_class}"),
                                   (eval_split, test, f"test_per_task={test_per_task}")):
        if len(split) == 0:
            raise StreamError(f"task {name!r}: the {split_name} split is empty after capping with stream.{cap}; "
                              "raise the cap")
    return dataclasses.replace(data, train=train, test=test)


def build_stream(cfg, tokenizer, progress: bool = True) -> Stream:
    """Build the stream described by ``cfg``.

    Args:
        cfg: the ``stream`` config node (:class:`continual.config.StreamConfig` or a DictConfig of it).
        tokenizer: a Hugging Face tokenizer.
        progress: show a progress bar over tasks while tokenizing.

    Raises:
        StreamError: unknown stream or order, duplicate or missing task, malformed data, empty split.
    """
    from tqdm.auto import tqdm

    tasks = [str(t) for t in (cfg.tasks or [])]
    names = resolve_task_names(cfg.name, cfg.order, tasks)
    order = resolve_order(cfg.name, cfg.order, tasks)
    _check_unique(names, [n.strip().lower() for n in names])
    needs_root = any(not is_hf_task(n) for n in names)
    root = data_root_from(cfg.data_root) if needs_root else None

    # Validate everything first: load and cap every task before tokenizing any.
    loaded = [load_task(n, root, cfg.eval_split, cfg.skip_unknown_labels) for n in names]
    _check_unique(names, [data.source for data in loaded])
    capped = [
        _capped(n, data, cfg.eval_split, cfg.train_per_class, cfg.test_per_task, cfg.seed)
        for n, data in zip(names, loaded)
    ]

    cache_dir = default_cache_dir(cfg.cache_dir)
    stream_tasks: List[StreamTask] = []
    bar = tqdm(list(zip(names, capped)), desc="tokenizing", unit="task", disable=not progress)
    for index, (name, data) in enumerate(bar):
        bar.set_postfix_str(name)
        train = tokenize_split(data.train, tokenizer, cfg.max_length, cache_dir, key=f"{data.source}:train")
        test = tokenize_split(data.test, tokenizer, cfg.max_length, cache_dir, key=f"{data.source}:{cfg.eval_split}")
        info = TaskInfo(index=index, name=name, labels=tuple(data.labels))
        stream_tasks.append(StreamTask(info=info, train=train, test=test, data=data))
    return Stream(name=cfg.name, order=order, tasks=stream_tasks)
