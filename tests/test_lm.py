"""The continual language-modelling recipe: typed config, the perplexity math, and short real runs (tiny random
models, real CL_Benchmark text) in experts mode and dense mode, through the Python API and the CLI."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from continual.config import ConfigError
from continual.recipes.lm import (
    ExpandableLM,
    build_lm,
    load_lm_config,
    load_tokenizer,
    perplexity_forgetting,
    plasticity,
    run_continual_lm,
    set_expert_group_enabled,
    weights_checksum,
)
from continual.training import lr_factor, next_token_loss, perplexity

REPO = Path(__file__).resolve().parents[1]
PRESETS = sorted((REPO / "configs" / "lm").glob("*.yaml"))
DOMAINS = ["SST-2", "RTE"]


pytestmark = pytest.mark.usefixtures("one_cpu_thread")


def tiny_config(tmp_path, cl_root, *overrides, tracking=False):
    """Two small domains and a tiny ModuleFormer: a few seconds per run."""
    return load_lm_config(None, [
        "model.size=tiny", f"data.domains=[{','.join(DOMAINS)}]", f"data.data_root={cl_root}", "data.max_sentences=60",
        "data.block_size=32", "data.heldout_fraction=0.2", "data.eval_blocks=6", "training.steps_per_domain=6",
        "training.batch_size=4", "training.eval_batch_size=6", "training.log_every=2", "training.lr=1e-2",
        "training.progress=false", "training.device=cpu", f"tracking.enabled={str(tracking).lower()}",
        f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", f"tracking.output_dir={tmp_path / 'out'}", *overrides,
    ])


# ------------------------------------------------------------------------------------------------------------ config
def test_config_is_typed_and_defaults_are_the_extendability_stream():
    cfg = load_lm_config(None, ["training.steps_per_domain=5", "expansion.mode=dense"])
    assert cfg.training.steps_per_domain == 5 and cfg.expansion.mode == "dense"
    assert list(cfg.data.domains) == ["agnews", "yelp", "dbpedia"] and OmegaConf.is_readonly(cfg)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["training.stepz=1"], "training.stepz"),
        (["training.lr=fast"], "training.lr"),
        (["expansion.mode=sparse"], "expansion.mode: must be one of"),
        (["expansion.train_router=some"], "expansion.train_router"),
        (["expansion.experts_per_domain=0"], "expansion.experts_per_domain"),
        (["model.kind=encoder"], "model.kind"),
        (["model.size=huge"], "model.size: unknown ModuleFormer size"),
        (["model.config_overrides.n_layers=2"], "model.config_overrides.n_layers: not a ModuleFormerConfig argument"),
        (["model.config_overrides.k_ffn=17"], "model.config_overrides: .*k_ffn=17 exceeds"),
        (["pretrain.tasks=[TC/agnews]"], "pretrain.tasks: must be disjoint from data.domains"),
        (["pretrain.steps=5"], "pretrain.tasks: must be a non-empty list"),
        (["data.domains=[agnews,agnews]"], "data.domains: must be a list without repeated"),
        (["data.heldout_fraction=0"], "data.heldout_fraction"),
        (["tracking.run_name=../escape"], "tracking.run_name: '../escape' is used as a folder name"),
        (["tracking.experiment=/abs/lm"], "tracking.experiment: '/abs/lm' is used as a folder name"),
        (["training.steps_per_domain=0"], "training.steps_per_domain: must be >= 1"),
        (["training"], "not of the form key=value"),
        (["expansion.upcycle=clone"], "expansion.upcycle: must be one of"),
        (["expansion.gate=deep"], "expansion.gate: must be one of"),
        (["expansion.top_k=0"], "expansion.top_k: must be >= 1"),
        (["expansion.slices=1"], "expansion.slices: must be >= 2"),
        (["expansion.expert_hidden=-1"], "expansion.expert_hidden: must be >= 0"),
        (["model.kind=causal_lm", "expansion.experts_per_domain=2", "expansion.top_k=4"],
         r"expansion.top_k: must be at most the shared expert\(s\) \+ experts_per_domain = 3"),
    ],
)
def test_bad_config_fails_naming_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_lm_config(None, overrides)


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.stem)
def test_every_lm_preset_loads_and_opens_with_its_command(path):
    cfg = load_lm_config(path)
    relative = path.relative_to(REPO).as_posix()
    assert path.read_text().splitlines()[0] == f"# continual lm {relative}"
    if cfg.model.kind == "moduleformer":
        assert cfg.pretrain.steps > 0, "the extendability presets start both modes from the same pretrained model"


@pytest.mark.parametrize("model", ["moduleformer", "smollm2"])
def test_each_extendability_pair_differs_only_in_what_a_domain_trains(model):
    experts, dense = (OmegaConf.to_container(load_lm_config(REPO / "configs/lm" / f"{model}_{m}.yaml"))
                      for m in ("experts", "dense"))
    assert (experts.pop("expansion")["mode"], dense.pop("expansion")["mode"]) == ("experts", "dense")
    assert experts["tracking"].pop("run_name") != dense["tracking"].pop("run_name")
    if model == "smollm2":  # new experts start at zero; fine-tuning pretrained weights wants a smaller step
        assert experts["training"].pop("lr") > dense["training"].pop("lr")
    assert experts == dense  # model, data, pretraining, training and the rest of tracking


# -------------------------------------------------------------------------------------------------------------- math
def test_forgetting_and_plasticity_of_a_perplexity_matrix():
    p = np.array([[10.0, 50.0, 40.0], [12.0, 8.0, 30.0], [15.0, 9.5, 6.0]])
    np.testing.assert_allclose(perplexity_forgetting(p), [5.0, 1.5])
    np.testing.assert_allclose(plasticity(p), [10.0, 8.0, 6.0])
    assert perplexity_forgetting(np.array([[3.0]])).shape == (0,)


def test_next_token_loss_and_schedule():
    logits = torch.randn(2, 5, 7)
    ids = torch.randint(0, 7, (2, 5))
    manual = torch.stack([-torch.log_softmax(logits[b, t], -1)[ids[b, t + 1]] for b in range(2) for t in range(4)]).mean()
    torch.testing.assert_close(next_token_loss(logits, ids), manual)
    assert [lr_factor(s, 10, 2) for s in (0, 1, 2, 6, 10)] == [0.5, 1.0, 1.0, 0.5, 0.0]


def test_perplexity_of_a_diverged_model_is_inf_not_an_overflow():
    blocks = torch.zeros(2, 4, dtype=torch.long)
    huge = lambda model, ids: torch.tensor(1e4)  # exp(1e4) does not fit a float
    assert perplexity(torch.nn.Identity(), blocks, 2, torch.device("cpu"), loss=huge) == math.inf
    nan = lambda model, ids: torch.tensor(float("nan"))
    assert math.isnan(perplexity(torch.nn.Identity(), blocks, 2, torch.device("cpu"), loss=nan))


# --------------------------------------------------------------------------------------------------- experts mode
def test_experts_mode_freezes_the_past_and_tracks_everything(tmp_path, cl_root):
    from mlflow.tracking import MlflowClient

    cfg = tiny_config(tmp_path, cl_root, "pretrain.tasks=[QQP]", "pretrain.steps=8", "expansion.experts_per_domain=2",
                      "expansion.att_experts_per_domain=1", tracking=True)
    snapshots = []
    result = run_continual_lm(cfg, echo=lambda _: None,
                              after_domain=lambda i, model: snapshots.append(copy.deepcopy(model)))
    before, after = snapshots

    # the perplexity matrix, forgetting and plasticity
    assert result.matrix.shape == (2, 2) and np.isfinite(result.matrix).all() and np.isfinite(result.initial).all()
    assert result.general.shape == (3,) and np.isfinite(result.general).all()
    assert result.forgetting == pytest.approx([result.matrix[1, 0] - result.matrix[0, 0]])
    assert list(result.plasticity) == [result.matrix[0, 0], result.matrix[1, 1]]
    assert result.matrix[0, 0] < result.initial[0], "learning a domain's experts must lower its perplexity"
    assert result.group_share.shape == (2, 3) and np.allclose(result.group_share.sum(1), 1.0)
    assert (result.group_share[:, 1:] > 0).all(), "both domains' tokens reach the added experts"

    # each domain added one group: n_layer * (2 FFN + 1 attention experts), each with its router row
    layers = before.expert_layers()
    per_domain = sum((2 if name.endswith("ffn") else 1) * layer.parameters_per_expert() for name, layer in layers.items())
    assert [(r.group, r.added_parameters, r.trainable_parameters) for r in result.records] == [(1, per_domain, per_domain),
                                                                                               (2, per_domain, per_domain)]
    assert result.records[1].total_parameters == result.records[0].total_parameters + per_domain

    # everything that existed before the second domain is bit-identical after it; only group 2 is new
    old, new = before.state_dict(), after.state_dict()
    assert all(torch.equal(new[name], tensor) for name, tensor in old.items())
    assert {n for n in new if n not in old} == {f"{n}.{k}" for n in layers for k in ("groups.2.router", "groups.2.enabled",
                                                                                     *[f"groups.2.{r}" for r in layers[n].shapes])}

    # with the newest experts switched off the model IS the model after the first domain
    ids = torch.randint(0, before.config.vocab_size, (3, 16), generator=torch.Generator().manual_seed(0))
    set_expert_group_enabled(after, 2, False)
    with torch.no_grad():
        assert torch.equal(after(input_ids=ids).logits, before(input_ids=ids).logits)

    # MLflow: params, per-step metrics and the artifacts
    client = MlflowClient(cfg.tracking.uri)
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["expansion.mode"] == "experts" and run.data.params["start_checksum"] == result.start_checksum
    history = client.get_metric_history(result.run_id, "ppl/SST-2")
    assert [(m.step, m.value) for m in history] == [(0, result.matrix[0, 0]), (1, result.matrix[1, 0])]
    assert run.data.metrics["final/mean_forgetting"] == pytest.approx(float(result.forgetting.mean()))
    assert run.data.metrics["routing_share/RTE/group2"] == pytest.approx(result.group_share[1, 2])
    assert len(client.get_metric_history(result.run_id, "train/loss")) == (8 + 2 * 6) // 2
    artifacts = {a.path for a in client.list_artifacts(result.run_id)}
    assert {"config.yaml", "perplexity_matrix.csv", "perplexity_matrix.png", "summary.json"} <= artifacts
    summary = json.loads((result.output_dir / "summary.json").read_text())
    assert summary["matrix"] == result.matrix.tolist() and summary["records"][1]["group"] == 2
    assert (result.output_dir / "perplexity_matrix.csv").read_text().splitlines()[0] == "after_domain,SST-2,RTE,general"


def test_switching_off_new_experts_recovers_the_earlier_perplexity_exactly(tmp_path, cl_root):
    """Without pretraining the first domain trains the base; the second only adds experts, so with them off the
    first domain's held-back perplexity is the one measured right after it."""
    from streams.text import build_text_blocks

    cfg = tiny_config(tmp_path, cl_root, "expansion.first_domain_trains_base=true")
    models = []
    result = run_continual_lm(cfg, echo=lambda _: None, after_domain=lambda i, m: models.append(m))
    assert [r.group for r in result.records] == [None, 1] and result.records[0].added_parameters == 0
    assert result.records[0].trainable_parameters == result.records[0].total_parameters  # the base: every weight
    model = models[-1]
    heldout = build_text_blocks([DOMAINS[0]], load_tokenizer("byte"), block_size=32, heldout_fraction=0.2, seed=0,
                                data_root=str(cl_root), max_sentences=60).heldout[:6]
    set_expert_group_enabled(model, 1, False)
    assert perplexity(model, heldout, 6, torch.device("cpu")) == result.matrix[0, 0]
    set_expert_group_enabled(model, 1, True)
    assert perplexity(model, heldout, 6, torch.device("cpu")) == result.matrix[1, 0]


