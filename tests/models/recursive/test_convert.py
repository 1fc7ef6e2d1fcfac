"""Conversion to a recursive model: exactness of full-rank relaxation, the SVD error, tying, counts, gradients."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from continual.models.recursive import (
    RelaxedLinear,
    block_index,
    convert_to_recursive,
    parameter_breakdown,
    recursion_of,
    svd_lora_factors,
    truncation_error,
)
from continual.models.recursive.families import family_of

ARCHS = ["llama", "bert"]
INITS = ["stepwise", "average", "lower"]


def build(arch, make_llama, make_bert, layers=4):
    return make_llama(layers) if arch == "llama" else make_bert(layers)


def output(model, ids, mask):
    """Logits of a causal LM, last hidden states of an encoder."""
    out = model(input_ids=ids, attention_mask=mask)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def layers_of(model):
    return model.model.layers if hasattr(model, "model") else model.encoder.layer


def proj_names(model):
    return family_of(model).projections


# ---------------------------------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("init", INITS)
def test_one_loop_with_full_rank_svd_reproduces_the_original(arch, init, make_llama, make_bert, make_batch):
    model = build(arch, make_llama, make_bert)
    ids, mask = make_batch()
    before = output(model, ids, mask)
    convert_to_recursive(model, num_loops=1, init=init, rank=10_000, lora_init="svd")
    assert torch.allclose(output(model, ids, mask), before, atol=1e-5)


@pytest.mark.parametrize(
    "arch, init, sharing",
    [(arch, init, "cycle") for arch in ARCHS for init in INITS] + [("llama", "average", "sequence"), ("bert", "stepwise", "sequence")],
)
def test_two_loops_with_full_rank_svd_and_own_norms_reproduce_the_original(arch, init, sharing, make_llama, make_bert, make_batch):
    """The non-trivial case: every depth's weight differs from its shared block and the LoRA makes up all of it."""
    model = build(arch, make_llama, make_bert)
    ids, mask = make_batch()
    before = output(model, ids, mask)
    convert_to_recursive(model, num_loops=2, sharing=sharing, init=init, rank=10_000, share_norms=False, share_biases=False)
    layers = layers_of(model)
    assert layers[0].get_submodule(proj_names(model)[0]).weight is layers[block_index(4, 2, sharing).index(0, 1)].get_submodule(proj_names(model)[0]).weight
    assert torch.allclose(output(model, ids, mask), before, atol=1e-4)


@pytest.mark.parametrize("arch", ARCHS)
def test_plain_recursive_model_differs_from_the_original(arch, make_llama, make_bert, make_batch):
    """Guards the exactness tests: without the relaxation, tying does change the outputs."""
    model = build(arch, make_llama, make_bert)
    ids, mask = make_batch()
    before = output(model, ids, mask)
    convert_to_recursive(model, num_loops=2, init="average")
    assert not torch.allclose(output(model, ids, mask), before, atol=1e-3)


def test_zero_init_relaxation_starts_at_the_plain_recursive_model(make_llama, make_batch):
    ids, mask = make_batch()
    plain = convert_to_recursive(make_llama(), num_loops=2, init="average")
    relaxed = convert_to_recursive(make_llama(), num_loops=2, init="average", rank=4, lora_init="zero")
    assert torch.equal(output(plain, ids, mask), output(relaxed, ids, mask))
    q = relaxed.model.layers[3].self_attn.q_proj
    assert isinstance(q, RelaxedLinear) and q.relax_A.abs().sum() > 0 and torch.count_nonzero(q.relax_B) == 0


# ---------------------------------------------------------------------------------------------------- SVD error
def test_svd_factors_error_is_the_norm_of_the_discarded_singular_values():
    torch.manual_seed(0)
    residual = torch.randn(24, 40)
    singular = torch.linalg.svdvals(residual)
    for rank in (1, 5, 12, 24):
        A, B = svd_lora_factors(residual, rank)
        assert A.shape == (rank, 40) and B.shape == (24, rank)
        discarded = math.sqrt(sum(float(s) ** 2 for s in singular[rank:]))
        assert float(torch.linalg.norm(residual - B @ A)) == pytest.approx(discarded, abs=1e-4)
        assert truncation_error(residual, rank) == pytest.approx(discarded, abs=1e-5)
    with pytest.raises(ValueError, match="rank must be in"):
        svd_lora_factors(residual, 25)


