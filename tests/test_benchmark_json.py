"""Every benchmark can write its printed table as JSON (``--json PATH``: ``{"args", "device", "rows", ...}``), so a
figure quoted in the README can be re-read and compared later; the scripts that run in seconds on tiny settings do."""

from __future__ import annotations

import argparse
import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks._output import add_json_argument, write_json

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = sorted(path.stem for path in (ROOT / "benchmarks").glob("*.py") if not path.name.startswith("_"))

# A 2-layer, 32-wide SmolLM2 with random weights: the recursive benchmarks' smoke settings, made smaller.
TINY_LM = ["--random-init", "--config-overrides", json.dumps({
    "num_hidden_layers": 2, "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2,
    "num_key_value_heads": 1})]


def run_benchmark(name: str, *args: str) -> subprocess.CompletedProcess:
    """The script as a user runs it (a subprocess: its torch thread settings stay out of this session)."""
    return subprocess.run([sys.executable, "-m", f"benchmarks.{name}", *args], capture_output=True, text=True, cwd=ROOT)


def test_benchmarks_are_found():
    assert {"many_tasks", "delta_speed", "recursive_throughput"} <= set(BENCHMARKS)


@pytest.mark.parametrize("name", BENCHMARKS)
def test_every_benchmark_offers_json(name, monkeypatch, capsys):
    """``--help`` lists ``--json`` (parsed before any model or data is loaded)."""
    module = importlib.import_module(f"benchmarks.{name}")
    monkeypatch.setattr(sys, "argv", [f"benchmarks.{name}", "--help"])  # mains with and without an argv parameter
    with pytest.raises(SystemExit) as exit_info:
        module.main()
    assert exit_info.value.code in (0, None)
    assert "--json" in capsys.readouterr().out


