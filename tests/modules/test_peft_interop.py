"""PEFT LoRA adapter folders in and out of the module bank, checked against PEFT itself on tiny random BERT and
GPT-2 backbones: the same hidden states from ``PeftModel`` and from our routed model, and a clear error for every
adapter the bank cannot hold.
"""

from __future__ import annotations

import copy
import json
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from continual.modules import ModuleBank
from continual.modules.peft_interop import ADAPTER_CONFIG, ADAPTER_WEIGHTS, export_peft_lora, import_peft_lora

peft = pytest.importorskip("peft")
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402

ARCHS = ["bert", "gpt2"]
TARGETS = {"bert": ["query", "value"], "gpt2": ["c_attn"]}  # what the bank's LoRA defaults adapt, as PEFT names
R, ALPHA = 4, 12.0  # not the defaults, so that a config that ignored them would fail
ATOL = 1e-6


@pytest.fixture(scope="module")
def backbones(tiny_backbone):
    from transformers import GPT2Config, GPT2Model

    from continual.models.backbone import load_backbone

    torch.manual_seed(0)
    bert, _ = load_backbone(tiny_backbone["name"], random_init=True, config_overrides=tiny_backbone["config_overrides"])
    gpt2 = GPT2Model(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=1000, bos_token_id=0, eos_token_id=0))
    return {"bert": bert.eval(), "gpt2": gpt2.eval()}


def inputs(n=6, length=9, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 1000, (n, length), generator=gen)
    lengths = torch.randint(3, length + 1, (n,), generator=gen)
    mask = (torch.arange(length)[None, :] < lengths[:, None]).long()
    return ids * mask, mask


def hidden(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).last_hidden_state


def routed(backbone, bank, task_ids, ids, mask):
    with bank.route(torch.as_tensor(task_ids).expand(ids.shape[0]).clone()):
        return hidden(backbone, ids, mask)


def ours(backbones, arch, n_tasks=0, composition="isolated", kinds=("lora",), seed=1):
    """A copy of the backbone with a bank of LoRA (r=R, alpha=ALPHA) sites and n_tasks perturbed slots."""
    backbone = copy.deepcopy(backbones[arch])
    bank = ModuleBank(composition)
    for kind in kinds:
        bank.attach(backbone, kind, None, **({"r": R, "alpha": ALPHA} if kind == "lora" else {}))
    for t in range(n_tasks):
        bank.add_task(t)
    perturb(bank, range(n_tasks), seed)
    return backbone, bank


def perturb(bank, tasks, seed=1):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in tasks:
            for p in bank.task_parameters(t):
                p.add_(0.3 * torch.randn(p.shape, generator=gen))


def peft_adapter(backbones, arch, folder, seed=2, **config):
    """Train-free PEFT LoRA with random non-zero A and B, saved by PEFT itself; returns the PeftModel."""
    options = {"r": R, "lora_alpha": ALPHA, "target_modules": TARGETS[arch], "fan_in_fan_out": arch == "gpt2"}
    model = get_peft_model(copy.deepcopy(backbones[arch]), LoraConfig(**{**options, **config}))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))
    model.save_pretrained(str(folder))
    return model.eval()


def edit_config(folder, **changes):
    path = folder / ADAPTER_CONFIG
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


