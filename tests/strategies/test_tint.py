"""The ``tint`` strategy end to end: a tiny random GPT-2 (saved to a folder with a byte-level BPE tokenizer trained
on the fly) over two real CL_Benchmark tasks, through the runner, the learner and MLflow."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch


def _tiny_gpt2_folder(folder, cl_root):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    texts = []
    for task in ("SC/SST-2", "TC/agnews"):
        texts += [r["sentence"] for r in json.loads((cl_root / task / "train.json").read_text())[:300]]
        texts += [" " + label for label in json.loads((cl_root / task / "labels.json").read_text())] * 50
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=1000, special_tokens=["<|endoftext|>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    tokenizer.save_pretrained(folder)
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=len(tokenizer), n_positions=512,
                        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
    GPT2LMHeadModel(config).save_pretrained(folder)
    return folder


pytestmark = pytest.mark.usefixtures("one_cpu_thread")


@pytest.fixture
def tint_experiment(tmp_path, cl_root, monkeypatch):
    from continual.recipes.run import load_config

    monkeypatch.chdir(tmp_path)
    folder = _tiny_gpt2_folder(tmp_path / "tiny-gpt2", cl_root)

    def make(*overrides: str):
        base = {
            "stream": {"name": "custom", "tasks": ["SST-2", "agnews"], "data_root": str(cl_root), "train_per_class": 4,
                       "test_per_task": 12, "max_length": 40, "cache_dir": str(tmp_path / "cache")},
            "backbone": {"name": str(folder)},
            "strategy": {"name": "tint", "shots": 4, "layers": 1, "inner_lr": 0.05, "max_example_tokens": 32},
            "training": {"progress": False, "device": "cpu", "eval_batch_size": 8},
            "tracking": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "output_dir": str(tmp_path / "outputs"),
                         "run_name": "tint"},
        }
        return load_config(None, overrides=list(overrides), extra=base)

    return make


@pytest.mark.slow
def test_tint_fills_the_accuracy_matrix_with_zero_stored_parameters(tint_experiment, monkeypatch):
    from mlflow.tracking import MlflowClient

    from continual.recipes.run import run_experiment
    from strategies.tint import TinT

    arrived = []
    draw = TinT.before_task
    monkeypatch.setattr(TinT, "before_task", lambda self, model, task: arrived.append(task.index) or draw(self, model, task))
    cfg = tint_experiment()
    result = run_experiment(cfg, echo=lambda *_: None)
    assert arrived == [0, 1]  # nothing to train, but each task's arrival still reached the strategy
    assert result.matrix.shape == (2, 2) and np.isfinite(result.matrix).all()
    assert result.initial is not None and np.isfinite(result.initial).all()
    assert [r.stored_parameters for r in result.records] == [0, 0]
    assert [r.trainable_parameters for r in result.records] == [0, 0]
    assert all(np.isnan(r.train_loss) for r in result.records)  # no epoch ran
    # agnews has no context before it arrives: answered zero-shot, as in the initial row
    assert result.matrix[0, 1] == pytest.approx(result.initial[1])
    # nothing changes once a task's context is drawn: no forgetting by construction
    assert result.matrix[1, 0] == pytest.approx(result.matrix[0, 0])

    client = MlflowClient(cfg.tracking.uri)
    (run,) = client.search_runs([client.get_experiment_by_name("custom").experiment_id])
    assert run.info.status == "FINISHED" and run.data.params["strategy.name"] == "tint"
    assert run.data.metrics["stored_parameters"] == 0 and "final/acc" in run.data.metrics


def test_tint_options_are_validated():
    from continual.config import ConfigError
    from continual.recipes.run import load_config
    from strategies.registry import build_strategy

    with pytest.raises(ConfigError, match="strategy.shots"):
        load_config(None, overrides=["strategy.name=tint", "strategy.shots=many"])
    with pytest.raises(ConfigError, match="strategy.inner_lrr"):
        load_config(None, overrides=["strategy.name=tint", "strategy.inner_lrr=1"])
    for override, message in (("strategy.loss=all", "strategy.loss"), ("strategy.layers=0", "layers"),
                              ("strategy.inner_lr=-1", "inner_lr")):
        with pytest.raises(ValueError, match=message):
            build_strategy(load_config(None, overrides=["strategy.name=tint", override]).strategy)


@pytest.mark.slow
def test_label_words_for_a_task_outside_the_stream_fail_before_evaluation(tint_experiment):
    from continual.recipes.run import run_experiment

    cfg = tint_experiment("strategy.label_words={yelp: {positive: good}}")
    with pytest.raises(ValueError, match=r"strategy.label_words: \['yelp'\] are not tasks of this stream"):
        run_experiment(cfg, echo=lambda *_: None)


@pytest.mark.slow
def test_more_layers_than_the_model_has_fail_before_evaluation(tint_experiment):
    from continual.recipes.run import run_experiment

    with pytest.raises(ValueError, match=r"strategy.layers: layers=3: the model has 2 blocks"):
        run_experiment(tint_experiment("strategy.layers=3"), echo=lambda *_: None)


@pytest.mark.slow
def test_tint_runs_on_a_native_moduleformer_folder(tint_experiment, tmp_path):
    """A saved native ModuleFormer (no key/value cache, its own stop-gradient) is a TinT backbone like GPT-2."""
    from transformers import AutoTokenizer

    from continual.models.moduleformer import ModuleFormerConfig, ModuleFormerForCausalLM
    from continual.recipes.run import run_experiment

    folder = tmp_path / "tiny-moduleformer"
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "tiny-gpt2")  # written by the fixture
    tokenizer.save_pretrained(folder)
    torch.manual_seed(0)
    config = ModuleFormerConfig(vocab_size=len(tokenizer), d_model=32, n_layer=2, n_head=2, head_dim=8, n_att_experts=2,
                                n_ffn_experts=4, ffn_hidden=32, gate_hidden=16, max_position_embeddings=512)
    ModuleFormerForCausalLM(config).save_pretrained(folder)
    cfg = tint_experiment(f"backbone.name={folder}", "tracking.run_name=tint-moduleformer")
    result = run_experiment(cfg, echo=lambda *_: None)
    assert result.matrix.shape == (2, 2) and np.isfinite(result.matrix).all()
    assert [r.stored_parameters for r in result.records] == [0, 0]
    assert result.matrix[1, 0] == pytest.approx(result.matrix[0, 0])
    saved = json.loads((result.output_dir / "summary.json").read_text())
    assert saved["extra"]["config"]["backbone.name"] == str(folder)


def test_bf16_is_refused_by_tint_naming_the_key(tint_experiment):
    from continual.config import ConfigError
    from continual.recipes.run import run_experiment

    with pytest.raises(ConfigError, match="training.precision: 'bf16' is not supported by strategy 'tint'"):
        run_experiment(tint_experiment("training.precision=bf16"), echo=lambda *_: None)


def test_auto_precision_leaves_tint_in_fp32(tint_experiment, monkeypatch):
    """``training.precision=auto`` on a device with native bf16: TinT, which cannot autocast, runs in fp32."""
    from continual.recipes.run import run_experiment
    from continual.training import environment

    monkeypatch.setattr(environment, "native_bf16", lambda device: True)
    result = run_experiment(tint_experiment("training.precision=auto", "tracking.enabled=false"), echo=lambda *_: None)
    assert result.matrix.shape == (2, 2)
