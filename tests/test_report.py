"""Text table, CSV, plots and JSON of a run (continual/report.py)."""

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from continual.metrics import summarize
from continual.report import (
    format_table,
    fresh_run_dir,
    plot_accuracy_matrix,
    plot_gain_grid,
    plot_forgetting_curves,
    save_matrix_csv,
    write_summary_json,
)
from continual.results import RunResult, TaskRecord

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
NAMES = ["dbpedia", "amazon", "yahoo"]


def _records():
    return [
        TaskRecord("dbpedia", 1234567, 2000, 12.345, 512.25, 0.4321, 4096),
        TaskRecord("amazon", 7654, 9654, 3.5, 600.0, float("nan"), 0),
        TaskRecord("yahoo", 11, 9665, 1.0, 700.5, 1.25, 123456),
    ]


@pytest.fixture
def result():
    matrix = np.array([
        [0.90, float("nan"), float("nan")],  # only the trained task evaluated after the first step
        [0.95, 0.80, 0.30],
        [0.60, 0.60, 0.90],
    ])
    return RunResult(task_names=NAMES, matrix=matrix, initial=np.array([0.10, 0.25, 0.20]), records=_records())


@pytest.fixture
def joint():
    matrix = np.full((3, 3), float("nan"))
    matrix[-1] = [0.7, 0.8, 0.9]
    return RunResult(task_names=NAMES, matrix=matrix)


def test_table_shows_matrix_metrics_and_costs(result):
    text = format_table(result, summarize(result))
    lines = text.splitlines()
    header = lines[0].split()
    assert header[-3:] == NAMES
    initial = next(line for line in lines if line.startswith("initial"))
    assert initial.split()[1:] == ["10.0", "25.0", "20.0"]
    first = next(line for line in lines if line.startswith("after dbpedia"))
    assert first.split()[2:] == ["90.0", "-", "-"]
    last = next(line for line in lines if line.startswith("after yahoo"))
    assert last.split()[2:] == ["60.0", "60.0", "90.0"]
    # ACC = 70, BWT = ((60-90) + (60-80)) / 2 = -25, forgetting = ((95-60) + (80-60)) / 2 = 27.5;
    # FWT needs R[0][1], which is missing here.
    metrics = next(line for line in lines if line.startswith("ACC"))
    assert "ACC 70.00" in metrics and "BWT -25.00" in metrics and "FWT -" in metrics
    assert "forgetting 27.50" in metrics
    cost = next(line for line in lines if line.startswith("dbpedia"))
    assert cost.split() == ["dbpedia", "1,234,567", "2,000", "12.35", "512.2", "0.4321", "4,096"]
    amazon = next(line for line in lines if line.startswith("amazon"))
    assert amazon.split()[5] == "-"  # NaN loss
    assert "trainable params" in text and "peak memory MB" in text and "stored bytes" in text


def test_table_without_initial_or_records(joint):
    text = format_table(joint, summarize(joint))
    assert "initial" not in text
    assert "trainable params" not in text
    assert "ACC 80.00" in text


