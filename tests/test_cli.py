import subprocess
import sys

import pytest

from continual.cli import main


def test_list_shows_streams_strategies_and_presets(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for expected in ("standard", "long", "full_finetune", "joint", "ewc", "lwf", "replay", "configs/quickstart.yaml"):
        assert expected in out


def test_list_does_not_import_avalanche_or_mlflow():
    code = "import sys; from continual.cli import main; main(['list']); print(sorted(m for m in ('avalanche', 'mlflow') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]"


def test_unknown_key_fails_before_training_with_the_key_path(capsys):
    assert main(["run", "configs/quickstart.yaml", "training.lrr=1"]) == 2
    err = capsys.readouterr().err
    assert "training.lrr" in err and "Did you mean" in err


def test_unknown_strategy_lists_the_known_ones(capsys):
    assert main(["run", "quickstart", "strategy.name=sgd_magic"]) == 2
    err = capsys.readouterr().err
    assert "sgd_magic" in err and "full_finetune" in err and "replay" in err


def test_a_strategy_option_its_constructor_rejects_is_a_config_error(capsys):
    assert main(["run", "configs/quickstart.yaml", "strategy.name=delta", "strategy.kinds=[foo]"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: strategy.kinds: unknown kind 'foo'; known kinds:") and err.count("strategy.kinds") == 1
    assert "Traceback" not in err


@pytest.mark.parametrize("override", ["tracking.run_name=../../escape", "tracking.experiment=/tmp/elsewhere"])
def test_a_tracking_name_that_is_a_path_is_rejected_before_any_folder_is_made(capsys, tmp_path, override):
    out = tmp_path / "outputs"
    assert main(["run", "quickstart", f"tracking.output_dir={out}", override]) == 2
    key = override.split("=")[0]
    assert capsys.readouterr().err.startswith(f"error: {key}: ")
    assert not out.exists() and not (tmp_path / "escape").exists()


def test_unknown_stream_lists_the_known_ones(capsys, tiny_experiment, tmp_path):
    assert main(["run", "quickstart", "stream.name=huge", "backbone.random_init=true"]) == 2
    err = capsys.readouterr().err
    assert "huge" in err and "standard" in err and "long" in err


def test_missing_data_folder_is_reported(capsys, monkeypatch, tmp_path):
    monkeypatch.delenv("CONTINUAL_DATA", raising=False)
    assert main(["run", "quickstart", f"stream.data_root={tmp_path / 'nowhere'}"]) == 2
    assert "nowhere" in capsys.readouterr().err


def test_backbone_that_cannot_load_offline_is_reported(capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["run", "quickstart", "backbone.name=org/missing-model"]) == 2
    err = capsys.readouterr().err
    assert "org/missing-model" in err and "local folder" in err


@pytest.mark.slow
def test_run_prints_the_summary_table(capsys, tiny_experiment, tmp_path, cl_root):
    config = tmp_path / "tiny.yaml"
    config.write_text(
        f"""# continual run tiny.yaml
stream: {{name: custom, tasks: [SST-2, agnews], data_root: {cl_root}, train_per_class: 4, test_per_task: 8,
          max_length: 16, cache_dir: {tmp_path / 'cache'}}}
backbone: {{name: minilm, random_init: true,
            config_overrides: {{num_hidden_layers: 1, hidden_size: 16, num_attention_heads: 2, intermediate_size: 32}}}}
training: {{epochs: 1, batch_size: 4, progress: false}}
tracking: {{uri: 'sqlite:///{tmp_path / 'cli.db'}', output_dir: {tmp_path / 'out'}}}
"""
    )
    assert main(["run", str(config), "strategy.name=replay", "strategy.mem_size=8"]) == 0
    out = capsys.readouterr().out
    assert "after agnews" in out and "ACC" in out and "BWT" in out
    assert (tmp_path / "out" / "custom" / "replay-minilm-taskhead-seed0" / "accuracy_matrix.png").is_file()


def test_list_describes_every_strategy_and_preset_in_one_aligned_line(capsys):
    from continual.cli import PRESETS_DIR, _presets

    assert main(["list"]) == 0
    out = capsys.readouterr().out
    strategies = out.split("strategies:\n")[1].split("presets:\n")[0].splitlines()
    presets = out.split("presets:\n")[1].splitlines()
    assert len(presets) == len(_presets())
    for block in (strategies, presets):
        starts = set()
        for line in block:
            name, _, description = line.strip().partition(" ")
            assert description.strip() and description.strip() != "(no description)", line
            assert not description.strip().startswith("continual "), f"the command is not a description: {line}"
            starts.add(len(line) - len(description.lstrip()))
        assert len(starts) == 1, f"descriptions are not aligned: {block}"
    for preset in _presets():
        second = preset.read_text().splitlines()[1]
        assert second.startswith("# ") and len(second) <= 102, (
            f"{preset.relative_to(PRESETS_DIR)}: the second line must say in one line what the preset does"
        )


def test_known_third_party_noise_is_silenced_and_real_warnings_stay(recwarn):
    import warnings

    from continual.cli import quiet_known_warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_known_warnings()
        warnings.warn("no QP solver found on your system, you can install solvers from PyPI", UserWarning)
        warnings.warn("something the user should see", UserWarning)
    assert [str(w.message) for w in caught] == ["something the user should see"]

