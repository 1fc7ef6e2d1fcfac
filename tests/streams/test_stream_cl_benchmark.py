import json
import warnings
from pathlib import Path

import pytest

from streams.cl_benchmark import data_root_from, find_task_dir, list_tasks, load_cl_task
from streams.errors import StreamError, TaskNotFoundError


# --- data root -------------------------------------------------------------------------------------------------

def test_data_root_from_value_then_env(tmp_path, monkeypatch):
    monkeypatch.setenv("CONTINUAL_DATA", str(tmp_path / "env"))
    (tmp_path / "env").mkdir()
    assert data_root_from(str(tmp_path)) == tmp_path
    assert data_root_from(None) == tmp_path / "env"
    assert data_root_from("") == tmp_path / "env"


def test_data_root_missing_says_how_to_set_it(monkeypatch):
    monkeypatch.delenv("CONTINUAL_DATA", raising=False)
    with pytest.raises(StreamError) as err:
        data_root_from(None)
    assert "stream.data_root" in str(err.value) and "CONTINUAL_DATA" in str(err.value)


def test_data_root_folder_must_exist(tmp_path, monkeypatch):
    missing = tmp_path / "nowhere"
    with pytest.raises(StreamError, match="nowhere"):
        data_root_from(str(missing))
    monkeypatch.setenv("CONTINUAL_DATA", str(missing))
    with pytest.raises(StreamError, match=r"nowhere.*CONTINUAL_DATA"):
        data_root_from(None)


# --- finding task folders --------------------------------------------------------------------------------------

def test_find_task_dir_is_case_insensitive(cl_root):
    assert find_task_dir(cl_root, "sst-2") == cl_root / "SC" / "SST-2"
    assert find_task_dir(cl_root, "mnli") == cl_root / "NLI" / "MNLI"
    assert find_task_dir(cl_root, "tc/AGNEWS") == cl_root / "TC" / "agnews"
    assert find_task_dir(cl_root, "QQP/qqp") == cl_root / "QQP" / "QQP"


def test_find_task_dir_at_root_level(tmp_path, make_task):
    folder = make_task(tmp_path, "", "flat")
    assert folder == tmp_path / "flat"
    make_task(tmp_path, "G", "nested")
    assert find_task_dir(tmp_path, "FLAT") == folder
    assert find_task_dir(tmp_path, "nested") == tmp_path / "G" / "nested"
    assert list_tasks(tmp_path) == ["G/nested", "flat"]


def test_find_task_dir_ambiguous_lists_candidates(tmp_path, make_task):
    make_task(tmp_path, "A", "same")
    make_task(tmp_path, "B", "Same")
    with pytest.raises(StreamError) as err:
        find_task_dir(tmp_path, "same")
    assert "ambiguous" in str(err.value) and "A/same" in str(err.value) and "B/Same" in str(err.value)
    assert find_task_dir(tmp_path, "B/same") == tmp_path / "B" / "Same"


def test_missing_task_lists_existing_tasks(cl_root):
    with pytest.raises(TaskNotFoundError) as err:
        find_task_dir(cl_root, "cola")
    message = str(err.value)
    assert "'cola'" in message
    for task in ("TC/agnews", "NLI/MNLI", "SC/SST-2", "QQP/QQP"):
        assert task in message


def test_missing_task_in_synthetic_root(tmp_path, make_task):
    make_task(tmp_path, "G", "present")
    with pytest.raises(StreamError, match=r"'absent' not found.*G/present"):
        load_cl_task(tmp_path, "absent")
    with pytest.raises(StreamError, match="'G/absent' not found"):
        load_cl_task(tmp_path, "G/absent")


# --- loading real data -----------------------------------------------------------------------------------------

def test_load_real_agnews(cl_root):
    task = load_cl_task(cl_root, "agnews")
    assert task.name == "agnews"
    assert task.labels == ("World", "Sports", "Business", "Science or Technology")
    assert (len(task.train), len(task.test)) == (4000, 7600)
    assert set(task.train.labels) == {0, 1, 2, 3}
    assert task.train.texts[0].startswith("Title: ")
    assert task.skipped == {}
    with pytest.warns(UserWarning, match=r"dev.json is identical to .*test.json: .* stream.eval_split=heldout"):
        dev = load_cl_task(cl_root, "TC/agnews", eval_split="dev")
    assert dev.test.texts == task.test.texts  # dev.json is a copy of test.json in this benchmark


def test_mnli_unknown_labels_fail_by_default(cl_root):
    with pytest.raises(StreamError) as err:
        load_cl_task(cl_root, "mnli")
    message = str(err.value)
    assert str(Path("NLI/MNLI/test.json")) in message
    assert "131" in message and "'-'" in message
    assert "stream.skip_unknown_labels=true" in message


def test_mnli_unknown_labels_skipped_on_request(cl_root):
    with pytest.warns(UserWarning, match=r"MNLI/test.json: 131 rows"):
        task = load_cl_task(cl_root, "mnli", skip_unknown_labels=True)
    test_file = str(cl_root / "NLI" / "MNLI" / "test.json")
    assert task.skipped == {test_file: 131}
    assert len(task.test) == 7600 - 131
    assert len(task.train) == 3000


# --- malformed synthetic folders -------------------------------------------------------------------------------

def test_invalid_json_names_file_line_and_column(tmp_path, make_task):
    folder = make_task(tmp_path, "G", "t")
    (folder / "train.json").write_text('[\n {"sentence": "a", "label": "neg"},\n {"sentence": "b" "label": "pos"}\n]')
    with pytest.raises(StreamError) as err:
        load_cl_task(tmp_path, "t")
    message = str(err.value)
    assert "train.json" in message and "line 3" in message and "column" in message


