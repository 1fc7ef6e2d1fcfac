"""Domain routers of the continual language-modelling recipe (continual/recipes/lm/routing.py): the per-sequence
group restriction on a native ModuleFormer and on an upcycled LM, the frozen per-domain statistics, the config
group, the metrics, and short real runs (tiny random models, real CL_Benchmark text)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from continual.config import ConfigError
from continual.recipes.lm import (
    NO_DOMAIN,
    DomainRouter,
    allowed_groups,
    build_lm,
    group_shares,
    load_lm_config,
    make_domain_router,
    own_group_share,
    routing_accuracy,
    routing_confusion,
    run_continual_lm,
    upcycled_lm,
)

REPO = Path(__file__).resolve().parents[1]
DOMAINS = ["SST-2", "RTE"]

pytestmark = pytest.mark.usefixtures("one_cpu_thread")


def tiny_config(tmp_path, cl_root, *overrides, tracking=False):
    """Two small domains and a tiny ModuleFormer: a second or two per run."""
    return load_lm_config(None, [
        "model.size=tiny", f"data.domains=[{','.join(DOMAINS)}]", f"data.data_root={cl_root}", "data.max_sentences=60",
        "data.block_size=32", "data.heldout_fraction=0.2", "data.eval_blocks=6", "training.steps_per_domain=6",
        "training.batch_size=4", "training.eval_batch_size=6", "training.log_every=2", "training.lr=1e-2",
        "training.progress=false", "training.device=cpu", f"tracking.enabled={str(tracking).lower()}",
        f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", f"tracking.output_dir={tmp_path / 'out'}", *overrides,
    ])


def tiny_moduleformer(groups: int = 2):
    """A tiny ModuleFormer with ``groups`` domain groups (2 FFN + 1 attention experts per layer each), trained-looking
    (random, non-zero) weights, in eval mode."""
    model, _ = build_lm(load_lm_config(None, ["model.size=tiny"]).model)
    for _ in range(groups):
        model.add_experts(2, n_att=1)
    return model.eval()


def tiny_upcycled_llama(groups: int = 2):
    """A tiny random Llama upcycled (2 experts per domain group, top-2), with ``groups`` domain groups whose W_out is
    non-zero (so that they change the output); and a copy of the dense Llama."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=384, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64))
    dense = copy.deepcopy(lm).eval()
    model = upcycled_lm(lm, load_lm_config(None, ["model.kind=causal_lm", "expansion.experts_per_domain=2",
                                                  "expansion.start_logit=0"]).expansion)
    for _ in range(groups):
        group = model.add_experts(2)
        with torch.no_grad():
            for name, p in model.expert_group_parameters(group).items():
                p.normal_(0, 0.5)
    return model.eval(), dense


