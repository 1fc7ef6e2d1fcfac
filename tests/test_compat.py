"""The compatibility module: each call into transformers that has no stable public form, checked against the model's
own forward (so a release that changes the mask format fails here, naming the function)."""

from __future__ import annotations

import pytest
import torch

from continual import compat
from continual.models.recursive import families


def _tiny_bert(attn: str):
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(vocab_size=50, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                        num_attention_heads=2, max_position_embeddings=32, attn_implementation=attn)
    return BertModel(config, add_pooling_layer=False).eval()


def _tiny_llama(attn: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                         attn_implementation=attn)
    return LlamaForCausalLM(config).eval()


def _padded_batch():
    ids = torch.randint(1, 50, (3, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3, [1] * 2 + [0] * 5])
    return ids * mask, mask


def _layer_by_layer(model, ids, mask):
    family = families.family_of(model)
    hidden = families.embed(model, family, ids)
    kwargs = families.layer_kwargs(model, family, hidden, mask)
    for layer in model.get_submodule(families.layer_list_path(model, family)):
        hidden = families.run_layer(layer, hidden, kwargs)
    return hidden


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_bidirectional_mask_reproduces_the_encoder_forward(attn):
    model = _tiny_bert(attn)
    ids, mask = _padded_batch()
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).last_hidden_state
        ours = _layer_by_layer(model, ids, mask)
    real = mask.bool()
    torch.testing.assert_close(ours[real], expected[real], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_causal_mask_reproduces_the_decoder_forward(attn):
    model = _tiny_llama(attn)
    ids, mask = _padded_batch()
    with torch.no_grad():
        expected = model.model(input_ids=ids, attention_mask=mask).last_hidden_state
        before_norm = _layer_by_layer(model, ids, mask)
        ours = model.model.norm(before_norm)
    real = mask.bool()
    torch.testing.assert_close(ours[real], expected[real], atol=1e-5, rtol=1e-5)


def test_arguments_are_spelt_as_the_installed_function_spells_them():
    def new_style(config, inputs_embeds, attention_mask, cache, position_ids=None):
        return ("new", inputs_embeds, cache)

    def old_style(config, input_embeds, attention_mask, past_key_values, position_ids=None):
        return ("old", input_embeds, past_key_values)

    def no_cache(config, inputs_embeds, attention_mask):
        return ("none", inputs_embeds)

    args = dict(config=None, inputs_embeds=1, attention_mask=None, cache=None)
    assert compat._call(new_style, **args) == ("new", 1, None)
    assert compat._call(old_style, **args) == ("old", 1, None)
    assert compat._call(no_cache, **args) == ("none", 1)

    def renamed_away(config, embeddings, attention_mask):
        pass

    with pytest.raises(compat.UnsupportedTransformersError, match="inputs_embeds"):
        compat._call(renamed_away, **args)


def test_a_missing_api_fails_naming_the_transformers_version(monkeypatch):
    import transformers.masking_utils as masking_utils

    monkeypatch.delattr(masking_utils, "create_causal_mask")
    with pytest.raises(compat.UnsupportedTransformersError) as error:
        compat.causal_mask(None, torch.zeros(1, 2, 4), torch.ones(1, 2), torch.arange(2)[None])
    assert compat.transformers_version() in str(error.value) and "create_causal_mask" in str(error.value)


def test_attention_interface_dispatch_is_detected():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=16, n_layer=1, n_head=2, n_positions=16))
    assert compat.dispatches_attention_interface(gpt2)
    assert compat.attn_implementation(gpt2) in ("eager", "sdpa")
    assert not compat.dispatches_attention_interface(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_a_decoder_continues_its_own_cache_padded_and_with_rows_repeated(attn):
    """What label-word scoring does: a padded prompt pass with a cache, rows picked (and repeated) from it, then the next
    tokens at their real positions equal one pass over each whole unpadded sequence."""
    model = _tiny_llama(attn)
    ids, mask = _padded_batch()
    nxt = torch.tensor([[5, 6], [7, 8], [9, 10], [11, 12]])  # two more tokens for rows 0, 1, 2, 1
    rows = torch.tensor([0, 1, 2, 1])
    with torch.no_grad():
        _, cache = compat.decoder_forward(model.model, input_ids=ids, attention_mask=mask, use_cache=True)
        cache.batch_select_indices(rows)
        real = mask.sum(1)[rows]
        ours, _ = compat.decoder_forward(
            model.model, cache=cache, input_ids=nxt, attention_mask=torch.cat([mask[rows], torch.ones(4, 2, dtype=mask.dtype)], 1),
            position_ids=real[:, None] + torch.arange(2),
        )
        for i, r in enumerate(rows.tolist()):
            whole = torch.cat([ids[r, : mask[r].sum()], nxt[i]])[None]
            expected, none = compat.decoder_forward(model.model, input_ids=whole)
            assert none is None
            torch.testing.assert_close(ours[i], expected[0, -2:], atol=1e-5, rtol=1e-5)
    with pytest.raises(compat.UnsupportedTransformersError, match="cache"):
        compat.decoder_forward(torch.nn.Identity(), use_cache=True, input=torch.zeros(1))


def test_avalanche_builds_unsharded_loaders_while_torch_distributed_is_up(tmp_path):
    """Once torch.distributed is initialised, Avalanche's loaders shard with a DistributedSampler by themselves; a
    data-parallel run turns that off (it shards each global batch itself)."""
    import torch.distributed as dist
    from avalanche.benchmarks.utils.data_loader import TaskBalancedDataLoader

    from streams.avalanche import dataset_from_tensors

    data = dataset_from_tensors(torch.zeros(6, 2, 3, dtype=torch.long), torch.arange(6) % 2, torch.zeros(6))
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        assert TaskBalancedDataLoader(data, batch_size=2).distributed_sampling  # Avalanche's own behaviour
        with compat.avalanche_sees_one_process():
            assert not TaskBalancedDataLoader(data, batch_size=2).distributed_sampling
        assert TaskBalancedDataLoader(data, batch_size=2).distributed_sampling  # restored
    finally:
        dist.destroy_process_group()
