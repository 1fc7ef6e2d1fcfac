import pytest
import torch

from continual.models.backbone import BackboneError, load_backbone, resolve_backbone
from continual.models.classifier import ContinualClassifier, TaskHeads

LABELS = [("neg", "pos"), ("a", "b", "c", "d"), ("pos", "neg", "neutral")]


@pytest.fixture(scope="module")
def tiny(tiny_backbone):
    torch.manual_seed(0)
    backbone, tokenizer = load_backbone(
        tiny_backbone["name"], random_init=True, config_overrides=tiny_backbone["config_overrides"]
    )
    return backbone, tokenizer


def batch(tokenizer, texts, length=24):
    enc = tokenizer(texts, padding="max_length", truncation=True, max_length=length, return_tensors="pt")
    return torch.stack([enc["input_ids"], enc["attention_mask"]], dim=1)


def test_minilm_short_name_resolves_to_the_shipped_folder():
    path = resolve_backbone("minilm")
    assert path.endswith("model")
    assert (__import__("pathlib").Path(path) / "config.json").is_file()


def test_unreachable_hub_model_fails_with_a_way_out(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(BackboneError) as err:
        load_backbone("someone/not-a-cached-model")
    message = str(err.value)
    assert "someone/not-a-cached-model" in message and "local folder" in message and "HF_HUB_OFFLINE" in message


def test_unknown_config_override_names_the_key():
    with pytest.raises(BackboneError, match="backbone.config_overrides.num_layerz"):
        load_backbone("minilm", random_init=True, config_overrides={"num_layerz": 2})


def test_local_folder_without_config_is_rejected(tmp_path):
    with pytest.raises(BackboneError, match="config.json"):
        resolve_backbone(str(tmp_path))


def test_padding_trim_does_not_change_outputs(tiny):
    backbone, tokenizer = tiny
    model = ContinualClassifier(backbone, LABELS, head="task").eval()
    texts = ["a short one", "a slightly longer sentence than the first"]
    short, long = batch(tokenizer, texts, 16), batch(tokenizer, texts, 48)
    tasks = torch.tensor([0, 0])
    torch.testing.assert_close(model(short, tasks), model(long, tasks))


@pytest.mark.parametrize("pooling", ["mean", "cls", "last"])
def test_mixed_task_batch_equals_per_task_batches(tiny, pooling):
    backbone, tokenizer = tiny
    model = ContinualClassifier(backbone, LABELS, head="task", pooling=pooling).eval()
    texts = ["one", "two words", "three words here", "four words are here", "five"]
    x = batch(tokenizer, texts)
    tasks = torch.tensor([0, 1, 2, 1, 0])
    mixed = model(x, tasks)
    assert mixed.shape == (5, 4)
    for t in range(3):
        rows = (tasks == t).nonzero(as_tuple=True)[0]
        alone = model(x[rows], t)
        torch.testing.assert_close(mixed[rows], alone)
        width = len(LABELS[t])
        assert torch.isinf(mixed[rows, width:]).all(), "padding logits beyond a task's labels must be -inf"


def test_shared_head_maps_labels_to_the_union_and_masks_unseen(tiny):
    backbone, tokenizer = tiny
    heads = TaskHeads(8, LABELS, mode="shared")
    assert heads.shared_labels == ["neg", "pos", "a", "b", "c", "d", "neutral"]
    assert heads.target_index(2) == [1, 0, 6]
    features = torch.randn(3, 8)
    unmasked = heads(features, torch.zeros(3, dtype=torch.long))
    assert torch.isfinite(unmasked).all(), "nothing is masked before any task has been seen"
    heads.activate(0)
    logits = heads(features, torch.zeros(3, dtype=torch.long))
    assert torch.isfinite(logits[:, :2]).all() and torch.isinf(logits[:, 2:]).all()
    heads.activate(2)
    assert torch.isfinite(heads(features, torch.zeros(3, dtype=torch.long))[:, [0, 1, 6]]).all()


def test_bert_pooler_is_dropped(tiny):
    backbone, _ = tiny
    assert getattr(backbone, "pooler", None) is None
    assert not any("pooler" in name for name, _ in backbone.named_parameters())


def test_roberta_family_backbone_from_a_local_folder(tmp_path, tiny):
    """Any Hugging Face encoder works from a local folder: a tiny RoBERTa written with save_pretrained."""
    from transformers import RobertaConfig, RobertaModel

    _, tokenizer = tiny
    config = RobertaConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=80, pad_token_id=tokenizer.pad_token_id,
    )
    RobertaModel(config).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    backbone, loaded_tokenizer = load_backbone(str(tmp_path))
    assert type(backbone).__name__ == "RobertaModel" and getattr(backbone, "pooler", None) is None
    model = ContinualClassifier(backbone, LABELS, head="shared", pooling="cls").eval()
    logits = model(batch(loaded_tokenizer, ["local roberta", "works offline"]), torch.tensor([0, 2]))
    assert logits.shape == (2, 7) and torch.isfinite(logits).all()


# ---------------------------------------------------------------------------------------------------- stacked heads
def test_per_task_heads_are_read_from_one_stack_kept_with_their_parameters():
    """Many heads: a batch gathers its samples' heads from the stack (each head's weight and bias are views of their
    rows); writes, loads, conversions and copies keep it right; only a head that trains gets a gradient."""
    import copy

    from continual.modules.deltas.stacking import are_views_of

    torch.manual_seed(0)
    labels = [tuple(f"l{c}" for c in range(2 + t % 3)) for t in range(30)]
    heads = TaskHeads(8, labels)
    features, tasks = torch.randn(5, 8), torch.tensor([3, 17, 3, 29, 0])

    def reference(module):
        out = torch.full((5, 4), float("-inf"))
        for b, t in enumerate(tasks.tolist()):
            head = module.heads[t]
            out[b, : head.out_features] = features[b] @ head.weight.T + head.bias
        return out

    with torch.no_grad():
        torch.testing.assert_close(heads(features, tasks), reference(heads))
        weights, biases, _ = heads._stacked()
        assert are_views_of([h.weight for h in heads.heads], weights) and weights.shape == (30, 4, 8)
        heads.heads[17].weight.mul_(3.0)  # an in-place write lands in the stack
        torch.testing.assert_close(heads(features, tasks), reference(heads))
        other = TaskHeads(8, labels)
        heads.load_state_dict(other.state_dict(), assign=True)
        torch.testing.assert_close(heads(features, tasks), reference(other))
        heads.double()
        torch.testing.assert_close(heads(features.double(), tasks), reference(other).double())
        heads.float()
        twin = copy.deepcopy(heads)
        twin.heads[3].bias.add_(1.0)
        torch.testing.assert_close(heads(features, tasks), reference(other))

    for p in heads.parameters():
        p.requires_grad_(False)
    heads.heads[3].requires_grad_(True)
    heads(features, tasks)[tasks == 3, :2].sum().backward()
    assert heads.heads[3].weight.grad is not None and heads.heads[3].bias.grad is not None
    assert [i for i, h in enumerate(heads.heads) if h.weight.grad is not None] == [3]
    torch.testing.assert_close(heads.heads[3].weight.grad, features[tasks == 3].sum(0).expand(2, 8))
