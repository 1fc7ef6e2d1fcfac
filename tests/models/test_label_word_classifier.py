"""Label-word classification on tiny random causal LMs (GPT-2 and Llama) with a byte-level BPE tokenizer trained on
real CL_Benchmark text: scores equal the log-probabilities computed by hand, through a module bank too (virtual
tokens included), answers land in the gold label space ("seen" counts another task's label as wrong), and every
bad input fails naming what to fix."""

from __future__ import annotations

import pytest
import torch

from continual.models.backbone import load_causal_lm
from continual.models.label_word_classifier import LabelWordClassifier, build_label_word_classifier
from continual.models.tint.label_words import LabelWordError

pytestmark = pytest.mark.usefixtures("one_cpu_thread")

NAMES = ["SST-2", "agnews"]
LABELS = [["Good", "Bad"], ["World", "Sports", "Business", "Science or Technology"]]
TEXTS = ["a fine film", "stocks fell sharply today on wall street after the report"]


def _lm(tiny_causal_lm, family: str, seed: int = 0):
    node = tiny_causal_lm(family)
    torch.manual_seed(seed)
    return load_causal_lm(node["name"], random_init=True, config_overrides=node["config_overrides"])


def _batch(tokenizer, texts=TEXTS, length: int = 24):
    enc = tokenizer(list(texts), padding="max_length", truncation=True, max_length=length, return_tensors="pt")
    return torch.stack([enc["input_ids"], enc["attention_mask"]], dim=1)  # [B, 2, L], right-padded


def _by_hand(lm, tokenizer, text: str, label: str, prefix: str = "", suffix: str = "\nAnswer:", bank=None, task=0):
    """log p(label words | prompt) from one forward pass over the whole unpadded sequence."""
    piece = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"] if s else []  # noqa: E731
    prompt = piece(prefix) + piece(text) + piece(suffix)
    words = piece(" " + label)
    ids = torch.tensor([prompt + words])
    mask = torch.ones_like(ids)
    with torch.no_grad():
        return _explicit(lm, ids, mask, len(prompt), words, bank, task)


def _explicit(lm, ids, mask, n_prompt, words, bank, task):
    if bank is None:
        logits = lm(input_ids=ids, attention_mask=mask).logits
        offset = 0
    else:
        with bank.route(torch.tensor([task])):
            full, full_mask, positions, offset = bank.prepare_inputs(ids, mask)
            extra = {"position_ids": positions} if offset else {}
            logits = lm(input_ids=full, attention_mask=full_mask, **extra).logits
    logp = torch.log_softmax(logits[0].float(), -1)
    return sum(float(logp[offset + n_prompt - 1 + k, w]) for k, w in enumerate(words))


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_scores_are_the_summed_log_probabilities_of_each_labels_words(tiny_causal_lm, family):
    lm, tokenizer = _lm(tiny_causal_lm, family)
    model = build_label_word_classifier(lm, tokenizer, NAMES, LABELS).eval()
    assert max(int(n) for n in model.heads.lengths[1]) > 2  # multi-token labels exercise the cached continuation
    x = _batch(tokenizer)
    with torch.no_grad():
        scores = model(x, torch.tensor([1, 1]))  # task space, task id given: [B, W]
        for b, text in enumerate(TEXTS):
            expected = [_by_hand(lm, tokenizer, text, label) for label in LABELS[1]]
            torch.testing.assert_close(scores[b], torch.tensor(expected), atol=1e-4, rtol=1e-4)
        # more right padding changes nothing, and a task with fewer labels pads with -inf
        torch.testing.assert_close(model(_batch(tokenizer, length=40), torch.tensor([1, 1])), scores)
        short = model(x, torch.tensor([0, 0]))
        assert torch.isinf(short[:, 2:]).all() and torch.isfinite(short[:, :2]).all()


def test_a_per_task_template_wraps_that_tasks_inputs(tiny_causal_lm):
    lm, tokenizer = _lm(tiny_causal_lm, "llama")
    model = build_label_word_classifier(
        lm, tokenizer, NAMES, LABELS, template="Review: {text}\nAnswer:", task_templates={"agnews": "News: {text}\nTopic:"}
    ).eval()
    x = _batch(tokenizer)
    with torch.no_grad():
        scores = model(x, torch.tensor([0, 1]))
    assert scores[0, 0] == pytest.approx(_by_hand(lm, tokenizer, TEXTS[0], "Good", "Review: "), abs=1e-4)
    assert scores[1, 3] == pytest.approx(_by_hand(lm, tokenizer, TEXTS[1], "Science or Technology", "News: ", "\nTopic:"), abs=1e-4)


