import time

import datasets
import pytest

from streams.cl_benchmark import load_cl_task
from streams.data import TaskData, TaskSplit
from streams.errors import StreamError
from streams.huggingface import HF_TASKS, export_to_cl_layout, load_hf_task
from streams.sampling import cap_per_class


def test_table_entries_are_complete():
    for key in ("ag_news", "yelp_review_full", "amazon_polarity", "dbpedia_14", "yahoo_answers_topics",
                "glue/sst2", "glue/mnli", "glue/rte", "glue/qqp"):
        assert key in HF_TASKS
    for key, entry in HF_TASKS.items():
        assert entry.path and entry.text_fields and entry.label_field and entry.eval_split, key
    assert [p for _, p in HF_TASKS["glue/mnli"].text_fields] == ["sentence 1: ", "sentence 2: "]
    assert HF_TASKS["glue/sst2"].eval_split == "validation"  # GLUE test labels are hidden


def test_unknown_id_lists_known_ids():
    with pytest.raises(StreamError) as err:
        load_hf_task("hf:not_a_dataset", "test")
    assert "hf:not_a_dataset" in str(err.value) and "hf:ag_news" in str(err.value) and "hf:glue/sst2" in str(err.value)


def test_offline_fails_fast_with_a_way_out(tmp_path, monkeypatch):
    import datasets.config
    import huggingface_hub.constants

    before = (datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    with pytest.raises(StreamError) as err:
        load_hf_task("hf:glue/sst2", "test", cache_dir=str(tmp_path / "hf"))
    assert time.monotonic() - start < 10
    message = str(err.value)
    assert "hf:glue/sst2" in message and "Hub could not be reached" in message
    assert "stream.data_root" in message and "CONTINUAL_DATA" in message and "export_to_cl_layout" in message
    assert "'glue_sst2'" in message
    assert err.value.__cause__ is not None
    assert (datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE) == before


def fake_hub(monkeypatch, splits):
    """Make datasets.load_dataset return ``splits`` (a DatasetDict) and record what was asked for."""
    calls = []

    def load_dataset(path, name=None, cache_dir=None, **kwargs):
        calls.append((path, name))
        return splits

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return calls


def test_a_cached_data_file_that_is_not_utf8_is_not_called_unreachable(monkeypatch, tmp_path):
    def load_dataset(path, name=None, cache_dir=None, **kwargs):
        try:
            b"caf\xe9".decode("utf-8")
        except UnicodeDecodeError as err:  # how datasets reports a builder's failure: wrapped
            raise datasets.exceptions.DatasetGenerationError("An error occurred while generating the dataset") from err

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    with pytest.raises(StreamError) as err:
        load_hf_task("hf:ag_news", "test", cache_dir=str(tmp_path / "hf"))
    message = str(err.value)
    assert message.startswith("hf:ag_news: a data file of ") and "is not UTF-8 text" in message
    assert "position 3" in message and str(tmp_path / "hf") in message and "could not be reached" not in message


def nli_split(rows):
    features = datasets.Features({
        "premise": datasets.Value("string"),
        "hypothesis": datasets.Value("string"),
        "label": datasets.ClassLabel(names=["entailment", "neutral", "contradiction"]),
    })
    return datasets.Dataset.from_dict(
        {"premise": [r[0] for r in rows], "hypothesis": [r[1] for r in rows], "label": [r[2] for r in rows]},
        features=features,
    )


def test_hub_dataset_becomes_a_task(monkeypatch):
    splits = datasets.DatasetDict({
        "train": nli_split([("p0", "h0", 0), ("p1", "h1", 2)]),
        "validation_matched": nli_split([("vp", "vh", 1)]),
        "validation_mismatched": nli_split([("mp", "mh", 0)]),
        "test_matched": nli_split([("tp", "th", -1)]),
    })
    calls = fake_hub(monkeypatch, splits)
    task = load_hf_task("hf:glue/mnli", "test")
    assert calls == [("nyu-mll/glue", "mnli")]
    assert task.name == "glue_mnli" and task.source == "hf:glue/mnli"
    assert task.labels == ("entailment", "neutral", "contradiction")
    assert task.train.texts == ["sentence 1: p0\nsentence 2: h0", "sentence 1: p1\nsentence 2: h1"]
    assert task.train.labels == [0, 2]
    assert task.test.texts == ["sentence 1: vp\nsentence 2: vh"] and task.test.labels == [1]
    assert load_hf_task("hf:glue/mnli", "dev").test.texts == ["sentence 1: mp\nsentence 2: mh"]

    with pytest.raises(StreamError, match=r"test_matched: 1 rows have no valid label.*skip_unknown_labels"):
        load_hf_task("hf:glue/mnli", "test_matched")
    with pytest.warns(UserWarning, match="1 rows"):
        hidden = load_hf_task("hf:glue/mnli", "test_matched", skip_unknown_labels=True)
    assert len(hidden.test) == 0 and hidden.skipped == {"hf:glue/mnli/test_matched": 1}


def test_missing_split_is_reported(monkeypatch):
    fake_hub(monkeypatch, datasets.DatasetDict({"train": nli_split([("p", "h", 0)])}))
    with pytest.raises(StreamError, match=r"no split 'validation'.*\['train'\]"):
        load_hf_task("hf:super_glue/cb", "test")


def test_export_then_reload_round_trip(tmp_path):
    task = TaskData("pairs", "memory", ("no", "yes", "maybe"),
                    TaskSplit(["a\nb", "ünïcode ✓", "c"], [2, 0, 1]), TaskSplit(["d"], [1]), {})
    folder = export_to_cl_layout(task, tmp_path, "HF")
    assert folder == tmp_path / "HF" / "pairs"
    back = load_cl_task(tmp_path, "pairs")
    assert back.labels == task.labels
    assert (back.train, back.test) == (task.train, task.test)
    assert load_cl_task(tmp_path, "HF/pairs").train == task.train


def test_export_real_task_round_trip(cl_root, tmp_path):
    original = load_cl_task(cl_root, "sst-2")
    small = TaskData(original.name, original.source, original.labels, cap_per_class(original.train, 5, 0),
                     cap_per_class(original.test, 5, 0), {})
    export_to_cl_layout(small, tmp_path, "SC", name="sst2-copy")
    back = load_cl_task(tmp_path, "sst2-copy")
    assert (back.labels, back.train, back.test) == (small.labels, small.train, small.test)


@pytest.mark.parametrize("group,name", [("", "x"), ("a/b", "x"), ("G", ".."), ("G", "glue/sst2")])
def test_export_rejects_paths_as_names(tmp_path, group, name):
    task = TaskData("t", "memory", ("a",), TaskSplit(["x"], [0]), TaskSplit(["y"], [0]), {})
    with pytest.raises(StreamError, match="single folder name"):
        export_to_cl_layout(task, tmp_path, group, name=name)


def test_dev_on_a_dataset_without_a_dev_split_warns_that_it_is_the_test_split(monkeypatch):
    features = datasets.Features({"sentence": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["negative", "positive"])})
    split = datasets.Dataset.from_dict({"sentence": ["good", "bad"], "label": [1, 0]}, features=features)
    fake_hub(monkeypatch, datasets.DatasetDict({"train": split, "validation": split}))
    with pytest.warns(UserWarning, match=r"hf:glue/sst2 has no dev split .* 'validation', its test split; .*heldout"):
        task = load_hf_task("hf:glue/sst2", "dev")
    assert task.test.texts == load_hf_task("hf:glue/sst2", "test").test.texts
