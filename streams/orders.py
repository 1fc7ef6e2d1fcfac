"""Named task orders of the standard NLP continual-learning benchmarks.

Orders 1-3 (standard, 4 tasks) and 4-6 (long, 15 tasks) as used by Progressive Prompts (Razdaibiedina et al.,
2023) and O-LoRA (Wang et al., 2023, arXiv 2310.14152).
"""

from __future__ import annotations

from typing import Dict, List, Optional

from streams.errors import StreamError

NAMED_STREAMS: Dict[str, Dict[int, List[str]]] = {
    "standard": {
        1: ["dbpedia", "amazon", "yahoo", "agnews"],
        2: ["dbpedia", "amazon", "agnews", "yahoo"],
        3: ["yahoo", "amazon", "agnews", "dbpedia"],
    },
    "long": {
        4: ["mnli", "cb", "wic", "copa", "qqp", "boolqa", "rte", "imdb",
            "yelp", "amazon", "sst-2", "dbpedia", "agnews", "multirc", "yahoo"],
        5: ["multirc", "boolqa", "wic", "mnli", "cb", "copa", "qqp", "rte",
            "imdb", "sst-2", "dbpedia", "agnews", "yelp", "amazon", "yahoo"],
        6: ["yelp", "amazon", "mnli", "cb", "copa", "qqp", "rte", "imdb",
            "sst-2", "dbpedia", "agnews", "yahoo", "multirc", "boolqa", "wic"],
    },
}

CUSTOM = "custom"


def _known() -> str:
    return "; ".join(f"{name} (orders {', '.join(map(str, orders))})" for name, orders in NAMED_STREAMS.items())


def resolve_order(name: str, order: Optional[int], tasks: List[str]) -> Optional[int]:
    """The order a stream runs in: None when explicit tasks are given or the stream is custom.

    Raises:
        StreamError: unknown stream name or order; the message lists the known ones.
    """
    if tasks or name == CUSTOM:
        return None
    orders = _orders_of(name)
    return min(orders) if order is None else _check_order(name, orders, order)


def resolve_task_names(name: str, order: Optional[int], tasks: List[str]) -> List[str]:
    """The task names of a stream.

    Args:
        name: a key of :data:`NAMED_STREAMS` or ``"custom"``.
        order: an order of that stream; None takes its first order. Ignored when ``tasks`` is given.
        tasks: explicit task names; when non-empty they win over the named stream (whatever its name).

    Raises:
        StreamError: ``custom`` without tasks, unknown stream name or order; the message lists the known ones.
    """
    tasks = [str(t) for t in tasks]
    if tasks:
        blank = [i for i, t in enumerate(tasks) if not t.strip()]
        if blank:
            raise StreamError(f"stream.tasks[{blank[0]}] is empty: give a task folder name, group/task or hf:<id>")
        return tasks
    if name == CUSTOM:
        raise StreamError(
            "stream.name=custom needs stream.tasks, e.g. stream.tasks=[agnews,TC/dbpedia,hf:glue/sst2]; "
            f"or use a named stream: {_known()}"
        )
    chosen = resolve_order(name, order, tasks)  # raises for an unknown name or order
    return list(NAMED_STREAMS[name][chosen])


def _orders_of(name: str) -> Dict[int, List[str]]:
    if name not in NAMED_STREAMS:
        raise StreamError(
            f"unknown stream.name {name!r}: known streams are {_known()}, "
            f"or {CUSTOM!r} with stream.tasks=[...]"
        )
    return NAMED_STREAMS[name]


def _check_order(name: str, orders: Dict[int, List[str]], order: int) -> int:
    if order not in orders:
        raise StreamError(
            f"stream {name!r} has no order {order!r}: set stream.order to one of {sorted(orders)} "
            f"(known streams: {_known()})"
        )
    return order


def describe_streams() -> List[str]:
    """Human-readable lines for ``continual list``."""
    from streams.huggingface import HF_TASKS

    lines = []
    for name, orders in NAMED_STREAMS.items():
        for order, tasks in orders.items():
            lines.append(f"{name} order {order}: {', '.join(tasks)}")
    lines.append(f"{CUSTOM}: any list in stream.tasks (task folder, group/task, or hf:<id>)")
    lines.append("hf:<id> tasks: " + ", ".join(f"hf:{key}" for key in HF_TASKS))
    return lines
