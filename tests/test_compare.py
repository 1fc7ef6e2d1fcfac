"""`continual compare`: a grid of tiny runs in subprocesses, aggregated, reused on a rerun, failures recorded, bad
input caught before any cell runs."""

from __future__ import annotations

import json

import pytest
import yaml

from continual.config import ConfigError
from continual.recipes.compare import load_compare_config, run_compare

pytestmark = pytest.mark.slow


@pytest.fixture
def grid(tmp_path, cl_root, tiny_backbone):
    base = {
        "stream": {"name": "custom", "tasks": ["SST-2", "agnews"], "data_root": str(cl_root), "train_per_class": 4,
                   "test_per_task": 12, "max_length": 24, "cache_dir": str(tmp_path / "cache")},
        "backbone": tiny_backbone,
        "training": {"epochs": 1, "batch_size": 8, "lr": 1e-3},
        "tracking": {"enabled": False},
    }
    preset = tmp_path / "tiny.yaml"
    preset.write_text("# continual run tiny.yaml\n# A tiny run.\n" + yaml.safe_dump(base))

    def make(runs, **extra):
        cfg = {"name": "tiny", "base": str(preset), "orders": [1], "seeds": [0, 1], "runs": runs,
               "output_dir": str(tmp_path / "outputs"), "tracking": {"enabled": False}, **extra}
        path = tmp_path / "compare.yaml"
        path.write_text(yaml.safe_dump(cfg))
        return load_compare_config(path)

    return make


def test_a_grid_runs_aggregates_and_is_reused(grid, tmp_path):
    cfg = grid([{"name": "full"}, {"name": "lora", "overrides": ["strategy.name=delta", "strategy.kinds=[lora]"]},
                {"name": "diverges", "overrides": ["training.lr=1e30", "training.max_grad_norm=0"]}])
    lines = []
    rows = run_compare(cfg, echo=lines.append)
    by_run = {r["run"]: r for r in rows}
    assert by_run["full"]["cells"] == 2 and by_run["lora"]["cells"] == 2
    assert 0.0 <= by_run["lora"]["acc"] <= 1.0 and by_run["lora"]["acc_std"] >= 0.0
    assert by_run["lora"]["bwt"] == 0.0  # isolated modules: nothing forgotten, in every cell
    assert by_run["diverges"]["failed"] == 2 and by_run["diverges"]["cells"] == 0
    assert any("loss became" in e for e in by_run["diverges"]["errors"])
    out = tmp_path / "outputs" / "tiny"
    for name in ("compare.md", "compare.csv", "cells.json", "acc_vs_stored.png", "bwt.png", "final_accuracy.png",
                 "forgetting_curves.png"):
        assert (out / name).is_file(), name
    table = (out / "compare.md").read_text()
    assert "| lora | 2 |" in table and "diverges" in table and "Failed cells" in table

    # Rerun: the finished cells are reused (nothing of theirs runs again), the failed ones are tried again.
    again = []
    rows = run_compare(cfg, echo=again.append)
    assert again[0].startswith("compare 'tiny': 6 cells (4 done, 2 to run)")
    assert {r["run"]: r["acc"] for r in rows if r["cells"]} == {r["run"]: r["acc"] for r in by_run.values() if r["cells"]}
    dry = []
    run_compare(cfg, dry_run=True, echo=dry.append)
    assert sum(" done " in line for line in dry) == 4
    status = {c["id"]: c["status"] for c in json.loads((out / "cells.json").read_text())}
    assert status["lora-o1-s0"] == "done" and status["diverges-o1-s1"] == "failed"

    # --report: the table from the finished cells while others are not run (here: a run added since); nothing runs.
    more = grid([{"name": "full"}, {"name": "prompt", "overrides": ["strategy.name=delta", "strategy.kinds=[prompt]"]}])
    (out / "compare.md").unlink()
    report = []
    rows = run_compare(more, report_only=True, echo=report.append)
    assert any("report only: 2 cells not finished" in line for line in report)
    assert {r["run"]: r["cells"] for r in rows} == {"full": 2, "prompt": 0}
    assert "| prompt | 0 |" in (out / "compare.md").read_text()
    assert not list((out / "cells" / "tiny").glob("prompt-*"))  # nothing of the new run ran


def test_bad_strategy_options_and_folder_names_fail_before_any_cell_runs(grid, tmp_path):
    bad_kind = {"name": "bad", "overrides": ["strategy.name=delta", "strategy.kinds=[foo]"]}
    with pytest.raises(ConfigError, match=r"run 'bad' \(order 1, seed 0.*\): strategy.kinds: unknown kind 'foo'"):
        run_compare(grid([{"name": "ok"}, bad_kind]), echo=lambda *_: None)
    assert not (tmp_path / "outputs" / "tiny" / "cells").exists()
    with pytest.raises(ConfigError, match=r"^runs.1.name: '../up' is used as a folder name under output_dir"):
        grid([{"name": "ok"}, {"name": "../up"}])
    with pytest.raises(ConfigError, match=r"^name: 'a/b' is used as a folder name under output_dir"):
        grid([{"name": "ok"}], name="a/b")


