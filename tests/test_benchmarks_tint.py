"""The TinT benchmark scripts' reporting: per-task JSON files merge into the joint table and plot."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "tint_smollm2_h100"


def _merge(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "benchmarks.tint_fewshot", "--merge", *args],
                          capture_output=True, text=True, cwd=ROOT)


def test_merge_of_the_committed_per_task_runs_prints_the_joint_table_and_plots(tmp_path):
    files = [str(RESULTS / f"fs_{task}.json") for task in ("SST-2", "agnews", "yelp")]
    done = _merge(*files, "--plot", str(tmp_path / "gains.png"))
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    header = next(line for line in lines if line.startswith("setting"))
    assert header.split()[1:] == ["SST-2", "agnews", "yelp", "average", "gain"]
    plain = next(line for line in lines if line.startswith("plain"))
    # the README's figures: plain 58.0 / 38.8 / 21.0, average 39.3
    assert plain.split()[1::3] == ["58.0", "38.8", "21.0", "39.3"]
    best = next(line for line in lines if line.startswith("label_words top-all lr=0.0001"))
    assert best.split()[-3:] == ["7.8", "±", "3.5"]
    assert (tmp_path / "gains.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_merge_refuses_files_with_different_seeds_or_missing_results(tmp_path):
    saved = json.loads((RESULTS / "fs_yelp.json").read_text())
    saved["args"]["seeds"] = [0, 1]
    other = tmp_path / "other.json"
    other.write_text(json.dumps(saved))
    done = _merge(str(RESULTS / "fs_SST-2.json"), str(other))
    assert done.returncode != 0 and "has seeds [0, 1]" in done.stderr

    saved = json.loads((RESULTS / "fs_yelp.json").read_text())
    saved["accuracy"]["plain"]["yelp"] = saved["accuracy"]["plain"]["yelp"][:2]  # an interrupted run
    partial = tmp_path / "partial.json"
    partial.write_text(json.dumps(saved))
    done = _merge(str(partial))
    assert done.returncode != 0 and "lacks complete results for ['yelp']" in done.stderr
    assert "cannot read" in _merge(str(tmp_path / "missing.json")).stderr