def test_training_every_router_moves_old_router_rows_but_no_old_expert(tmp_path, cl_root):
    cfg = tiny_config(tmp_path, cl_root, "expansion.first_domain_trains_base=true", "expansion.train_router=all")
    states = []
    run_continual_lm(cfg, echo=lambda _: None,
                     after_domain=lambda i, m: states.append({n: p.detach().clone() for n, p in m.named_parameters()}))
    before, after = states
    routers = {n for n in before if n.endswith(".router") or ".gate." in n}
    assert routers and all(not torch.equal(before[n], after[n]) for n in routers)
    assert all(torch.equal(before[n], after[n]) for n in before if n not in routers)


# ----------------------------------------------------------------------------------------------------- dense mode
def test_dense_mode_changes_every_weight_and_adds_nothing(tmp_path, cl_root):
    cfg = tiny_config(tmp_path, cl_root, "expansion.mode=dense")
    model, tokenizer = build_lm(cfg.model)
    states = [{n: p.detach().clone() for n, p in model.named_parameters()}]
    result = run_continual_lm(cfg, echo=lambda _: None, model=model, tokenizer=tokenizer,
                              after_domain=lambda i, m: states.append({n: p.detach().clone() for n, p in m.named_parameters()}))
    for earlier, later in zip(states, states[1:]):
        assert earlier.keys() == later.keys()
        unchanged = [n for n in earlier if torch.equal(earlier[n], later[n])]
        assert not unchanged, f"dense fine-tuning left {unchanged} untouched"
    assert all(r.group is None and r.added_parameters == 0 and r.trainable_parameters == r.total_parameters
               for r in result.records)
    assert np.isfinite(result.matrix).all() and result.general is None


