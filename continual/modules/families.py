"""Where attention, feed-forward and normalisation modules live in each supported architecture family: one table.

Every part of continual that needs module names reads them here: the module bank's default delta targets, the FFN
fusers that turn a dense FFN into an expert site, recursive conversion (which layers to tie, what to relax) and
TinT's layouts (what the one-step update touches). Adding a family is one :class:`ArchitectureFamily` entry plus the
``config.model_type`` values that map to it.

Names are relative to one transformer block (``encoder.layer.3``, ``model.layers.3``, ``transformer.h.3``), except
``layer_lists`` and ``final_norm``, which are dotted paths from the model root (the first that exists is used).
A role a family does not have is ``None`` (BERT has no gate projection, GPT-2 fuses q, k and v into ``attn.c_attn``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Mapping, Optional, Tuple

from torch import nn


@dataclass(frozen=True)
class ArchitectureFamily:
    """Module names of one architecture family.

    Attributes:
        name: "bert", "gpt2", "llama" or "t5".
        layer_lists: dotted paths from the model root where the ``nn.ModuleList`` of blocks may live.
        query, key, value: the attention input projections (``qkv`` when fused into one module).
        qkv: the fused query/key/value projection (GPT-2's ``attn.c_attn``), else None.
        attn_out: the attention output projection.
        ffn_in: the FFN's first (up) projection.
        ffn_gate: the gate projection of a gated FFN (Llama), else None.
        ffn_out: the FFN's down projection.
        ffn: the module holding the whole FFN (what an expert site replaces).
        ffn_act: the FFN's activation, relative to the block.
        attn_norm, ffn_norm: the block's normalisations, before (pre-norm) or after (post-norm) each sub-layer.
        final_norm: the norm after the last block, from the model root (None for encoders without one).
        targets: named groups of module-name regexes the module bank attaches delta kinds to by default (matched as
            dotted suffixes of module names; ``{last}`` stands for the last block's index): ``query_value``,
            ``key_value``, ``block_outputs`` (attention and FFN output projections), ``block_linears`` (every linear
            of a block), ``block_biases`` (the linears whose biases BitFit offsets), ``last_block_linears``, ``ffn``
            (the module an expert site replaces).
        causal_lm: whether the family's models are decoder-only causal language models (what label-word
            classification scores with); False for encoder-only (BERT) and encoder-decoder (T5) families.
    """

    name: str
    layer_lists: Tuple[str, ...]
    query: Optional[str]
    key: Optional[str]
    value: Optional[str]
    qkv: Optional[str]
    attn_out: str
    ffn_in: str
    ffn_gate: Optional[str]
    ffn_out: str
    ffn: str
    ffn_act: str
    attn_norm: str
    ffn_norm: str
    final_norm: Optional[Tuple[str, ...]] = None
    targets: Mapping[str, str] = field(default_factory=dict)
    causal_lm: bool = False

    @property
    def projections(self) -> Tuple[str, ...]:
        """Every linear projection of one block, in forward order."""
        names = (self.qkv,) if self.qkv else (self.query, self.key, self.value)
        ffn = (self.ffn_gate, self.ffn_in) if self.ffn_gate else (self.ffn_in,)
        return tuple(n for n in names if n) + (self.attn_out,) + ffn + (self.ffn_out,)

    @property
    def norms(self) -> Tuple[str, str]:
        return (self.attn_norm, self.ffn_norm)


_BERT_LINEARS = (r"attention\.self\.(?:query|key|value)|attention\.output\.dense|intermediate\.dense"
                 r"|layer\.\d+\.output\.dense")
_GPT2_LINEARS = r"attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj"
_LLAMA_LINEARS = r"self_attn\.(?:q|k|v|o)_proj|mlp\.(?:gate|up|down)_proj"
_T5_LINEARS = r"(?:SelfAttention|EncDecAttention)\.(?:q|k|v|o)|DenseReluDense\.(?:wi|wi_0|wi_1|wo)"

FAMILIES: Dict[str, ArchitectureFamily] = {
    "bert": ArchitectureFamily(
        name="bert",
        layer_lists=("encoder.layer", "bert.encoder.layer", "roberta.encoder.layer"),
        query="attention.self.query", key="attention.self.key", value="attention.self.value", qkv=None,
        attn_out="attention.output.dense",
        ffn_in="intermediate.dense", ffn_gate=None, ffn_out="output.dense", ffn="intermediate",
        ffn_act="intermediate.intermediate_act_fn",
        attn_norm="attention.output.LayerNorm", ffn_norm="output.LayerNorm",
        targets={
            "query_value": r"attention\.self\.query|attention\.self\.value",
            "key_value": r"attention\.self\.(?:key|value)",
            "block_outputs": r"attention\.output\.dense|layer\.\d+\.output\.dense",
            "block_linears": _BERT_LINEARS,
            "block_biases": _BERT_LINEARS,
            "last_block_linears": r"encoder\.layer\.{last}\.(?:attention\.self\.(?:query|key|value)|attention\.output\.dense"
                                  r"|intermediate\.dense|output\.dense)",
            "ffn": r"intermediate",
        },
    ),
    "gpt2": ArchitectureFamily(
        name="gpt2",
        causal_lm=True,
        layer_lists=("transformer.h", "h"),
        query=None, key=None, value=None, qkv="attn.c_attn",
        attn_out="attn.c_proj",
        ffn_in="mlp.c_fc", ffn_gate=None, ffn_out="mlp.c_proj", ffn="mlp", ffn_act="mlp.act",
        attn_norm="ln_1", ffn_norm="ln_2", final_norm=("transformer.ln_f", "ln_f"),
        targets={
            "query_value": r"attn\.c_attn",
            "key_value": r"attn\.c_attn",
            "block_outputs": r"attn\.c_proj|mlp\.c_proj",
            "block_linears": _GPT2_LINEARS,
            "block_biases": r"c_attn|c_proj|c_fc",
            "last_block_linears": r"h\.{last}\.(?:" + _GPT2_LINEARS + ")",
            "ffn": r"mlp",
        },
    ),
    "llama": ArchitectureFamily(
        name="llama",
        causal_lm=True,
        layer_lists=("model.layers", "layers"),
        query="self_attn.q_proj", key="self_attn.k_proj", value="self_attn.v_proj", qkv=None,
        attn_out="self_attn.o_proj",
        ffn_in="mlp.up_proj", ffn_gate="mlp.gate_proj", ffn_out="mlp.down_proj", ffn="mlp", ffn_act="mlp.act_fn",
        attn_norm="input_layernorm", ffn_norm="post_attention_layernorm", final_norm=("model.norm", "norm"),
        targets={
            "query_value": r"self_attn\.q_proj|self_attn\.v_proj",
            "key_value": r"self_attn\.(?:k|v)_proj",
            "block_outputs": r"self_attn\.o_proj|mlp\.down_proj",
            "block_linears": _LLAMA_LINEARS,
            "block_biases": r"(?:q|k|v|o|gate|up|down)_proj",
            "last_block_linears": r"layers\.{last}\.(?:" + _LLAMA_LINEARS + ")",
            "ffn": r"mlp",
        },
    ),
    "t5": ArchitectureFamily(
        name="t5",
        layer_lists=("encoder.block", "block"),
        query="layer.0.SelfAttention.q", key="layer.0.SelfAttention.k", value="layer.0.SelfAttention.v", qkv=None,
        attn_out="layer.0.SelfAttention.o",
        ffn_in="layer.1.DenseReluDense.wi", ffn_gate=None, ffn_out="layer.1.DenseReluDense.wo",
        ffn="layer.1.DenseReluDense", ffn_act="layer.1.DenseReluDense.act",
        attn_norm="layer.0.layer_norm", ffn_norm="layer.1.layer_norm", final_norm=("encoder.final_layer_norm",),
        targets={  # T5 names are short: these also match the decoder's cross-attention where a model has one
            "query_value": r"q|v",
            "key_value": r"SelfAttention\.(?:k|v)",
            "block_outputs": r"SelfAttention\.o|EncDecAttention\.o|DenseReluDense\.wo",
            "block_linears": _T5_LINEARS,
            "block_biases": r"q|k|v|o|wi|wi_0|wi_1|wo",
            "last_block_linears": r"block\.{last}\.layer\.\d+\.(?:" + _T5_LINEARS + ")",
        },
    ),
}

# Hugging Face ``config.model_type`` -> family name.
MODEL_TYPES: Dict[str, str] = {
    "bert": "bert",
    "roberta": "bert",
    "xlm-roberta": "bert",
    "electra": "bert",
    "gpt2": "gpt2",
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "llama",
    "t5": "t5",
    "mt5": "t5",
}


def model_type_of(model: nn.Module) -> Optional[str]:
    return getattr(getattr(model, "config", None), "model_type", None)


def family_of(model: nn.Module, purpose: str = "this operation") -> ArchitectureFamily:
    """The family of a Hugging Face model, from ``model.config.model_type``.

    Args:
        purpose: what needs the family, for the error message ("recursive conversion", "default delta targets").

    Raises:
        ValueError: an unsupported model type (the message lists the supported ones).
    """
    model_type = model_type_of(model)
    if model_type not in MODEL_TYPES:
        raise ValueError(
            f"{purpose} does not support model_type {model_type!r} ({type(model).__name__}); "
            f"supported: {', '.join(sorted(MODEL_TYPES))} (add a family in continual/modules/families.py)"
        )
    return FAMILIES[MODEL_TYPES[model_type]]


def default_targets(group: str) -> Dict[str, str]:
    """``{family name: regex}`` of one target group, for the families that have it (a delta kind's defaults)."""
    return {name: family.targets[group] for name, family in FAMILIES.items() if group in family.targets}