def test_write_json_creates_folders_and_keeps_the_shape(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    add_json_argument(parser)
    parser.add_argument("--steps", type=int, default=3)
    path = tmp_path / "deep" / "er" / "table.json"
    args = parser.parse_args(["--json", str(path)])
    rows = [{"kind": "lora", "ms": 1.5}, {"kind": "full", "ms": None}]
    write_json(args.json, args, rows, device="cpu", folder=tmp_path)
    assert capsys.readouterr().out.strip() == f"written: {path}"
    saved = json.loads(path.read_text())
    assert saved == {"args": {"json": str(path), "steps": 3}, "device": "cpu", "rows": rows, "folder": str(tmp_path)}

    write_json(None, args, rows, device="cpu")  # no --json: nothing written, nothing said
    assert capsys.readouterr().out == ""


def test_moduleformer_dispatch_writes_its_rows(tmp_path):
    path = tmp_path / "out" / "dispatch.json"
    done = run_benchmark("moduleformer_dispatch", "--device", "cpu", "--tokens", "64", "--d-model", "16", "--hidden",
                         "16", "--gate-hidden", "8", "--experts", "2,4", "--repeats", "2", "--warmup", "1",
                         "--threads", "1", "--json", str(path))
    assert done.returncode == 0, done.stderr
    assert f"written: {path}" in done.stdout
    saved = json.loads(path.read_text())
    assert saved["args"]["experts"] == "2,4" and saved["device"].startswith("cpu")
    assert [(row["E"], row["k"]) for row in saved["rows"]] == [(2, 2), (4, 2)]
    assert saved["rows"][0]["ratio"] == 1.0
    assert saved["ratio_largest_over_smallest"] == saved["rows"][-1]["ratio"]
    printed = [line.split() for line in done.stdout.splitlines() if line.split()[:2] in (["2", "2"], ["4", "2"])]
    assert [f"{row['median_ms']:.3f}" for row in saved["rows"]] == [cells[2] for cells in printed]


@pytest.mark.slow
def test_recursive_throughput_writes_its_rows(tmp_path, cl_root):
    path = tmp_path / "out" / "throughput.json"
    done = run_benchmark("recursive_throughput", *TINY_LM, "--rank", "4", "--samples", "8", "--seq-len", "16",
                         "--slots", "4", "--thresholds", "0.00003", "--max-sentences", "50", "--tasks", "agnews",
                         "--repeats", "1", "--device", "cpu", "--data-root", str(cl_root), "--json", str(path))
    assert done.returncode == 0, done.stderr
    assert f"written: {path}" in done.stdout
    saved = json.loads(path.read_text())
    assert saved["device"] == "cpu" and saved["samples"] == 8 and saved["args"]["rank"] == 4
    assert [row["run"] for row in saved["rows"]] == ["unconverted", "recursive, no exit", "early exit 3e-05"]
    for row in saved["rows"]:
        assert {"parameters", "samples_per_s", "speedup", "mean_loops", "agree_unconverted"} <= set(row)
        assert f"{row['parameters']:,}" in done.stdout


def test_router_speed_times_a_routed_run_three_ways(tmp_path, tiny_run_yaml):
    """A finished routed run, timed oracle / routed / router pass on the same batches; an oracle run is refused."""
    from continual.cli import resolve_config
    from continual.recipes.run import load_config, run_experiment

    routed = run_experiment(load_config(resolve_config(str(tiny_run_yaml(router={"name": "prototype"}))),
                                        ["tracking.enabled=false"]), echo=lambda *_: None)
    path = tmp_path / "speed.json"
    done = run_benchmark("router_speed", str(routed.output_dir), "--samples", "5", "--batch", "4", "--repeats", "1",
                         "--warmup", "0", "--json", str(path))
    assert done.returncode == 0, done.stderr
    (row,) = json.loads(path.read_text())["rows"]
    assert row["router"] == "prototype" and row["tasks"] == 3 and row["samples"] == 15 and row["batch"] == 4
    assert row["oracle_ms"] > 0 and row["routed_ms"] > 0 and row["router_ms"] > 0
    assert row["routed_over_oracle"] == pytest.approx(row["routed_ms"] / row["oracle_ms"])
    assert f"{row['routed_over_oracle']:.2f} |" in done.stdout

    oracle = run_experiment(load_config(resolve_config(str(tiny_run_yaml(tracking={"experiment": "plain"}))),
                                        ["tracking.enabled=false"]), echo=lambda *_: None)
    refused = run_benchmark("router_speed", str(oracle.output_dir), "--samples", "2")
    assert refused.returncode != 0 and "not a routed run" in refused.stderr


def test_precision_speed_writes_a_row_per_kind(tmp_path):
    path = tmp_path / "precision.json"
    done = run_benchmark("precision_speed", "--random-init", "--override", "num_hidden_layers=1", "--override",
                         "hidden_size=32", "--override", "intermediate_size=64", "--override", "num_attention_heads=2",
                         "--kinds", "full", "lora", "--batch", "2", "--length", "8", "--steps", "1", "--repeats", "1",
                         "--threads", "1", "--json", str(path))
    assert done.returncode == 0, done.stderr
    rows = json.loads(path.read_text())["rows"]
    assert [row["kind"] for row in rows] == ["full", "lora"]
    for row in rows:
        assert row["train_speedup"] == pytest.approx(row["train_fp32_ms"] / row["train_bf16_ms"])
        assert 0 < row["max_logit_diff"] < 0.5  # bf16 changes the arithmetic, not the answer
        assert f"{row['train_speedup']:.2f}x" in done.stdout


def test_many_tasks_times_every_kind_and_the_experts_floors(tmp_path):
    """A tiny K sweep: every kind gets a row per K with its ratios, the experts rows carry both floors (the loop and
    the gathered batched matmuls), PEFT's reference row comes last, and a point over the memory budget says so."""
    path = tmp_path / "many.json"
    done = run_benchmark("many_tasks", "--random-init", "--override", "num_hidden_layers=1", "--override",
                         "hidden_size=32", "--override", "intermediate_size=64", "--override", "num_attention_heads=2",
                         "--tasks", "1,4", "--mix", "2", "--batch", "4", "--length", "8", "--steps", "1",
                         "--warmup", "0", "--repeats", "1", "--peft-max", "4", "--threads", "1", "--json", str(path))
    assert done.returncode == 0, done.stderr
    rows = json.loads(path.read_text())["rows"]
    assert [(r["kind"], r["K"]) for r in rows] == [(k, K) for k in ("lora", "adapter", "prompt", "prefix", "experts")
                                                   for K in (1, 4)] + [("peft_lora", 1), ("peft_lora", 4)]
    for row in rows[:10]:
        assert row["mixed_ratio"] == pytest.approx(row["mixed_ms"] / row["ref_ms"])
        assert row["tasks_mixed"] == min(row["K"], 2)
    experts = rows[9]
    assert experts["floor_gathered_ms"] > 0 and experts["floor_mixed_ms"] > 0
    assert experts["mixed_loop_ratio"] == pytest.approx(experts["mixed_loop_ms"] / experts["ref_ms"])
    best = min(experts["floor_mixed_ms"], experts["floor_gathered_ms"])
    assert experts["floor_ratio"] == pytest.approx(
        (experts["ref_ms"] + best - experts["floor_one_ms"]) / experts["ref_ms"])
    assert "gathered + bmm" in done.stdout and "target <= 1.10" in done.stdout

    tight = run_benchmark("many_tasks", "--random-init", "--override", "num_hidden_layers=1", "--override",
                          "hidden_size=32", "--override", "intermediate_size=64", "--override",
                          "num_attention_heads=2", "--kinds", "experts", "--tasks", "1,1000000", "--batch", "2",
                          "--length", "4", "--steps", "1", "--warmup", "0", "--repeats", "1", "--memory-budget",
                          "0.001", "--threads", "1")
    assert tight.returncode == 0, tight.stderr
    assert "needs" in tight.stdout and "budget" in tight.stdout
