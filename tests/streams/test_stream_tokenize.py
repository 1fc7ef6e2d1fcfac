from pathlib import Path

import pytest
import torch

from streams.data import TaskSplit
from streams.errors import StreamError
from streams.tokenize import default_cache_dir, tokenize_split

SPLIT = TaskSplit(["a short one", "this sentence is a good deal longer than sixteen word pieces, " * 3], [1, 0])


def cache_entries(folder: Path):
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_columns_shapes_and_right_padding(tmp_path, tokenizer):
    tokenizer.padding_side = "left"
    try:
        data = tokenize_split(SPLIT, tokenizer, max_length=16, cache_dir=tmp_path, key="t/train")
        assert tokenizer.padding_side == "left"  # the caller's setting is restored
    finally:
        tokenizer.padding_side = "right"
    assert set(data.column_names) == {"input_ids", "attention_mask", "label"}
    batch = data[:]
    assert batch["input_ids"].shape == (2, 16) and batch["attention_mask"].shape == (2, 16)
    assert batch["label"].tolist() == [1, 0]
    assert isinstance(batch["input_ids"], torch.Tensor)
    short = batch["attention_mask"][0]
    assert short[0] == 1 and short[-1] == 0  # right padding
    assert short.tolist() == sorted(short.tolist(), reverse=True)
    assert batch["attention_mask"][1].all()  # truncated to exactly max_length
    assert batch["input_ids"][0, 0] == tokenizer.cls_token_id


def test_rerun_loads_from_cache_without_tokenizing(tmp_path, counting_tokenizer):
    first = tokenize_split(SPLIT, counting_tokenizer, 16, tmp_path, "t/train")
    assert counting_tokenizer.calls > 0
    entries = cache_entries(tmp_path)
    assert len(entries) == 1
    counting_tokenizer.calls = 0
    second = tokenize_split(SPLIT, counting_tokenizer, 16, tmp_path, "t/train")
    assert counting_tokenizer.calls == 0
    assert cache_entries(tmp_path) == entries
    assert torch.equal(first[:]["input_ids"], second[:]["input_ids"])


@pytest.mark.parametrize(
    "change",
    [
        dict(max_length=17),
        dict(key="t/test"),
        dict(split=TaskSplit(SPLIT.texts, [0, 0])),
        dict(split=TaskSplit(["another", SPLIT.texts[1]], SPLIT.labels)),
    ],
)
def test_any_input_change_makes_a_new_entry(tmp_path, tokenizer, change):
    args = dict(split=SPLIT, tokenizer=tokenizer, max_length=16, cache_dir=tmp_path, key="t/train")
    tokenize_split(**args)
    tokenize_split(**{**args, **change})
    assert len(cache_entries(tmp_path)) == 2


def test_empty_split_is_an_error(tmp_path, tokenizer):
    with pytest.raises(StreamError, match="t/train.*empty"):
        tokenize_split(TaskSplit([], []), tokenizer, 16, tmp_path, "t/train")


def test_default_cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("CONTINUAL_CACHE", str(tmp_path / "env"))
    assert default_cache_dir(str(tmp_path / "x")) == tmp_path / "x" / "tokenized"
    assert default_cache_dir(None) == tmp_path / "env" / "tokenized"
    monkeypatch.delenv("CONTINUAL_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir(None) == tmp_path / "home" / ".cache" / "continual" / "tokenized"
