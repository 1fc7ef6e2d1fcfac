"""The one architecture-family table: every name in an entry exists in a real model of the family, and the bank's
default targets, the FFN fusers, recursive conversion and TinT layouts all read it."""

from __future__ import annotations

import pytest
import torch

from continual.modules import families
from continual.modules.families import FAMILIES, default_targets


def _tiny(family: str):
    import transformers as tf

    torch.manual_seed(0)
    if family == "bert":
        return tf.BertModel(tf.BertConfig(vocab_size=50, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                                          num_attention_heads=2, max_position_embeddings=32))
    if family == "gpt2":
        return tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=50, n_embd=16, n_layer=2, n_head=2, n_positions=32))
    if family == "llama":
        return tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=24,
                                                  num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1))
    return tf.T5EncoderModel(tf.T5Config(vocab_size=50, d_model=16, d_ff=24, d_kv=8, num_layers=2, num_heads=2))


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_every_name_of_an_entry_exists_in_a_model_of_the_family(name):
    model = _tiny(name)
    family = families.family_of(model)
    assert family is FAMILIES[name]
    stacks = [p for p in family.layer_lists if _has(model, p)]
    assert stacks, f"{name}: none of {family.layer_lists}"
    block = model.get_submodule(stacks[0])[0]
    for role in family.projections + family.norms + (family.ffn, family.ffn_act):
        assert _has(block, role), f"{name}: {role} not in a block"
    if family.final_norm:
        assert any(_has(model, p) for p in family.final_norm)


def _has(module, path):
    try:
        module.get_submodule(path)
        return True
    except AttributeError:
        return False


def test_every_consumer_reads_the_table():
    from continual.models.recursive import families as recursive
    from continual.models.tint.layouts import LAYOUTS
    from continual.modules.deltas import DELTA_KINDS
    from continual.modules.experts import ExpertsDelta
    from continual.modules.experts.upcycling import FUSERS

    assert recursive.FAMILIES["llama"] is FAMILIES["llama"] and recursive.FAMILIES["bert"] is FAMILIES["bert"]
    assert LAYOUTS["gpt2"].family is FAMILIES["gpt2"] and LAYOUTS["llama"].family is FAMILIES["llama"]
    assert ExpertsDelta.default_targets == default_targets("ffn") and set(FUSERS) == {"bert", "gpt2", "llama"}
    groups = [default_targets(g) for g in ("query_value", "key_value", "block_outputs", "block_linears",
                                            "block_biases", "last_block_linears", "ffn")]
    for kind, cls in DELTA_KINDS.items():
        if cls.default_targets:
            assert cls.default_targets in groups, f"delta kind {kind!r} keeps its own target table"


def test_an_unknown_model_type_names_the_table():
    with pytest.raises(ValueError, match="model_type 'mamba'.*continual/modules/families.py"):
        families.family_of(type("M", (torch.nn.Module,), {"config": type("C", (), {"model_type": "mamba"})()})())
