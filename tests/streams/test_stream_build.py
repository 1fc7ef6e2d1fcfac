import dataclasses
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from continual.config import StreamConfig
from streams.data import TaskInfo
from streams import build as build_module
from streams.build import Stream, build_stream
from streams.data import TaskData, TaskSplit
from streams.errors import StreamError


def config(root, cache, **kwargs) -> StreamConfig:
    base = dict(data_root=str(root) if root else None, cache_dir=str(cache), train_per_class=2, test_per_task=6,
                max_length=16)
    return StreamConfig(**{**base, **kwargs})


def cache_entries(cache: Path):
    folder = cache / "tokenized"
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_standard_stream_from_real_data(cl_root, tmp_path, tokenizer):
    cfg = OmegaConf.structured(config(cl_root, tmp_path, name="standard", order=2))
    stream = build_stream(cfg, tokenizer, progress=False)
    assert isinstance(stream, Stream)
    assert (stream.name, stream.order) == ("standard", 2)
    assert [t.name for t in stream.task_infos] == ["dbpedia", "amazon", "agnews", "yahoo"]
    assert [t.index for t in stream.task_infos] == [0, 1, 2, 3]
    assert stream.task_infos[2] == TaskInfo(2, "agnews", ("World", "Sports", "Business", "Science or Technology"))
    for task in stream.tasks:
        assert len(task.train) == 2 * len(task.info.labels)
        assert len(task.test) == 6
        assert len(task.data.train) == len(task.train)  # data holds the capped texts
        row = task.train[0]
        assert row["input_ids"].shape == (16,) and row["attention_mask"].shape == (16,)
        assert 0 <= int(row["label"]) < len(task.info.labels)


def test_second_build_reuses_the_cache(cl_root, tmp_path, counting_tokenizer):
    cfg = config(cl_root, tmp_path, name="custom", tasks=["sst-2", "TC/agnews"])
    first = build_stream(cfg, counting_tokenizer, progress=False)
    assert counting_tokenizer.calls > 0
    entries = cache_entries(tmp_path)
    assert len(entries) == 4  # two tasks x (train, test)
    counting_tokenizer.calls = 0
    second = build_stream(cfg, counting_tokenizer, progress=True)
    assert counting_tokenizer.calls == 0
    assert cache_entries(tmp_path) == entries
    assert second.order is None
    assert [t.name for t in second.task_infos] == ["sst-2", "TC/agnews"]
    assert first.tasks[1].data.train.texts == second.tasks[1].data.train.texts


def test_seed_changes_the_sample(cl_root, tmp_path, tokenizer):
    runs = [build_stream(config(cl_root, tmp_path, tasks=["agnews"], seed=s), tokenizer, progress=False)
            for s in (0, 0, 1)]
    texts = [run.tasks[0].data.train.texts for run in runs]
    assert texts[0] == texts[1] and texts[0] != texts[2]


@pytest.mark.parametrize("tasks", [["agnews", "agnews"], ["agnews", "TC/AGNews"], ["sst-2", "SC/SST-2"]])
def test_duplicate_tasks_are_rejected(cl_root, tmp_path, tokenizer, tasks):
    with pytest.raises(StreamError, match="appears twice"):
        build_stream(config(cl_root, tmp_path, tasks=tasks), tokenizer, progress=False)


def test_bad_fourth_task_fails_before_any_tokenization(cl_root, tmp_path, counting_tokenizer):
    cfg = config(cl_root, tmp_path, tasks=["agnews", "sst-2", "imdb", "cola"])
    with pytest.raises(StreamError) as err:
        build_stream(cfg, counting_tokenizer, progress=False)
    assert "'cola' not found" in str(err.value) and "hf:glue/cola" in str(err.value)
    assert counting_tokenizer.calls == 0
    assert cache_entries(tmp_path) == []


def test_mnli_in_a_stream_needs_the_skip_flag(cl_root, tmp_path, tokenizer):
    cfg = config(cl_root, tmp_path, tasks=["rte", "mnli"])
    with pytest.raises(StreamError, match=r"MNLI/test.json: 131 rows.*skip_unknown_labels=true"):
        build_stream(cfg, tokenizer, progress=False)
    with pytest.warns(UserWarning, match="131 rows"):
        stream = build_stream(dataclasses.replace(cfg, skip_unknown_labels=True), tokenizer, progress=False)
    assert list(stream.tasks[1].data.skipped.values()) == [131]


def test_missing_data_root(tmp_path, tokenizer, monkeypatch):
    monkeypatch.delenv("CONTINUAL_DATA", raising=False)
    with pytest.raises(StreamError, match="CONTINUAL_DATA"):
        build_stream(config(None, tmp_path), tokenizer, progress=False)
    with pytest.raises(StreamError, match="does not exist"):
        build_stream(config(tmp_path / "missing", tmp_path), tokenizer, progress=False)