# -------------------------------------------------------------------------------------- any causal LM, and the CLI
@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory):
    """A tiny random Llama saved with the byte tokenizer."""
    from transformers import ByT5Tokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = ByT5Tokenizer()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=48,
                                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                                         max_position_embeddings=64))
    folder = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_cli_runs_a_causal_lm_dense_and_upcycled(tmp_path, cl_root, llama_folder, capsys):
    from continual.cli import main

    overrides = [f"model.name={llama_folder}", "model.kind=causal_lm", "expansion.mode=dense"]
    preset = tmp_path / "llama.yaml"
    preset.write_text(OmegaConf.to_yaml(tiny_config(tmp_path, cl_root, *overrides)))
    assert main(["lm", str(preset)]) == 0
    out = capsys.readouterr().out
    assert "after RTE:" in out and "forgetting" in out
    csv_rows = (tmp_path / "out" / "lm-SST-2-RTE" / f"dense-{llama_folder.name}-seed0" / "perplexity_matrix.csv").read_text()
    assert all(math.isfinite(float(v)) for line in csv_rows.splitlines()[1:] for v in line.split(",")[1:])

    assert main(["lm", str(preset), "expansion.mode=experts", "expansion.experts_per_domain=2"]) == 0
    out = capsys.readouterr().out
    assert "after RTE:" in out and "routing share (end)" in out
    assert main(["lm", str(preset), "expansion.mode=experts", "expansion.att_experts_per_domain=1"]) == 2
    assert "expansion.att_experts_per_domain: must be 0 for an upcycled LlamaForCausalLM" in capsys.readouterr().err
    assert main(["lm", str(preset), "training.lrr=1"]) == 2
    assert "training.lrr" in capsys.readouterr().err