def test_bad_input_fails_before_any_cell_runs(grid, tmp_path):
    with pytest.raises(ConfigError, match=r"run 'typo' \(order 1, seed 0.*training.lrr"):
        run_compare(grid([{"name": "ok"}, {"name": "typo", "overrides": ["training.lrr=1"]}]), echo=lambda *_: None)
    with pytest.raises(ConfigError, match=r"run 'nope'.*config file not found"):
        run_compare(grid([{"name": "nope", "preset": "no/such/preset.yaml"}]), echo=lambda *_: None)
    with pytest.raises(ConfigError, match=r"run 'bad'.*strategy.name: unknown strategy 'magic'"):
        run_compare(grid([{"name": "bad", "overrides": ["strategy.name=magic"]}]), echo=lambda *_: None)
    assert not (tmp_path / "outputs" / "tiny" / "cells").exists()
    with pytest.raises(ConfigError, match="runs: names must be unique"):
        grid([{"name": "a"}, {"name": "a"}])


def test_overrides_the_cell_command_would_overwrite_are_refused(grid):
    with pytest.raises(ConfigError, match=r"^set.1: stream.order is set for every cell .* the comparison's `orders`"):
        grid([{"name": "ok"}], set=["training.epochs=1", "stream.order=2"])
    with pytest.raises(ConfigError, match=r"^runs.0.overrides.0: tracking.enabled is set .* `tracking.enabled`"):
        grid([{"name": "quiet", "overrides": ["tracking.enabled=false"]}])


def test_threads_per_cell_reach_the_cells_and_bad_values_are_refused(grid, monkeypatch):
    import subprocess

    from continual.recipes import compare

    seen, real = [], subprocess.Popen

    def popen(command, **kwargs):
        seen.append(kwargs["env"]["OMP_NUM_THREADS"])
        return real(command, **kwargs)

    monkeypatch.setattr(compare.subprocess, "Popen", popen)
    cfg = grid([{"name": "full"}], seeds=[0])
    with pytest.raises(ConfigError, match="--threads: must be >= 1, got 0"):
        run_compare(cfg, threads=0, echo=lambda _: None)
    assert seen == []
    rows = run_compare(cfg, threads=1, echo=lambda _: None)
    assert seen == ["1"] and rows[0]["cells"] == 1


def test_runs_of_a_group_are_alternatives_and_the_table_names_the_best(grid, tmp_path):
    import math

    from continual.recipes.compare import best_by_group, format_compare

    cfg = grid([{"name": "lora_lr1e-3", "group": "lora"}, {"name": "lora_lr3e-3", "group": "lora"},
                {"name": "full"}, {"name": "prompt_lr1e-2", "group": "prompt"},
                {"name": "prompt_lr3e-2", "group": "prompt"}])

    def row(run, acc, std=0.0):
        numbers = {k: math.nan for k in ("acc", "bwt", "fwt", "forgetting", "acc_oracle", "routing_acc",
                                         "trained_per_task", "stored_per_task", "added_per_task", "stored_bytes",
                                         "wall_s", "peak_mb")}
        numbers.update({f"{k}_std": math.nan for k in list(numbers)})
        numbers.update(acc=acc, acc_std=std)
        return {"run": run, "cells": 0 if math.isnan(acc) else 2, "failed": 0, "errors": [], **numbers}

    rows = [row("lora_lr1e-3", 0.60, 0.01), row("lora_lr3e-3", 0.65, 0.02), row("full", 0.90),
            row("prompt_lr1e-2", math.nan), row("prompt_lr3e-2", math.nan)]
    best = best_by_group(rows, cfg)
    assert [(b["group"], b["best"]) for b in best] == [("lora", "lora_lr3e-3"), ("prompt", None)]
    assert best[0]["runs"] == {"lora_lr1e-3": 0.60, "lora_lr3e-3": 0.65}  # the ungrouped run never competes
    table = format_compare(rows, cfg)
    assert "| lora | lora_lr3e-3 | 65.00 ± 2.00 | lora_lr1e-3 60.00, lora_lr3e-3 65.00 |" in table
    assert "| prompt | - (no finished cell) | - | prompt_lr1e-2 -, prompt_lr3e-2 - |" in table
    assert "Best run of each group" not in format_compare(rows, grid([{"name": "full"}]))