def test_data_root_from_environment(cl_root, tmp_path, tokenizer, monkeypatch):
    monkeypatch.setenv("CONTINUAL_DATA", str(cl_root))
    stream = build_stream(config(None, tmp_path, tasks=["rte"]), tokenizer, progress=False)
    assert stream.task_infos[0].labels == ("contradiction", "entailment")


def test_hf_only_stream_needs_no_data_root(tmp_path, tokenizer, monkeypatch):
    monkeypatch.delenv("CONTINUAL_DATA", raising=False)
    fake = TaskData("glue_sst2", "hf:glue/sst2", ("negative", "positive"),
                    TaskSplit(["bad", "good", "awful", "great"], [0, 1, 0, 1]), TaskSplit(["meh", "fine"], [0, 1]), {})
    seen = []

    def fake_load(spec, eval_split, skip_unknown_labels=False):
        seen.append((spec, eval_split))
        return fake

    monkeypatch.setattr(build_module, "load_hf_task", fake_load)
    stream = build_stream(config(None, tmp_path, tasks=["hf:glue/sst2"], eval_split="dev"), tokenizer, progress=False)
    assert seen == [("hf:glue/sst2", "dev")]
    assert stream.task_infos == [TaskInfo(0, "hf:glue/sst2", ("negative", "positive"))]
    assert len(stream.tasks[0].train) == 4 and len(stream.tasks[0].test) == 2


def test_empty_split_file_names_task_and_split(tmp_path, tokenizer, make_task):
    make_task(tmp_path / "data", "G", "empty", test=[])
    with pytest.raises(StreamError, match=r"task 'empty': the test split .* has no rows"):
        build_stream(config(tmp_path / "data", tmp_path, tasks=["empty"]), tokenizer, progress=False)


def test_split_empty_after_skipping_unknown_labels(tmp_path, tokenizer, make_task):
    make_task(tmp_path / "data", "G", "t", train=[("a", "?"), ("b", "?")])
    cfg = config(tmp_path / "data", tmp_path, tasks=["t"], skip_unknown_labels=True)
    with pytest.warns(UserWarning), pytest.raises(StreamError, match=r"train split .* no rows \(2 rows skipped"):
        build_stream(cfg, tokenizer, progress=False)


def test_split_empty_after_capping(tmp_path, tokenizer, make_task):
    make_task(tmp_path / "data", "G", "t")
    cfg = config(tmp_path / "data", tmp_path, tasks=["t"], train_per_class=0)  # load_config would refuse 0
    with pytest.raises(StreamError, match=r"task 't': the train split is empty after capping.*train_per_class=0"):
        build_stream(cfg, tokenizer, progress=False)


def test_unknown_stream_or_order(tmp_path, tokenizer):
    with pytest.raises(StreamError, match="known streams"):
        build_stream(config(tmp_path, tmp_path, name="huge"), tokenizer, progress=False)
    with pytest.raises(StreamError, match=r"no order 7"):
        build_stream(config(tmp_path, tmp_path, name="long", order=7), tokenizer, progress=False)
    with pytest.raises(StreamError, match="stream.tasks"):
        build_stream(config(tmp_path, tmp_path, name="custom"), tokenizer, progress=False)


def test_heldout_evaluates_on_training_rows_never_drawn_for_training(cl_root, tmp_path, tokenizer):
    cfg = config(cl_root, tmp_path, tasks=["agnews", "sst-2"], train_per_class=5, test_per_task=40,
                 eval_split="heldout")
    stream = build_stream(cfg, tokenizer, progress=False)
    for task in stream.tasks:
        train, held = task.data.train, task.data.test
        assert len(train) == 5 * len(task.info.labels) and len(held) == 40
        assert not set(train.texts) & set(held.texts)  # no training row is evaluated
        assert len(set(held.labels)) == len(task.info.labels)  # stratified over the classes
    full = load_cl_task_texts(cl_root, "agnews")
    assert set(stream.tasks[0].data.test.texts) <= full  # drawn from train.json, not test.json
    again = build_stream(cfg, tokenizer, progress=False)
    assert again.tasks[0].data.test.texts == stream.tasks[0].data.test.texts  # seeded
    with pytest.raises(StreamError, match=r"'agnews'.*heldout .* needs stream.train_per_class"):
        build_stream(config(cl_root, tmp_path, tasks=["agnews"], train_per_class=None, eval_split="heldout"),
                     tokenizer, progress=False)


def load_cl_task_texts(root, name):
    from streams.cl_benchmark import load_cl_task

    return set(load_cl_task(root, name).train.texts)
