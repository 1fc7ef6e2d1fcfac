import json

import pytest
import torch

from continual.checkpoint import load_task_state, save_task_state


def test_round_trip_with_tied_tensors_and_manifest(tmp_path):
    shared = torch.randn(4, 3)
    state = {"a.weight": shared, "b.weight": shared, "bias": torch.arange(3.0)}  # a and b share storage
    size = save_task_state(tmp_path, 0, "SST-2", state, meta={"strategy": "x"})
    size_b = save_task_state(tmp_path, 1, "ag news/1", {"w": torch.ones(2)})
    loaded, entry = load_task_state(tmp_path, "SST-2")
    assert set(loaded) == set(state)
    for key in state:
        torch.testing.assert_close(loaded[key], state[key])
    assert entry["bytes"] == size > 0 and entry["parameters"] == 27 and entry["strategy"] == "x"
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert set(manifest["tasks"]) == {"SST-2", "ag news/1"}
    assert manifest["tasks"]["ag news/1"]["bytes"] == size_b
    assert "/" not in manifest["tasks"]["ag news/1"]["file"]


def test_missing_task_and_missing_manifest_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="manifest"):
        load_task_state(tmp_path, "x")
    save_task_state(tmp_path, 0, "t0", {"w": torch.ones(1)})
    with pytest.raises(KeyError, match="t0"):
        load_task_state(tmp_path, "t1")