@pytest.mark.parametrize("family, kind", [("llama", "lora"), ("llama", "prompt"), ("gpt2", "prefix"), ("gpt2", "lora")])
def test_scores_through_the_module_bank_match_one_pass_over_the_whole_sequence(tiny_causal_lm, family, kind):
    """Each sample runs through its task's modules; prompt and prefix positions written in the prompt pass stay visible
    to the label-word continuation that reads the cache."""
    from continual.expansion import TaskInfo
    from strategies.delta import DeltaStrategy

    lm, tokenizer = _lm(tiny_causal_lm, family)
    model = build_label_word_classifier(lm, tokenizer, NAMES, LABELS).eval()
    strategy = DeltaStrategy(kinds=[kind], composition="isolated", prompt_tokens=3, prefix_tokens=2)
    strategy.setup(model, [TaskInfo(i, n, tuple(l)) for i, (n, l) in enumerate(zip(NAMES, LABELS))])
    for task in strategy.tasks:
        strategy.before_task(model, task)
    with torch.no_grad():  # LoRA's B starts at zero: give every task's modules a visible effect
        for param in model.backbone.parameters():
            if param.requires_grad or param.abs().sum() == 0:
                param.add_(0.3 * torch.randn_like(param))
    x = _batch(tokenizer)
    with torch.no_grad():
        scores = model(x, torch.tensor([1, 0]))
    for b, task in ((0, 1), (1, 0)):
        for c, label in enumerate(LABELS[task]):
            assert float(scores[b, c]) == pytest.approx(_by_hand(lm, tokenizer, TEXTS[b], label, bank=model.bank, task=task), abs=1e-4)


def test_seen_space_counts_another_tasks_label_as_wrong(tiny_causal_lm):
    lm, tokenizer = _lm(tiny_causal_lm, "llama")
    labels = [["Good", "Bad"], ["World", "Sports", "Good"]]  # "Good" is a label of both tasks
    model = build_label_word_classifier(lm, tokenizer, NAMES, labels, label_space="seen").eval()
    heads = model.heads
    assert heads.seen_labels == ["Good", "Bad", "World", "Sports"]
    seen = torch.full((1,), heads.seen_list)
    # gold task 0 (Good, Bad): another task's label ("World") wins -> the "other" column wins -> wrong
    out = heads.in_gold_space(torch.tensor([[-3.0, -2.0, -1.0, -5.0]]), seen, torch.tensor([0]))
    assert out.shape == (1, heads.width + 1) and int(out.argmax()) == heads.width
    torch.testing.assert_close(out[0, :2], torch.tensor([-3.0, -2.0]))
    # the same string in the gold task counts right, whichever task taught it ("Good" is label 2 of task 1)
    out = heads.in_gold_space(torch.tensor([[-1.0, -2.0, -3.0, -5.0]]), seen, torch.tensor([1]))
    assert int(out.argmax()) == 2

    # through forward: only the seen tasks' labels are scored; the answer is mapped into the gold space
    calls = []

    def fake_score(x, gold, modules, words, lengths):
        calls.append(words.shape[1])
        return torch.tensor([[-4.0, -4.0, -1.0, -4.0]])[:, : words.shape[1]].expand(x.shape[0], -1)

    model.score = fake_score
    x = _batch(tokenizer, TEXTS[:1])
    model.heads.activate(0)
    model.heads.activate(1)
    with torch.no_grad():
        logits = model(x, torch.tensor([0]))  # gold task 0; "World" (task 1's) scores best
    assert calls == [4] and int(logits.argmax()) == heads.width
    model.heads.active[1] = False  # only task 0 seen: task 1's labels are not candidates
    with torch.no_grad():
        logits = model(x, torch.tensor([0]))
    assert calls[-1] == 2 and int(logits.argmax()) in (0, 1)


