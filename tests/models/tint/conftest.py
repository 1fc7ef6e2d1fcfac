"""Tiny random causal LMs (GPT-2, Llama and the native ModuleFormer, 2 blocks, width 32) and a byte-level BPE tokenizer trained in
milliseconds on real CL_Benchmark sentences (``make_bpe_tokenizer``, tests/conftest.py), so prompts and label words behave
as with a real GPT-2 tokenizer."""

from __future__ import annotations

import json

import pytest
import torch


@pytest.fixture(autouse=True)
def _every_test_on_one_thread(one_cpu_thread):
    """Every test in this folder runs on one intra-op thread (the fixture is in tests/conftest.py)."""


@pytest.fixture(scope="session")
def bpe_tokenizer(cl_root, make_bpe_tokenizer):
    texts = []
    for task in ("SC/SST-2", "TC/agnews"):
        rows = json.loads((cl_root / task / "train.json").read_text())[:300]
        labels = json.loads((cl_root / task / "labels.json").read_text())
        texts += [row["sentence"] for row in rows] + [" " + label for label in labels] * 50 + ["\nAnswer: Good\n\n"] * 50
    return make_bpe_tokenizer(texts)


def tiny_gpt2(vocab_size: int, dtype=torch.float32, seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(
        n_layer=2, n_embd=32, n_head=2, vocab_size=vocab_size, n_positions=1024, bos_token_id=0, eos_token_id=0
    )
    model = GPT2LMHeadModel(config).to(dtype).eval()
    _spread_norms(model)
    return model


def tiny_llama(vocab_size: int, dtype=torch.float32, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024, bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )
    model = LlamaForCausalLM(config).to(dtype).eval()
    _spread_norms(model)
    return model


def tiny_moduleformer(vocab_size: int, dtype=torch.float32, seed: int = 0):
    """Two blocks of 3 attention / 4 FFN experts (k=2) plus a second group (1 / 2 experts), as after one task."""
    from continual.models.moduleformer import ModuleFormerConfig, ModuleFormerForCausalLM

    torch.manual_seed(seed)
    config = ModuleFormerConfig(
        vocab_size=vocab_size, d_model=32, n_layer=2, n_head=2, head_dim=8, n_att_experts=3, k_att=2, n_ffn_experts=4,
        k_ffn=2, ffn_hidden=32, gate_hidden=16, expert_dispatch="loop", bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )
    model = ModuleFormerForCausalLM(config)
    model.add_experts(2, n_att=1)
    model = model.to(dtype).eval()
    _spread_norms(model)
    return model


def _spread_norms(model) -> None:
    """Random init sets norm weights to 1 and biases to 0; perturb them so that layer-norm terms are exercised."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ln" in name or "norm" in name:
                p.add_(0.1 * torch.randn_like(p))


@pytest.fixture
def gpt2(bpe_tokenizer):
    return tiny_gpt2(len(bpe_tokenizer))


@pytest.fixture
def llama(bpe_tokenizer):
    return tiny_llama(len(bpe_tokenizer))


@pytest.fixture
def moduleformer(bpe_tokenizer):
    return tiny_moduleformer(len(bpe_tokenizer))


@pytest.fixture(params=["gpt2", "llama", "moduleformer"])
def tiny_lm(request, bpe_tokenizer):
    build = {"gpt2": tiny_gpt2, "llama": tiny_llama, "moduleformer": tiny_moduleformer}[request.param]
    return build(len(bpe_tokenizer))