@pytest.mark.parametrize("init", INITS)
def test_rank_r_relaxation_error_per_depth_equals_the_discarded_singular_values(init, make_llama):
    original = make_llama()
    weights = [{p: layer.get_submodule(p).weight.detach().clone() for p in proj_names(original)} for layer in original.model.layers]
    model = convert_to_recursive(copy.deepcopy(original), num_loops=2, init=init, rank=3)
    for depth, layer in enumerate(model.model.layers):
        for proj in proj_names(model):
            linear = layer.get_submodule(proj)
            assert isinstance(linear, RelaxedLinear) and linear.rank == 3
            residual = weights[depth][proj] - linear.weight.detach()
            singular = torch.linalg.svdvals(residual)
            expected = float(singular[3:].square().sum().sqrt())
            error = float(torch.linalg.norm(weights[depth][proj] - linear.effective_weight().detach()))
            assert error == pytest.approx(expected, rel=1e-4, abs=1e-5)


# ---------------------------------------------------------------------------------------------------- tying
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("sharing", ["cycle", "sequence"])
def test_tied_parameters_are_the_same_storage_exactly_where_the_map_says(arch, sharing, make_llama, make_bert):
    model = convert_to_recursive(build(arch, make_llama, make_bert, layers=6), num_loops=3, sharing=sharing, rank=2)
    layers, index = layers_of(model), block_index(6, 3, sharing)
    for a in range(6):
        for b in range(a + 1, 6):
            for proj in proj_names(model):
                wa, wb = layers[a].get_submodule(proj), layers[b].get_submodule(proj)
                same = wa.weight.data_ptr() == wb.weight.data_ptr()
                assert same == (index[a] == index[b]), (a, b, proj)
                assert (wa.weight is wb.weight) == same
                assert wa.relax_A.data_ptr() != wb.relax_A.data_ptr()  # the relaxation is per depth
            for (name, pa), (_, pb) in zip(layers[a].named_parameters(), layers[b].named_parameters()):
                if "relax_" not in name:
                    assert (pa is pb) == (index[a] == index[b]), name


@pytest.mark.parametrize("arch", ARCHS)
def test_parameter_count_is_k_layers_plus_lora(arch, make_llama, make_bert):
    original = build(arch, make_llama, make_bert, layers=6)
    layer_params = sum(p.numel() for p in layers_of(original)[0].parameters())
    other = sum(p.numel() for p in original.parameters()) - 6 * layer_params
    shapes = {p: layers_of(original)[0].get_submodule(p).weight.shape for p in proj_names(original)}
    ranks = {proj_names(original)[0]: 5, proj_names(original)[-1]: 0}  # per-module ranks: one larger, one off
    model = convert_to_recursive(original, num_loops=3, rank=2, ranks=ranks)
    r = {p: ranks.get(p, 2) for p in shapes}
    lora = 6 * sum(r[p] * (o + i) for p, (o, i) in shapes.items())
    assert sum(p.numel() for p in model.parameters()) == other + 2 * layer_params + lora
    assert parameter_breakdown(model) == {
        "blocks": 2 * layer_params, "per_depth": 0, "relaxation": lora, "other": other,
        "total": other + 2 * layer_params + lora,
    }
    last = layers_of(model)[0].get_submodule(proj_names(model)[-1])
    assert type(last) is nn.Linear  # rank 0: tied but not relaxed


def test_untied_norms_are_counted_per_depth(make_llama):
    model = convert_to_recursive(make_llama(4), num_loops=2, share_norms=False)
    assert parameter_breakdown(model)["per_depth"] == 4 * 2 * 32  # two RMSNorm weights of width 32 per depth


def test_tied_embeddings_stay_tied_and_counted_once(make_llama):
    model = convert_to_recursive(make_llama(4, tie_embeddings=True), num_loops=2)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert parameter_breakdown(model)["other"] == 97 * 32 + 32  # embeddings (= LM head) and the final norm


