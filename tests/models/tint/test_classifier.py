"""Label words, prompts and the TinT classifier: batched answers over queries of different tasks equal answers
one query at a time; a zero step is plain in-context learning; tasks without a context are answered zero-shot."""

from __future__ import annotations

import json

import pytest
import torch

from continual.models.tint.classifier import TinTClassifier, label_logprobs
from continual.models.tint.label_words import LabelWordError, label_word_ids
from continual.models.tint.one_step import InnerStep, applied, one_step_update
from continual.models.tint.prompts import PromptFormat, assemble_queries, build_context, strip_queries


def test_label_words_default_to_the_first_token_of_the_label(bpe_tokenizer):
    ids = label_word_ids(bpe_tokenizer, ["Good", "Bad"], task="SST-2")
    assert ids == [bpe_tokenizer(" Good", add_special_tokens=False)["input_ids"][0],
                   bpe_tokenizer(" Bad", add_special_tokens=False)["input_ids"][0]]
    assert ids[0] != ids[1]
    overridden = label_word_ids(bpe_tokenizer, ["Good", "Bad"], {"Bad": "World"}, task="SST-2")
    assert overridden[1] == bpe_tokenizer(" World", add_special_tokens=False)["input_ids"][0]


def test_colliding_label_words_are_a_clear_error(bpe_tokenizer):
    with pytest.raises(LabelWordError, match=r"'very negative' and 'very positive' both start with.*strategy.label_words.yelp"):
        label_word_ids(bpe_tokenizer, ["very negative", "negative", "very positive"], task="yelp")
    with pytest.raises(LabelWordError, match="not labels of task"):
        label_word_ids(bpe_tokenizer, ["Good", "Bad"], {"Great": "x"}, task="SST-2")


def test_prompt_format_and_context(bpe_tokenizer):
    fmt = PromptFormat.from_tokenizer(bpe_tokenizer, max_example_tokens=5)
    assert fmt.lead == ()  # a GPT-2-style tokenizer adds nothing around a text
    assert fmt.infix == tuple(bpe_tokenizer("\nAnswer:", add_special_tokens=False)["input_ids"])
    texts = ["Text: a delightful film that never ends", "Text: dull"]
    ctx = build_context(fmt, bpe_tokenizer, texts, [11, 12], max_tokens=1000)
    assert ctx.shots == 2
    assert ctx.ids[ctx.label_mask].tolist() == [11, 12]
    first = bpe_tokenizer(texts[0], add_special_tokens=False)["input_ids"][:5]  # truncated example
    assert ctx.ids[: len(first)].tolist() == first
    assert ctx.loss_mask("label_words").sum() == 2 and not ctx.loss_mask("context")[0]
    short = build_context(fmt, bpe_tokenizer, texts, [11, 12], max_tokens=len(first) + len(fmt.infix) + 1 + len(fmt.separator))
    assert short.shots == 1  # the second example did not fit


def test_strip_and_assemble_queries_without_a_loop(bpe_tokenizer):
    pad = bpe_tokenizer.pad_token_id
    ids = torch.tensor([[5, 6, 7, pad], [9, pad, pad, pad]])
    mask = (ids != pad).long()
    ids[1, 0], mask[1, 0] = 9, 1
    x = torch.stack([ids, mask], 1)
    queries, lengths = strip_queries(x, [pad], pad)
    assert lengths.tolist() == [3, 1]
    out, out_mask = assemble_queries(torch.tensor([1, 2]), queries, lengths, [40, 41], pad)
    assert out[0].tolist() == [1, 2, 5, 6, 7, 40, 41]
    assert out[1, : out_mask[1].sum()].tolist() == [1, 2, 9, 40, 41]
    assert out_mask.sum(1).tolist() == [7, 5]