def test_training_scores_the_current_tasks_labels_whatever_the_label_space(tiny_causal_lm):
    lm, tokenizer = _lm(tiny_causal_lm, "gpt2")
    model = build_label_word_classifier(lm, tokenizer, NAMES, LABELS, label_space="seen", label_loss="candidates")
    model.heads.activate(0)
    model.heads.activate(1)
    x = _batch(tokenizer)
    model.train()
    train = model(x, torch.tensor([1, 0]))
    assert train.shape == (2, 4) and torch.isinf(train[1, 2:]).all()
    loss = torch.nn.functional.cross_entropy(train, torch.tensor([3, 1]))
    loss.backward()  # through the cached continuation too
    assert lm.get_input_embeddings().weight.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        assert model(x, torch.tensor([1, 0])).shape == (2, 5)  # seen labels in the gold space, plus "other"


def test_the_lm_loss_is_the_gold_labels_negative_log_probability_over_the_whole_vocabulary(tiny_causal_lm):
    lm, tokenizer = _lm(tiny_causal_lm, "llama")
    model = build_label_word_classifier(lm, tokenizer, NAMES, LABELS, label_space="seen")
    assert model.label_loss == "lm"  # "auto" with every seen label competing at test time
    assert build_label_word_classifier(lm, tokenizer, NAMES, LABELS).label_loss == "candidates"  # "auto", task space
    x, tasks, gold = _batch(tokenizer), torch.tensor([1, 0]), torch.tensor([3, 1])
    model.train()
    logits = model(x, tasks)
    assert logits.shape == (2, 5)  # the task's labels (padded with -inf) and "anything else"
    loss = torch.nn.functional.cross_entropy(logits, gold, reduction="none")
    expected = [-_by_hand(lm, tokenizer, TEXTS[0], LABELS[1][3]), -_by_hand(lm, tokenizer, TEXTS[1], LABELS[0][1])]
    torch.testing.assert_close(loss.detach(), torch.tensor(expected), atol=1e-4, rtol=1e-4)
    # The softmax is the model's distribution: "anything else" holds what the candidates leave.
    probs = logits.detach().softmax(-1)
    torch.testing.assert_close(probs[:, -1], 1 - logits.detach()[:, :-1].exp().sum(-1), atol=1e-5, rtol=1e-4)
    loss.sum().backward()
    assert lm.get_input_embeddings().weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="backbone.label_loss must be one of"):
        build_label_word_classifier(lm, tokenizer, NAMES, LABELS, label_loss="mean")


def test_the_lm_loss_pushes_down_another_tasks_label_the_candidate_loss_leaves_alone(tiny_causal_lm):
    """Training on task 0 (labels Good/Bad) with the gold label 'Good': the LM loss lowers the probability of task 1's
    'World' too, as it lowers every token but the gold one; the candidate loss only moves Good against Bad."""
    def world_after_steps(label_loss):
        lm, tokenizer = _lm(tiny_causal_lm, "gpt2", seed=3)
        model = build_label_word_classifier(lm, tokenizer, NAMES, LABELS, label_space="seen", label_loss=label_loss)
        x, tasks, gold = _batch(tokenizer, texts=TEXTS[:1]), torch.tensor([0]), torch.tensor([0])
        world = lambda: float(model.routed_logits(x, torch.tensor([1]))[0, 0])  # noqa: E731
        model.eval()
        with torch.no_grad():
            before = world()
        opt = torch.optim.SGD(lm.parameters(), lr=0.5)
        model.train()
        for _ in range(5):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x, tasks), gold).backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            return world() - before

    assert world_after_steps("lm") < world_after_steps("candidates") - 0.1


@pytest.mark.parametrize("labels, words, match", [
    ([["Good", "Bad"]], {"SST-2": {"Bad": " "}}, "gives no token"),
    ([["Good", "Bad"]], {"SST-2": {"Bad": "Good"}}, "'Good' and 'Bad' are spelt by the same tokens"),
    ([["Good", "Bad"]], {"SST-2": {"Neutral": "meh"}}, r"backbone.label_words.SST-2: \['Neutral'\] are not labels"),
    ([["Good", "Bad"]], {"yelp": {"Good": "fine"}}, r"\['yelp'\] are not tasks of this stream"),
])
def test_unusable_label_words_fail_naming_the_labels_and_the_key(tiny_causal_lm, labels, words, match):
    lm, tokenizer = _lm(tiny_causal_lm, "llama")
    with pytest.raises(LabelWordError, match=match):
        build_label_word_classifier(lm, tokenizer, NAMES[: len(labels)], labels, label_words=words)


