"""Saving and loading recursive models: safetensors with shared tensors once, tying rebuilt from the config."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from continual.models.recursive import convert_to_recursive, load_recursive, recursion_of, save_recursive


def test_round_trip_restores_outputs_and_tying(tmp_path, make_llama, make_batch):
    model = convert_to_recursive(make_llama(4, tie_embeddings=True), num_loops=2, init="average", rank=3, ranks={"down_proj": 0})
    with torch.no_grad():  # move away from the init so that loading the right values matters
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    ids, mask = make_batch()
    expected = model(input_ids=ids, attention_mask=mask).logits
    save_recursive(model, tmp_path / "rec")

    loaded = load_recursive(tmp_path / "rec")
    assert torch.allclose(loaded(input_ids=ids, attention_mask=mask).logits, expected, atol=1e-6)
    assert recursion_of(loaded) == recursion_of(model)
    layers = loaded.model.layers
    assert layers[0].self_attn.q_proj.weight is layers[2].self_attn.q_proj.weight
    assert layers[0].input_layernorm.weight is layers[2].input_layernorm.weight
    assert layers[0].self_attn.q_proj.weight is not layers[1].self_attn.q_proj.weight
    assert layers[0].self_attn.q_proj.relax_A is not layers[2].self_attn.q_proj.relax_A
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert sum(p.numel() for p in loaded.parameters()) == sum(p.numel() for p in model.parameters())


def test_the_file_stores_each_shared_tensor_once(tmp_path, make_llama):
    model = convert_to_recursive(make_llama(4), num_loops=2, rank=2)
    save_recursive(model, tmp_path / "rec")
    tensors = load_file(str(tmp_path / "rec" / "model.safetensors"))
    assert sum(t.numel() for t in tensors.values()) == sum(p.numel() for p in model.parameters())
    assert "model.layers.0.self_attn.q_proj.weight" in tensors and "model.layers.2.self_attn.q_proj.weight" not in tensors
    assert "model.layers.2.self_attn.q_proj.relax_A" in tensors  # per-depth tensors are all there
    config = json.loads((tmp_path / "rec" / "config.json").read_text())
    assert config["recursion"]["num_loops"] == 2 and config["num_hidden_layers"] == 4
    with safe_open(str(tmp_path / "rec" / "model.safetensors"), framework="pt") as handle:
        assert json.loads(handle.metadata()["recursion"]) == config["recursion"]


def test_encoder_without_pooler_round_trips(tmp_path, make_bert, make_batch):
    model = convert_to_recursive(make_bert(4), num_loops=2, sharing="sequence", rank=2, share_biases=False)
    ids, mask = make_batch()
    expected = model(input_ids=ids, attention_mask=mask).last_hidden_state
    save_recursive(model, tmp_path / "bert")
    loaded = load_recursive(tmp_path / "bert")
    assert loaded.pooler is None
    assert torch.allclose(loaded(input_ids=ids, attention_mask=mask).last_hidden_state, expected, atol=1e-6)
    a, b = loaded.encoder.layer[0].attention.self.query, loaded.encoder.layer[1].attention.self.query
    assert a.weight is b.weight and a.bias is not b.bias  # sequence sharing; biases kept per depth


def test_loading_checks_the_folder(tmp_path, make_llama):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_recursive(tmp_path)
    plain = make_llama(4)
    with pytest.raises(ValueError, match="not recursive"):
        save_recursive(plain, tmp_path / "plain")
    model = convert_to_recursive(make_llama(4), num_loops=2, rank=2)
    folder = save_recursive(model, tmp_path / "rec")
    tensors = load_file(str(folder / "model.safetensors"))
    tensors.pop("model.layers.1.mlp.up_proj.relax_B")
    tensors["model.layers.3.self_attn.q_proj.weight"] = torch.zeros(32, 32)  # an alias must not be stored
    save_file(tensors, str(folder / "model.safetensors"))
    with pytest.raises(ValueError, match=r"missing \['model.layers.1.mlp.up_proj.relax_B'\], unexpected \['model.layers.3"):
        load_recursive(folder)
    plain.config.save_pretrained(tmp_path / "plain")
    save_file({"x": torch.zeros(1)}, str(tmp_path / "plain" / "model.safetensors"))
    with pytest.raises(ValueError, match="no 'recursion' settings"):
        load_recursive(tmp_path / "plain")