def test_a_nan_loss_in_a_later_domain_keeps_the_earlier_rows(tmp_path, cl_root):
    from continual.training import NonFiniteLossError

    def poison(i, model):  # after the first domain: every later forward pass is NaN
        if i == 0:
            with torch.no_grad():
                next(model.parameters()).fill_(float("nan"))

    cfg = tiny_config(tmp_path, cl_root, "tracking.run_name=nan")
    with pytest.raises(NonFiniteLossError, match="loss became nan in domain RTE at step 0"):
        run_continual_lm(cfg, echo=lambda _: None, after_domain=poison)
    summary = json.loads((tmp_path / "out" / "lm-SST-2-RTE" / "nan" / "summary.json").read_text())
    assert summary["failed"] and all(math.isfinite(v) for v in summary["matrix"][0]) and summary["matrix"][1] == [None, None]
    assert [r["domain"] for r in summary["records"]] == ["SST-2"]


def test_cli_reports_a_diverging_loss_without_a_traceback(tmp_path, cl_root, capsys):
    from continual.cli import main

    preset = tmp_path / "tiny.yaml"
    preset.write_text(OmegaConf.to_yaml(tiny_config(tmp_path, cl_root, "tracking.run_name=diverges")))
    assert main(["lm", str(preset), "training.lr=1e30"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: loss became nan in domain SST-2") and "lower the learning rate" in err
    assert "Traceback" not in err
    folder = tmp_path / "out" / "lm-SST-2-RTE" / "diverges"
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["failed"] and all(math.isfinite(v) for v in summary["initial"])  # measured before training
    assert (folder / "config.yaml").is_file() and (folder / "perplexity_matrix.csv").is_file()


def test_a_saved_moduleformer_loads_as_a_causal_lm_that_can_grow(tmp_path):
    model, tokenizer = build_lm(load_lm_config(None, ["model.size=tiny"]).model)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded, _ = build_lm(load_lm_config(None, ["model.kind=causal_lm", f"model.name={tmp_path}"]).model)
    assert isinstance(loaded, ExpandableLM) and weights_checksum(loaded) == weights_checksum(model)


# ------------------------------------------------------------------------------ experts mode on a dense causal LM
@pytest.fixture(scope="module")
def gpt2_folder(tmp_path_factory):
    """A tiny random GPT-2 saved with the byte tokenizer."""
    from transformers import ByT5Tokenizer, GPT2Config, GPT2LMHeadModel

    tokenizer = ByT5Tokenizer()
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=2, n_positions=64,
                                       bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id))
    folder = tmp_path_factory.mktemp("tiny-gpt2")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(params=["llama", "gpt2"])