def test_labels_that_only_seen_mode_cannot_tell_apart_fail_there(tiny_causal_lm):
    lm, tokenizer = _lm(tiny_causal_lm, "llama")
    labels = [["Good", "Bad"], ["World", "Sports"]]
    words = {"agnews": {"World": "Good"}}  # task space: fine (never compete); seen: indistinguishable from "Good"
    build_label_word_classifier(lm, tokenizer, NAMES, labels, label_words=words)
    with pytest.raises(LabelWordError, match="'Good' and 'World' .* cannot be told apart"):
        build_label_word_classifier(lm, tokenizer, NAMES, labels, label_words=words, label_space="seen")
    shared = [["Good", "Bad"], ["Good", "Sports"]]
    with pytest.raises(LabelWordError, match="label 'Good' is spelt"):
        build_label_word_classifier(lm, tokenizer, NAMES, shared, label_space="seen",
                                    label_words={"agnews": {"Good": "great"}})


@pytest.mark.parametrize("template, tasks, key", [
    ("Answer:", {}, "backbone.template"),
    ("{text} and {text}", {}, "backbone.template"),
    ("{text}\nAnswer:", {"agnews": "Topic:"}, "backbone.task_templates.agnews"),
    ("{text}\nAnswer:", {"yelp": "{text}"}, "backbone.task_templates"),
])
def test_a_template_needs_the_text_exactly_once(tiny_causal_lm, template, tasks, key):
    lm, tokenizer = _lm(tiny_causal_lm, "gpt2")
    with pytest.raises(ValueError, match=key):
        build_label_word_classifier(lm, tokenizer, NAMES, LABELS, template=template, task_templates=tasks)


def test_an_encoder_backbone_fails_naming_its_model_type(tiny_backbone):
    from continual.models.backbone import load_backbone

    encoder, tokenizer = load_backbone(tiny_backbone["name"], random_init=True, config_overrides=tiny_backbone["config_overrides"])
    with pytest.raises(LabelWordError, match="model_type 'bert', an encoder-only model"):
        build_label_word_classifier(encoder, tokenizer, NAMES, LABELS, name="minilm")


def test_an_encoder_backbone_fails_in_a_run_before_loading_weights(tiny_experiment):
    from continual.config import ConfigError
    from continual.recipes.run import run_experiment

    cfg = tiny_experiment("backbone.head=label_words", "tracking.enabled=false")
    with pytest.raises(ConfigError, match="model_type 'bert', an encoder-only model"):
        run_experiment(cfg, echo=lambda _: None)


def test_label_word_options_need_the_label_word_head():
    from continual.config import ConfigError
    from continual.recipes.run import load_config

    for override in ("backbone.label_space=seen", "backbone.label_loss=lm", "backbone.template=Q:{text}",
                     "backbone.label_words={a: {b: c}}"):
        with pytest.raises(ConfigError, match="applies to backbone.head=label_words only"):
            load_config(None, [override])
    with pytest.raises(ConfigError, match="backbone.label_space"):
        load_config(None, ["backbone.head=label_words", "backbone.label_space=all"])
    with pytest.raises(ConfigError, match=r"backbone.label_loss: 'mean' is not one of \['auto', 'lm', 'candidates'\]"):
        load_config(None, ["backbone.head=label_words", "backbone.label_loss=mean"])


def test_a_router_attaches_to_label_words_but_not_in_soft_mode(tiny_causal_lm):
    from omegaconf import OmegaConf

    from continual.config import ConfigError
    from continual.expansion import TaskInfo
    from continual.training.routing import attach_router, make_router
    from strategies.delta import DeltaStrategy

    lm, tokenizer = _lm(tiny_causal_lm, "llama")
    model = build_label_word_classifier(lm, tokenizer, NAMES, LABELS)
    assert isinstance(model, LabelWordClassifier)
    DeltaStrategy().setup(model, [TaskInfo(i, n, tuple(l)) for i, (n, l) in enumerate(zip(NAMES, LABELS))])
    cfg = OmegaConf.create({"name": "prototype"})
    assert attach_router(model, make_router(cfg), cfg, "delta") is not None
    with torch.no_grad():  # the base model's hidden states (width 32 per layer read), not vocabulary logits
        assert model.routing_features(_batch(tokenizer)).shape == (2, 32 * len(model.router_layers))
    soft = OmegaConf.create({"name": "prototype", "top_k": 2})
    with pytest.raises(ConfigError, match="router.top_k"):
        attach_router(model, make_router(soft), soft, "delta")