@pytest.fixture
def two_task_classifier(tiny_lm, bpe_tokenizer, cl_root):
    """A classifier over SST-2 and agnews with 4-shot contexts from their training data; test queries as the stream
    tokenizes them (right-padded to 24 tokens)."""
    fmt = PromptFormat.from_tokenizer(bpe_tokenizer, max_example_tokens=16)
    tasks = {}
    for name, folder in (("SST-2", "SC/SST-2"), ("agnews", "TC/agnews")):
        labels = json.loads((cl_root / folder / "labels.json").read_text())
        train = json.loads((cl_root / folder / "train.json").read_text())[:4]
        test = json.loads((cl_root / folder / "test.json").read_text())[:3]
        tasks[name] = (labels, train, test)
    label_ids = [label_word_ids(bpe_tokenizer, labels, task=name) for name, (labels, _, _) in tasks.items()]
    model = TinTClassifier(tiny_lm, fmt, label_ids, InnerStep(lr=0.5, layers=1), loss="context")
    for index, (labels, train, _) in enumerate(tasks.values()):
        ctx = build_context(fmt, bpe_tokenizer, [r["sentence"] for r in train],
                            [label_ids[index][labels.index(r["label"])] for r in train], max_tokens=120)
        model.set_context(index, ctx)
    texts = [r["sentence"] for _, _, test in tasks.values() for r in test]
    enc = bpe_tokenizer(texts, padding="max_length", truncation=True, max_length=24, return_tensors="pt")
    x = torch.stack([enc["input_ids"], enc["attention_mask"]], 1)
    task_labels = torch.tensor([0] * 3 + [1] * 3)
    perm = torch.randperm(6, generator=torch.Generator().manual_seed(0))  # mix the tasks inside the batch
    return model, x[perm], task_labels[perm]


def test_batched_queries_of_different_tasks_equal_one_query_at_a_time(two_task_classifier):
    model, x, task_labels = two_task_classifier
    batched = model(x, task_labels)
    assert batched.shape == (6, 4)
    assert torch.isinf(batched[task_labels == 0, 2:]).all() and torch.isfinite(batched[task_labels == 0, :2]).all()
    single = torch.cat([model(x[i : i + 1], task_labels[i : i + 1]) for i in range(6)])
    torch.testing.assert_close(batched, single, rtol=1e-4, atol=1e-4)


def test_the_step_changes_answers_and_zero_lr_is_plain_in_context_learning(two_task_classifier):
    model, x, task_labels = two_task_classifier
    stepped = model(x, task_labels)
    model.step = InnerStep(lr=0.0, layers=1)
    plain = model(x, task_labels)
    assert not torch.allclose(stepped[torch.isfinite(stepped)], plain[torch.isfinite(plain)], atol=1e-5)
    # plain ICL computed directly: context + query + infix, no update
    task = int(task_labels[0])
    queries, lengths = strip_queries(x[:1], model.fmt.special_ids, model.fmt.pad_id)
    ids, mask = assemble_queries(model.contexts[task].ids, queries, lengths, model.fmt.infix, model.fmt.pad_id)
    with torch.no_grad():
        direct = label_logprobs(model.lm, ids, mask, model.heads.label_ids[task])
    torch.testing.assert_close(plain[0, : direct.shape[1]], direct[0])


def test_the_step_matches_an_explicit_update_on_the_task_context(two_task_classifier):
    model, x, task_labels = two_task_classifier
    task = int(task_labels[0])
    ctx = model.contexts[task]
    update = one_step_update(model.lm, ctx.ids[None], torch.ones_like(ctx.ids)[None], ctx.loss_mask("context")[None], model.step)
    queries, lengths = strip_queries(x[:1], model.fmt.special_ids, model.fmt.pad_id)
    ids, mask = assemble_queries(ctx.ids, queries, lengths, model.fmt.infix, model.fmt.pad_id)
    with torch.no_grad(), applied(update):
        expected = label_logprobs(model.lm, ids, mask, model.heads.label_ids[task])
    torch.testing.assert_close(model(x[:1], task_labels[:1])[0, : expected.shape[1]], expected[0])


def test_a_task_without_context_is_answered_zero_shot(two_task_classifier):
    model, x, task_labels = two_task_classifier
    del model.contexts[1]
    before = {k: v.clone() for k, v in model.lm.state_dict().items()}
    out = model(x, task_labels)
    rows = (task_labels == 1).nonzero(as_tuple=True)[0]
    queries, lengths = strip_queries(x[rows], model.fmt.special_ids, model.fmt.pad_id)
    ids, mask = assemble_queries(torch.tensor(model.fmt.lead, dtype=torch.long), queries, lengths, model.fmt.infix, model.fmt.pad_id)
    with torch.no_grad():
        zero_shot = label_logprobs(model.lm, ids, mask, model.heads.label_ids[1])
    torch.testing.assert_close(out[rows], zero_shot)
    assert all(torch.equal(before[k], v) for k, v in model.lm.state_dict().items())