def dense_lm(request):
    """The folder of a tiny dense causal LM (Llama, GPT-2), built with random weights by ``model.random_init``."""
    return request.getfixturevalue(f"{request.param}_folder")


def upcycled_config(tmp_path, cl_root, folder, *overrides):
    return tiny_config(tmp_path, cl_root, "model.kind=causal_lm", f"model.name={folder}", "model.random_init=true",
                       "expansion.experts_per_domain=2", *overrides)


def heldout_blocks(cl_root, tokenizer):
    """The held-back blocks ``tiny_config`` evaluates, per domain."""
    from streams.text import build_text_blocks

    return [build_text_blocks([d], tokenizer, block_size=32, heldout_fraction=0.2, seed=0, data_root=str(cl_root),
                              max_sentences=60).heldout[:6] for d in DOMAINS]


def test_upcycling_changes_no_output_until_a_group_is_switched_on(tmp_path, cl_root, dense_lm):
    from continual.recipes.lm import upcycled_lm

    cfg = upcycled_config(tmp_path, cl_root, dense_lm)
    lm, _ = build_lm(cfg.model)
    ids = torch.randint(3, 384, (3, 16), generator=torch.Generator().manual_seed(0))
    logits = lambda m: m(input_ids=ids).logits
    with torch.no_grad():
        before = logits(lm)
        model = upcycled_lm(lm, cfg.expansion)
        assert isinstance(model, ExpandableLM) and not any(p.requires_grad for p in model.parameters())
        out = model(input_ids=ids)
        assert torch.equal(out.logits, before) and out.concentration_loss is None, "upcycled, no group"
        assert model.add_experts(2, enabled=False) == 1
        assert torch.equal(logits(model), before), "group 1 added switched off"
        set_expert_group_enabled(model, 1, True)
        assert not torch.allclose(logits(model), before), "on: the FFN's gate drops below 1 (the check can fail)"
        set_expert_group_enabled(model, 1, False)
        assert torch.equal(logits(model), before), "off again: fewer than k experts left, every token gets the FFN"

    # a group is one bank slot at every site, under the model's own parameter names
    names = dict(model.named_parameters())
    group = model.expert_group_parameters(1)
    assert set(group) <= set(names) and len(group) == 3 * 2  # w_in, w_out, router at 2 sites
    assert {id(p) for p in group.values()} == {id(p) for p in model.bank.task_parameters(0)}
    assert list(model.expert_layers()) == [n.rsplit(".groups.", 1)[0] for n in group if n.endswith(".router")]
    with pytest.raises(ValueError, match="upcycled with n=2"):
        model.add_experts(3)


