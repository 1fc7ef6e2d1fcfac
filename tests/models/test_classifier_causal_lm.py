"""Classification on a causal LM: a Llama backbone (tiny, random) pooled at its last non-pad token, with per-task or
shared heads, alone and through the whole experiment pipeline."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from continual.models.backbone import load_backbone
from continual.models.classifier import ContinualClassifier

# The same sizes as the tiny BERT of tests/conftest.py, so its backbone.config_overrides apply unchanged to a Llama.
TINY_LLAMA = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 2,
              "intermediate_size": 64, "max_position_embeddings": 64}
LABELS = [("neg", "pos"), ("a", "b", "c", "d")]


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory):
    """A tiny random Llama saved with the offline MiniLM tokenizer (right padding, pad token set)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from continual.models.backbone import resolve_backbone

    tokenizer = AutoTokenizer.from_pretrained(resolve_backbone("minilm"))
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, **TINY_LLAMA))
    folder = tmp_path_factory.mktemp("tiny-llama-classifier")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_last_token_pooling_reads_the_last_real_token_whatever_the_padding(llama_folder):
    backbone, tokenizer = load_backbone(str(llama_folder))
    assert type(backbone).__name__ == "LlamaModel"
    model = ContinualClassifier(backbone.eval(), LABELS, head="task", pooling="last").eval()
    texts = ["short", "a much longer sentence than the first one"]
    x = [torch.stack([enc["input_ids"], enc["attention_mask"]], dim=1) for enc in (
        tokenizer(texts, padding="max_length", max_length=length, truncation=True, return_tensors="pt")
        for length in (16, 40))]
    with torch.no_grad():
        features = model.encode(x[0][:, 0], x[0][:, 1])
        for i, text in enumerate(texts):  # each sentence alone, unpadded: its final hidden state
            ids = tokenizer(text, return_tensors="pt")["input_ids"]
            alone = backbone(input_ids=ids).last_hidden_state[0, -1]
            torch.testing.assert_close(features[i], alone, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model(x[0], 1), model(x[1], 1))  # more right padding changes nothing
        shared = ContinualClassifier(backbone, LABELS, head="shared", pooling="last").eval()
        assert shared(x[0], 1).shape == (2, 6)


@pytest.mark.slow
def test_a_causal_lm_classifies_through_the_pipeline(tiny_experiment, llama_folder):
    """Shared head here; the per-task head goes through the same encoder (above)."""
    from continual.recipes.run import run_experiment

    cfg = tiny_experiment(f"backbone.name={llama_folder}", "backbone.pooling=last", "backbone.head=shared",
                          "training.eval_before_training=false", "tracking.enabled=false")
    result = run_experiment(cfg, echo=lambda _: None)
    assert result.matrix.shape == (2, 2) and np.isfinite(result.matrix).all()
    assert ((0 <= result.matrix) & (result.matrix <= 1)).all()
    assert result.records[0].trainable_parameters > 0
