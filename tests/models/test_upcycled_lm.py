"""The upcycled causal LM speaks in expert groups; the bank underneath in task slots: the two meet through the one
mapping of continual.modules.experts (group_of_slot / slot_of_group)."""

from __future__ import annotations

import pytest
import torch

from continual.models.upcycled_lm import UpcycledExpertsLM
from continual.modules.experts import SHARED_GROUP, group_of_slot, slot_of_group

pytestmark = pytest.mark.usefixtures("one_cpu_thread")


@pytest.fixture
def model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=1, pad_token_id=0))
    return UpcycledExpertsLM(llama.eval(), n=2, k=2)


def test_groups_are_the_banks_slots_through_the_mapping(model):
    ids = torch.randint(1, 100, (2, 7))
    with torch.no_grad():
        dense = model(ids).logits
    groups = [model.add_experts(2, enabled=False), model.add_experts(2)]
    assert groups == [group_of_slot(0), group_of_slot(1)] and model.bank.n_tasks == 2
    for group in groups:
        params = model.expert_group_parameters(group)
        assert {id(p) for p in params.values()} == {id(p) for p in model.bank.task_parameters(slot_of_group(group))}
    model.set_expert_group_enabled(groups[1], False)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, dense), "every slot off: the dense LM"
    with pytest.raises(ValueError, match=f"group {SHARED_GROUP} is the dense FFN itself"):
        model.set_expert_group_enabled(SHARED_GROUP, False)