def test_experts_mode_upcycles_a_dense_lm_and_trains_only_the_new_group(tmp_path, cl_root, dense_lm):
    cfg = upcycled_config(tmp_path, cl_root, dense_lm)
    lm, tokenizer = build_lm(cfg.model)
    reference = copy.deepcopy(lm)
    dense = {id(p): p.detach().clone() for p in lm.parameters()}
    models, states = [], []

    def after_domain(i, model):
        models.append(model)
        states.append({n: p.detach().clone() for n, p in model.named_parameters()})

    result = run_continual_lm(cfg, echo=lambda _: None, model=lm, tokenizer=tokenizer, after_domain=after_domain)
    model = models[-1]

    # the stream starts from the dense model's exact perplexities, and fills the matrix
    cpu = torch.device("cpu")
    assert list(result.initial) == [perplexity(reference, blocks, 6, cpu) for blocks in heldout_blocks(cl_root, tokenizer)]
    assert result.matrix.shape == (2, 2) and np.isfinite(result.matrix).all()
    assert result.matrix[0, 0] < result.initial[0], "learning a domain's experts must lower its perplexity"
    assert result.group_share.shape == (2, 3) and np.allclose(result.group_share.sum(1), 1.0)
    assert (result.group_share[:, 0] > 0).all() and (result.group_share[:, 1:].sum(1) > 0).all()

    # each domain added and trained one group: 2 layers * 2 experts (W_in, W_out, router row)
    per_domain = sum(2 * pool.parameters_per_expert() for pool in model.expert_layers().values())
    assert [(r.group, r.added_parameters, r.trainable_parameters) for r in result.records] == [
        (1, per_domain, per_domain), (2, per_domain, per_domain)]

    # the dense weights never change; everything the first domain left is bit-identical after the second
    assert all(torch.equal(p, dense[id(p)]) for p in lm.parameters() if id(p) in dense)
    first, second = states
    assert all(torch.equal(second[name], tensor) for name, tensor in first.items())
    assert set(second) - set(first) == set(model.expert_group_parameters(2))
    assert all(bool(first[n].any()) for n in model.expert_group_parameters(1) if n.endswith("w_out")), "W_out trained"


