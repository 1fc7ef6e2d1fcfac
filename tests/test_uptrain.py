"""The uptraining recipe: typed config, the loop-exit loss, and short real runs (tiny random models, real text)."""

from __future__ import annotations

import json

import pytest
import torch
from mlflow.tracking import MlflowClient

from continual.config import ConfigError
from continual.models.recursive import convert_to_recursive, load_recursive, recursion_of
from continual.recipes.uptrain import lm_loss_with_loop_exits, load_uptrain_config, run_uptraining

TINY_LLAMA = {"hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 4, "num_attention_heads": 4,
              "num_key_value_heads": 2, "max_position_embeddings": 64}


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory):
    """A tiny random Llama saved with the offline MiniLM tokenizer (any tokenizer works for a random model)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from continual.models.backbone import resolve_backbone

    tokenizer = AutoTokenizer.from_pretrained(resolve_backbone("minilm"))
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), **TINY_LLAMA))
    folder = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_config_is_typed_and_checked():
    cfg = load_uptrain_config(None, ["training.steps=5", "recursion.rank=8"])
    assert cfg.training.steps == 5 and cfg.recursion.rank == 8 and cfg.recursion.init == "average"
    cases = [
        (["training.stepz=5"], "training.stepz"),
        (["training.steps=0"], "training.steps: must be >= 1"),
        (["model.kind=encoder"], "training.objective: must be distill for model.kind=encoder"),
        (["training.objective=distill", "training.loop_loss_weight=1"], "training.loop_loss_weight"),
        (["recursion.sharing=ring"], "recursion: sharing must be one of"),
        (["data.heldout_fraction=0"], "data.heldout_fraction"),
        (["training.steps"], "not of the form key=value"),
        (["tracking.run_name=../../escape"], "tracking.run_name: '../../escape' is used as a folder name"),
        (["tracking.experiment=../up"], "tracking.experiment: '../up' is used as a folder name"),
    ]
    for overrides, match in cases:
        with pytest.raises(ConfigError, match=match):
            load_uptrain_config(None, overrides)


def test_loop_exit_loss_is_the_next_token_loss_at_each_earlier_loop():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=50, **{**TINY_LLAMA, "num_hidden_layers": 6}))
    convert_to_recursive(model, num_loops=3, rank=2)
    ids = torch.randint(0, 50, (3, 10))
    out = model(input_ids=ids, labels=ids, output_hidden_states=True)  # transformers adds its own capture hooks
    hooks = {d: len(layer._forward_hooks) for d, layer in enumerate(model.model.layers)}
    final, loops = lm_loss_with_loop_exits(model, ids)
    assert torch.allclose(final, out.loss)
    # hidden_states[d] is the output of depth d - 1: loops 1 and 2 end after depths 1 and 3 (K = 2).
    expected = torch.stack([
        torch.nn.functional.cross_entropy(model.lm_head(model.model.norm(out.hidden_states[d]))[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        for d in (2, 4)
    ]).mean()
    assert torch.allclose(loops, expected, atol=1e-5)
    assert {d: len(layer._forward_hooks) for d, layer in enumerate(model.model.layers)} == hooks  # ours are removed


def _overrides(tmp_path, cl_root, *extra):
    return [
        "data.tasks=[SST-2]", f"data.data_root={cl_root}", "data.max_sentences=400", "data.block_size=32",
        "training.batch_size=4", "training.eval_blocks=8", "training.warmup_steps=2", "training.progress=false",
        "training.device=cpu", "training.log_every=2", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
        f"tracking.output_dir={tmp_path / 'out'}", *extra,
    ]


@pytest.mark.slow
def test_lm_uptraining_lowers_held_back_perplexity_and_saves_a_loadable_model(tmp_path, cl_root, llama_folder, monkeypatch):
    monkeypatch.chdir(tmp_path)  # MLflow puts a SQLite store's artifacts under ./mlruns
    cfg = load_uptrain_config(None, _overrides(
        tmp_path, cl_root, f"model.name={llama_folder}", "training.steps=12", "training.lr=1e-2",
        "recursion.rank=4", "training.loop_loss_weight=0.5", "tracking.run_name=tiny",
    ))
    result = run_uptraining(cfg, echo=lambda *_: None)
    assert result.metric == "perplexity" and result.after < result.before
    assert result.original > 1000 and result.before > 1000  # random weights: about the vocabulary size
    assert result.parameters["total"] < result.parameters["original"] and len(result.losses) == 12
    loaded = load_recursive(result.folder)
    assert recursion_of(loaded)["ranks"]["self_attn.q_proj"] == 4
    assert (result.folder / "tokenizer_config.json").is_file()
    summary = json.loads((result.folder / "uptrain_summary.json").read_text())
    assert summary["after"] == pytest.approx(result.after)
    client = MlflowClient(cfg.tracking.uri)
    (run,) = client.search_runs([client.get_experiment_by_name("uptrain").experiment_id])
    assert run.info.status == "FINISHED" and run.data.params["recursion.rank"] == "4"
    assert run.data.metrics["eval/after"] == pytest.approx(result.after)
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")] == [2, 4, 6, 8, 10, 12]


@pytest.mark.slow
def test_encoder_distillation_uptraining(tmp_path, cl_root, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_uptrain_config(None, _overrides(
        tmp_path, cl_root, "model.name=minilm", "model.kind=encoder", "model.random_init=true",
        "model.config_overrides={num_hidden_layers: 4, hidden_size: 32, num_attention_heads: 2, intermediate_size: 64, "
        "hidden_dropout_prob: 0.0, attention_probs_dropout_prob: 0.0, initializer_range: 0.2}",  # layers that differ
        "training.objective=distill", "training.steps=6", "training.lr=1e-3", "recursion.init=average",
        "recursion.rank=2", "recursion.lora_init=zero", "tracking.enabled=false",
    ))
    result = run_uptraining(cfg, echo=lambda *_: None)
    assert result.metric == "distill_mse" and 0 < result.after < 0.8 * result.before
    loaded = load_recursive(result.folder)
    assert loaded.encoder.layer[0].attention.self.query.weight is loaded.encoder.layer[2].attention.self.query.weight


def test_cli_reports_a_diverging_loss_and_keeps_what_was_measured(tmp_path, cl_root, llama_folder, capsys):
    from continual.cli import main

    overrides = _overrides(tmp_path, cl_root, f"model.name={llama_folder}", "data.max_sentences=100", "training.steps=4",
                           "training.eval_blocks=2", "recursion.rank=2", "tracking.enabled=false",
                           "tracking.run_name=diverges", "training.lr=1e30")
    assert main(["uptrain", *overrides]) == 1
    err = capsys.readouterr().err
    assert "\nerror: loss became nan in uptrain at step" in err and "Traceback" not in err  # after a progress bar
    summary = json.loads((tmp_path / "out" / "diverges" / "uptrain_summary.json").read_text())
    assert summary["failed"] and summary["original"] > 0 and summary["before"] > 0 and summary["after"] is None