def ids(batch: int = 2, length: int = 12, seed: int = 0, low: int = 3, high: int = 384) -> torch.Tensor:
    return torch.randint(low, high, (batch, length), generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------- the restriction itself
def test_allowed_groups_are_the_shared_ones_and_the_domains_own():
    # domain 0 added group 1, domain 1 trained the base (no group), domain 2 added group 2; group 0 is shared
    table = allowed_groups(torch.tensor([0, 1, 2, NO_DOMAIN, 7]), [1, None, 2], 3)
    assert table.tolist() == [[True, True, False], [True, False, False], [True, False, True],
                              [True, False, False], [True, False, False]]
    assert allowed_groups(torch.tensor([[0, 2]]), [1, None, 2], 3).tolist() == [[True, True, True]]  # top-2: union


def groups_of_choices(pool, batch: int) -> torch.Tensor:
    """``[B, T * k]`` the group of every expert the last forward chose, per sample."""
    group_of_expert = torch.repeat_interleave(torch.arange(pool.n_groups), torch.tensor(pool.group_sizes))
    return group_of_expert[pool.last_routing.indices].reshape(batch, -1)


def test_each_sequence_of_a_moduleformer_routes_to_the_shared_group_and_its_domain_only():
    model, x = tiny_moduleformer(), ids(3)
    router = DomainRouter("oracle", None, domain_groups=[1, 2])
    allowed = router.allowed(torch.tensor([0, 1, NO_DOMAIN]), model)  # per sample: domain 0, domain 1, none
    model.record_expert_usage(True)
    with torch.no_grad():
        model(input_ids=x, expert_groups=allowed)
    layers = model.expert_layers()
    assert len(layers) == 4  # attention and FFN experts of both blocks
    for pool in layers.values():
        chosen = groups_of_choices(pool, 3)
        assert set(chosen[0].tolist()) <= {0, 1} and set(chosen[1].tolist()) <= {0, 2}
        assert set(chosen[2].tolist()) == {0}
    # the tokens of one domain's sequences: their own group is all the domain experts they reach
    model.reset_expert_usage()
    with torch.no_grad():
        model(input_ids=x, expert_groups=router.allowed(torch.tensor([1, 1, 1]), model))
    share = group_shares(model)
    assert share[2] > 0 and share[1] == 0
    assert own_group_share(np.stack([share, share]), [1, 2]).tolist() == [0.0, 1.0]


def test_allowing_every_group_is_bit_identical_to_no_restriction():
    """The default (router.name=none) passes no mask at all; a mask that allows everything changes no bit either."""
    for model in (tiny_moduleformer(), tiny_upcycled_llama()[0]):
        x = ids(2)
        with torch.no_grad():
            free = model(input_ids=x).logits
            everything = model(input_ids=x, expert_groups=torch.ones(2, 3, dtype=torch.bool)).logits
        assert torch.equal(free, everything), type(model).__name__


def test_an_upcycled_lm_restricts_each_sequence_through_the_banks_slot_weights():
    (model, dense_lm), x = tiny_upcycled_llama(), ids(3)
    router = DomainRouter("oracle", None, domain_groups=[1, 2])
    with torch.no_grad():
        dense = dense_lm(input_ids=x).logits
        set_free = model(input_ids=x).logits
        routed = model(input_ids=x, expert_groups=router.allowed(torch.tensor([0, 1, NO_DOMAIN]), model)).logits
    for pool in model.expert_layers().values():
        chosen = groups_of_choices(pool, 2)  # the sequence routed to no domain is not routed at all
        assert set(chosen[0].tolist()) <= {0, 1} and set(chosen[1].tolist()) <= {0, 2}
    torch.testing.assert_close(routed[2], dense[2], rtol=0, atol=1e-6, msg="no domain: the dense LM")
    assert not torch.allclose(routed[0], set_free[0]), "domain 0 no longer reaches group 2 (the check can fail)"
    with pytest.raises(ValueError, match="group 0 is the dense FFN"):
        model(input_ids=x[:1], expert_groups=torch.tensor([[False, True, False]]))


# ---------------------------------------------------------------------------------------- fitted, stored, frozen
def test_statistics_are_fitted_per_domain_on_the_shared_part_and_frozen():
    """Features read the shared part only, so adding and training a later domain's group leaves them (and the
    statistics of earlier domains) exactly as they were; a domain is fitted once."""
    model = tiny_moduleformer(groups=1)
    cfg = load_lm_config(None, ["router.name=prototype", "router.fit_blocks=32"]).router
    router = make_domain_router(cfg, model)
    assert router.layers == [1, 2] and router.fit_blocks == 32  # the tiny model's 2 blocks
    # two "domains" a random tiny model can tell apart: disjoint sets of 7 byte ids
    news, reviews = ids(48, 16, seed=1, low=3, high=10), ids(48, 16, seed=2, low=300, high=307)
    cpu = torch.device("cpu")

    assert router.add_domain(1) == 0
    assert router.route(model, news, 0, 4, cpu).tolist() == [[NO_DOMAIN]] * 48, "nothing fitted yet: shared only"
    stored = router.fit_domain(model, 0, news, 4, cpu)
    means = router.router.tasks[0][0].clone()
    features = router.features(model, news)
    assert stored > 0 and means.shape == (1, 2 * 32)  # one class per domain: its mean over 2 layers x width 32
    torch.testing.assert_close(means[0], features[:32].mean(0))  # fitted on the first fit_blocks blocks only

    assert router.add_domain(model.add_experts(2, n_att=1)) == 1
    with torch.no_grad():
        for p in model.expert_group_parameters(2).values():
            p.normal_(0, 1.0)
        for p in model.expert_group_parameters(1).values():
            p.add_(1.0)  # even a changed domain group does not move the shared part's features
    assert torch.equal(router.features(model, news), features)
    router.fit_domain(model, 1, reviews, 4, cpu)
    assert torch.equal(router.router.tasks[0][0], means), "domain 0's statistics are frozen"
    with pytest.raises(ValueError, match="already fitted"):
        router.fit_domain(model, 0, news, 4, cpu)
    routed = torch.cat([router.route(model, news, 0, 4, cpu), router.route(model, reviews, 1, 4, cpu)])
    assert routed[:, 0].tolist() == [0] * 48 + [1] * 48


# ------------------------------------------------------------------------------------------------------- metrics
def test_own_group_share_accuracy_and_confusion():
    share = np.array([[0.5, 0.4, 0.1, 0.0], [0.6, 0.0, 0.4, 0.0], [1.0, 0.0, 0.0, 0.0]])
    np.testing.assert_allclose(own_group_share(share, [1, 2]), [0.8, 1.0, np.nan])  # domain 2: no group yet
    np.testing.assert_allclose(own_group_share(share[:1], [None, 1]), [np.nan])  # a base domain has no group
    routed = [np.array([0, 0, 1]), np.array([1, 1]), np.array([0, NO_DOMAIN])]
    np.testing.assert_allclose(routing_accuracy(routed, 2), [2 / 3, 1.0, np.nan])
    assert routing_confusion(routed, 3).tolist() == [[2, 1, 0], [0, 2, 0], [1, 0, 0]]


# ------------------------------------------------------------------------------------------------------- config
@pytest.mark.parametrize(
    "overrides, message",
    [
        (["router.name=entropy"], r"router.name: 'entropy' is not a router continual lm can use.*'prototype'"),
        (["router.name=nearest"], r"router.name: 'nearest' is not a router continual lm can use"),
        (["router.shrinkage=0.2"], r"router.shrinkage: Key 'shrinkage' not in"),  # none takes no options
        (["router.name=prototype", "router.shrinkage=2"], r"router: router.shrinkage must be in \[0, 1\]"),
        (["router.name=keys", "router.shrinkage=0.2"], "router.shrinkage"),
        (["router.name=prototype", "router.fit_blocks=0"], "router.fit_blocks: must be >= 1 or null"),
        (["router.name=prototype", "router.top_k=0"], "router.top_k: must be >= 1"),
        (["router.name=keys", "router.temperature=2"], "router.temperature: must be 1.0"),
        (["router.name=prototype", "router.layers=[x]"], r"router.layers\[0\]"),
        (["router.name=oracle", "expansion.mode=dense"], "router.name: oracle .* needs expansion.mode=experts"),
        (["router.name=prototype", "expansion.train_router=all"], "expansion.train_router: must be 'new'"),
    ],
)
def test_a_bad_router_fails_naming_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_lm_config(None, overrides)


def test_router_layers_are_checked_against_the_model():
    with pytest.raises(ConfigError, match=r"router.layers: \[5\] out of range for a model with 3 hidden states"):
        make_domain_router(load_lm_config(None, ["router.name=keys", "router.layers=[5]"]).router, tiny_moduleformer())


@pytest.mark.parametrize("model", ["moduleformer", "smollm2"])
def test_a_routed_preset_differs_from_its_experts_preset_only_in_its_router(model):
    routed, plain = (OmegaConf.to_container(load_lm_config(REPO / "configs/lm" / f"{model}_{name}.yaml"))
                     for name in ("experts_routed", "experts"))
    assert routed.pop("router")["name"] == "prototype" and plain.pop("router") == {"name": "none"}
    assert routed["tracking"].pop("run_name") != plain["tracking"].pop("run_name")
    assert routed == plain


# ----------------------------------------------------------------------------------------------------- real runs
def test_the_default_router_never_restricts_a_sequence(tmp_path, cl_root):
    """router.name=none is today's experts mode: no forward gets a mask, so outputs are those of before routers."""
    cfg = tiny_config(tmp_path, cl_root)
    assert cfg.router.name == "none"
    model, tokenizer = build_lm(cfg.model)
    seen = []
    model.register_forward_pre_hook(lambda m, args, kwargs: seen.append("expert_groups" in kwargs), with_kwargs=True)
    result = run_continual_lm(cfg, echo=lambda _: None, model=model, tokenizer=tokenizer)
    assert seen and not any(seen)
    assert result.routing_accuracy is None and result.own_share.shape == (2, 2)
    assert "mean_routing_accuracy" not in result.summary()


def test_the_oracle_sends_every_domain_to_its_own_group_and_forgets_nothing(tmp_path, cl_root):
    from mlflow.tracking import MlflowClient

    cfg = tiny_config(tmp_path, cl_root, "router.name=oracle", "expansion.experts_per_domain=2",
                      "expansion.att_experts_per_domain=1", tracking=True)
    result = run_continual_lm(cfg, echo=lambda _: None)
    # each domain's tokens reach the shared group and their own group only; the earlier domain is untouched
    assert result.group_share[0, 2] == 0 and result.group_share[1, 1] == 0
    assert result.own_share[-1].tolist() == [1.0, 1.0] and np.isnan(result.own_share[0, 1])
    assert result.matrix[1, 0] == result.matrix[0, 0], "domain 0's perplexity is bit-identical after domain 1"
    np.testing.assert_array_equal(result.routing_accuracy, [[1.0, np.nan], [1.0, 1.0]])

    summary = json.loads((result.output_dir / "summary.json").read_text())
    assert summary["router"] == "oracle" and summary["summary"]["mean_routing_accuracy"] == 1.0
    assert summary["own_group_share"][1] == [1.0, 1.0] and summary["routing_confusion"] == [[6.0, 0.0], [0.0, 6.0]]
    run = MlflowClient(cfg.tracking.uri).get_run(result.run_id)
    assert run.data.tags["router"] == "oracle"
    assert run.data.metrics["final/routing_acc/RTE"] == 1.0 and run.data.metrics["final/own_group_share/SST-2"] == 1.0
    assert run.data.metrics["final/mean_own_group_share"] == 1.0 and "own_group_share/RTE" in run.data.metrics


@pytest.mark.parametrize("model", ["moduleformer", "llama"])
def test_a_prototype_router_infers_each_sequences_domain(tmp_path, cl_root, model):
    overrides = ["router.name=prototype", "router.fit_blocks=16", "expansion.experts_per_domain=2"]
    if model == "llama":
        from transformers import ByT5Tokenizer, LlamaConfig, LlamaForCausalLM

        folder = tmp_path / "llama"
        LlamaForCausalLM(LlamaConfig(vocab_size=384, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                     num_attention_heads=2, num_key_value_heads=2,
                                     max_position_embeddings=64)).save_pretrained(folder)
        ByT5Tokenizer().save_pretrained(folder)
        overrides += ["model.kind=causal_lm", f"model.name={folder}", "model.random_init=true"]
    lines = []
    result = run_continual_lm(tiny_config(tmp_path, cl_root, *overrides), echo=lines.append)
    assert [r.router_bytes > 0 for r in result.records] == [True, True]
    accuracy, confusion = result.routing_accuracy, result.routing_confusion
    assert accuracy.shape == (2, 2) and np.isnan(accuracy[0, 1]) and np.isfinite(accuracy[1]).all()
    assert confusion.sum(1).tolist() == [6, 6] and np.allclose(np.diag(confusion) / 6, accuracy[1])
    # a sequence's tokens reach only its routed domain's group: a right route means its own group only
    right = np.diag(confusion) == 6
    assert (result.own_share[-1][right] == 1.0).all()
    assert "routing acc" in lines[-2] and "router: prototype" in lines[-2]
