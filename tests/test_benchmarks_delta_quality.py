"""`benchmarks.delta_quality`: presets on the command line become one `continual compare` grid and its outputs."""

from __future__ import annotations

import json

import pytest
import yaml

from benchmarks.delta_quality import main, run_names


def test_run_names_are_stems_made_unique():
    assert run_names(["configs/quickstart.yaml", "deltas/lora"]) == ["quickstart", "lora"]
    assert run_names(["configs/deltas/lora.yaml", "configs/routers/lora.yaml", "/abs/x.yaml", "/abs/x.yaml", "x"]) == [
        "deltas-lora", "routers-lora", "abs-x", "abs-x-2", "x"]


@pytest.mark.slow
def test_presets_run_as_one_comparison(tmp_path, cl_root, tiny_backbone, monkeypatch):
    monkeypatch.chdir(tmp_path)
    base = {
        "stream": {"name": "custom", "tasks": ["SST-2", "agnews"], "data_root": str(cl_root), "train_per_class": 4,
                   "test_per_task": 12, "max_length": 24, "cache_dir": str(tmp_path / "cache")},
        "backbone": tiny_backbone,
        "training": {"epochs": 1, "batch_size": 8, "lr": 1e-3},
    }
    for folder, strategy in (("full", {"name": "full_finetune"}), ("lora", {"name": "delta", "kinds": ["lora"]})):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "tiny.yaml").write_text(yaml.safe_dump({**base, "strategy": strategy}))
    argv = ["full/tiny.yaml", "lora/tiny.yaml", "--set", "tracking.enabled=false", "training.progress=false",
            "--out", "out/dq", "--json", "rows.json"]

    # A typo fails before any cell runs, and no table rows are written.
    assert main([*argv, "--set", "training.lrr=1"]) == 2
    assert not (tmp_path / "out" / "dq" / "cells").exists() and not (tmp_path / "rows.json").exists()

    assert main(argv) == 0
    out = tmp_path / "out" / "dq"
    written = yaml.safe_load((out / "delta_quality.yaml").read_text())
    assert written["tracking"] == {"enabled": False} and written["set"] == ["training.progress=false"]
    for name in ("compare.md", "compare.csv", "compare.json", "cells.json", "acc_vs_stored.png"):
        assert (out / name).is_file(), name
    table = json.loads((tmp_path / "rows.json").read_text())
    assert table == json.loads((out / "compare.json").read_text())
    assert [row["run"] for row in table["rows"]] == ["full-tiny", "lora-tiny"]
    assert all(row["cells"] == 1 and 0.0 <= row["acc"] <= 1.0 for row in table["rows"])
    assert table["rows"][1]["bwt"] == 0.0  # isolated LoRA modules forget nothing
    assert "| lora-tiny | 1 |" in (out / "compare.md").read_text()
    assert not (tmp_path / "mlflow.db").exists()  # tracking.enabled=false reached the comparison and every cell
