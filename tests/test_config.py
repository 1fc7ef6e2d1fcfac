from pathlib import Path

import pytest
from omegaconf import OmegaConf

from continual.config import ConfigError
from continual.recipes.run import load_config

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").rglob("*.yaml"))


def test_there_are_presets():
    names = {p.stem for p in CONFIGS}
    assert {"quickstart", "full_finetune", "joint", "ewc", "lwf", "replay"} <= names


def _loader(command: str):
    """The schema of each `continual <command>` that takes a preset."""
    if command == "run":
        return load_config
    if command == "lm":
        from continual.recipes.lm import load_lm_config

        return load_lm_config
    if command == "compare":
        from continual.recipes.compare import load_compare_config

        return load_compare_config
    if command == "uptrain":
        from continual.recipes.uptrain import load_uptrain_config

        return load_uptrain_config
    raise AssertionError(f"no command `continual {command}` takes a preset")


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.relative_to(REPO / "configs").as_posix())
def test_every_preset_opens_with_its_command_and_loads_against_that_schema(path):
    first = path.read_text().splitlines()[0]
    relative = path.relative_to(REPO).as_posix()
    parts = first.split()
    assert len(parts) == 4 and parts[:2] == ["#", "continual"] and parts[3] == relative, (
        f"{relative} must open with the command that runs it, e.g. '# continual run {relative}'"
    )
    cfg = _loader(parts[2])(path)
    assert OmegaConf.is_readonly(cfg) or parts[2] != "run"
    if parts[2] == "compare":  # every cell of a compare preset must load too (nothing runs)
        from continual.recipes.compare import plan_cells

        assert plan_cells(cfg, REPO / "outputs" / "no-such-folder")


def test_overrides_apply_and_are_typed():
    cfg = load_config(CONFIGS[0], ["training.lr=1e-4", "training.epochs=3", "stream.order=2"])
    assert cfg.training.lr == pytest.approx(1e-4)
    assert cfg.training.epochs == 3 and isinstance(cfg.training.epochs, int)


@pytest.mark.parametrize(
    "override, key",
    [
        ("training.lrr=1", "training.lrr"),
        ("stream.tasks_per_class=3", "stream.tasks_per_class"),
        ("training.epochs=abc", "training.epochs"),
        ("backbone.random_init=maybe", "backbone.random_init"),
        ("strategy.ewc_lambda=5", "strategy.ewc_lambda"),  # not an option of full_finetune
    ],
)
def test_unknown_key_or_wrong_type_names_the_full_key(override, key):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert key in str(err.value)


def test_strategy_options_are_typed_by_the_chosen_strategy():
    cfg = load_config(None, ["strategy.name=ewc", "strategy.ewc_lambda=123"])
    assert cfg.strategy.ewc_lambda == 123.0
    with pytest.raises(ConfigError, match="strategy.alpha"):
        load_config(None, ["strategy.name=ewc", "strategy.alpha=1"])


def test_strategy_constructor_errors_fail_at_load_time_naming_the_key():
    with pytest.raises(ConfigError, match=r"^strategy.kinds: unknown kind 'foo'; known kinds: .*lora"):
        load_config(None, ["strategy.name=delta", "strategy.kinds=[foo]"])
    with pytest.raises(ConfigError, match=r"^strategy.mode must be 'separate' or 'online', got 'both'$"):
        load_config(None, ["strategy.name=ewc", "strategy.mode=both"])
    with pytest.raises(ConfigError, match=r"^router.shrinkage must be in \[0, 1\], got 3.0$"):  # routers: the same
        load_config(None, ["router.name=prototype", "router.shrinkage=3"])


@pytest.mark.parametrize(
    "override, key",
    [("tracking.run_name=../../escape", "tracking.run_name"), ("tracking.run_name=/tmp/abs", "tracking.run_name"),
     ("tracking.run_name=..", "tracking.run_name"), ("tracking.experiment=team/exp", "tracking.experiment"),
     ("tracking.experiment=a\\b", "tracking.experiment")],
)
def test_tracking_names_that_are_paths_are_rejected(override, key):
    with pytest.raises(ConfigError, match=rf"^{key}: .* is used as a folder name under tracking.output_dir") as err:
        load_config(None, [override])
    assert ("MLflow" in str(err.value)) == (key == "tracking.experiment")
    cfg = load_config(None, ["tracking.run_name=v1..v2", "tracking.experiment=exp.2"])  # dots alone are fine
    assert cfg.tracking.run_name == "v1..v2"


def test_unknown_strategy_lists_the_known_ones():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["strategy.name=does_not_exist"])
    message = str(err.value)
    assert "does_not_exist" in message
    for known in ("full_finetune", "joint", "ewc", "lwf", "replay"):
        assert known in message


@pytest.mark.parametrize(
    "override, key",
    [("backbone.head=both", "backbone.head"), ("training.epochs=0", "training.epochs"), ("training.lr=-1", "training.lr")],
)
def test_out_of_range_values_fail_with_their_key(override, key):
    with pytest.raises(ConfigError, match=key):
        load_config(None, [override])


def test_bad_yaml_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("training: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_config(bad)
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("trainer:\n  lr: 1\n")
    with pytest.raises(ConfigError, match="trainer"):
        load_config(unknown)


def test_env_interpolation_is_the_only_dynamic_value(tmp_path, monkeypatch):
    monkeypatch.setenv("MY_DATA", str(tmp_path))
    path = tmp_path / "c.yaml"
    path.write_text("stream:\n  data_root: ${oc.env:MY_DATA}\n")
    assert load_config(path).stream.data_root == str(tmp_path)
