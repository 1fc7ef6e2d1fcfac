"""Tiny random Llama (causal LM) and BERT models with 4 or 6 layers: enough depth to tie, seconds to run."""

from __future__ import annotations

import pytest
import torch


def tiny_llama(layers: int = 4, tie_embeddings: bool = False):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=tie_embeddings,
    )
    return LlamaForCausalLM(config).eval()


def tiny_bert(layers: int = 4):
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=layers, num_attention_heads=4,
        max_position_embeddings=64,
    )
    model = BertModel(config).eval()
    with torch.no_grad():  # BERT initialises biases and norms to constants; make them differ across layers
        for name, p in model.named_parameters():
            if name.endswith("bias") or "LayerNorm" in name:
                p.add_(0.1 * torch.randn_like(p))
    model.pooler = None  # as load_backbone does
    return model


def batch(n: int = 5, length: int = 9, seed: int = 0, vocab: int = 97):
    """``[n, length]`` ids and a right-padded mask of varying lengths (the first sample is full)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (n, length), generator=gen)
    lengths = torch.randint(3, length + 1, (n,), generator=gen)
    lengths[0] = length
    mask = (torch.arange(length)[None, :] < lengths[:, None]).long()
    return ids * mask, mask


@pytest.fixture
def llama():
    return tiny_llama()


@pytest.fixture
def bert():
    return tiny_bert()


@pytest.fixture(scope="session")
def make_llama():
    return tiny_llama


@pytest.fixture(scope="session")
def make_bert():
    return tiny_bert


@pytest.fixture(scope="session")
def make_batch():
    return batch