def test_cells_run_breadth_first_so_a_stopped_grid_has_every_run_on_the_same_cells(grid, tmp_path):
    from continual.recipes.compare import breadth_first, plan_cells

    cfg = grid([{"name": "full"}, {"name": "lora", "overrides": ["strategy.name=delta", "strategy.kinds=[lora]"]}],
               orders=[1, 2])
    cells = plan_cells(cfg, tmp_path / "none")
    assert [c.id for c in cells][:2] == ["full-o1-s0", "full-o1-s1"]  # listed run by run
    assert [c.id for c in breadth_first(cells, cfg)] == [
        "full-o1-s0", "lora-o1-s0", "full-o2-s0", "lora-o2-s0", "full-o1-s1", "lora-o1-s1", "full-o2-s1", "lora-o2-s1"]


def test_a_finished_cell_is_reused_only_while_its_settings_are_unchanged(grid, tmp_path):
    first = grid([{"name": "full"}], seeds=[0])
    assert run_compare(first, echo=lambda _: None)[0]["cells"] == 1
    cells = tmp_path / "outputs" / "tiny" / "cells" / "tiny"

    # The preset's rate changes: the cell is stale, says what changed, and runs again into a new folder.
    changed = grid([{"name": "full", "overrides": ["training.lr=2e-3"]}], seeds=[0])
    dry = []
    run_compare(changed, dry_run=True, echo=dry.append)
    assert dry[0].startswith("compare 'tiny': 1 cells (0 done, 1 to run, 1 of them finished with other settings)")
    assert "stale" in dry[1] and "training.lr: 0.001 -> 0.002" in dry[1]
    lines = []
    assert run_compare(changed, echo=lines.append)[0]["cells"] == 1
    assert (cells / "full-o1-s0-2" / "summary.json").is_file()
    assert json.loads((tmp_path / "outputs" / "tiny" / "cells.json").read_text())[0]["folder"].endswith("full-o1-s0-2")

    # Back to the first settings: the first folder matches again and is reused; where and how a cell reports is not a
    # setting that makes it stale.
    again = []
    run_compare(grid([{"name": "full"}], seeds=[0]), dry_run=True, echo=again.append)
    assert again[0].startswith("compare 'tiny': 1 cells (1 done, 0 to run)") and again[1].rstrip().endswith("full-o1-s0")


def test_added_params_per_task_is_what_each_task_after_the_first_adds(tmp_path):
    import math

    from continual.recipes.compare import Cell, cell_numbers, summarise

    def record(stored):
        return {"trainable_parameters": 10, "stored_parameters": stored, "wall_time_s": 1.0, "peak_memory_mb": 5.0}

    def cell(run, stored):
        return Cell(run=run, order=1, seed=0, preset=tmp_path, overrides=[], status="done", summary={
            "summary": {"acc": 0.5}, "result": {"records": [record(s) for s in stored], "task_names": ["a", "b", "c"],
                                                "matrix": [[0.5, None, None], [0.5, 0.5, None], [0.5, 0.5, 0.5]]}})

    assert cell_numbers(cell("lora", [1000, 1100, 1200]))["added_per_task"] == 100
    assert cell_numbers(cell("full", [1000, 1000, 1000]))["added_per_task"] == 0
    assert math.isnan(cell_numbers(cell("joint", [1000]))["added_per_task"])  # one training experience
    row = summarise([cell("lora", [1000, 1100, 1200]), cell("lora", [1000, 1300, 1600])], ["lora"])[0]
    assert row["added_per_task"] == 200 and row["stored_per_task"] == 1400 / 3


def test_runs_option_runs_only_the_named_runs_and_names_an_unknown_one(grid, tmp_path):
    cfg = grid([{"name": "full"}, {"name": "lora", "overrides": ["strategy.name=delta", "strategy.kinds=[lora]"]}],
               seeds=[0])
    with pytest.raises(ConfigError, match=r"^--runs: no run named 'lroa' in 'tiny'; its runs: full, lora$"):
        run_compare(cfg, only=["lroa"], echo=lambda _: None)
    assert not (tmp_path / "outputs" / "tiny" / "cells").exists()  # refused before anything ran
    lines = []
    rows = run_compare(cfg, only=["lora"], echo=lines.append)
    assert lines[0].startswith("compare 'tiny': 2 cells (0 done, 1 to run, 1 of runs not in --runs left for later)")
    assert {r["run"]: r["cells"] for r in rows} == {"full": 0, "lora": 1}
    # The other run later: the first run's cell is reused, the table has both.
    rows = run_compare(cfg, only=["full"], echo=lines.append)
    assert {r["run"]: r["cells"] for r in rows} == {"full": 1, "lora": 1}
