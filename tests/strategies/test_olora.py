"""O-LoRA on a label-word classifier (tiny random Llama/GPT-2, real CL_Benchmark data): the penalty by hand, earlier
tasks' LoRAs untouched by later tasks (through the real learner), every task's LoRA acting at test time with no task
id, a whole run, and options that fail naming their key."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from continual.expansion import TaskInfo
from continual.models.backbone import load_causal_lm
from continual.models.label_word_classifier import build_label_word_classifier
from strategies.olora import OLoRA, orthogonality_loss

pytestmark = pytest.mark.usefixtures("one_cpu_thread")

NAMES = ["SST-2", "agnews"]
LABELS = [("Good", "Bad"), ("World", "Sports", "Business", "Science or Technology")]
TASKS = [TaskInfo(i, n, l) for i, (n, l) in enumerate(zip(NAMES, LABELS))]


def _model(tiny_causal_lm, family="llama", label_space="seen"):
    node = tiny_causal_lm(family)
    torch.manual_seed(0)
    lm, tokenizer = load_causal_lm(node["name"], random_init=True, config_overrides=node["config_overrides"])
    return build_label_word_classifier(lm, tokenizer, NAMES, LABELS, label_space=label_space), tokenizer


def _lora_slots(model, task):
    return [site.delta.slot_parameters(task) for site in model.bank.sites().values()]


def test_the_penalty_is_zero_on_the_first_task_and_the_formula_by_hand_on_the_second(tiny_causal_lm):
    model, _ = _model(tiny_causal_lm)
    strategy = OLoRA(lambda_orth=0.5, lambda_l2=0.0)
    strategy.setup(model, TASKS)
    assert len(model.bank.sites()) == 4  # q and v of 2 blocks
    strategy.before_task(model, TASKS[0])
    assert strategy.auxiliary_loss(model, TASKS[0]) is None  # nothing earlier to be orthogonal to
    with_l2 = OLoRA(lambda_orth=0.5, lambda_l2=0.1)
    with torch.no_grad():  # B starts at zero: only A counts
        first = with_l2.auxiliary_loss(model, TASKS[0])
        assert float(first) == pytest.approx(0.1 * sum(float(s["lora_A"].pow(2).sum()) for s in _lora_slots(model, 0)), rel=1e-6)
    strategy.after_task(model, TASKS[0])
    strategy.before_task(model, TASKS[1])
    with torch.no_grad():
        for slot in _lora_slots(model, 1):
            slot["lora_B"].normal_()
    by_hand = 0.0
    with torch.no_grad():
        for old, new in zip(_lora_slots(model, 0), _lora_slots(model, 1)):
            o = old["lora_A"] @ new["lora_A"].T  # O_{0,1}, [r, r]
            by_hand += 0.5 * float((o ** 2).sum()) + 0.1 * float(new["lora_A"].pow(2).sum() + new["lora_B"].pow(2).sum())
        assert float(with_l2.auxiliary_loss(model, TASKS[1])) == pytest.approx(by_hand, rel=1e-5)
    loss = strategy.auxiliary_loss(model, TASKS[1])
    loss.backward()
    assert all(s["lora_A"].grad is not None for s in _lora_slots(model, 1))  # the new A is pushed
    assert all(s["lora_A"].grad is None for s in _lora_slots(model, 0))  # the old ones are frozen
    A = [torch.randn(3, 4, 5), torch.randn(4, 5)]
    assert float(orthogonality_loss(*A, norm="abs")) == pytest.approx(float((A[0] @ A[1].T).abs().sum()), rel=1e-6)


def _learner_run(cfg):
    """The run recipe's setup, keeping the model and the learner in hand (train one task at a time)."""
    from continual.learner import ContinualLearner
    from continual.models.backbone import load_causal_lm as load
    from streams.avalanche import to_avalanche_benchmark
    from streams.build import build_stream
    from strategies.registry import build_strategy

    torch.manual_seed(0)
    strategy = build_strategy(cfg.strategy)
    lm, tokenizer = load(cfg.backbone.name, random_init=True, config_overrides=dict(cfg.backbone.config_overrides))
    stream = build_stream(cfg.stream, tokenizer, progress=False)
    tasks = stream.task_infos
    model = build_label_word_classifier(lm, tokenizer, [t.name for t in tasks], [t.labels for t in tasks],
                                        label_space=cfg.backbone.label_space)
    strategy.setup(model, tasks)
    benchmark = to_avalanche_benchmark(stream, model.heads.target_index)
    learner = ContinualLearner(model=model, strategy=strategy, tasks=tasks, lr=cfg.training.lr, train_mb_size=8,
                               eval_mb_size=8, device="cpu", progress=False, weight_decay=0.01)
    return model, learner, list(benchmark.train_stream), list(benchmark.test_stream)


