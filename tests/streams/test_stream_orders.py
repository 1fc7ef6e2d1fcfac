import pytest

from streams.errors import StreamError
from streams.orders import NAMED_STREAMS, describe_streams, resolve_order, resolve_task_names

# Copied from specs/continual_learning.md (Progressive Prompts / O-LoRA orders).
SPEC = {
    1: "dbpedia, amazon, yahoo, agnews",
    2: "dbpedia, amazon, agnews, yahoo",
    3: "yahoo, amazon, agnews, dbpedia",
    4: "mnli, cb, wic, copa, qqp, boolqa, rte, imdb, yelp, amazon, sst-2, dbpedia, agnews, multirc, yahoo",
    5: "multirc, boolqa, wic, mnli, cb, copa, qqp, rte, imdb, sst-2, dbpedia, agnews, yelp, amazon, yahoo",
    6: "yelp, amazon, mnli, cb, copa, qqp, rte, imdb, sst-2, dbpedia, agnews, yahoo, multirc, boolqa, wic",
}


def test_named_orders_match_the_spec():
    assert set(NAMED_STREAMS) == {"standard", "long"}
    assert sorted(NAMED_STREAMS["standard"]) == [1, 2, 3]
    assert sorted(NAMED_STREAMS["long"]) == [4, 5, 6]
    for name, orders in NAMED_STREAMS.items():
        for order, tasks in orders.items():
            assert tasks == SPEC[order].split(", "), (name, order)
    assert all(len(set(t)) == 15 for t in NAMED_STREAMS["long"].values())
    assert all(set(t) == set(NAMED_STREAMS["long"][4]) for t in NAMED_STREAMS["long"].values())


def test_order_none_takes_the_first_order():
    assert resolve_task_names("standard", None, []) == SPEC[1].split(", ")
    assert resolve_task_names("long", None, []) == SPEC[4].split(", ")
    assert resolve_order("long", None, []) == 4
    assert resolve_task_names("standard", 3, []) == SPEC[3].split(", ")


def test_explicit_tasks_win_over_any_stream():
    assert resolve_task_names("standard", 2, ["a", "hf:glue/sst2"]) == ["a", "hf:glue/sst2"]
    assert resolve_task_names("custom", None, ["TC/agnews"]) == ["TC/agnews"]
    assert resolve_task_names("whatever", 99, ["x"]) == ["x"]
    assert resolve_order("standard", 2, ["a"]) is None
    assert resolve_order("custom", None, ["a"]) is None


def test_custom_needs_tasks():
    with pytest.raises(StreamError, match="stream.tasks"):
        resolve_task_names("custom", None, [])


def test_blank_task_name_is_rejected():
    with pytest.raises(StreamError, match=r"stream.tasks\[1\]"):
        resolve_task_names("custom", None, ["agnews", " "])


def test_unknown_stream_lists_the_known_ones():
    with pytest.raises(StreamError) as err:
        resolve_task_names("nope", None, [])
    message = str(err.value)
    assert "'nope'" in message and "standard" in message and "long" in message and "custom" in message


@pytest.mark.parametrize("name,order", [("standard", 4), ("long", 1), ("standard", 0)])
def test_unknown_order_lists_the_orders(name, order):
    with pytest.raises(StreamError) as err:
        resolve_task_names(name, order, [])
    message = str(err.value)
    assert f"no order {order}" in message
    assert str(sorted(NAMED_STREAMS[name])) in message


def test_describe_streams_lists_every_order_and_hf_ids():
    lines = describe_streams()
    text = "\n".join(lines)
    for order, tasks in SPEC.items():
        assert f"order {order}: {tasks}" in text
    assert "custom" in text and "hf:glue/sst2" in text