def test_json_lines_are_accepted(tmp_path, make_task):
    folder = make_task(tmp_path, "G", "t")
    lines = [json.dumps({"sentence": f"s{i}", "label": ["neg", "pos"][i % 2]}) for i in range(5)]
    (folder / "train.json").write_text("\n".join(lines) + "\n\n")
    task = load_cl_task(tmp_path, "t")
    assert task.train.texts == [f"s{i}" for i in range(5)]
    assert task.train.labels == [0, 1, 0, 1, 0]


def test_broken_json_lines_names_the_line(tmp_path, make_task):
    folder = make_task(tmp_path, "G", "t")
    (folder / "test.json").write_text('{"sentence": "a", "label": "neg"}\n{"sentence": "b", "label": \n')
    with pytest.raises(StreamError, match=r"test.json: not valid JSON Lines \(line 2"):
        load_cl_task(tmp_path, "t")


@pytest.mark.parametrize("file", ["train.json", "test.json", "labels.json", "train.jsonl"])
def test_a_file_that_is_not_utf8_is_named_with_the_byte_offset(tmp_path, make_task, file):
    folder = make_task(tmp_path, "G", "t")
    if file == "labels.json":
        data = '["neg", "caf\u00e9"]'.encode("latin-1")  # offset 13: the e-acute, one byte in Latin-1
    else:
        data = '[{"sentence": "caf\u00e9", "label": "neg"}]'.encode("latin-1")  # offset 18
        if file.endswith(".jsonl"):
            (folder / "train.json").unlink()
            data = b'{"sentence": "ok", "label": "neg"}\n' + data[1:-1]  # line 2 of a JSON Lines file
    (folder / file).write_bytes(data)
    with pytest.raises(StreamError) as err:
        load_cl_task(tmp_path, "t")
    offset = data.index(b"\xe9")
    assert str(err.value).startswith(f"{folder / file}: not UTF-8 text (byte 0xe9 at byte offset {offset}, line ")
    assert "iconv" in str(err.value)


def test_a_byte_order_mark_is_allowed_and_offsets_count_it(tmp_path, make_task):
    folder = make_task(tmp_path, "G", "t")
    (folder / "labels.json").write_bytes(b"\xef\xbb\xbf" + '["neg", "pos"]'.encode())
    assert load_cl_task(tmp_path, "t").labels == ("neg", "pos")
    (folder / "test.json").write_bytes(b"\xef\xbb\xbf[\n" + '{"sentence": "na\u00efve", "label": "pos"}]'.encode("cp1252"))
    with pytest.raises(StreamError, match=r"test.json: not UTF-8 text \(byte 0xef at byte offset 21, line 2\)"):
        load_cl_task(tmp_path, "t")


@pytest.mark.parametrize(
    "content,expected",
    [
        ('"just a string"', "JSON array"),
        ("[1, 2]", "item 0 is a int"),
        ('[{"label": "neg"}]', "item 0 has no 'sentence'"),
        ('[{"sentence": "a", "label": "neg"}, {"sentence": "b"}]', "item 1 has no 'label'"),
        ('[{"sentence": 3, "label": "neg"}]', "sentence of type int"),
        ('[{"sentence": "a", "label": null}]', "label of type NoneType"),
        ("", "file is empty"),
    ],
)
def test_malformed_items_name_the_file(tmp_path, make_task, content, expected):
    folder = make_task(tmp_path, "G", "t")
    (folder / "train.json").write_text(content)
    with pytest.raises(StreamError) as err:
        load_cl_task(tmp_path, "t")
    assert str(folder / "train.json") in str(err.value)
    assert expected in str(err.value)


def test_missing_split_file(tmp_path, make_task):
    folder = make_task(tmp_path, "G", "t")
    (folder / "test.json").unlink()
    with pytest.raises(StreamError, match=r"test.json: file not found"):
        load_cl_task(tmp_path, "t")
    with pytest.raises(StreamError, match=r"dev.json: file not found"):
        load_cl_task(tmp_path, "t", eval_split="dev")


@pytest.mark.parametrize(
    "labels,expected",
    [("[]", "non-empty"), ('["a", "a"]', "duplicate"), ("[1, 2]", "must be strings"), (None, "file not found")],
)
def test_bad_labels_json(tmp_path, make_task, labels, expected):
    folder = make_task(tmp_path, "G", "t")
    if labels is None:
        (folder / "labels.json").unlink()
    else:
        (folder / "labels.json").write_text(labels)
    with pytest.raises(StreamError) as err:
        load_cl_task(tmp_path, "t")
    assert "labels.json" in str(err.value) and expected in str(err.value)


def test_unknown_label_synthetic(tmp_path, make_task):
    make_task(tmp_path, "G", "t", train=[("a", "neg"), ("b", "maybe"), ("c", "maybe"), ("d", "pos")])
    with pytest.raises(StreamError) as err:
        load_cl_task(tmp_path, "t")
    message = str(err.value)
    assert "train.json" in message and "2 rows" in message and "'maybe'" in message
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        task = load_cl_task(tmp_path, "t", skip_unknown_labels=True)
    assert task.train.texts == ["a", "d"] and task.train.labels == [0, 1]
    assert list(task.skipped.values()) == [2]
    assert any("train.json: 2 rows" in str(w.message) for w in caught)


def test_numeric_and_boolean_labels_match_their_strings(tmp_path, make_task):
    folder = make_task(tmp_path, "G", "t", labels=("False", "True"))
    rows = [{"sentence": "a", "label": True}, {"sentence": "b", "label": "False"}]
    (folder / "train.json").write_text(json.dumps(rows))
    assert load_cl_task(tmp_path, "t").train.labels == [1, 0]