@pytest.mark.slow
def test_earlier_loras_stay_bit_identical_and_every_lora_acts_at_test_time(tiny_experiment, tiny_causal_lm):
    cfg = tiny_experiment("strategy.name=olora", "backbone.head=label_words", "backbone.label_space=seen",
                          "strategy.lambda_l2=0.01", backbone=tiny_causal_lm("llama"))
    model, learner, train, test = _learner_run(cfg)
    learner.train(train[0])
    after_first = {k: v.clone() for k, v in model.bank.task_state(0).items()}
    assert any(float(v.abs().sum()) > 0 for k, v in after_first.items() if k.endswith("lora_B"))  # task 0 learnt
    learner.train(train[1])
    for key, value in model.bank.task_state(0).items():
        assert torch.equal(value, after_first[key]), key
    assert any(not torch.equal(v, model.bank.task_state(0)[k]) for k, v in model.bank.task_state(1).items())

    model.eval()
    x = next(iter(torch.utils.data.DataLoader(test[0].dataset, batch_size=4)))[0]
    gold = torch.zeros(4, dtype=torch.long)
    words, lengths = model.heads.words[gold], model.heads.lengths[gold]
    with torch.no_grad():
        as_task0 = model.score(x, gold, torch.zeros(4, dtype=torch.long), words, lengths)
        as_task1 = model.score(x, gold, torch.ones(4, dtype=torch.long), words, lengths)
        torch.testing.assert_close(as_task0, as_task1)  # no task id: every sample runs through every LoRA
        for task in (0, 1):  # and each task's LoRA changes the answer
            saved = [s["lora_B"].clone() for s in _lora_slots(model, task)]
            for s in _lora_slots(model, task):
                s["lora_B"].zero_()
            assert not torch.allclose(model.score(x, gold, gold, words, lengths), as_task0)
            for s, b in zip(_lora_slots(model, task), saved):
                s["lora_B"].copy_(b)
    accs = learner.evaluate(test)
    assert set(accs) == {0, 1} and all(0 <= a <= 1 for a in accs.values())


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_an_olora_run_on_label_words(tiny_experiment, tiny_causal_lm, family):
    from continual.recipes.run import run_experiment

    cfg = tiny_experiment("strategy.name=olora", "backbone.head=label_words", "backbone.label_space=seen",
                          "tracking.enabled=false", backbone=tiny_causal_lm(family))
    result = run_experiment(cfg, echo=lambda _: None)
    assert result.matrix.shape == (2, 2) and np.isfinite(result.matrix).all()
    assert result.records[0].trainable_parameters == result.records[1].trainable_parameters > 0
    assert result.records[1].stored_parameters > result.records[0].stored_parameters  # one more LoRA


@pytest.mark.parametrize("override, key", [
    ("strategy.lambda_orth=-1", "strategy.lambda_orth"),
    ("strategy.lambda_l2=-0.5", "strategy.lambda_l2"),
    ("strategy.lambda_orth=much", "strategy.lambda_orth"),
    ("strategy.rank=two", "strategy.rank"),
    ("strategy.orth_norm=l3", "strategy.orth_norm"),
    ("strategy.rank=0", "strategy.rank"),
])
def test_bad_options_fail_naming_their_key(override, key):
    from continual.recipes.run import load_config
    from strategies.registry import build_strategy

    with pytest.raises(ValueError, match=key):
        build_strategy(load_config(None, ["strategy.name=olora", override]).strategy)
