"""In-context prompts as token ids: the context that TinT fine-tunes on and the queries it answers
(Panigrahi et al. 2023, arXiv 2307.01189, §4: few-shot classification with label words).

Layout (all pieces tokenized once, then concatenated as ids, so a query tokenized by the stream slots in unchanged)::

    [lead] text_1 infix label_1 separator text_2 infix label_2 separator ... text_q infix -> label word?

``lead`` is whatever the tokenizer puts before a text (a BOS or CLS token, often nothing), ``infix`` separates an
input from its label word (default ``"\\nAnswer:"``), ``separator`` ends an example (default ``"\\n\\n"``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Sequence, Tuple

import torch


@dataclass(frozen=True)
class PromptFormat:
    """Token pieces of the prompt template.

    Attributes:
        lead: ids the tokenizer adds before a text (BOS/CLS), put once at the very start of a prompt.
        infix: ids between an input and its label word.
        separator: ids after a label word, ending an example.
        special_ids: ids stripped from stream-tokenized queries (padding, BOS/EOS/CLS/SEP...).
        pad_id: id used for padding.
        max_example_tokens: an in-context example's text is truncated to this many tokens.
    """

    lead: Tuple[int, ...]
    infix: Tuple[int, ...]
    separator: Tuple[int, ...]
    special_ids: Tuple[int, ...]
    pad_id: int
    max_example_tokens: int

    @classmethod
    def from_tokenizer(cls, tokenizer, infix: str = "\nAnswer:", separator: str = "\n\n", max_example_tokens: int = 96) -> "PromptFormat":
        if max_example_tokens < 1:
            raise ValueError(f"max_example_tokens must be >= 1, got {max_example_tokens}")
        if not infix:
            raise ValueError("the prompt infix (between an input and its label word) must not be empty")
        plain = tokenizer("a", add_special_tokens=False)["input_ids"]
        full = tokenizer("a", add_special_tokens=True)["input_ids"]
        lead: List[int] = []
        for start in range(len(full) - len(plain) + 1):  # where the text sits among the special tokens
            if full[start : start + len(plain)] == plain:
                lead = full[:start]
                break
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if pad is None:
            raise ValueError("the tokenizer has neither a pad nor an eos token")
        return cls(
            lead=tuple(int(i) for i in lead),
            infix=tuple(tokenizer(infix, add_special_tokens=False)["input_ids"]),
            separator=tuple(tokenizer(separator, add_special_tokens=False)["input_ids"]) if separator else (),
            special_ids=tuple(sorted(int(i) for i in tokenizer.all_special_ids)),
            pad_id=int(pad),
            max_example_tokens=int(max_example_tokens),
        )


@dataclass
class Context:
    """The in-context examples of one task, as one token sequence.

    Attributes:
        ids: ``[L]`` token ids, starting with the format's lead.
        label_mask: ``[L]`` bool, true at the label-word token of each example.
        shots: how many examples fit.
    """

    ids: torch.Tensor
    label_mask: torch.Tensor
    shots: int

    def loss_mask(self, loss: str) -> torch.Tensor:
        """``[L]`` targets that count in the inner loss: ``"context"`` (every token but the first) or
        ``"label_words"`` (the examples' label words only)."""
        if loss == "context":
            mask = torch.ones_like(self.label_mask)
            mask[0] = False
            return mask
        if loss == "label_words":
            return self.label_mask.clone()
        raise ValueError(f"inner loss must be 'context' or 'label_words', got {loss!r}")


def build_context(
    fmt: PromptFormat,
    tokenizer,
    texts: Sequence[str],
    label_ids: Sequence[int],
    max_tokens: int,
) -> Context:
    """Concatenate examples in the given order while they fit in ``max_tokens`` (the rest are dropped).

    Args:
        fmt: the prompt template.
        tokenizer: the tokenizer that made ``fmt``.
        texts: example inputs.
        label_ids: each example's label-word token id.
        max_tokens: the longest context allowed, lead included.

    Raises:
        ValueError: ``texts`` and ``label_ids`` differ in length, or not even the lead fits.
    """
    if len(texts) != len(label_ids):
        raise ValueError(f"{len(texts)} example texts but {len(label_ids)} label ids")
    if max_tokens <= len(fmt.lead):
        raise ValueError(f"max context tokens {max_tokens} leaves no room for any example")
    encoded = tokenizer(list(texts), add_special_tokens=False, truncation=True, max_length=fmt.max_example_tokens)["input_ids"] if texts else []
    ids: List[int] = list(fmt.lead)
    labels: List[bool] = [False] * len(ids)
    shots = 0
    for text_ids, label in zip(encoded, label_ids):
        example = list(text_ids) + list(fmt.infix)
        piece = example + [int(label)] + list(fmt.separator)
        if len(ids) + len(piece) > max_tokens:
            break
        ids += piece
        labels += [False] * len(example) + [True] + [False] * len(fmt.separator)
        shots += 1
    return Context(ids=torch.tensor(ids, dtype=torch.long), label_mask=torch.tensor(labels, dtype=torch.bool), shots=shots)


def strip_queries(x: torch.Tensor, special_ids: Sequence[int], pad_id: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Drop padding and special tokens from stream-tokenized inputs, keeping token order.

    Args:
        x: ``[B, 2, L]`` token ids stacked on the attention mask.
        special_ids: ids to remove.
        pad_id: fill value of the freed positions.

    Returns:
        ``(ids [B, L], lengths [B])``: each row's kept tokens first, then padding.
    """
    ids, mask = x[:, 0], x[:, 1].bool()
    keep = mask & ~torch.isin(ids, torch.tensor(list(special_ids), dtype=ids.dtype, device=ids.device))
    order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)  # kept tokens first, in order
    ids = torch.gather(ids, 1, order)
    lengths = keep.sum(1)
    positions = torch.arange(ids.shape[1], device=ids.device)
    return torch.where(positions[None] < lengths[:, None], ids, torch.full_like(ids, pad_id)), lengths


def assemble_queries(
    head: torch.Tensor, queries: torch.Tensor, lengths: torch.Tensor, tail: Sequence[int], pad_id: int
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``head + query + tail`` for every row, right-padded, without a loop over rows.

    Args:
        head: ``[H]`` ids shared by every row (lead and context).
        queries: ``[B, Q]`` query ids, valid up to ``lengths``.
        lengths: ``[B]``.
        tail: ids after each query (the infix).
        pad_id: padding id.

    Returns:
        ``(input_ids [B, H + max(lengths) + len(tail)], attention_mask)`` of the same shape.
    """
    B, device = queries.shape[0], queries.device
    Q = int(lengths.max().item()) if B else 0
    tail_t = torch.tensor(list(tail), dtype=queries.dtype, device=device)
    H, T = head.numel(), tail_t.numel()
    out = torch.full((B, H + Q + T), pad_id, dtype=queries.dtype, device=device)
    out[:, :H] = head.to(device)
    out[:, H : H + Q] = queries[:, :Q]
    if T:
        cols = H + lengths[:, None] + torch.arange(T, device=device)[None]
        out.scatter_(1, cols, tail_t.expand(B, T))
    total = H + lengths + T
    mask = (torch.arange(out.shape[1], device=device)[None] < total[:, None]).long()
    return torch.where(mask.bool(), out, torch.full_like(out, pad_id)), mask