def test_heads_are_label_words_with_nothing_to_store(two_task_classifier):
    model, _, _ = two_task_classifier
    assert model.heads.target_index(1) == [0, 1, 2, 3]
    assert model.heads.parameters_for(0) == []
    with pytest.raises(ValueError, match="inner loss"):
        TinTClassifier(model.lm, model.fmt, model.heads.label_ids, model.step, loss="everything")


def test_reusing_the_context_keys_and_values_gives_the_same_answers(two_task_classifier):
    model, x, task_labels = two_task_classifier
    assert model.reuse_context
    cached = model(x, task_labels)
    model.reuse_context = False
    full = model(x, task_labels)
    torch.testing.assert_close(cached, full, rtol=1e-4, atol=1e-4)


def test_one_update_serves_every_batch_of_a_task(two_task_classifier, monkeypatch):
    import continual.models.tint.classifier as classifier

    model, x, task_labels = two_task_classifier
    calls = []
    real = classifier.one_step_update
    monkeypatch.setattr(classifier, "one_step_update", lambda *a, **k: calls.append(1) or real(*a, **k))
    rows = task_labels == 0
    model(x[rows][:2], task_labels[rows][:2])
    model(x[rows][2:], task_labels[rows][2:])
    assert len(calls) == 1  # same task, same context, same step: computed once
    model.step = InnerStep(lr=0.25, layers=1)
    model(x[rows][:1], task_labels[rows][:1])
    assert len(calls) == 2  # a new step is a new update


def test_the_context_runs_once_per_task_and_update_across_batches(two_task_classifier, monkeypatch):
    import continual.models.tint.classifier as classifier
    from continual.models.tint.layouts import has_kv_cache

    model, x, task_labels = two_task_classifier
    calls = []
    real = classifier.context_cache
    monkeypatch.setattr(classifier, "context_cache", lambda lm, head: calls.append(head.numel()) or real(lm, head))
    rows = task_labels == 0
    first = torch.cat([model(x[rows][i : i + 1], task_labels[rows][i : i + 1]) for i in range(3)])
    expected = 1 if has_kv_cache(model.lm) else 0  # ModuleFormer has no cache: context + query each time
    assert len(calls) == expected  # three batches of one task: the context ran once
    model(x[~rows][:1], task_labels[~rows][:1])
    model(x[rows][:1], task_labels[rows][:1])
    assert len(calls) == 3 * expected  # another task's context, then this one's again
    model.step = InnerStep(lr=0.25, layers=1)
    second = model(x[rows][:1], task_labels[rows][:1])
    assert len(calls) == 4 * expected  # a new step changes the weights the context runs under
    assert not torch.allclose(second, first[:1])
    model.step = InnerStep(lr=0.5, layers=1)
    torch.testing.assert_close(model(x[rows][:3], task_labels[rows][:3]), first, rtol=1e-4, atol=1e-4)


def test_tokens_a_tokenizer_puts_before_a_text_lead_the_prompt_once(make_bpe_tokenizer):
    from tokenizers import processors

    tok = make_bpe_tokenizer(["Text: a fine film\nAnswer: Good\n\n"] * 20, vocab_size=300)
    bos = tok.eos_token_id
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", bos)]
    )
    fmt = PromptFormat.from_tokenizer(tok)
    assert fmt.lead == (bos,)
    ctx = build_context(fmt, tok, ["Text: a fine film"], [7], max_tokens=100)
    assert ctx.ids[0] == bos and (ctx.ids == bos).sum() == 1
    enc = tok(["Text: a fine film"], padding="max_length", max_length=12, return_tensors="pt")
    assert enc["input_ids"][0, 0] == bos
    queries, lengths = strip_queries(torch.stack([enc["input_ids"], enc["attention_mask"]], 1), fmt.special_ids, fmt.pad_id)
    assert queries[0, : lengths[0]].tolist() == tok("Text: a fine film", add_special_tokens=False)["input_ids"]