def test_csv_round_trip(result, tmp_path):
    path = save_matrix_csv(result, tmp_path / "sub" / "matrix.csv")
    with path.open(newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["after_task"] + NAMES
    assert [row[0] for row in rows[1:]] == ["initial"] + NAMES
    assert [float(v) for v in rows[1][1:]] == [0.10, 0.25, 0.20]
    read = np.array([[float(v) if v else float("nan") for v in row[1:]] for row in rows[2:]])
    np.testing.assert_array_equal(read, result.matrix)  # exact, NaN positions included
    assert rows[2][2:] == ["", ""]


def test_csv_without_initial(joint, tmp_path):
    path = save_matrix_csv(joint, tmp_path / "m.csv")
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert [row["after_task"] for row in rows] == NAMES
    assert rows[2]["amazon"] == "0.8" and rows[0]["amazon"] == ""


@pytest.mark.parametrize("plot", [plot_accuracy_matrix, plot_forgetting_curves])
@pytest.mark.parametrize("which", ["result", "joint"])
def test_plots_are_pngs(plot, which, request, tmp_path):
    import matplotlib.pyplot as plt

    run = request.getfixturevalue(which)
    open_before = plt.get_fignums()
    path = plot(run, tmp_path / "plots" / "out.png")
    data = Path(path).read_bytes()
    assert data[:8] == PNG_MAGIC
    assert len(data) > 10_000  # axes, labels and cells, not an empty canvas
    image = plt.imread(path)
    assert image.shape[0] > 200 and image.shape[1] > 300
    assert plt.get_fignums() == open_before  # no figure left open


def test_heatmap_leaves_missing_cells_blank(tmp_path):
    import matplotlib.pyplot as plt

    def white_fraction(matrix, name):
        run = RunResult(task_names=["a", "b"], matrix=np.array(matrix))
        image = plt.imread(plot_accuracy_matrix(run, tmp_path / name))[..., :3]
        return np.all(image > 0.98, axis=-1).mean()

    full = white_fraction([[0.5, 0.5], [0.5, 0.5]], "full.png")
    missing = white_fraction([[0.5, float("nan")], [0.5, 0.5]], "missing.png")
    # One of four equal cells turns white: roughly a quarter of the plotting area (which is most of the image).
    assert full < 0.6
    assert missing - full > 0.08


def test_summary_json(result, tmp_path):
    summary = summarize(result)
    path = write_summary_json(result, summary, tmp_path / "out" / "summary.json",
                              extra={"config": {"lr": 1e-4}, "out": tmp_path, "n": np.int64(3)})
    data = json.loads(path.read_text())
    assert data["summary"]["acc"] == pytest.approx(0.7)
    assert data["summary"]["fwt"] is None  # NaN is written as null
    assert data["result"]["task_names"] == NAMES
    assert data["result"]["matrix"][0] == [0.9, None, None]
    assert data["result"]["records"][0]["trainable_parameters"] == 1234567
    assert data["result"]["records"][1]["train_loss"] is None
    assert data["extra"] == {"config": {"lr": 1e-4}, "out": str(tmp_path), "n": 3}
    assert math.isclose(data["result"]["initial"][1], 0.25)


def test_import_is_cheap():
    code = "import sys, continual.report; print('matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1],
                         env={"PYTHONPATH": str(Path(__file__).resolve().parents[1]), "PATH": ""})
    assert out.stdout.strip() == "False"


def test_a_run_folder_is_never_opened_outside_the_output_dir(tmp_path):
    from omegaconf import OmegaConf

    from continual.config import ConfigError
    from continual.training import open_run_dir

    cfg = OmegaConf.create({"tracking": {"output_dir": str(tmp_path / "out")}})
    with pytest.raises(ConfigError, match=r"^tracking.run_name: '../escape' is used as a folder name"):
        open_run_dir(tmp_path / "out" / "exp", "../escape", cfg)
    with pytest.raises(ConfigError, match=r"^tracking.experiment: the run folder .* would be outside tracking.output_dir"):
        open_run_dir(tmp_path / "out" / ".." / "elsewhere", "run", cfg)  # a derived experiment name that climbs out
    assert not (tmp_path / "out").exists() and not (tmp_path / "elsewhere").exists()
    folder = open_run_dir(tmp_path / "out" / "exp", "run", cfg)
    assert folder == tmp_path / "out" / "exp" / "run" and (folder / "config.yaml").is_file()


def test_fresh_run_dir_never_reuses_a_folder_with_artifacts(tmp_path):
    first = fresh_run_dir(tmp_path / "exp", "tint-smollm2-seed0")
    assert first == tmp_path / "exp" / "tint-smollm2-seed0" and first.is_dir()
    (first / "summary.json").write_text("{}")
    second = fresh_run_dir(tmp_path / "exp", "tint-smollm2-seed0")
    assert second.name == "tint-smollm2-seed0-2"
    (second / "summary.json").write_text("{}")
    assert fresh_run_dir(tmp_path / "exp", "tint-smollm2-seed0").name == "tint-smollm2-seed0-3"
    (tmp_path / "exp" / "empty").mkdir()
    assert fresh_run_dir(tmp_path / "exp", "empty") == tmp_path / "exp" / "empty"  # an empty folder is taken as is
    assert (first / "summary.json").read_text() == "{}"


def test_gain_grid_is_a_diverging_heatmap(tmp_path):
    import matplotlib.pyplot as plt

    mean = np.array([[-4.0, 0.0, 4.0], [1.0, float("nan"), -1.0]])
    path = plot_gain_grid(["context top-1", "label_words top-all"], ["lr 1e-3", "lr 1e-4", "lr 1e-5"], mean,
                          np.full_like(mean, 0.5), tmp_path / "g" / "gains.png", "title", "gain (points)")
    assert path.read_bytes()[:8] == PNG_MAGIC
    image = plt.imread(path)[..., :3]
    r, g, b = image[..., 0], image[..., 1], image[..., 2]
    red = (r - b > 0.2) & (g < 0.15)  # the -4 cell (and the colour bar's end)
    blue = (b - r > 0.2) & (g < 0.3)  # the +4 cell
    assert red.mean() > 0.01 and blue.mean() > 0.01
    with pytest.raises(ValueError, match="rows x columns"):
        plot_gain_grid(["a"], ["x", "y"], np.zeros((2, 2)), None, tmp_path / "bad.png", "t", "u")