def test_the_routing_losses_reach_the_objective(tmp_path, cl_root, llama_folder):
    from continual.recipes.lm import training_objective, upcycled_lm
    from continual.modules.experts import load_concentration_loss, mutual_information_loss

    cfg = upcycled_config(tmp_path, cl_root, llama_folder)
    model = upcycled_lm(build_lm(cfg.model)[0], cfg.expansion)
    model.add_experts(2)
    model.train()
    ids = torch.randint(3, 384, (3, 16), generator=torch.Generator().manual_seed(0))
    out = model(input_ids=ids)
    routings = [pool.last_routing for pool in model.expert_layers().values()]
    torch.testing.assert_close(out.concentration_loss, torch.stack([load_concentration_loss(r.probs) for r in routings]).mean())
    torch.testing.assert_close(out.mi_loss, torch.stack([mutual_information_loss(r.probs) for r in routings]).mean())
    extra = training_objective(out, ids, 0.0, 0.5) - training_objective(out, ids, 0.0, 0.0)
    concentration = out.concentration_loss.item()
    assert concentration > 0 and extra.item() == pytest.approx(0.5 * concentration)
    extra.backward()
    routers = [p for n, p in model.expert_group_parameters(1).items() if n.endswith(".router")]
    assert all(p.grad is not None and bool(p.grad.any()) for p in routers), "the concentration loss moves the router"


def test_an_upcycled_lm_whose_first_domain_trains_the_base_recovers_it_exactly(tmp_path, cl_root, llama_folder):
    """The first domain fine-tunes the dense LM; the second only adds experts, so with them off the first domain's
    held-back perplexity is the one measured right after it."""
    cfg = upcycled_config(tmp_path, cl_root, llama_folder, "expansion.first_domain_trains_base=true")
    models = []
    result = run_continual_lm(cfg, echo=lambda _: None, after_domain=lambda i, m: models.append(m))
    assert [r.group for r in result.records] == [None, 1]
    assert result.records[0].trainable_parameters == result.records[0].total_parameters
    model, heldout = models[-1], heldout_blocks(cl_root, load_tokenizer(str(llama_folder)))[0]
    set_expert_group_enabled(model, 1, False)
    assert perplexity(model, heldout, 6, torch.device("cpu")) == result.matrix[0, 0]


def test_training_every_router_of_an_upcycled_lm_moves_only_router_rows(tmp_path, cl_root, llama_folder):
    cfg = upcycled_config(tmp_path, cl_root, llama_folder, "expansion.train_router=all")
    states = []
    run_continual_lm(cfg, echo=lambda _: None,
                     after_domain=lambda i, m: states.append({n: p.detach().clone() for n, p in m.named_parameters()}))
    before, after = states
    routers = {n for n in before if n.endswith(".router")}
    assert {n.split(".groups.")[1] for n in routers} == {"0.router", "1.router"}  # the FFN's rows and domain 1's
    assert all(not torch.equal(before[n], after[n]) for n in routers)
    assert all(torch.equal(before[n], after[n]) for n in before if n not in routers)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["expansion.att_experts_per_domain=1"], "expansion.att_experts_per_domain: must be 0 for an upcycled"),
        (["expansion.upcycle=slices", "expansion.slices=5"], "expansion.slices: .*divide the FFN width 48"),
    ],
)
def test_an_upcycled_lm_rejects_what_it_cannot_do_naming_the_key(tmp_path, cl_root, llama_folder, overrides, message):
    from continual.recipes.lm import upcycled_lm

    cfg = upcycled_config(tmp_path, cl_root, llama_folder, *overrides)
    with pytest.raises(ConfigError, match=message):
        upcycled_lm(build_lm(cfg.model)[0], cfg.expansion)


def test_experts_mode_on_a_causal_lm_without_an_ffn_fuser_names_the_mode():
    from transformers import OPTConfig, OPTForCausalLM

    from continual.recipes.lm import upcycled_lm

    opt = OPTForCausalLM(OPTConfig(vocab_size=64, hidden_size=16, ffn_dim=32, num_hidden_layers=1,
                                   num_attention_heads=2, word_embed_proj_dim=16, max_position_embeddings=32))
    with pytest.raises(ConfigError, match="expansion.mode=experts: OPTForCausalLM has no experts to add and cannot be "
                                          "upcycled .*model_type 'opt'"):
        upcycled_lm(opt, load_lm_config(None, ["model.kind=causal_lm"]).expansion)
