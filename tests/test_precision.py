"""``training.precision=bf16``: every forward of a run autocasts to bfloat16 (training, evaluation, router fitting and
routed answers) while parameters, gradients and reported scores stay float32; the run's results follow float32's."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.usefixtures("one_cpu_thread")


def _run(cfg):
    from continual.recipes.run import run_experiment

    return run_experiment(cfg, echo=lambda *_: None)


def test_a_routed_lora_run_in_bf16_trains_in_bf16_and_follows_fp32(tiny_experiment, monkeypatch):
    from continual.models.classifier import ContinualClassifier

    common = ("strategy.name=delta", "strategy.kinds=[lora]", "router.name=prototype", "tracking.enabled=false",
              "training.lr=3e-3")
    exact = _run(tiny_experiment(*common))
    seen = []
    forward = ContinualClassifier._forward

    def spy(self, x, task_labels):  # the dtype the forward computes in, and that its scores come back float32
        out = forward(self, x, task_labels)
        seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"), out.dtype))
        return out

    monkeypatch.setattr(ContinualClassifier, "_forward", spy)
    low = _run(tiny_experiment(*common, "training.precision=bf16", "tracking.run_name=bf16"))
    assert seen and all(enabled and dtype == torch.bfloat16 for enabled, dtype, _ in seen)
    assert any(out == torch.bfloat16 for _, _, out in seen)  # the heads computed in bf16...
    assert np.isfinite(low.matrix).all() and np.isfinite(low.routing_matrix[-1]).all()
    # ...and the run answers as float32 does, to within a few test samples of 24 per task
    assert np.abs(low.matrix - exact.matrix).max() <= 0.25
    np.testing.assert_array_equal(low.routing_matrix[-1], exact.routing_matrix[-1])


@pytest.mark.parametrize("overrides", [
    ("strategy.name=full_finetune",),
    ("strategy.name=experts", "strategy.task_conditioned=true", "strategy.experts_per_task=1", "strategy.top_k=1"),
    ("strategy.name=recursive", "strategy.recursion.num_loops=2"),
    ("strategy.name=delta", "strategy.kinds=[prompt]"),
])
def test_every_bank_strategy_runs_in_bf16(tiny_experiment, overrides):
    result = _run(tiny_experiment(*overrides, "training.precision=bf16", "tracking.enabled=false"))
    assert np.isfinite(result.matrix[-1]).all()


def test_label_words_score_in_bf16(tiny_experiment, tiny_causal_lm):
    result = _run(tiny_experiment("strategy.name=delta", "strategy.kinds=[lora]", "backbone.head=label_words",
                                  "backbone.label_space=seen", "training.precision=bf16", "tracking.enabled=false",
                                  backbone=tiny_causal_lm("llama")))
    assert np.isfinite(result.matrix[-1]).all()


def test_an_unknown_precision_names_the_key_and_the_choices():
    from continual.config import ConfigError
    from continual.recipes.run import load_config

    with pytest.raises(ConfigError, match=r"training.precision: 'fp16' is not one of \['fp32', 'bf16', 'auto'\]"):
        load_config(None, ["training.precision=fp16"])


def test_auto_is_bf16_where_it_is_native_and_fp32_elsewhere(monkeypatch, tmp_path):
    from continual.training import environment
    from continual.training.environment import native_bf16, resolve_precision

    cpu = torch.device("cpu")
    assert resolve_precision("fp32", cpu) == "fp32" and resolve_precision("bf16", cpu) == "bf16"
    monkeypatch.setattr(environment, "native_bf16", lambda device: True)
    assert resolve_precision("auto", cpu) == "bf16"
    monkeypatch.setattr(environment, "native_bf16", lambda device: False)
    assert resolve_precision("auto", cpu) == "fp32"
    monkeypatch.undo()
    assert native_bf16(torch.device("meta")) is False
    flags = open("/proc/cpuinfo").read() if __import__("os").path.exists("/proc/cpuinfo") else ""
    assert native_bf16(cpu) == any(f in flags.split() for f in ("amx_bf16", "avx512_bf16"))


def test_auto_resolves_per_device_and_the_run_is_tagged_with_what_ran(tiny_experiment, monkeypatch, tmp_path):
    """``auto`` is bf16 where bf16 is native; the MLflow tag ``precision`` says what ran (bf16 or fp32)."""
    from mlflow.tracking import MlflowClient

    from continual.training import environment

    monkeypatch.setattr(environment, "native_bf16", lambda device: True)
    common = ("strategy.name=delta", "strategy.kinds=[lora]", "tracking.experiment=precision")
    _run(tiny_experiment(*common, "training.precision=auto", "tracking.run_name=auto"))
    _run(tiny_experiment(*common, "tracking.run_name=plain"))
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("precision").experiment_id])
    assert {r.info.run_name: r.data.tags["precision"] for r in runs} == {"auto": "bf16", "plain": "fp32"}



def test_a_saved_bf16_run_is_evaluated_and_answers_in_bf16(tiny_experiment):
    from continual.recipes.saved import load_run

    result = _run(tiny_experiment("strategy.name=delta", "strategy.kinds=[lora]", "router.name=prototype",
                                  "training.precision=bf16", "tracking.enabled=false"))
    loaded = load_run(result.output_dir)
    assert loaded.model.compute_dtype == torch.bfloat16
    accs = loaded.evaluate()
    np.testing.assert_allclose([accs[name] for name in result.task_names], result.matrix[-1])
    predictions = loaded.predict(["a fine film", "stocks fell on wall street"])
    assert len(predictions) == 2 and all(0.0 < p.confidence <= 1.0 for p in predictions)