def test_gradients_of_tied_weights_accumulate_across_loops(make_llama, make_batch):
    """The tied weight's gradient equals the sum of the gradients each depth would get with its own copy."""
    tied = convert_to_recursive(make_llama(4), num_loops=2, init="average", rank=2)
    untied = copy.deepcopy(tied)
    for layer in untied.model.layers:  # give every depth its own copy of every shared tensor
        for name, p in list(layer.named_parameters()):
            owner, _, attr = name.rpartition(".")
            setattr(layer.get_submodule(owner), attr, nn.Parameter(p.detach().clone()))
    ids, mask = make_batch()
    for model in (tied, untied):
        model(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
    index = block_index(4, 2, "cycle")
    for proj in ("self_attn.q_proj", "mlp.down_proj"):
        for k in range(2):
            depths = [d for d in range(4) if index[d] == k]
            shared_grad = tied.model.layers[depths[0]].get_submodule(proj).weight.grad
            summed = sum(untied.model.layers[d].get_submodule(proj).weight.grad for d in depths)
            assert torch.allclose(shared_grad, summed, atol=1e-6)
            assert not torch.allclose(shared_grad, untied.model.layers[depths[0]].get_submodule(proj).weight.grad, atol=1e-6)
        # The relaxation is per depth: each depth's factors get exactly their own gradient.
        for d in range(4):
            a, b = tied.model.layers[d].get_submodule(proj), untied.model.layers[d].get_submodule(proj)
            assert torch.allclose(a.relax_B.grad, b.relax_B.grad, atol=1e-6)


# ---------------------------------------------------------------------------------------------------- HF paths
def test_converted_causal_lm_generates_like_the_original_when_exact(make_llama, make_batch):
    original = make_llama(4)
    ids, _ = make_batch(n=1)
    expected = original.generate(ids, max_new_tokens=6, do_sample=False)
    model = convert_to_recursive(copy.deepcopy(original), num_loops=2, init="stepwise", rank=10_000, share_norms=False)
    assert torch.equal(model.generate(ids, max_new_tokens=6, do_sample=False), expected)
    plain = convert_to_recursive(copy.deepcopy(original), num_loops=2)
    assert plain.generate(ids, max_new_tokens=6, do_sample=False).shape == expected.shape  # the cache path runs


def test_recursion_settings_are_recorded_in_the_config(make_bert):
    model = convert_to_recursive(make_bert(4), num_loops=2, sharing="sequence", init="lower", rank=4, ranks={"query": 50})
    rec = recursion_of(model)
    assert rec["num_loops"] == 2 and rec["sharing"] == "sequence" and rec["init"] == "lower"
    assert rec["ranks"]["attention.self.query"] == 32  # capped at full rank (min(32, 32))
    assert rec["ranks"]["attention.self.key"] == 4 and rec["model_class"] == "BertModel" and rec["pooler"] is False
    assert model.config.to_dict()["recursion"] == rec


# ---------------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"num_loops": 3}, "does not divide"),
        ({"sharing": "ring"}, "sharing must be one of"),
        ({"init": "upper"}, "init must be one of"),
        ({"lora_init": "pissa"}, "lora_init must be one of"),
        ({"rank": -1}, "rank must be >= 0"),
        ({"rank": 2, "ranks": {"wq": 4}}, "'wq' names no llama projection"),
        ({"rank": 2, "targets": ["attention.self.query"]}, "names no llama projection"),
    ],
)
def test_bad_options_fail_with_a_clear_message(kwargs, match, make_llama):
    with pytest.raises(ValueError, match=match):
        convert_to_recursive(make_llama(4), **kwargs)


def test_unsupported_architecture_and_double_conversion(make_llama):
    from transformers import GPT2Config, GPT2Model

    with pytest.raises(ValueError, match="does not support model_type 'gpt2'"):
        convert_to_recursive(GPT2Model(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=50)))
    model = convert_to_recursive(make_llama(4), num_loops=2)
    with pytest.raises(ValueError, match="already recursive"):
        convert_to_recursive(model, num_loops=2)


def test_targets_limit_the_relaxation(make_llama):
    model = convert_to_recursive(make_llama(4), num_loops=2, rank=2, targets=["q_proj", "mlp.up_proj"])
    layer = model.model.layers[1]
    assert isinstance(layer.self_attn.q_proj, RelaxedLinear) and isinstance(layer.mlp.up_proj, RelaxedLinear)
    assert type(layer.self_attn.k_proj) is nn.Linear and type(layer.mlp.down_proj) is nn.Linear
