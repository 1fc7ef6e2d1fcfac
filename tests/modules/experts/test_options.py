"""Expert options are validated in one place (ExpertOptions.check): the bank kind, the experts strategy and the
upcycled LM reject the same values, each naming the key its users wrote."""

from __future__ import annotations

import copy

import pytest

from continual.modules import ModuleBank
from continual.modules.experts import ExpertOptions, upcycle

pytestmark = pytest.mark.usefixtures("one_cpu_thread")

# (kind options, the strategy's names for them, what every message says)
BAD = [
    ({"n": 0}, {"experts_per_task": 0}, "must be >= 1"),
    ({"k": 0}, {"top_k": 0}, "must be >= 1"),
    ({"expert_hidden": -1}, {"expert_hidden": -1}, "must be >= 0"),
    ({"gate_hidden": 0}, {"gate_hidden": 0}, "must be >= 1"),
    ({"slices": 1}, {"slices": 1}, "must be >= 2"),
    ({"gate": "deep"}, {"gate": "deep"}, "must be one of"),
    ({"upcycle": "split"}, {"upcycle": "split"}, "must be one of"),
    ({"activation": "tanh"}, {"activation": "tanh"}, "must be one of"),
    ({"dispatch": "fast"}, {"dispatch": "fast"}, "must be one of"),
    ({"k": 4, "n": 2}, {"top_k": 4, "experts_per_task": 2}, "exceeds the 1 shared"),
]


def test_defaults_pass_and_the_shared_experts_follow_the_upcycling():
    assert ExpertOptions().check() == ExpertOptions()
    assert ExpertOptions().shared == 1 and ExpertOptions(upcycle="slices", slices=8).shared == 8
    assert ExpertOptions(start_logit=-3).as_kwargs()["start_logit"] == -3.0


def test_messages_name_the_callers_keys():
    with pytest.raises(ValueError, match=r"^experts: k=5 exceeds .* \(raise n or lower k\)$"):
        ExpertOptions(k=5).check()
    keys = {"n": "strategy.experts_per_task", "k": "strategy.top_k"}
    with pytest.raises(ValueError, match=r"^strategy.top_k=5 exceeds .*raise strategy.experts_per_task or lower"):
        ExpertOptions(k=5).check(where="", keys=keys)


@pytest.mark.parametrize("kind_options, strategy_options, message", BAD)
def test_the_kind_the_strategy_and_the_upcycled_lm_reject_the_same_options(tiny_backbone, kind_options,
                                                                           strategy_options, message):
    from transformers import LlamaConfig, LlamaForCausalLM

    from continual.models.backbone import load_backbone
    from continual.models.upcycled_lm import UpcycledExpertsLM
    from strategies.experts import ExpertStrategy

    bert, _ = load_backbone(tiny_backbone["name"], random_init=True, config_overrides=tiny_backbone["config_overrides"])
    with pytest.raises(ValueError, match=f"^experts: .*{message}"):
        upcycle(copy.deepcopy(bert), ModuleBank(), **kind_options)
    key = next(iter(strategy_options)) if len(strategy_options) == 1 else "top_k"
    with pytest.raises(ValueError, match=f"^strategy.{key}.*{message}"):
        ExpertStrategy(**strategy_options)
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1))
    with pytest.raises(ValueError, match=f"^experts: .*{message}"):
        UpcycledExpertsLM(llama, **{"n": 4, **kind_options})