# ---------------------------------------------------------------------------------------------------- export
@pytest.mark.parametrize("arch", ARCHS)
def test_exported_task_loads_in_peft_with_identical_hidden_states(backbones, arch, tmp_path):
    backbone, bank = ours(backbones, arch, n_tasks=3)
    folder = export_peft_lora(bank, backbone, 1, tmp_path / "task1")

    config = json.loads((folder / ADAPTER_CONFIG).read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"]) == ("LORA", R, ALPHA)
    assert sorted(config["target_modules"]) == TARGETS[arch]
    assert config["fan_in_fan_out"] is (arch == "gpt2")  # GPT-2's Conv1D stores [in, out]
    assert (config["bias"], config["task_type"], config["use_dora"], config["use_rslora"]) == (
        "none", "FEATURE_EXTRACTION", False, False)
    saved = load_file(str(folder / ADAPTER_WEIGHTS))
    site_names = list(bank.sites())
    expected_keys = [f"base_model.model.{s}.{role}.weight" for s in site_names for role in ("lora_A", "lora_B")]
    assert sorted(saved) == sorted(expected_keys)
    for s in site_names:
        assert torch.equal(saved[f"base_model.model.{s}.lora_A.weight"], bank.sites()[s].delta.lora_A[1].detach())

    peft_model = PeftModel.from_pretrained(copy.deepcopy(backbones[arch]), str(folder)).eval()
    ids, mask = inputs()
    expected = routed(backbone, bank, 1, ids, mask)
    torch.testing.assert_close(hidden(peft_model, ids, mask), expected, atol=ATOL, rtol=0)
    assert not torch.allclose(expected, hidden(backbones[arch], ids, mask), atol=1e-3), "the delta must act"
    assert not torch.allclose(expected, routed(backbone, bank, 0, ids, mask), atol=1e-3), "tasks must differ"


@pytest.mark.parametrize("composition", ["sequential", "simultaneous"])
def test_a_task_using_several_slots_is_refused_or_merged_into_one_exact_lora(backbones, composition, tmp_path):
    backbone, bank = ours(backbones, "bert", n_tasks=3, composition=composition)
    with pytest.raises(ValueError, match=r"task 1 uses slots \[0, 1(, 2)?\].*merge_slots=True"):
        export_peft_lora(bank, backbone, 1, tmp_path / "refused")
    assert not (tmp_path / "refused").exists()

    folder = export_peft_lora(bank, backbone, 1, tmp_path / "merged", merge_slots=True)
    n_slots = 2 if composition == "sequential" else 3
    config = json.loads((folder / ADAPTER_CONFIG).read_text())
    assert (config["r"], config["lora_alpha"]) == (n_slots * R, n_slots * ALPHA)  # same alpha / r as the bank
    peft_model = PeftModel.from_pretrained(copy.deepcopy(backbones["bert"]), str(folder)).eval()
    ids, mask = inputs()
    torch.testing.assert_close(hidden(peft_model, ids, mask), routed(backbone, bank, 1, ids, mask), atol=ATOL, rtol=0)


def test_sites_restricted_to_some_layers_export_full_module_names(backbones, tmp_path):
    """Leaf names would also select layer 1's query in PEFT: the config must name the modules in full."""
    backbone = copy.deepcopy(backbones["bert"])
    bank = ModuleBank()
    bank.attach(backbone, "lora", [r"layer\.0\.attention\.self\.query"], r=R, alpha=ALPHA)
    bank.add_task(0)
    perturb(bank, [0])
    folder = export_peft_lora(bank, backbone, 0, tmp_path / "a")
    assert json.loads((folder / ADAPTER_CONFIG).read_text())["target_modules"] == ["encoder.layer.0.attention.self.query"]
    peft_model = PeftModel.from_pretrained(copy.deepcopy(backbones["bert"]), str(folder)).eval()
    ids, mask = inputs()
    torch.testing.assert_close(hidden(peft_model, ids, mask), routed(backbone, bank, 0, ids, mask), atol=ATOL, rtol=0)


def test_export_with_other_kinds_is_an_error_unless_skipped_with_a_warning(backbones, tmp_path):
    backbone, bank = ours(backbones, "bert", n_tasks=1, kinds=("lora", "bitfit"))
    with pytest.raises(ValueError, match=r"\['bitfit'\].*encoder\.layer\.0\.attention\.self\.query.*skip_other_kinds"):
        export_peft_lora(bank, backbone, 0, tmp_path / "a")
    with pytest.warns(UserWarning, match="exporting task 0's LoRA alone"):
        folder = export_peft_lora(bank, backbone, 0, tmp_path / "b", skip_other_kinds=True)
    saved = load_file(str(folder / ADAPTER_WEIGHTS))
    assert len(saved) == 2 * 2 * 2 and all(k.endswith(("lora_A.weight", "lora_B.weight")) for k in saved)


def test_export_rejects_a_foreign_model_an_unknown_task_and_a_bank_without_lora(backbones, tmp_path):
    backbone, bank = ours(backbones, "bert", n_tasks=1)
    with pytest.raises(ValueError, match="not the model this bank is attached to"):
        export_peft_lora(bank, copy.deepcopy(backbones["bert"]), 0, tmp_path / "a")
    with pytest.raises(ValueError, match="task 3 has no modules"):
        export_peft_lora(bank, backbone, 3, tmp_path / "b")
    bitfit_only, other = ours(backbones, "bert", n_tasks=1, kinds=("bitfit",))
    with pytest.raises(ValueError, match=r"no LoRA sites \(kinds: \['bitfit'\]\)"):
        export_peft_lora(other, bitfit_only, 0, tmp_path / "c")


# ---------------------------------------------------------------------------------------------------- import
@pytest.mark.parametrize("arch", ARCHS)
def test_imported_peft_adapter_gives_the_peft_models_outputs_also_in_mixed_batches(backbones, arch, tmp_path):
    first = peft_adapter(backbones, arch, tmp_path / "first", seed=2)
    second = peft_adapter(backbones, arch, tmp_path / "second", seed=3)
    backbone, bank = ours(backbones, arch, n_tasks=1)  # task 0 is our own
    assert import_peft_lora(bank, backbone, tmp_path / "first") == 1
    assert import_peft_lora(bank, backbone, tmp_path / "second") == 2
    assert bank.n_tasks == 3

    ids, mask = inputs(n=8)
    for task, peft_model in ((1, first), (2, second)):
        expected = hidden(peft_model, ids, mask)
        torch.testing.assert_close(routed(backbone, bank, task, ids, mask), expected, atol=ATOL, rtol=0)

    tasks = torch.tensor([0, 1, 2, 2, 1, 0, 2, 1])
    mixed = routed(backbone, bank, tasks, ids, mask)
    for t in range(3):
        rows = (tasks == t).nonzero(as_tuple=True)[0]
        torch.testing.assert_close(mixed[rows], routed(backbone, bank, t, ids[rows], mask[rows]), atol=1e-5, rtol=1e-4)

    # PEFT's own mixed-batch inference over the same two adapters agrees on their rows.
    both = PeftModel.from_pretrained(copy.deepcopy(backbones[arch]), str(tmp_path / "first"), adapter_name="t1").eval()
    both.load_adapter(str(tmp_path / "second"), adapter_name="t2")
    rows = (tasks > 0).nonzero(as_tuple=True)[0]
    with torch.no_grad():
        theirs = both(input_ids=ids[rows], attention_mask=mask[rows], adapter_names=[f"t{int(t)}" for t in tasks[rows]])
    torch.testing.assert_close(mixed[rows], theirs.last_hidden_state, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("arch", ARCHS)
def test_export_then_import_round_trips(backbones, arch, tmp_path):
    backbone, bank = ours(backbones, arch, n_tasks=2)
    export_peft_lora(bank, backbone, 1, tmp_path / "t1")
    fresh, fresh_bank = ours(backbones, arch)
    assert import_peft_lora(fresh_bank, fresh, tmp_path / "t1") == 0
    for a, b in zip(fresh_bank.task_parameters(0), bank.task_parameters(1)):
        assert torch.equal(a, b)
    ids, mask = inputs()
    assert torch.equal(routed(fresh, fresh_bank, 0, ids, mask), routed(backbone, bank, 1, ids, mask))


def test_rank_and_alpha_patterns_that_agree_with_the_bank_are_accepted(backbones, tmp_path):
    peft_adapter(backbones, "bert", tmp_path / "a")
    edit_config(tmp_path / "a", rank_pattern={"value": R}, alpha_pattern={"query": ALPHA})
    backbone, bank = ours(backbones, "bert")
    assert import_peft_lora(bank, backbone, tmp_path / "a") == 0


# ---------------------------------------------------------------------------------------------------- import errors
def _import_error(backbones, folder, error, match):
    backbone, bank = ours(backbones, "bert", n_tasks=1)
    before = [p.detach().clone() for p in bank.task_parameters(0)]
    with pytest.raises(error, match=match):
        import_peft_lora(bank, backbone, folder)
    assert bank.n_tasks == 1, "a refused adapter must leave the bank as it was"
    assert all(torch.equal(a, b) for a, b in zip(before, bank.task_parameters(0)))


@pytest.mark.parametrize(
    "change, match",
    [
        ({"use_dora": True}, r"use_dora=True.*DoRA"),
        ({"use_rslora": True}, r"use_rslora=True"),
        ({"bias": "all"}, r"bias='all'"),
        ({"bias": "lora_only"}, r"bias='lora_only'"),
        ({"lora_bias": True}, r"lora_bias=True"),
        ({"modules_to_save": ["pooler"]}, r"modules_to_save"),
        ({"init_lora_weights": "pissa"}, r"init_lora_weights='pissa'"),
        ({"peft_type": "IA3"}, r"peft_type is 'IA3'"),
        ({"r": 2}, r"'encoder\.layer\.0\.attention\.self\.query' has rank 2 \(r\).*r=4"),
        ({"rank_pattern": {"value": 2}},
         r"'encoder\.layer\.0\.attention\.self\.value' has rank 2 \(rank_pattern\['value'\]\)"),
        ({"lora_alpha": 8}, r"'encoder\.layer\.0\.attention\.self\.query' has lora_alpha 8 \(lora_alpha\)"),
        ({"alpha_pattern": {"layer.1.attention.self.query": 32}},
         r"'encoder\.layer\.1\.attention\.self\.query' has lora_alpha 32 "
         r"\(alpha_pattern\['layer\.1\.attention\.self\.query'\]\)"),
        ({"target_modules": ["query", "key"]}, r"targets module\(s\) \['encoder\.layer\.0\.attention\.self\.key'"),
        ({"target_modules": ["query"]}, r"LoRA sites at \['encoder\.layer\.0\.attention\.self\.value'"),
        ({"layers_to_transform": [0]}, r"LoRA sites at \['encoder\.layer\.1\.attention\.self\.query'"),
        ({"target_modules": "all-linear"}, r"target_modules='all-linear' is resolved by PEFT"),
    ],
)
def test_unsupported_or_mismatched_configs_are_refused_by_name(backbones, tmp_path, change, match):
    peft_adapter(backbones, "bert", tmp_path / "a")
    edit_config(tmp_path / "a", **change)
    _import_error(backbones, tmp_path / "a", ValueError, match)


def test_missing_unexpected_and_misshapen_tensors_are_named(backbones, tmp_path):
    peft_adapter(backbones, "bert", tmp_path / "a")
    path = tmp_path / "a" / ADAPTER_WEIGHTS
    state = load_file(str(path))
    key = "base_model.model.encoder.layer.1.attention.self.value.lora_B.weight"

    save_file({k: v for k, v in state.items() if k != key}, str(path))
    _import_error(backbones, tmp_path / "a", KeyError, rf"missing tensor\(s\) \['{key}'\]")

    extra = "base_model.model.encoder.layer.1.attention.self.value.lora_magnitude_vector"
    save_file({**state, extra: torch.ones(32)}, str(path))
    _import_error(backbones, tmp_path / "a", KeyError, rf"unexpected tensor\(s\) \['{extra}'\]")

    save_file({**state, key: torch.zeros(32, R + 1)}, str(path))
    _import_error(backbones, tmp_path / "a", ValueError, rf"{key} has shape \(32, 5\), the bank expects \(32, 4\)")


def test_pickled_weights_are_refused_without_being_read(backbones, tmp_path):
    peft_adapter(backbones, "bert", tmp_path / "a")
    (tmp_path / "a" / ADAPTER_WEIGHTS).unlink()
    (tmp_path / "a" / "adapter_model.bin").write_bytes(b"not even a pickle: it must never be opened")
    _import_error(backbones, tmp_path / "a", ValueError, r"only adapter_model\.bin, a pickle")


def test_missing_folder_config_or_weights(backbones, tmp_path):
    _import_error(backbones, tmp_path / "nowhere", FileNotFoundError, "adapter folder not found")
    (tmp_path / "empty").mkdir()
    _import_error(backbones, tmp_path / "empty", FileNotFoundError, "no adapter_config.json")
    peft_adapter(backbones, "bert", tmp_path / "a")
    (tmp_path / "a" / ADAPTER_WEIGHTS).unlink()
    _import_error(backbones, tmp_path / "a", FileNotFoundError, "no adapter_model.safetensors")


def test_import_into_a_bank_with_a_different_rank_names_the_module(backbones, tmp_path):
    peft_adapter(backbones, "gpt2", tmp_path / "a", r=2, lora_alpha=2 * ALPHA / R)  # same scale, other rank
    backbone = copy.deepcopy(backbones["gpt2"])
    bank = ModuleBank()
    bank.attach(backbone, "lora", None, r=R, alpha=ALPHA)
    with pytest.raises(ValueError, match=r"'h\.0\.attn\.c_attn' has rank 2 \(r\) but the bank's LoRA there has r=4"):
        import_peft_lora(bank, backbone, tmp_path / "a")


def test_a_missing_peft_install_is_a_clear_error(backbones, tmp_path, monkeypatch):
    backbone, bank = ours(backbones, "bert", n_tasks=1)
    monkeypatch.setitem(sys.modules, "peft", None)  # makes `import peft` raise ImportError
    with pytest.raises(ImportError, match=r"needs the `peft` package.*pip install"):
        export_peft_lora(bank, backbone, 0, tmp_path / "a")
    with pytest.raises(ImportError, match=r"needs the `peft` package"):
        import_peft_lora(bank, backbone, tmp_path / "a")
